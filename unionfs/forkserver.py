"""A per-user fork server: a mount's daemon forked from a process that imported everything.

A daemon forked straight from `pyunion mount` or `run` must import trio, pyfuse3
and the filesystem before it can mount: about 0.1 s and 15 MiB of private
memory per mount. The fork server is a long-lived process that has done those
imports once (then `gc.freeze()`, so that the collector never touches, and
copies, the shared objects); it forks one daemon per mount, which shares the
server's pages copy-on-write and mounts at once.

- **Started on demand**, by the first mount that finds no server: that mount
  forks its daemon directly as before (it never waits for the server), and the
  server serves the next ones. It exits after `IDLE_S` seconds without a
  request, or when its socket is removed or replaced.
- **Its socket** is `forkserver.sock` in the state directory (0700, the
  user's own, `mount.state_dir`); both ends check the other's uid
  (SO_PEERCRED) and bounds (`_peer_is_my_equal`, `_as_free_as_me`: its
  capabilities, no_new_privs, seccomp, LSM label, root directory, user and pid
  namespaces, read while a pidfd says the caller still lives). A request is the
  `MountConfig` (decoded by `_Request`, which knows the option classes and
  nothing else, in the process forked for it: never in the server), and by
  SCM_RIGHTS the
  caller's mount namespace, the readiness pipe, the state directory and the
  mount point the caller resolved and checked (`mount.open_mountpoint`): the
  daemon joins the caller's mount namespace (`run` mounts in a private one),
  then runs exactly what a directly forked daemon runs (`mount.serve`). The
  reply is the daemon's pid; readiness comes through the pipe as before.
- **Isolation.** Each daemon is a process of its own (own session, no fd of
  the server's or of another mount's); the server runs no filesystem code, so
  a daemon's crash touches no other mount, and a server's crash none at all
  (the daemons are not its threads; the next mount starts a new server).
- **Only when asked for** (`PYUNION_FORKSERVER=1`), **and only for root outside
  a user namespace.** A rootless mount's daemon must live in the caller's user
  namespace; it is forked directly, as before. Opt-in because a daemon from
  the server has the server's confinement, and not every bound of a caller
  can be seen and compared (see `enabled`).
"""

from __future__ import annotations

import _socket
import array
import contextlib
import gc
import os
import pickle
import select
import signal
import struct
import sys
import time
from collections.abc import Callable

from . import procfs
from .options import MountConfig
from .sha256 import sha256_hex
from .syscalls import CLONE_NEWNS, close_fds_from, fd_str, setns

TYPE_CHECKING = False  # typing's, without importing typing on a mount's start (architecture.md)
if TYPE_CHECKING:
    import socket
    from typing import NoReturn

IDLE_S = 60.0  # exit after this long without a request
MAX_REQUEST = 1 << 20
_PID = struct.Struct("=i")


_home_ns = -1  # the mount namespace to start a server in (remember_namespace)


def remember_namespace() -> None:
    """Note this process's mount namespace before it unshares one of its own (run, build).

    A server started later is started back in this one: in the private copy it
    would pin every mount the copy holds (another mount's FUSE connection among
    them, whose daemon would then outlive its unmount) for as long as it lives.
    """
    global _home_ns
    if _home_ns < 0:
        with contextlib.suppress(OSError):
            _home_ns = os.open("/proc/self/ns/mnt", os.O_RDONLY | os.O_CLOEXEC)


def enabled() -> bool:
    """Whether mounts go through the server: asked for (`PYUNION_FORKSERVER=1`), as root
    outside a user namespace.

    Opt-in: a daemon from the server carries the server's confinement, not the
    caller's, and some of the caller's cannot be seen from outside to be
    compared (a Landlock domain; those that can be are, `_as_free_as_me`). A caller
    that wants the faster start vouches that it runs unconfined in the host's mount
    namespace and root.
    """
    if os.environ.get("PYUNION_FORKSERVER", "0") != "1" or os.geteuid() != 0:
        return False
    from .userns import in_user_namespace

    return not in_user_namespace()


