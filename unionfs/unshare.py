"""`pyunion unshare [COMMAND]`: a command in the rootless user namespace, as `podman unshare`.

An ordinary user's image store holds files owned by the IDs of their user
namespace (`userns.py`): outside it they show as subordinate IDs the user
cannot read or remove. Inside, as root with the same mapping as every pyunion
command uses, they show the owners the image gave them. The command also gets
a mount namespace of its own, where the user can mount images
(`pyunion mount IMAGE DIR`); the host's mounts stay visible there (as slaves),
and nothing mounted there reaches the host.

The command runs as our child, as in podman. When it exits, what is still
mounted by pyunion in the namespace is unmounted (its daemons would otherwise
keep the namespace, and themselves, alive with nobody to reach them).
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import os
import signal
import sys

from . import syscalls, userns
from .errors import UserError


def _exec(argv: list[str]) -> None:
    """In the child: become COMMAND (exit 127/126 with one line when it cannot be run)."""
    code = 126
    try:
        for sig in (signal.SIGINT, signal.SIGQUIT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_DFL)
        os.execvp(argv[0], argv)
    except OSError as e:
        print(f"pyunion: {argv[0]}: {e.strerror}", file=sys.stderr)
        code = 127 if e.errno in (errno.ENOENT, errno.ENOTDIR) else 126
    except BaseException as e:  # noqa: BLE001 - a forked child must never return into pyunion
        print(f"pyunion: cannot run {argv[0]}: {e!r}", file=sys.stderr)
    finally:
        sys.stderr.flush()
        os._exit(code)


def _unmount_leftovers() -> None:
    """Unmount pyunion's mounts made in this namespace (deepest first), waiting for their
    daemons. Mounts propagated from the host are locked to us and stay untouched."""
    from .mount import daemon_pid, mounts, wait_gone

    ours = [mp for mp, fstype, _ in mounts() if fstype == "fuse.pyunion"]
    for mp in sorted(ours, key=lambda p: p.count("/"), reverse=True):
        pid = daemon_pid(mp)
        try:
            syscalls.umount2(mp, syscalls.MNT_DETACH | syscalls.UMOUNT_NOFOLLOW)
        except OSError:
            continue  # the host's (MNT_LOCKED), or gone meanwhile
        print(f"pyunion: unmounted {mp} (still mounted when the command ended)", file=sys.stderr)
        if pid is not None and not wait_gone(pid, 5):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)  # the connection is gone: nothing to lose
            wait_gone(pid, 5)


def unshare_command(argv: list[str]) -> int:
    """Run COMMAND (default: $SHELL) in the rootless namespace; its exit status."""
    if os.geteuid() == 0 and not userns.in_user_namespace():
        raise UserError("pyunion unshare is for ordinary users: root needs no user namespace")
    from .image.store import default_store
    from .sandbox import wait_exit_code

    userns.enter_rootless()
    try:
        syscalls.unshare(syscalls.CLONE_NEWNS)  # the host's mounts stay visible (as slaves)
    except OSError as e:
        raise UserError(f"cannot create a mount namespace: {e.strerror}") from None
    argv = argv or [os.environ.get("SHELL") or "/bin/sh"]
    os.environ["PYUNION_STORE"] = os.path.abspath(default_store())  # as podman's GRAPHROOT
    sys.stdout.flush()
    sys.stderr.flush()
    # The terminal sends ^C and ^\ to the command too: only it decides what they do.
    old = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGQUIT)}
    child = os.fork()
    if child == 0:
        _exec(argv)

    def forward(signo: int, _frame: object) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(child, signo)

    for sig in (signal.SIGTERM, signal.SIGHUP):
        old[sig] = signal.signal(sig, forward)
    try:
        code = wait_exit_code(child)
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
    _unmount_leftovers()
    return code


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "unshare",
        help="run a command in the rootless user namespace (like podman unshare)",
        usage="pyunion unshare [COMMAND [ARG...]]",
        description="Run COMMAND (default: $SHELL) as root in the user namespace pyunion uses "
        "for an ordinary user (IDs 1..N mapped onto the /etc/subuid and /etc/subgid "
        "ranges, the same every time) and in a mount namespace of its own. There the "
        "image store's files show their owners, and can be read or removed, and "
        "images can be mounted. PYUNION_STORE is set to the store. What is still "
        "mounted when COMMAND ends is unmounted. Exit status: the command's; 127 "
        "not found; 126 cannot execute; 128+N killed by signal N.",
    )
    p.add_argument("argv", nargs=argparse.REMAINDER, metavar="COMMAND [ARG...]")
    p.set_defaults(
        handler=lambda args: unshare_command(
            args.argv[1:] if args.argv[:1] == ["--"] else args.argv
        )
    )
