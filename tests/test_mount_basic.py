"""Real mounts: identity, caching (proved by counting the daemon's requests), lifecycle."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import time
from pathlib import Path

import pytest
from support import (
    PYUNION,
    alive,
    daemon_of,
    debug_mount,
    force_unmount,
    is_mounted,
    mounted,
    needs_fuse,
    pyunion,
    wait_gone,
    wait_until,
)

from unionfs.mount import READAHEAD_KB, daemon_pid
from unionfs.procfs import mounts


def _drop_caches() -> None:
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("2\n")


@needs_fuse
def test_identity_stable_across_forget_and_copy_up(layers: tuple) -> None:
    lows, upper, work, mnt = layers
    (lows[1] / "d").mkdir()
    (lows[1] / "d" / "f").write_text("x")
    os.link(lows[1] / "d" / "f", lows[1] / "d" / "g")
    with mounted(lows, mnt, upper, work):
        st = os.stat(mnt / "d" / "f")
        assert os.stat(mnt / "d" / "g").st_ino == st.st_ino
        assert st.st_nlink == 2
        entries = {e.name: e.inode() for e in os.scandir(mnt / "d")}
        assert entries["f"] == st.st_ino
        _drop_caches()  # the kernel forgets; the daemon releases; numbers stay
        assert os.stat(mnt / "d" / "f").st_ino == st.st_ino
        with open(mnt / "d" / "f", "a") as f:
            f.write("y")
        assert os.stat(mnt / "d" / "f").st_ino == st.st_ino
        _drop_caches()
        assert os.stat(mnt / "d" / "f").st_ino == st.st_ino
        assert (mnt / "d" / "g").read_text() == "xy"
        assert os.stat(mnt).st_dev == os.stat(mnt / "d" / "f").st_dev


@needs_fuse
def test_kernel_caches_lookups_and_attributes(layers: tuple, tmp_path: Path) -> None:
    lows, _upper, _work, mnt = layers
    for i in range(50):
        (lows[0] / f"f{i}").write_text("x")
    log = tmp_path / "daemon.log"
    with debug_mount(lows[:2], mnt, log):
        for _ in range(3):
            for i in range(50):
                os.stat(mnt / f"f{i}")
                assert not os.path.exists(mnt / f"missing{i}")
            (mnt / "f1").read_text()
        text = log.read_text()
        # The request loop polls /dev/fuse (reqloop.install hooked this pyfuse3).
        assert "request loop: /dev/fuse polled for 30 us" in text, text[:2000]
        lookups = text.count("lookup(")
        getattrs = text.count("getattr(")
        reads = text.count("read(")
        # One lookup per name (50 positive, 50 negative) for three passes, no getattr,
        # one read: fewer would mean the log lost requests, more that the kernel did not cache.
        assert 100 <= lookups <= 101, lookups
        assert getattrs <= 2, getattrs
        assert reads == 1, reads


@needs_fuse
def test_sigterm_unmounts_cleanly(layers: tuple) -> None:
    lows, _upper, _work, mnt = layers
    pyunion("mount", str(lows[0]), str(mnt))
    try:
        pid = daemon_pid(str(mnt))
        assert pid is not None
        os.kill(pid, signal.SIGTERM)
        wait_until(lambda: not is_mounted(mnt), what="the unmount after SIGTERM")
    finally:
        if is_mounted(mnt):
            pyunion("umount", "--lazy", str(mnt), check=False)


def _top_fstype(path: Path) -> str | None:
    """The type of the topmost mount at `path` (the last mountinfo lists there)."""
    real = os.path.realpath(path)
    return next((t for point, t, _ in reversed(mounts()) if point == real), None)


@needs_fuse
def test_the_mount_points_filesystem_is_not_held(layers: tuple, tmp_path: Path) -> None:
    """A mount point's filesystem unmounts once the mount is detached, while the daemon
    still serves whoever uses it (as with the kernel's): the daemon held an fd on the
    mount point's parent, to unmount on a signal."""
    lows, upper, work, _ = layers
    base = tmp_path / "base"
    base.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "base", str(base)], check=True, timeout=10)
    mnt = base / "m"
    mnt.mkdir()
    holder = None
    try:
        pyunion("mount", "-o", f"lowerdir={lows[0]},upperdir={upper},workdir={work}", str(mnt))
        pid = daemon_of(mnt)
        holder = subprocess.Popen(["sleep", "60"], cwd=mnt)
        subprocess.run(["umount", "-l", str(mnt)], check=True, timeout=30)
        r = subprocess.run(["umount", str(base)], capture_output=True, text=True, timeout=30)
        assert r.returncode == 0, r.stderr
        assert alive(pid), "the daemon of a mount still in use exited"
    finally:
        if holder is not None:
            holder.kill()
            holder.wait()
        force_unmount(mnt)
        force_unmount(base)


