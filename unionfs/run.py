"""`pyunion run`: run a command chroot'd in a union of layers, with a throw-away writable layer.

The parent side (this module) owns everything that must be undone:

1. fork the daemon-to-be (`prefork.Prefork`; the program forks it first thing
   when it can), which imports while the rest is prepared
   (docs/architecture.md: start-up as a pipeline); pyunion never
   copies the host's mount namespace, so none of its processes holds (pins)
   the host's mounts while the container runs;
2. fork a janitor: if pyunion itself is killed (SIGKILL, OOM), the janitor
   sees its pipe close and does the teardown pyunion could not do;
3. fork the container's init into a new pid namespace (`sandbox.start_init`: it execs
   catatonit before any process of the container exists, so pid 1 holds nothing of
   pyunion's memory while the container runs),
   confined as podman confines a container (`confine.py`: options checked here,
   before anything is mounted); it waits for "go";
4. make the FUSE mount of the layers under a fresh upper (in a temporary
   directory) as a detached mount (`unionfs.mount.mount_detached`, allow_other
   so `-u USER` can read the tree: in no mount namespace, never in the host's
   mount table), then tell init to go on, handing it the mount, which it
   attaches in its own namespace; forward signals to it, relay a pty for `-t`;
5. teardown, always: kill what is left of the container (the mount goes with its
   namespace; one init never got is closed), wait for the daemon (stop it if it
   lingers: only its pid), remove the temporary upper
   unless `--keep`/`--upper`, through fds (`tree.py`): the container wrote it.

Exit codes follow podman/docker: the command's own, 125 when pyunion fails,
126 cannot execute, 127 not found, 128+N killed by signal N.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import fcntl
import gc
import os
import select
import signal
import socket
import stat
import sys
import tempfile
import termios
import time
import tty as ttymod
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from types import FrameType
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

from . import syscalls, tree, userns
from .errors import UserError
from .mount import is_mountpoint, mount_detached, wait_gone
from .options import MountConfig
from .prefork import Prefork, cancel_early, forkserver_wanted, take_early

if TYPE_CHECKING:
    from . import confine, sandbox, volumes

# sandbox, volumes and the image store are imported once the daemon is forked
# (`Runner._prefork_daemon`): the parent imports them while the daemon imports pyfuse3
# and trio. Imported before, the daemon would wait for them too.

TOOL_ERROR = 125
T = TypeVar("T")


def _fail(msg: str) -> UserError:
    return UserError(msg, TOOL_ERROR)


# -- options ----------------------------------------------------------------------------
@dataclass
class RunOptions:
    """A parsed `pyunion run` command line."""

    layers: list[str]
    command: list[str]
    env: list[str] = field(default_factory=list)
    env_files: list[str] = field(default_factory=list)
    workdir: str | None = None
    user: str | None = None
    volumes: list[str] = field(default_factory=list)
    hostname: str | None = None
    entrypoint: str | None = None
    interactive: bool = False
    tty: bool = False
    keep: bool = False
    upper: str | None = None
    read_only: bool = False
    store: str | None = None
    cap_add: list[str] = field(default_factory=list)
    cap_drop: list[str] = field(default_factory=list)
    privileged: bool = False
    security_opt: list[str] = field(default_factory=list)
    preserve_fds: int = 0
    quiet: bool = False  # no notice that the writable layer is kept (programmatic callers)


def _add_options(p: argparse.ArgumentParser) -> None:
    from .cli import store_option

    p.add_argument(
        "-e",
        "--env",
        action="append",
        default=[],
        metavar="K=V",
        help="set an environment variable (K alone: take it from pyunion's)",
    )
    p.add_argument(
        "--env-file", action="append", default=[], metavar="FILE", help="read K=V lines from FILE"
    )
    p.add_argument("-w", "--workdir", metavar="DIR", help="working directory inside")
    p.add_argument(
        "-u",
        "--user",
        metavar="USER[:GROUP]",
        help="run as USER (name or uid from the image's /etc/passwd)",
    )
    p.add_argument(
        "-v",
        "--volume",
        action="append",
        default=[],
        metavar="HOST:CONTAINER[:OPTIONS]",
        help="bind-mount a host path into the container; OPTIONS: ro, rw, nosuid, "
        "nodev, noexec, bind, rbind, z, Z (ro is recursive)",
    )
    p.add_argument("--hostname", help="the container's host name (default: the host's)")
    p.add_argument("--entrypoint", help="override the image's Entrypoint")
    p.add_argument("-i", "--interactive", action="store_true", help="keep stdin connected")
    p.add_argument("-t", "--tty", action="store_true", help="give the command a terminal")
    p.add_argument("--keep", action="store_true", help="keep the writable layer afterwards")
    p.add_argument("--upper", metavar="DIR", help="use DIR as the writable layer (kept)")
    p.add_argument(
        "--read-only",
        action="store_true",
        help="mount the container's root read-only (tmpfs on /tmp, /var/tmp, /run)",
    )
    store_option(p)
    p.add_argument(
        "--cap-add",
        action="append",
        default=[],
        metavar="CAP",
        help="add a capability to podman's default set (ALL: every one)",
    )
    p.add_argument(
        "--cap-drop",
        action="append",
        default=[],
        metavar="CAP",
        help="drop a capability (ALL: every one)",
    )
    p.add_argument(
        "--privileged",
        action="store_true",
        help="no confinement: every capability, no seccomp, no masked paths",
    )
    p.add_argument(
        "--security-opt",
        action="append",
        default=[],
        metavar="OPT",
        help="seccomp=unconfined|PROFILE.json, no-new-privileges, "
        "mask=PATH[:PATH...], unmask=ALL|PATH[:PATH...]",
    )
    p.add_argument(
        "--preserve-fds",
        type=int,
        default=0,
        metavar="N",
        help="pass file descriptors 3..N+2 on to the command",
    )


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "run",
        help="run a command in a union of layers (a throw-away container)",
        usage="pyunion run [OPTIONS] LAYER... [-- COMMAND [ARG...]]",
        description="Mount the layers (TOP FIRST, or one image name) under a fresh writable "
        "layer, run COMMAND chroot'd in the merged tree with private mount, pid, "
        "uts and ipc namespaces, then unmount and throw the writable layer away. "
        "Exit status: the command's; 125 pyunion failed; 126 cannot execute; "
        "127 not found; 128+N killed by signal N.",
    )
    _add_options(p)
    p.add_argument(
        "args",
        nargs=argparse.REMAINDER,
        metavar="LAYER... -- COMMAND",
        help="layers top first, then -- and the command",
    )
    p.set_defaults(handler=_cmd_run)


HOST_NAME_MAX = 64  # the kernel's limit for sethostname(2)


def parse_run_args(args: argparse.Namespace) -> RunOptions:
    """Split LAYER... -- COMMAND; options written between the layers are honoured too."""
    rest: list[str] = list(args.args)
    if "--" in rest:
        i = rest.index("--")
        before, command = rest[:i], rest[i + 1 :]
    else:
        before, command = rest, []
    if any(a.startswith("-") and a != "-" for a in before):
        again = argparse.ArgumentParser(prog="pyunion run", add_help=False)
        _add_options(again)
        again.add_argument("layers", nargs="*")
        try:
            extra = again.parse_intermixed_args(before)
        except SystemExit:
            raise _fail("bad options before '--' (see 'pyunion run --help')") from None
        for key, value in vars(extra).items():
            if key == "layers":
                continue
            default = again.get_default(key)
            if value != default:
                cur = getattr(args, key)
                setattr(args, key, cur + value if isinstance(value, list) else value)
        before = extra.layers
    host = args.hostname
    if host and len(os.fsencode(host)) > HOST_NAME_MAX:
        # sethostname(2) refused it, and the container kept the host's name unsaid.
        raise _fail(f"--hostname: {host!r} is longer than {HOST_NAME_MAX} bytes")
    if host and not (host.isprintable() and " " not in host):
        # Bytes that are no UTF-8 (a UnicodeEncodeError traceback writing /etc/hostname);
        # a newline, tab or space wrote lines and names of its own into /etc/hosts.
        raise _fail(f"--hostname: {host!r} holds a space, a control character or no text")
    return RunOptions(
        layers=before,
        command=command,
        env=args.env,
        env_files=args.env_file,
        workdir=args.workdir,
        user=args.user,
        volumes=args.volume,
        hostname=args.hostname,
        entrypoint=args.entrypoint,
        interactive=args.interactive,
        tty=args.tty,
        keep=args.keep,
        upper=args.upper,
        read_only=args.read_only,
        store=args.store,
        cap_add=args.cap_add,
        cap_drop=args.cap_drop,
        privileged=args.privileged,
        security_opt=args.security_opt,
        preserve_fds=args.preserve_fds,
    )


def _cmd_run(args: argparse.Namespace) -> int:
    return run(parse_run_args(args))


# -- what to run: layers, image config, environment ------------------------------------------
def resolve_image(opts: RunOptions) -> tuple[list[str], dict[str, Any]]:
    """Layer dirs (top first) and the image's config (Env, Cmd, ...; {} for plain layers)."""
    if not opts.layers:
        raise _fail("no layers given: pyunion run LAYER... -- COMMAND")
    if len(opts.layers) == 1 and not os.path.isdir(opts.layers[0]):
        from . import image  # only for an image name: plain layers start faster without it

        ref = opts.layers[0]
        try:
            layers = image.resolve_layers(ref, opts.store)
            config = image.resolve_config(ref, opts.store)
        except UserError as e:
            raise _fail(str(e)) from e
        config = config or {}
        if "config" in config or "rootfs" in config:  # the whole OCI config: its runtime part
            config = config.get("config") or {}
        return list(layers), config
    for layer in opts.layers:
        if not os.path.isdir(layer):
            raise _fail(f"layer {layer!r} is not a directory")
    return [os.path.abspath(x) for x in opts.layers], {}


