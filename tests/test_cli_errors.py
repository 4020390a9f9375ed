"""Bad input: one clear line, a non-zero exit, no traceback, nothing left mounted."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from support import PYUNION, is_mounted, needs_fuse, pyunion

from unionfs.errors import UserError
from unionfs.options import MountConfig, parse_options, split_lowerdirs, split_options


def _fails(*args: str) -> str:
    r = pyunion(*args, check=False)
    assert r.returncode != 0
    assert "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    return lines[0]


def test_escapes_quotes_and_empty_items() -> None:
    r"""The kernel's rules: `\X` is X, commas in double quotes do not split, empty items skipped."""
    assert split_lowerdirs(r"a\:b:c") == ["a:b", "c"]
    assert split_lowerdirs(r"/l\\x::/data") == ["/l\\x", "/data"]  # '::' before data-only layers
    assert split_options(',a,,b="x,y",\\,c,') == ["a", 'b="x,y"', "\\,c"]
    cfg = MountConfig(lowers=[], mountpoint="m")
    parse_options([r"lowerdir=/x\:y:/a\,b:/z,upperdir=/u\,v,,workdir=/w\\,"], cfg)
    assert cfg.lowers == ["/x:y", "/a,b", "/z"] and cfg.upper == "/u,v" and cfg.work == "/w\\"
    cfg = MountConfig(lowers=[], mountpoint="m")
    parse_options(['lowerdir=/l,context="system_u:object_r:container_file_t:s0:c1,c2",ro', ""], cfg)
    assert cfg.lowers == ["/l"] and cfg.read_only


@pytest.mark.parametrize(
    "opt",
    [
        "lowerdir=",
        "lowerdir=:",
        "bogus=1",
        "upperdir=",
        "lowerdir=/a\\",
        'lowerdir=/a,context="x,y',
    ],
)
def test_malformed_options(opt: str) -> None:
    with pytest.raises(UserError):
        parse_options([opt], MountConfig(lowers=[], mountpoint="m"))


# (option string, None if it mounts, or a word of the one-line error)
BOTH_COMMANDS = [
    ('lowerdir={l},context="system_u:object_r:container_file_t:s0:c1,c2"', None),
    ("lowerdir={l},,upperdir={u},workdir={w},", None),
    ("lowerdir={esc},upperdir={u},workdir={w},volatile", None),
    ("lowerdir={l},bogus", "bogus"),
    ('lowerdir={l},context="a:b:c1,c2', "quote"),
    ("lowerdir={l}\\", "backslash"),
    ("lowerdir=,upperdir={u}", "lowerdir"),
    # A flag with a value was ignored, and the mount kept what the flag takes away.
    ("lowerdir={l},nosuid=1", "nosuid"),
    ("lowerdir={l},nodev=0", "nodev"),
    # Numbers: str.isdigit() took `²` and int() refused it, or more than 4300 digits
    # (a traceback); `١٢` (Arabic-Indic digits) was read as 12.
    ("lowerdir={l},spin=\u00b2", "spin"),
    ("lowerdir={l},spin=\u0661\u0662", "spin"),
    ("lowerdir={l},spin=" + "1" * 5000, "spin"),
    ("lowerdir={l},uidmapping=0:" + "1" * 5000 + ":1", "uidmapping"),
    ("lowerdir={l},squash_to_gid=" + "9" * 5000, "squash_to_gid"),
    ("lowerdir={l},spin=" + "0" * 30 + "50", None),
]


