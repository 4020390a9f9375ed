"""The daemon-to-be, forked before its mount is known (docs/architecture.md: start-up).

A mount's daemon spends most of its start importing trio, pyfuse3 and the
filesystem (~90 ms). `Prefork` forks it first and lets it import while the
caller does its own work (parse the command line, import its modules, read the
image, check the request); the mount is handed over when it is ready
(`hand_over`). This module imports only what the fork needs, so that the
program can fork it first thing (`start_early`): the child imports the rest.

Whether a daemon may come from a fork server (`forkserver_wanted`) is also
decided here, once, because it decides whether a daemon is forked at all.
"""

from __future__ import annotations

import contextlib
import gc
import os
from collections.abc import Sequence

TYPE_CHECKING = False  # typing's, without importing typing on a mount's start (architecture.md)
if TYPE_CHECKING:
    import _socket

    from .options import MountConfig


def forkserver_wanted() -> bool:
    """`PYUNION_FORKSERVER=1` (`forkserver.enabled` decides; this spares its import)."""
    return os.environ.get("PYUNION_FORKSERVER", "0") == "1"


def share_with_fork() -> None:
    """Before a fork whose child lives on beside its parent (a daemon, a janitor): keep
    the pages the two share shared.

    A collection writes to every object it walks (its GC header), so the first full
    collection in either process after the fork copies every page holding one. Frozen
    objects are never walked again; they are never freed either, which a process that
    lives as long as its container, and holds what it imported, can afford.
    """
    gc.freeze()


class Prefork:
    """A daemon forked before its mount is known, importing what serving needs meanwhile.

    `mount(cfg, prefork)` or `mount_detached(cfg, prefork)` then hands it the
    mount. It is a child of the caller like a daemon `mount` forks, cut off from
    the caller (session, stdio, fds) at once; without a mount (`cancel`, or the
    caller gone: its socket ends) it exits, having touched nothing.
    """

    def __init__(self, run: bool = False) -> None:
        """`run`: for `pyunion run` (what its start imports is prefetched: `prefetch.py`)."""
        # `_socket`, not `socket` (and its enums, ~3 ms): the fork comes first, each side
        # makes the pair's end a `socket.socket` when it has imported that anyway.
        import _socket

        ours, theirs = _socket.socketpair(_socket.AF_UNIX, _socket.SOCK_SEQPACKET)
        # What both processes hold stays shared: the caller's later collections never
        # write to (so never copy) the pages of the objects it has now (`share_with_fork`).
        share_with_fork()
        pid = os.fork()
        if pid == 0:
            try:
                ours.close()
                from . import prefetch

                prefetch.start(run)  # a cold start's reads, all queued at once
                from .bytecode import strip_docstrings
                from .lazyimport import DAEMON_ONLY, defer

                defer(DAEMON_ONLY)
                strip_docstrings()
                import socket

                from .mount import prefork_main  # the child's imports: forked first for them

                prefork_main(socket.socket(fileno=theirs.detach()))
            finally:
                os._exit(1)  # a forked child never returns into the caller (a failed import)
        theirs.close()
        self.pid = pid
        self.sock: _socket.socket | None = ours

    def hand_over(self, cfg: MountConfig, ready_w: int, state_fd: int | None, mp_fd: int) -> int:
        """Send the daemon its mount (it reports on `ready_w` as any daemon); its pid.

        `mp_fd` is /dev/fuse for a detached mount (`cfg.detached`, no `state_fd`)."""
        raw, self.sock = self.sock, None
        assert raw is not None, "a preforked daemon serves one mount"
        import pickle
        import socket

        sock = socket.socket(fileno=raw.detach())

        fds = [ready_w, mp_fd] + ([state_fd] if state_fd is not None else [])
        with sock, contextlib.suppress(OSError):  # it died: `mount` reads no OK, reaps it
            socket.send_fds(sock, [pickle.dumps(cfg)], fds)
        return self.pid

    def cancel(self) -> None:
        """No mount for it after all: stop it and reap it (it holds nothing)."""
        if self.sock is None:
            return
        self.sock.close()
        self.sock = None
        import signal

        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(self.pid, 0)


# -- forked first thing by the program ---------------------------------------------------
_early: Prefork | None = None

# Options after which the command forks no daemon, or not at once: help, a daemon in
# the foreground (`mount -f`, `-d`), and `run --preserve-fds`, whose check of the
# caller's fds 3..N+2 must come before pyunion opens any fd (the prefork's socket;
# `run` also gives the early daemon up before that check, whatever the spelling).
_NO_EARLY_LONG = ("--help", "--foreground", "--debug", "--preserve-fds")
_NO_EARLY_SHORT = "hfd"


def _wants_no_early(arg: str) -> bool:
    """Whether `arg` may be one of those options as argparse reads it: a long option
    abbreviated (`--pre`, `--fore=...`), or short ones bundled (`-fd`)."""
    if arg.startswith("--"):
        name = arg.partition("=")[0]
        return len(name) > 2 and any(o.startswith(name) for o in _NO_EARLY_LONG)
    return arg.startswith("-") and any(c in _NO_EARLY_SHORT for c in arg[1:])


def start_early(command: str, args: Sequence[str]) -> None:
    """Fork the daemon of `pyunion run` or `pyunion mount` before the command's own
    imports and checks, when it will surely want one: root (an ordinary user's `run`
    first enters a user namespace, where its daemon must be forked), no fork server,
    none of the options of `_wants_no_early`. Taken by the command (`take_early`), or cancelled
    (`cancel_early`) when it ends without."""
    global _early
    if command not in ("run", "mount") or os.geteuid() != 0 or forkserver_wanted():
        return
    if any(_wants_no_early(a) for a in args):
        return
    _early = Prefork(run=command == "run")


def take_early() -> Prefork | None:
    """The daemon `start_early` forked, now the caller's to hand a mount or cancel."""
    global _early
    prefork, _early = _early, None
    return prefork


def cancel_early() -> None:
    """Stop an early daemon nobody took (a bad request, help): it never mounted anything."""
    prefork = take_early()
    if prefork is not None:
        prefork.cancel()
