"""The core without FUSE: `Union` driven directly over real layer directories."""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

import pytest
from support import needs_root

from unionfs.layers import LayerStack
from unionfs.mount import prepare_workdir
from unionfs.union import Ctx, Union

root_only = needs_root


def make_union(tmp_path: Path, lowers: list[Path], upper: bool = True) -> Union:
    up = tmp_path / "upper"
    work = tmp_path / "work"
    up.mkdir(exist_ok=True)
    work.mkdir(exist_ok=True)
    stack = LayerStack([str(p) for p in lowers], str(up) if upper else None)
    wfd = prepare_workdir(str(work))[1] if upper else -1
    return Union(stack, wfd)


def names(u: Union, path: bytes = b"") -> set[bytes]:
    d = u.root
    for part in filter(None, path.split(b"/")):
        n = u.lookup(d, part)
        assert n is not None
        d = n
    fh = u.opendir(d)
    try:
        return {name for name, _, _, _, _ in u.readdir(fh, 0)} - {b".", b".."}
    finally:
        u.releasedir(fh)


@pytest.fixture
def two(tmp_path: Path) -> tuple[Path, Path]:
    l1, l2 = tmp_path / "l1", tmp_path / "l2"
    l1.mkdir()
    l2.mkdir()
    return l1, l2


@root_only
def test_kernel_and_oci_whiteouts(tmp_path: Path, two: tuple[Path, Path]) -> None:
    l1, l2 = two
    for n in ("a", "b", "c"):
        (l2 / n).write_text(n)
    os.mknod(l1 / "a", stat.S_IFCHR, os.makedev(0, 0))
    (l1 / ".wh.b").touch()
    u = make_union(tmp_path, [l1, l2], upper=False)
    assert names(u) == {b"c"}
    assert u.lookup(u.root, b"a") is None and u.lookup(u.root, b"b") is None
    with pytest.raises(OSError) as e:
        u.lookup(u.root, b".wh.b")
    assert e.value.errno == errno.EINVAL


@root_only
def test_oci_marker_hides_only_layers_below(tmp_path: Path, two: tuple[Path, Path]) -> None:
    l1, l2 = two
    (l2 / "d").mkdir()
    (l2 / "d" / "old").touch()
    (l1 / "d").mkdir()
    (l1 / "d" / "new").touch()
    (l1 / "d" / ".wh..wh..opq").touch()
    (l1 / "x").write_text("same layer")
    (l1 / ".wh.x").touch()
    u = make_union(tmp_path, [l1, l2], upper=False)
    assert names(u, b"d") == {b"new"}
    assert b"x" in names(u)


@root_only
def test_opaque_xattr_forms(tmp_path: Path, two: tuple[Path, Path]) -> None:
    l1, l2 = two
    for i, attr in enumerate(
        ("trusted.overlay.opaque", "user.overlay.opaque", "user.fuseoverlayfs.opaque")
    ):
        (l2 / f"d{i}").mkdir()
        (l2 / f"d{i}" / "below").touch()
        (l1 / f"d{i}").mkdir()
        (l1 / f"d{i}" / "top").touch()
        os.setxattr(l1 / f"d{i}", attr, b"y")
    (l2 / "e").mkdir()
    (l2 / "e" / "below").touch()
    (l1 / "e").mkdir()
    os.mknod(l1 / "e" / ".wh..opq", stat.S_IFCHR, os.makedev(0, 0))
    u = make_union(tmp_path, [l1, l2], upper=False)
    for i in range(3):
        assert names(u, b"d%d" % i) == {b"top"}
    assert names(u, b"e") == set()
    d0 = u.lookup(u.root, b"d0")
    assert d0 is not None and b"trusted.overlay.opaque" not in u.listxattr(d0)


@root_only
def test_copy_up_keeps_ino_and_metadata(tmp_path: Path, two: tuple[Path, Path]) -> None:
    l1, l2 = two
    (l2 / "dir").mkdir(mode=0o750)
    f = l2 / "dir" / "f"
    f.write_bytes(b"data")
    os.chown(f, 1234, 5678)
    os.chmod(f, 0o640)
    os.setxattr(f, "user.k", b"v")
    os.utime(f, ns=(1_000_000_000, 2_000_000_000))
    u = make_union(tmp_path, [l1, l2])
    d = u.lookup(u.root, b"dir")
    n = u.lookup(d, b"f")
    ino = n.ino
    u.copy_up(n)
    up = tmp_path / "upper" / "dir" / "f"
    st = up.stat()
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (1234, 5678, 0o640)
    assert st.st_mtime_ns == 2_000_000_000 and up.read_bytes() == b"data"
    assert os.getxattr(up, "user.k") == b"v"
    assert stat.S_IMODE((tmp_path / "upper" / "dir").stat().st_mode) == 0o750
    assert n.ino == ino and os.listdir(tmp_path / "work" / "work") == []