def _confinement_and_image(
    opts: RunOptions,
) -> tuple[confine.Confinement, list[str], dict[str, Any]]:
    """`confine.from_options` and `resolve_image`, in a short-lived child
    (`_in_child`): the seccomp profile's JSON reader (msgspec, ~1.3 MiB) and the
    image modules (~2.4 MiB) stay out of the run process, which lives as long as
    its container. Their errors in that order, as if read here."""

    def both() -> tuple[Answer, Answer]:
        from . import confine

        conf = _answer(
            lambda: confine.from_options(
                opts.cap_add, opts.cap_drop, opts.privileged, opts.security_opt, opts.preserve_fds
            )
        )
        return conf, _answer(lambda: resolve_image(opts))

    conf, image = _in_child(both)
    confinement = _answered(conf)
    layers, config = _answered(image)
    return confinement, layers, config


# What a piece of work came to: ("ok", result) or ("user", message, code) for the
# UserError it raised.
Answer = tuple[Any, ...]


def _answer(work: Callable[[], Any]) -> Answer:
    try:
        return ("ok", work())
    except UserError as e:
        return ("user", str(e), e.code)


def _answered(answer: Answer) -> Any:
    """The result, or the UserError raised again."""
    if answer[0] == "user":
        raise UserError(answer[1], answer[2])
    return answer[1]


def _in_child(work: Callable[[], T]) -> T:
    """`work()` in a short-lived forked child, its result pickled back (its UserError
    raised here): what it imports never weighs on this process."""
    import pickle

    r, w = os.pipe()
    with _forwarded_signals_blocked():  # the child's stay blocked: ours are recorded
        pid = os.fork()
        if pid == 0:
            try:
                # A collection would write to (so copy) every page of the parent's objects
                # it walks; this child lives for a few milliseconds.
                gc.disable()
                os.close(r)
                try:
                    answer = _answer(work)
                except Exception as e:  # noqa: BLE001 - raised again in the parent
                    answer = ("error", f"{type(e).__name__}: {e}")
                data = pickle.dumps(answer)
                while data:
                    data = data[os.write(w, data) :]
            finally:
                os._exit(0)
    os.close(w)
    try:
        data = syscalls.read_to_eof(r)
    finally:
        os.close(r)
        os.waitpid(pid, 0)
    if not data:
        raise _fail("a child of pyunion died reading the image or the seccomp profile")
    answer = pickle.loads(data)
    if answer[0] == "error":
        raise RuntimeError(answer[1])
    result: T = _answered(answer)
    return result


def _build_filter(conf: confine.Confinement) -> None:
    """The seccomp program (`seccomp.program`), made here while the daemon starts, and
    kept for the next container: init only loads it."""
    if conf.seccomp is None:
        return
    from . import seccomp
    from .mount import open_state_dir

    try:
        dfd: int | None = open_state_dir()
    except UserError:
        dfd = None  # mount() says what is wrong with it
    try:
        conf.compiled = seccomp.program(conf.seccomp, dfd)
    except seccomp.SeccompError as e:
        raise _fail(str(e)) from e
    finally:
        if dfd is not None:
            os.close(dfd)


