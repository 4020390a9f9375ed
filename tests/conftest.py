"""Fixtures, and the test tiers. The helpers the tests share are in support.py.

Tiers: the modules in FAST drive the core and the adaptor without FUSE or root
and run in seconds; every other test is marked `mount` (real mounts,
namespaces, root, outside tools). `pytest -m "not mount"` runs the fast tier
alone, `pytest -m mount` the rest.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from support import force_unmount, throwaway_user

FAST = {"test_core_unit.py", "test_tree.py"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if item.path.name not in FAST:
            item.add_marker(pytest.mark.mount)


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


# -- a real distribution, shared by the run and build tests ---------------------------------
ROOTFS_CACHE = Path("/var/tmp/pyunion-test-rootfs")


@pytest.fixture(scope="session")
def debian_rootfs() -> str:
    """A real Debian root filesystem: $PYUNION_TEST_ROOTFS, or debootstrap'd once into a cache."""
    given = os.environ.get("PYUNION_TEST_ROOTFS")
    if given:
        return given
    if (ROOTFS_CACHE / "usr/bin/python3").exists():
        return str(ROOTFS_CACHE)
    exe = shutil.which("debootstrap") or "/usr/sbin/debootstrap"
    if not os.path.exists(exe):
        pytest.skip(
            "debootstrap is not installed (scripts/setup.sh installs it), "
            "and PYUNION_TEST_ROOTFS is not set"
        )
    tmp = ROOTFS_CACHE.with_name(ROOTFS_CACHE.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    log = ROOTFS_CACHE.with_name(ROOTFS_CACHE.name + ".log")
    with open(log, "w") as out:
        try:
            r = subprocess.run(
                [
                    exe,
                    "--variant=minbase",
                    "--include=python3-minimal",
                    "bookworm",
                    str(tmp),
                    "http://deb.debian.org/debian",
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
                timeout=900,
                check=False,
            )
            ok = r.returncode == 0
        except subprocess.TimeoutExpired:
            ok = False
    if not ok or not (tmp / "usr/bin/python3").exists():
        shutil.rmtree(tmp, ignore_errors=True)
        pytest.skip(f"debootstrap of Debian bookworm failed (no mirror reachable?): see {log}")
    os.rename(tmp, ROOTFS_CACHE)
    return str(ROOTFS_CACHE)


@pytest.fixture
def local_user(tmp_path: Path) -> Iterator[tuple[tuple[int, int], Path]]:
    """A throw-away unprivileged user (uid, gid) and an empty directory of hers under /tmp
    (every user can reach it: tmp_path's ancestors are 0700), in a root-owned 0755
    directory; both removed afterwards, whatever the test left there."""
    import tempfile

    with throwaway_user(f"pyu-t{os.getpid()}-{os.urandom(2).hex()}") as (uid, gid):
        base = Path(tempfile.mkdtemp(prefix="pyunion-user-", dir="/tmp"))
        try:
            os.chmod(base, 0o755)
            (base / "home").mkdir()
            os.chown(base / "home", uid, gid)
            yield (uid, gid), base / "home"
        finally:
            from unionfs.tree import rmtree

            rmtree(str(base))
