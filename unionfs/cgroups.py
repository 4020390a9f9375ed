"""A container's cgroup: the bound on its number of processes (podman's pids limit).

Without one, a fork bomb in a container fills the host's pid space and every user's
next fork fails. podman puts each container in a cgroup whose `pids.max` is 2048
unless told otherwise; `pyunion run` does the same wherever the pids controller is
(cgroup v2, or v1's own `pids` hierarchy as on hybrid hosts), under a `pyunion`
group at the hierarchy's root (podman's cgroupfs manager: `libpod_parent`).

Rootless, podman asks systemd for a scope in the user's delegated cgroup (cgroup v2
and the systemd manager) and goes without a limit elsewhere. pyunion talks to no
systemd: it puts the container's group in the user's delegated cgroup itself, the
nearest group above its own that the user may change (`delegated`: a group made by
`systemd-run --user -p Delegate=yes`, her `user@UID.service`, or a v1 hierarchy's
group an administrator gave her), and otherwise runs without one and says why.

Lean on purpose (os, errno, time, procfs): the supervisor, which removes the group at the
end, imports nothing it can do without (`supervise`).
"""

from __future__ import annotations

import errno
import os
import time

from .procfs import mounts

DEFAULT_PIDS_LIMIT = 2048  # podman's (containers.conf `pids_limit`)
PARENT = "pyunion"
INNER = "container"  # the group the processes are in, below the limit's (see above)


def _read(path: str) -> bytes:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except OSError:
        return b""
    try:
        return os.read(fd, 65536)
    finally:
        os.close(fd)


def _write(path: str, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def pids_hierarchy() -> tuple[str, bool] | None:
    """(mount point, is v2) of the hierarchy that has the pids controller, if any: a
    cgroup v1 mount with `pids` among its options, else cgroup2 listing it. The one
    place that tells v1 from v2 (`Group.v2`)."""
    unified = None
    for point, fstype, options in mounts():
        if fstype == "cgroup" and "pids" in options.split(","):
            return point, False
        if fstype == "cgroup2" and unified is None:
            unified = point
    if unified is not None and b"pids" in _read(unified + "/cgroup.controllers").split():
        return unified, True
    return None


class Group:
    """Where a container's group goes (`path`), on a v2 hierarchy or not, and the
    groups above it that must hand their children the pids controller first (v2),
    the nearest last."""

    __slots__ = ("delegating", "path", "v2")

    def __init__(self, path: str, v2: bool, delegating: tuple[str, ...]) -> None:
        self.path = path
        self.v2 = v2
        self.delegating = delegating


def _delegate_pids(group: str) -> None:
    """cgroup v2: a group's children get `pids.max` only once it hands them the
    controller (the root group may, and one that holds no process of its own)."""
    if b"pids" not in _read(os.path.join(group, "cgroup.subtree_control")).split():
        _write(os.path.join(group, "cgroup.subtree_control"), b"+pids")


def path_for(name: str) -> Group | None:
    """Root's: where the group `name` goes, or None where there is no pids controller."""
    found = pids_hierarchy()
    if found is None:
        return None
    point, v2 = found
    parent = os.path.join(point, PARENT)
    return Group(os.path.join(parent, name), v2, (point, parent))


def own_group(point: str, v2: bool) -> str | None:
    """This process's group in the hierarchy mounted at `point` (/proc/self/cgroup)."""
    for line in _read("/proc/self/cgroup").decode(errors="surrogateescape").splitlines():
        _, controllers, rel = line.split(":", 2)
        if (controllers == "") if v2 else ("pids" in controllers.split(",")):
            return os.path.join(point, rel.lstrip("/")).rstrip("/")
    return None


def _ours(group: str) -> bool:
    """Whether this user may make groups in `group` and move processes across it (its
    directory and its `cgroup.procs`: v2's rule for a move between two groups below)."""
    return os.access(group, os.W_OK) and os.access(os.path.join(group, "cgroup.procs"), os.W_OK)


def delegated(name: str) -> Group | str:
    """Rootless: where the group `name` goes in the user's delegated cgroup, or why
    there is none (one line).

    The nearest group the user may change, from her own (v1) or the one above it
    (v2: a group holding processes cannot hand its children a controller) up: the
    container's group goes right below it. The kernel checks the same on each write
    (a directory and `cgroup.procs` of hers; on v2, the group above both the old
    and the new one of a process moved)."""
    found = pids_hierarchy()
    if found is None:
        return "this host has no pids cgroup controller"
    point, v2 = found
    own = own_group(point, v2)
    if own is None or not os.path.isdir(own):
        return f"this process's cgroup is not below {point}"
    group = os.path.dirname(own) if v2 and own != point else own
    while True:
        if group != point and _ours(group):
            break
        if group == point or not group.startswith(point + "/"):
            return (
                f"no cgroup of this user's around its own ({own}): none was delegated "
                "to it (systemd-run --user --scope -p Delegate=yes makes one)"
            )
        group = os.path.dirname(group)
    if v2 and b"pids" not in _read(os.path.join(group, "cgroup.controllers")).split():
        return f"the delegated cgroup {group} has no pids controller"
    return Group(os.path.join(group, PARENT + "-" + name), v2, (group,))


def create(group: Group, limit: int) -> None:
    """Make `group` (from `path_for` or `delegated`) with `pids.max` = `limit`, and the
    group the processes go in below it (`INNER`)."""
    path = group.path
    os.makedirs(os.path.dirname(path), 0o755, exist_ok=True)  # not contextlib: lean
    if group.v2:
        for above in group.delegating:
            _delegate_pids(above)
    os.mkdir(path, 0o755)
    try:
        _write(os.path.join(path, "pids.max"), str(limit).encode())
        os.mkdir(os.path.join(path, INNER), 0o755)
    except OSError:
        remove(path)
        raise


def add(path: str, pid: int) -> None:
    """Move process `pid` (of our pid namespace) into the group, before it has forked:
    its children are born there."""
    _write(os.path.join(path, INNER, "cgroup.procs"), str(pid).encode())


def remove(path: str, timeout: float = 5.0) -> None:
    """Remove the group once its processes are gone (an exiting one may keep it busy
    for a moment after its parent has reaped it), and every group below it, deepest
    first: `INNER`, and those a container that mounted its view made (see above)."""
    deadline = time.monotonic() + timeout
    for group in reversed(_groups(path)):
        _rmdir(group, deadline)


def _groups(path: str) -> list[str]:
    """`path` and the groups below it, each before those below it (no recursion: a
    container may nest its groups deeper than Python recurses)."""
    found: list[str] = []
    todo = [path]
    while todo:
        group = todo.pop()
        found.append(group)
        try:
            with os.scandir(group) as entries:
                todo += [e.path for e in entries if e.is_dir(follow_symlinks=False)]
        except FileNotFoundError:
            pass
    return found


def _rmdir(path: str, deadline: float) -> None:
    while True:
        try:
            os.rmdir(path)
            return
        except FileNotFoundError:
            return
        except OSError as e:
            if e.errno != errno.EBUSY or time.monotonic() > deadline:
                raise
            time.sleep(0.01)
