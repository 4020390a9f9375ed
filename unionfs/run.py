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
   attaches in its own namespace; forward signals to it, relay a pty for `-t`
   (`supervise.Supervisor`: once the container has run a moment, the `pyunion
   run` program re-executes itself into a lean interpreter that does only this
   and the teardown);
5. teardown, always: kill what is left of the container (the mount goes with its
   namespace; one init never got is closed), wait for the daemon (stop it if it
   lingers: only its pid), remove the temporary upper
   unless `--keep`/`--upper`, through fds (`tree.py`): the container wrote it.

Exit codes follow podman/docker: the command's own, 125 when pyunion fails,
126 cannot execute or invoke (a user, group or working directory the image lacks),
127 not found, 128+N killed by signal N.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import re
import signal
import socket
import sys
import termios
import time
import tty as ttymod
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from types import FrameType
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

from . import cgroups, procfs, rlimits, syscalls, userns
from .errors import UserError
from .mount import mount_detached, say_once
from .options import MountConfig
from .prefork import Prefork, cancel_early, forkserver_wanted, take_early
from .supervise import FORWARDED, HANDLED, Supervisor, janitor_cleanup
from .tree import open_trusted, private_dir, reachable_by_others, read_named

if TYPE_CHECKING:
    from . import confine, sandbox, volumes

# sandbox, volumes and the image store are imported once the daemon is forked
# (`Runner._prefork_daemon`): the parent imports them while the daemon imports pyfuse3
# and trio. Imported before, the daemon would wait for them too.

