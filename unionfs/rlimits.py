"""The open-file limit: pyunion's own processes take all the hard limit allows, the
container's command gets the caller's.

A container's start holds a dozen fds at once (its stdio pipes, the mount's fd,
namespace fds, a socket to init), and a daemon keeps directory fds open between
requests (`resolve.dir_fd_budget`): under a caller's `ulimit -Sn 16` either one
failed half-way, with a traceback or a mount whose daemon was gone. As
fuse-overlayfs and podman do, pyunion raises its soft limit to the hard one at
start; unlike podman, the command is handed the caller's soft limit back, as
`unshare` or `chroot` would leave it. A hard limit too low to start a container
at all is one line and an error, before anything is set up.
"""

from __future__ import annotations

import contextlib
import resource

from .errors import UserError

MIN_FDS = 64  # what a container's start and its daemon need, with room to spare

_caller_soft: int | None = None  # the soft limit before raise_fd_limit, for the command


def raise_fd_limit() -> None:
    """Soft limit := hard limit, remembering the caller's for `give_back_fd_limit`."""
    global _caller_soft
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if _caller_soft is None:
        _caller_soft = soft
    if soft != hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def ensure_fd_room(what: str, code: int = 1) -> None:
    """`raise_fd_limit`, or a UserError when even the hard limit is under MIN_FDS."""
    raise_fd_limit()
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if soft != resource.RLIM_INFINITY and soft < MIN_FDS:
        raise UserError(
            f"the open-file limit is {soft} (ulimit -n); {what} needs at least {MIN_FDS}",
            code,
        )


def give_back_fd_limit() -> None:
    """The caller's soft limit again (in the container's init, right before the exec)."""
    if _caller_soft is None:
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != _caller_soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (_caller_soft, hard))


# `--ulimit NAME=SOFT[:HARD]`: podman's (docker's) names; values as setrlimit(2) takes
# them (bytes, not ulimit(1)'s KiB), -1 for unlimited.
ULIMITS = {
    "as": resource.RLIMIT_AS,
    "core": resource.RLIMIT_CORE,
    "cpu": resource.RLIMIT_CPU,
    "data": resource.RLIMIT_DATA,
    "fsize": resource.RLIMIT_FSIZE,
    "locks": 10,  # RLIMIT_LOCKS (linux/resource.h), which Python does not name
    "memlock": resource.RLIMIT_MEMLOCK,
    "msgqueue": resource.RLIMIT_MSGQUEUE,
    "nice": resource.RLIMIT_NICE,
    "nofile": resource.RLIMIT_NOFILE,
    "nproc": resource.RLIMIT_NPROC,
    "rss": resource.RLIMIT_RSS,
    "rtprio": resource.RLIMIT_RTPRIO,
    "rttime": resource.RLIMIT_RTTIME,
    "sigpending": resource.RLIMIT_SIGPENDING,
    "stack": resource.RLIMIT_STACK,
}


def parse_ulimit(spec: str) -> tuple[int, int, int]:
    """One `--ulimit` value as (RLIMIT_*, soft, hard); a bad one is a UserError (125).
    A soft limit alone is the hard one too, as in podman."""
    name, eq, values = spec.partition("=")
    soft_s, _, hard_s = values.partition(":")

    def value(text: str) -> int:
        if text == "-1":
            return resource.RLIM_INFINITY
        if text.isascii() and text.isdigit() and len(text) < 20:
            return int(text)
        raise UserError(f"--ulimit {spec!r}: {text!r} is no limit (a number, or -1)", 125)

    if name not in ULIMITS or not eq:
        raise UserError(
            f"--ulimit {spec!r}: expected NAME=SOFT[:HARD] with NAME one of "
            + ", ".join(sorted(ULIMITS)),
            125,
        )
    soft = value(soft_s)
    hard = value(hard_s) if hard_s else soft
    unlimited = resource.RLIM_INFINITY
    if hard != unlimited and (soft == unlimited or soft > hard):
        raise UserError(f"--ulimit {spec!r}: the soft limit is above the hard one", 125)
    return ULIMITS[name], soft, hard
