"""What /proc says about mounts and processes, with the lightest of imports.

The supervisor of a running container (`supervise.py`) imports this in a fresh
interpreter that lives as long as the container: no module here may pull in
more than `os`, `select`, `time` and `_signal` (`mount.py` re-exports these names).
"""

from __future__ import annotations

import os
import select
import time

TYPE_CHECKING = False
if TYPE_CHECKING:
    import signal as _signal
else:
    import _signal  # `signal` imports enum


# -- mount table ---------------------------------------------------------------
def fuse_fd() -> int | None:
    """This process's /dev/fuse fd (a daemon has one), None if it has none."""
    try:
        names = os.listdir("/proc/self/fd")
    except OSError:
        return None
    for name in names:
        try:
            if os.readlink(f"/proc/self/fd/{name}") == "/dev/fuse":
                return int(name)
        except (OSError, ValueError):
            continue
    return None


def fuse_device() -> tuple[int, int] | None:
    """(major, minor) of the mount this process serves, from its /dev/fuse fd's
    `fuse_connection` (fdinfo, Linux 6.x): the device that names its bdi in sysfs.
    None when no fd says (an older kernel)."""
    fd = fuse_fd()
    if fd is None:
        return None
    try:
        with open(f"/proc/self/fdinfo/{fd}") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key == "fuse_connection":
                    dev = int(value)  # the kernel's dev_t: MINORBITS = 20
                    return dev >> 20, dev & 0xFFFFF
    except (OSError, ValueError):
        pass
    return None


def unescape_mountinfo(s: str) -> str:
    return (
        s.replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n").replace("\\134", "\\")
    )


def mount_table() -> list[tuple[int, str, str, str, str, str]]:
    """Every mount in this namespace, as /proc/self/mountinfo lists it (oldest first): (mount
    id, device major:minor, root of the mount in its filesystem, mount point, fs type, super
    options)."""
    out = []
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                left, _, right = line.partition(" - ")
                fields = left.split()
                rfields = right.split()
                if len(fields) >= 5 and len(rfields) >= 3 and fields[0].isdigit():
                    out.append(
                        (
                            int(fields[0]),
                            fields[2],
                            unescape_mountinfo(fields[3]),
                            unescape_mountinfo(fields[4]),
                            rfields[0],
                            unescape_mountinfo(rfields[2]),
                        )
                    )
    except OSError:
        pass
    return out


def mounts() -> list[tuple[str, str, str]]:
    """(mount point, fs type, super options) of every mount in this namespace."""
    return [(mp, fstype, opts) for _, _, _, mp, fstype, opts in mount_table()]


def mount_id(fd: int) -> int:
    """The id of the mount `fd` was opened through (its fdinfo's `mnt_id`), -1 if unknown."""
    try:
        with open(f"/proc/self/fdinfo/{fd}") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key == "mnt_id":
                    return int(value)
    except (OSError, ValueError):
        pass
    return -1


def fuse_mounter(dev: int) -> int | None:
    """The user a FUSE filesystem of device `dev` was mounted by (its `user_id`, as the
    kernel says it), or None where `dev` is no FUSE mount here."""
    want = f"{os.major(dev)}:{os.minor(dev)}"
    for _, device, _, _, fstype, opts in mount_table():
        if device != want:
            continue
        if fstype not in ("fuse", "fuseblk") and not fstype.startswith("fuse."):
            return None
        for opt in opts.split(","):
            if opt.startswith("user_id=") and opt[8:].isdigit():
                return int(opt[8:])
        return None
    return None


def is_mountpoint(path: str) -> bool:
    real = os.path.realpath(path)
    return any(mp == real for mp, _, _ in mounts())


def status(pid: int | str, keys: tuple[bytes, ...]) -> dict[bytes, bytes]:
    """The fields `keys` of /proc/PID/status (`Uid`, `Groups`, `CapEff`, `SigBlk`...), each
    value as written there, stripped; a field the file lacks is left out. OSError when
    the process is gone (or /proc cannot be read)."""
    out: dict[bytes, bytes] = {}
    with open(f"/proc/{pid}/status", "rb") as f:
        for line in f:
            key, _, value = line.partition(b":")
            if key in keys:
                out[key] = value.strip()
    return out