TOOL_ERROR = 125
T = TypeVar("T")
# How long the container runs before the run process becomes a lean supervisor
# (`Supervisor.exec_self`).
SUPERVISOR_AFTER = 0.2


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
    env_host: bool = False  # --env-host: the caller's environment, under the image's Env
    http_proxy: bool = True  # the caller's proxy variables, as podman's --http-proxy
    workdir: str | None = None
    user: str | None = None
    volumes: list[str] = field(default_factory=list)
    tmpfs: list[str] = field(default_factory=list)
    mounts: list[str] = field(default_factory=list)  # --mount type=bind|tmpfs,...
    shm_size: int | None = None  # --shm-size in bytes (None: podman's 64000k)
    # --device HOST[:CONTAINER[:PERMS]], checked (`check_device`): (host node, container path)
    devices: list[tuple[str, str]] = field(default_factory=list)
    group_add: list[str] = field(default_factory=list)
    ulimits: list[str] = field(default_factory=list)
    name: str | None = None  # --name: on the container's line of /etc/hosts
    add_hosts: list[str] = field(default_factory=list)  # --add-host NAME:IP
    hostname: str | None = None
    network: str = "none"  # NETWORK_MODES
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
    pids_limit: int | None = None  # None: podman's default where there is a pids controller
    memory: int | None = None  # --memory and the others: `cgroups.Limits`
    memory_swap: int | None = None  # -1: unlimited
    memory_reservation: int | None = None
    cpus: float | None = None
    cpu_shares: int | None = None
    quiet: bool = False  # no notice that the writable layer is kept (programmatic callers)
    # TERM unless the image sets one: podman's (containers.conf's default env, -t or not:
    # podman's terminal relay speaks xterm whatever the caller's is); None for none, as
    # buildah's RUN.
    term: str | None = "xterm"
    # Make the working directory when the tree lacks it: the image's WorkingDir (and a
    # build's WORKDIR) are, `-w` is not (podman: "workdir does not exist", 126).
    make_workdir: bool = False
    # Become a lean supervisor once the container runs (`Supervisor.exec_self`): the
    # `pyunion run` program only, never a caller's process, which must go on.
    lean_supervisor: bool = False


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
    p.add_argument(
        "--env-host",
        action="store_true",
        help="pass pyunion's whole environment (the image's Env and -e override it)",
    )
    p.add_argument(
        "--http-proxy",
        nargs="?",
        const="true",
        default="true",
        choices=("true", "false"),
        help="pass pyunion's http_proxy, https_proxy, ftp_proxy and no_proxy (also upper "
        "case) on to the command (default true)",
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
    p.add_argument(
        "--tmpfs",
        action="append",
        default=[],
        metavar="CONTAINER[:OPTIONS]",
        help="mount a tmpfs (nosuid, nodev; the image's content there copied in); OPTIONS: "
        "ro, rw, size=, mode=, nr_inodes=, exec, noexec, suid, dev, notmpcopyup",
    )
    p.add_argument(
        "--mount",
        action="append",
        default=[],
        metavar="type=bind|tmpfs,...",
        help="a bind (source=,target=,readonly,bind-nonrecursive) or a tmpfs (target=, "
        "tmpfs-size=, tmpfs-mode=), podman's long form of -v and --tmpfs",
    )
    p.add_argument(
        "--device",
        action="append",
        default=[],
        metavar="HOST[:CONTAINER[:PERMS]]",
        help="add a host device node to the container (/dev/fuse, /dev/net/tun, ...)",
    )
    p.add_argument(
        "--shm-size",
        type=_ram_size,
        default=None,
        metavar="SIZE",
        help="the size of /dev/shm (bytes, or with b, k, m, g; default 64000k, as podman)",
    )
    p.add_argument(
        "--group-add",
        action="append",
        default=[],
        metavar="GROUP",
        help="add a supplementary group (name from the image's /etc/group, or number)",
    )
    p.add_argument(
        "--ulimit",
        action="append",
        default=[],
        metavar="NAME=SOFT[:HARD]",
        help="set a resource limit of the command (nofile, nproc, core, ...; -1: unlimited)",
    )
    p.add_argument(
        "--hostname",
        help="the container's host name (default: 12 hex digits; the host's with --network host)",
    )
    p.add_argument("--name", help="the container's name, given beside its host name in /etc/hosts")
    p.add_argument(
        "--add-host",
        action="append",
        default=[],
        metavar="NAME:IP",
        help="add a line to the container's /etc/hosts",
    )
    p.add_argument(
        "--rm",
        action="store_true",
        help="remove the container when it exits (always done: for podman's command lines)",
    )
    p.add_argument(
        "--init",
        action="store_true",
        help="an init as pid 1 (always: catatonit; for podman's command lines)",
    )
    p.add_argument(
        "--network",
        "--net",
        metavar="MODE",
        help="none (default): a network namespace of its own with only the loopback; "
        "host: the host's network; ns:PATH: join the network namespace at PATH",
    )
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
    p.add_argument(
        "--pids-limit",
        type=int,
        default=None,
        metavar="N",
        help=f"at most N processes in the container (default {cgroups.DEFAULT_PIDS_LIMIT}, "
        "where the pids cgroup controller is; rootless: in a delegated cgroup; "
        "0 or -1: no limit)",
    )
    p.add_argument(
        "-m",
        "--memory",
        type=str,
        default=None,
        metavar="SIZE",
        help="memory limit (b, k, m, g; at least 6m): past it the kernel kills the "
        "container's largest process (exit 137 when it is the command)",
    )
    p.add_argument(
        "--memory-swap",
        type=str,
        default=None,
        metavar="SIZE",
        help="memory plus swap limit (default twice --memory; -1: unlimited swap)",
    )
    p.add_argument(
        "--memory-reservation",
        type=str,
        default=None,
        metavar="SIZE",
        help="memory soft limit (memory.low on cgroup v2)",
    )
    p.add_argument(
        "--cpus",
        type=str,
        default=None,
        metavar="N",
        help="at most N CPUs' time (a fraction too: cpu.max quota per 100000 us period)",
    )
    p.add_argument(
        "--cpu-shares",
        type=str,
        default=None,
        metavar="N",
        help="relative CPU weight, 2 to 262144 (default 1024; a cpu.weight on cgroup v2)",
    )


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "run",
        help="run a command in a union of layers (a throw-away container)",
        usage="pyunion run [OPTIONS] LAYER... [-- COMMAND [ARG...]]",
        description="Mount the layers (TOP FIRST, or one image name) under a fresh writable "
        "layer, run COMMAND chroot'd in the merged tree with private mount, pid, "
        "uts, ipc and network namespaces (--network host: the host's network), then "
        "unmount and throw the writable layer away. "
        "Exit status: the command's; 125 pyunion failed (or a bad option); 126 cannot "
        "execute (or no such user, group or working directory); 127 not found; 128+N "
        "killed by signal N.",
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
CONTAINER_NAME = re.compile("[a-zA-Z0-9][a-zA-Z0-9_.-]*", re.ASCII)  # podman's rule for --name
# none: a network namespace of the container's own, only its loopback up (podman's
# `--network none`); host: the host's network, its localhost and abstract Unix sockets;
# ns:PATH (run only): join the network namespace at PATH (`ip netns`'s, /proc/PID/ns/net).
NETWORK_MODES = ("none", "host")
DEFAULT_NETWORK = "none"


def check_add_host(item: str) -> tuple[str, str]:
    """`--add-host NAME:IP` as (NAME, IP): split at the first colon (an IPv6 address has
    more), the address checked, the name one word of printable text."""
    import ipaddress

    name, _, ip = item.partition(":")
    try:
        ipaddress.ip_address(ip)
    except ValueError:
        raise _fail(f"--add-host {item!r}: expected NAME:IP with an IPv4 or IPv6 address") from None
    if not name or not name.isprintable() or any(c.isspace() for c in name):
        raise _fail(f"--add-host {item!r}: the name must be one word")
    return name, ip


def _ram_size(text: str) -> int:
    """docker's RAMInBytes (podman's --shm-size): a number, maybe with a fraction, and a
    binary unit b, k, m, g, t (also kb, mb, ...; any case)."""
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([bkmgt]?)b?", text.strip().lower(), re.ASCII)
    if m is None or len(m[1]) > 20:
        raise argparse.ArgumentTypeError(f"{text!r} is no size (a number, maybe with k, m, g)")
    return int(float(m[1]) * 1024 ** " kmgt".index(m[2] or " ") if m[2] != "b" else float(m[1]))


def _option_value(option: str, text: str | None, parse: Callable[[str], T]) -> T | None:
    """A resource option's value, or one line and 125 (podman's) when it is none: not
    argparse's usage and error."""
    if text is None:
        return None
    try:
        return parse(text)
    except argparse.ArgumentTypeError as e:
        raise _fail(f"{option}: {e}") from None
    except ValueError:
        raise _fail(f"{option}: {text!r} is no number") from None


def limits_of(opts: RunOptions) -> cgroups.Limits:
    """The resource options as `cgroups.Limits`, checked as podman checks them: when the
    options are read (nothing started) and again when the group is made (a caller's
    own `RunOptions`)."""
    limits = cgroups.Limits(
        pids=opts.pids_limit,
        memory=opts.memory,
        memory_swap=opts.memory_swap,
        memory_reservation=opts.memory_reservation,
        cpus=opts.cpus,
        cpu_shares=opts.cpu_shares,
    )
    why = limits.check()
    if why is not None:
        raise _fail(why)
    return limits


def _swap_size(text: str) -> int:
    """--memory-swap: a size (`_ram_size`) or -1, unlimited swap."""
    return -1 if text.strip() == "-1" else _ram_size(text)


def check_device(spec: str) -> tuple[str, str]:
    """`--device HOST[:CONTAINER[:PERMS]]` checked: HOST a device node (symlinks
    followed, as podman), CONTAINER absolute, PERMS of r, w and m. podman's devices
    cgroup can restrict a node to reading; there is none here, so PERMS must allow
    reading and writing."""
    import stat

    host, _, rest = spec.partition(":")
    target, _, perms = rest.partition(":")
    if not target.startswith("/") and set(target) <= set("rwm") and target and not perms:
        target, perms = "", target  # HOST:PERMS
    from .tree import open_trusted

    try:
        fd = open_trusted(host, os.O_PATH)  # no symlink of another user's followed
        try:
            st = os.fstat(fd)
            real = os.readlink(syscalls.fd_str(fd))
        finally:
            os.close(fd)
    except OSError as e:
        raise _fail(f"--device {spec!r}: {host!r}: {e.strerror}") from None
    if not host.startswith("/") or not (stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode)):
        raise _fail(f"--device {spec!r}: {host!r} is not a device node")
    if target and (not target.startswith("/") or os.path.normpath(target) == "/"):
        raise _fail(f"--device {spec!r}: the container path must be absolute")
    if not set(perms) <= set("rwm") or (perms and not {"r", "w"} <= set(perms)):
        raise _fail(
            f"--device {spec!r}: PERMS must be rw or rwm (pyunion has no devices cgroup to "
            "restrict a node to reading or writing)"
        )
    return real, target or host