def _parse_env_item(item: str, where: str) -> tuple[str, str] | None:
    key, eq, value = item.partition("=")
    if not key:
        raise _fail(f"bad environment variable {item!r} ({where})")
    if not eq:
        if key not in os.environ:
            return None
        value = os.environ[key]
    return key, value


MAX_ENV_FILE = 4 << 20  # twice what execve(2) takes for all of argv and the environment


def build_env(opts: RunOptions, config: dict[str, Any], hostname: str) -> dict[str, str]:
    """PATH and HOSTNAME, then the image's Env, then --env-file, then -e (later wins)."""
    from . import sandbox

    env = {"PATH": sandbox.DEFAULT_PATH, "HOSTNAME": hostname}
    if opts.tty:
        env["TERM"] = os.environ.get("TERM", "xterm")
    for item in config.get("Env") or []:
        key, _, value = str(item).partition("=")
        if key:
            env[key] = value
    for path in opts.env_files:
        try:
            with open(path, "rb") as f:  # a pipe too (`--env-file <(...)`), as podman
                data = f.read(MAX_ENV_FILE + 1)
        except OSError as e:
            raise _fail(f"cannot read env file {path!r}: {e.strerror}") from e
        if len(data) > MAX_ENV_FILE:  # /dev/zero: read until the machine ran out of memory
            raise _fail(f"env file {path!r} is larger than {MAX_ENV_FILE >> 20} MiB")
        try:
            lines = data.decode("utf-8").splitlines()
        except UnicodeDecodeError as e:  # a traceback before
            raise _fail(f"env file {path!r} is not UTF-8 text (byte {e.start})") from None
        for line in lines:
            line = line.strip()
            if line and not line.startswith("#"):
                kv = _parse_env_item(line, path)
                if kv:
                    env[kv[0]] = kv[1]
    for item in opts.env:
        kv = _parse_env_item(item, "-e")
        if kv:
            env[kv[0]] = kv[1]
    for key, value in env.items():
        if "\0" in key or "\0" in value:  # execve cannot pass it: init failed with a ValueError
            raise _fail(f"the environment variable {key!r} holds a NUL character")
    return env


def build_argv(opts: RunOptions, config: dict[str, Any]) -> list[str]:
    """Entrypoint + (COMMAND or the image's Cmd), as podman does."""
    if opts.entrypoint is not None:
        entry = [opts.entrypoint] if opts.entrypoint else []
    else:
        entry = list(config.get("Entrypoint") or [])
    # A new entrypoint drops the image's Cmd, as in podman.
    cmd = opts.command or ([] if opts.entrypoint is not None else list(config.get("Cmd") or []))
    argv = [str(a) for a in entry + cmd]
    if not argv:
        raise _fail("no command given: pyunion run LAYER... -- COMMAND [ARG...]")
    return argv


def parse_volumes(specs: list[str]) -> list[volumes.Volume]:
    from . import volumes

    return [volumes.parse(v) for v in specs]


def _host_etc_copies(etc_dir: str, hostname: str | None) -> dict[str, str]:
    """Copies of the host's resolv.conf, hosts and hostname (symlinks resolved), to bind in."""
    os.makedirs(etc_dir, exist_ok=True)
    out = {}
    for name in ("resolv.conf", "hosts", "hostname"):
        try:
            with open(os.path.realpath(f"/etc/{name}"), "rb") as f:
                data = f.read()
        except OSError:
            data = b""
        if name == "hostname" and hostname:
            data = hostname.encode() + b"\n"
        if name == "hosts" and hostname:
            data += f"127.0.1.1\t{hostname}\n".encode()
        path = os.path.join(etc_dir, name)
        with open(path, "wb") as f:
            f.write(data)
        os.chmod(path, 0o644)
        out[f"/etc/{name}"] = path
    return out


# -- the run itself -----------------------------------------------------------------------
class _Interrupted(Exception):
    def __init__(self, signo: int) -> None:
        super().__init__(signo)
        self.signo = signo


