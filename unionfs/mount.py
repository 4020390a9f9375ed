"""Mount lifecycle: check everything, fork the daemon, wait until the mount is live; unmount.

The parent validates the request (so bad input is one line and nothing is
mounted), then forks. The child opens the layers, prepares the work dir, mounts
(`pyfuse3.init`) and only then tells the parent, through a pipe, that the mount
is live (or why it failed); it then serves requests until it is unmounted or
gets SIGTERM/SIGINT, which unmount it cleanly. The daemon records its pid in
a small state file per mount point, so `umount` can wait for it to exit.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import gc
import os
import select
import signal
import stat
import sys

from . import syscalls
from .errors import UserError
from .layers import LayerStack, open_layer_dir
from .options import MountConfig
from .prefork import Prefork, forkserver_wanted
from .procfs import fuse_device, fuse_fd, mount_id, mount_table
from .procfs import is_mountpoint as is_mountpoint  # re-exported: the light helpers moved
from .procfs import mounts as mounts
from .procfs import process_alive as process_alive
from .procfs import wait_gone as wait_gone
from .rlimits import raise_fd_limit
from .sha256 import sha256_hex
from .syscalls import (
    MNT_DETACH,
    UMOUNT_NOFOLLOW,
    close_fds_from,
    fd_str,
    import_with_sonames,
    pin_malloc_thresholds,
    umount2,
    unmap_unwritten_file_pages,
)
from .tree import (
    DIR_FLAGS,
    open_named_output,
    open_own_file,
    open_trusted,
    replace_file,
    rmtree_at,
)
from .userns import host_uid, in_user_namespace

TYPE_CHECKING = False  # typing's, without importing typing on a mount's start (architecture.md)
if TYPE_CHECKING:
    import socket
    from typing import NoReturn


# -- state files -----------------------------------------------------------------------
# The daemon of each mount records its pid in STATE_DIR/HASH.pid so that `umount`
# can wait for it. Root's state directory is /run/pyunion, other users' a private
# runtime directory: never a directory another user can write, since root writes
# there. Files in it are made under a fresh name (O_EXCL|O_NOFOLLOW) and renamed
# into place, relative to the directory's fd, so nothing planted is ever followed.
PID_MAX_BYTES = 4096


def state_dir() -> str:
    """This user's state directory: $PYUNION_STATE_DIR, /run/pyunion (root), or a private
    one: $XDG_RUNTIME_DIR/pyunion, $TMPDIR/pyunion-run-UID, or ~/.pyunion-run when
    another user has taken that name."""
    env = os.environ.get("PYUNION_STATE_DIR")
    if env:
        return os.path.abspath(env)
    uid = os.geteuid()
    if uid == 0 and not in_user_namespace():
        return "/run/pyunion"
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg and os.path.isabs(xdg):
        try:
            st = os.stat(xdg)
        except OSError:
            st = None
        # Only the user's own runtime dir (after `su`, it may still name the other user's).
        if st is not None and st.st_uid == uid and not st.st_mode & 0o022:
            return os.path.join(xdg, "pyunion")
    # Named by the host's uid: in a user namespace every user is 0.
    tmp = os.path.join(os.environ.get("TMPDIR") or "/tmp", f"pyunion-run-{host_uid()}")
    there = _whose(tmp, uid)
    if there == "ours":
        return tmp
    # A name in a directory every user writes is anyone's to take: another user who made
    # it first (or planted a symlink) stopped every mount and umount of ours. As podman
    # does then, a directory in the user's home (without one: refused, as before); once
    # made, it stays the one when she lets the name go (umount looked in $TMPDIR then,
    # and returned without waiting for the daemons recorded in the home).
    home = _home(uid)
    if home is None:
        return tmp
    fallback = os.path.join(home, ".pyunion-run")
    if there == "free" and _whose(fallback, uid) != "ours":
        return tmp
    return fallback


def _whose(path: str, uid: int) -> str:
    """ "ours" (a directory of `uid`, no symlink), "free" (nothing there) or "taken"."""
    try:
        st = os.lstat(path)
    except OSError:
        return "free"
    return "ours" if stat.S_ISDIR(st.st_mode) and st.st_uid == uid else "taken"


def _home(uid: int) -> str | None:
    """The user's home: $HOME when it is the user's own directory, else the passwd entry's."""
    home = os.environ.get("HOME")
    if home and os.path.isabs(home):
        with contextlib.suppress(OSError):
            if os.stat(home).st_uid == uid:
                return home
    import pwd

    try:
        return pwd.getpwuid(host_uid()).pw_dir or None
    except KeyError:
        return None


def open_state_dir() -> int:
    """An fd of the state directory, made (0700) or repaired if need be."""
    fd = _open_state_dir(True)
    assert fd is not None
    return fd


def find_state_dir() -> int | None:
    """An fd of the state directory if there is one (repaired if need be), else None."""
    return _open_state_dir(False)


