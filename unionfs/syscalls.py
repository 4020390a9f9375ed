"""Thin wrappers of the Linux syscalls Python's `os` module lacks, written once.

Each wrapper raises `OSError` with the errno, like the `os` functions, so
callers handle them the same way. libc is loaded here and nowhere else.

`fdpath` names an object we hold by fd ("/proc/self/fd/N[/NAME]") for the
calls that have no dir_fd form (xattrs, chmod, mount(2)): the directory part
is the fd itself, so no symlink on the way is followed, and with
follow_symlinks=False neither is the last component.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import importlib
import os
import stat
import sys
import time
from types import ModuleType

TYPE_CHECKING = False  # typing's, without importing typing (architecture.md)
if TYPE_CHECKING:
    from collections.abc import Callable, Iterable

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long

# Libraries that third-party modules look up with ctypes.util.find_library, which runs
# `ldconfig -p` once per name (~10 ms apiece, on every mount and container start: trio
# for pthread, pyseccomp for libc and libseccomp). The sonames of glibc's and Debian's
# (most distributions') libraries open directly; only when they do not is the search
# left to find_library.
SONAMES = {
    "c": "libc.so.6",
    "pthread": "libpthread.so.0",
    "seccomp": "libseccomp.so.2",
    "fuse3": "libfuse3.so.3",
}


def import_with_sonames(
    name: str, load: Callable[[str], ModuleType] = importlib.import_module
) -> ModuleType:
    """Import module NAME (with `load`) with `find_library` answering SONAMES without
    `ldconfig -p`."""
    import ctypes.util

    if name in sys.modules:
        return sys.modules[name]
    search = ctypes.util.find_library

    def find_library(name: str) -> str | None:
        soname = SONAMES.get(name)
        if soname is not None:
            try:
                ctypes.CDLL(soname)
                return soname
            except OSError:
                pass
        return search(name)

    ctypes.util.find_library = find_library
    try:
        return load(name)
    finally:
        ctypes.util.find_library = search


# renameat2(2)
RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
RENAME_WHITEOUT = 4

# unshare(2) / setns(2)
CLONE_NEWNS = 0x00020000
CLONE_NEWCGROUP = 0x02000000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000

# mount(2)
MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_REMOUNT = 0x20
MS_BIND = 0x1000
MS_REC = 0x4000
MS_STRICTATIME = 0x1000000
MS_PRIVATE = 0x40000
MS_SLAVE = 0x80000
MNT_FORCE = 0x1
MNT_DETACH = 0x2
UMOUNT_NOFOLLOW = 0x8

# openat2(2)
AT_FDCWD = -100  # a dirfd that means the current directory
RESOLVE_NO_XDEV = 0x01
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_NO_SYMLINKS = 0x04
RESOLVE_BENEATH = 0x08
RESOLVE_IN_ROOT = 0x10

# mount_setattr(2)
AT_RECURSIVE = 0x8000
MOUNT_ATTR_RDONLY = 0x1
MOUNT_ATTR_NOSUID = 0x2
MOUNT_ATTR_NODEV = 0x4
MOUNT_ATTR_NOEXEC = 0x8

# The new mount API: fsopen(2), fsconfig(2), fsmount(2), move_mount(2)
FSOPEN_CLOEXEC = 0x1
FSCONFIG_SET_FLAG = 0
FSCONFIG_SET_STRING = 1
FSCONFIG_CMD_CREATE = 6
FSMOUNT_CLOEXEC = 0x1
MOVE_MOUNT_F_EMPTY_PATH = 0x4
MOVE_MOUNT_T_EMPTY_PATH = 0x40
OPEN_TREE_CLONE = 0x1
OPEN_TREE_CLOEXEC = os.O_CLOEXEC

# prctl(2)
PR_SET_PDEATHSIG = 1
PR_SET_NAME = 15
PR_SET_NO_NEW_PRIVS = 38

# Syscall numbers glibc 2.36 has no wrapper for.
SYS_OPENAT2 = 437  # the same number on every architecture (new syscall table)
SYS_MOUNT_SETATTR = 442  # likewise
SYS_CLOSE_RANGE = 436  # likewise
SYS_OPEN_TREE = 428  # likewise, and the four below
SYS_MOVE_MOUNT = 429
SYS_FSOPEN = 430
SYS_FSCONFIG = 431
SYS_FSMOUNT = 432
SYS_PIVOT_ROOT = {
    "x86_64": 155,
    "aarch64": 41,
    "riscv64": 41,
    "ppc64le": 203,
    "s390x": 217,
    "i686": 217,
    "armv7l": 218,
}.get(os.uname().machine)

SYS_SECCOMP = {
    "x86_64": 317,
    "aarch64": 277,
    "riscv64": 277,
    "ppc64le": 358,
    "s390x": 348,
    "i686": 354,
    "armv7l": 383,
}.get(os.uname().machine)

SYS_KEYCTL = {
    "x86_64": 250,
    "aarch64": 219,
    "riscv64": 219,
    "ppc64le": 271,
    "s390x": 280,
    "i686": 288,
    "armv7l": 311,
}.get(os.uname().machine)
KEYCTL_JOIN_SESSION_KEYRING = 1

# seccomp(2)
SECCOMP_SET_MODE_FILTER = 1
SECCOMP_FILTER_FLAG_LOG = 2
SECCOMP_FILTER_FLAG_SPEC_ALLOW = 4


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_char_p)]


def _check(ret: int, what: str, path: str | bytes | None = None) -> int:
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}", path)
    return ret


def _enc(s: str | bytes | None) -> bytes | None:
    return None if s is None else os.fsencode(s)


# -- names -------------------------------------------------------------------------------
def fdpath(dirfd: int, name: bytes = b"") -> bytes:
    """/proc/self/fd/DIRFD[/NAME]: a path that resolves through an fd we hold."""
    if name:
        return b"/proc/self/fd/%d/%s" % (dirfd, name)
    return b"/proc/self/fd/%d" % dirfd


def read_to_eof(fd: int, chunk: int = 65536) -> bytes:
    """Everything `fd` (a pipe, usually a child's report) gives until EOF."""
    parts = []
    while part := os.read(fd, chunk):
        parts.append(part)
    return b"".join(parts)


def fd_str(fd: int) -> str:
    """`fdpath` of a lone fd, as a str (for mount(2) targets and `os.open`)."""
    return f"/proc/self/fd/{fd}"


# -- files -------------------------------------------------------------------------------
def chmod_nofollow(dirfd: int, name: str | bytes, mode: int) -> bool:
    """chmod NAME in DIRFD, never through a symlink; False (nothing done) for a symlink.

    Whoever can write the directory (a user owning an upper layer) may swap NAME
    for a symlink to any file between a check and a chmod by path, and root
    would then chmod that file: the mode goes to the object opened here instead.
    """
    fd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dirfd)
    try:
        if stat.S_ISLNK(os.fstat(fd).st_mode):
            return False  # a symlink's mode cannot change (lchmod is EOPNOTSUPP)
        os.chmod(fd_str(fd), mode)
        return True
    finally:
        os.close(fd)