class Runner:
    """One `pyunion run`: the state teardown needs, wherever it is interrupted."""

    def __init__(self, opts: RunOptions) -> None:
        self.opts = opts
        self.tmp: str | None = None
        self.upper: str | None = None
        self.merged: str | None = None
        self.daemon: int | None = None
        self.init: int | None = None  # pid 1 once it goes on (signals are forwarded to it)
        self.starting: int | None = None  # pid 1 waiting for "go"
        self.go_fd = -1
        # After "go", the same socket: init's "E" asks pyunion to hold signals until
        # catatonit has blocked them (`sandbox._take_signals`); EOF: init exec'd it.
        self.go: socket.socket | None = None
        self.holding = False
        self.held: list[int] = []
        self.stopping = False  # told to stop (SIGINT, SIGTERM, SIGHUP): blocked output may go
        # stdio that is not a pipe reaches the container through pipes of ours (`_relayed_stdio`)
        self.out_pipes: dict[int, int] = {}  # our read end -> our fd 1 or 2
        self.stdin_pipe: int | None = None  # our write end, for fd 0 (-i)
        self.child_stdio: list[tuple[int, int]] = []  # (fd, the container's end) until forked
        self.mount_fd = -1  # the detached mount, until init has it
        self.tty_sock: socket.socket | None = None
        self.prefork: Prefork | None = None
        self.janitor_fd: int | None = None
        self.janitor: int | None = None
        self.pending: list[int] = []
        self.forwarded: dict[int, int] = {}
        self.master: int | None = None
        self.saved_tty: list[Any] | None = None
        self.wake_r = self.wake_w = -1
        self.report_fd = -1
        self.old_handlers: dict[int, Any] = {}
        self.layers: list[str] = []

    # signals ---------------------------------------------------------------------------
    def _on_signal(self, signo: int, frame: FrameType | None) -> None:
        if signo == signal.SIGCHLD:
            return  # only wakes the loop (set_wakeup_fd)
        if signo == signal.SIGWINCH:
            self._copy_winsize()
            return
        if self.init is None:
            self.pending.append(signo)
            return
        n = self.forwarded.get(signo, 0) + 1
        self.forwarded[signo] = n
        if signo in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            self.stopping = True
        if n > 1 and signo in (signal.SIGINT, signal.SIGTERM):
            sig: int = signal.SIGKILL  # asked twice: stop waiting for the command
        else:
            sig = signo
        if self.holding and sig != signal.SIGKILL:
            self.held.append(sig)
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.init, sig)

    def _hand_over(self) -> float:
        """Follow init's exec of catatonit; the select timeout while signals are held."""
        if self.go is not None:
            try:
                data = self.go.recv(1)
            except BlockingIOError:
                return 1.0
            except OSError:
                data = b""
            if data == b"E":
                self.holding = True
                with contextlib.suppress(OSError):
                    self.go.send(b"K")
                return 1.0
            self.go.close()  # EOF: exec'd (or init is gone)
            self.go = None
        if not self.holding:
            return 1.0
        from .sandbox import FORWARDED

        assert self.init is not None
        if not _blocks(self.init, FORWARDED):
            return 0.001  # catatonit is starting: a few hundred microseconds
        self.holding = False
        held, self.held = self.held, []
        for sig in held:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.init, sig)
        return 1.0

    def _install_handlers(self) -> None:
        from . import sandbox

        for sig in (*sandbox.FORWARDED, signal.SIGCHLD, signal.SIGWINCH):
            self.old_handlers[sig] = signal.signal(sig, self._on_signal)

    def _restore_handlers(self) -> None:
        for sig, h in self.old_handlers.items():
            with contextlib.suppress(Exception):
                signal.signal(sig, h)
        with contextlib.suppress(Exception):
            signal.set_wakeup_fd(-1)

    def _check_pending(self) -> None:
        for sig in self.pending:
            if sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
                raise _Interrupted(sig)
        self.pending.clear()  # USR1 and the like before the command exists: nobody to tell

    # setup -----------------------------------------------------------------------------
    def run(self) -> int:
        opts = self.opts
        try:
            userns.enter_rootless()  # an ordinary user: root in a user namespace of their own
        except UserError as e:
            raise _fail(str(e)) from None
        if not os.path.exists("/dev/fuse"):
            raise _fail("/dev/fuse is missing (modprobe fuse)")
        from . import confine

        # Before pyunion opens any fd: --preserve-fds checks the caller's 3..N+2 (so a
        # daemon-to-be forked first thing, whose socket is an fd of ours, goes first).
        if opts.preserve_fds:
            cancel_early()
        # The seccomp profile (JSON: msgspec, ~1.3 MiB) is read, with the image, in a
        # short-lived child once the daemon is forked (`_confinement_and_image`); here
        # only where --preserve-fds checks the caller's fds, which the child's pipe would
        # take, or where msgspec is imported already (build's RUN).
        confinement = None
        if opts.preserve_fds or "msgspec" in sys.modules:
            confinement = confine.from_options(
                opts.cap_add, opts.cap_drop, opts.privileged, opts.security_opt, opts.preserve_fds
            )
        try:
            self._prefork_daemon()
            self._install_handlers()
            return self._prepare_and_run(confinement)
        except _Interrupted as e:
            return 128 + e.signo
        finally:
            self.teardown()
            self._restore_handlers()

    def _prefork_daemon(self) -> None:
        """The daemon-to-be (`prefork.Prefork`): its imports, most of a mount's start-up,
        overlap everything up to the mount. No mount namespace is unshared here: the mount
        is detached (`mount.mount_detached`), and a copy of the host's would pin its mounts.
        None when the fork server is to fork the daemon (`PYUNION_FORKSERVER=1`, root)."""
        if forkserver_wanted():
            from . import forkserver

            if forkserver.enabled():
                return
        self.prefork = take_early() or Prefork()  # forked by the program first thing, if it could
        self.daemon = self.prefork.pid

    def _prepare_and_run(self, confinement: confine.Confinement | None) -> int:
        from . import sandbox

        opts = self.opts
        init = sandbox.find_init()
        if init is None:
            raise _fail("catatonit, the container's pid 1, is missing (apt install catatonit)")
        if confinement is None:
            confinement, layers, config = _confinement_and_image(opts)
        else:
            layers, config = resolve_image(opts)
        _build_filter(confinement)
        hostname = opts.hostname or socket.gethostname()
        spec = sandbox.ContainerSpec(
            root="",
            init=init,
            argv=build_argv(opts, config),
            env=build_env(opts, config, hostname),
            workdir=opts.workdir or config.get("WorkingDir") or None,
            user=opts.user or config.get("User") or None,
            hostname=hostname,
            binds=parse_volumes(opts.volumes),
            interactive=opts.interactive,
            tty=opts.tty,
            read_only=opts.read_only,
            confinement=confinement,
        )
        if userns.in_user_namespace():
            spec.outside = userns.outside_hint()
        if spec.workdir and not spec.workdir.startswith("/"):
            raise _fail(f"the working directory {spec.workdir!r} must be an absolute path")
        return self._run(layers, spec)

    def _run(self, layers: list[str], spec: sandbox.ContainerSpec) -> int:
        opts = self.opts
        self.layers = layers
        # The janitor first: whatever is made from here on, it removes if pyunion is killed.
        self._start_janitor()
        self.tmp = self._make_tmp()
        os.chmod(self.tmp, 0o700)
        self.merged = os.path.join(self.tmp, "merged")
        os.mkdir(self.merged)
        work = None
        if opts.upper:
            try:
                os.makedirs(opts.upper, exist_ok=True)
            except OSError as e:
                raise _fail(
                    f"cannot create the upper directory {opts.upper!r}: {e.strerror}"
                ) from None
            self.upper = os.path.abspath(opts.upper)
        else:  # with --read-only too: it holds the mount points the image lacks
            self.upper = os.path.join(self.tmp, "upper")
            work = os.path.join(self.tmp, "work")
            os.mkdir(self.upper, 0o755)
            os.mkdir(work, 0o700)
        spec.root = self.merged
        spec.etc_files = _host_etc_copies(os.path.join(self.tmp, "etc"), opts.hostname)
        # init prepares (its seccomp filter, catatonit) while the daemon mounts; it enters
        # the tree on "go".
        self._fork_init(spec)
        # nodev: podman keeps the container off device nodes with the devices cgroup; with
        # no cgroup here, a node shipped in the image (a host disk) must simply not open.
        cfg = MountConfig(
            lowers=layers,
            mountpoint=self.merged,
            upper=self.upper,
            work=work,
            fuse_options={"allow_other", "suid", "nodev"},
        )
        try:
            self.daemon, self.mount_fd = mount_detached(cfg, self.prefork)
        except UserError as e:
            # Reaped by mount once handed over; if not, teardown stops it (cancel).
            self.daemon = None
            raise _fail(str(e)) from e
        self.prefork = None
        self._check_pending()
        return self._start_and_wait(spec)

    def _start_janitor(self) -> None:
        r, w = os.pipe()
        with _forwarded_signals_blocked():
            pid = os.fork()
            if pid == 0:
                os.close(w)
                _janitor(r)
        os.close(r)
        self.janitor, self.janitor_fd = pid, w
        # What it needs besides the names told later (`_tell_janitor`).
        if self.daemon is not None:
            self._tell_janitor("D", str(self.daemon).encode())
        if self.opts.upper:
            self._tell_janitor("U", os.fsencode(os.path.abspath(self.opts.upper)))
        if self.kept():
            self._tell_janitor("K")

    def _make_tmp(self) -> str:
        """mkdtemp, but the janitor is told the name before the directory exists: a SIGKILL
        between the two can no longer leave it behind."""
        base = tempfile.gettempdir()
        while True:
            path = os.path.join(base, "pyunion-run-" + os.urandom(6).hex())
            self._tell_janitor("T", os.fsencode(path))
            try:
                os.mkdir(path, 0o700)
            except FileExistsError:
                continue  # not ours: the janitor is told the next name (the last one wins)
            return os.path.abspath(path)

    def _tell_janitor(self, kind: str, value: bytes = b"") -> None:
        """One line to the janitor (`_janitor_cleanup` reads them): "D PID" (the daemon),
        "U DIR" (--upper), "K" (keep the upper), "T DIR" (the temporary tree), "I PID"
        (init), "DONE". The value goes in hex: a path may hold any byte but NUL, and a
        newline in it (--upper, TMPDIR) made lines the janitor obeyed ("I PID": SIGKILL)."""
        if self.janitor_fd is not None:
            line = kind.encode() + (b" " + value.hex().encode() if value else b"") + b"\n"
            with contextlib.suppress(OSError):
                os.write(self.janitor_fd, line)

    def _fork_init(self, spec: sandbox.ContainerSpec) -> None:
        """Fork pid 1 of a new pid namespace (this process stays in its own); it waits
        for "go" (`_start_and_wait`) before it enters the tree."""
        child_sock = None
        if self.opts.tty:
            self.tty_sock, child_sock = socket.socketpair()
        self.report_fd, spec.report_fd = os.pipe()
        theirs, ours = socket.socketpair()  # "G" and the mount's fd (SCM_RIGHTS)
        spec.go_fd, self.go_fd = theirs.detach(), ours.detach()
        for fd, child_end, our_end in _relayed_stdio(self.opts.interactive and not self.opts.tty):
            self.child_stdio.append((fd, child_end))
            if fd == 0:
                self.stdin_pipe = our_end
            elif our_end is not None:
                self.out_pipes[our_end] = fd
        try:
            self.starting = self._fork_pid1(spec, child_sock)
        finally:
            os.close(spec.report_fd)
            os.close(spec.go_fd)
            if child_sock is not None:
                child_sock.close()
            for child_end in {end for _, end in self.child_stdio}:
                os.close(child_end)
            self.child_stdio = []
        self._tell_janitor("I", str(self.starting).encode())

    def _fork_pid1(self, spec: sandbox.ContainerSpec, child_sock: socket.socket | None) -> int:
        own = os.open("/proc/self/ns/pid", os.O_RDONLY | os.O_CLOEXEC)
        try:
            syscalls.unshare(syscalls.CLONE_NEWPID)
        except OSError as e:
            os.close(own)
            raise _fail(f"cannot create a pid namespace: {e.strerror}") from e
        from . import sandbox

        try:
            sandbox.flush_stdio()  # init is a fork: nothing buffered is written twice
            with _forwarded_signals_blocked():  # init keeps them blocked (`container_init`)
                pid = os.fork()
                if pid == 0:
                    os.close(own)
                    if self.janitor_fd is not None:
                        os.close(self.janitor_fd)
                    for fd in (self.report_fd, self.go_fd):
                        os.close(fd)
                    if self.tty_sock is not None:
                        self.tty_sock.close()
                    for fd, child_end in self.child_stdio:
                        os.dup2(child_end, fd)  # inheritable; the pipes' other fds close on exec
                    sandbox.start_init(spec, child_sock)
        finally:
            if os.getpid() != 1:
                try:
                    syscalls.setns(own, syscalls.CLONE_NEWPID)
                except PermissionError:
                    # The root of a user namespace cannot go back to the host's pid namespace
                    # (the host's root owns it): our later children would land in the
                    # container's, so pyunion forks nothing after init (teardown never does).
                    if not userns.in_user_namespace():
                        raise
                os.close(own)
        return pid

    def _start_and_wait(self, spec: sandbox.ContainerSpec) -> int:
        """The tree is mounted: let init go on, then supervise it."""
        opts = self.opts
        stdin_tty = os.isatty(0)
        self.wake_r, self.wake_w = os.pipe()
        for fd in (self.wake_r, self.wake_w):
            os.set_blocking(fd, False)
        signal.set_wakeup_fd(self.wake_w, warn_on_full_buffer=False)
        go, self.go_fd = socket.socket(fileno=self.go_fd), -1
        with contextlib.suppress(OSError):  # init died early: its status tells
            socket.send_fds(go, [b"G"], [self.mount_fd])
        go.setblocking(False)
        self.go = go
        self._close_mount()  # init's now: the mount lives as long as the container's namespace
        self.init, self.starting = self.starting, None
        parent_sock, self.tty_sock = self.tty_sock, None
        pending, self.pending = self.pending, []
        for sig in pending:  # arrived while forking: the command gets them now
            self._on_signal(sig, None)
        if parent_sock is not None:
            with parent_sock:
                _, fds, _, _ = socket.recv_fds(parent_sock, 16, 1)
            if fds:
                self.master = fds[0]
                self._copy_winsize()
                if stdin_tty and opts.interactive:
                    self.saved_tty = termios.tcgetattr(0)
                    ttymod.setraw(0, termios.TCSANOW)  # TCSAFLUSH would drop typed-ahead input
        return self._supervise()

    def _copy_winsize(self) -> None:
        if self.master is None or not os.isatty(0):
            return
        with contextlib.suppress(OSError):
            size = fcntl.ioctl(0, termios.TIOCGWINSZ, b"\0" * 8)
            fcntl.ioctl(self.master, termios.TIOCSWINSZ, size)

    def _supervise(self) -> int:
        """Wait for init; meanwhile relay the pty (-t) or the stdio pipes, and let handlers
        forward signals."""
        assert self.init is not None
        master = self.master
        # Where our stdin goes: the pty, or the pipe that stands for a non-pipe stdin (-i).
        sink = master if master is not None else self.stdin_pipe
        read_stdin = sink is not None and self.opts.interactive
        to_sink = b""
        eof_sent = False
        outputs = self._outputs()
        if master is not None:
            outputs[master] = _dest(1)
        for fd in (*outputs, *([sink] if sink is not None else [])):
            os.set_blocking(fd, False)
        while True:
            pid, status = os.waitpid(self.init, os.WNOHANG)
            if pid == self.init:
                self.init = None
                break
            timeout = self._hand_over()
            rlist = [self.wake_r, *outputs]
            if self.go is not None:
                rlist.append(self.go.fileno())
            wlist = [sink] if sink is not None and to_sink else []
            if read_stdin and not to_sink:
                rlist.append(0)
            try:
                readable, writable, _ = select.select(rlist, wlist, [], timeout)
            except InterruptedError:
                continue
            if self.wake_r in readable:
                with contextlib.suppress(BlockingIOError):
                    os.read(self.wake_r, 4096)
            for fd in [fd for fd in outputs if fd in readable]:
                if not _pump(fd, outputs[fd], self._giving_up):
                    self._output_ended(fd, outputs)
            if 0 in readable:
                try:
                    data = os.read(0, 65536)
                except OSError:  # EIO: our terminal hung up; SIGHUP is on its way
                    data = b""
                if data:
                    to_sink += data
                else:
                    read_stdin = False
                    if sink is master and not eof_sent:
                        to_sink += b"\x04"  # stdin ended: ^D to the terminal
                        eof_sent = True
                    elif sink is not master and sink is not None:
                        self._close_stdin_pipe()  # the command reads its end of file
                        sink = None
            if sink is not None and sink in writable and to_sink:
                try:
                    n = os.write(sink, to_sink)
                    to_sink = to_sink[n:]
                except BlockingIOError:
                    pass
                except OSError:  # the command closed its stdin
                    to_sink = b""
                    read_stdin = False
        self._drain(outputs)  # what the command wrote just before exiting
        from . import sandbox

        return sandbox.exit_code(status)

    def _outputs(self) -> dict[int, _Dest]:
        """Our read end of each output pipe -> where it is copied to."""
        return {src: _dest(fd) for src, fd in self.out_pipes.items()}

    def _drain(self, outputs: dict[int, _Dest]) -> None:
        """Copy what is left in the output pipes (and pty) until their end: every writer
        is in the container, which is gone or going (2 s without anything to read: one
        lives on outside, and is left)."""
        deadline = time.monotonic() + 2.0
        while outputs and time.monotonic() < deadline:
            r, _, _ = select.select(list(outputs), [], [], 0.1)
            if not r and all(fd not in self.out_pipes for fd in outputs):
                break  # only the pty, and quiet
            if r:
                deadline = time.monotonic() + 2.0
            for fd in r:
                if not _pump(fd, outputs[fd], self._giving_up):
                    self._output_ended(fd, outputs)

    def _output_ended(self, fd: int, outputs: dict[int, _Dest]) -> None:
        """SRC ended, or its destination failed: close our end, so the command's writes fail
        (EPIPE) instead of vanishing."""
        del outputs[fd]
        if fd in self.out_pipes:
            del self.out_pipes[fd]
            with contextlib.suppress(OSError):
                os.close(fd)

    def _giving_up(self) -> bool:
        """Output that cannot be written may be dropped: we are told to stop."""
        return self.stopping

    def _close_stdin_pipe(self) -> None:
        if self.stdin_pipe is not None:
            with contextlib.suppress(OSError):
                os.close(self.stdin_pipe)
            self.stdin_pipe = None

    # teardown ----------------------------------------------------------------------------
    def teardown(self) -> None:
        """Undo everything, in order, whatever state the run reached."""
        if self.saved_tty is not None:
            with contextlib.suppress(termios.error):
                termios.tcsetattr(0, termios.TCSADRAIN, self.saved_tty)
            self.saved_tty = None
        if self.go_fd >= 0:
            os.close(self.go_fd)  # init never went on
            self.go_fd = -1
        if self.go is not None:
            self.go.close()
            self.go = None
        if self.tty_sock is not None:
            self.tty_sock.close()
            self.tty_sock = None
        for pid in (self.init, self.starting):
            if pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)  # pid 1 dies: the kernel kills the rest
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(pid, 0)
        self.init = self.starting = None
        if self.out_pipes:  # init's own last words, when it failed before supervising
            self._drain(self._outputs())
            for fd in self.out_pipes:
                os.close(fd)
            self.out_pipes = {}
        self._close_stdin_pipe()
        if self.prefork is not None:  # no mount was handed to it
            self.prefork.cancel()
            self.prefork = None
            self.daemon = None  # reaped
        if self.master is not None:
            with contextlib.suppress(OSError):
                os.close(self.master)
            self.master = None
        # The wakeup fd is unset before its pipe is closed: a signal in between (the
        # daemon's SIGCHLD) would have the interpreter write to a closed fd and print
        # "Exception ignored ... Bad file descriptor" on the user's terminal.
        with contextlib.suppress(Exception):
            signal.set_wakeup_fd(-1)
        for fd in (self.wake_r, self.wake_w):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self.wake_r = self.wake_w = -1
        self._close_mount()  # never handed to init: it goes now
        created = self._created_mount_points()  # init is gone: its report is complete
        _release(self.merged, self.daemon, self.tmp, self.upper, self.kept(), self.opts.quiet)
        if self.kept() and self.upper is not None and os.path.isdir(self.upper):
            _drop_placeholders(self.upper, self.layers, created)
        self._tell_janitor("DONE")
        if self.janitor_fd is not None:
            os.close(self.janitor_fd)
            self.janitor_fd = None
        if self.janitor is not None:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(self.janitor, 0)  # it exits at once on DONE
            self.janitor = None

    def _close_mount(self) -> None:
        if self.mount_fd >= 0:
            os.close(self.mount_fd)
            self.mount_fd = -1

    def _created_mount_points(self) -> list[str]:
        if self.report_fd < 0:
            return []
        data = b""
        with contextlib.suppress(OSError):
            os.set_blocking(self.report_fd, False)
            while chunk := os.read(self.report_fd, 65536):
                data += chunk
        os.close(self.report_fd)
        self.report_fd = -1
        return data.decode(errors="surrogateescape").split()

    def kept(self) -> bool:
        return self.opts.keep or bool(self.opts.upper)