def _open_state_dir(create: bool) -> int | None:
    """An fd of the state directory, made (0700) or repaired if need be; None if missing.

    Refused: a symlink in its place, or a directory that another user owns. A
    directory of ours that others can write (an older pyunion made /run/pyunion
    0777) is made 0700 again; whatever was planted in it is never followed.
    """
    path = state_dir()
    parent, name = os.path.split(path)
    try:
        pfd = os.open(parent or "/", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as e:
        raise UserError(f"cannot use the state directory {path!r}: {e.strerror}") from e
    try:
        if create:
            try:
                os.mkdir(name, 0o700, dir_fd=pfd)
            except FileExistsError:
                pass
            except OSError as e:
                raise UserError(f"cannot create the state directory {path!r}: {e.strerror}") from e
        try:
            fd = os.open(
                name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=pfd
            )
        except FileNotFoundError:
            if create:
                raise UserError(f"cannot create the state directory {path!r}") from None
            return None
        except OSError as e:
            if e.errno in (errno.ELOOP, errno.ENOTDIR):
                raise UserError(
                    f"the state directory {path!r} is not a directory (a symlink?); "
                    "refusing to use it"
                ) from e
            raise UserError(f"cannot use the state directory {path!r}: {e.strerror}") from e
    finally:
        os.close(pfd)
    st = os.fstat(fd)
    if st.st_uid != os.geteuid():
        os.close(fd)
        raise UserError(
            f"the state directory {path!r} belongs to uid {st.st_uid}; refusing to use it"
        )
    if stat.S_IMODE(st.st_mode) != 0o700:
        os.fchmod(fd, 0o700)
    return fd


SAID_MAX_BYTES = 4096


def say_once(key: str, text: str) -> None:
    """Warn `text` on stderr once for this user: not again while the state directory
    holds it as KEY.said (a warning that every run would repeat about the host, which
    she can do nothing about each time, is noise). Said again when it changes."""
    line = f"pyunion: warning: {text}"
    name = f"{key}.said"
    data = text.encode(errors="surrogateescape")
    try:
        dfd = open_state_dir()
    except UserError:
        print(line, file=sys.stderr)
        return
    try:
        got = open_own_file(dfd, name)
        if got is not None:
            try:
                if os.read(got[0], SAID_MAX_BYTES) == data:
                    return
            except OSError:
                pass
            finally:
                os.close(got[0])
        print(line, file=sys.stderr)
        with contextlib.suppress(OSError):
            replace_file(dfd, name, data, 0o600)
    finally:
        os.close(dfd)


def _state_name(mountpoint: str) -> str:
    """The pid file's name for `mountpoint` (call before mounting: realpath stats)."""
    key = sha256_hex(os.fsencode(os.path.realpath(mountpoint)))[:24]
    return key + ".pid"


def write_pid(dfd: int, name: str, pid: int, real_mp: str) -> None:
    """Record `pid` as NAME in the state dir: a fresh file renamed over whatever was there."""
    replace_file(dfd, name, f"{pid} {real_mp}\n".encode(errors="surrogateescape"), 0o644)


def read_pid(dfd: int, name: str) -> int | None:
    """The pid recorded as NAME: a regular file of ours, read within bounds; None otherwise."""
    got = open_own_file(dfd, name)
    if got is None:
        return None
    fd, _ = got
    try:
        return int(os.read(fd, PID_MAX_BYTES).split()[0])
    except (OSError, ValueError, IndexError):
        return None
    finally:
        os.close(fd)


def remove_pid(dfd: int, name: str, pid: int) -> None:
    """Remove NAME if it still records `pid` (a new mount there may have replaced it)."""
    if read_pid(dfd, name) == pid:
        with contextlib.suppress(OSError):
            os.unlink(name, dir_fd=dfd)


def daemon_pid(mountpoint: str, state: str | None = None) -> int | None:
    """The pid of the running daemon of `mountpoint` (its pid file: `state`), if recorded."""
    try:
        dfd = find_state_dir()
    except UserError:
        return None
    if dfd is None:
        return None
    try:
        pid = read_pid(dfd, state or _state_name(mountpoint))
    finally:
        os.close(dfd)
    return pid if pid is not None and process_alive(pid) else None


# -- validation ------------------------------------------------------------------
def _inside(path: str, top: str) -> bool:
    return path.startswith(top.rstrip("/") + "/")


def _mount_roots() -> dict[int, tuple[str, str, str]]:
    """mount id -> (device major:minor, root of the mount in its filesystem, mount point)."""
    return {mid: (dev, root, mp) for mid, dev, root, mp, _, _ in mount_table()}


class _Place:
    """Where a directory is, whatever path named it: its filesystem and its path in it.

    Two paths that reach one directory (a symlink, a bind mount) have one place;
    a bind mount of a subdirectory is inside its parent's place, as the kernel
    sees it (it compares dentries, not path strings).
    """

    __slots__ = ("device", "fspath", "ident", "what")

    def __init__(self, what: str, device: str, fspath: str, ident: tuple[int, int]) -> None:
        self.what = what  # "layer '/x'", for messages
        self.device = device  # major:minor of the filesystem
        self.fspath = fspath  # path from the filesystem's root
        self.ident = ident  # (st_dev, st_ino)

    def same(self, other: _Place) -> bool:
        return self.ident == other.ident or (
            self.device == other.device and self.fspath == other.fspath
        )

    def inside(self, other: _Place) -> bool:
        return self.device == other.device and _inside(self.fspath, other.fspath)


def _place(
    what: str, path: str, roots: dict[int, tuple[str, str, str]], missing_ok: bool = True
) -> _Place:
    """The `_Place` of directory `path`, or (`missing_ok`) of the one it would be made as."""
    try:
        fd = os.open(path, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    except FileNotFoundError:
        # Not there yet (the default work dir): where it will be made, in its parent.
        full = os.path.abspath(path)
        if not missing_ok or os.path.dirname(full) == full:
            raise UserError(f"{what} does not exist") from None
        parent = _place(what, os.path.dirname(full), roots, missing_ok=False)
        return _Place(
            what, parent.device, os.path.join(parent.fspath, os.path.basename(full)), (-1, -1)
        )
    except OSError as e:
        raise UserError(f"{what}: {e.strerror}") from e
    try:
        st = os.fstat(fd)
        real = os.readlink(fd_str(fd))
        mnt_id = mount_id(fd)
    except OSError as e:
        raise UserError(f"{what}: cannot tell where it is ({e})") from e
    finally:
        os.close(fd)
    device, root, mountpoint = roots.get(mnt_id, (f"dev{st.st_dev}", "/", "/"))
    rel = os.path.relpath(real, mountpoint) if real != mountpoint else "."
    fspath = os.path.normpath(os.path.join(root, rel))
    return _Place(what, device, fspath, (st.st_dev, st.st_ino))


def check_separate(lowers: list[str], upper: str | None, work: str | None) -> None:
    """Refuse overlapping layers, upper and work dir, as kernel overlayfs does, and more.

    The kernel refuses a lower layer twice, a lower inside another, inside the
    upper or the work dir (and the reverse), the upper equal to a lower, and
    an upper and work dir that are not separate trees. It accepts an upper or a
    work dir inside a lower layer, which makes the lower change under the
    mount; we refuse that too.
    """
    roots = _mount_roots()
    places = [_place(f"layer {p!r}", p, roots) for p in lowers]
    if upper is not None:
        places.append(_place(f"upper directory {upper!r}", upper, roots))
        if work is not None:
            places.append(_place(f"work directory {work!r}", work, roots))
    for i, a in enumerate(places):
        for b in places[i + 1 :]:
            if a.same(b):
                raise UserError(f"{a.what} and {b.what} are the same directory")
            if a.inside(b) or b.inside(a):
                inner, outer = (a, b) if a.inside(b) else (b, a)
                raise UserError(
                    f"{inner.what} is inside {outer.what}: layers, upper and work "
                    "directory must be separate trees"
                )


def default_workdir(upper: str) -> str:
    """`.UPPER.work` beside the upper (so on the same filesystem), as resolved to open it."""
    up = _real_dir(upper, "upper directory")
    return os.path.join(os.path.dirname(up), "." + os.path.basename(up) + ".work")


def open_mountpoint(mp: str) -> int:
    """The mount point, resolved once into an O_PATH fd (`tree.open_trusted`).

    The mount is then made on `/proc/self/fd/N`: a user who owns a directory on
    the way cannot swap in a symlink to /etc between the checks and the mount.
    """
    return open_layer_dir(mp, "mount point", os.O_PATH | os.O_DIRECTORY)


def validate(cfg: MountConfig, mp_fd: int | None) -> None:
    """Refuse a bad mount before anything is mounted or created, with one clear line.

    `mp_fd` is the mount point (`open_mountpoint`): its checks are made on it;
    None for a detached mount (`mount_detached`), which has no mount point here.
    """
    if not os.path.exists("/dev/fuse"):
        raise UserError("/dev/fuse does not exist (is the fuse module loaded?)")
    if not os.path.isdir("/proc/self/fd"):  # the mount is made through it, and checked there
        raise UserError("/proc is not mounted (pyunion mounts through /proc/self/fd)")
    check_log()
    mp = cfg.mountpoint
    real_mp = os.readlink(fd_str(mp_fd)) if mp_fd is not None else None
    if real_mp is not None and any(m == real_mp for m, _, _ in mounts()):
        raise UserError(f"{mp!r} is already a mount point")
    layers = list(cfg.lowers) + ([cfg.upper] if cfg.upper else [])
    for path in layers:
        real = _real_dir(path, "layer")
        if real_mp is None:
            continue
        if _inside(real_mp, real):
            raise UserError(f"mount point {mp!r} is inside layer {path!r}")
        if _inside(real, real_mp):
            raise UserError(f"layer {path!r} is inside the mount point {mp!r}")
    if cfg.work is not None and cfg.upper:
        _real_dir(cfg.work, "work directory")
    check_separate(
        cfg.lowers, cfg.upper, (cfg.work or default_workdir(cfg.upper)) if cfg.upper else None
    )
    if cfg.upper:
        # As resolved to open it, once: os.path.realpath followed her symlinks, and raised
        # EINVAL (a traceback) when she swapped one for a directory while it read it.
        upperdir = "upperdir=" + _real_dir(cfg.upper, "upper directory")
        for m, fstype, opts in mounts():
            if fstype == "overlay" and upperdir in opts.split(","):
                raise UserError(
                    f"upper directory {cfg.upper!r} is in use by the overlay mount at {m}"
                )
        cfg.work = choose_workdir(cfg.upper, cfg.work)


def _real_dir(path: str, what: str) -> str:
    """The real path of the directory `path`, resolved as the daemon will open it
    (`layers.open_layer_dir`: no symlink of another user's); one line if it is not one."""
    fd = open_layer_dir(path, what)
    try:
        return os.readlink(fd_str(fd))
    finally:
        os.close(fd)


def choose_workdir(upper: str, work: str | None) -> str:
    """The work dir: as given, or beside the upper (same filesystem), created if missing."""
    if work is None:
        work = default_workdir(upper)
        try:
            os.close(open_trusted(work))
        except FileNotFoundError:
            try:  # beside the upper: its parent exists, and was resolved as the upper
                os.close(open_trusted(work, mkdir=0o700))
                print(f"pyunion: work directory: {work}", file=sys.stderr)
            except OSError as e:
                raise UserError(f"cannot create a work directory {work!r}: {e.strerror}") from e
        except OSError:
            pass  # said by the checks below
    ufd = open_layer_dir(upper, "upper directory")
    try:
        wfd = open_layer_dir(work, "work directory")
        try:
            if os.fstat(wfd).st_dev != os.fstat(ufd).st_dev:
                raise UserError(
                    f"work directory {work!r} is not on the same filesystem as the upper {upper!r}"
                )
            rw, ru = os.readlink(fd_str(wfd)), os.readlink(fd_str(ufd))
        finally:
            os.close(wfd)
    finally:
        os.close(ufd)
    if rw == ru or _inside(rw, ru) or _inside(ru, rw):
        raise UserError("the work directory and the upper directory must be separate trees")
    return work


def prepare_workdir(work: str) -> tuple[int, int]:
    """Lock the work dir for this mount, make WORK/work afresh, return (lock fd, WORK/work fd).

    WORK/work is removed and made again, the daemon's own and 0700, as the kernel
    does: the daemon makes objects there by name and works on them before they
    move into the upper, so a WORK/work that someone else made (the owner of
    WORK, who may not be the mounter) would let her swap them for symlinks.
    """
    lock_fd = open_layer_dir(work, "work directory")
    try:
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UserError(f"work directory {work!r} is in use by another mount") from None
        rmtree_at(lock_fd, b"work")
        os.mkdir(b"work", 0o700, dir_fd=lock_fd)
        wfd = os.open(b"work", DIR_FLAGS, dir_fd=lock_fd)
        st = os.fstat(wfd)
        if st.st_uid != os.geteuid() or stat.S_IMODE(st.st_mode) & 0o077:
            os.close(wfd)
            raise UserError(f"{work!r}/work was replaced while it was made; try again")
    except BaseException:
        os.close(lock_fd)
        raise
    return lock_fd, wfd


def _lock_upper(upper_fd: int, upper: str) -> None:
    try:
        fcntl.flock(upper_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise UserError(f"upper directory {upper!r} is in use by another mount") from None


# -- the daemon ------------------------------------------------------------------------
# The kernel's readahead on the mount, in KiB: a sequential reader's FUSE reads are of up
# to this size. Its own default is 128 (32 pages); libfuse's max_pages allows 1024. 1016:
# the largest read that the daemon's 1 MiB pipe carries whole with its header
# (`fuseread.PIPE_BYTES`: read data is spliced, not copied twice).
READAHEAD_KB = 1016
START_PAGES_AFTER_S = 2.0  # after the mount, the start's code pages go (`serve`)


def widen_readahead(dev: tuple[int, int] | None, kb: int = READAHEAD_KB) -> None:
    """Let the kernel read ahead `kb` KiB on this daemon's mount, its FUSE device `dev`
    (`fuse_device`; the bdi in sysfs is named by it), not 128.

    A sequential reader's data then comes in reads of up to 1016 KiB, not 128 KiB:
    eight times fewer requests, each costing ~20 us of the daemon's CPU besides the
    copy (docs/architecture.md: Caching). The kernel caps the window with the
    daemon's answer to INIT, so this runs once that is sent (`FuseOps.init`). Only
    root may write sysfs: elsewhere (rootless, a read-only /sys) the kernel's
    default stays; a window made wider by an administrator is left alone.
    """
    if dev is None:
        return
    try:
        with open(f"/sys/class/bdi/{dev[0]}:{dev[1]}/read_ahead_kb", "r+") as f:
            if int(f.read()) < kb:  # the kernel's own text
                f.seek(0)
                f.write(f"{kb}\n")
    except (OSError, ValueError):
        pass


# pyfuse3.default_options, written here so that the parent of a detached mount, which
# makes the kernel mount itself (`kernel_mount_params`), need not import pyfuse3.
FUSE_DEFAULT_OPTIONS = frozenset({"default_permissions"})  # the kernel checks permissions


def _libfuse_options(cfg: MountConfig) -> set[str]:
    """`_fuse_options` as libfuse reads them: it splits each on commas (a backslash escapes
    one), so the file system's name is escaped; a name with a comma (`-o fsname=a\\,ro`)
    gave libfuse an option of its own."""
    out = set()
    for opt in _fuse_options(cfg):
        if opt.startswith("fsname="):
            name = opt[len("fsname=") :]
            opt = "fsname=" + name.replace("\\", "\\\\").replace(",", "\\,")
        out.add(opt)
    return out


def _fuse_options(cfg: MountConfig) -> set[str]:
    opts = set(FUSE_DEFAULT_OPTIONS)
    opts.add(f"fsname={cfg.fsname}")
    opts.add("subtype=pyunion")
    opts |= cfg.fuse_options
    if os.geteuid() == 0:
        # Like a kernel mount by root: every user sees it, devices open and setuid
        # programs work (libfuse's own default is nodev,nosuid); -o nodev/nosuid still apply.
        opts.add("allow_other")
        if "nodev" not in opts:
            opts.add("dev")
        if "nosuid" not in opts:
            opts.add("suid")
    if cfg.read_only or not cfg.upper:
        # Read-only for the VFS too, as a kernel overlay without an upper: statvfs says
        # ST_RDONLY, access(W_OK) and every change say EROFS before asking the daemon.
        opts.add("ro")
    return opts


# What libfuse's mount(2) makes of the options (lib/mount.c), for a mount made here with
# the new mount API: VFS flags (libfuse's defaults are nosuid,nodev), the kernel's own
# FUSE parameters, and the two it turns into the mount's source and type.
_MOUNT_ATTRS = {
    "ro": (syscalls.MOUNT_ATTR_RDONLY, True),
    "rw": (syscalls.MOUNT_ATTR_RDONLY, False),
    "nosuid": (syscalls.MOUNT_ATTR_NOSUID, True),
    "suid": (syscalls.MOUNT_ATTR_NOSUID, False),
    "nodev": (syscalls.MOUNT_ATTR_NODEV, True),
    "dev": (syscalls.MOUNT_ATTR_NODEV, False),
    "noexec": (syscalls.MOUNT_ATTR_NOEXEC, True),
    "exec": (syscalls.MOUNT_ATTR_NOEXEC, False),
}
_KERNEL_FLAGS = {"allow_other", "default_permissions"}
_KERNEL_VALUES = {"max_read", "blksize"}


def kernel_mount_params(cfg: MountConfig) -> tuple[list[tuple[str, str | None]], int]:
    """The fsconfig parameters (key, value or None for a flag) and the MOUNT_ATTR_* flags
    of `cfg`'s FUSE mount, as libfuse would mount it (less the fd and the owner).

    An option libfuse handles in userspace only (auto_unmount, ...) cannot be honoured
    by a mount made here: refused, never dropped.
    """
    params: list[tuple[str, str | None]] = [("rootmode", "40000")]
    attrs = syscalls.MOUNT_ATTR_NOSUID | syscalls.MOUNT_ATTR_NODEV
    for opt in sorted(_fuse_options(cfg)):
        key, eq, value = opt.partition("=")
        if key in _MOUNT_ATTRS and not eq:
            bit, on = _MOUNT_ATTRS[key]
            attrs = attrs | bit if on else attrs & ~bit
            if key == "ro":
                params.append(("ro", None))  # the superblock too, as mount(2) with MS_RDONLY
        elif key in _KERNEL_FLAGS and not eq:
            params.append((key, None))
        elif key in _KERNEL_VALUES and eq:
            params.append((key, value))
        elif key == "fsname" and eq:
            params.append(("source", value))
        elif key == "subtype" and eq:
            params.append(("subtype", value))
        else:
            raise UserError(f"the FUSE option {opt!r} is not supported for this mount")
    return params, attrs


def _fuse_superblock(fuse_fd: int, params: list[tuple[str, str | None]], attrs: int) -> int:
    """A detached FUSE mount (its fd) served through `fuse_fd`: fsopen, fsconfig, fsmount.

    Creating the superblock queues the kernel's INIT request on `fuse_fd`; any
    use of the mount waits until the daemon has answered it.
    """
    fsfd = syscalls.fsopen("fuse")
    try:
        syscalls.fsconfig(fsfd, "fd", str(fuse_fd))
        # libfuse's rule: the caller's real IDs (in a user namespace, as seen there).
        syscalls.fsconfig(fsfd, "user_id", str(os.getuid()))
        syscalls.fsconfig(fsfd, "group_id", str(os.getgid()))
        for key, value in params:
            syscalls.fsconfig(fsfd, key, value)
        syscalls.fsconfig(fsfd, None)
        return syscalls.fsmount(fsfd, attrs)
    finally:
        os.close(fsfd)


def _fuse_superblock_in_own_ns(
    fuse_fd: int, params: list[tuple[str, str | None]], attrs: int
) -> int:
    """`_fuse_superblock` from a short-lived child in a mount namespace of its own.

    fsopen needs CAP_SYS_ADMIN over the caller's mount namespace, which the root
    of a user namespace lacks over the host's (rootless `run`). The child's
    namespace is owned by the user namespace; the detached mount outlives it (it
    belongs to no namespace until attached) and comes back by SCM_RIGHTS.
    """
    import socket

    parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            parent.close()
            syscalls.unshare(syscalls.CLONE_NEWNS)
            mfd = _fuse_superblock(fuse_fd, params, attrs)
            socket.send_fds(child, [b"M"], [mfd])
            code = 0
        except BaseException as e:  # noqa: BLE001 - a forked child never returns
            with contextlib.suppress(OSError):
                child.send(b"E" + str(e).encode(errors="replace"))
        finally:
            os._exit(code)
    child.close()
    try:
        msg, fds, _, _ = socket.recv_fds(parent, 4096, 1)
    finally:
        parent.close()
        os.waitpid(pid, 0)
    if msg == b"M" and len(fds) == 1:
        return fds[0]
    for fd in fds:
        os.close(fd)
    raise OSError(errno.EPERM, msg[1:].decode(errors="replace") or "the helper died")


def mount_detached(cfg: MountConfig, prefork: Prefork | None = None) -> tuple[int, int]:
    """A FUSE mount in no mount namespace, for a container: (daemon pid, mount fd).

    `pyunion run` hands the fd (close-on-exec) to the container's init, which
    attaches it in its own mount namespace (`syscalls.move_mount`). The caller's
    namespace is never copied: no process of pyunion's holds a copy of the
    host's mounts, so none of them is kept alive while the container runs. The
    daemon gets /dev/fuse as an fd (libfuse's `/dev/fd/N` mount point: it then
    mounts nothing); the mount ends when the container's namespace and every fd
    of it are gone, and the daemon then exits. There is no mount point on the
    host, so no pid file (`umount` has nothing to name). `cfg.mountpoint` only
    names the mount in messages.
    """
    cfg.detached = True
    validate(cfg, None)
    params, attrs = kernel_mount_params(cfg)
    _absolute_layers(cfg)
    try:
        fuse_fd = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
    except OSError as e:
        raise UserError(f"cannot open /dev/fuse: {e.strerror}") from None
    try:
        try:
            mnt_fd = _fuse_superblock(fuse_fd, params, attrs)
        except PermissionError:
            if not in_user_namespace():
                raise
            mnt_fd = _fuse_superblock_in_own_ns(fuse_fd, params, attrs)
    except OSError as e:
        os.close(fuse_fd)
        raise UserError(f"cannot make the FUSE mount: {e.strerror or e}") from None
    except BaseException:
        os.close(fuse_fd)
        raise
    try:
        # The superblock exists: the daemon may read /dev/fuse (before, a read is EPERM).
        pid = _start_daemon(cfg, fuse_fd, None, prefork)
    except BaseException:
        os.close(mnt_fd)
        raise
    return pid, mnt_fd


def _absolute_layers(cfg: MountConfig) -> None:
    """The daemon leaves the caller's cwd: the layers' paths must not depend on it."""
    cfg.lowers = [os.path.abspath(p) for p in cfg.lowers]
    cfg.upper = os.path.abspath(cfg.upper) if cfg.upper else cfg.upper
    cfg.work = os.path.abspath(cfg.work) if cfg.work else cfg.work


def _start_daemon(
    cfg: MountConfig, mp_fd: int, state_fd: int | None, prefork: Prefork | None
) -> int:
    """The daemon of `cfg`: `prefork`'s, the fork server's when there is one
    (docs/architecture.md: start-up), else forked here. It gets the mount point, or
    /dev/fuse of a detached mount (`mp_fd`), and the state dir (`state_fd`, None for a
    detached mount); both are taken over (closed here). Its pid once the mount is live;
    if it fails it is reaped, and its message raised."""
    r, w = os.pipe()
    pid = None
    if prefork is not None:
        pid = prefork.hand_over(cfg, w, state_fd, mp_fd)
    elif forkserver_wanted():
        from . import forkserver

        if forkserver.enabled():
            # Where the server's socket is: a detached mount has no state dir of its own.
            server_fd = state_fd if state_fd is not None else open_state_dir()
            try:
                pid = forkserver.spawn(cfg, w, server_fd, mp_fd)
            finally:
                if server_fd != state_fd:
                    os.close(server_fd)
    ours = pid is None or prefork is not None
    if pid is None:
        pid = os.fork()
    if pid == 0:  # the daemon
        code = 1
        try:
            os.close(r)
            code = run_daemon(cfg, w, state_fd, mp_fd)
        except BaseException as e:  # noqa: BLE001 - report it, never a traceback on the user's tty
            with contextlib.suppress(OSError):
                os.write(w, b"E" + f"daemon failed: {e}".encode(errors="replace"))
        finally:
            os._exit(code)
    os.close(w)
    os.close(mp_fd)
    if state_fd is not None:
        os.close(state_fd)
    with os.fdopen(r, "rb") as f:
        # Not up to EOF: with auto_unmount, fusermount3's watcher (it lives as long as
        # the mount) holds the write end too, and `mount` never returned.
        msg = f.read(2)
        if msg == b"OK":
            return pid
        msg += f.read()
    if ours:
        os.waitpid(pid, 0)
    else:
        wait_gone(pid, 10)
    raise UserError(
        msg[1:].decode(errors="replace") or "the daemon died before the mount was ready"
    )


def serve(
    cfg: MountConfig,
    ready_fd: int | None = None,
    state_fd: int | None = None,
    mp_fd: int | None = None,
    fuse_fd: int | None = None,
) -> int:
    """Mount and serve until unmounted. Reports readiness (or the error) on `ready_fd`.
    Once mounted it never returns: the process leaves when the connection ends (`finish`).

    `state_fd` is the state directory (`open_state_dir`), where the daemon's pid
    is recorded for `umount`; `mp_fd` the mount point (`open_mountpoint`, taken
    over: closed here). With `fuse_fd` (/dev/fuse, of a mount `mount_detached`
    made) nothing is mounted here and there is neither mount point nor pid file.
    """
    _preload()
    pin_malloc_thresholds()  # a daemon's big buffers come and go: its heap must not keep them
    import logging

    import pyfuse3
    import trio

    from . import reqloop
    from .fuseops import make_ops
    from .union import Union

    def fail(msg: str) -> int:
        if ready_fd is not None:
            os.write(ready_fd, b"E" + msg.encode(errors="replace"))
            os.close(ready_fd)
            return 1
        raise UserError(msg)

    detached = fuse_fd is not None
    if state_fd is None and not detached:
        try:
            state_fd = open_state_dir()
        except UserError as e:
            return fail(str(e))
    sfd = state_fd if state_fd is not None else -1
    if mp_fd is None and not detached:
        try:
            mp_fd = open_mountpoint(cfg.mountpoint)
        except UserError as e:
            return fail(str(e))
    real_mp = os.readlink(fd_str(mp_fd)) if mp_fd is not None else cfg.mountpoint

    def close_mount_point() -> None:
        """The mount point's fd: the directory under the mount is never used again."""
        nonlocal mp_fd
        if mp_fd is not None:
            os.close(mp_fd)
            mp_fd = None

    # Upper objects are created with exactly the modes the kernel sends (it has applied
    # the caller's umask already). The state files are made with explicit modes.
    os.umask(0)
    lock_fd = -1
    try:
        stack = LayerStack(cfg.lowers, None if cfg.read_only else cfg.upper)
    except UserError as e:
        close_mount_point()
        return fail(str(e))
    work_fd = -1
    try:
        if stack.upper is not None:
            assert cfg.work is not None and cfg.upper is not None
            _lock_upper(stack.upper.fd, cfg.upper)
            lock_fd, work_fd = prepare_workdir(cfg.work)
    except UserError as e:
        stack.close()
        close_mount_point()
        return fail(str(e))
    core = Union(
        stack,
        work_fd,
        volatile=cfg.volatile,
        writeback=cfg.writeback and stack.upper is not None,
        owners_optional=cfg.idmap is not None and cfg.idmap.squashing,
    )
    ops = make_ops(core, cfg.idmap, debug=cfg.debug, killpriv=cfg.killpriv)
    raise_fd_limit()
    # Never touch the mount point once mounted: the daemon would wait on itself.
    state = _state_name(real_mp) if not detached else ""
    me = os.getpid()
    try:
        if not detached:
            write_pid(sfd, state, me, real_mp)
    except OSError as e:
        core.close()
        close_mount_point()
        return fail(f"cannot record the daemon's pid in {state_dir()!r}: {e.strerror}")
    # Root mounts (mount(2)) on the fd's object itself; a user's mount goes through
    # fusermount3, a setuid helper that makes its own checks on the path, and so does
    # root's with auto_unmount: libfuse then runs fusermount3, which cannot open this
    # process's fd (the mount failed).
    helper = False  # libfuse forks fusermount3
    if fuse_fd is not None:
        target = f"/dev/fd/{fuse_fd}"  # libfuse serves this fd and mounts nothing
    else:
        assert mp_fd is not None
        helper = os.geteuid() != 0 or "auto_unmount" in cfg.fuse_options
        target = real_mp if helper else fd_str(mp_fd)
    # A signal once mounted must not find its default action (the daemon killed, its
    # mount left dead): held from here until trio's handlers are in place (before, the
    # daemon dies unmounted, and `mount` says so). From after the mount when libfuse
    # forks fusermount3, which would inherit the mask (auto_unmount's stays).
    stops = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP}
    # Python's own SIGINT handler would raise KeyboardInterrupt wherever the daemon is,
    # once mounted too: the default action instead (this raises one already pending).
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    if not helper:
        signal.pthread_sigmask(signal.SIG_BLOCK, stops)
    lifeline = helper and "auto_unmount" in cfg.fuse_options
    fds_before = open_fds() if lifeline else set()
    try:
        pyfuse3.init(ops, target, _libfuse_options(cfg))
    except (RuntimeError, OSError) as e:  # libfuse's "fuse_session_mount failed"
        core.close()
        if not detached:
            remove_pid(sfd, state, me)
        return fail(f"cannot mount {cfg.mountpoint!r}: {e}")
    finally:
        close_mount_point()
    if lifeline:
        release_lifeline_last(fds_before)
    signal.pthread_sigmask(signal.SIG_BLOCK, stops)
    # Which mount is ours, to unmount it on a signal: held by its id, not by an fd on
    # the mount point's directory, which kept the filesystem under it busy.
    dev = fuse_device()  # the connection's, now made
    own = None if detached else _own_mount(real_mp, dev)
    ops.after_init = lambda: widen_readahead(dev)
    if ready_fd is not None:
        os.write(ready_fd, b"OK")
        os.close(ready_fd)
    unmounted_by_us = False

    def finish(code: int, failure: BaseException | None = None) -> NoReturn:
        """The connection is over (unmounted, or a signal): exit at once, letting go of the
        layers first of all (the caller of `umount` may unmount their filesystems next)."""
        if ops.fast_reads is not None:  # the tests read this line in the debug log
            r = ops.fast_reads
            log.debug("reads: %d spliced, %d copied", r.spliced, r.copied)
        close_fds_from(3, {sfd} if sfd >= 0 else ())
        try:
            if failure is not None:
                log.error("the request loop failed", exc_info=failure)
            if unmounted_by_us and own is not None:
                _detach_own_mount(*own)
            if not detached:
                remove_pid(sfd, state, me)
            sys.stdout.flush()
            sys.stderr.flush()
        finally:  # whatever failed: nothing here may close an fd again, or run on
            os._exit(code)

    # The request loop's hooks (reqloop.py): pyfuse3's read lock, and the poll of
    # /dev/fuse unless spin=0. Without them every request waits in epoll (README:
    # Performance, ~1.3x slower): say so, and the tests read this line in the debug log.
    log = logging.getLogger(__name__)
    if reqloop.install(pyfuse3, cfg.spin_us):
        log.debug("request loop: /dev/fuse polled for %d us before sleeping", cfg.spin_us)
    else:
        log.warning(
            "request loop: cannot hook pyfuse3 %s's wait for /dev/fuse; requests are "
            "served without polling (slower)",
            getattr(pyfuse3, "__version__", "?"),
        )

    async def main() -> None:
        async with trio.open_nursery() as nursery:

            async def on_signals() -> None:
                nonlocal unmounted_by_us
                with trio.open_signal_receiver(*stops) as sigs:
                    signal.pthread_sigmask(signal.SIG_UNBLOCK, stops)
                    async for _ in sigs:
                        # Not once the connection is over: its mount is gone, and the
                        # same id and device may be another's by now.
                        unmounted_by_us = _connected()
                        pyfuse3.terminate()  # the requests being served are finished
                        return

            async def give_back_start_pages() -> None:
                # What the start touched of the program's and libraries' code and never
                # runs again (the imports'): ~1 MiB, ~0.6 of it for good (README: Memory).
                # Not at once: a container's start would wait the ~2 ms it takes.
                await trio.sleep(START_PAGES_AFTER_S)
                try:
                    unmap_unwritten_file_pages()
                except Exception:  # one here would end the mount
                    log.exception("giving back the start's pages")

            nursery.start_soon(on_signals)
            nursery.start_soon(give_back_start_pages)
            try:
                await pyfuse3.main()
            except BaseException as e:  # noqa: BLE001 - said in the log, after letting go
                finish(1, e)
            # Nothing of the event loop, pyfuse3 or the interpreter is torn down: their
            # fds are closed with the others, and the process leaves.
            finish(0)

    try:
        trio.run(main)
    finally:  # reached only if trio itself failed: `finish` never returns
        with contextlib.suppress(RuntimeError, OSError):
            pyfuse3.close(unmount=False)
        core.close()
        if lock_fd >= 0:
            os.close(lock_fd)
        if not detached:
            remove_pid(sfd, state, me)
            os.close(sfd)
    return 1


def _connected() -> bool:
    """Whether this daemon's FUSE connection is live (/dev/fuse polls POLLERR once the
    kernel has ended it: unmounted, or aborted)."""
    fd = fuse_fd()
    if fd is None:
        return False
    poll = select.poll()
    poll.register(fd, select.POLLIN)
    return not any(ev & select.POLLERR for _, ev in poll.poll(0))


def _own_mount(real_mp: str, dev: tuple[int, int] | None) -> tuple[int, str] | None:
    """(mount id, device) of the mount just made at `real_mp`: the one whose device is
    `dev`, this daemon's FUSE connection (`fuse_device`), or without that (an older kernel)
    the newest FUSE mount there. None if none is seen (not in this namespace)."""
    want = f"{dev[0]}:{dev[1]}" if dev is not None else None
    found = None
    for mid, device, root, mp, fstype, _ in mount_table():
        if (
            mp == real_mp
            and root == "/"
            and (device == want or (want is None and fstype.startswith("fuse")))
        ):
            found = mid, device
    return found


def _detach_own_mount(mnt_id: int, device: str) -> None:
    """Detach the mount `mnt_id` (`_own_mount`) if it is still there, wherever its mount
    point has moved to, and nothing else: not a mount made over it, nor another one at
    the same path once it is gone (its id and device are checked on the fd the
    unmount goes through). Errors are ignored: a user's daemon may not unmount."""
    entry = next((e for e in mount_table() if e[0] == mnt_id and e[1] == device), None)
    if entry is None or entry[2] != "/":
        return  # unmounted already
    try:
        # The path mountinfo gives has no symlink in it; one there now is a swap.
        fd = syscalls.openat2(
            syscalls.AT_FDCWD,
            entry[3],
            os.O_PATH | os.O_DIRECTORY,
            syscalls.RESOLVE_NO_SYMLINKS,
        )
    except OSError:
        return
    try:
        if mount_id(fd) == mnt_id:  # another mount over ours would be found instead
            with contextlib.suppress(OSError):
                # /proc/self/fd/N is the very mount: the unmount follows that link.
                umount2(fd_str(fd), MNT_DETACH)
    finally:
        os.close(fd)


def _preload() -> None:
    """Import what serving needs (most of a daemon's start-up), without docstrings where
    the bytecode for that was compiled (`bytecode.py`)."""
    from .bytecode import strip_docstrings

    strip_docstrings()
    import_trio()  # before pyfuse3, which imports it
    _import_pyfuse3()

    import linecache

    from . import fuseops, reqloop, union  # noqa: F401

    # attrs keeps the source of each method it generates (for trio's classes: ~150 KiB) in
    # linecache, for tracebacks through them: the memory goes to the daemon's nodes instead.
    for key in [k for k in linecache.cache if k.startswith("<attrs generated")]:
        del linecache.cache[key]


def import_trio() -> None:
    """trio as a daemon runs on (`lazyimport.import_trio_core`), without `ldconfig -p`."""
    from .lazyimport import import_trio_core

    import_with_sonames("trio", lambda _: import_trio_core())


def _import_pyfuse3() -> None:
    """Import pyfuse3 without `importlib.metadata`, which it imports only to read its own
    version once: that module (email, zipfile, pathlib, ...) was ~15 ms of every daemon's
    start. A stand-in answers `version()` from the `NAME-VERSION.dist-info` directory
    beside the package while pyfuse3 is imported, then leaves."""
    if "pyfuse3" in sys.modules or "importlib.metadata" in sys.modules:
        import pyfuse3

        return
    import importlib.util
    import types

    class PackageNotFoundError(ModuleNotFoundError):
        pass

    def version(name: str) -> str:
        try:
            spec = importlib.util.find_spec(name)
            origin = spec.origin if spec is not None else None
            if origin is None:
                raise PackageNotFoundError(name)
            site = os.path.dirname(os.path.dirname(origin))
            for entry in os.listdir(site):
                dist, _, rest = entry.partition("-")
                if dist == name and rest.endswith(".dist-info"):
                    return rest.removesuffix(".dist-info")
        except (OSError, ValueError, ImportError) as e:
            raise PackageNotFoundError(name) from e
        raise PackageNotFoundError(name)

    stand_in = types.ModuleType("importlib.metadata")
    stand_in.PackageNotFoundError = PackageNotFoundError  # type: ignore[attr-defined]
    stand_in.version = version  # type: ignore[attr-defined]
    sys.modules["importlib.metadata"] = stand_in
    try:
        import pyfuse3  # noqa: F401
    finally:
        if sys.modules.get("importlib.metadata") is stand_in:
            del sys.modules["importlib.metadata"]


def prefork_main(sock: socket.socket) -> NoReturn:
    """The body of a `prefork.Prefork` child: import, then serve the mount handed over."""
    import pickle
    import socket

    code = 1
    ready_w = -1
    try:
        os.setsid()
        _detach_stdio()
        _pin_nothing({sock.fileno()})
        _preload()
        msg, fds, _, _ = socket.recv_fds(sock, 1 << 20, 3)
        sock.close()
        if not msg or len(fds) not in (2, 3):
            os._exit(0)  # cancelled, or the caller is gone
        ready_w, mp_fd = fds[:2]
        cfg = pickle.loads(msg)
        if cfg.detached:
            code = serve(cfg, ready_w, fuse_fd=mp_fd)
        else:
            code = serve(cfg, ready_w, fds[2], mp_fd)
    except BaseException as e:  # noqa: BLE001 - report it, never a traceback on the user's tty
        if ready_w >= 0:
            with contextlib.suppress(OSError):
                os.write(ready_w, b"E" + f"daemon failed: {e}".encode(errors="replace"))
    os._exit(code)


def mount(cfg: MountConfig, prefork: Prefork | None = None) -> int:
    """Mount; the daemon's pid once the mount is live (0 in the foreground, after it ends).

    With `prefork`, that daemon serves the mount (it is reaped here if it fails).
    """
    mp_fd = open_mountpoint(cfg.mountpoint)
    try:
        validate(cfg, mp_fd)
        state_fd = open_state_dir()
    except BaseException:
        os.close(mp_fd)
        raise
    if cfg.foreground:
        serve(cfg, state_fd=state_fd, mp_fd=mp_fd)
        return 0
    _absolute_layers(cfg)
    cfg.mountpoint = os.path.abspath(cfg.mountpoint)
    return _start_daemon(cfg, mp_fd, state_fd, prefork)


def run_daemon(cfg: MountConfig, ready_fd: int, state_fd: int | None, mp_fd: int) -> int:
    """The body of a freshly forked daemon: its own session, nothing of the caller's held.

    `mp_fd` is the mount point the caller checked (`open_mountpoint`), or for a
    detached mount (`cfg.detached`) /dev/fuse; taken over, as `state_fd`.
    """
    os.setsid()
    _detach_stdio()
    if cfg.detached and state_fd is not None:  # from the fork server: not needed
        os.close(state_fd)
        state_fd = None
    _pin_nothing({ready_fd, mp_fd} | ({state_fd} if state_fd is not None else set()))
    if cfg.detached:
        return serve(cfg, ready_fd, fuse_fd=mp_fd)
    return serve(cfg, ready_fd, state_fd, mp_fd)


def open_fds() -> set[int]:
    """The fds open now (with the one that lists them, closed since)."""
    return {int(name) for name in os.listdir("/proc/self/fd")}


def release_lifeline_last(before: set[int]) -> None:
    """auto_unmount: have a dead daemon's socket to fusermount3 (libfuse's, made while
    mounting: open then, not in `before`) closed only after its /dev/fuse.

    fusermount3 waits for that socket's end; it then unmounts only if opening the
    mount point fails with ENOTCONN (3.14: not ECONNABORTED). A killed daemon's
    files are released in an order the kernel picks (6.x: by fd, the highest first):
    the socket before /dev/fuse, and fusermount3's open, sent to the still connected
    mount, came back ECONNABORTED when the connection was aborted: the mount stayed,
    dead (test_auto_unmount, 2 runs in 15 under load). The socket is now held only as
    a message in flight on a socket pair of the daemon's: released with that pair's
    end, it is put after every file the exit released at once, /dev/fuse among them.
    It is the one socket the mount made (libfuse 3's `fuse_mount_fusermount`); nothing
    is done if there are more."""
    import socket

    theirs = []
    for fd in sorted(open_fds() - before):
        with contextlib.suppress(OSError):
            if stat.S_ISSOCK(os.fstat(fd).st_mode):
                theirs.append(fd)
    if len(theirs) != 1:
        return
    keep, hold = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        socket.send_fds(keep, [b"L"], theirs)
    except OSError:
        keep.close()
        hold.close()
        return
    os.close(theirs[0])
    keep.detach()  # both ends stay open as long as the daemon lives
    hold.detach()


def _pin_nothing(keep: set[int]) -> None:
    """Hold no filesystem of the caller: cwd `/` (as libfuse's daemonize), no inherited fds.

    Otherwise the daemon, which lives as long as the mount, would keep the
    caller's cwd and whatever it had open busy (and hold pipe ends open).
    """
    os.chdir("/")
    # Objects inherited from the caller must never be finalized here: one that
    # owned an fd would close the same number, by then a layer's.
    gc.freeze()
    with contextlib.suppress(ValueError, OSError):
        signal.set_wakeup_fd(-1)  # the caller's wakeup fd (an event loop's) goes below
    close_fds_from(3, keep)


def open_log(path: str) -> int:
    """$PYUNION_LOG opened for appending, by the rule for files root is named to write
    (`tree.open_named_output`): the daemon runs as root, and /tmp/pyunion.log can be a
    user's symlink or FIFO put there first."""
    return open_named_output(path, os.O_APPEND)


def check_log() -> None:
    """$PYUNION_LOG as the daemon will open it (`open_log`); one line if it cannot be."""
    path = os.environ.get("PYUNION_LOG")
    if path:
        try:
            os.close(open_log(path))
        except OSError as e:
            raise UserError(f"PYUNION_LOG={path!r}: {e.strerror}") from None


def _detach_stdio() -> None:
    null = os.open(os.devnull, os.O_RDWR)
    os.dup2(null, 0)
    os.dup2(null, 1)
    logfile = os.environ.get("PYUNION_LOG")
    if logfile:
        try:
            fd = open_log(logfile)
        except OSError:  # said by `check_log` before, unless swapped since: no log then
            fd = os.dup(null)
        os.dup2(fd, 2)
        os.close(fd)
    else:
        os.dup2(null, 2)
    os.close(null)


# -- unmounting ------------------------------------------------------------------------
def holders(path: str) -> list[str]:
    """Processes using something under `path` (cwd, root, open files)."""
    real = os.path.realpath(path)
    out = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        links = [f"/proc/{pid}/cwd", f"/proc/{pid}/root"]
        try:
            links += [f"/proc/{pid}/fd/{fd}" for fd in os.listdir(f"/proc/{pid}/fd")]
        except OSError:
            continue
        for link in links:
            try:
                target = os.readlink(link)
            except OSError:
                continue
            if target == real or _inside(target, real):
                try:
                    with open(f"/proc/{pid}/comm") as f:
                        comm = f.read().strip()
                except OSError:
                    comm = "?"
                out.append(f"{comm} (pid {pid})")
                break
    return out


def _umount_pyunion(mountpoint: str, flags: int) -> None:
    """Unmount the pyunion mount at MOUNTPOINT, and nothing else, as root.

    A user who can rename a directory on the way (a mount point in her home) can
    swap in a symlink to another mount at any time, and root would unmount that
    one. So the parent directory is held by an fd, and what is found in it under
    the name (never through a symlink) must be a pyunion mount: checked, then
    unmounted through that same fd.
    """
    parent, name = os.path.split(os.path.realpath(mountpoint))
    if not name:
        raise UserError(f"{mountpoint!r} is not a pyunion mount")
    try:
        pfd = open_trusted(parent)
    except OSError as e:
        raise UserError(f"cannot unmount {mountpoint!r}: {e.strerror}") from None
    try:
        target = f"{fd_str(pfd)}/{name}"
        fd = os.open(target, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            ok = _is_pyunion_root(fd)
        finally:
            os.close(fd)  # an fd on the mount would keep it busy
        if not ok:
            raise UserError(f"{mountpoint!r} is not a pyunion mount")
        umount2(target, flags | UMOUNT_NOFOLLOW)
    finally:
        os.close(pfd)


def _is_pyunion_root(fd: int) -> bool:
    """Whether `fd` is the root of a pyunion (fuse.pyunion) mount."""
    mnt_id = mount_id(fd)
    for mid, _, root, mp, fstype, _ in mount_table():
        if mid == mnt_id:
            return fstype == "fuse.pyunion" and root == "/" and os.readlink(fd_str(fd)) == mp
    return False


def umount(mountpoint: str, lazy: bool = False, timeout: float = 30.0) -> None:
    """Unmount and wait for the daemon to exit; a dead daemon's stale mount is cleaned too."""
    try:
        # Named once: once unmounted, a user may move things on the path again.
        state = _state_name(mountpoint)
        if not is_mountpoint(mountpoint):
            raise UserError(f"{mountpoint!r} is not mounted")
    except OSError as e:  # realpath racing a user who renames on the way
        raise UserError(f"cannot unmount {mountpoint!r}: {e.strerror}") from None
    pid = daemon_pid(mountpoint, state)
    try:
        if os.geteuid() == 0:
            _umount_pyunion(mountpoint, MNT_DETACH if lazy else 0)
        else:
            import subprocess  # here: root's umount never runs a command

            cmd = ["fusermount3", "-u"] + (["-z"] if lazy else []) + [mountpoint]
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)
            if r.returncode != 0:
                raise OSError(errno.EBUSY if "busy" in r.stderr else errno.EPERM, r.stderr.strip())
    except OSError as e:
        if e.errno == errno.EBUSY:
            who = holders(mountpoint)
            detail = f" (used by {', '.join(who[:5])})" if who else ""
            raise UserError(
                f"{mountpoint!r} is busy{detail}; use --lazy to detach it anyway"
            ) from e
        raise UserError(f"cannot unmount {mountpoint!r}: {e.strerror}") from e
    if pid is None:
        return
    # A detached mount stays alive while something still uses it; its daemon
    # exits after the last user. Waiting for that would hang the command.
    if not wait_gone(pid, min(timeout, 2.0) if lazy else timeout):
        if lazy:
            return
        raise UserError(f"the daemon (pid {pid}) did not exit within {timeout:g}s")
    try:
        dfd = find_state_dir()
    except UserError:
        return
    if dfd is not None:
        remove_pid(dfd, state, pid)  # the daemon was killed: left behind
        os.close(dfd)
