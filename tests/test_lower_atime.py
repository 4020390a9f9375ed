"""The daemon's own reads of lower objects leave their atime on disk as it was, as kernel
overlayfs leaves it (it reaches lower files and directories with O_NOATIME, and reads a
symlink's target without touching it): a read, a readlink, a listing and a copy-up
through each mount, over lowers on a tmpfs mounted `strictatime` (where every access
would otherwise set it), compared on disk afterwards."""

from __future__ import annotations

import os
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from support import (
    PYUNION,
    force_unmount,
    kernel_overlay,
    kernel_overlay_skip_reason,
    pyunion_mount,
)

pytestmark = pytest.mark.skipif(
    kernel_overlay_skip_reason() is not None, reason=kernel_overlay_skip_reason() or ""
)

OLD_NS = 1_500_000_000 * 10**9  # 2017: any access on a strictatime mount sets a later one
NAMES = ("f", "big", "l", "d", "d/x", "c", "root")


@pytest.fixture
def strict_tmpfs() -> Iterator[Path]:
    """A fresh tmpfs mounted `strictatime`, unmounted whatever happens."""
    with tempfile.TemporaryDirectory(prefix="pyunion-atime-") as td:
        t = Path(td)
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "strictatime,mode=0755", "tmpfs", str(t)],
            check=True,
            capture_output=True,
            timeout=30,
        )
        try:
            yield t
        finally:
            subprocess.run(["umount", "-l", str(t)], capture_output=True, timeout=30, check=False)


def _lower(top: Path) -> Path:
    low = top / "low"
    (low / "d").mkdir(parents=True)
    (low / "f").write_bytes(b"lower data\n")
    (low / "big").write_bytes(os.urandom(3 << 20))  # copied up in a worker thread
    (low / "c").write_bytes(b"copied up\n")
    (low / "d" / "x").write_bytes(b"x")
    os.symlink("f", low / "l")
    for name in NAMES:
        p = low if name == "root" else low / name
        os.utime(p, ns=(OLD_NS, OLD_NS), follow_symlinks=False)
    return low


def _atimes(low: Path) -> dict[str, int]:
    return {
        n: os.stat(low if n == "root" else low / n, follow_symlinks=False).st_atime_ns
        for n in NAMES
    }


def _use(m: Path) -> None:
    """Reads of every kind of lower object, and copy-ups that read their data."""
    assert (m / "f").read_bytes() == b"lower data\n"
    assert os.readlink(m / "l") == "f"
    assert sorted(os.listdir(m)) == ["big", "c", "d", "f", "l"]
    assert os.listdir(m / "d") == ["x"]
    with open(m / "c", "ab") as f:  # a copy-up with data, inline
        f.write(b"more\n")
    with open(m / "big", "r+b") as f:  # a copy-up with data, in a worker thread
        f.write(b"!")
    with open(m / "d" / "x", "ab") as f:  # its directory's copy-up too
        f.write(b"y")


@pytest.mark.parametrize("impl", ["kernel", "pyunion"])
def test_reads_through_the_mount_leave_lower_atimes(strict_tmpfs: Path, impl: str) -> None:
    top = strict_tmpfs / impl
    top.mkdir()
    low = _lower(top)
    probe = low / ".probe"
    probe.write_bytes(b"p")
    os.utime(probe, ns=(OLD_NS, OLD_NS))
    probe.read_bytes()
    assert probe.stat().st_atime_ns != OLD_NS, "the tmpfs does not update atimes: no test"
    probe.unlink()
    os.utime(low, ns=(OLD_NS, OLD_NS))
    before = _atimes(low)
    up, work, mnt = top / "up", top / "work", top / "mnt"
    up.mkdir()
    work.mkdir()
    mount = kernel_overlay if impl == "kernel" else pyunion_mount
    try:
        with mount([low], mnt, up, work) as m:
            _use(m)
    finally:
        force_unmount(mnt)
    changed = {n: t for n, t in _atimes(low).items() if t != before[n]}
    assert changed == {}, f"{impl} changed the atime of lower {sorted(changed)}"


def test_a_mount_below_a_lower_is_not_held_by_the_daemon(strict_tmpfs: Path) -> None:
    """A pyunion mount at `low/sub`, below another mount's lower layer: unmounting it
    while the other stays mounted (and holds nothing of it open: else it is busy, as for
    any process) ends its daemon at once, and a mount made below the
    lower afterwards shows through, as before the read-only copy of the lower's mounts
    (`layers.read_only_view`), which copied `low/sub` with the lower: its daemon never
    saw the unmount (the copy held its filesystem), `pyunion umount` waited 30 s and
    failed, and the daemon lived on until the other mount went."""
    top = strict_tmpfs
    inner, low, mnt = top / "inner", top / "low", top / "mnt"
    (low / "sub").mkdir(parents=True)
    (low / "late").mkdir()
    inner.mkdir()
    (inner / "f").write_text("inner\n")
    try:
        subprocess.run(
            [*PYUNION, "mount", str(inner), str(low / "sub")],
            check=True,
            capture_output=True,
            timeout=60,
        )
        with pyunion_mount([low], mnt) as m:
            assert sorted(os.listdir(m)) == ["late", "sub"]  # nothing in sub/ opened
            r = subprocess.run(
                [*PYUNION, "umount", str(low / "sub")],
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
            )
            assert r.returncode == 0, r.stderr
            subprocess.run(
                ["mount", "-t", "tmpfs", "late", str(low / "late")],
                check=True,
                capture_output=True,
                timeout=30,
            )
            (low / "late" / "x").write_text("late\n")
            assert os.listdir(m / "late") == ["x"]
    finally:
        for p in (mnt, low / "sub"):
            force_unmount(p)
        subprocess.run(["umount", "-l", str(low / "late")], capture_output=True, timeout=30)