def check_network(mode: str, ns_path: bool = False) -> str:
    """MODE if pyunion has that network mode (with `ns_path`, ns:PATH too), else a
    one-line error (exit 125, run's and build's)."""
    if ns_path and mode.startswith("ns:"):
        if not mode[3:].startswith("/"):
            raise UserError(f"--network: {mode!r}: ns: takes an absolute path", TOOL_ERROR)
        return mode
    if mode not in NETWORK_MODES:
        more = ", host or ns:PATH" if ns_path else " or host"
        raise UserError(
            f"--network: unsupported network mode {mode!r} (none{more}: pyunion makes no "
            "bridge, slirp4netns or pasta network)",
            TOOL_ERROR,
        )
    return mode


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
    if args.rm and (args.keep or args.upper):
        raise _fail("--rm throws the writable layer away, --keep and --upper keep it")
    if args.name is not None and not CONTAINER_NAME.fullmatch(args.name):
        raise _fail(f"--name {args.name!r}: names must match [a-zA-Z0-9][a-zA-Z0-9_.-]*")
    for item in args.add_host:
        check_add_host(item)
    host = args.hostname
    if host and len(os.fsencode(host)) > HOST_NAME_MAX:
        # sethostname(2) refused it, and the container kept the host's name unsaid.
        raise _fail(f"--hostname: {host!r} is longer than {HOST_NAME_MAX} bytes")
    if host and not (host.isprintable() and " " not in host):
        # Bytes that are no UTF-8 (a UnicodeEncodeError traceback writing /etc/hostname);
        # a newline, tab or space wrote lines and names of its own into /etc/hosts.
        raise _fail(f"--hostname: {host!r} holds a space, a control character or no text")
    opts = RunOptions(
        layers=before,
        command=command,
        env=args.env,
        env_files=args.env_file,
        env_host=args.env_host,
        http_proxy=args.http_proxy == "true",
        workdir=args.workdir,
        user=args.user,
        volumes=args.volume,
        tmpfs=args.tmpfs,
        mounts=args.mount,
        shm_size=args.shm_size,
        devices=[check_device(d) for d in args.device],
        group_add=args.group_add,
        ulimits=args.ulimit,
        name=args.name,
        add_hosts=args.add_host,
        hostname=args.hostname,
        network=check_network(args.network or DEFAULT_NETWORK, ns_path=True),
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
        pids_limit=args.pids_limit,
        memory=_option_value("--memory", args.memory, _ram_size),
        memory_swap=_option_value("--memory-swap", args.memory_swap, _swap_size),
        memory_reservation=_option_value(
            "--memory-reservation", args.memory_reservation, _ram_size
        ),
        cpus=_option_value("--cpus", args.cpus, float),
        cpu_shares=_option_value("--cpu-shares", args.cpu_shares, int),
    )
    limits_of(opts)  # a bad combination: before anything is started
    return opts