@root_only
def test_unlink_and_rmdir_write_kernel_whiteouts(tmp_path: Path, two: tuple[Path, Path]) -> None:
    l1, l2 = two
    (l2 / "f").touch()
    (l2 / "d").mkdir()
    (l2 / "d" / "x").touch()
    u = make_union(tmp_path, [l1, l2])
    u.unlink(u.root, b"f")
    with pytest.raises(OSError) as e:
        u.rmdir(u.root, b"d")
    assert e.value.errno == errno.ENOTEMPTY
    d = u.lookup(u.root, b"d")
    u.unlink(d, b"x")
    u.rmdir(u.root, b"d")
    upper = tmp_path / "upper"
    for n in ("f", "d"):
        st = os.lstat(upper / n)
        assert stat.S_ISCHR(st.st_mode) and st.st_rdev == 0
    assert names(u) == set()
    # A name only in the upper leaves no whiteout.
    fh, _, _ = u.create(u.root, b"new", 0o644, os.O_WRONLY, Ctx())
    u.release(fh)
    u.unlink(u.root, b"new")
    assert not os.path.lexists(upper / "new")


@root_only
def test_mkdir_over_whiteout_is_opaque(tmp_path: Path, two: tuple[Path, Path]) -> None:
    l1, l2 = two
    (l2 / "d").mkdir()
    (l2 / "d" / "old").touch()
    u = make_union(tmp_path, [l1, l2])
    d = u.lookup(u.root, b"d")
    u.unlink(d, b"old")
    u.rmdir(u.root, b"d")
    u.mkdir(u.root, b"d", 0o755, Ctx())
    assert os.getxattr(tmp_path / "upper" / "d", "trusted.overlay.opaque") == b"y"
    assert names(u, b"d") == set()


@root_only
def test_rename_merged_directory(tmp_path: Path, two: tuple[Path, Path]) -> None:
    l1, l2 = two
    (l2 / "d" / "sub").mkdir(parents=True)
    (l2 / "d" / "sub" / "f").write_text("lower")
    (l1 / "d").mkdir()
    (l1 / "d" / "g").write_text("top")
    u = make_union(tmp_path, [l1, l2])
    u.rename(u.root, b"d", u.root, b"e")
    assert names(u) == {b"e"}
    assert names(u, b"e") == {b"sub", b"g"}
    upper = tmp_path / "upper"
    assert (upper / "e" / "sub" / "f").read_text() == "lower"
    assert stat.S_ISCHR(os.lstat(upper / "d").st_mode)
    assert os.getxattr(upper / "e", "trusted.overlay.opaque") == b"y"


@root_only
def test_read_only_stack_refuses_writes(tmp_path: Path, two: tuple[Path, Path]) -> None:
    l1, l2 = two
    (l1 / "f").touch()
    u = make_union(tmp_path, [l1, l2], upper=False)
    with pytest.raises(OSError) as e:
        u.unlink(u.root, b"f")
    assert e.value.errno == errno.EROFS


@root_only
def test_lookups_release_on_forget(tmp_path: Path, two: tuple[Path, Path]) -> None:
    l1, _ = two
    for i in range(200):
        (l1 / f"f{i}").touch()
    u = make_union(tmp_path, [l1], upper=False)
    before = len(u.table.nodes)
    found = [u.lookup(u.root, b"f%d" % i) for i in range(200)]
    assert len(u.table.nodes) == before + 200
    for n in found:
        u.forget(n.ino, 1)
    assert len(u.table.nodes) == before


@root_only
def test_setattr_on_directories(tmp_path: Path, two: tuple[Path, Path]) -> None:
    l1, l2 = two
    (l2 / "d").mkdir()
    u = make_union(tmp_path, [l1, l2])
    d = u.lookup(u.root, b"d")
    new = u.mkdir(u.root, b"n", 0o755, Ctx())
    for node, path in ((d, tmp_path / "upper" / "d"), (new, tmp_path / "upper" / "n")):
        u.setattr(node, uid=12, gid=34, mode=0o710, atime_ns=10**9, mtime_ns=2 * 10**9)
        st = path.stat()
        assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (12, 34, 0o710)
        assert st.st_mtime_ns == 2 * 10**9