@needs_fuse
def test_sigterm_unmounts_its_own_mount_and_no_other(layers: tuple, tmp_path: Path) -> None:
    """A SIGTERM'd daemon unmounts its mount, found by its id wherever it has moved (its
    parent renamed), and never another one: not a mount made over it, nor one made at
    the same path once it was detached. (It found it by name in the mount point's
    parent: the topmost mount there, whichever.)"""
    lows, _upper, _work, _ = layers
    a, b = tmp_path / "a", tmp_path / "b"
    (a / "m").mkdir(parents=True)
    holder = None
    try:
        # Moved: the parent of the mount point renamed.
        pyunion("mount", str(lows[0]), str(a / "m"))
        pid = daemon_of(a / "m")
        a.rename(b)
        os.kill(pid, signal.SIGTERM)
        assert wait_gone(pid)
        assert not is_mounted(b / "m")
        b.rename(a)
        # Covered: a tmpfs mounted over it stays (ours cannot be reached, and stays dead).
        pyunion("mount", str(lows[0]), str(a / "m"))
        pid = daemon_of(a / "m")
        subprocess.run(["mount", "-t", "tmpfs", "over", str(a / "m")], check=True, timeout=10)
        os.kill(pid, signal.SIGTERM)
        assert wait_gone(pid)
        assert _top_fstype(a / "m") == "tmpfs"
        force_unmount(a / "m")
        force_unmount(a / "m")
        # Replaced: ours detached (in use), another mount made at the same path.
        pyunion("mount", str(lows[0]), str(a / "m"))
        pid = daemon_of(a / "m")
        holder = subprocess.Popen(["sleep", "60"], cwd=a / "m")
        subprocess.run(["umount", "-l", str(a / "m")], check=True, timeout=30)
        subprocess.run(["mount", "-t", "tmpfs", "new", str(a / "m")], check=True, timeout=10)
        os.kill(pid, signal.SIGTERM)
        assert wait_gone(pid)
        assert _top_fstype(a / "m") == "tmpfs"
    finally:
        if holder is not None:
            holder.kill()
            holder.wait()
        for m in (a / "m", b / "m"):
            while is_mounted(m):
                force_unmount(m)


