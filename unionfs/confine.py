"""What confines a `pyunion run` container, with podman's defaults, and where each part applies.

- **Capabilities** (`caps.py`): podman's default set; `--cap-add`, `--cap-drop`.
- **Seccomp** (`seccomp.py`): the default profile, or `--security-opt seccomp=FILE`;
  `seccomp=unconfined` turns it off. Its capability conditions follow the
  container's capabilities.
- **Masked paths**: kernel files that tell about, or act on, the host get
  /dev/null (files) or an empty read-only tmpfs (directories) bound over
  them; **read-only paths** (`/proc/sys`, ...) are bound read-only. The lists
  are podman's; `--security-opt mask=P1:P2` adds, `unmask=ALL|P1:P2` (globs
  allowed) removes.
- **File descriptors**: only 0, 1 and 2 reach the command, plus 3..N+2 with
  `--preserve-fds N` (which must all be open, as in podman).
- **no_new_privs**: off, so setuid programs in the image work as in podman;
  `--security-opt no-new-privileges` sets it.
- `--privileged`: every capability pyunion has, no seccomp, no masked or
  read-only paths, /sys writable, as podman.

`from_options` runs in pyunion itself (bad options are one line, exit 125,
before anything is mounted); `close_fds` and `mask_paths` in the container's
init; `enter` in the command, right before execve.
"""

from __future__ import annotations

import fcntl
import fnmatch
import os
import stat
from dataclasses import dataclass, field

from . import caps, seccomp, syscalls, userns, volumes
from .errors import UserError
from .seccomp import Program
from .syscalls import MS_BIND, MS_RDONLY, open_in_root

MASKED = (
    "/proc/acpi",
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/proc/sched_debug",
    "/proc/scsi",
    "/sys/firmware",
    "/sys/fs/selinux",
    "/sys/dev/block",
    "/sys/devices/virtual/powercap",
)
READ_ONLY = (
    "/proc/asound",
    "/proc/bus",
    "/proc/fs",
    "/proc/irq",
    "/proc/sys",
    "/proc/sysrq-trigger",
)


_DEFAULT_CAPS = caps.DEFAULT
_LAST_CAP = len(caps.NAMES) - 1


@dataclass
class Confinement:
    caps: frozenset[int] = _DEFAULT_CAPS
    last_cap: int = _LAST_CAP
    seccomp: seccomp.Filter | None = None
    no_new_privs: bool = False
    masked: tuple[str, ...] = MASKED
    read_only: tuple[str, ...] = READ_ONLY
    privileged: bool = False
    preserved: tuple[int, ...] = ()  # 3..N+2 with --preserve-fds N
    first_closed: int = 3  # every fd from here up is closed in the container
    compiled: Program | None = field(default=None, repr=False)  # seccomp.program's


def _fail(msg: str) -> UserError:
    return UserError(msg, 125)


def _split(value: str) -> tuple[str, str]:
    key, sep, val = value.partition("=")
    if not sep:
        key, sep, val = value.partition(":")  # Docker's old spelling, seccomp:FILE
    return key, val


def from_options(
    cap_add: list[str],
    cap_drop: list[str],
    privileged: bool,
    security_opts: list[str],
    preserve_fds: int,
) -> Confinement:
    """The container's confinement from podman's options (in pyunion, before anything else)."""
    if preserve_fds < 0:
        raise _fail("--preserve-fds must be 0 or more")
    profile: str | None = None
    unconfined = privileged
    nnp = False
    masked, read_only = list(MASKED), list(READ_ONLY)
    for opt in security_opts:
        key, val = _split(opt)
        if key == "seccomp" and val:
            if val == "unconfined":
                unconfined = True
            else:
                profile = val
        elif key == "no-new-privileges" and val in ("", "true", "false"):
            nnp = val != "false"
        elif key == "mask" and val:
            masked += [p for p in val.split(":") if p]
        elif key == "unmask" and val:
            pats = ["*"] if val == "ALL" else [p for p in val.split(":") if p]
            masked = [p for p in masked if not any(fnmatch.fnmatchcase(p, x) for x in pats)]
            read_only = [p for p in read_only if not any(fnmatch.fnmatchcase(p, x) for x in pats)]
        elif key == "systempaths" and val == "unconfined":  # Docker's unmask=ALL
            masked, read_only = [], []
        elif key == "label" and val:
            pass  # SELinux labels: there is no SELinux here (podman ignores them too then)
        elif key == "apparmor" and val == "unconfined":
            pass
        else:
            raise _fail(
                f"unsupported --security-opt {opt!r} (supported: seccomp=unconfined|FILE, "
                "no-new-privileges, mask=PATHS, unmask=ALL|PATHS, label=...)"
            )
    for fd in range(3, 3 + preserve_fds):
        if not _is_open(fd):  # podman's rule: what is asked for must have been passed
            raise _fail(f"--preserve-fds {preserve_fds}: file descriptor {fd} is not open")
    for p in masked:
        if not p.startswith("/"):
            raise _fail(f"--security-opt mask: {p!r} is not an absolute path")
    available = caps.bounding_set()
    adds, drops = caps.parse(cap_add, "--cap-add"), caps.parse(cap_drop, "--cap-drop")
    base = available if privileged else caps.DEFAULT
    capset = caps.merge(base, adds, drops, available)
    conf = Confinement(
        caps=capset,
        last_cap=caps.last_cap(),
        no_new_privs=nnp,
        masked=() if privileged else tuple(masked),
        read_only=() if privileged else tuple(read_only),
        privileged=privileged,
        preserved=tuple(range(3, 3 + preserve_fds)),
        first_closed=3 + preserve_fds,
    )
    if not unconfined:
        conf.seccomp = seccomp.load_profile(profile, capset)
    return conf