def _names() -> tuple[str, str]:
    """The socket's and the lock's names, for this interpreter and this very code.

    Several installations (a venv, a checkout) may share a state directory: each gets
    a server of its own, and an edited or upgraded pyunion never meets an old server.
    """
    pkg = os.path.dirname(os.path.abspath(__file__))
    exe = os.path.realpath(sys.executable)
    parts = [f"{exe}\0{pkg}".encode(errors="surrogateescape")]
    for root, _dirs, files in os.walk(pkg):
        for name in sorted(files):
            if name.endswith(".py"):
                st = os.stat(os.path.join(root, name))
                parts.append(f"\0{name}:{st.st_mtime_ns}:{st.st_size}".encode())
    key = sha256_hex(b"".join(parts))[:16]
    return f"forkserver-{key}.sock", f"forkserver-{key}.lock"


def _peer(sock: _socket.socket) -> tuple[int, int]:
    """(pid, uid) of the process at the other end."""
    creds = sock.getsockopt(_socket.SOL_SOCKET, _socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, _gid = struct.unpack("3i", creds)
    return int(pid), int(uid)


_CONFINEMENT = (b"CapEff", b"CapPrm", b"CapBnd", b"NoNewPrivs", b"Seccomp")


def _confinement(pid: int | str) -> dict[bytes, bytes]:
    """What bounds a process's privileges: capability sets, no_new_privs, seccomp."""
    return procfs.status(pid, _CONFINEMENT)


def _object(path: str) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_dev, st.st_ino


def _label(pid: int | str) -> bytes | int:
    """The process's LSM label (AppArmor, SELinux, Smack); the errno when it has none."""
    try:
        with open(f"/proc/{pid}/attr/current", "rb") as f:
            return f.read(4096)
    except OSError as e:
        return e.errno or -1


def _as_free_as_me(pid: int) -> bool:
    """Whether process `pid` holds every privilege this server holds, and no more bounds.

    A root caller with fewer capabilities, no_new_privs, any seccomp filter (two
    cannot be compared), another LSM label, a chroot, or in another user namespace
    (root there, every capability in its status, none on the host: systemd's
    `PrivateUsers=`, `unshare -Ur`) or pid namespace (the pid the server replies
    would name another process) gets its daemon forked directly: a daemon from the
    server would not share its bounds.
    """
    try:
        mine, theirs = _confinement("self"), _confinement(pid)
        for ns in ("user", "pid"):
            if _object(f"/proc/{pid}/ns/{ns}") != _object(f"/proc/self/ns/{ns}"):
                return False
        # The server's root is its namespace's: a chroot of the caller's is a bound.
        if _object(f"/proc/{pid}/root") != _object("/proc/self/root"):
            return False
        if _label(pid) != _label("self"):
            return False
    except OSError:
        return False
    for key in (b"CapEff", b"CapPrm", b"CapBnd"):
        have, need = int(theirs.get(key, b"0"), 16), int(mine.get(key, b"0"), 16)
        if need & ~have:
            return False
    # Two seccomp filters cannot be compared from here (only counted): a filtered caller's
    # daemon is forked directly, whatever filter the server has.
    if theirs.get(b"Seccomp") != b"0":
        return False
    return all(theirs.get(k) == mine.get(k) for k in (b"NoNewPrivs", b"Seccomp"))


SO_PEERPIDFD = getattr(_socket, "SO_PEERPIDFD", 77)  # Linux 6.5


def _peer_pidfd(conn: _socket.socket, pid: int) -> int:
    """A pidfd of the process that connected; on kernels before 6.5, of `pid` now."""
    try:
        return int(conn.getsockopt(_socket.SOL_SOCKET, SO_PEERPIDFD))
    except OSError:
        return os.pidfd_open(pid)


def _gone(pidfd: int) -> bool:
    """Whether the process of `pidfd` has exited (its pid may then name another one)."""
    return bool(select.select([pidfd], [], [], 0)[0])


def _peer_is_my_equal(sock: _socket.socket, then: Callable[[int], None] | None = None) -> bool:
    """Whether the process at the other end of `sock` has this one's uid and is bound no
    more tightly (`_as_free_as_me`), `then(pid)` run meanwhile: both ends ask it.

    The client hands the server its mount namespace, its mount point or the /dev/fuse of
    a container's root, and the state dir: a server bound more tightly than the client
    (root of a user namespace, fewer capabilities) that took the socket's name in the
    root-owned state dir got them (and served the container's root, or said a mount
    was live with nothing mounted). What /proc/PID says is the peer's only while the
    peer lives: checked after, by a pidfd.
    """
    peer, uid = _peer(sock)
    if peer <= 0 or uid != os.geteuid():
        return False
    pidfd = _peer_pidfd(sock, peer)
    try:
        if not _as_free_as_me(peer):
            return False
        if then is not None:
            then(peer)
        return not _gone(pidfd)
    finally:
        os.close(pidfd)


# -- the client side ---------------------------------------------------------------------
def spawn(cfg: MountConfig, ready_w: int, state_fd: int, mp_fd: int) -> int | None:
    """Have the server fork the daemon of `cfg`; its pid, or None if there is no server.

    With None the caller forks the daemon itself; a server is then started for the
    mounts that follow. The daemon reports on `ready_w` as a directly forked one does.
    """
    path = f"{fd_str(state_fd)}/{_names()[0]}"
    # `_socket`: the client needs none of `socket`'s wrapping (~1.5 ms of its start)
    sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_SEQPACKET | _socket.SOCK_CLOEXEC)
    try:
        try:
            sock.connect(path)
        except OSError:
            start_server(state_fd)
            return None
        if not _peer_is_my_equal(sock):
            return None  # forked directly; the name is not ours to take over
        mntns = os.open("/proc/self/ns/mnt", os.O_RDONLY | os.O_CLOEXEC)
        try:
            env = {k: v for k, v in os.environ.items() if k == "PYUNION_LOG"}
            payload = pickle.dumps((cfg, env))  # the caller's cgroups: the server reads them
            fds = array.array("i", [mntns, ready_w, state_fd, mp_fd])
            sock.sendmsg([payload], [(_socket.SOL_SOCKET, _socket.SCM_RIGHTS, fds)])
        finally:
            os.close(mntns)
        sock.settimeout(30)
        reply = sock.recv(64)
    except OSError:
        return None  # a server that went away while we asked: fork directly
    finally:
        sock.close()
    if len(reply) != _PID.size:
        return None
    pid: int = _PID.unpack(reply)[0]
    return pid if pid > 0 else None


