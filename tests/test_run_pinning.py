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
import signal
import subprocess
import time
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


def run_processes(marker: str) -> set[int]:
    """The processes of a `pyunion run`: those whose command line holds `marker` (pyunion,
    its daemon and janitor keep pyunion's argv), and all their descendants (the container's
    init and command)."""
    parent: dict[int, int] = {}
    ours: set[int] = set()
    for p in os.listdir("/proc"):
        if not p.isdigit() or int(p) == os.getpid():
            continue
        try:
            with open(f"/proc/{p}/stat") as f:
                parent[int(p)] = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{p}/cmdline", "rb") as f:
                if marker.encode() in f.read():
                    ours.add(int(p))
        except (OSError, IndexError, ValueError):
            continue
    grew = True
    while grew:
        more = {pid for pid, pp in parent.items() if pp in ours} - ours
        ours |= more
        grew = bool(more)
    return ours


def sources_anywhere(source: str, pids: set[int]) -> list[int]:
    """Those of `pids` whose mount namespace has a mount whose source is `source`.

    Only the run's own processes are looked at: on a shared machine another
    program's namespace (an older pyunion's, a build's) may hold a copy too."""
    out = []
    for pid in sorted(pids):
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


def pyunion_umount(mnt: Path) -> None:
    r = subprocess.run(
        [*PYUNION, "umount", "--timeout", "10", str(mnt)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert r.returncode == 0, r.stderr


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
            pyunion_umount(mnt)
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
        with container(image, tmp_path) as run:
            subprocess.run(["umount", str(target)], check=True, timeout=30)
            pids = run_processes(image[0]) | {run.pid}
            assert len(pids) >= 5, pids  # pyunion, daemon, janitor, init, command
            holders = sources_anywhere(source, pids)
            assert holders == [], f"the unmounted tmpfs is still mounted in pids {holders}"
    finally:
        force_unmount(target)


def test_volume_from_another_pyunion_mount(image: list[str], tmp_path: Path) -> None:
    """A -v source inside a pyunion mount made before the run is bound in (the container's
    namespace copies the host's), and once the run is over that mount unmounts cleanly."""
    low = tmp_path / "low"
    (low / "sub").mkdir(parents=True)
    (low / "sub/f").write_text("from the other mount\n")
    mnt = tmp_path / "m"
    with mounted([low], mnt):
        pid = daemon_of(mnt)
        tmp = tmp_path / "tmpdir"
        tmp.mkdir()
        r = subprocess.run(
            [*PYUNION, "run", "-v", f"{mnt}/sub:/data:ro", *image, "--", "cat", "/data/f"],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
            env=dict(os.environ, TMPDIR=str(tmp)),
        )
        assert r.returncode == 0 and r.stdout == "from the other mount\n", r.stderr
        pyunion_umount(mnt)
        assert wait_gone(pid, 5)
        assert list(tmp.iterdir()) == []  # the run removed its upper and temporary tree


def test_fuse_options_as_libfuse_makes_them() -> None:
    """The options of run's mount become the fsconfig parameters and mount flags libfuse's
    mount(2) would use; the defaults are pyfuse3's; an option only libfuse could honour is
    refused, not dropped."""
    import pyfuse3

    from unionfs.errors import UserError
    from unionfs.mount import FUSE_DEFAULT_OPTIONS, kernel_mount_params
    from unionfs.options import MountConfig
    from unionfs.syscalls import MOUNT_ATTR_NODEV, MOUNT_ATTR_NOSUID, MOUNT_ATTR_RDONLY

    assert set(pyfuse3.default_options) == FUSE_DEFAULT_OPTIONS
    cfg = MountConfig(
        lowers=["/"], upper="/u", mountpoint="/m", fuse_options={"allow_other", "suid", "nodev"}
    )
    params, attrs = kernel_mount_params(cfg)
    assert sorted(params, key=str) == sorted(
        [
            ("rootmode", "40000"),
            ("allow_other", None),
            ("default_permissions", None),
            ("source", "pyunion"),
            ("subtype", "pyunion"),
        ],
        key=str,
    )
    assert attrs == MOUNT_ATTR_NODEV  # suid asked for: no nosuid
    cfg = MountConfig(lowers=["/"], mountpoint="/m", fuse_options={"ro", "nosuid"})
    params, attrs = kernel_mount_params(cfg)
    assert ("ro", None) in params and attrs & MOUNT_ATTR_RDONLY and attrs & MOUNT_ATTR_NOSUID
    cfg = MountConfig(lowers=["/"], mountpoint="/m", fuse_options={"auto_unmount"})
    with pytest.raises(UserError, match="auto_unmount"):
        kernel_mount_params(cfg)
    # No upper: read-only for the VFS too, as a kernel overlay without an upper.
    params, attrs = kernel_mount_params(MountConfig(lowers=["/"], mountpoint="/m"))
    assert ("ro", None) in params and attrs & MOUNT_ATTR_RDONLY


def _children(pid: int) -> list[int]:
    out = []
    for p in os.listdir("/proc"):
        if p.isdigit():
            try:
                with open(f"/proc/{p}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        out.append(int(p))
            except (OSError, IndexError, ValueError):
                continue
    return out


def test_a_build_pins_no_host_mount(tmp_path: Path) -> None:
    """A build (its COPY mounts and its RUN containers) holds no copy of the host's mounts:
    a host tmpfs unmounted during a RUN step is gone from every process of the build."""
    store = tmp_path / "store"
    subprocess.run([*PYUNION, "sample", str(tmp_path / "s"), "--oci"], check=True, timeout=120)
    subprocess.run(
        [*PYUNION, "image", "import", str(tmp_path / "s/oci"), "-t", "busybox", "--store", store],
        check=True,
        timeout=120,
    )
    ctx = tmp_path / "ctx"
    ctx.mkdir()
    (ctx / "f").write_text("copied\n")
    (ctx / "Containerfile").write_text(
        "FROM busybox\nUSER root\nCOPY f /f\nRUN cat /f; while true; do sleep 0.05; done\n"
    )
    target = tmp_path / "t"
    target.mkdir()
    source = "pyunion-pin-" + secrets.token_hex(6)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", source, str(target)], check=True)
    b = subprocess.Popen(
        [*PYUNION, "build", "--store", str(store), str(ctx)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    command = None  # the RUN step's command: a child of the container's init
    try:
        deadline = time.monotonic() + 60
        while command is None and b.poll() is None and time.monotonic() < deadline:
            for pid in run_processes(str(ctx)):
                with contextlib.suppress(OSError), open(f"/proc/{pid}/cmdline", "rb") as f:
                    if f.read().startswith(b"catatonit\0"):
                        command = next(iter(_children(pid)), None)
            time.sleep(0.02)
        assert command is not None, b.stderr.read() if b.stderr else "no RUN container"
        subprocess.run(["umount", str(target)], check=True, timeout=30)
        pids = run_processes(str(ctx)) | {b.pid}
        holders = sources_anywhere(source, pids)
        assert holders == [], f"the unmounted tmpfs is still mounted in pids {holders}"
        os.kill(command, signal.SIGKILL)
        out, err = b.communicate(timeout=60)
        assert b.returncode == 128 + signal.SIGKILL and "killed by signal 9" in err, err
        assert "copied" in out + err, out + err
    finally:
        if command is not None:  # the RUN step ends: the build fails and tears down
            with contextlib.suppress(ProcessLookupError):
                os.kill(command, signal.SIGKILL)
        try:
            b.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            b.kill()
            b.communicate()
        force_unmount(target)