@needs_fuse
@pytest.mark.parametrize("opts,error", BOTH_COMMANDS)
def test_one_option_parser_for_both_commands(tmp_path: Path, opts: str, error: str | None) -> None:
    """`pyunion mount -o` and `pyunion-overlayfs -o` read every option string alike."""
    from support import force_unmount

    odd = tmp_path / "a,b:c"  # a layer whose name needs both escapes
    for d in ("l", "u", "w", "m", odd):
        (tmp_path / d).mkdir()
    (odd / "seen").write_text("x")
    opts = opts.format(
        l=tmp_path / "l",
        u=tmp_path / "u",
        w=tmp_path / "w",
        esc=str(odd).replace(",", "\\,").replace(":", "\\:"),
    )
    mnt = tmp_path / "m"
    overlayfs = str(Path(sys.executable).parent / "pyunion-overlayfs")
    outcomes = []
    for cmd in (["mount", "-o", opts, str(mnt)], ["-o", opts, str(mnt)]):
        if cmd[0] == "mount":
            r = pyunion(*cmd, check=False)
        else:
            r = subprocess.run(
                [overlayfs, *cmd], check=False, capture_output=True, text=True, timeout=60
            )
        try:
            mounted_now = is_mounted(mnt)
            if mounted_now and str(odd) not in opts and "b\\:c" in opts:
                assert os.listdir(mnt) == ["seen"]  # the escaped path named the odd layer
        finally:
            if is_mounted(mnt):
                pyunion("umount", str(mnt), check=False)
                force_unmount(mnt)
        assert "Traceback" not in r.stderr
        outcomes.append((r.returncode, r.stderr, mounted_now))
    assert outcomes[0] == outcomes[1], outcomes
    code, err, was_mounted = outcomes[0]
    if error is None:
        assert code == 0 and was_mounted, err
    else:
        assert code != 0 and not was_mounted
        assert len(err.strip().splitlines()) == 1 and error in err, err


@pytest.mark.parametrize(
    ("args", "word"),
    [
        (("run", "--shm-size", "abc", "x"), "--shm-size"),
        (("run", "--pids-limit", "abc", "x"), "--pids-limit"),
        (("run", "--bogus", "x"), "--bogus"),
        (("bogus",), "bogus"),
        (("mount",), "required"),
        (("image", "rm"), "rm"),
    ],
)
def test_usage_errors_are_one_line(args: tuple[str, ...], word: str) -> None:
    """argparse's usage errors too (it prints the usage text before them): one line naming
    what was wrong and where the help is."""
    line = _fails(*args)
    assert word in line and "--help" in line, line


@needs_fuse
def test_a_comma_in_the_file_system_name_is_no_option_of_its_own(tmp_path: Path) -> None:
    """`fsname=a\\,ro` names the mount "a,ro"; handed to libfuse unescaped, which splits
    options on commas, it mounted a read-only file system named "a"."""
    from support import force_unmount

    for d in ("l", "u", "w", "m"):
        (tmp_path / d).mkdir()
    mnt = tmp_path / "m"
    opts = f"lowerdir={tmp_path / 'l'},upperdir={tmp_path / 'u'},workdir={tmp_path / 'w'}"
    pyunion("mount", "-o", opts + ",fsname=a\\,ro", str(mnt))
    try:
        (mnt / "f").write_text("written")
        line = next(
            ln for ln in Path("/proc/self/mountinfo").read_text().splitlines() if f" {mnt} " in ln
        )
        assert line.split(" - ")[1].split()[1] == "a,ro", line
    finally:
        pyunion("umount", str(mnt), check=False)
        force_unmount(mnt)
    assert (tmp_path / "u" / "f").read_text() == "written"


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
    from support import mounted

    lows, _, _, mnt = layers
    with mounted(lows, mnt):
        assert "already a mount point" in _fails("mount", str(lows[0]), str(mnt))


@needs_fuse
def test_no_proc(layers: tuple) -> None:
    """In a mount namespace without /proc (a bare chroot's): one line, not a traceback of
    the first read of /proc/self/fd; the namespace, and whatever it mounted, go with it."""
    lows, upper, work, mnt = layers
    script = 'mount -t tmpfs none /proc && exec "$@"'
    opts = f"lowerdir={lows[0]},upperdir={upper},workdir={work}"
    r = subprocess.run(
        ["unshare", "-m", "sh", "-c", script, "sh", *PYUNION, "mount", "-o", opts, str(mnt)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert "Traceback" not in r.stderr and len(lines) == 1, r.stderr
    assert "/proc" in lines[0]


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
    msg = _fails(
        "mount",
        "-o",
        f"lowerdir={tmp_path}/l,upperdir={tmp_path}/u,workdir=/dev/shm",
        str(tmp_path / "m"),
    )
    assert "same filesystem" in msg


@needs_fuse
def test_upper_in_use(layers: tuple) -> None:
    from support import mounted

    lows, upper, work, mnt = layers
    other = mnt.parent / "mnt2"
    other.mkdir()
    with mounted(lows, mnt, upper, work):
        msg = _fails(
            "mount", "-o", f"lowerdir={lows[0]},upperdir={upper},workdir={work}", str(other)
        )
        assert "in use" in msg
    assert not is_mounted(other)