_libc.renameat2.argtypes = [
    ctypes.c_int,
    ctypes.c_char_p,
    ctypes.c_int,
    ctypes.c_char_p,
    ctypes.c_uint,
]
_libc.renameat2.restype = ctypes.c_int


def renameat2(olddirfd: int, oldname: bytes, newdirfd: int, newname: bytes, flags: int = 0) -> None:
    if flags == 0:
        os.rename(oldname, newname, src_dir_fd=olddirfd, dst_dir_fd=newdirfd)
        return
    if _libc.renameat2(olddirfd, oldname, newdirfd, newname, flags) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


UTIME_OMIT = (1 << 30) - 2  # a timespec's tv_nsec: leave this time as it is


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


_libc.futimens.argtypes = [ctypes.c_int, ctypes.POINTER(_Timespec)]
_libc.utimensat.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.POINTER(_Timespec), ctypes.c_int]


def _timespec(ns: int | None) -> _Timespec:
    if ns is None:
        return _Timespec(0, UTIME_OMIT)
    return _Timespec(*divmod(ns, 1_000_000_000))


def utimens(target: int | bytes, atime_ns: int | None, mtime_ns: int | None) -> None:
    """`os.utime(target, ns=(atime_ns, mtime_ns))` where a time given as None is left as
    it is (UTIME_OMIT): setting one time alone needs no stat to read the other first,
    and cannot put back an older value of it. `target` is an fd or a path (followed,
    as os.utime does: an fdpath reaches the object itself, a symlink too)."""
    times = (_Timespec * 2)(_timespec(atime_ns), _timespec(mtime_ns))
    if isinstance(target, int):
        _check(_libc.futimens(target, times), "futimens")
    else:
        _check(_libc.utimensat(AT_FDCWD, target, times, 0), "utimensat", target)


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


