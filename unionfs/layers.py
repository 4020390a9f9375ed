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

from .errors import FsError, UserError
from .tree import DIR_FLAGS, UntrustedSymlink, open_trusted


class Layer:
    """One layer, held by its directory fd: index 0 is the upper, 1.. the lowers, top first."""

    __slots__ = ("dev", "fd", "index", "ino", "path")

    def __init__(self, index: int, path: str, fd: int, dev: int, ino: int) -> None:
        self.index = index
        self.path = path
        self.fd = fd
        self.dev = dev
        self.ino = ino


def open_dir_at(dirfd: int, name: bytes) -> int:
    """Open a directory below `dirfd` without following a symlink."""
    try:
        return os.open(name, DIR_FLAGS, dir_fd=dirfd)
    except PermissionError:
        # An unreadable directory can still be used as a dir fd for *at calls.
        return os.open(
            name, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dirfd
        )


def open_file_at(dirfd: int, name: bytes, flags: int) -> int:
    """Open the regular file NAME below `dirfd` with `flags` (`open_file_stat_at`)."""
    return open_file_stat_at(dirfd, name, flags)[0]


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


def _open_layer(path: str, index: int, what: str) -> Layer:
    fd = open_layer_dir(path, what)
    st = os.fstat(fd)
    if index > 0:
        hold_lower(fd)
    return Layer(index, os.path.abspath(path), fd, st.st_dev, st.st_ino)


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
            for i, path in enumerate(lowers, start=1):
                self.layers.append(_open_layer(path, i, "layer"))
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
