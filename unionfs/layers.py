"""The layer stack: the upper (index 0, absent on a read-only mount), the lowers (1..n, top first).

Each layer is held open by a directory fd; every later access is an `*at`
call relative to an fd of a directory inside that layer, one name at a time
and without following symlinks, so a layer's symlink can never lead the
daemon out of its tree.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import stat

from . import syscalls
from .errors import FsError, UserError
from .procfs import mount_table
from .tree import DIR_FLAGS, UntrustedSymlink, open_trusted

# A lower object is read without setting its atime, as kernel overlayfs reads it
# (ovl_path_open, ovl_open_realfile): refused (EPERM) to whoever neither owns it nor has
# CAP_FOWNER, as there, and then opened without it.
NOATIME = getattr(os, "O_NOATIME", 0)


class Layer:
    """One layer, held by its directory fd: index 0 is the upper, 1.. the lowers, top first."""

    __slots__ = ("dev", "fd", "index", "ino", "path")

    def __init__(self, index: int, path: str, fd: int, dev: int, ino: int) -> None:
        self.index = index
        self.path = path
        self.fd = fd
        self.dev = dev
        self.ino = ino


def open_dir_at(dirfd: int, name: bytes, lower: bool = False) -> int:
    """Open a directory below `dirfd` without following a symlink; one of a `lower`
    layer with O_NOATIME where it may (its listing then leaves its atime)."""
    flags = DIR_FLAGS | NOATIME if lower else DIR_FLAGS
    try:
        return os.open(name, flags, dir_fd=dirfd)
    except PermissionError as e:
        if e.errno == errno.EPERM and flags != DIR_FLAGS:
            return open_dir_at(dirfd, name)  # O_NOATIME refused: not her directory
        # An unreadable directory can still be used as a dir fd for *at calls.
        return os.open(
            name, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dirfd
        )


def open_file_at(dirfd: int, name: bytes, flags: int) -> int:
    """Open the regular file NAME below `dirfd` with `flags` (`open_file_stat_at`)."""
    return open_file_stat_at(dirfd, name, flags)[0]


def open_lower_file(dirfd: int, name: bytes) -> tuple[int, os.stat_result, bool]:
    """A lower layer's regular file NAME below `dirfd` opened for reading, with its stat,
    and whether with O_NOATIME (if not, reading it sets its atime: `Identity.keep_lower_stat`
    first, where its stat is shown)."""
    if NOATIME:
        try:
            return (*open_file_stat_at(dirfd, name, os.O_RDONLY | NOATIME), True)
        except PermissionError as e:
            if e.errno != errno.EPERM:
                raise
    return (*open_file_stat_at(dirfd, name, os.O_RDONLY), False)


def open_file_stat_at(dirfd: int, name: bytes, flags: int) -> tuple[int, os.stat_result]:
    """Open the regular file NAME below `dirfd` with `flags`; ESTALE if it is not one now.
    With the file's stat, which the check takes (a copy-up reads it: no second fstat).

    Whoever owns a layer directory can swap a FIFO in for the file the node was
    looked up as: a plain open would then wait for a writer (or a reader) and
    stall the daemon, every mount's requests with it. So the open never blocks
    (O_NONBLOCK), never follows a symlink (O_NOFOLLOW), and what it got must be
    a regular file, else ESTALE (what kernel overlayfs answers when a layer's
    object is not what it looked up; the kernel then looks the name up again
    and meets the FIFO as a FIFO, in the caller, not here). O_NONBLOCK is then
    cleared again.
    """
    try:
        fd = os.open(name, flags | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dirfd)
    except OSError as e:
        if e.errno in (errno.ENXIO, errno.ELOOP):  # a FIFO without reader, a socket; a symlink
            raise FsError(errno.ESTALE, "not the regular file it was looked up as") from None
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise FsError(errno.ESTALE, "not the regular file it was looked up as")
        if not flags & os.O_NONBLOCK:
            # the status flags are the ones just opened with (F_SETFL takes only those):
            # no F_GETFL, one syscall less on every open of a file
            fcntl.fcntl(fd, fcntl.F_SETFL, flags)
    except BaseException:
        os.close(fd)
        raise
    return fd, st


def open_layer_dir(path: str, what: str, flags: int = os.O_RDONLY | os.O_DIRECTORY) -> int:
    """The directory at `path` (a layer, an upper, a work dir, the mount point), opened
    with `flags` (for reading unless told).

    Root mounts layers whose paths cross directories a user can write (a home, /tmp):
    every component is resolved once and a symlink is followed only if root or the
    caller owns it (`tree.open_trusted`, as the mount point), so a symlink she plants
    or swaps in never makes root's daemon write into, or show, another tree (/etc).
    """
    try:
        return open_trusted(path, flags)
    except UntrustedSymlink as e:
        raise UserError(f"{what} {path!r} {e.strerror}; refusing to use it") from None
    except FileNotFoundError:
        raise UserError(f"{what} {path!r} does not exist") from None
    except NotADirectoryError:
        raise UserError(f"{what} {path!r} is not a directory") from None
    except OSError as e:
        raise UserError(f"{what} {path!r}: {e.strerror}") from None


def _open_layer(path: str, index: int, what: str, mount_points: list[str] | None = None) -> Layer:
    fd = open_layer_dir(path, what)
    if index > 0:
        fd = read_only_view(fd, mount_points)
    st = os.fstat(fd)
    if index > 0:
        hold_lower(fd)
    return Layer(index, os.path.abspath(path), fd, st.st_dev, st.st_ino)


def read_only_view(fd: int, mount_points: list[str] | None = None) -> int:
    """The lower layer directory open at `fd`, reopened through a read-only copy of its
    mounts (detached, the daemon's alone); `fd` itself where that cannot be made.

    Kernel overlayfs never sets a lower object's atime: it opens files and directories
    with O_NOATIME (which `open_lower_file` and `open_dir_at` do too, where allowed) and
    reads a symlink's target without the atime update that readlink(2) makes, which no
    flag turns off. On a read-only mount no access writes an atime, readlink's included.
    The copy needs CAP_SYS_ADMIN over the mount namespace (root; not the root of a user
    namespace over the host's, rootless `run`'s daemon): without it a lower symlink's
    atime is set the first time the daemon reads it (then the kernel keeps the target,
    FUSE_CACHE_SYMLINKS), and the stat shown is the one it had (`keep_lower_stat`).
    Where it cannot, the directory is opened again with O_NOATIME (`open_dir_at`).
    `fd` is closed: the fd returned replaces it. The copy goes with its last fd.

    Not where a mount lies below the directory (`mount_points`, this namespace's; read
    here if not given): the copy would hold those mounts' filesystems for as long as
    the daemon lives (a pyunion mount at `lower/sub` never saw its unmount: its daemon
    lived on, `pyunion umount` waited 30 s and failed), and show them as they were at
    mount time, where the directory itself shows them as they are."""
    try:
        if _mounts_below(fd, mount_points):
            raise OSError(errno.EBUSY, "mounts below the layer")
        view = _read_only_copy(fd)
    except OSError:  # EPERM: not ours to copy; ENOSYS, or filtered: an older kernel
        try:
            view = open_dir_at(fd, b".", lower=True)
        except OSError:
            return fd
    os.close(fd)
    return view


def _mounts_below(fd: int, mount_points: list[str] | None) -> bool:
    """Whether a mount of this namespace lies below the directory open at `fd` (or its
    path cannot be told: then one may)."""
    path = os.readlink(syscalls.fd_str(fd))
    if not path.startswith("/") or path.endswith(" (deleted)"):
        return True
    if mount_points is None:
        mount_points = [mp for _, _, _, mp, _, _ in mount_table()]
    prefix = path.rstrip("/") + "/"
    return any(mp.startswith(prefix) for mp in mount_points)


def _read_only_copy(fd: int) -> int:
    tree = syscalls.open_tree_clone(fd, recursive=True)
    try:
        flags = syscalls.AT_EMPTY_PATH | syscalls.AT_RECURSIVE
        syscalls.mount_setattr(tree, "", flags, syscalls.MOUNT_ATTR_RDONLY)
        return os.open(b".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=tree)
    finally:
        os.close(tree)


def hold_lower(fd: int) -> None:
    """Say that a mount uses the lower layer open at `fd`, for as long as the fd is open.

    A shared flock on the layer's directory: the image store's collection
    (`image.store.Store.gc`) keeps a layer it cannot lock exclusively, so an
    `rmi` no longer deletes the files of a running container's image under it.
    Nothing else waits for it; where flock is refused the layer is just not held.
    """
    with contextlib.suppress(OSError):
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)


class LayerStack:
    """`layers[0]` is the upper or None; `layers[1:]` are the lowers, top first."""

    def __init__(self, lowers: list[str], upper: str | None) -> None:
        if not lowers and upper is None:
            raise UserError("no layers given")
        self.layers: list[Layer | None] = [None]
        try:
            if upper is not None:
                self.layers[0] = _open_layer(upper, 0, "upper directory")
            # Read once for all lowers: each is copied only with no mount below it.
            mount_points = [mp for _, _, _, mp, _, _ in mount_table()] if lowers else []
            for i, path in enumerate(lowers, start=1):
                self.layers.append(_open_layer(path, i, "layer", mount_points))
        except BaseException:
            self.close()
            raise
        devs: list[int] = []
        for layer in self.layers:
            if layer is not None and layer.dev not in devs:
                devs.append(layer.dev)
        self.devs = devs

    @property
    def upper(self) -> Layer | None:
        return self.layers[0]

    @property
    def writable(self) -> bool:
        return self.layers[0] is not None

    def fd(self, index: int) -> int:
        """The directory fd of the layer at `index` (0: the upper, which must exist)."""
        layer = self.layers[index]
        assert layer is not None
        return layer.fd

    def root_chain(self) -> tuple[int, ...]:
        return tuple(layer.index for layer in self.layers if layer is not None)

    def close(self) -> None:
        for layer in self.layers:
            if layer is not None and layer.fd >= 0:
                os.close(layer.fd)
                layer.fd = -1