OPENAT2_TRIES = 16  # EAGAIN retries (below): bounded, so a flood of renames cannot hang us
OPENAT2_QUICK_TRIES = 4  # then each retry waits, 1 ms doubling up to 0.1 s (~0.8 s in all)


def openat2(dirfd: int, path: str | bytes, flags: int, resolve: int, mode: int = 0) -> int:
    """openat2(2). With RESOLVE_IN_ROOT or RESOLVE_BENEATH a `..` walked while any rename
    or mount happened anywhere on the system is EAGAIN (the kernel cannot tell it stayed
    inside): retried, as openat2(2) says to, a bounded number of times, the later ones
    after a pause. A walk through a FUSE tree is slow enough for another process's
    mounts and unmounts (a daemon letting go of its layers' mount clones) to fail all
    of 16 retries in a row: a container's setup said EAGAIN for its /etc/resolv.conf."""
    how = _OpenHow(flags | os.O_CLOEXEC, mode, resolve)
    name = _enc(path)
    for attempt in range(OPENAT2_TRIES):
        fd = _libc.syscall(SYS_OPENAT2, dirfd, name, ctypes.byref(how), ctypes.sizeof(how))
        if fd >= 0 or ctypes.get_errno() != errno.EAGAIN:
            break
        if attempt >= OPENAT2_QUICK_TRIES:
            time.sleep(min(0.001 * 2 ** (attempt - OPENAT2_QUICK_TRIES), 0.1))
    return _check(fd, "open", path)


AT_HANDLE_FID = 0x200  # name_to_handle_at: a handle to tell objects apart, not to open
_MAX_HANDLE_SZ = 128
_HANDLE_HEAD = _MAX_HANDLE_SZ.to_bytes(4, sys.byteorder)
_name_to_handle_at = _libc.name_to_handle_at
_name_to_handle_at.argtypes = [
    ctypes.c_int,
    ctypes.c_char_p,
    ctypes.c_char_p,
    ctypes.POINTER(ctypes.c_int),
    ctypes.c_int,
]
_fid_flag = [AT_HANDLE_FID]  # dropped if the kernel refuses it (before 6.5)


def file_handle(fd: int, name: bytes = b"") -> bytes | None:
    """The file handle of NAME in directory `fd` (not followed), or of `fd` itself: its
    type and bytes, which hold the inode's generation besides its number, so that an
    object made where a removed one was, with its inode number, has another handle.
    None where the filesystem has none (EOPNOTSUPP)."""
    buf = ctypes.create_string_buffer(_HANDLE_HEAD, 8 + _MAX_HANDLE_SZ)
    mount_id = ctypes.c_int()
    flags = _fid_flag[0] | (0 if name else AT_EMPTY_PATH)
    while _name_to_handle_at(fd, name, buf, ctypes.byref(mount_id), flags) < 0:
        err = ctypes.get_errno()
        if err == errno.EINVAL and flags & AT_HANDLE_FID:
            _fid_flag[0] = 0
            flags &= ~AT_HANDLE_FID
            continue
        if err in (errno.EOPNOTSUPP, errno.ENOSYS):
            return None
        raise OSError(err, os.strerror(err), name or None)
    return buf.raw[: 8 + int.from_bytes(buf.raw[:4], sys.byteorder)]


