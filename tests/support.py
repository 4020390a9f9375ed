"""What the tests share: why a test cannot run here, mounts that always go away, waiting.

- **Skip markers**: `needs_fuse` (root and /dev/fuse), `needs_root`,
  `needs_busybox`, `kernel_overlay_skip_reason` (the tiers, `mount` and the
  fast one, are marked in conftest.py).
- **Mounts**: `mounted` (pyunion through its CLI, options as given),
  `pyunion_mount` (the same, checked: a failed unmount fails the test),
  `kernel_overlay` (the oracle: kernel overlayfs with its options pinned), and
  `is_mounted` / `force_unmount` for teardown. Every mount is undone when the
  block ends, failures included.
- **Waiting** for a state, never for a fixed time: `wait_until`, `wait_gone`.
- **Processes**: forked children with a deadline (`run_child`,
  `start_children`, `join_children`), the daemon of a mount (`daemon_of`,
  `kill_daemon`).
- **Container tools**: `sh` (a tool's output, or the test fails), `buildah_busybox`
  (a busybox container on a private buildah store), `buildah_image`, `BUSYBOX`;
  buildah and podman on a private root with a mount program (`storage_tool`,
  `mounts_below`, `storage_daemons`, `stop_storage_leftovers`).
- **Views**: `tree_view`, what a merged tree shows, for comparing two mounts;
  `getdents` and `dirents`, one batch of a listing (read with a small buffer).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import os
import shutil
import signal
import socket
import stat
import struct
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from unionfs.mount import daemon_pid, process_alive
from unionfs.mount import wait_gone as _wait_gone

PYUNION = [sys.executable, "-m", "unionfs"]

# The kernel overlayfs oracle's options, spelled out so that another machine's
# module defaults (index=on keeps hard links; redirect_dir=on renames merged
# directories in place) cannot move the oracle. They are the kernel's defaults
# on Debian 12 and what pyunion follows.
KERNEL_OPTIONS = "index=off,redirect_dir=off,metacopy=off"


# -- why a test cannot run here ------------------------------------------------------------
def python_output(code: str) -> str:
    """What a fresh interpreter running `code` prints (-I: nothing from the environment);
    a non-zero exit fails the test with its stderr."""
    r = subprocess.run(
        [sys.executable, "-I", "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert r.returncode == 0, r.stderr
    return r.stdout


def fuse_skip_reason() -> str | None:
    if os.geteuid() != 0:
        return "needs root (FUSE mounts with allow_other, mknod, trusted xattrs)"
    if not os.path.exists("/dev/fuse"):
        return "needs /dev/fuse"
    return None


needs_fuse = pytest.mark.skipif(fuse_skip_reason() is not None, reason=fuse_skip_reason() or "")
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (mknod, trusted xattrs)")
needs_busybox = pytest.mark.skipif(
    not os.path.exists("/bin/busybox"),
    reason="needs /bin/busybox (busybox-static; bash scripts/setup.sh)",
)


@functools.cache
def kernel_overlay_skip_reason() -> str | None:
    """Why kernel overlayfs (the oracle) cannot be mounted here, or None when it can."""
    reason = fuse_skip_reason()
    if reason is not None:
        return reason
    with tempfile.TemporaryDirectory(prefix="pyunion-probe-") as td:
        t = Path(td)
        for d in ("l1", "l2", "u", "w", "m"):
            (t / d).mkdir()
        try:
            with kernel_overlay([t / "l1", t / "l2"], t / "m", t / "u", t / "w"):
                pass
        except (OSError, subprocess.SubprocessError, AssertionError) as e:
            return f"kernel overlayfs cannot be mounted here ({e})"
        try:
            os.setxattr(t / "l1", "user.probe", b"1")
        except OSError as e:
            return f"the temporary filesystem has no user xattrs ({e})"
    return None


# -- mounts ----------------------------------------------------------------------------------
def is_mounted(path: str | Path) -> bool:
    real = os.path.realpath(path)
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == real for line in f)


def force_unmount(path: str | Path) -> None:
    """Last resort in teardown: detach a mount a test left behind."""
    if is_mounted(path):
        subprocess.run(["umount", "-l", str(path)], capture_output=True, timeout=30, check=False)


def escape(p: Path | str) -> str:
    """A path as an item of `-o` (the kernel's and pyunion's escapes)."""
    return str(p).replace("\\", "\\\\").replace(":", "\\:").replace(",", "\\,")


def pyunion(
    *args: str,
    check: bool = True,
    timeout: float = 60,
    env: dict[str, str] | None = None,
    **kw: Any,
) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(
        [*PYUNION, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        check=False,
        **kw,
    )
    if check and r.returncode != 0:
        raise AssertionError(f"pyunion {' '.join(args)} failed ({r.returncode}): {r.stderr}")
    return r


def _layer_options(lowers: Sequence[Path], upper: Path | None, work: Path | None) -> str:
    opts = "lowerdir=" + ":".join(escape(p) for p in lowers)
    if upper is not None:
        opts += f",upperdir={escape(upper)}"
        if work is not None:
            opts += f",workdir={escape(work)}"
    return opts


@contextlib.contextmanager
def mounted(
    lowers: Sequence[Path],
    mnt: Path,
    upper: Path | None = None,
    work: Path | None = None,
    extra: tuple[str, ...] = (),
    env: dict[str, str] | None = None,
    log: Path | None = None,
    strict: bool = False,
) -> Iterator[Path]:
    """A pyunion mount (layers top first) through its CLI for the block, unmounted whatever happens.

    `log`: the daemon's log file (PYUNION_LOG). `strict`: a failing `pyunion
    umount` fails the test too (after a lazy unmount), unless the block already
    raised: then the block's error is the one worth seeing.
    """
    mnt.mkdir(parents=True, exist_ok=True)
    if log is not None:
        env = {**(env if env is not None else os.environ), "PYUNION_LOG": str(log)}
    r = pyunion(
        "mount", "-o", _layer_options(lowers, upper, work), *extra, str(mnt), check=False, env=env
    )
    if r.returncode != 0:
        force_unmount(mnt)
        raise AssertionError(f"pyunion mount failed ({r.returncode}): {r.stderr.strip()}")
    if strict and not is_mounted(mnt):
        raise AssertionError("pyunion mount returned 0 but nothing is mounted")
    ok = False
    try:
        yield mnt
        ok = True
    finally:
        r = pyunion("umount", str(mnt), check=False)
        still = is_mounted(mnt)
        force_unmount(mnt)
        if strict and ok and (r.returncode != 0 or still):
            raise AssertionError(
                f"pyunion umount failed ({r.returncode}, still mounted: {still}): "
                f"{r.stderr.strip()}"
            )


@contextlib.contextmanager
def debug_mount(
    lows: Sequence[Path],
    mnt: Path,
    log: Path,
    upper: Path | None = None,
    work: Path | None = None,
    extra: tuple[str, ...] = (),
) -> Iterator[None]:
    """A mount whose daemon logs every request to `log` (-d keeps it in the foreground)."""
    opts = _layer_options(lows, upper, work)
    with open(log, "w") as err:
        proc = subprocess.Popen([*PYUNION, "mount", "-d", "-o", opts, *extra, str(mnt)], stderr=err)
    try:
        wait_until(lambda: is_mounted(mnt), what="the mount", alive=lambda: proc.poll() is None)
        yield
    finally:
        pyunion("umount", str(mnt), check=False)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def pyunion_mount(
    lowers: Sequence[Path],
    mnt: Path,
    upper: Path | None = None,
    work: Path | None = None,
    log: Path | None = None,
) -> contextlib.AbstractContextManager[Path]:
    """`mounted`, strict: the differential tests' mounts."""
    return mounted(lowers, mnt, upper, work, log=log, strict=True)


@contextlib.contextmanager
def kernel_overlay(
    lowers: Sequence[Path], mnt: Path, upper: Path | None = None, work: Path | None = None
) -> Iterator[Path]:
    """The oracle: kernel overlayfs over LOWERS (top first), read-only without an upper.

    Its options are pinned (`KERNEL_OPTIONS`). A read-only kernel mount needs
    two lower layers: an empty bottom layer is added for a single one, which
    changes nothing in the view. The work dir is made if missing.
    """
    lowers = list(lowers)
    if upper is None and len(lowers) < 2:
        empty = mnt.parent / f".{mnt.name}.empty-layer"
        empty.mkdir(exist_ok=True)
        lowers.append(empty)
    if upper is not None:
        assert work is not None, "kernel overlayfs needs a work dir with an upper"
        work.mkdir(parents=True, exist_ok=True)
    opts = _layer_options(lowers, upper, work) + "," + KERNEL_OPTIONS
    mnt.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(
        ["mount", "-t", "overlay", "overlay", "-o", opts, str(mnt)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if r.returncode != 0:
        raise AssertionError(f"kernel overlay mount failed: {r.stderr.strip()} (-o {opts})")
    try:
        yield mnt
    finally:
        r = subprocess.run(["umount", str(mnt)], capture_output=True, timeout=60, check=False)
        if r.returncode != 0:
            force_unmount(mnt)


# -- waiting ---------------------------------------------------------------------------------
def wait_until(
    cond: Callable[[], object],
    timeout: float = 20,
    what: str = "the condition",
    alive: Callable[[], bool] | None = None,
) -> None:
    """Poll `cond` until it holds; fail after `timeout` s, or as soon as `alive()` is False."""
    deadline = time.monotonic() + timeout
    while not cond():
        if alive is not None and not alive():
            raise AssertionError(f"gave up waiting for {what}: the process it depends on died")
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not happen within {timeout:g}s")
        time.sleep(0.02)


def wait_gone(pid: int, timeout: float = 20) -> bool:
    """Whether every thread of `pid` exited within `timeout` s (woken by a pidfd)."""
    return _wait_gone(pid, timeout)


# -- processes -------------------------------------------------------------------------------
SOAK = bool(os.environ.get("PYUNION_SOAK"))


def soak(ci: int, long: int) -> int:
    """A size for CI, or the soak run's (PYUNION_SOAK=1)."""
    return long if SOAK else ci


def daemon_of(mnt: str | Path) -> int:
    pid = daemon_pid(str(mnt))
    assert pid is not None, f"no daemon for {mnt}"
    return pid


def alive(pid: int) -> bool:
    return process_alive(pid)


def kill_daemon(mnt: str | Path, pid: int | None = None) -> None:
    """SIGKILL the daemon (of a mount we made): every request in flight fails with ENOTCONN."""
    if pid is None:
        pid = daemon_pid(str(mnt))
    if pid is not None and alive(pid):
        os.kill(pid, signal.SIGKILL)
        wait_gone(pid)


def run_child(
    fn: Callable[..., object], *args: object, timeout: float = 60, mnt: str | Path | None = None
) -> int:
    """Run fn(*args) in a forked child; its exit code (0 unless it raised).

    On timeout the child is killed (and the daemon of `mnt`, so that a hung
    mount cannot hang the test) and the test fails: a deadlock, not a slowness.
    """
    procs = start_children([(fn, args)])
    return join_children(procs, timeout, mnt)[0]


def start_children(jobs: list[tuple[Callable[..., object], tuple[Any, ...]]]) -> list[int]:
    pids = []
    for fn, args in jobs:
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                fn(*args)
                code = 0
            except BaseException:  # noqa: BLE001 - reported, and the exit code says it failed
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


# -- container tools (buildah, skopeo, umoci) -------------------------------------------------
BUSYBOX = next((p for p in ("/bin/busybox", "/usr/bin/busybox") if os.path.exists(p)), None)


def sh(*args: str | Path, timeout: float = 120, env: dict[str, str] | None = None) -> str:
    """Run a tool; its stdout, stripped. A failure fails the test with the end of its stderr."""
    r = subprocess.run(
        [str(a) for a in args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        check=False,
    )
    if r.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, args))} failed: {r.stderr[-2000:]}")
    return r.stdout.strip()


@contextlib.contextmanager
def buildah_busybox(t: Path) -> Iterator[tuple[list[str], str]]:
    """buildah on a private vfs store under T (T/root, T/runroot), and a container on it made
    from scratch with the static `BUSYBOX` as /bin/busybox: (buildah's command, the
    container). Containers and what they left mounted go when the block ends."""
    bah = ["buildah", "--root", str(t / "root"), "--runroot", str(t / "runroot")]
    bah += ["--storage-driver", "vfs"]
    (t / "ctx/bin").mkdir(parents=True)
    shutil.copy(BUSYBOX, t / "ctx/bin/busybox")  # type: ignore[arg-type]
    try:
        c = sh(*bah, "from", "scratch")
        sh(*bah, "copy", c, t / "ctx/bin", "/bin")
        yield bah, c
    finally:
        subprocess.run([*bah, "rm", "--all"], capture_output=True, timeout=60, check=False)
        subprocess.run(
            ["umount", "-R", str(t / "root")], capture_output=True, timeout=60, check=False
        )


def buildah_image(t: Path, name: str) -> str:
    """Image NAME of `buildah_busybox(t)`'s store, as skopeo names it."""
    return f"containers-storage:[vfs@{t / 'root'}+{t / 'runroot'}]localhost/{name}"


# -- buildah and podman with a mount program, on a private root ------------------------------
def storage_tool(
    argv: Sequence[str], shown: str, env: dict[str, str], log: Path, check: bool = True
) -> str:
    """Run buildah or podman (`argv`); its stdout, stripped. A failure (with `check`) fails
    the test with `shown` (the command as it reads), its output and the end of the mount
    daemon's `log` (PYUNION_LOG)."""
    r = subprocess.run(
        list(argv),
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        stdin=subprocess.DEVNULL,
        check=False,
    )
    if check and r.returncode != 0:
        tail = log.read_text()[-2000:] if log.exists() else ""
        raise AssertionError(
            f"{shown} failed ({r.returncode}):\n{r.stdout}\n{r.stderr}\ndaemon log:\n{tail}"
        )
    return r.stdout.strip()


def mounts_below(*dirs: Path) -> list[str]:
    """The mount points below any of `dirs`."""
    bases = tuple(str(d.resolve()) + "/" for d in dirs)
    with open("/proc/self/mountinfo") as f:
        return [line.split()[4] for line in f if line.split()[4].startswith(bases)]


def storage_daemons(state: Path, root: Path) -> list[int]:
    """Mount daemons of one containers/storage root only: pyunion records its pid in `state`
    (PYUNION_STATE_DIR), fuse-overlayfs has `root` on its command line."""
    pids = set()
    if state.is_dir():
        for f in state.iterdir():
            with contextlib.suppress(OSError, ValueError, IndexError):
                pids.add(int(f.read_text().split()[0]))
    for p in os.listdir("/proc"):
        if p.isdigit():
            with contextlib.suppress(OSError):
                cmd = Path(f"/proc/{p}/cmdline").read_bytes().split(b"\0")
                if os.path.basename(cmd[0]) == b"fuse-overlayfs" and any(
                    str(root).encode() in a for a in cmd
                ):
                    pids.add(int(p))
    return [p for p in pids if p != os.getpid() and alive(p)]


def stop_storage_leftovers(dirs: Sequence[Path], state: Path, root: Path) -> None:
    """What a failure left of a private containers/storage: the mounts below `dirs`
    (detached, deepest first), then its mount daemons (SIGTERM; SIGKILL after 10 s)."""
    for mp in sorted(mounts_below(*dirs), key=len, reverse=True):
        subprocess.run(["umount", "-l", mp], capture_output=True, timeout=30, check=False)
    for pid in storage_daemons(state, root):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 10
        while alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        if alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


# -- views -----------------------------------------------------------------------------------
def tree_view(root: str | Path, content: bool = True) -> dict[bytes, tuple[Any, ...]]:
    """Everything a union view shows, per relative path: type, mode, owner, size, data or target.

    Times and inode numbers are left out (they differ between two mounts of one tree);
    regular file data is compared by hash. A stack, not recursion: trees can be deep.
    """
    out: dict[bytes, tuple[Any, ...]] = {}
    base = os.fsencode(str(root))
    todo = [b""]
    while todo:
        rel = todo.pop()
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
                todo.append(r)
    return out


@contextlib.contextmanager
def as_user(uid: int, gid: int | None = None) -> Iterator[None]:
    """Effective (and so filesystem) IDs of a user, no supplementary groups, for the
    block of a test running as root; root's again after it."""
    groups = os.getgroups()
    os.setgroups([])
    os.setegid(uid if gid is None else gid)
    os.seteuid(uid)
    try:
        yield
    finally:
        os.seteuid(0)
        os.setegid(0)
        os.setgroups(groups)


@contextlib.contextmanager
def host_listeners() -> Iterator[tuple[socket.socket, socket.socket, str]]:
    """A TCP listener on the host's 127.0.0.1 and an abstract Unix socket (D-Bus, X11 and
    systemd's private sockets are such), for a container to try: (the TCP listener, the
    Unix one, the Unix one's name without its leading NUL)."""
    name = f"pyunion-test-{os.getpid()}-{os.urandom(4).hex()}"
    with (
        socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp,
        socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as unix,
    ):
        tcp.bind(("127.0.0.1", 0))
        tcp.listen(4)
        unix.bind("\0" + name)
        unix.listen(4)
        yield tcp, unix, name


@contextlib.contextmanager
def throwaway_user(name: str) -> Iterator[tuple[int, int]]:
    """An unprivileged user NAME (no home, group `users`, no shell): its (uid, gid);
    removed afterwards, whatever happened meanwhile."""
    import pwd

    subprocess.run(
        ["useradd", "-M", "-N", "-g", "users", "-s", "/usr/sbin/nologin", name],
        check=True,
        capture_output=True,
        timeout=60,
    )
    try:
        pw = pwd.getpwnam(name)
        yield pw.pw_uid, pw.pw_gid
    finally:
        subprocess.run(["userdel", name], capture_output=True, timeout=60, check=False)


_libc = ctypes.CDLL(None, use_errno=True)
_SYS_GETDENTS64 = 217  # x86_64


def getdents(fd: int, size: int) -> list[str]:
    """The names (`.` and `..` too) of one getdents64 on FD with a SIZE-byte buffer: a
    listing read in parts, as by a program that stops early or reads a few at a time."""
    return [name for name, _ in dirents(fd, size)]


def dirents(fd: int, size: int = 32768) -> list[tuple[str, int]]:
    """(name, d_ino) of one getdents64 on FD with a SIZE-byte buffer."""
    buf = ctypes.create_string_buffer(size)
    n = _libc.syscall(_SYS_GETDENTS64, fd, buf, size)
    if n < 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))
    out, off, raw = [], 0, buf.raw[:n]
    while off < n:
        ino, _, reclen = struct.unpack_from("QqH", raw, off)
        out.append((os.fsdecode(raw[off + 19 : off + reclen].split(b"\0", 1)[0]), ino))
        off += reclen
    return out