def _cmd_run(args: argparse.Namespace) -> int:
    opts = parse_run_args(args)
    opts.lean_supervisor = getattr(args, "program", False)
    return run(opts)


# -- what to run: layers, image config, environment ------------------------------------------
def resolve_image(opts: RunOptions) -> tuple[list[str], dict[str, Any]]:
    """Layer dirs (top first) and the image's config (Env, Cmd, ...; {} for plain layers)."""
    if not opts.layers:
        raise _fail("no layers given: pyunion run LAYER... -- COMMAND")
    if is_image_name(opts.layers):
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


# What podman's --http-proxy (on by default) takes from the caller's environment.
PROXY_VARIABLES = frozenset(
    name
    for base in ("http_proxy", "https_proxy", "ftp_proxy", "no_proxy")
    for name in (base, base.upper())
)
MAX_ENV_FILE = 4 << 20  # twice what execve(2) takes for all of argv and the environment


def default_hostname(network: str) -> str:
    """The host's name with the host's network; otherwise 12 hex digits of its own, as
    podman names such a container after its ID: the host's name is not given away, and a
    shell's prompt tells the container from the host."""
    return socket.gethostname() if network == "host" else os.urandom(6).hex()


def is_image_name(layers: list[str]) -> bool:
    """One argument that is no directory: an image of the store (`resolve_image`)."""
    return len(layers) == 1 and not os.path.isdir(layers[0])


def build_env(opts: RunOptions, config: dict[str, Any], hostname: str) -> dict[str, str]:
    """PATH, HOSTNAME and TERM (and `container=podman` for an image run by name, as
    podman sets it then, not with --rootfs), then the image's Env, then --env-file, then
    -e (later wins)."""
    from . import sandbox

    env = {"PATH": sandbox.DEFAULT_PATH}
    if opts.term:
        env["TERM"] = opts.term
    if opts.env_host:  # podman's order: its defaults, the caller's, then the image's
        env.update(os.environ)
    elif opts.http_proxy:
        env.update((k, v) for k, v in os.environ.items() if k in PROXY_VARIABLES)
    env["HOSTNAME"] = hostname
    if is_image_name(opts.layers):
        env["container"] = "podman"
    for item in config.get("Env") or []:
        key, _, value = str(item).partition("=")
        if key:
            env[key] = value
    for path in opts.env_files:
        try:  # a pipe too (`--env-file <(...)`), as podman; none of another user's
            data = read_named(path, MAX_ENV_FILE + 1)
        except OSError as e:
            raise _fail(f"cannot read env file {path!r}: {e.strerror}") from None
        if len(data) > MAX_ENV_FILE:  # /dev/zero: read until the machine ran out of memory
            raise _fail(f"env file {path!r} is larger than {MAX_ENV_FILE >> 20} MiB")
        try:
            lines = data.decode("utf-8").split("\n")
        except UnicodeDecodeError as e:  # a traceback before
            raise _fail(f"env file {path!r} is not UTF-8 text (byte {e.start})") from None
        for line in lines:
            # podman's reading: lines end at \n (a \r before it dropped), leading blanks
            # go, the rest of the line is the value (trailing blanks too).
            line = line.removesuffix("\r").lstrip(" \t")
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


def entrypoint_argv(entrypoint: str) -> list[str]:
    """--entrypoint as podman reads it: a JSON array of strings is the argv (`'["sh",
    "-c"]'`), anything else one program name; "" none."""
    if entrypoint.startswith("["):
        import json

        with contextlib.suppress(ValueError):
            value = json.loads(entrypoint)
            if isinstance(value, list) and all(isinstance(a, str) for a in value):
                return value
    return [entrypoint] if entrypoint else []


def build_argv(opts: RunOptions, config: dict[str, Any]) -> list[str]:
    """Entrypoint + (COMMAND or the image's Cmd), as podman does."""
    if opts.entrypoint is not None:
        entry = entrypoint_argv(opts.entrypoint)
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


def parse_tmpfs(specs: list[str]) -> list[volumes.Tmpfs]:
    from . import volumes

    return [volumes.parse_tmpfs(v) for v in specs]