def open_in_root(rootfd: int, path: str | bytes, flags: int = os.O_PATH) -> int:
    """Open PATH as if `rootfd` were `/`: `..` and symlinks (absolute too) stay inside."""
    rel = path.lstrip(b"/") or b"." if isinstance(path, bytes) else path.lstrip("/") or "."
    return openat2(rootfd, rel, flags, RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS)


def fs_magic(fd: int) -> int:
    """The filesystem type (statfs(2)'s f_type) of what `fd` is on; an O_PATH fd will do."""
    buf = ctypes.create_string_buffer(128)  # struct statfs: f_type is its first word
    _check(_libc.fstatfs(fd, buf), "fstatfs")
    return int.from_bytes(buf.raw[:8], sys.byteorder) & 0xFFFFFFFF


def syncfs(fd: int) -> None:
    _check(_libc.syncfs(fd), "syncfs")


def close_range(first: int, last: int = 0xFFFFFFFF, flags: int = 0) -> None:
    _check(
        _libc.syscall(
            SYS_CLOSE_RANGE, ctypes.c_uint(first), ctypes.c_uint(last), ctypes.c_uint(flags)
        ),
        "close_range",
    )


def close_fds_from(first: int, keep: Iterable[int] = ()) -> None:
    """Close every fd from `first` up but those in `keep`: one close_range(2) per gap
    between them (on a kernel without it, before Linux 5.9, os.closerange's loop)."""
    low = first
    for fd in [*sorted(k for k in set(keep) if k >= first), None]:
        last = 0xFFFFFFFF if fd is None else fd - 1
        if last >= low:
            try:
                close_range(low, last)
            except OSError:
                os.closerange(low, min(last + 1, os.sysconf("SC_OPEN_MAX")))
        if fd is not None:
            low = fd + 1


# -- namespaces and mounts -----------------------------------------------------------------
def unshare(flags: int) -> None:
    _check(_libc.unshare(flags), "unshare")


SIOCSIFFLAGS = 0x8914
IFF_UP = 0x1


def link_up(name: str) -> None:
    """Bring the network interface NAME up (SIOCSIFFLAGS, CAP_NET_ADMIN in its network
    namespace): a new namespace's loopback starts down, and no address answers on it.
    Its other flags a user can change are all clear then, so IFF_UP alone is set."""
    # Here: for pyunion run's init only (socket is ~7 ms to import, and a mount's client
    # imports this module).
    import fcntl
    import socket
    import struct

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
        fcntl.ioctl(s, SIOCSIFFLAGS, struct.pack("16sH22x", name.encode(), IFF_UP))  # ifreq


def setns(fd: int, nstype: int) -> None:
    _check(_libc.setns(fd, nstype), "setns")


def mount(
    source: str | None,
    target: str | bytes,
    fstype: str | None,
    flags: int = 0,
    data: str | None = None,
) -> None:
    _check(
        _libc.mount(_enc(source), _enc(target), _enc(fstype), ctypes.c_ulong(flags), _enc(data)),
        "mount",
        target,
    )


def umount2(target: str | bytes, flags: int = 0) -> None:
    _check(_libc.umount2(_enc(target), flags), "umount", target)


def make_private(path: str = "/") -> None:
    """Stop mount events propagating between this namespace and the host's."""
    mount(None, path, None, MS_REC | MS_PRIVATE)


class _MountAttr(ctypes.Structure):
    _fields_ = [
        ("attr_set", ctypes.c_uint64),
        ("attr_clr", ctypes.c_uint64),
        ("propagation", ctypes.c_uint64),
        ("userns_fd", ctypes.c_uint64),
    ]


def mount_setattr(dirfd: int, path: str, flags: int, attr_set: int, attr_clr: int = 0) -> None:
    """Change mount attributes; with AT_RECURSIVE, of every mount below too."""
    attr = _MountAttr(attr_set, attr_clr, 0, 0)
    _check(
        _libc.syscall(
            SYS_MOUNT_SETATTR,
            dirfd,
            _enc(path),
            ctypes.c_uint(flags),
            ctypes.byref(attr),
            ctypes.sizeof(attr),
        ),
        "mount_setattr",
        path,
    )


