"""A local user or a hostile caller must not turn root's mount against root or its data.

Kernel overlayfs is the oracle where it has an answer: whiteouts cannot be
made through the merged view; overlapping layer, upper and work paths are
refused before anything is touched. Beyond that: the daemon's state files
cannot be redirected by a user, the daemon pins no filesystem it does not
serve (cwd `/`, no inherited fds), and `pyunion umount` returning means every
layer is released.
"""

from __future__ import annotations

import errno
import os
import shutil
import stat
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from conftest import force_unmount, is_mounted, kernel_overlay, mounted, needs_fuse, run_child

from unionfs.syscalls import RENAME_WHITEOUT, renameat2

pytestmark = [needs_fuse, pytest.mark.timeout(120)]

NOBODY = 65534


@pytest.fixture
def open_tree() -> Iterator[Path]:
    """A tree under /tmp every user can reach (tmp_path's ancestors are 0700)."""
    base = Path(tempfile.mkdtemp(prefix="pyunion-sec-", dir="/tmp"))
    os.chmod(base, 0o755)
    try:
        yield base
    finally:
        for m in base.glob("*mnt"):
            force_unmount(m)
        if not any(is_mounted(m) for m in base.glob("*mnt")):
            shutil.rmtree(base)


def _errno_as(uid: int, fn: Callable[[], object]) -> int:
    """errno of fn() run in a child as `uid` (0 if it worked)."""
    r, w = os.pipe()

    def child() -> None:
        os.close(r)
        if uid:
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
        try:
            fn()
            code = 0
        except OSError as e:
            code = e.errno or -1
        os.write(w, str(code).encode())

    try:
        assert run_child(child) == 0
        os.close(w)
        w = -1
        with os.fdopen(r, "rb") as f:
            r = -1
            return int(f.read())
    finally:
        for fd in (r, w):
            if fd >= 0:
                os.close(fd)


# -- whiteouts cannot be made through the merged view --------------------------------------
def test_no_whiteout_through_the_merged_view(open_tree: Path) -> None:
    """mknod c 0 0 and RENAME_WHITEOUT: kernel overlayfs refuses both, for root and a user."""
    t = open_tree
    lows, upper, work, mnt = [t / "l1", t / "l2"], t / "upper", t / "work", t / "mnt"
    for d in (*lows, upper, work, t / "kup"):
        d.mkdir()
    for d in (lows[0] / "merged", lows[1] / "merged"):
        d.mkdir()
        d.chmod(0o777)
    (lows[0] / "merged" / "f").write_text("f")
    lows[0].chmod(0o777)

    def attempts(m: Path) -> dict[str, int]:
        def mknod(p: Path) -> Callable[[], None]:
            return lambda: os.mknod(p, stat.S_IFCHR | 0o644, os.makedev(0, 0))

        def rename_wh(a: Path, b: Path) -> Callable[[], None]:
            def go() -> None:
                fd = os.open(m, os.O_RDONLY | os.O_DIRECTORY)
                try:
                    renameat2(fd, os.fsencode(a.relative_to(m)), fd, os.fsencode(b.relative_to(m)),
                              RENAME_WHITEOUT)
                finally:
                    os.close(fd)
            return go

        out = {}
        for who, uid in (("root", 0), ("user", NOBODY)):
            out[f"mknod top {who}"] = _errno_as(uid, mknod(m / f"wh-{who}"))
            out[f"mknod merged {who}"] = _errno_as(uid, mknod(m / "merged" / f"wh-{who}"))
        out["rename_whiteout root"] = _errno_as(0, rename_wh(m / "merged" / "f", m / "merged" / "g"))
        out["rename_whiteout user"] = _errno_as(NOBODY, rename_wh(m / "merged" / "f",
                                                                  m / "merged" / "g"))
        out["listing"] = len(os.listdir(m / "merged"))
        return out

    with kernel_overlay(lows, t / "kup", t / "kmnt", t / "kwork") as k:
        want = attempts(k)
    assert want["mknod merged root"] == errno.EPERM and want["mknod merged user"] == errno.EPERM
    with mounted(lows, mnt, upper, work) as m:
        got = attempts(m)
    assert got == want
    assert not any(stat.S_ISCHR(os.lstat(p).st_mode) for p in upper.rglob("wh-*"))