def _is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


# -- in the container's init --------------------------------------------------------------------
def close_fds(conf: Confinement, own: list[int]) -> list[int]:
    """Close every fd but 0-2, the preserved ones and `own` (init's, returned renumbered
    above the preserved range, close-on-exec)."""
    moved = []
    for fd in own:
        new = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, conf.first_closed)
        os.close(fd)
        moved.append(new)
    syscalls.close_fds_from(conf.first_closed, moved)
    return moved


def mask_paths(rootfd: int, conf: Confinement) -> None:
    """Bind /dev/null over masked files, an empty read-only tmpfs over masked directories,
    and make the read-only paths read-only (with every mount below them). Paths that do
    not exist are left alone, as in podman."""
    null = open_in_root(rootfd, "/dev/null")
    try:
        for path in conf.masked:
            fd = _open_existing(rootfd, path)
            if fd is None:
                continue
            try:
                if stat.S_ISDIR(os.fstat(fd).st_mode):
                    syscalls.mount("tmpfs", syscalls.fd_str(fd), "tmpfs", MS_RDONLY)
                else:
                    syscalls.mount(syscalls.fd_str(null), syscalls.fd_str(fd), None, MS_BIND)
            finally:
                os.close(fd)
    finally:
        os.close(null)
    for path in conf.read_only:
        fd = _open_existing(rootfd, path)
        if fd is None:
            continue
        try:
            syscalls.mount(
                syscalls.fd_str(fd), syscalls.fd_str(fd), None, MS_BIND | syscalls.MS_REC
            )
        finally:
            os.close(fd)
        fd = open_in_root(rootfd, path)  # the new mount, not the one under it
        try:
            volumes.set_attrs(
                fd,
                syscalls.MOUNT_ATTR_RDONLY
                | syscalls.MOUNT_ATTR_NOSUID
                | syscalls.MOUNT_ATTR_NODEV
                | syscalls.MOUNT_ATTR_NOEXEC,
            )
        finally:
            os.close(fd)


def _open_existing(rootfd: int, path: str) -> int | None:
    try:
        return open_in_root(rootfd, path)
    except (FileNotFoundError, NotADirectoryError):
        return None


def prepare(conf: Confinement) -> None:
    """Build the seccomp filter (in init, while the host's libseccomp can still be found)."""
    if conf.seccomp is not None and conf.compiled is None:
        conf.compiled = seccomp.compile(conf.seccomp)


# -- in the command, just before execve -----------------------------------------------------------
def enter(conf: Confinement, uid: int, gid: int, groups: list[int], keep: list[int]) -> None:
    """Become the command: fds, bounding set, seccomp, user, capability sets, no_new_privs.

    The order is runc's: without no_new_privs, loading a filter needs
    CAP_SYS_ADMIN, so it comes before the user switch and the capability cut
    (the filter lets those calls through); with no_new_privs it comes last,
    so the fewest syscalls run under it before execve.
    """
    syscalls.close_fds_from(conf.first_closed, keep)  # `keep`: the caller's own, close-on-exec
    for fd in conf.preserved:
        os.set_inheritable(fd, True)
    if not conf.privileged:
        caps.apply_bounding(conf.caps, conf.last_cap)
    if conf.compiled is not None and not conf.no_new_privs:
        seccomp.install(conf.compiled)
    syscalls.set_keepcaps(True)
    try:
        os.setgroups(groups)
    except PermissionError:
        # A user namespace without subordinate gids denies setgroups: the kernel keeps
        # the process's groups (the user's own, unmapped ones show as nogroup), as podman.
        if not userns.setgroups_denied():
            raise
    os.setgid(gid)
    os.setuid(uid)
    syscalls.set_keepcaps(False)
    caps.apply_sets(conf.caps, uid == 0)
    if conf.no_new_privs:
        syscalls.set_no_new_privs()
        if conf.compiled is not None:
            seccomp.install(conf.compiled)