_BOOT = (
    "import json, sys; sys.path[:0] = json.loads(sys.argv[1]); "
    "from unionfs.forkserver import server_main; server_main(int(sys.argv[2]))"
)


def _server_path() -> list[str]:
    """The server's `sys.path`: where this package is, then the caller's, less its working
    directory (`python -m` and `-c` put it first).

    The server outlives its first caller and forks every later caller's daemon, which
    imports some modules only then (`resource`): a module planted in that caller's
    working directory (/tmp) ran as root in the daemons of callers who never went there.
    """
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        cwd = os.path.realpath(os.getcwd())
    except OSError:
        cwd = ""
    out = [here]
    for entry in sys.path:
        if entry in ("", ".") or not os.path.isabs(entry):
            continue
        if os.path.realpath(entry) == cwd and entry != here:
            continue
        if entry not in out:
            out.append(entry)
    return out


def start_server(state_fd: int) -> None:
    """Start a server in the background (detached, a fresh interpreter); never waits for it."""
    import json  # here: a mount that finds its server never needs it

    path = json.dumps(_server_path())  # before the child leaves the working directory
    pid = os.fork()
    if pid:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)
        return
    try:  # the middle process: exits at once, so the server is nobody's child
        if _home_ns >= 0:
            setns(_home_ns, CLONE_NEWNS)  # failing, no server: never one in a private copy
        os.setsid()
        if os.fork():
            os._exit(0)
        null = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(null, fd)
        fd = os.dup(state_fd)
        os.set_inheritable(fd, True)
        close_fds_from(3, (fd,))
        os.chdir("/")
        os.execve(
            sys.executable,
            [sys.executable, "-I", "-c", _BOOT, path, str(fd)],
            {"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")},
        )
    except BaseException:  # noqa: BLE001 - a forked child must never return into pyunion
        pass
    os._exit(1)


