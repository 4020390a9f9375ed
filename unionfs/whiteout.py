"""Whiteouts and opaque directories: recognising every on-disk form, writing the kernel's.

Forms read, in any layer (docs/formats.md):
- whiteout of NAME: char device 0/0 named NAME (kernel); empty file `.wh.NAME`
  (OCI/AUFS); a zero-size file with xattr `trusted.overlay.whiteout` inside a
  directory whose `trusted.overlay.opaque` is `x` (the kernel's "xwhiteout").
- opaque directory: xattr `trusted.overlay.opaque`, `user.overlay.opaque` or
  `user.fuseoverlayfs.opaque` = `y`; a file `.wh..wh..opq`; a char 0/0 `.wh..opq`.
An OCI marker only hides what lies in the layers below its own.

Written to the upper: char 0/0 and `trusted.overlay.opaque=y`, falling back to
`.wh.NAME`, `user.overlay.opaque=y` and `.wh..wh..opq` where the kernel form is
refused (no CAP_MKNOD or no trusted xattrs).
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat

from .syscalls import RENAME_WHITEOUT, renameat2
from .tree import DIR_FLAGS

WH_PREFIX = b".wh."
OPQ_OCI = b".wh..wh..opq"
OPQ_CHAR = b".wh..opq"
AUFS_META_PREFIX = b".wh..wh."

OPAQUE_XATTRS = (b"trusted.overlay.opaque", b"user.overlay.opaque", b"user.fuseoverlayfs.opaque")
XWHITEOUT_XATTR = b"trusted.overlay.whiteout"
INTERNAL_XATTR_PREFIXES = (b"trusted.overlay.", b"user.overlay.", b"user.fuseoverlayfs.")

# What the kernel answers when a whiteout (mknod 0/0, RENAME_WHITEOUT) or a trusted
# xattr is not allowed here: then the OCI form is written instead.
_KERNEL_REFUSED = (errno.EPERM, errno.EACCES, errno.EOPNOTSUPP, errno.EINVAL)
_XATTR_REFUSED = (errno.EPERM, errno.EACCES, errno.EOPNOTSUPP)


def is_internal_xattr(name: bytes) -> bool:
    return name.startswith(INTERNAL_XATTR_PREFIXES)


# The kernel's escaping (Linux 6.7): `trusted.overlay.X` set through a mount is stored
# as `trusted.overlay.overlay.X` in the layer, which the mount shows as
# `trusted.overlay.X` again, so that an overlay's own xattrs can be set on the files
# of another overlay's layers (nested overlays). user.overlay.* is not escaped: without
# `userxattr` the kernel treats it as an ordinary name, pyunion as its markers.
_ESCAPE = b"trusted.overlay."
_ESCAPED = b"trusted.overlay.overlay."


def stored_xattr(name: bytes) -> bytes | None:
    """The name a layer stores for xattr `name` as the mount shows it; None if reserved."""
    if name.startswith(_ESCAPE):
        return _ESCAPED + name[len(_ESCAPE) :]
    return None if is_internal_xattr(name) else name


_NAMESPACES = (b"user.", b"trusted.", b"security.", b"system.posix_acl_")


def missing_xattr_errno(name: bytes) -> int:
    """What getxattr/removexattr of a name no layer has answers: ENODATA, or, for a
    name in no namespace the layers' filesystems know, their EOPNOTSUPP."""
    return errno.ENODATA if name.startswith(_NAMESPACES) else errno.EOPNOTSUPP


def shown_xattr(stored: bytes) -> bytes | None:
    """The name the mount shows for an xattr a layer stores; None if it is a marker."""
    if stored.startswith(_ESCAPED):
        return _ESCAPE + stored[len(_ESCAPED) :]
    return None if is_internal_xattr(stored) else stored


def is_whiteout_stat(st: os.stat_result) -> bool:
    """The kernel's whiteout: a character device with device number 0/0."""
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == 0


