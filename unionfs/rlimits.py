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