# -- the server --------------------------------------------------------------------------
def server_main(state_fd: int) -> NoReturn:
    """The server's body, in its fresh interpreter; `state_fd` is the state directory."""
    import fcntl
    import logging
    import socket

    code = 0
    try:
        os.set_inheritable(state_fd, False)
        sock_name, lock_name = _names()
        lock = os.open(
            lock_name, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=state_fd
        )
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os._exit(0)  # another server runs
        # Everything a daemon needs, imported once and shared by every fork.
        from .bytecode import strip_docstrings
        from .lazyimport import defer

        defer()
        strip_docstrings()
        from . import mount

        mount.import_trio()  # what of it a daemon runs on, no `ldconfig -p` (syscalls.SONAMES)
        import pyfuse3  # noqa: F401

        from . import fuseops, reqloop, union  # noqa: F401

        logging.basicConfig(level=logging.WARNING, format="pyunion: %(levelname)s: %(message)s")
        path = f"{fd_str(state_fd)}/{sock_name}"
        with contextlib.suppress(FileNotFoundError):
            os.unlink(sock_name, dir_fd=state_fd)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        old = os.umask(0o077)
        try:
            listener.bind(path)
        finally:
            os.umask(old)
        listener.listen(64)
        ident = os.stat(sock_name, dir_fd=state_fd, follow_symlinks=False).st_ino
        gc.collect()
        gc.freeze()
        _serve_forever(listener, state_fd, sock_name, ident)
        if _still_ours(state_fd, sock_name, ident):
            with contextlib.suppress(OSError):
                os.unlink(sock_name, dir_fd=state_fd)
    except BaseException:  # noqa: BLE001 - never a traceback: nobody reads it
        code = 1
    os._exit(code)


def _serve_forever(listener: socket.socket, state_fd: int, name: str, ident: int) -> None:
    last = time.monotonic()
    poll = select.poll()
    poll.register(listener.fileno(), select.POLLIN)
    while True:
        _reap()
        if not poll.poll(1000):
            if time.monotonic() - last > IDLE_S or not _still_ours(state_fd, name, ident):
                return
            continue
        try:
            conn, _ = listener.accept()
        except OSError:
            continue
        last = time.monotonic()
        with conn, contextlib.suppress(OSError):
            _handle(conn, listener)


def _still_ours(state_fd: int, name: str, ident: int) -> bool:
    try:
        return os.stat(name, dir_fd=state_fd, follow_symlinks=False).st_ino == ident
    except OSError:
        return False


def _reap() -> None:
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


class _Request(pickle.Unpickler):
    """A request's decoder: the option classes, nothing else (no callable, no import).

    The caller passed the checks of `_as_free_as_me`, but not every bound can be
    seen (a Landlock domain): with `pickle.loads`, a request naming `os.system` ran
    that caller's code in the unconfined server. Now a request can only be a mount.
    """

    ALLOWED = frozenset({("unionfs.options", "MountConfig"), ("unionfs.idmap", "IdMap")})

    def find_class(self, module: str, name: str) -> type:
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"{module}.{name} is no part of a mount request")
        cls: type = super().find_class(module, name)
        return cls


def _decode(msg: bytes) -> tuple[MountConfig, dict[str, str]] | None:
    """The request's `MountConfig` and environment (only `PYUNION_LOG`); None if malformed."""
    import io

    try:
        cfg, env = _Request(io.BytesIO(msg)).load()
    except Exception:  # noqa: BLE001 - any malformed request is refused in one line
        return None
    if not isinstance(cfg, MountConfig) or not isinstance(env, dict):
        return None
    log_file = env.get("PYUNION_LOG")
    return cfg, ({"PYUNION_LOG": log_file} if isinstance(log_file, str) else {})


