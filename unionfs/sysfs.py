"""Syscalls Python's os module lacks: renameat2 (RENAME_NOREPLACE/EXCHANGE/WHITEOUT).

Also `fdpath`: "/proc/self/fd/DIRFD/NAME" names one entry of a directory we
hold open, for the calls that have no dir_fd form (xattrs, chmod of a path);
used with follow_symlinks=False it never follows the last component, and the
directory part is the fd itself, so no symlink of a layer is ever followed.
"""

from __future__ import annotations

import ctypes
import errno
import os

RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
RENAME_WHITEOUT = 4

_libc = ctypes.CDLL(None, use_errno=True)
_renameat2 = _libc.renameat2
_renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
_renameat2.restype = ctypes.c_int


def renameat2(olddirfd: int, oldname: bytes, newdirfd: int, newname: bytes, flags: int = 0) -> None:
    if flags == 0:
        os.rename(oldname, newname, src_dir_fd=olddirfd, dst_dir_fd=newdirfd)
        return
    if _renameat2(olddirfd, oldname, newdirfd, newname, flags) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def fdpath(dirfd: int, name: bytes = b"") -> bytes:
    if name:
        return b"/proc/self/fd/%d/%s" % (dirfd, name)
    return b"/proc/self/fd/%d" % dirfd


def errno_of(e: OSError) -> int:
    return e.errno if e.errno is not None else errno.EIO
