"""Shared fixtures: skip reasons for missing root or /dev/fuse, and pyunion mounts that always go away."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

PYUNION = [sys.executable, "-m", "unionfs"]


def fuse_skip_reason() -> str | None:
    if os.geteuid() != 0:
        return "needs root (FUSE mounts with allow_other, mknod, trusted xattrs)"
    if not os.path.exists("/dev/fuse"):
        return "needs /dev/fuse"
    return None


needs_fuse = pytest.mark.skipif(fuse_skip_reason() is not None, reason=fuse_skip_reason() or "")


def is_mounted(path: str | Path) -> bool:
    real = os.path.realpath(path)
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == real for line in f)


def pyunion(*args: str, check: bool = True, timeout: float = 60, env: dict | None = None,
            **kw: object) -> subprocess.CompletedProcess[str]:
    r = subprocess.run([*PYUNION, *args], capture_output=True, text=True, timeout=timeout,
                       env=env, **kw)  # type: ignore[call-overload]
    if check and r.returncode != 0:
        raise AssertionError(f"pyunion {' '.join(args)} failed ({r.returncode}): {r.stderr}")
    return r


def force_unmount(path: str | Path) -> None:
    """Last resort in teardown: detach a mount our test left behind."""
    if is_mounted(path):
        subprocess.run(["umount", "-l", str(path)], capture_output=True, timeout=30)


@contextlib.contextmanager
def mounted(lowers: list[Path], mnt: Path, upper: Path | None = None, work: Path | None = None,
            extra: tuple[str, ...] = (), env: dict | None = None) -> Iterator[Path]:
    """A pyunion mount for the duration of the block, unmounted whatever happens."""
    opts = "lowerdir=" + ":".join(str(p).replace(":", "\\:") for p in lowers)
    if upper is not None:
        opts += f",upperdir={upper}"
        if work is not None:
            opts += f",workdir={work}"
    mnt.mkdir(parents=True, exist_ok=True)
    pyunion("mount", "-o", opts, *extra, str(mnt), env=env)
    try:
        yield mnt
    finally:
        r = pyunion("umount", str(mnt), check=False)
        if r.returncode != 0:
            force_unmount(mnt)


@pytest.fixture
def layers(tmp_path: Path) -> Iterator[tuple[list[Path], Path, Path, Path]]:
    """Two empty lower layers, an upper, a work dir and a mount point under tmp_path."""
    lows = [tmp_path / "l1", tmp_path / "l2"]
    for p in lows:
        p.mkdir()
    upper, work, mnt = tmp_path / "upper", tmp_path / "work", tmp_path / "mnt"
    upper.mkdir()
    work.mkdir()
    mnt.mkdir()
    yield lows, upper, work, mnt
    force_unmount(mnt)