def parse_mounts(opts: RunOptions) -> tuple[list[volumes.Volume], list[volumes.Tmpfs]]:
    """-v, --tmpfs and --mount, as the binds and the tmpfs mounts they make."""
    from . import volumes

    binds, tmpfs = parse_volumes(opts.volumes), parse_tmpfs(opts.tmpfs)
    for spec in opts.mounts:
        m = volumes.parse_mount(spec)
        if isinstance(m, volumes.Tmpfs):
            tmpfs.append(m)
        else:
            binds.append(m)
    return binds, tmpfs


def _host_etc_copies(
    etc_dir: str,
    name_inside: str,
    network: str,
    container: str | None = None,
    add_hosts: list[tuple[str, str]] | None = None,
) -> dict[str, str]:
    """Copies of the host's resolv.conf, hosts and hostname (symlinks resolved) and an
    empty /run/.containerenv, to bind in.

    With `--network none` the container's name is on its own loopback (127.0.0.1), as
    podman writes it (the host's file may give the host's name an address the container
    cannot reach), and no resolv.conf is bound (the image keeps its own): no name server
    is reachable, as in podman. `--name` follows the host name on that line, as podman
    writes it; `--add-host`'s lines come first, as podman puts them."""
    line = " ".join(n for n in (name_inside, container) if n)
    os.makedirs(etc_dir, exist_ok=True)
    out = {}
    names = ("hosts", "hostname") if network == "none" else ("resolv.conf", "hosts", "hostname")
    for name in names:
        try:
            with open(os.path.realpath(f"/etc/{name}"), "rb") as f:
                data = f.read()
        except OSError:
            data = b""
        if name == "hostname":
            data = name_inside.encode() + b"\n"
        if name == "hosts" and add_hosts:
            data = "".join(f"{ip}\t{host}\n" for host, ip in add_hosts).encode() + data
        if name == "hosts" and data and not data.endswith(b"\n"):
            data += b"\n"  # the line added below must not join the host's last one
        if name == "hosts" and network == "none":
            data += f"127.0.0.1\t{line}\n".encode()
        elif name == "hosts" and line != socket.gethostname():
            data += f"127.0.1.1\t{line}\n".encode()
        path = os.path.join(etc_dir, name)
        with open(path, "wb") as f:
            f.write(data)
        os.chmod(path, 0o644)
        out[f"/etc/{name}"] = path
    # podman's mark of a container (empty, as podman's without --privileged), which tools
    # look for (systemd-detect-virt, toolbox, Ansible's facts).
    path = os.path.join(etc_dir, "containerenv")
    with open(path, "wb"):
        pass
    os.chmod(path, 0o644)
    out["/run/.containerenv"] = path
    return out


def _tmp_base() -> str:
    """$TMPDIR (or /tmp) as resolved, if no other user can change it (`tree.private_dir`):
    the temporary tree's names are re-resolved all along."""
    base = os.environ.get("TMPDIR") or "/tmp"
    try:
        return private_dir(base)
    except OSError as e:
        hint = "set TMPDIR to one no other user can change"
        raise _fail(f"the temporary directory {base!r} {e.strerror}; {hint}") from None


def _check_on_the_host(opts: RunOptions) -> None:
    """`_tmp_base` and `_private_upper` (nothing made) as the host sees the owners, for an
    ordinary user before she enters her user namespace: there every owner it does not map
    shows as `nobody`, as the host's root does, so another user's directory on the way to
    her upper or $TMPDIR looked like root's, and he could swap her tree for his, which
    her container then used. They are checked again inside, where the tree is made."""
    _tmp_base()
    if opts.upper:
        _private_upper(opts.upper, make=False)


def _private_upper(upper: str, make: bool = True) -> str:
    """`--upper`, made if missing, as resolved: a directory that no other user can change,
    nor any on the way (`tree.open_private_dir`), and no symlink of hers followed.

    The container's root sets owners and modes there by name. Where another user can
    write, she renames her own program onto the name of a file the container has just
    made, between its `chown root` and its `chmod u+s` or after them: the daemon then
    changed her file, a set-user-ID program of root's she runs on the host (kernel
    overlayfs does the same once its dentry is gone). A parent she can change lets her
    swap the whole upper for hers. And it must be out of other users' reach
    (`tree.reachable_by_others`), as podman's storage is: the set-user-ID programs the
    container's root makes there (`chmod 4755` of a copy of a shell) are programs of
    root's on the host, for every user who can reach them. Checked before anything is
    made there: the deepest directory that exists first (with `make` False, all there is)."""
    from .tree import SharedDirectory

    path = os.path.abspath(upper)
    try:
        existing = path
        while not os.path.exists(existing):
            existing = os.path.dirname(existing)
        real = private_dir(existing)
        # What is missing is made 0755: the deepest directory that exists decides.
        where = reachable_by_others(real if existing == path else os.path.join(real, "x"))
        if make and where is None and existing != path:
            os.close(open_trusted(path, mkdir=0o755))  # never through a symlink of hers
            real = private_dir(path)
    except SharedDirectory as e:
        raise _fail(
            f"--upper {upper!r} {e.strerror}: another user could put her files where the "
            "container's root sets owners and modes; use a directory no other user can change"
        ) from None
    except OSError as e:
        raise _fail(f"cannot create the upper directory {upper!r}: {e.strerror}") from None
    if where is not None:
        raise _fail(
            f"--upper {upper!r} can be reached by every user (through {where}), and the "
            "container's root makes set-user-ID programs there; use a directory below one "
            "that only you can enter"
        )
    return real