def _release(
    merged: str | None,
    daemon: int | None,
    tmp: str | None,
    upper: str | None,
    keep: bool,
    quiet: bool = False,
) -> None:
    """Make sure the daemon is gone, remove the temporary tree (minus a kept upper).

    Nothing to unmount: the union is a detached mount, attached only in the container's
    namespace, and it ends with that namespace (and every fd of it)."""
    if daemon is not None:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(daemon, os.WNOHANG)  # ours when we forked it; reap the zombie
        if not wait_gone(daemon, 5):
            with contextlib.suppress(ProcessLookupError):
                os.kill(daemon, signal.SIGTERM)
            if not wait_gone(daemon, 5):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(daemon, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(daemon, os.WNOHANG)
    if tmp is None:
        return
    if merged is not None and is_mountpoint(merged):
        print(f"pyunion: {merged} is still mounted; leaving {tmp}", file=sys.stderr)
        return
    # The container wrote what is in the upper: however deep, whatever its symlinks, it is
    # removed through fds (tree.py), never by following a path it could have changed.
    try:
        if keep and upper is not None and upper == os.path.join(tmp, "upper"):
            fd = os.open(tmp, tree.DIR_FLAGS)
            try:
                for name in os.listdir(fd):
                    if name != "upper":
                        tree.rmtree_at(fd, name)
            finally:
                os.close(fd)
        else:
            tree.rmtree(tmp)
    except FileNotFoundError:
        pass  # killed between telling the janitor its name and making it (`_make_tmp`)
    except OSError as e:
        print(f"pyunion: cannot remove {tmp}: {e.strerror}", file=sys.stderr)
    if keep and upper is not None and not quiet:
        print(f"pyunion: the writable layer is kept in {upper}", file=sys.stderr)


def _drop_placeholders(upper: str, lowers: list[str], created: list[str]) -> None:
    """Remove from a kept upper the empty mount points init created (deepest first).

    Only what is still an empty file or directory and exists in no lower layer, so
    removing it from the upper cannot change what the layers below show. The
    container may have replaced any directory on the way with a symlink to the
    host's tree: every path is walked from the upper's fd one name at a time,
    never following a symlink.
    """
    try:  # the upper's own path is the user's choice; what is inside is the container's
        ufd = os.open(upper, tree.DIR_FLAGS & ~os.O_NOFOLLOW)
    except OSError:
        return
    lfds: list[int] = []
    try:
        for low in lowers:
            with contextlib.suppress(OSError):
                lfds.append(os.open(low, tree.DIR_FLAGS))
        for path in sorted(set(created), key=lambda p: p.count("/"), reverse=True):
            rel = os.fsencode(os.path.normpath(path.strip("/")))
            if (
                not rel
                or rel == b"."
                or rel.startswith(b"..")
                or any(_in_layer(fd, rel) for fd in lfds)
            ):
                continue
            parent, name = os.path.split(rel)
            try:
                pfd = tree.open_rel(ufd, parent)
            except OSError:  # a symlink or a file on the way: not ours any more
                continue
            with contextlib.suppress(OSError):
                try:
                    st = os.stat(name, dir_fd=pfd, follow_symlinks=False)
                    if stat.S_ISDIR(st.st_mode):
                        os.rmdir(name, dir_fd=pfd)  # only when empty
                    elif stat.S_ISREG(st.st_mode) and st.st_size == 0:
                        os.unlink(name, dir_fd=pfd)
                finally:
                    os.close(pfd)
    finally:
        for fd in (ufd, *lfds):
            os.close(fd)


def _in_layer(layer_fd: int, rel: bytes) -> bool:
    """Whether a lower layer has `rel` (a symlink or a file on the way counts as yes: be
    conservative, the path is then not a plain placeholder)."""
    parent, name = os.path.split(rel)
    try:
        pfd = tree.open_rel(layer_fd, parent)
    except FileNotFoundError:
        return False
    except OSError:
        return True
    try:
        os.stat(name, dir_fd=pfd, follow_symlinks=False)
        return True
    except FileNotFoundError:
        return False
    except OSError:
        return True
    finally:
        os.close(pfd)


@dataclass
class _Dest:
    """Where relayed output goes, looked at once: a regular file takes splice(2) until it
    refuses (O_APPEND); anything else gets pieces it can take at once."""

    fd: int
    regular: bool
    piece: int  # bytes per write to a terminal, FIFO or device
    splice: bool


def _dest(fd: int) -> _Dest:
    regular = stat.S_ISREG(os.fstat(fd).st_mode)
    return _Dest(fd, regular, 256 if os.isatty(fd) else 4096, regular)


def _pump(src: int, dst: _Dest, giving_up: Callable[[], bool]) -> bool:
    """Copy what SRC has to DST; False at SRC's end (EOF, or EIO: every pty slave closed)
    or when DST failed, which is said in one line (but EPIPE: the reader left). The
    caller then closes SRC, so that the command's next write fails as it would have
    on DST itself (EPIPE, SIGPIPE) rather than its output vanishing.

    A regular file takes it by splice(2), without a copy through us. A terminal, FIFO
    or device is waited for (select) and written in pieces it can take at once, so a
    reader that stops (a terminal nobody reads) never blocks pyunion past a signal to
    stop: once `giving_up()` and DST still takes nothing for 0.2 s, the rest is dropped.
    """
    if dst.splice:
        try:
            return os.splice(src, dst.fd, 1 << 20) > 0
        except BlockingIOError:
            return True  # SRC is empty
        except OSError as e:
            if e.errno != errno.EINVAL:
                return _output_failed(e)
            dst.splice = False  # not a pipe, or O_APPEND: read and write below
    try:
        data = os.read(src, 65536)
    except BlockingIOError:
        return True
    except OSError:
        return False
    if not data:
        return False
    view = memoryview(data)
    piece = len(view) if dst.regular else dst.piece
    while view:
        if not dst.regular:
            _, ready, _ = select.select([], [dst.fd], [], 0.2)
            if not ready:
                if giving_up():
                    break
                continue
        try:
            n = os.write(dst.fd, view[:piece])
        except BlockingIOError:
            continue
        except OSError as e:
            return _output_failed(e)
        view = view[n:]
    return True


def _output_failed(e: OSError) -> bool:
    if e.errno != errno.EPIPE:
        with contextlib.suppress(OSError):
            os.write(2, f"pyunion: cannot write the container's output: {e.strerror}\n".encode())
    return False


def _relayed_stdio(interactive: bool) -> list[tuple[int, int, int | None]]:
    """(our fd, the container's end, our end) for each stdio fd that is not an anonymous
    pipe or a socket: a file, a named FIFO, a terminal or a device reaches the container
    as a pipe of ours. stderr on the same file as stdout shares its pipe (our end None),
    so that their order stays the command's.

    An fd passed as is gives the container's root its inode: /proc/self/fd/1 of a
    `> host-file` could be chmod'ed or chown'ed, a `< file` reopened for writing,
    /dev/null or the caller's terminal made world-writable. An anonymous pipe's or a
    socket's inode is nobody's. podman puts conmon's pipes there for the same reason.
    """
    probe_r, probe_w = os.pipe()
    pipefs = os.fstat(probe_r).st_dev
    os.close(probe_r)
    os.close(probe_w)
    out: list[tuple[int, int, int | None]] = []
    seen: dict[tuple[int, int], int] = {}  # (st_dev, st_ino) -> the container's end
    for fd in (0, 1, 2) if interactive else (1, 2):
        try:
            st = os.fstat(fd)
        except OSError:
            continue
        if stat.S_ISSOCK(st.st_mode) or (stat.S_ISFIFO(st.st_mode) and st.st_dev == pipefs):
            continue
        if fd == 2 and (st.st_dev, st.st_ino) in seen:
            out.append((2, seen[st.st_dev, st.st_ino], None))
            continue
        r, w = os.pipe2(os.O_CLOEXEC)
        out.append((fd, r, w) if fd == 0 else (fd, w, r))
        if fd == 1:
            seen[st.st_dev, st.st_ino] = w
    return out


def _blocks(pid: int, sigs: tuple[int, ...]) -> bool:
    """Whether process PID blocks all of SIGS (its /proc status; gone: nothing to wait for)."""
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"SigBlk:"):
                    mask = int(line.split()[1], 16)
                    return all(mask >> (sig - 1) & 1 for sig in sigs)
    except OSError:
        pass
    return True