def oci_whiteout_target(name: bytes) -> bytes | None:
    """`.wh.NAME` -> NAME; None for other names and for AUFS metadata and markers."""
    if not name.startswith(WH_PREFIX) or name.startswith(AUFS_META_PREFIX) or name == OPQ_CHAR:
        return None
    target = name[len(WH_PREFIX) :]
    return target or None


def _xattr(fd: int, name: bytes) -> bytes | None:
    try:
        return os.getxattr(fd, name)
    except OSError:
        return None


def dir_flags(fd: int) -> tuple[bool, bool]:
    """(opaque, has_xwhiteouts) of the directory open at `fd` in its own layer."""
    opaque = False
    xwh = False
    try:
        names = os.listxattr(fd)
    except OSError:
        names = []
    for n in names:
        bn = n.encode() if isinstance(n, str) else n
        if bn in OPAQUE_XATTRS:
            v = _xattr(fd, bn)
            if v == b"y":
                opaque = True
            elif v == b"x" and bn == OPAQUE_XATTRS[0]:
                xwh = True
    if not opaque:
        for marker in (OPQ_OCI, OPQ_CHAR):
            try:
                st = os.stat(marker, dir_fd=fd, follow_symlinks=False)
            except OSError:
                continue
            if marker == OPQ_OCI or is_whiteout_stat(st):
                opaque = True
                break
    return opaque, xwh


def is_xwhiteout(dirfd: int, name: bytes, st: os.stat_result) -> bool:
    """A zero-size regular file marked `trusted.overlay.whiteout` (only in an `x` directory)."""
    if not stat.S_ISREG(st.st_mode) or st.st_size != 0:
        return False
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=dirfd)
    except OSError:
        return False
    try:
        return _xattr(fd, XWHITEOUT_XATTR) is not None
    finally:
        os.close(fd)