# -- the run itself -----------------------------------------------------------------------
class _Interrupted(Exception):
    def __init__(self, signo: int) -> None:
        super().__init__(signo)
        self.signo = signo


class Runner:
    """One `pyunion run`: its set-up, and the state teardown needs, wherever it is
    interrupted. What must be undone, and the running container, are its `Supervisor`'s
    (`supervise.py`), which goes on in a lean interpreter of its own once the container
    runs (`_start_and_wait`)."""

    def __init__(self, opts: RunOptions) -> None:
        self.opts = opts
        self.sup = Supervisor()
        self.sup.keep = self.kept()
        self.sup.quiet = opts.quiet
        self.sup.interactive = opts.interactive
        self.starting: int | None = None  # pid 1 waiting for "go"
        self.go_fd = -1
        self.child_stdio: list[tuple[int, int]] = []  # (fd, the container's end) until forked
        self.mount_fd = -1  # the detached mount, until init has it
        self.tty_sock: socket.socket | None = None
        self.prefork: Prefork | None = None
        self.pending: list[int] = []  # signals before pid 1 went on
        self.old_handlers: dict[int, Any] = {}

    # signals ---------------------------------------------------------------------------
    def _on_signal(self, signo: int, frame: FrameType | None) -> None:
        if self.sup.init is None and signo not in (signal.SIGCHLD, signal.SIGWINCH):
            self.pending.append(signo)
            return
        self.sup.on_signal(signo)

    def _install_handlers(self) -> None:
        for sig in HANDLED:
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
        if os.geteuid() != 0:
            _check_on_the_host(opts)
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
        # Forked by the program first thing, if it could.
        self.prefork = take_early() or Prefork(run=True)
        self.sup.daemon = procfs.process_id(self.prefork.pid)

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
        hostname = opts.hostname or default_hostname(opts.network)
        binds, tmpfs = parse_mounts(opts)
        spec = sandbox.ContainerSpec(
            root="",
            init=init,
            argv=build_argv(opts, config),
            env=build_env(opts, config, hostname),
            workdir=opts.workdir or config.get("WorkingDir") or None,
            make_workdir=opts.make_workdir or not opts.workdir,
            user=opts.user or config.get("User") or None,
            hostname=hostname,
            network=opts.network,
            binds=binds,
            tmpfs=tmpfs,
            shm_size=opts.shm_size,
            devices=opts.devices,
            group_add=opts.group_add,
            rlimits=[rlimits.parse_ulimit(u) for u in opts.ulimits],
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
        self.sup.layers = layers
        # The janitor first: whatever is made from here on, it removes if pyunion is killed.
        self._start_janitor()
        self.sup.tmp = self._make_tmp()
        os.chmod(self.sup.tmp, 0o700)
        self._make_cgroup()
        self.sup.merged = os.path.join(self.sup.tmp, "merged")
        os.mkdir(self.sup.merged)
        work = None
        if opts.upper:
            self.sup.upper = _private_upper(opts.upper)
        else:  # with --read-only too: it holds the mount points the image lacks
            self.sup.upper = os.path.join(self.sup.tmp, "upper")
            work = os.path.join(self.sup.tmp, "work")
            os.mkdir(self.sup.upper, 0o755)
            os.mkdir(work, 0o700)
        spec.root = self.sup.merged
        spec.etc_files = _host_etc_copies(
            os.path.join(self.sup.tmp, "etc"),
            spec.hostname,
            opts.network,
            opts.name,
            [check_add_host(h) for h in opts.add_hosts],
        )
        # init prepares (its seccomp filter, catatonit) while the daemon mounts; it enters
        # the tree on "go".
        self._fork_init(spec)
        # nodev: podman keeps the container off device nodes with the devices cgroup; with
        # no cgroup here, a node shipped in the image (a host disk) must simply not open.
        cfg = MountConfig(
            lowers=layers,
            mountpoint=self.sup.merged,
            upper=self.sup.upper,
            work=work,
            fuse_options={"allow_other", "suid", "nodev"},
        )
        try:
            daemon, self.mount_fd = mount_detached(cfg, self.prefork)
            self.sup.daemon = procfs.process_id(daemon)
        except UserError as e:
            # Reaped by mount once handed over; if not, teardown stops it (cancel).
            self.sup.daemon = None
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
        self.sup.janitor, self.sup.janitor_fd = pid, w
        # What it needs besides the names told later (`_tell_janitor`).
        if self.sup.daemon is not None:
            self.sup.tell_janitor("D", self.sup.daemon)
        if self.opts.upper:
            self.sup.tell_janitor("U", os.fsencode(os.path.abspath(self.opts.upper)))
        if self.kept():
            self.sup.tell_janitor("K")

    def _make_tmp(self) -> str:
        """mkdtemp, but the janitor is told the name before the directory exists: a SIGKILL
        between the two can no longer leave it behind."""
        # Not tempfile.gettempdir(): it leaves its probe file behind when pyunion is killed
        # then (the janitor knows nothing of it), and the directory is checked here anyway.
        base = _tmp_base()
        while True:
            path = os.path.join(base, "pyunion-run-" + os.urandom(6).hex())
            self.sup.tell_janitor("T", os.fsencode(path))
            try:
                os.mkdir(path, 0o700)
            except FileExistsError:
                continue  # not ours: the janitor is told the next name (the last one wins)
            return os.path.abspath(path)

    def _make_cgroup(self) -> None:
        """The container's cgroup, which bounds its processes (`cgroups`): podman's 2048
        by default, as root where the pids controller is, and the memory and CPU limits
        asked for. Rootless, in the user's delegated cgroup (`cgroups.delegated`);
        without one, as podman without systemd's: no limit, and why said once
        (`mount.say_once`), or an error for a limit asked for."""
        limits = limits_of(self.opts)
        required, optional = limits.required(), limits.optional()
        if not required and not optional:
            return
        assert self.sup.tmp is not None
        name = os.path.basename(self.sup.tmp)
        rootless = userns.in_user_namespace()
        where = cgroups.delegated if rootless else cgroups.path_for
        groups = where(name, required, optional)
        if isinstance(groups, str) or not groups:
            why = groups or "this host has no pids cgroup controller"
            if required:
                option = cgroups.OPTION[required[0]]
                if rootless:
                    raise _fail(f"{option}: no cgroup for a rootless container: {why}")
                raise _fail(f"{option}: {why}")
            if rootless:
                say_once("no-pids-limit", f"no limit on the container's processes: {why}")
            return
        for group in groups:  # before it exists, as the tree
            self.sup.tell_janitor("C", os.fsencode(group.path))
        self.sup.cgroups = [group.path for group in groups]
        try:
            cgroups.create(groups, limits)
        except OSError as e:
            raise _fail(
                f"cannot make the container's cgroup {e.filename or groups[0].path}: "
                f"{e.strerror}" + ("" if required else " (--pids-limit -1 runs it without one)")
            ) from None

    def _fork_init(self, spec: sandbox.ContainerSpec) -> None:
        """Fork pid 1 of a new pid namespace (this process stays in its own); it waits
        for "go" (`_start_and_wait`) before it enters the tree."""
        child_sock = None
        if self.opts.tty:
            self.tty_sock, child_sock = socket.socketpair()
        self.sup.report_fd, spec.report_fd = os.pipe()
        theirs, ours = socket.socketpair()  # "G" and the mount's fd (SCM_RIGHTS)
        spec.go_fd, self.go_fd = theirs.detach(), ours.detach()
        for fd, child_end, our_end in _relayed_stdio(self.opts.interactive and not self.opts.tty):
            self.child_stdio.append((fd, child_end))
            if fd == 0:
                self.sup.stdin_pipe = our_end
            elif our_end is not None:
                self.sup.out_pipes[our_end] = fd
        try:
            self.starting = self._fork_pid1(spec, child_sock)
            if self.sup.cgroups:  # init forks nothing before "go"
                try:
                    cgroups.add(self.sup.cgroups, self.starting)
                except OSError as e:
                    raise _fail(f"cannot enter the container's cgroup: {e.strerror}") from None
        finally:
            os.close(spec.report_fd)
            os.close(spec.go_fd)
            if child_sock is not None:
                child_sock.close()
            for child_end in {end for _, end in self.child_stdio}:
                os.close(child_end)
            self.child_stdio = []
        self.sup.tell_janitor("I", procfs.process_id(self.starting))

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
                    if self.sup.janitor_fd is not None:
                        os.close(self.sup.janitor_fd)
                    for fd in (self.sup.report_fd, self.go_fd):
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
        """The tree is mounted: let init go on, then supervise it (from a lean interpreter
        once it has run for `SUPERVISOR_AFTER` s, when we are the program)."""
        opts = self.opts
        sup = self.sup
        stdin_tty = os.isatty(0)
        sup.open_wake_pipe()
        go, self.go_fd = socket.socket(fileno=self.go_fd), -1
        with contextlib.suppress(OSError):  # init died early: its status tells
            socket.send_fds(go, [b"G"], [self.mount_fd])
        go.setblocking(False)
        sup.go = go.detach()
        self._close_mount()  # init's now: the mount lives as long as the container's namespace
        sup.init, self.starting = self.starting, None
        parent_sock, self.tty_sock = self.tty_sock, None
        pending, self.pending = self.pending, []
        for sig in pending:  # arrived while forking: the command gets them now
            sup.on_signal(sig)
        if parent_sock is not None:
            with parent_sock:
                _, fds, _, _ = socket.recv_fds(parent_sock, 16, 1)
            if fds:
                sup.master = fds[0]
                sup.copy_winsize()
                if stdin_tty and opts.interactive:
                    sup.saved_tty = termios.tcgetattr(0)
                    ttymod.setraw(0, termios.TCSANOW)  # TCSAFLUSH would drop typed-ahead input
        if not opts.lean_supervisor:
            code = sup.supervise()
        else:
            code = sup.supervise(time.monotonic() + SUPERVISOR_AFTER)
            if code is None:
                sup.exec_self()  # returns only if it could not
                code = sup.supervise()
        assert code is not None
        return code

    # teardown ----------------------------------------------------------------------------
    def teardown(self) -> None:
        """Undo everything, in order, whatever state the run reached."""
        if self.go_fd >= 0:
            os.close(self.go_fd)  # init never went on
            self.go_fd = -1
        if self.tty_sock is not None:
            self.tty_sock.close()
            self.tty_sock = None
        if self.starting is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.starting, signal.SIGKILL)  # pid 1 dies: the kernel kills the rest
            with contextlib.suppress(ChildProcessError):
                os.waitpid(self.starting, 0)
            self.starting = None
        if self.prefork is not None:  # no mount was handed to it
            self.prefork.cancel()
            self.prefork = None
            self.sup.daemon = None  # reaped
        self._close_mount()  # never handed to init: it goes now
        self.sup.teardown()

    def _close_mount(self) -> None:
        if self.mount_fd >= 0:
            os.close(self.mount_fd)
            self.mount_fd = -1

    def kept(self) -> bool:
        return self.opts.keep or bool(self.opts.upper)


