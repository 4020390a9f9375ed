"""tree.DirCursor and tree.open_regular: moving through hostile trees by fd, reading only
regular files inside them."""

from __future__ import annotations

import errno
import os
import stat
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from unionfs.tree import DirCursor, NotRegularFile, open_regular, read_regular, rmtree


def _fd(p: Path) -> int:
    return os.open(p, os.O_RDONLY | os.O_DIRECTORY)


def test_cursor_walks_deep_trees_in_linear_time(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    rfd = _fd(root)
    c = DirCursor(rfd)
    try:
        depth = 3000
        t0 = time.monotonic()
        for i in range(1, depth + 1):
            c.goto(["d"] * i, mkdir=0o755)  # one component more each time: O(1) per step
        fd = os.open("f", os.O_CREAT | os.O_WRONLY, 0o644, dir_fd=c.fd)
        os.close(fd)
        c.goto(["d"] * (depth - 1) + ["e"], mkdir=0o755)  # a sibling: up one, down one
        c.goto([])
        assert time.monotonic() - t0 < 30
        assert c.ident() == (os.fstat(rfd).st_dev, os.fstat(rfd).st_ino)
        assert os.listdir(c.fd) == ["d"]
    finally:
        c.close()
        os.close(rfd)
        rmtree(str(root))


def test_cursor_never_follows_and_says_where_it_stopped(tmp_path: Path) -> None:
    (tmp_path / "root/a").mkdir(parents=True)
    (tmp_path / "outside").mkdir()
    (tmp_path / "root/a/link").symlink_to(tmp_path / "outside")
    (tmp_path / "root/a/file").write_text("x")
    rfd = _fd(tmp_path / "root")
    c = DirCursor(rfd)
    try:
        with pytest.raises(OSError) as ei:
            c.goto(["a", "link", "x"], mkdir=0o755)
        assert ei.value.errno == errno.ELOOP and c.parts == ["a"]
        with pytest.raises(OSError) as ei:
            c.goto(["a", "file", "x"], mkdir=0o755)
        assert ei.value.errno == errno.ENOTDIR and c.parts == ["a"]
        assert os.listdir(tmp_path / "outside") == []
        with pytest.raises(FileNotFoundError):
            c.goto(["a", "nothere"])
    finally:
        c.close()
        os.close(rfd)


def test_cursor_refuses_to_climb_out_of_a_moved_directory(tmp_path: Path) -> None:
    (tmp_path / "root/a/b").mkdir(parents=True)
    (tmp_path / "elsewhere").mkdir()
    rfd = _fd(tmp_path / "root")
    c = DirCursor(rfd)
    try:
        c.goto(["a", "b"])
        os.rename(tmp_path / "root/a", tmp_path / "elsewhere/a")  # `..` of b is not root/a's
        os.mkdir(tmp_path / "root/a")
        c.goto(["a", "b"])  # no move needed: still where it was
        with pytest.raises(OSError) as ei:
            c.goto(["x"])
        assert ei.value.errno == errno.ESTALE
        c.reset()
        assert c.goto(["a"]) >= 0 and c.parts == ["a"]
    finally:
        c.close()
        os.close(rfd)


def _refused_at_once(why: str, fn: Callable[..., object], *args: Any, **kw: Any) -> None:
    """fn(*args, **kw) raises NotRegularFile saying `why`, at once: a FIFO is never opened."""
    t0 = time.monotonic()
    with pytest.raises(NotRegularFile, match=why):
        fn(*args, **kw)
    assert time.monotonic() - t0 < 5


def test_open_regular_refuses_what_is_not_a_file_inside(tmp_path: Path) -> None:
    d = tmp_path / "d"
    (d / "sub").mkdir(parents=True)
    (d / "file").write_bytes(b"data")
    (d / "sub/inner").write_bytes(b"inner")
    (d / "zero").symlink_to("/dev/zero")
    (d / "in-link").symlink_to("sub/inner")
    (d / "out-link").symlink_to(tmp_path / "secret")
    (tmp_path / "secret").write_bytes(b"secret")
    os.mkfifo(d / "fifo")
    dfd = _fd(d)
    try:
        assert read_regular(dfd, "file", 100) == b"data"
        assert read_regular(dfd, "in-link", 100, symlinks=True) == b"inner"
        for name, symlinks, why in (
            ("zero", False, "symlink"),
            ("zero", True, "outside"),
            ("in-link", False, "symlink"),
            ("out-link", True, "outside"),
            ("fifo", True, "not a regular file"),
            ("sub", True, "not a regular file"),
            ("../secret", True, "outside"),
        ):
            _refused_at_once(why, open_regular, dfd, name, symlinks=symlinks)
        with pytest.raises(OSError) as ei:
            read_regular(dfd, "file", 3)
        assert ei.value.errno == errno.EFBIG
    finally:
        os.close(dfd)


def test_read_regular_in_root_sees_the_path_as_the_container_does(tmp_path: Path) -> None:
    """resolve="in_root": symlinks (absolute too) and `..` resolve inside the root, as after a
    chroot; a FIFO or a device there is still refused without being opened."""
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    (root / "srv").mkdir()
    (root / "srv/users").write_bytes(b"in the root")
    (tmp_path / "srv").mkdir()
    (tmp_path / "srv/users").write_bytes(b"on the host")
    (root / "etc/passwd").symlink_to("/srv/users")
    (root / "etc/group").symlink_to("../../../../srv/users")
    (root / "etc/zero").symlink_to("/dev/zero")
    (root / "etc/loop").symlink_to("loop")
    os.mkfifo(root / "etc/fifo")
    rfd = _fd(root)
    try:
        for path in ("/etc/passwd", "etc/group", "/../srv/users", b"/etc/passwd"):
            assert read_regular(rfd, path, 100, resolve="in_root") == b"in the root"
        with pytest.raises(FileNotFoundError):
            read_regular(rfd, "/etc/zero", 100, resolve="in_root")  # no /dev in this root
        os.mkdir(root / "dev")
        os.mknod(root / "dev/zero", 0o600 | stat.S_IFCHR, os.makedev(1, 5))
        for path in ("/etc/zero", "/etc/fifo", "/etc"):
            _refused_at_once("not a regular file", read_regular, rfd, path, 100, resolve="in_root")
        with pytest.raises(OSError) as ei:
            read_regular(rfd, "/etc/loop", 100, resolve="in_root")
        assert ei.value.errno == errno.ELOOP and not isinstance(ei.value, NotRegularFile)
        with pytest.raises(OSError) as ei:
            read_regular(rfd, "/etc/passwd", 5, resolve="in_root")
        assert ei.value.errno == errno.EFBIG
    finally:
        os.close(rfd)


def test_read_regular_trusted_takes_a_path_as_given(tmp_path: Path) -> None:
    """resolve="trusted" (a file the caller named): root's and the caller's symlinks
    followed, absolute paths taken, but a FIFO or a device is still refused unopened,
    and the read is bounded."""
    (tmp_path / "profile.json").write_bytes(b"{}")
    (tmp_path / "link").symlink_to(tmp_path / "profile.json")
    os.mkfifo(tmp_path / "fifo")
    cwd = os.open(tmp_path, os.O_PATH | os.O_DIRECTORY)
    try:
        for path in (str(tmp_path / "link"), "profile.json"):
            assert read_regular(cwd, path, 10, resolve="trusted") == b"{}"
        for path in ("/dev/zero", str(tmp_path / "fifo"), str(tmp_path)):
            _refused_at_once("not a regular file", read_regular, cwd, path, 10, resolve="trusted")
        with pytest.raises(OSError) as ei:
            read_regular(cwd, "profile.json", 1, resolve="trusted")
        assert ei.value.errno == errno.EFBIG
    finally:
        os.close(cwd)