@contextlib.contextmanager
def _forwarded_signals_blocked() -> Iterator[None]:
    """Around a fork: the child starts with the signals pyunion forwards blocked, so that
    none becomes a KeyboardInterrupt (a traceback, or a return into pyunion's code)
    before it has set itself up; init keeps them blocked across its exec and until it
    hands them over to catatonit (`sandbox._take_signals`), the janitor ignores them.
    The parent gets what came meanwhile once they are unblocked."""
    from .sandbox import FORWARDED

    old = signal.pthread_sigmask(signal.SIG_BLOCK, FORWARDED)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


# The janitor waits for the container's whole life, so it is a shell reading its pipe
# (fd 0) rather than a fork of pyunion: a forked interpreter kept ~2.5 MiB of private
# pages per container (those either process wrote after the fork). Only when pyunion
# died without saying DONE after making something (a "T" line) does it start Python to
# clean up (`_janitor_cleanup`). $0: the interpreter, $1: the code, $2: its sys.path[0].
_JANITOR_SH = """
lines=
while IFS= read -r line; do
  [ "$line" = DONE ] && exit 0
  lines="$lines$line
"
done
case "$lines" in
  "T "*|*"
T "*) exec "$0" -I -c "$1" "$2" "$lines" ;;
esac
"""
_JANITOR_PY = (
    "import sys; sys.path.insert(0, sys.argv[1]); "
    "from unionfs.run import _janitor_cleanup; _janitor_cleanup(sys.argv[2])"
)