def fsopen(fstype: str) -> int:
    """A filesystem context for `fstype` (close-on-exec): configure it with `fsconfig`."""
    return _check(_libc.syscall(SYS_FSOPEN, _enc(fstype), ctypes.c_uint(FSOPEN_CLOEXEC)), "fsopen")


def fsconfig(fsfd: int, key: str | None, value: str | None = None) -> None:
    """Set one parameter of a filesystem context: KEY=VALUE, a flag KEY (no value), or,
    with no key, create the superblock (FSCONFIG_CMD_CREATE).

    A refusal raises OSError whose message carries what the filesystem logged
    on the context (`fscontext_log`), e.g. "fuse: Unknown parameter 'x'".
    """
    if key is None:
        cmd, k, v = FSCONFIG_CMD_CREATE, None, None
    elif value is None:
        cmd, k, v = FSCONFIG_SET_FLAG, _enc(key), None
    else:
        cmd, k, v = FSCONFIG_SET_STRING, _enc(key), _enc(value)
    ret = _libc.syscall(
        SYS_FSCONFIG, fsfd, ctypes.c_uint(cmd), ctypes.c_char_p(k), ctypes.c_char_p(v), 0
    )
    if ret < 0:
        err = ctypes.get_errno()
        what = key if key is not None else "create"
        logged = fscontext_log(fsfd)
        raise OSError(err, f"{what}: {logged or os.strerror(err)}")


def fscontext_log(fsfd: int) -> str:
    """What the filesystem logged on a context (its error messages), drained; '' if none."""
    lines = []
    for _ in range(16):
        try:
            msg = os.read(fsfd, 1024)
        except OSError:  # ENODATA: nothing (more) logged
            break
        text = msg.decode(errors="replace").strip()
        lines.append(text[2:] if text[1:2] == " " else text)  # "e msg", "w msg", "i msg"
    return "; ".join(lines)


def fsmount(fsfd: int, attrs: int = 0) -> int:
    """A detached mount (close-on-exec fd) of a context's superblock, with MOUNT_ATTR_* `attrs`.

    It is in no mount namespace until `move_mount` attaches it; closed unattached,
    it goes away, its superblock with it once nothing else holds it."""
    return _check(
        _libc.syscall(SYS_FSMOUNT, fsfd, ctypes.c_uint(FSMOUNT_CLOEXEC), ctypes.c_uint(attrs)),
        "fsmount",
    )


def open_tree_clone(fd: int, recursive: bool) -> int:
    """A detached copy (close-on-exec fd) of the mount tree at `fd` (its mounts below too
    if `recursive`), as a bind mount would attach: set its attributes with
    `mount_setattr`, then attach it with `move_mount`."""
    flags = OPEN_TREE_CLONE | OPEN_TREE_CLOEXEC | AT_EMPTY_PATH | (AT_RECURSIVE if recursive else 0)
    return _check(_libc.syscall(SYS_OPEN_TREE, fd, b"", ctypes.c_uint(flags)), "open_tree")


def move_mount(from_fd: int, to_fd: int) -> None:
    """Attach the mount `from_fd` (an `fsmount` or `open_tree_clone` fd) on `to_fd` (opened in
    this mount namespace: the mount goes into this one)."""
    _check(
        _libc.syscall(
            SYS_MOVE_MOUNT,
            from_fd,
            b"",
            to_fd,
            b"",
            ctypes.c_uint(MOVE_MOUNT_F_EMPTY_PATH | MOVE_MOUNT_T_EMPTY_PATH),
        ),
        "move_mount",
    )


def pivot_root(new_root: str | bytes, put_old: str | bytes) -> None:
    if SYS_PIVOT_ROOT is None:
        raise OSError(38, "pivot_root: unknown syscall number on this architecture")
    _check(_libc.syscall(SYS_PIVOT_ROOT, _enc(new_root), _enc(put_old)), "pivot_root")


