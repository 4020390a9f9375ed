"""A container's cgroup: the bound on its number of processes (podman's pids limit).

Without one, a fork bomb in a container fills the host's pid space and every user's
next fork fails. podman puts each container in a cgroup whose `pids.max` is 2048
unless told otherwise; `pyunion run` does the same wherever the pids controller is
(cgroup v2, or v1's own `pids` hierarchy as on hybrid hosts), under a `pyunion`
group at the hierarchy's root (podman's cgroupfs manager: `libpod_parent`).

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
    cgroup v1 mount with `pids` among its options, else cgroup2 listing it."""
    unified = None
    for point, fstype, options in mounts():
        if fstype == "cgroup" and "pids" in options.split(","):
            return point, False
        if fstype == "cgroup2" and unified is None:
            unified = point
    if unified is not None and b"pids" in _read(unified + "/cgroup.controllers").split():
        return unified, True
    return None


def _delegate_pids(group: str) -> None:
    """cgroup v2: a group's children get `pids.max` only once it hands them the
    controller (the root group may, and `pyunion` holds no process of its own)."""
    if b"pids" not in _read(os.path.join(group, "cgroup.subtree_control")).split():
        _write(os.path.join(group, "cgroup.subtree_control"), b"+pids")


def path_for(name: str) -> str | None:
    """Where the group `name` goes, or None where there is no pids controller."""
    found = pids_hierarchy()
    return None if found is None else os.path.join(found[0], PARENT, name)


def create(path: str, limit: int) -> None:
    """Make the group at `path` (from `path_for`) with `pids.max` = `limit`, and the
    group the processes go in below it (`INNER`)."""
    parent = os.path.dirname(path)
    hierarchy = os.path.dirname(parent)
    v2 = os.path.exists(os.path.join(hierarchy, "cgroup.controllers"))  # v1 has none
    os.makedirs(parent, 0o755, exist_ok=True)  # not contextlib: the supervisor is lean
    if v2:
        _delegate_pids(hierarchy)
        _delegate_pids(parent)
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
