"""Walking and removing directory trees through fds, without recursion.

Trees that pyunion removes (a container's upper, a layer in the store, the
work dir) may have been built by a hostile program: they can be deeper than
Python's recursion limit, deeper than the fd limit, and hold symlinks to
anywhere. So nothing here recurses, nothing follows a symlink (every open is
`O_NOFOLLOW` relative to the parent's fd), and at most two directory fds are
open at a time: going back up is `openat(fd, "..")`, checked against the
identity (st_dev, st_ino) recorded on the way down, so a directory moved
meanwhile stops the walk with an error instead of leading it elsewhere.
"""

from __future__ import annotations

import errno
import os
import stat

DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def _ident(st: os.stat_result) -> tuple[int, int]:
    return st.st_dev, st.st_ino


def _writable(fd: int) -> None:
    """Let the owner change a read-only directory (an unpacked layer may have 0555 dirs)."""
    st = os.fstat(fd)
    os.chmod(fd, stat.S_IMODE(st.st_mode) | stat.S_IRWXU)


def _unlink(name: str | bytes, fd: int, is_dir: bool) -> None:
    try:
        (os.rmdir if is_dir else os.unlink)(name, dir_fd=fd)
    except PermissionError:
        if os.geteuid() == 0:
            raise
        _writable(fd)
        (os.rmdir if is_dir else os.unlink)(name, dir_fd=fd)


def _open_dir(name: str | bytes, fd: int) -> int:
    try:
        return os.open(name, DIR_FLAGS, dir_fd=fd)
    except PermissionError:
        if os.geteuid() == 0:
            raise
        os.chmod(name, 0o700, dir_fd=fd, follow_symlinks=False)
        return os.open(name, DIR_FLAGS, dir_fd=fd)


def _first_subdir(fd: int) -> str | None:
    """Unlink every non-directory of `fd`; return the name of a subdirectory, if any."""
    try:
        entries = os.scandir(fd)
    except PermissionError:
        if os.geteuid() == 0:
            raise
        _writable(fd)
        entries = os.scandir(fd)
    with entries:
        for e in entries:
            if e.is_dir(follow_symlinks=False):
                return e.name
            _unlink(e.name, fd, False)
    return None


def rmtree_at(dirfd: int, name: str | bytes) -> None:
    """Remove `name` (below `dirfd`) and everything under it; missing is fine."""
    try:
        st = os.stat(name, dir_fd=dirfd, follow_symlinks=False)
    except FileNotFoundError:
        return
    if not stat.S_ISDIR(st.st_mode):
        _unlink(name, dirfd, False)
        return
    fd = _open_dir(name, dirfd)
    ids = [_ident(os.fstat(fd))]
    names: list[str] = []
    try:
        while True:
            sub = _first_subdir(fd)
            if sub is not None:
                nfd = _open_dir(sub, fd)
                os.close(fd)
                fd = nfd
                ids.append(_ident(os.fstat(fd)))
                names.append(sub)
                continue
            if not names:
                break
            pfd = os.open("..", DIR_FLAGS, dir_fd=fd)
            if _ident(os.fstat(pfd)) != ids[-2]:
                os.close(pfd)
                raise OSError(errno.ESTALE, "a directory moved while its tree was removed")
            os.close(fd)
            fd = pfd
            ids.pop()
            _unlink(names.pop(), fd, True)
    finally:
        os.close(fd)
    _unlink(name, dirfd, True)


def rmtree(path: str, missing_ok: bool = True) -> None:
    """Remove the tree at `path`; only its last component may not be a symlink to follow."""
    parent, name = os.path.split(os.path.abspath(path))
    try:
        pfd = os.open(parent or "/", DIR_FLAGS & ~os.O_NOFOLLOW)
    except FileNotFoundError:
        if missing_ok:
            return
        raise
    try:
        if not missing_ok:
            os.stat(name, dir_fd=pfd, follow_symlinks=False)
        rmtree_at(pfd, name)
    finally:
        os.close(pfd)


def walk_at(dirfd: int) -> list[tuple[bytes, os.stat_result]]:
    """Every entry below `dirfd` (relative path, lstat), parents before children.

    Iterative and fd-based; holds one fd per directory level only while it is
    listed (the list of pending directories carries paths relative to `dirfd`,
    each opened one component at a time with O_NOFOLLOW).
    """
    out: list[tuple[bytes, os.stat_result]] = []
    pending: list[bytes] = [b""]
    while pending:
        rel = pending.pop()
        fd = open_rel(dirfd, rel)
        try:
            with os.scandir(fd) as it:
                children = sorted((os.fsencode(e.name), e.stat(follow_symlinks=False))
                                  for e in it)
        finally:
            os.close(fd)
        subdirs = []
        for name, st in children:
            path = rel + b"/" + name if rel else name
            out.append((path, st))
            if stat.S_ISDIR(st.st_mode):
                subdirs.append(path)
        pending.extend(reversed(subdirs))
    return out


def open_rel(dirfd: int, rel: bytes, flags: int = DIR_FLAGS) -> int:
    """Open `rel` below `dirfd` one component at a time, never following a symlink."""
    fd = os.dup(dirfd)
    if not rel:
        return fd
    parts = rel.split(b"/")
    try:
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            nfd = os.open(part, flags if last else DIR_FLAGS, dir_fd=fd)
            os.close(fd)
            fd = nfd
    except BaseException:
        os.close(fd)
        raise
    return fd