@needs_fuse
def test_a_signal_as_soon_as_the_daemon_is_there_leaves_no_mount(layers: tuple) -> None:
    """A signal sent to the daemon as soon as its pid is recorded (before it mounts, or
    right after) leaves no mount behind: it unmounts, or the daemon dies before mounting
    and `mount` fails. The handlers were installed once the event loop ran, a few ms
    after the mount: the signal's default action killed the daemon and left its mount,
    dead (in about 1 of 3 signals here)."""
    lows, _upper, _work, mnt = layers
    try:
        for sig in [signal.SIGTERM, signal.SIGINT, signal.SIGHUP] * 4:
            proc = subprocess.Popen(
                [*PYUNION, "mount", str(lows[0]), str(mnt)],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            pid = None
            deadline = time.monotonic() + 30
            while pid is None and proc.poll() is None and time.monotonic() < deadline:
                pid = daemon_pid(str(mnt))
            if pid is None:  # `mount` was quicker
                pid = daemon_pid(str(mnt))
            if pid is not None:
                os.kill(pid, sig)
                assert wait_gone(pid)
            proc.wait(timeout=30)
            assert not is_mounted(mnt), f"a mount stayed after {sig.name}"
    finally:
        while is_mounted(mnt):
            force_unmount(mnt)


@needs_fuse
def test_stale_mount_of_dead_daemon_is_cleaned(layers: tuple) -> None:
    lows, upper, work, mnt = layers
    (lows[0] / "f").write_text("x")
    pyunion("mount", "-o", f"lowerdir={lows[0]},upperdir={upper},workdir={work}", str(mnt))
    pid = daemon_pid(str(mnt))
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    assert wait_gone(pid, 10)
    pyunion("umount", str(mnt))
    assert not is_mounted(mnt)
    # The same upper mounts again.
    with mounted(lows, mnt, upper, work):
        assert (mnt / "f").read_text() == "x"


def _processes_named(*words: str) -> list[str]:
    """`pid state command` of the processes whose command line holds one of `words`, or
    whose pid is one (what an unmount waits for)."""
    out = []
    for p in os.listdir("/proc"):
        if not p.isdigit():
            continue
        try:
            cmd = Path(f"/proc/{p}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            state = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if p in words or any(w in cmd for w in words):
            out.append(f"{p} {state} {cmd.strip()}")
    return out


@needs_fuse
def test_auto_unmount(layers: tuple) -> None:
    """`-o auto_unmount` (libfuse's: fusermount3 watches the daemon and unmounts when it
    dies). As root it failed ("fuse_session_mount failed": fusermount3 cannot open the
    daemon's fd of the mount point), and once mounted `mount` never returned: it read
    the daemon's report up to EOF, and fusermount3's watcher holds the pipe too."""
    lows, upper, work, mnt = layers
    (lows[0] / "f").write_text("x")
    opts = f"lowerdir={lows[0]},upperdir={upper},workdir={work},auto_unmount"
    # Three times: a killed daemon's socket to fusermount3 closed before its /dev/fuse,
    # and the mount stayed (mount.release_lifeline_last), in 1 run in 5 under load.
    for _ in range(3):
        try:
            pyunion("mount", "-o", opts, str(mnt), timeout=20)
            assert (mnt / "f").read_text() == "x"
            pid = daemon_pid(str(mnt))
            assert pid is not None
            os.kill(pid, signal.SIGKILL)
            try:
                wait_until(lambda: not is_mounted(mnt), what="fusermount3's unmount")
            except AssertionError as e:
                left = _processes_named("fusermount3", str(pid))
                raise AssertionError(f"{e}; left: {left}") from e
        finally:
            if is_mounted(mnt):
                pyunion("umount", "--lazy", str(mnt), check=False)


@needs_fuse
def test_busy_umount_names_the_holder(layers: tuple) -> None:
    lows, _upper, _work, mnt = layers
    (lows[0] / "d").mkdir()
    with mounted(lows, mnt):
        holder = subprocess.Popen(["sleep", "60"], cwd=mnt / "d")
        try:
            r = pyunion("umount", str(mnt), check=False)
            assert r.returncode != 0 and "busy" in r.stderr and "sleep" in r.stderr
        finally:
            holder.kill()
            holder.wait()


@needs_fuse
def test_statfs_is_the_uppers(layers: tuple) -> None:
    lows, upper, work, mnt = layers
    with mounted(lows, mnt, upper, work):
        a, b = os.statvfs(mnt), os.statvfs(upper)
        assert (a.f_blocks, a.f_bsize) == (b.f_blocks, b.f_bsize)


@needs_fuse
@pytest.mark.parametrize("writeback", ["0", "1"])
def test_attributes_of_a_removed_file_still_open(layers: tuple, writeback: str) -> None:
    """fchmod/fchown/futimens/ftruncate on an open file whose name is gone (the
    writeback cache also flushes times of such files): they work, like the kernel's."""
    lows, upper, work, mnt = layers
    (lows[0] / "low").write_text("lower data")
    with mounted(lows, mnt, upper, work, extra=("-o", f"writeback={writeback}")):
        for name in ("low", "new"):
            fd = os.open(mnt / name, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                os.write(fd, b"some bytes written through the cache")
                os.unlink(mnt / name)
                os.fchmod(fd, 0o600)
                os.fchown(fd, 123, 456)
                os.ftruncate(fd, 4)
                os.utime(fd, ns=(10**18, 10**18))
                st = os.fstat(fd)
                assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, st.st_size) == (
                    0o600,
                    123,
                    456,
                    4,
                )
                assert st.st_mtime_ns == 10**18
                assert os.pread(fd, 100, 0) == b"some"
            finally:
                os.close(fd)  # no EIO from a late flush
            assert not os.path.lexists(mnt / name)


@needs_fuse
def test_writes_through_the_writeback_cache_reach_the_upper(layers: tuple) -> None:
    lows, upper, work, mnt = layers
    (lows[0] / "f").write_bytes(b"a" * 10000)
    with mounted(lows, mnt, upper, work, extra=("-o", "writeback=1")):
        with open(mnt / "f", "r+b") as f:
            f.seek(5000)
            f.write(b"b" * 100)
        with open(mnt / "g", "ab") as f:  # O_APPEND kept by the kernel
            f.write(b"1")
        with open(mnt / "g", "ab") as f:
            f.write(b"2")
        with open(mnt / "h", "wb") as f:
            for _ in range(100):
                f.write(b"x" * 1000)  # small writes, gathered by the kernel
            f.flush()
            os.fsync(f.fileno())
            assert (upper / "h").stat().st_size == 100000  # fsync reached the upper
    assert (upper / "f").read_bytes() == b"a" * 5000 + b"b" * 100 + b"a" * 4900
    assert (upper / "g").read_bytes() == b"12"
    assert (upper / "h").read_bytes() == b"x" * 100000


@needs_fuse
def test_spin_and_writeback_options(layers: tuple) -> None:
    lows, upper, work, mnt = layers
    (lows[0] / "f").write_text("x")
    for opts in ("spin=0,writeback=0", "spin=200,writeback=1"):
        with mounted(lows, mnt, upper, work, extra=("-o", opts)):
            (mnt / "f").write_text("y")
            assert (mnt / "f").read_text() == "y"
    for bad, msg in (("spin=fast", "spin takes microseconds"), ("writeback=2", "expected 0 or 1")):
        r = pyunion(
            "mount",
            "-o",
            f"{bad},upperdir={upper},workdir={work},lowerdir={lows[0]}",
            str(mnt),
            check=False,
        )
        assert r.returncode != 0 and msg in r.stderr and "Traceback" not in r.stderr
        assert not is_mounted(mnt)


@needs_fuse
def test_mount_t_fuse_pyunion_overlayfs(layers: tuple) -> None:
    """`mount -t fuse.pyunion-overlayfs overlay MNT -o lowerdir=...` (as with fuse-overlayfs):
    mount.fuse3 runs `pyunion-overlayfs overlay MNT -o rw,...,dev,suid`, the source first;
    like fuse-overlayfs, pyunion-overlayfs takes the last argument as the mount point."""
    import sys

    lows, upper, work, mnt = layers
    (lows[0] / "f").write_text("top")
    (lows[1] / "f").write_text("bottom")
    (lows[1] / "g").write_text("g")
    opts = f"rw,lowerdir={lows[0]}:{lows[1]},upperdir={upper},workdir={work}"
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    r = subprocess.run(
        ["/sbin/mount.fuse3", "overlay", str(mnt), "-t", "fuse.pyunion-overlayfs", "-o", opts],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert r.returncode == 0, r.stderr
    try:
        assert sorted(os.listdir(mnt)) == ["f", "g"]
        assert (mnt / "f").read_text() == "top"
        (mnt / "g").write_text("new")
        assert (upper / "g").read_text() == "new"
    finally:
        pyunion("umount", str(mnt), check=False)
    assert not is_mounted(mnt)


@needs_fuse
def test_pyunion_overlayfs_single_threaded_flag(layers: tuple) -> None:
    """`-s` (libfuse's single-threaded mode; fuse-overlayfs takes it) was an error."""
    import sys

    lows, upper, work, mnt = layers
    (lows[0] / "f").write_text("x")
    program = str(Path(sys.executable).parent / "pyunion-overlayfs")
    opts = f"lowerdir={lows[0]},upperdir={upper},workdir={work}"
    r = subprocess.run(
        [program, "-s", "-o", opts, str(mnt)], capture_output=True, text=True, timeout=60
    )
    try:
        assert r.returncode == 0, r.stderr
        assert (mnt / "f").read_text() == "x"
    finally:
        pyunion("umount", str(mnt), check=False)
    assert not is_mounted(mnt)


def _readahead_kb(st_dev: int) -> int:
    """The kernel's readahead window (KiB) on the mount of device `st_dev` (its bdi)."""
    return int(
        Path(f"/sys/class/bdi/{os.major(st_dev)}:{os.minor(st_dev)}/read_ahead_kb").read_text()
    )


@needs_fuse
def test_readahead_window_widened(layers: tuple) -> None:
    """The daemon widens the kernel's readahead on its mount to one 1 MiB read (the
    kernel's default, 128 KiB, made a sequential reader's data come in eight times as
    many requests); the kernel's cap from INIT is past by then."""
    lows, upper, work, mnt = layers
    (lows[0] / "f").write_bytes(os.urandom(3 << 20))
    with mounted(lows, mnt, upper, work):
        dev = os.stat(mnt).st_dev
        wait_until(
            lambda: _readahead_kb(dev) == READAHEAD_KB, timeout=5, what="the readahead window"
        )
        assert (mnt / "f").read_bytes() == (lows[0] / "f").read_bytes()
