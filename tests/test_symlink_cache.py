"""Symlink targets kept by the kernel (FUSE_CACHE_SYMLINKS, unionfs/fuseinit.py), and
never kept past their object: a symlink replaced on a reused inode number shows its new
target, through readlink and through a path walk, as on kernel overlayfs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from support import (
    debug_mount,
    kernel_overlay,
    kernel_overlay_skip_reason,
    mounted,
    needs_fuse,
)

ROUNDS = 40


@needs_fuse
def test_the_kernel_keeps_symlink_targets(layers: tuple, tmp_path: Path) -> None:
    lows, upper, work, mnt = layers
    os.symlink("target", lows[0] / "s")
    (lows[0] / "d").mkdir()
    (lows[0] / "d" / "f").write_text("in d")
    os.symlink("d", lows[0] / "ds")
    log = tmp_path / "daemon.log"
    with debug_mount(lows, mnt, log, upper, work):
        os.symlink("made", mnt / "new")
        for _ in range(20):
            assert os.readlink(mnt / "s") == "target"
            assert (mnt / "ds" / "f").read_text() == "in d"  # a path walk through ds
            assert os.readlink(mnt / "new") == "made"
        text = log.read_text()
    assert "INIT: the kernel keeps symlinks' targets" in text, text[:2000]
    # One READLINK per symlink (60 without the kernel's copies); "symlink(" is the creation.
    assert text.count("readlink(") == 3, text.count("readlink(")


def _replace_symlinks(mnt: Path, upper: Path | None, hold: bool) -> tuple[list[str], int]:
    """`rm l; ln -s NEW l` and the same for a symlink to a directory, ROUNDS times, each
    target read before and after (`hold`: an O_PATH fd keeps the old inode in the kernel
    meanwhile). What was read, and how often the upper reused the inode number."""
    seen: list[str] = []
    reused = 0
    for i in range(ROUNDS):
        (mnt / f"d{i}").mkdir()
        (mnt / f"d{i}" / "f").write_text(f"file {i}")
    os.symlink("t-first", mnt / "l")
    os.symlink("d0", mnt / "ld")
    for i in range(1, ROUNDS):
        seen += [os.readlink(mnt / "l"), (mnt / "ld" / "f").read_text()]
        held = [os.open(mnt / n, os.O_PATH | os.O_NOFOLLOW) for n in ("l", "ld")] if hold else []
        before = os.lstat(upper / "l").st_ino if upper is not None else 0
        try:
            os.unlink(mnt / "l")
            os.symlink(f"t{i}", mnt / "l")
            os.unlink(mnt / "ld")
            os.symlink(f"d{i}", mnt / "ld")
            if upper is not None and os.lstat(upper / "l").st_ino == before:
                reused += 1
            seen += [os.readlink(mnt / "l"), (mnt / "ld" / "f").read_text()]
        finally:
            for fd in held:
                os.close(fd)
    return seen, reused


@needs_fuse
@pytest.mark.parametrize("hold", [False, True], ids=["free", "held"])
def test_a_replaced_symlink_shows_its_new_target(layers: tuple, tmp_path: Path, hold: bool) -> None:
    lows, upper, work, mnt = layers
    expected = []
    for i in range(1, ROUNDS):
        before = ["t-first" if i == 1 else f"t{i - 1}", f"file {i - 1}"]
        expected += [*before, f"t{i}", f"file {i}"]
    with mounted(lows, mnt, upper, work):
        seen, reused = _replace_symlinks(mnt, upper, hold)
    assert seen == expected
    # ext4 (the tests' tmp) hands a freed inode number to the next object at once: the
    # new symlink is on the old one's number, which the daemon must not give the old id.
    if not reused:
        pytest.skip("the upper's filesystem reused no inode number: nothing was at stake")
    reason = kernel_overlay_skip_reason()
    if reason is None:  # the oracle sees the same (its upper holds the old inode: no reuse)
        k = tmp_path / "k"
        kl, ku, kw = k / "l", k / "u", k / "w"
        for p in (kl, ku):
            p.mkdir(parents=True)
        with kernel_overlay([kl, lows[1]], k / "m", ku, kw) as km:
            assert _replace_symlinks(km, None, hold)[0] == expected


@needs_fuse
def test_a_new_symlink_on_a_number_freed_under_the_mount_is_a_new_inode(layers: tuple) -> None:
    """The upper changed under the mount (unsupported, but the daemon must not show one
    object for another): a symlink removed there, the kernel still holding it, and a new
    one made through the mount on its inode number gets the same node id with a new
    generation, so the kernel does not serve the old one's target for it."""
    lows, upper, work, mnt = layers
    reused = 0
    with mounted(lows, mnt, upper, work):
        for i in range(ROUNDS):
            os.symlink(f"old{i}", mnt / "l")
            assert os.readlink(mnt / "l") == f"old{i}"  # kept by the kernel now
            before = os.lstat(upper / "l").st_ino
            os.unlink(upper / "l")
            os.symlink(f"new{i}", mnt / "n")
            reused += os.lstat(upper / "n").st_ino == before
            assert os.readlink(mnt / "n") == f"new{i}"
            os.unlink(mnt / "n")
    if not reused:
        pytest.skip("the upper's filesystem reused no inode number: nothing was at stake")
