"""Shared fixtures: skip reasons for missing root or /dev/fuse, and pyunion mounts that always go away."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Iterator
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


# -- helpers for the reliability suites (fsx, concurrency, crash, resources, hostile) ------
SOAK = bool(os.environ.get("PYUNION_SOAK"))


def soak(ci: int, long: int) -> int:
    """A size for CI, or the soak run's (PYUNION_SOAK=1)."""
    return long if SOAK else ci


def daemon_of(mnt: str | Path) -> int:
    from unionfs.mount import daemon_pid

    pid = daemon_pid(str(mnt))
    assert pid is not None, f"no daemon for {mnt}"
    return pid


def alive(pid: int) -> bool:
    from unionfs.mount import process_alive

    return process_alive(pid)


def wait_gone(pid: int, timeout: float = 20) -> bool:
    from unionfs.mount import wait_gone as _wait_gone

    return _wait_gone(pid, timeout)


def kill_daemon(mnt: str | Path, pid: int | None = None) -> None:
    """SIGKILL the daemon (of a mount we made): every request in flight fails with ENOTCONN."""
    if pid is None:
        from unionfs.mount import daemon_pid

        pid = daemon_pid(str(mnt))
    if pid is not None and alive(pid):
        os.kill(pid, signal.SIGKILL)
        wait_gone(pid)


def run_child(fn: Callable[..., object], *args: object, timeout: float = 60,
              mnt: str | Path | None = None) -> int:
    """Run fn(*args) in a forked child; its exit code (0 unless it raised).

    On timeout the child is killed (and the daemon of `mnt`, so that a hung
    mount cannot hang the test) and the test fails: a deadlock, not a slowness.
    """
    procs = start_children([(fn, args)])
    return join_children(procs, timeout, mnt)[0]


def start_children(jobs: list[tuple[Callable[..., object], tuple]]) -> list[int]:
    pids = []
    for fn, args in jobs:
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                fn(*args)
                code = 0
            except BaseException:
                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        pids.append(pid)
    return pids


def join_children(pids: list[int], timeout: float, mnt: str | Path | None = None) -> list[int]:
    """Exit codes of forked children; on a timeout kill them (and the daemon) and fail."""
    deadline = time.monotonic() + timeout
    codes: dict[int, int] = {}
    while len(codes) < len(pids):
        for pid in pids:
            if pid in codes:
                continue
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                codes[pid] = os.waitstatus_to_exitcode(status)
        if len(codes) < len(pids):
            if time.monotonic() > deadline:
                for pid in pids:
                    if pid not in codes:
                        with contextlib.suppress(ProcessLookupError):
                            os.kill(pid, signal.SIGKILL)
                if mnt is not None:
                    kill_daemon(mnt)
                for pid in pids:
                    if pid not in codes:
                        os.waitpid(pid, 0)
                raise AssertionError(f"children still running after {timeout}s: deadlock?")
            time.sleep(0.02)
    return [codes[p] for p in pids]


def tree_view(root: str | Path, content: bool = True) -> dict[bytes, tuple]:
    """Everything a union view shows, per relative path: type, mode, owner, size, data or target.

    Times and inode numbers are left out (they differ between two mounts of one tree);
    regular file data is compared by hash.
    """
    out: dict[bytes, tuple] = {}
    base = os.fsencode(str(root))

    def walk(rel: bytes) -> None:
        full = base + (b"/" + rel if rel else b"")
        for e in sorted(os.scandir(full), key=lambda e: e.name):
            name = os.fsencode(e.name)
            r = rel + b"/" + name if rel else name
            st = os.lstat(base + b"/" + r)
            kind = stat.S_IFMT(st.st_mode)
            extra: object = None
            if kind == stat.S_IFREG and content:
                with open(base + b"/" + r, "rb") as f:
                    extra = hashlib.sha256(f.read()).hexdigest()
            elif kind == stat.S_IFLNK:
                extra = os.readlink(base + b"/" + r)
            elif kind in (stat.S_IFCHR, stat.S_IFBLK):
                extra = st.st_rdev
            size = st.st_size if kind != stat.S_IFDIR else 0
            out[r] = (kind, stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, size, extra)
            if kind == stat.S_IFDIR:
                walk(r)

    walk(b"")
    return out


@contextlib.contextmanager
def kernel_overlay(lowers: list[Path], upper: Path | None, mnt: Path,
                   work: Path | None = None) -> Iterator[Path]:
    """The oracle: kernel overlayfs over the same layers (default options); read-only without upper."""
    mnt.mkdir(parents=True, exist_ok=True)
    opts = "lowerdir=" + ":".join(str(p) for p in lowers)
    if upper is not None:
        assert work is not None
        work.mkdir(parents=True, exist_ok=True)
        opts += f",upperdir={upper},workdir={work}"
    r = subprocess.run(["mount", "-t", "overlay", "overlay", "-o", opts, str(mnt)],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, f"kernel overlayfs refused the tree: {r.stderr}"
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True, timeout=30)
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
        pytest.skip("debootstrap is not installed (scripts/setup.sh installs it), "
                    "and PYUNION_TEST_ROOTFS is not set")
    tmp = ROOTFS_CACHE.with_name(ROOTFS_CACHE.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    log = ROOTFS_CACHE.with_name(ROOTFS_CACHE.name + ".log")
    with open(log, "w") as out:
        try:
            r = subprocess.run([exe, "--variant=minbase", "--include=python3-minimal", "bookworm",
                                str(tmp), "http://deb.debian.org/debian"],
                               stdout=out, stderr=subprocess.STDOUT, timeout=900, check=False)
            ok = r.returncode == 0
        except subprocess.TimeoutExpired:
            ok = False
    if not ok or not (tmp / "usr/bin/python3").exists():
        shutil.rmtree(tmp, ignore_errors=True)
        pytest.skip(f"debootstrap of Debian bookworm failed (no mirror reachable?): see {log}")
    os.rename(tmp, ROOTFS_CACHE)
    return str(ROOTFS_CACHE)