class WhiteoutWriter:
    """Writes whiteouts and opaque marks, the kernel's format first.

    The kernel's forms (a char device 0/0, `trusted.overlay.opaque=y`) need
    CAP_MKNOD and trusted xattrs; where they are refused the writer falls back
    to the OCI forms (`.wh.NAME`, `.wh..wh..opq`) for good, once per kind, or
    for both kinds at once with `together` (an image layer is in one format).
    Used for a mount's upper (`Union`) and for unpacking image layers
    (`image.unpack`), which differ only in those conventions: the fallback
    markers' mode, and whether a fallback opaque mark also gets
    `user.overlay.opaque=y` (what fuse-overlayfs writes in an upper; an image
    layer keeps only the marker).

    With `userxattr`, a refused trusted xattr is followed by
    `user.overlay.opaque=y` as the opaque mark, with whiteouts still char 0/0:
    the format kernel overlayfs reads with `-o userxattr` in a user namespace,
    whose root may make that device but not trusted xattrs (a rootless store).
    """

    def __init__(
        self,
        kernel: bool = True,
        marker_mode: int = 0o000,
        user_opaque_xattr: bool = True,
        together: bool = False,
        userxattr: bool = False,
    ) -> None:
        self.kernel_whiteouts = kernel
        self.kernel_opaque = kernel
        self.marker_mode = marker_mode
        self.user_opaque_xattr = user_opaque_xattr
        self.together = together
        self.wrote_oci = False  # an OCI marker was written (the layer is not kernel-only)
        self.userxattr = userxattr  # may fall back to user.overlay.opaque, kernel-readable
        self.wrote_userxattr = False

    @property
    def kernel_format(self) -> bool:
        """Whether everything written so far, and from now on, is in the kernel's format."""
        return self.kernel_whiteouts and self.kernel_opaque and not self.wrote_oci

    @property
    def format(self) -> str:
        """What was written: "kernel", "userxattr" (char 0/0 whiteouts with
        user.overlay.opaque) or "oci"."""
        if not self.kernel_format:
            return "oci"
        return "userxattr" if self.wrote_userxattr else "kernel"

    def _refused(self, whiteouts: bool) -> None:
        if whiteouts or self.together:
            self.kernel_whiteouts = False
        if not whiteouts or self.together:
            self.kernel_opaque = False

    def _marker(self, dirfd: int, name: bytes, excl: bool) -> None:
        """Create the empty marker file `name`; with `excl` False, one already there will do
        (it is never opened: a mode 0 marker cannot be, without CAP_DAC_OVERRIDE)."""
        self.wrote_oci = True
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            os.close(os.open(name, flags, self.marker_mode, dir_fd=dirfd))
        except FileExistsError:
            if excl:
                raise

    def make_whiteout(self, dirfd: int, name: bytes) -> None:
        """Create a whiteout for `name` in the directory `dirfd` (the name must be free)."""
        if self.kernel_whiteouts:
            try:
                os.mknod(name, stat.S_IFCHR | 0o000, os.makedev(0, 0), dir_fd=dirfd)
                return
            except OSError as e:
                if e.errno not in _KERNEL_REFUSED:
                    raise
                self._refused(whiteouts=True)
        self._marker(dirfd, WH_PREFIX + name, excl=True)

    def rename_leaving_whiteout(
        self, old_dirfd: int, old_name: bytes, new_dirfd: int, new_name: bytes
    ) -> None:
        """Move `old_name` to `new_name`, leaving a whiteout at `old_name`.

        One atomic RENAME_WHITEOUT where the kernel allows it; otherwise a
        rename, then a whiteout made in the freed name.
        """
        if self.kernel_whiteouts:
            try:
                renameat2(old_dirfd, old_name, new_dirfd, new_name, RENAME_WHITEOUT)
                return
            except OSError as e:
                if e.errno not in _KERNEL_REFUSED:
                    raise
        os.rename(old_name, new_name, src_dir_fd=old_dirfd, dst_dir_fd=new_dirfd)
        self.make_whiteout(old_dirfd, old_name)

    def remove_whiteout(self, dirfd: int, name: bytes) -> bool:
        """Remove a whiteout of `name` from the upper dir, in whichever form it has."""
        try:
            st = os.stat(name, dir_fd=dirfd, follow_symlinks=False)
            if is_whiteout_stat(st):
                os.unlink(name, dir_fd=dirfd)
                return True
        except FileNotFoundError:
            pass
        try:
            os.unlink(WH_PREFIX + name, dir_fd=dirfd)
            return True
        except FileNotFoundError:
            return False

    def set_opaque(self, dirfd: int) -> None:
        """Mark the directory open at `dirfd` opaque."""
        if self.kernel_opaque:
            # trusted.overlay.opaque, then (with `userxattr`) user.overlay.opaque; once one
            # is refused it is not tried again.
            names: tuple[bytes, ...]
            if self.wrote_userxattr:
                names = OPAQUE_XATTRS[1:2]
            else:
                names = OPAQUE_XATTRS[:2] if self.userxattr else OPAQUE_XATTRS[:1]
            for name in names:
                try:
                    os.setxattr(dirfd, name, b"y")
                    self.wrote_userxattr = name == OPAQUE_XATTRS[1]
                    return
                except OSError as e:
                    if e.errno not in _XATTR_REFUSED:
                        raise
            self._refused(whiteouts=False)
        if self.user_opaque_xattr:
            with contextlib.suppress(OSError):
                os.setxattr(dirfd, OPAQUE_XATTRS[1], b"y")
        self._marker(dirfd, OPQ_OCI, excl=False)

    def set_opaque_at(self, dirfd: int, name: bytes) -> None:
        """Mark the directory `name` in `dirfd` opaque."""
        fd = os.open(name, DIR_FLAGS, dir_fd=dirfd)
        try:
            self.set_opaque(fd)
        finally:
            os.close(fd)