def _relayed_stdio(interactive: bool) -> list[tuple[int, int, int | None]]:
    """(our fd, the container's end, our end) for each stdio fd: whatever it is (a file,
    a pipe, a named FIFO, a terminal, a device, a socket), it reaches the container as a
    pipe of ours. stderr on the same file as stdout shares its pipe (our end None), so
    that their order stays the command's.

    Nothing of the caller's is the container's: an fd passed as is gives the
    container's root its inode, and /proc/self/fd/N opens that inode anew in any
    direction its owner may. A `> host-file` could be chmod'ed or chown'ed, a `< file`
    reopened for writing, /dev/null or the caller's terminal made world-writable; the
    caller's stdout pipe (its creator's, 0600) reopened for reading, taking what the
    caller's other writers put there before its reader saw it. The open file is the
    caller's too: the container set O_NONBLOCK on a pipe (the caller's next writes to
    it failed, EAGAIN) or shut a socket down. podman puts conmon's pipes there.
    """
    out: list[tuple[int, int, int | None]] = []
    seen: dict[tuple[int, int], int] = {}  # (st_dev, st_ino) -> the container's end
    for fd in (0, 1, 2) if interactive else (1, 2):
        try:
            st = os.fstat(fd)
        except OSError:
            continue
        if fd == 2 and (st.st_dev, st.st_ino) in seen:
            out.append((2, seen[st.st_dev, st.st_ino], None))
            continue
        r, w = os.pipe2(os.O_CLOEXEC)
        out.append((fd, r, w) if fd == 0 else (fd, w, r))
        if fd == 1:
            seen[st.st_dev, st.st_ino] = w
    return out


