"""A running container pins nothing of the host's: other mounts unmount as if it were not there.

A mount namespace copied from the host's holds a copy of every mount the host
had at that moment, and a copy keeps its filesystem alive after the host's own
is unmounted: a FUSE connection stays open (the unmounted mount's daemon never
exits), a tmpfs keeps its memory, a disk stays busy. `pyunion run` makes its
FUSE mount as a detached mount that only the container's namespace holds, and
the container's init drops its copy of the host's tree when it pivots into the
image, so neither pyunion's processes nor the container hold any host mount.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from support import PYUNION, daemon_of, force_unmount, is_mounted, mounted, wait_gone

from unionfs.sample import build_sample

pytestmark = [pytest.mark.timeout(60)]


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    return build_sample(tmp_path_factory.mktemp("img"))


@contextlib.contextmanager
def container(image: list[str], tmp_path: Path) -> Iterator[subprocess.Popen[str]]:
    """A `pyunion run` that has started its command (it said so) and sleeps."""
    tmp = tmp_path / "tmpdir"
    tmp.mkdir()
    p = subprocess.Popen(
        [*PYUNION, "run", *image, "--", "sh", "-c", "echo up; exec sleep 60"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=dict(os.environ, TMPDIR=str(tmp)),
    )
    try:
        assert p.stdout is not None
        line = p.stdout.readline()
        assert line == "up\n", p.stderr.read() if p.stderr else ""
        yield p
        assert p.poll() is None  # it was running all along
    finally:
        p.terminate()  # forwarded to the command: the run ends and tears down
        try:
            p.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            p.kill()
            p.communicate()


def _sources_anywhere(source: str) -> list[str]:
    """The processes whose mount namespace has a mount whose source is `source`."""
    out = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/mountinfo") as f:
                for line in f:
                    right = line.partition(" - ")[2].split()
                    if len(right) >= 2 and right[1] == source:
                        out.append(pid)
                        break
        except OSError:
            continue
    return out


def test_umount_of_another_pyunion_mount_while_a_container_runs(
    image: list[str], tmp_path: Path
) -> None:
    """A pyunion mount made before the container started unmounts, and its daemon exits."""
    low = tmp_path / "low"
    low.mkdir()
    (low / "f").write_text("x")
    mnt = tmp_path / "m"
    with mounted([low], mnt):
        pid = daemon_of(mnt)
        with container(image, tmp_path):
            r = subprocess.run(
                [*PYUNION, "umount", "--timeout", "10", str(mnt)],
                capture_output=True,
                text=True,
                timeout=30,
                check=False,
            )
            assert r.returncode == 0, r.stderr
            assert not is_mounted(mnt)
            assert wait_gone(pid, 5), "the unmounted mount's daemon still runs"


def test_host_tmpfs_really_goes_while_a_container_runs(image: list[str], tmp_path: Path) -> None:
    """A host mount made before the container starts, unmounted while it runs, is gone from
    every namespace (its filesystem freed), not kept alive by a copy."""
    target = tmp_path / "t"
    target.mkdir()
    source = "pyunion-pin-" + secrets.token_hex(6)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", source, str(target)], check=True)
    try:
        with container(image, tmp_path):
            subprocess.run(["umount", str(target)], check=True, timeout=30)
            holders = _sources_anywhere(source)
            assert holders == [], f"the unmounted tmpfs is still mounted in pids {holders}"
    finally:
        force_unmount(target)