# -- processes -------------------------------------------------------------------------------
def prctl(option: int, arg2: int = 0, arg3: int = 0, arg4: int = 0, arg5: int = 0) -> int:
    return _check(
        _libc.prctl(
            option,
            ctypes.c_ulong(arg2),
            ctypes.c_ulong(arg3),
            ctypes.c_ulong(arg4),
            ctypes.c_ulong(arg5),
        ),
        "prctl",
    )


def join_new_session_keyring() -> None:
    """Subscribe this process (and what it runs) to a fresh, anonymous session keyring.

    Without a name: a named one would be joined if it exists (another container's).
    A kernel without keys (ENOSYS) has no keyring to hide.
    """
    if SYS_KEYCTL is None:
        raise OSError(errno.ENOSYS, "keyctl: unknown syscall number on this architecture")
    ret = _libc.syscall(SYS_KEYCTL, KEYCTL_JOIN_SESSION_KEYRING, None, 0, 0, 0)
    if ret < 0 and ctypes.get_errno() != errno.ENOSYS:
        _check(ret, "keyctl")


def set_pdeathsig(sig: int) -> None:
    prctl(PR_SET_PDEATHSIG, sig)


def set_no_new_privs() -> None:
    prctl(PR_SET_NO_NEW_PRIVS, 1)


def _self_stat(*numbers: int) -> tuple[int, ...] | None:
    """Numeric fields of /proc/self/stat by their numbers in proc(5) (4: ppid, and on),
    or None if unreadable.

    The command name (field 2) may hold spaces and parentheses: fields are
    counted from the last ")".
    """
    if min(numbers) < 4:
        raise ValueError("only the numeric fields after the state (4 and up)")
    try:
        with open("/proc/self/stat") as f:
            rest = f.read().rsplit(")", 1)[1].split()
        return tuple(int(rest[n - 3]) for n in numbers)
    except (OSError, IndexError, ValueError):
        return None


def set_process_title(title: str) -> None:
    """Show this process as TITLE in `ps`, not as a copy of pyunion's long command line.

    Overwrites the process's original argv area in place (what setproctitle does);
    Python keeps its own copy of argv, so nothing reads that memory any more.
    """
    raw = title.encode()
    _libc.prctl(PR_SET_NAME, raw[:15], 0, 0, 0)
    area = _self_stat(48, 49)  # arg_start, arg_end
    if area is None:
        return
    arg_start, arg_end = area
    size = arg_end - arg_start
    if size <= len(raw):
        return
    ctypes.memmove(arg_start, raw + b"\0" * (size - len(raw)), size)


# == confinement of `pyunion run`: capabilities, keepcaps, ambient set ==========================
PR_SET_DUMPABLE = 4
PR_SET_KEEPCAPS = 8
PR_CAPBSET_READ = 23
PR_CAPBSET_DROP = 24
PR_GET_NO_NEW_PRIVS = 39
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_CLEAR_ALL = 4
AT_EMPTY_PATH = 0x1000
_LINUX_CAPABILITY_VERSION_3 = 0x20080522


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [
        ("effective", ctypes.c_uint32),
        ("permitted", ctypes.c_uint32),
        ("inheritable", ctypes.c_uint32),
    ]


def capget() -> tuple[int, int, int]:
    """This thread's (effective, permitted, inheritable) capability sets, as 64-bit masks."""
    head = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)()
    _check(_libc.capget(ctypes.byref(head), data), "capget")
    lo, hi = data[0], data[1]
    return (
        lo.effective | hi.effective << 32,
        lo.permitted | hi.permitted << 32,
        lo.inheritable | hi.inheritable << 32,
    )


def capset(effective: int, permitted: int, inheritable: int) -> None:
    head = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)()
    for i in (0, 1):
        data[i].effective = (effective >> (32 * i)) & 0xFFFFFFFF
        data[i].permitted = (permitted >> (32 * i)) & 0xFFFFFFFF
        data[i].inheritable = (inheritable >> (32 * i)) & 0xFFFFFFFF
    _check(_libc.capset(ctypes.byref(head), data), "capset")


def capbset_read(cap: int) -> bool:
    """Whether `cap` is in this thread's bounding set."""
    return prctl(PR_CAPBSET_READ, cap) == 1


