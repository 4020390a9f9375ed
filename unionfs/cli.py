"""The `pyunion` command: one thin layer over the library.

Every subcommand's errors are `UserError`s printed as one line with a non-zero
exit; a traceback only with `PYUNION_TRACEBACK=1`.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import sys
from collections.abc import Callable, Sequence

from . import __version__
from .errors import UserError, printable

TYPE_CHECKING = False  # typing's, without importing typing on a mount's start (architecture.md)
if TYPE_CHECKING:
    import argparse
    from types import ModuleType
    from typing import Any, NoReturn

    from .options import MountConfig

    Handler = Callable[[argparse.Namespace], int]


def _add_mount(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "mount",
        help="mount a stack of layers",
        description=(
            "Mount layers as one merged tree. Either the kernel's syntax, "
            "'pyunion mount -o lowerdir=TOP:...:BOTTOM,upperdir=U,workdir=W MOUNTPOINT', "
            "or 'pyunion mount [--upper U] [--work W] LAYER... MOUNTPOINT' with the layers "
            "listed TOP FIRST (the first layer hides the ones after it). Without an upper "
            "directory the mount is read-only. An image name from the store may stand for "
            "the layers."
        ),
    )
    p.add_argument(
        "args",
        nargs="+",
        metavar="LAYER|MOUNTPOINT",
        help="layers, top first, then the mount point",
    )
    p.add_argument(
        "-o",
        dest="options",
        action="append",
        default=[],
        help="comma-separated options: lowerdir=,upperdir=,workdir=,ro,allow_other,...",
    )
    p.add_argument("--upper", help="writable upper directory")
    p.add_argument("--work", help="work directory (same filesystem as the upper)")
    p.add_argument("-f", "--foreground", action="store_true", help="stay in the foreground")
    p.add_argument("-d", "--debug", action="store_true", help="log every request (implies -f)")
    p.add_argument("--store", help="image store directory (for an image name)")
    p.set_defaults(handler=_cmd_mount)


def build_mount_config(args: argparse.Namespace) -> MountConfig:
    from .options import MountConfig, parse_options

    cfg = MountConfig(lowers=[], mountpoint="")
    parse_options(args.options, cfg)
    positional = list(args.args)
    cfg.mountpoint = positional.pop()
    if positional:
        if cfg.lowers:
            raise UserError("give the layers either as lowerdir= or as arguments, not both")
        if len(positional) == 1 and not os.path.isdir(positional[0]):
            from .image import resolve_layers
            from .userns import in_user_namespace

            if os.geteuid() != 0 and not in_user_namespace():
                # As with podman image mount: an ordinary user's layers hold the owners of
                # the rootless namespace, which only mean something inside it.
                raise UserError(
                    "an ordinary user mounts an image inside 'pyunion unshare', "
                    "where its files have their owners"
                )
            cfg.lowers = resolve_layers(positional[0], getattr(args, "store", None))
            _image_mount_flags(cfg, args.options)
        else:
            cfg.lowers = positional
    if args.upper:
        cfg.upper = args.upper
    if args.work:
        cfg.work = args.work
    if not cfg.lowers:
        raise UserError("no layers given (use -o lowerdir=... or list the layers)")
    cfg.debug = args.debug
    cfg.foreground = args.foreground or args.debug
    return cfg


def _image_mount_flags(cfg: MountConfig, options: list[str]) -> None:
    """An image from the store mounts nosuid,nodev unless `-o suid`/`-o dev` asks otherwise.

    The store is private (0700) so that no other user reaches an image's setuid-root
    programs or device nodes; root's mount at a mount point they can reach would hand
    them out again (a hostile image's setuid shell, a 0666 node of the host's disk).
    podman's image mounts stay under its private storage directory instead.
    """
    from .options import split_options

    given = {item for opt in options for item in split_options(opt)}
    for flag in ("suid", "dev"):
        if flag not in given:
            cfg.fuse_options.add("no" + flag)


def _cmd_mount(args: argparse.Namespace) -> int:
    from .mount import mount
    from .prefork import Prefork, forkserver_wanted, take_early

    # The daemon-to-be imports while the request is checked (docs/architecture.md).
    background = not (args.foreground or args.debug or forkserver_wanted())
    early = take_early()
    if not background and early is not None:
        early.cancel()  # not for a daemon in the foreground (start_early skips most cases)
        early = None
    prefork = (early or Prefork()) if background else None
    try:
        mount(build_mount_config(args), prefork)
    finally:
        if prefork is not None:
            prefork.cancel()  # never handed a mount (a bad request): stop and reap it
    return 0


def _add_umount(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "umount", aliases=["unmount"], help="unmount and wait for the daemon to exit"
    )
    p.add_argument("mountpoint")
    p.add_argument("-l", "--lazy", action="store_true", help="detach even if busy")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for the daemon")
    p.set_defaults(handler=_cmd_umount)


def _cmd_umount(args: argparse.Namespace) -> int:
    from .mount import umount

    umount(args.mountpoint, lazy=args.lazy, timeout=args.timeout)
    return 0


def store_option(p: argparse.ArgumentParser) -> None:
    """`--store DIR`, as every command that uses the image store takes it."""
    p.add_argument(
        "--store",
        metavar="DIR",
        help="image store (default: $PYUNION_STORE, else "
        "$XDG_DATA_HOME/pyunion/store or ~/.local/share/pyunion/store)",
    )


_CORE_COMMANDS = ("mount", "umount", "unmount")
# Each has register(subparsers), which adds its subcommands (named here, so that a
# command imports only its own module: `pyunion run` is on every container's start-up).
SUBCOMMANDS = {
    "unionfs.run": ("run",),
    "unionfs.sample": ("sample",),
    "unionfs.image.cli": ("image", "images", "history", "rmi", "inspect", "tag", "commit"),
    "unionfs.registry.cli": ("pull", "push", "login", "logout"),
    "unionfs.build.cli": ("build", "bud"),
    "unionfs.unshare": ("unshare",),
}
SUBCOMMAND_MODULES = tuple(SUBCOMMANDS)


def _help_width() -> int:
    """The width argparse's formatter picks itself: `shutil.get_terminal_size`'s columns
    (COLUMNS when a positive number, else the terminal's at stdout, else 80), less 2.

    Read here, not by argparse: it imports shutil for it (~2 ms of every `pyunion mount`,
    which never prints help) when it makes a formatter, as it does for every argument it
    adds (to check the argument's metavar).
    """
    with contextlib.suppress(KeyError, ValueError):
        columns = int(os.environ["COLUMNS"])
        if columns > 0:
            return columns - 2
    stdout = sys.__stdout__  # None when Python started with fd 1 closed
    try:
        columns = os.get_terminal_size(stdout.fileno()).columns if stdout is not None else 0
    except (ValueError, OSError):
        columns = 0
    return (columns or 80) - 2


def _formatter(prog: str) -> argparse.HelpFormatter:
    import argparse

    return argparse.HelpFormatter(prog, width=_help_width())


def build_parser(
    extra: bool = True, modules: Sequence[str] | None = None
) -> argparse.ArgumentParser:
    """The parser; `extra=False` leaves out the subcommands of other modules (faster mounts),
    `modules` registers only those modules' subcommands."""
    # Imported here, after the daemon-to-be is forked (`_main`): a daemon never parses.
    import argparse

    class Parser(argparse.ArgumentParser):
        """argparse's, formatting at `_help_width` (its subcommands' parsers are Parsers too)."""

        def __init__(self, **kwargs: Any) -> None:
            kwargs.setdefault("formatter_class", _formatter)
            super().__init__(**kwargs)

        def error(self, message: str) -> NoReturn:
            """A usage error in one line, as every other bad input (argparse adds the usage
            text before it); `--help` has the usage."""
            self.exit(2, f"{self.prog}: {message} (see '{self.prog} --help')\n")

    parser: argparse.ArgumentParser = Parser(
        prog="pyunion", description="A userspace union filesystem for container image layers."
    )
    parser.add_argument("--version", action="version", version=f"pyunion {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    _add_mount(sub)
    _add_umount(sub)
    # Subcommands that live in their own modules register themselves.
    for modname in (SUBCOMMAND_MODULES if modules is None else modules) if extra else ():
        importlib.import_module(modname).register(sub)
    return parser


def _setup_logging(debug: bool) -> None:
    """pyunion's log lines, set up when logging is imported: the caller of a background
    `pyunion mount` logs nothing, and never imports it."""
    from .lazyimport import when_imported

    def setup(logging: ModuleType) -> None:
        logging.basicConfig(
            level=logging.DEBUG if debug else logging.WARNING,
            format="pyunion: %(levelname)s: %(message)s"
            if not debug
            else "%(asctime)s %(name)s %(levelname)s: %(message)s",
        )

    when_imported("logging", setup)


def run_cli(
    argv: Sequence[str] | None, parser: argparse.ArgumentParser, program: bool = False
) -> int:
    """Parse and run one command; `program`: this process is pyunion itself (not `main([...])`
    called in a process that goes on), which `run` may re-execute (`run.SUPERVISOR_AFTER`)."""
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse's usage error (2), said on stderr already
        first = (list(argv) if argv is not None else sys.argv[1:])[:1]
        if e.code == 2 and first and first[0] in _USAGE_ERROR:
            return _USAGE_ERROR[first[0]]
        raise
    args.program = program
    _setup_logging(getattr(args, "debug", False))
    handler: Handler = args.handler
    try:
        return handler(args)
    except UserError as e:
        return _report(e)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # `pyunion inspect X | head`: the reader left; exit quietly like other tools.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141


def _report(e: UserError) -> int:
    if os.environ.get("PYUNION_TRACEBACK"):
        raise e
    # Escaped, whatever raised it: a message may quote someone else's text (a step of a
    # Containerfile, a name from an image), and stays one line without a control sequence.
    print(f"pyunion: {printable(e)}", file=sys.stderr)
    return e.code


# What the commands that start daemons and containers exit with when even the hard
# open-file limit is too low for them (rlimits.py); run's and build's are podman's.
_FD_HUNGRY = {"run": 125, "mount": 1, "build": 125}

# What a usage error (an unknown option) exits with where argparse's 2 is not the rule:
# run's is podman's.
_USAGE_ERROR = {"run": 125}

# Commands that leave without the interpreter's teardown (`_exit_now`) when they are the
# program (not `main([...])` called in a process that goes on).
_QUICK_EXIT = ("run", "mount", "umount", "unmount")


def _ensure_stdio() -> None:
    """Open fds 0-2 on /dev/null where the caller closed them (`pyunion run ... <&-`):
    otherwise the first fds pyunion opens (a pipe to the container's init, /dev/fuse)
    would be taken for stdin, stdout or stderr."""
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            null = os.open(os.devnull, os.O_RDWR)  # the lowest free fd: this one
            if null != fd:
                os.dup2(null, fd, inheritable=True)
                os.close(null)
            else:
                os.set_inheritable(fd, True)


def _exit_now(code: int) -> NoReturn:
    """Exit at once: `pyunion run` is on every container's start-up, and the interpreter's
    teardown (freeing every module's objects) took longer than the container's own.
    These commands leave nothing to finalize: no threads, no atexit, no open files but
    stdio, flushed here."""
    try:
        for stream in (sys.stdout, sys.stderr):
            if stream is not None:  # None: the fd was closed when Python started
                stream.flush()
    except BrokenPipeError:
        code = code or 141
    os._exit(code)


def main(argv: Sequence[str] | None = None) -> int:
    if argv is None:
        _ensure_stdio()
    try:
        code = _main(argv, program=argv is None)
    except KeyboardInterrupt:  # ^C before the command's own handling (parsing, imports)
        code = 130
    if argv is None and sys.argv[1:2] and sys.argv[1] in _QUICK_EXIT:
        _exit_now(code)
    return code


def _main(argv: Sequence[str] | None, program: bool = False) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args == ["--version"]:
        print(f"pyunion {__version__}")
        return 0
    # Before anything imports trio: a daemon forked from here never loads what it never uses.
    from .lazyimport import MOUNT_COMMAND, defer

    defer()
    first = args[0] if args else ""
    if first == "mount":
        defer(MOUNT_COMMAND)
    # The daemon of `run` or `mount`, forked before the command's own imports: it
    # imports trio and pyfuse3 meanwhile (the program only: never a fork of a caller
    # that calls main()).
    if program and first in _FD_HUNGRY:
        from . import rlimits  # before the daemon's fork below: it inherits the limit

        try:
            rlimits.ensure_fd_room(f"pyunion {first}", _FD_HUNGRY[first])
        except UserError as e:
            return _report(e)
    early = program and first in ("run", "mount")
    if early:
        from . import prefork

        prefork.start_early(first, args[1:])
    try:
        # `mount` and `run` are on the start-up path of every container: a command builds
        # the parser of its own module only; help and mistakes get every command.
        if first in _CORE_COMMANDS:
            return run_cli(args, build_parser(extra=False), program)
        owner = [mod for mod, names in SUBCOMMANDS.items() if first in names]
        return run_cli(args, build_parser(modules=owner or None), program)
    finally:
        if early:
            prefork.cancel_early()


def overlayfs_main(argv: Sequence[str] | None = None) -> int:
    """fuse-overlayfs' calling convention: `PROGRAM [-f] [-d] -o OPTS [SOURCE] MOUNTPOINT`.

    This is what containers/storage runs as its `overlay.mount_program`, and what
    `mount -t fuse.pyunion-overlayfs SOURCE MOUNTPOINT -o OPTS` runs (mount.fuse3
    puts the source first). The option strings (empty items, a quoted SELinux label
    and all) go unchanged to `pyunion mount`, whose parser reads them by the same
    rules. As with fuse-overlayfs, the last argument is the mount point and a source
    before it is a name only, when the layers come from `lowerdir=`.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv in (["--version"], ["-V"]):
        return main(["--version"])
    args: list[str] = []
    positional: list[int] = []  # where the non-options are in `args`
    lowerdir = False
    it = iter(argv)
    for arg in it:
        if arg == "-o" or (arg.startswith("-o") and len(arg) > 2):
            opts = arg[2:] if len(arg) > 2 else next(it, None)
            if opts is None:
                return main(["mount", "-o"])  # argparse reports the missing value
            if opts:  # joined: a value starting with '-' is still the value of -o
                args.append("-o" + opts)
                lowerdir = lowerdir or any(o.startswith("lowerdir=") for o in opts.split(","))
        elif arg == "--debug":
            args.append("-d")
        elif arg == "-s":
            continue  # libfuse's single-threaded mode, which fuse-overlayfs takes: ours already
        else:
            if not arg.startswith("-"):
                positional.append(len(args))
            args.append(arg)
    if lowerdir and len(positional) > 1:
        drop = set(positional[:-1])
        args = [a for i, a in enumerate(args) if i not in drop]
    return main(["mount", *args])


if __name__ == "__main__":
    sys.exit(main())