def _handle(conn: socket.socket, listener: socket.socket) -> None:
    cgroups = ""

    def read_cgroups(peer: int) -> None:
        # The caller's cgroups as the kernel says (a caller in a cgroup namespace of its
        # own would report "0::/", the root, and its daemon would leave its limits).
        nonlocal cgroups
        with open(f"/proc/{peer}/cgroup") as f:
            cgroups = f.read(1 << 16)

    if not _peer_is_my_equal(conn, read_cgroups):
        conn.sendall(_PID.pack(0))  # the caller forks its daemon itself
        return
    conn.settimeout(10)
    fds = array.array("i")
    msg, ancdata, _, _ = conn.recvmsg(MAX_REQUEST, _socket.CMSG_SPACE(8 * fds.itemsize))
    for level, kind, data in ancdata:
        if level == _socket.SOL_SOCKET and kind == _socket.SCM_RIGHTS:
            fds.frombytes(data[: len(data) - len(data) % fds.itemsize])
    try:
        if len(fds) != 4 or not msg:
            return
        # Decoded in the fork, never here: a request can still build what crashes or
        # swamps the process reading it (a tuple nested 300,000 deep as a dict key: its
        # hash recursed in C until the server died of SIGSEGV), and the server is every
        # later caller's.
        pid = os.fork()
        if pid == 0:
            listener.close()
            _daemon(msg, cgroups, conn, fds[0], fds[1], fds[2], fds[3])
        conn.sendall(_PID.pack(pid))
    finally:
        for fd in fds:
            os.close(fd)


def _join_cgroups(cgroups: str) -> None:
    """Move this process into the caller's cgroups (best effort, as root).

    Its memory and its fate then belong to the caller, as a directly forked
    daemon's do: stopping the caller's unit, or a memory limit, never reaches a
    daemon that the server forked for someone else.

    Only the hierarchies where this process is elsewhere are written: a move waits
    for an RCU grace period (the kernel takes its lock of every thread group), even
    into the cgroup the process is in already: ~14 ms of each mount whose caller
    shares the server's cgroups, as callers mostly do.
    """
    try:
        with open("/proc/self/cgroup") as f:
            mine = set(f.read(1 << 16).splitlines())
    except OSError:
        mine = set()
    for line in cgroups.splitlines():
        if line in mine:
            continue  # there already
        num, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if not path.startswith("/") or "/.." in path or not num.isdigit():
            continue
        if controllers == "":
            base = (
                "/sys/fs/cgroup/unified"
                if os.path.isdir("/sys/fs/cgroup/unified")
                else ("/sys/fs/cgroup")
            )
        else:
            base = "/sys/fs/cgroup/" + controllers.removeprefix("name=")
        with contextlib.suppress(OSError):
            fd = os.open(
                os.path.join(base + path, "cgroup.procs"),
                os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC,
            )
            try:
                os.write(fd, b"0")
            finally:
                os.close(fd)


def _daemon(
    msg: bytes,
    cgroups: str,
    conn: socket.socket,
    mntns: int,
    ready: int,
    state: int,
    mp: int,
) -> NoReturn:
    """The forked daemon: join the caller's cgroups, decode the request (its memory and
    its crash are the caller's), join the caller's mount namespace, then what
    `mount.mount` forks."""
    from . import mount

    code = 1
    try:
        conn.close()
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        _join_cgroups(cgroups)
        import resource

        core = resource.getrlimit(resource.RLIMIT_CORE)
        resource.setrlimit(resource.RLIMIT_CORE, (0, core[1]))  # a crash here: no /core
        request = _decode(msg)
        resource.setrlimit(resource.RLIMIT_CORE, core)
        del msg
        if request is None:
            raise ValueError("the request is no mount")
        cfg, env = request
        setns(mntns, CLONE_NEWNS)
        os.close(mntns)
        os.environ.clear()
        os.environ.update(env)
        code = mount.run_daemon(cfg, ready, state, mp)
    except BaseException as e:  # noqa: BLE001 - report it, never a traceback
        with contextlib.suppress(OSError):
            os.write(ready, b"E" + f"daemon failed: {e}".encode(errors="replace"))
    os._exit(code)


__all__ = ["enabled", "remember_namespace", "server_main", "spawn", "start_server"]