def process_alive(pid: int) -> bool:
    """Whether a thread of process `pid` still runs.

    A zombie or a dead process is not alive; but a zombie thread-group leader
    whose other threads still run is: they still hold its open files.
    """
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return False
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X"):
                    return True
        except (OSError, IndexError):
            continue
    return False


def wait_gone(pid: int, timeout: float) -> bool:
    """Wait until every thread of `pid` is gone; False if one still runs after `timeout` s.

    Woken by a pidfd, which the kernel signals when the whole thread group has
    exited (its files closed), so a caller can unmount what it held right away.
    """
    deadline = time.monotonic() + timeout
    try:
        pidfd = os.pidfd_open(pid)
    except OSError:  # gone already (ESRCH), or no pidfds (ENOSYS): poll /proc
        pidfd = -1
    try:
        poll = select.poll()
        if pidfd >= 0:
            poll.register(pidfd, select.POLLIN)
        while process_alive(pid):
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            if pidfd >= 0:
                poll.poll(max(1, int(min(left, 1.0) * 1000)))
            else:
                time.sleep(min(left, 0.02))
        return True
    finally:
        if pidfd >= 0:
            os.close(pidfd)


def start_time(pid: int) -> int | None:
    """When process `pid` started, in clock ticks after boot (/proc/PID/stat's 22nd
    field); None when it is gone. With the pid, it names one process for good."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        return int(fields[19])
    except (OSError, IndexError, ValueError):
        return None


def process_id(pid: int) -> bytes:
    """The process `pid` as "PID START", as a process that may outlive its parent is told
    of it (`open_process`). Call it while `pid` cannot be reaped (a child of the caller)."""
    return f"{pid} {start_time(pid) or 0}".encode()


def open_process(told: bytes) -> int | None:
    """A pidfd of the process `process_id` named, if it is still there (a zombie too),
    not only its pid.

    Opened first, then checked: a pid is reused as soon as its process is reaped, so the
    number alone could name another process by now, and signalling that as root is what
    a janitor of a killed pyunion must never do. The start time read through the pid once
    the pidfd holds it tells whether the pidfd is of the process named."""
    pid_s, _, start_s = told.partition(b" ")
    if not (pid_s.isdigit() and start_s.isdigit()) or len(pid_s) > 10:  # bytes: ASCII
        return None
    try:
        pidfd = os.pidfd_open(int(pid_s))
    except OSError:
        return None
    if start_time(int(pid_s)) != int(start_s):
        os.close(pidfd)
        return None
    return pidfd


def kill_and_wait(pidfd: int, sig: int, timeout: float) -> bool:
    """Send `sig` (0: none) to the process of `pidfd` and wait up to `timeout` s for its
    whole thread group to exit (the pidfd turns readable); whether it did."""
    if sig:
        try:
            _signal.pidfd_send_signal(pidfd, sig)
        except ProcessLookupError:
            return True
    return bool(select.select([pidfd], [], [], max(timeout, 0))[0])


def stop(told: bytes, grace: float) -> None:
    """Wait up to `grace` s for the process `process_id` named to exit, SIGTERM it and wait
    as long again, then SIGKILL it; reap it if it is our child. Through a pidfd of that
    very process (`open_process`): a mount's daemon may be a child of the fork server, or
    of a pyunion that was killed, and its pid another process's once it was reaped."""
    pidfd = open_process(told)
    if pidfd is None:
        return  # gone, and reaped
    try:
        if not kill_and_wait(pidfd, 0, grace) and not kill_and_wait(pidfd, _signal.SIGTERM, grace):
            kill_and_wait(pidfd, _signal.SIGKILL, grace)
        try:  # noqa: SIM105 - no contextlib here (see the imports)
            os.waitid(os.P_PIDFD, pidfd, os.WEXITED | os.WNOHANG)
        except ChildProcessError:
            pass  # not ours
    finally:
        os.close(pidfd)
