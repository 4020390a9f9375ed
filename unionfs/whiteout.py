"""Whiteouts and opaque directories: recognising every on-disk form, writing the kernel's.

Forms read, in any layer (see shared/SPEC.md):
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

import errno
import os
import stat

WH_PREFIX = b".wh."
OPQ_OCI = b".wh..wh..opq"
OPQ_CHAR = b".wh..opq"
AUFS_META_PREFIX = b".wh..wh."

OPAQUE_XATTRS = (b"trusted.overlay.opaque", b"user.overlay.opaque", b"user.fuseoverlayfs.opaque")
XWHITEOUT_XATTR = b"trusted.overlay.whiteout"
INTERNAL_XATTR_PREFIXES = (b"trusted.overlay.", b"user.overlay.", b"user.fuseoverlayfs.")


def is_internal_xattr(name: bytes) -> bool:
    return name.startswith(INTERNAL_XATTR_PREFIXES)


def is_whiteout_stat(st: os.stat_result) -> bool:
    """The kernel's whiteout: a character device with device number 0/0."""
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == 0


def is_marker_name(name: bytes) -> bool:
    """Names that never appear in the merged view."""
    return name.startswith(WH_PREFIX)


def oci_whiteout_target(name: bytes) -> bytes | None:
    """`.wh.NAME` -> NAME; None for other names and for AUFS metadata and markers."""
    if not name.startswith(WH_PREFIX) or name.startswith(AUFS_META_PREFIX) or name == OPQ_CHAR:
        return None
    target = name[len(WH_PREFIX):]
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
    """Writes whiteouts and opaque marks into the upper, kernel format first."""

    def __init__(self) -> None:
        self.kernel_whiteouts = True
        self.kernel_opaque = True

    def make_whiteout(self, dirfd: int, name: bytes) -> None:
        """Create a whiteout for `name` in the upper directory `dirfd` (name must be free)."""
        if self.kernel_whiteouts:
            try:
                os.mknod(name, stat.S_IFCHR | 0o000, os.makedev(0, 0), dir_fd=dirfd)
                return
            except PermissionError:
                self.kernel_whiteouts = False
            except OSError as e:
                if e.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.EINVAL):
                    raise
                self.kernel_whiteouts = False
        fd = os.open(WH_PREFIX + name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW,
                     0o000, dir_fd=dirfd)
        os.close(fd)

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
        if self.kernel_opaque:
            try:
                os.setxattr(dirfd, b"trusted.overlay.opaque", b"y")
                return
            except OSError as e:
                if e.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.EACCES):
                    raise
                self.kernel_opaque = False
        try:
            os.setxattr(dirfd, b"user.overlay.opaque", b"y")
        except OSError:
            pass
        fd = os.open(OPQ_OCI, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW, 0o000, dir_fd=dirfd)
        os.close(fd)