@contextlib.contextmanager
def _forwarded_signals_blocked() -> Iterator[None]:
    """Around a fork: the child starts with the signals pyunion forwards blocked, so that
    none becomes a KeyboardInterrupt (a traceback, or a return into pyunion's code)
    before it has set itself up; init keeps them blocked across its exec and until it
    hands them over to catatonit (`sandbox._take_signals`), the janitor ignores them.
    The parent gets what came meanwhile once they are unblocked."""
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
    "from unionfs.supervise import janitor_cleanup; janitor_cleanup(sys.argv[2])"
)


def _janitor(rfd: int) -> NoReturn:
    """The forked janitor: cut off from pyunion (its session, fds, the signals it
    forwards), it becomes the shell `_JANITOR_SH`, reading its pipe until EOF. Where no
    shell runs, it reads and cleans up itself."""
    code = 0
    try:
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
        janitor_cleanup(os.fsdecode(syscalls.read_to_eof(0)))
    except BaseException:  # noqa: BLE001 - a forked child must never return into pyunion
        code = 1
    os._exit(code)


def run(opts: RunOptions) -> int:
    """Run one container; returns the exit code (raises UserError with code 125).

    Meant for the `pyunion run` process itself: it installs signal handlers while
    it runs, and in a user namespace it cannot fork after init (`_fork_pid1`).
    """
    return Runner(opts).run()
