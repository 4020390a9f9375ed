"""A container's cgroup: the bounds on its processes, memory and CPU (podman's
`--pids-limit`, `--memory`, `--memory-swap`, `--memory-reservation`, `--cpus`,
`--cpu-shares`).

Without one, a fork bomb in a container fills the host's pid space and every user's
next fork fails. podman puts each container in a cgroup whose `pids.max` is 2048
unless told otherwise; `pyunion run` does the same wherever the pids controller is
(cgroup v2, or v1's own `pids` hierarchy as on hybrid hosts), under a `pyunion`
group at the hierarchy's root (podman's cgroupfs manager: `libpod_parent`). The
memory and cpu limits go in the same group on v2, in a group of the same name in
each controller's own hierarchy on v1 (`Limits.settings` names the files of each);
a limit asked for where its controller is missing is an error, never ignored.

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


def hierarchy(controller: str) -> tuple[str, bool] | None:
    """(mount point, is v2) of the hierarchy that has `controller`, if any: a cgroup v1
    mount with it among its options, else cgroup2 listing it. The one place that tells
    v1 from v2 (`Group.v2`)."""
    unified = None
    for point, fstype, options in mounts():
        if fstype == "cgroup" and controller in options.split(","):
            return point, False
        if fstype == "cgroup2" and unified is None:
            unified = point
    if (
        unified is not None
        and controller.encode() in _read(unified + "/cgroup.controllers").split()
    ):
        return unified, True
    return None


MIN_MEMORY = 6 * 1024 * 1024  # podman's ("minimum memory limit allowed is 6MB")
CPU_PERIOD = 100000  # podman's --cpus period (us)
OPTION = {"pids": "--pids-limit", "memory": "--memory", "cpu": "--cpus"}  # for messages


class Limits:
    """podman's resource options, checked as podman checks them (`check`), and the
    cgroup files each sets (`settings`). None: not given; `pids` <= 0, `memory_swap`
    -1: unlimited."""

    __slots__ = ("cpu_shares", "cpus", "memory", "memory_reservation", "memory_swap", "pids")

    def __init__(
        self,
        pids: int | None = None,
        memory: int | None = None,
        memory_swap: int | None = None,
        memory_reservation: int | None = None,
        cpus: float | None = None,
        cpu_shares: int | None = None,
    ) -> None:
        self.pids = pids
        self.memory = memory or None  # 0: no limit, as podman
        self.memory_swap = memory_swap
        self.memory_reservation = memory_reservation or None
        self.cpus = cpus or None
        self.cpu_shares = cpu_shares or None

    def check(self) -> str | None:
        """Why these limits are refused (podman's rules), or None."""
        if self.memory is not None and self.memory < MIN_MEMORY:
            return "--memory: the minimum memory limit allowed is 6MB"
        if self.memory_swap is not None:
            if self.memory is None:
                return "--memory-swap: needs --memory (a limit of memory plus swap)"
            if self.memory_swap != -1 and self.memory_swap < self.memory:
                return "--memory-swap: must be -1 or at least --memory (it is memory plus swap)"
        if (
            self.memory is not None
            and self.memory_reservation is not None
            and self.memory_reservation > self.memory
        ):
            return "--memory-reservation: must not be more than --memory"
        if self.cpus is not None and not 0.01 <= self.cpus <= 1 << 20:  # NaN too
            return "--cpus: must be a number of CPUs from 0.01 (0: no limit)"
        if self.cpu_shares is not None and not 2 <= self.cpu_shares <= 262144:
            return "--cpu-shares: must be from 2 to 262144"
        return None

    def required(self) -> tuple[str, ...]:
        """The controllers the options given need (an error where one is missing)."""
        need = []
        if self.pids is not None and self.pids > 0:
            need.append("pids")
        if self.memory is not None or self.memory_reservation is not None:
            need.append("memory")
        if self.cpus is not None or self.cpu_shares is not None:
            need.append("cpu")
        return tuple(need)

    def optional(self) -> tuple[str, ...]:
        """The controllers used where there are (podman's default pids limit)."""
        return ("pids",) if self.pids is None else ()

    def settings(self, controller: str, v2: bool) -> list[tuple[str, str, bool]]:
        """(file, value, required) for `controller`, in the order they are written (v1:
        the memory limit before memory+swap, which may not be below it). Not required:
        podman's default swap (twice the memory) where the kernel accounts no swap."""
        out: list[tuple[str, str, bool]] = []
        if controller == "pids":
            out.append(("pids.max", str(self.pids or DEFAULT_PIDS_LIMIT), True))
        elif controller == "memory":
            mem, swap, low = self.memory, self.memory_swap, self.memory_reservation
            given = swap is not None
            if mem is not None:
                if swap is None:
                    swap = 2 * mem  # podman's default
                out.append(("memory.max" if v2 else "memory.limit_in_bytes", str(mem), True))
                if v2:
                    out.append(("memory.swap.max", "max" if swap == -1 else str(swap - mem), given))
                else:
                    out.append(("memory.memsw.limit_in_bytes", str(swap), given))
            if low is not None:
                out.append(("memory.low" if v2 else "memory.soft_limit_in_bytes", str(low), True))
        elif controller == "cpu":
            if self.cpus is not None:
                quota = round(self.cpus * CPU_PERIOD)
                if v2:
                    out.append(("cpu.max", f"{quota} {CPU_PERIOD}", True))
                else:
                    out.append(("cpu.cfs_period_us", str(CPU_PERIOD), True))
                    out.append(("cpu.cfs_quota_us", str(quota), True))
            if self.cpu_shares is not None:
                if v2:  # crun's conversion of shares to a weight
                    weight = 1 + ((self.cpu_shares - 2) * 9999) // 262142
                    out.append(("cpu.weight", str(weight), True))
                else:
                    out.append(("cpu.shares", str(self.cpu_shares), True))
        return out


class Group:
    """Where a container's group goes in one hierarchy (`path`), v2 or not, the
    controllers it limits there, and the groups above it that must hand their
    children those controllers first (v2), the nearest last."""

    __slots__ = ("controllers", "delegating", "path", "v2")

    def __init__(
        self, path: str, v2: bool, delegating: tuple[str, ...], controllers: tuple[str, ...]
    ) -> None:
        self.path = path
        self.v2 = v2
        self.delegating = delegating
        self.controllers = controllers


def _delegate(group: str, controllers: tuple[str, ...]) -> None:
    """cgroup v2: a group's children get a controller's files only once it hands them
    the controller (the root group may, and one that holds no process of its own)."""
    have = _read(os.path.join(group, "cgroup.subtree_control")).split()
    missing = [c for c in controllers if c.encode() not in have]
    if missing:
        line = " ".join("+" + c for c in missing)
        _write(os.path.join(group, "cgroup.subtree_control"), line.encode())


def _by_hierarchy(
    required: tuple[str, ...], optional: tuple[str, ...]
) -> dict[tuple[str, bool], list[str]] | str:
    """The controllers wanted, by the hierarchy that has each (one on v2, several on
    v1); a required one missing: why (one line)."""
    found: dict[tuple[str, bool], list[str]] = {}
    for controller in required + optional:
        where = hierarchy(controller)
        if where is None:
            if controller in required:
                return f"this host has no {controller} cgroup controller"
            continue
        found.setdefault(where, []).append(controller)
    return found


def path_for(
    name: str, required: tuple[str, ...], optional: tuple[str, ...] = ()
) -> list[Group] | str:
    """Root's: where the group `name` goes in each hierarchy, or why not (one line)."""
    found = _by_hierarchy(required, optional)
    if isinstance(found, str):
        return found
    groups = []
    for (point, v2), controllers in found.items():
        parent = os.path.join(point, PARENT)
        groups.append(Group(os.path.join(parent, name), v2, (point, parent), tuple(controllers)))
    return groups


def own_group(point: str, v2: bool, controller: str = "pids") -> str | None:
    """This process's group in the hierarchy mounted at `point` (/proc/self/cgroup)."""
    for line in _read("/proc/self/cgroup").decode(errors="surrogateescape").splitlines():
        _, controllers, rel = line.split(":", 2)
        if (controllers == "") if v2 else (controller in controllers.split(",")):
            return os.path.join(point, rel.lstrip("/")).rstrip("/")
    return None


def _ours(group: str) -> bool:
    """Whether this user may make groups in `group` and move processes across it (its
    directory and its `cgroup.procs`: v2's rule for a move between two groups below)."""
    return os.access(group, os.W_OK) and os.access(os.path.join(group, "cgroup.procs"), os.W_OK)


def delegated(
    name: str, required: tuple[str, ...], optional: tuple[str, ...] = ()
) -> list[Group] | str:
    """Rootless: where the group `name` goes in the user's delegated cgroup of each
    hierarchy, or why there is none (one line).

    The nearest group the user may change, from her own (v1) or the one above it
    (v2: a group holding processes cannot hand its children a controller) up: the
    container's group goes right below it. The kernel checks the same on each write
    (a directory and `cgroup.procs` of hers; on v2, the group above both the old
    and the new one of a process moved)."""
    found = _by_hierarchy(required, optional)
    if isinstance(found, str):
        return found
    if not found:
        return "this host has no pids cgroup controller"
    groups = []
    for (point, v2), controllers in found.items():
        own = own_group(point, v2, controllers[0])
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
        if v2:
            have = _read(os.path.join(group, "cgroup.controllers")).split()
            for controller in list(controllers):
                if controller.encode() not in have:
                    if controller in required:
                        return f"the delegated cgroup {group} has no {controller} controller"
                    controllers.remove(controller)
            if not controllers:
                return f"the delegated cgroup {group} has no pids controller"
        path = os.path.join(group, PARENT + "-" + name)
        groups.append(Group(path, v2, (group,), tuple(controllers)))
    return groups


def create(groups: list[Group], limits: Limits) -> None:
    """Make each of `groups` (from `path_for` or `delegated`) with the files `limits`
    sets there, and the group the processes go in below it (`INNER`); on an error,
    none of them."""
    made: list[str] = []
    try:
        for group in groups:
            path = group.path
            os.makedirs(os.path.dirname(path), 0o755, exist_ok=True)  # not contextlib: lean
            if group.v2:
                for above in group.delegating:
                    _delegate(above, group.controllers)
            os.mkdir(path, 0o755)
            made.append(path)
            for controller in group.controllers:
                for file, value, required in limits.settings(controller, group.v2):
                    try:
                        _write(os.path.join(path, file), value.encode())
                    except FileNotFoundError:
                        if required:
                            raise
            os.mkdir(os.path.join(path, INNER), 0o755)
    except OSError:
        for path in made:
            remove(path)
        raise


def add(paths: list[str], pid: int) -> None:
    """Move process `pid` (of our pid namespace) into the groups, before it has forked:
    its children are born there."""
    for path in paths:
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