def capbset_drop(cap: int) -> None:
    prctl(PR_CAPBSET_DROP, cap)


def set_keepcaps(on: bool) -> None:
    """Keep the permitted set across a setuid() away from root (until execve)."""
    prctl(PR_SET_KEEPCAPS, int(on))


def clear_ambient_caps() -> None:
    prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL)


def set_dumpable(on: bool) -> None:
    """A non-dumpable process's memory and /proc files are out of reach of ptrace-like access
    without CAP_SYS_PTRACE."""
    prctl(PR_SET_DUMPABLE, int(on))


def get_no_new_privs() -> bool:
    return prctl(PR_GET_NO_NEW_PRIVS) == 1


def wipe_environ() -> None:
    """Blank this process's original environment block (what /proc/PID/environ shows).

    pyunion's init keeps running inside the container: its environment is the
    host's and must not be readable there. Python works from its own copy
    (os.environ, cleared by the caller).
    """
    area = _self_stat(50, 51)  # env_start, env_end
    if area is None:
        return
    start, end = area
    if end > start:
        ctypes.memset(start, 0, end - start)


def seccomp_set_filter(flags: int, program: bytes) -> None:
    """seccomp(SECCOMP_SET_MODE_FILTER, flags, program): load a classic BPF program
    (`struct sock_filter`s, 8 bytes each), as libseccomp's own `seccomp_load` does."""
    if SYS_SECCOMP is None:
        raise OSError(errno.ENOSYS, "seccomp: unknown syscall number on this architecture")
    if not program or len(program) % 8 or len(program) // 8 > 0xFFFF:
        raise OSError(errno.EINVAL, "seccomp: not a BPF program")
    prog = _SockFprog(len(program) // 8, program)
    _check(
        _libc.syscall(SYS_SECCOMP, SECCOMP_SET_MODE_FILTER, flags, ctypes.byref(prog)), "seccomp"
    )


# -- memory ----------------------------------------------------------------------------------
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3


def pin_malloc_thresholds(mmap_at: int = 128 << 10) -> None:
    """Have glibc's malloc take every block of `mmap_at` bytes or more from mmap, and give
    back a free top of its heap over that size, for the rest of the process's life.

    By default glibc raises its mmap threshold to the size of each mmapped block freed
    (up to 32 MiB), and its trim threshold to twice that: after the first 1 MiB buffer a
    long-lived process freed, every later one came from the heap and stayed there, and
    the heap grew in steps where small objects settled between them (mallopt(3))."""
    _libc.mallopt(M_MMAP_THRESHOLD, mmap_at)
    _libc.mallopt(M_TRIM_THRESHOLD, mmap_at)


MADV_DONTNEED = 4
_libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]


def madvise(addr: int, length: int, advice: int) -> None:
    _check(_libc.madvise(addr, length, advice), "madvise")


def unmap_unwritten_file_pages() -> int:
    """Take this process's unwritten pages of files out of its page tables (MADV_DONTNEED):
    those of its program's and libraries' code and read-only data that it has never
    written to. Each comes back from the page cache as it is next read. The number of
    mappings so treated.

    A daemon's start (imports: the compiler's, the unmarshaller's, the import system's
    code) touches ~1 MiB of the interpreter's and libc's code that serving never runs
    again, and each fault maps 16 pages around the one read. Only a mapping of a file,
    not writable, and without a page of its own (`Anonymous: 0` in smaps: relocated
    read-only data is written once, by the loader) goes: nothing there differs from
    the file."""
    done = 0
    start = end = 0
    candidate = False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split(None, 5)
            if "-" in head[0] and len(head) >= 5:  # a mapping: address perms offset dev inode
                lo, _, hi = head[0].partition("-")
                start, end = int(lo, 16), int(hi, 16)
                candidate = head[4] != "0" and "w" not in head[1] and head[1].startswith("r")
            elif candidate and head[0] == "Anonymous:":
                candidate = False
                if head[1] == "0":
                    with contextlib.suppress(OSError):
                        madvise(start, end - start, MADV_DONTNEED)
                        done += 1
    return done