def _janitor(rfd: int) -> NoReturn:
    """The forked janitor: cut off from pyunion (its session, fds, the signals it
    forwards), it becomes the shell `_JANITOR_SH`, reading its pipe until EOF. Where no
    shell runs, it reads and cleans up itself."""
    code = 0
    try:
        from .sandbox import FORWARDED

        for sig in (*FORWARDED, signal.SIGWINCH):
            signal.signal(sig, signal.SIG_IGN)  # inherited by the shell and its Python
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_SETMASK, [])
        os.setsid()
        # Its Python runs as the caller (root) in isolated mode (-I) from / : nothing
        # is imported from the caller's working directory, which others may write.
        os.chdir("/")
        os.dup2(rfd, 0)
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, 1)
        syscalls.close_range(3)  # hold nothing of pyunion's or its caller's (stderr stays)
        package_parent = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        with contextlib.suppress(OSError):
            os.execv(
                "/bin/sh", ["sh", "-c", _JANITOR_SH, sys.executable, _JANITOR_PY, package_parent]
            )
        _janitor_cleanup(os.fsdecode(syscalls.read_to_eof(0)))
    except BaseException:  # noqa: BLE001 - a forked child must never return into pyunion
        code = 1
    os._exit(code)


def _janitor_cleanup(told: str) -> None:
    """Undo what pyunion made and told the janitor of (`Runner._tell_janitor`) but could
    not undo itself: it died (SIGKILL, OOM) before DONE."""
    daemon = tmp = upper = None
    keep = False
    init: list[int] = []
    for line in os.fsencode(told).split(b"\n"):
        kind, _, hexed = line.partition(b" ")
        if kind == b"DONE":
            return
        try:
            value = bytes.fromhex(hexed.decode("ascii"))
        except ValueError:  # not a line `Runner._tell_janitor` wrote
            continue
        if kind in (b"I", b"D") and value.isdigit():
            if kind == b"I":
                init.append(int(value))
            else:
                daemon = int(value)
        elif kind == b"T" and value:  # the last one wins (`Runner._make_tmp`)
            tmp = os.fsdecode(value)
        elif kind == b"U" and value:
            upper = os.fsdecode(value)
        elif kind == b"K":
            keep = True
    for pid in init:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        wait_gone(pid, 10)
    merged = None
    if tmp is not None:
        merged = os.path.join(tmp, "merged")
        upper = upper or os.path.join(tmp, "upper")
    _release(merged, daemon, tmp, upper, keep)


def run(opts: RunOptions) -> int:
    """Run one container; returns the exit code (raises UserError with code 125).

    Meant for the `pyunion run` process itself: it installs signal handlers while
    it runs, and in a user namespace it cannot fork after init (`_fork_pid1`).
    """
    return Runner(opts).run()
