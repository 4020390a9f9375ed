"""Bad input: one clear line, a non-zero exit, no traceback, nothing left mounted."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import is_mounted, needs_fuse, pyunion
from unionfs.errors import UserError
from unionfs.options import MountConfig, parse_options, split_escaped


def _fails(*args: str) -> str:
    r = pyunion(*args, check=False)
    assert r.returncode != 0
    assert "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    return lines[0]


def test_split_escaped_colon() -> None:
    assert split_escaped(r"a\:b:c", ":") == ["a:b", "c"]
    cfg = MountConfig(lowers=[], mountpoint="m")
    parse_options([r"lowerdir=/x\:y:/z,upperdir=/u,workdir=/w"], cfg)
    assert cfg.lowers == ["/x:y", "/z"] and cfg.upper == "/u" and cfg.work == "/w"


@pytest.mark.parametrize("opt", ["lowerdir=", "lowerdir=/a,,upperdir=/b", "bogus=1", "upperdir=",
                                 "lowerdir=/a\\"])
def test_malformed_options(opt: str) -> None:
    with pytest.raises(UserError):
        parse_options([opt], MountConfig(lowers=[], mountpoint="m"))


@needs_fuse
def test_missing_layer(tmp_path: Path) -> None:
    (tmp_path / "m").mkdir()
    msg = _fails("mount", "-o", f"lowerdir={tmp_path}/nope", str(tmp_path / "m"))
    assert "does not exist" in msg
    assert not is_mounted(tmp_path / "m")


@needs_fuse
def test_layer_not_a_directory(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("x")
    (tmp_path / "l").mkdir()
    (tmp_path / "m").mkdir()
    msg = _fails("mount", str(tmp_path / "f"), str(tmp_path / "l"), str(tmp_path / "m"))
    assert "not a directory" in msg


@needs_fuse
def test_missing_mountpoint(tmp_path: Path) -> None:
    (tmp_path / "l").mkdir()
    assert "does not exist" in _fails("mount", str(tmp_path / "l"), str(tmp_path / "nope"))


@needs_fuse
def test_malformed_option_string_cli(tmp_path: Path) -> None:
    (tmp_path / "m").mkdir()
    assert "option" in _fails("mount", "-o", "lowerdir=/a,wat", str(tmp_path / "m"))


@needs_fuse
def test_already_mounted(layers: tuple) -> None:
    from conftest import mounted

    lows, upper, work, mnt = layers
    with mounted(lows, mnt):
        assert "already a mount point" in _fails("mount", str(lows[0]), str(mnt))


@needs_fuse
def test_mountpoint_inside_layer(tmp_path: Path) -> None:
    (tmp_path / "l" / "sub").mkdir(parents=True)
    msg = _fails("mount", str(tmp_path / "l"), str(tmp_path / "l" / "sub"))
    assert "inside" in msg


@needs_fuse
def test_umount_not_mounted(tmp_path: Path) -> None:
    assert "not mounted" in _fails("umount", str(tmp_path))


@needs_fuse
def test_work_on_other_filesystem(tmp_path: Path) -> None:
    (tmp_path / "l").mkdir()
    (tmp_path / "u").mkdir()
    (tmp_path / "m").mkdir()
    msg = _fails("mount", "-o", f"lowerdir={tmp_path}/l,upperdir={tmp_path}/u,workdir=/dev/shm",
                 str(tmp_path / "m"))
    assert "same filesystem" in msg


@needs_fuse
def test_upper_in_use(layers: tuple) -> None:
    from conftest import mounted

    lows, upper, work, mnt = layers
    other = mnt.parent / "mnt2"
    other.mkdir()
    with mounted(lows, mnt, upper, work):
        msg = _fails("mount", "-o", f"lowerdir={lows[0]},upperdir={upper},workdir={work}", str(other))
        assert "in use" in msg
    assert not is_mounted(other)
