"""Walking and removing directory trees through fds, without recursion.

Trees that pyunion removes (a container's upper, a layer in the store, the
work dir) may have been built by a hostile program: they can be deeper than
Python's recursion limit, deeper than the fd limit, and hold symlinks to
anywhere. So nothing here recurses, nothing follows a symlink (every open is
`O_NOFOLLOW` relative to the parent's fd), and at most two directory fds are
open at a time: going back up is `openat(fd, "..")`, checked against the
identity (st_dev, st_ino) recorded on the way down, so a directory moved
meanwhile stops the walk with an error instead of leading it elsewhere. They
can also be wide: no directory is read from its start once per entry (a batch
of names is kept instead), and a walk holds the directory it is in, not the tree.
"""

from __future__ import annotations

import errno
import os
import stat

# The supervisor of a running container imports this module in an interpreter of its
# own (`supervise.py`): typing and contextlib would add ~2.5 MiB to each container.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Iterator
    from typing import Literal

    Resolve = Literal["beneath", "in_root", "trusted"]

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


SUBDIR_BATCH = 4096  # subdirectory names a removal keeps for one directory at a time


def _subdirs(fd: int) -> list[str]:
    """Unlink every non-directory of `fd`; return up to SUBDIR_BATCH of its subdirectories.

    A directory is read again only once the names it gave are all removed: reading it
    from its start for each subdirectory (the first one found) made removing a
    directory of N subdirectories quadratic (ext4 reads past every emptied slot:
    80,000 took 186 s)."""
    try:
        entries = os.scandir(fd)
    except PermissionError:
        if os.geteuid() == 0:
            raise
        _writable(fd)
        entries = os.scandir(fd)
    subdirs: list[str] = []
    with entries:
        for e in entries:
            if e.is_dir(follow_symlinks=False):
                subdirs.append(e.name)
                if len(subdirs) >= SUBDIR_BATCH:
                    break
            else:
                _unlink(e.name, fd, False)
    return subdirs


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
    todo = [_subdirs(fd)]  # per level on the way down: the subdirectories still to remove
    try:
        while True:
            if todo[-1]:
                sub = todo[-1].pop()
                try:
                    nfd = _open_dir(sub, fd)
                except FileNotFoundError:
                    continue  # gone since it was listed
                os.close(fd)
                fd = nfd
                ids.append(_ident(os.fstat(fd)))
                names.append(sub)
                todo.append(_subdirs(fd))
                continue
            more = _subdirs(fd)  # past the batch, or made meanwhile
            if more:
                todo[-1] = more
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
            todo.pop()
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


def walk_at(dirfd: int, max_path: int | None = None) -> Iterator[tuple[bytes, int]]:
    """Every entry below `dirfd` (relative path, st_mode), parents before children.

    Iterative and fd-based; the list of pending directories carries paths
    relative to `dirfd`, reached with a `DirCursor` (two fds; depth first, so
    each move is short). Entries are yielded as they are met, and only a
    directory's names and modes are kept while it is gone through: a tree of a
    million files held a million stat results (930 bytes an entry) when the
    walk returned a list. The paths grow with the depth (a chain 20,000 deep:
    400 MB of them), so a caller walking a tree that someone else built gives
    `max_path`: an entry whose path is longer stops the walk with ENAMETOOLONG
    (its path as the error's filename) before anything below it.
    """
    pending: list[bytes] = [b""]
    cur = DirCursor(dirfd)
    try:
        while pending:
            rel = pending.pop()
            fd = cur.goto(rel.split(b"/") if rel else [])
            with os.scandir(fd) as it:
                children = sorted(
                    (os.fsencode(e.name), e.stat(follow_symlinks=False).st_mode) for e in it
                )
            subdirs = []
            for name, mode in children:
                path = rel + b"/" + name if rel else name
                if max_path is not None and len(path) > max_path:
                    raise OSError(errno.ENAMETOOLONG, os.strerror(errno.ENAMETOOLONG), path)
                yield path, mode
                if stat.S_ISDIR(mode):
                    subdirs.append(path)
            pending.extend(reversed(subdirs))
    finally:
        cur.close()


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


Name = str | bytes


class DirCursor:
    """One directory fd that moves around the tree below `root_fd`, never following a symlink.

    `goto(parts)` goes up with `openat("..")`, checked against the identity
    recorded on the way down, and down one `O_NOFOLLOW` component at a time: a
    move costs the distance between the two directories, not their depth, so a
    walk in tree order is linear however deep the tree, and only two fds are
    ever open. A component that is missing can be created (`mkdir=MODE`); one
    that is a symlink or not a directory stops the move with ELOOP or ENOTDIR,
    the cursor then standing in that component's parent (`parts`), so the
    caller can say which it was.
    """

    def __init__(self, root_fd: int) -> None:
        self._root = root_fd  # borrowed: the caller keeps it open while the cursor lives
        self.fd = os.dup(root_fd)
        self.parts: list[Name] = []
        self._ids = [_ident(os.fstat(self.fd))]

    def ident(self) -> tuple[int, int]:
        """(st_dev, st_ino) of the directory the cursor stands in."""
        return self._ids[-1]

    def goto(self, parts: list[str] | list[bytes] | list[Name], mkdir: int | None = None) -> int:
        """Stand in the directory `parts` (relative to the root); returns the (borrowed) fd."""
        common = 0
        limit = min(len(parts), len(self.parts))
        while common < limit and parts[common] == self.parts[common]:
            common += 1
        while len(self.parts) > common:
            self._up()
        for comp in parts[common:]:
            self._down(comp, mkdir)
        return self.fd

    def reset(self) -> None:
        """Back to the root, without using `..` (after the tree it stood in was removed)."""
        fd = os.dup(self._root)
        os.close(self.fd)
        self.fd = fd
        del self.parts[:]
        del self._ids[1:]

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def _up(self) -> None:
        pfd = os.open("..", DIR_FLAGS, dir_fd=self.fd)
        if _ident(os.fstat(pfd)) != self._ids[-2]:
            os.close(pfd)
            raise OSError(errno.ESTALE, "a directory moved while the tree was walked")
        os.close(self.fd)
        self.fd = pfd
        self.parts.pop()
        self._ids.pop()

    def _down(self, comp: Name, mkdir: int | None) -> None:
        try:
            nfd = os.open(comp, DIR_FLAGS, dir_fd=self.fd)
        except FileNotFoundError:
            if mkdir is None:
                raise
            os.mkdir(comp, mkdir, dir_fd=self.fd)
            nfd = os.open(comp, DIR_FLAGS, dir_fd=self.fd)
        except OSError as e:
            # O_NOFOLLOW|O_DIRECTORY on a symlink gives ENOTDIR on Linux; say what it is.
            if e.errno == errno.ENOTDIR and stat.S_ISLNK(
                os.stat(comp, dir_fd=self.fd, follow_symlinks=False).st_mode
            ):
                raise OSError(errno.ELOOP, os.strerror(errno.ELOOP), comp) from None
            raise
        os.close(self.fd)
        self.fd = nfd
        self.parts.append(comp)
        self._ids.append(_ident(os.fstat(nfd)))


class NotRegularFile(OSError):
    """`open_regular` found a symlink, a FIFO, a device or a directory where a file should be."""


# Filesystems whose regular files are the kernel's interfaces, not data: proc, sysfs,
# debugfs, tracefs, securityfs, configfs, efivarfs, pstore, cgroup, cgroup2, bpf. A
# read may block or take what it reads from others (/proc/kmsg: the kernel's log).
KERNEL_FILESYSTEMS = frozenset(
    {
        0x9FA0,
        0x62656572,
        0x64626720,
        0x74726163,
        0x73636673,
        0x62656570,
        0xDE5E81E4,
        0x6165676C,
        0x27E0EB,
        0x63677270,
        0xCAFE4A11,
    }
)


def open_regular(
    dirfd: int, path: Name, symlinks: bool = False, resolve: Resolve = "beneath"
) -> int:
    """Open PATH (relative to `dirfd`) for reading, only if it is a regular file.

    Untrusted trees (an image layout, a container's root) may put a FIFO there
    (a read would hang), a device (/dev/zero: endless), or a symlink out of the
    tree. The path is resolved as O_PATH, so that nothing is opened yet:
    - "beneath": by openat2 beneath `dirfd` (with `symlinks=False` no symlink
      at all; otherwise only ones that stay inside);
    - "in_root": as if `dirfd` were `/` (`syscalls.open_in_root`: symlinks,
      absolute ones too, and `..` resolve inside it, as the container itself
      would see the path);
    - "trusted": as root may follow a path another user can write
      (`open_trusted`: only root's and the caller's symlinks; a Containerfile
      in a build context, a seccomp profile may be one, to anywhere, but not
      hers to /etc/shadow or to root's laxer profile).
    Only a regular file is then opened for reading, through its O_PATH fd, and not one
    of the kernel's (`KERNEL_FILESYSTEMS`: /proc/kmsg is a regular file).
    Raises NotRegularFile for the rest.
    """
    from . import syscalls

    try:
        if resolve == "in_root":
            pfd = syscalls.open_in_root(dirfd, path)
        elif resolve == "trusted":
            pfd = open_trusted(path, os.O_PATH, dir_fd=dirfd)
        else:
            how = syscalls.RESOLVE_BENEATH | syscalls.RESOLVE_NO_MAGICLINKS
            if not symlinks:
                how |= syscalls.RESOLVE_NO_SYMLINKS
            pfd = syscalls.openat2(dirfd, path, os.O_PATH | (0 if symlinks else os.O_NOFOLLOW), how)
    except OSError as e:
        if e.errno == errno.ELOOP and resolve == "beneath":  # else: a loop, said as such
            raise NotRegularFile(e.errno, "is a symlink", path) from None
        if e.errno == errno.EXDEV:
            raise NotRegularFile(e.errno, "leads outside its directory", path) from None
        raise
    try:
        st = os.fstat(pfd)
        if stat.S_ISLNK(st.st_mode):
            raise NotRegularFile(errno.ELOOP, "is a symlink", path)
        if not stat.S_ISREG(st.st_mode):
            raise NotRegularFile(errno.EINVAL, "is not a regular file", path)
        if syscalls.fs_magic(pfd) in KERNEL_FILESYSTEMS:  # a container root's /proc, /sys
            raise NotRegularFile(errno.EINVAL, "is one of the kernel's files", path)
        return os.open(f"/proc/self/fd/{pfd}", os.O_RDONLY | os.O_CLOEXEC)
    finally:
        os.close(pfd)


def _read_at_most(fd: int, limit: int) -> bytes:
    """What `fd` gives up to EOF or `limit` bytes, whichever comes first (1 MiB a read)."""
    chunks = []
    while limit > 0 and (chunk := os.read(fd, min(limit, 1 << 20))):
        chunks.append(chunk)
        limit -= len(chunk)
    return b"".join(chunks)


def read_regular(
    dirfd: int, path: Name, limit: int, symlinks: bool = False, resolve: Resolve = "beneath"
) -> bytes:
    """The content of a regular file below `dirfd` (see `open_regular`), at most `limit` bytes.

    Raises `OSError(EFBIG)` when the file holds more: nothing past limit+1 is read.
    """
    fd = open_regular(dirfd, path, symlinks, resolve)
    try:
        data = _read_at_most(fd, limit + 1)
    finally:
        os.close(fd)
    if len(data) > limit:
        raise OSError(errno.EFBIG, f"larger than {limit} bytes", path)
    return data


def open_own_file(dirfd: int, name: str) -> tuple[int, os.stat_result] | None:
    """NAME in `dirfd` opened for reading, with its stat, only if it is a regular file of
    this user's (a private state directory's file, not something put in its place: no
    symlink followed, no FIFO waited on); None if it is missing, anything else, or cannot
    be opened. The caller closes the fd."""
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dirfd)
    except OSError:
        return None
    st: os.stat_result | None
    try:
        st = os.fstat(fd)
    except OSError:
        st = None
    if st is None or not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid():
        os.close(fd)
        return None
    return fd, st


def replace_file(dirfd: int, name: str, data: bytes, mode: int) -> None:
    """Write `data` as NAME in `dirfd` (a private state directory), mode exactly `mode`:
    under a fresh temporary name (`.NAME.RANDOM`), then renamed over whatever was there,
    so that a reader sees all of it or nothing. The temporary file goes if anything fails."""
    for _ in range(8):
        tmp = f".{name}.{os.urandom(8).hex()}"
        try:
            fd = os.open(
                tmp,
                os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                mode,
                dir_fd=dirfd,
            )
        except FileExistsError:
            continue
        try:
            try:
                os.fchmod(fd, mode)  # whatever the umask
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
            finally:
                os.close(fd)
            os.rename(tmp, name, src_dir_fd=dirfd, dst_dir_fd=dirfd)
        except BaseException:
            try:  # noqa: SIM105 - no contextlib here (see the imports)
                os.unlink(tmp, dir_fd=dirfd)
            except OSError:
                pass
            raise
        return
    raise OSError(errno.EEXIST, "no free temporary name in the state directory")


class UntrustedSymlink(OSError):
    """`open_trusted` met a symlink that neither root nor the caller owns."""


MAX_SYMLINKS = 40  # the kernel's limit on symlinks followed in one lookup
MAX_LEVELS_UP = 2048  # a path of PATH_MAX (4096) has at most this many directories


def _on_procfs(st: os.stat_result) -> bool:
    """Whether `st` is of the /proc mounted here (no other filesystem has magic links)."""
    try:
        return st.st_dev == os.stat("/proc").st_dev
    except OSError:
        return False


class Mounters:
    """Who mounted the FUSE filesystems met during one call (`open_trusted`,
    `open_private_dir`), by device: /proc/self/mountinfo read once per device, not at
    every component, symlink and level walked up on it (a walk up 20 levels of a tmpfs
    read it 20 times).

    Correct for as long as the call holds it: a device number names one superblock
    while that lives, and a FUSE superblock's mounter (`user_id`) is fixed when it is
    mounted. Each device asked about is pinned by a dup of the fd its stat came from,
    so that its superblock cannot go and another (her new FUSE mount) take its number
    before `close`; one unmounted meanwhile keeps the mounter it had (a read then
    would find no mount: `_read_mounter` then trusts no one there). Nothing is kept
    across calls: mounts come and go between them."""

    __slots__ = ("_known", "_pins")

    def __init__(self) -> None:
        self._known: dict[int, int | None] = {}
        self._pins: list[int] = []

    def mounter(self, st: os.stat_result, fd: int) -> int | None:
        """`_read_mounter` of `st` (the stat of open `fd`), read once per device."""
        dev = st.st_dev
        if dev in self._known:
            return self._known[dev]
        pin = os.dup(fd)
        self._pins.append(pin)
        found = self._known[dev] = _read_mounter(dev, fd)
        return found

    def close(self) -> None:
        while self._pins:
            os.close(self._pins.pop())


FUSE_SUPER_MAGIC = 0x65735546
UNLISTED_FUSE = -1  # `_read_mounter`: no user's, so never trusted


def _read_mounter(dev: int, fd: int = -1) -> int | None:
    """Who mounted the FUSE filesystem of device `dev` (`procfs.fuse_mounter`); None if
    it is none; `UNLISTED_FUSE` if `fd` (open on it) is on a FUSE filesystem that
    /proc/self/mountinfo does not list. Her daemon, answering root's lookup in her
    mount, can detach it first (`fusermount3 -u -z`): root's walk goes on through its
    fds, but no entry says whose it is, and it was taken for no FUSE mount at all (her
    symlink, said to be root's, was followed). f_type is the kernel's, not her daemon's;
    a statfs she fails leaves it unknown, as unlisted."""
    from .procfs import fuse_mounter

    found = fuse_mounter(dev)
    if found is None and fd >= 0:
        from .syscalls import fs_magic

        try:  # FUSE asks her daemon, which may fail it: then not known to be no FUSE
            magic = fs_magic(fd)
        except OSError:
            return UNLISTED_FUSE
        if magic == FUSE_SUPER_MAGIC:
            return UNLISTED_FUSE
    return found


def _owner(st: os.stat_result, mounters: Mounters | None = None, fd: int = -1) -> tuple[int, str]:
    """Who owns `st` as far as trusting it goes, and how to say it: its owner, but on a
    FUSE filesystem another user mounted, that user. Her daemon says who owns what: with
    `user_allow_other` in /etc/fuse.conf, root reaches her mount, and she says that root
    owns her symlink to a root-only file (root's `--env-file` read it into the
    container's environment). A user's FUSE mount has no device of its own (major 0;
    fusermount lets only root mount a block device's `fuseblk`): nothing is read for a
    disk's. `mounters` (with `fd`, which `st` is of): what the call read already."""
    if os.major(st.st_dev) == 0:
        from .userns import host_uid

        mounter = mounters.mounter(st, fd) if mounters else _read_mounter(st.st_dev, fd)
        if mounter == UNLISTED_FUSE:
            return mounter, "a FUSE mount not listed here (detached, or another namespace's)"
        if mounter is not None and mounter not in (0, os.geteuid(), host_uid()):
            return mounter, f"uid {mounter} (whose FUSE mount it is on)"
    return st.st_uid, f"uid {st.st_uid}"


def _out_of_reach(dir_fd: int, trusted: set[int], mounters: Mounters | None = None) -> bool:
    """Whether no untrusted user can reach the directory open at `dir_fd` by its path:
    it or a directory above it is a trusted user's and lets neither group nor others
    search it (the group bits are the ACL mask). Her symlink there is then as she left
    it when she could last reach it, which she never could if root made it there:
    containers/storage lays an ID-mapped container's layers out in root's 0700
    `mapped/`, with `l/` symlinks chowned to the container's root. Walked up by `..`
    from the fd (`MAX_LEVELS_UP` levels at most), so what is judged is what was resolved."""
    fd = os.open(b".", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=dir_fd)
    try:
        for _ in range(MAX_LEVELS_UP):
            st = os.fstat(fd)
            if _owner(st, mounters, fd)[0] in trusted and not st.st_mode & 0o011:
                return True
            up = os.open(b"..", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=fd)
            ust = os.fstat(up)
            os.close(fd)
            fd = up
            if (ust.st_dev, ust.st_ino) == (st.st_dev, st.st_ino):
                return False  # the root
        return False
    finally:
        os.close(fd)


def trusted_uids() -> set[int]:
    """Root and the caller; in a user namespace also the overflow ID (see `open_trusted`)."""
    from .userns import in_user_namespace, overflow_id

    me = os.geteuid()
    return {0, me, overflow_id()} if in_user_namespace() else {0, me}


def open_trusted(
    path: Name,
    flags: int = os.O_PATH | os.O_DIRECTORY,
    mkdir: int | None = None,
    dir_fd: int | None = None,
) -> int:
    """Open PATH as root may: following only root's and the caller's symlinks.

    Root acting on a path that crosses a directory another user can write (a
    mount point in her home) would otherwise follow whatever symlink she swaps
    in, to /etc say. This resolves PATH one component at a time (`O_PATH |
    O_NOFOLLOW`), follows a symlink only if root or the caller owns it (the
    rule of the kernel's protected_symlinks, made strict: `mount(8)` follows
    root's own, such as /var/run -> /run) and raises `UntrustedSymlink`
    (EACCES, as protected_symlinks) for any other; the caller then acts on
    the fd (`syscalls.fd_str`), so what was resolved and checked is what is
    used. `flags` (O_PATH by default) apply to the last component. With
    `mkdir=MODE` a missing component is made (a directory of that mode) in the
    directory already resolved, as `mkdir -p` would, but never through a symlink
    refused here. A relative PATH starts at `dir_fd` (default: the working directory).
    Another user's symlink in a directory she cannot reach (`_out_of_reach`: below a
    0700 directory of root's) is followed: she cannot have swapped it in.

    In a user namespace the symlinks of unmapped owners (the overflow ID:
    the host's root and users, who all look alike there) are followed too:
    the process has no right there that they lack. A mapped user's are not
    (a namespace that maps many IDs has users of its own).
    """
    if mkdir is None:  # the usual path crosses no symlink at all: one openat2 says so
        from . import syscalls

        try:
            return syscalls.openat2(
                syscalls.AT_FDCWD if dir_fd is None else dir_fd,
                path,
                flags,
                syscalls.RESOLVE_NO_SYMLINKS | syscalls.RESOLVE_NO_MAGICLINKS,
            )
        except OSError as e:
            if e.errno not in (errno.ELOOP, errno.ENOSYS, errno.EPERM):
                raise  # ELOOP: a symlink, to be judged below; ENOSYS, EPERM: no openat2
    p = os.fsencode(path)
    trusted = trusted_uids()
    todo = [c for c in reversed(p.split(b"/")) if c and c != b"."]
    if p.startswith(b"/"):
        fd = os.open(b"/", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    else:  # the working directory itself, as the fast path: its name may lead elsewhere
        fd = os.open(b".", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=dir_fd)
    links = 0
    mounters = Mounters()
    try:
        while todo:
            comp = todo.pop()
            try:
                nfd = os.open(comp, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
            except FileNotFoundError:
                if mkdir is None or comp == b"..":
                    raise
                try:  # noqa: SIM105 - no contextlib here (see the imports)
                    os.mkdir(comp, mkdir, dir_fd=fd)
                except FileExistsError:
                    pass  # made meanwhile: looked at as any other
                nfd = os.open(comp, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
            st = os.fstat(nfd)
            if not stat.S_ISLNK(st.st_mode):
                os.close(fd)
                fd = nfd
                continue
            try:
                links += 1
                if links > MAX_SYMLINKS:
                    raise OSError(errno.ELOOP, os.strerror(errno.ELOOP), path)
                owner, who = _owner(st, mounters, nfd)
                if owner not in trusted and not _out_of_reach(fd, trusted, mounters):
                    raise UntrustedSymlink(errno.EACCES, f"crosses a symlink owned by {who}", path)
                if _on_procfs(st):
                    # A magic link (/proc/self/fd/N: `-f <(...)`'s /dev/fd/N; /proc/self):
                    # its target names an object, not a path; the kernel goes there.
                    jumped = os.open(comp, os.O_PATH | os.O_CLOEXEC, dir_fd=fd)
                    os.close(fd)
                    fd = jumped
                    continue
                # The link that was checked, through its fd: by name, a rename could
                # put another one in its place meanwhile.
                target = os.readlink(b"", dir_fd=nfd)
            finally:
                os.close(nfd)
            todo.extend(c for c in reversed(target.split(b"/")) if c and c != b".")
            if target.startswith(b"/"):
                os.close(fd)
                fd = os.open(b"/", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        out = os.open(f"/proc/self/fd/{fd}", flags | os.O_CLOEXEC)  # the object, not a path
    finally:
        os.close(fd)
        mounters.close()
    return out


def open_named_output(path: str, flags: int = 0) -> int:
    """A file the caller named for pyunion to write (`$PYUNION_LOG`, `build --iidfile`),
    opened O_WRONLY | `flags` (made 0644 if missing, never truncated here): a regular
    file of root's or the caller's with no other name, or a character device (a
    terminal), reached through no symlink of another user's (`open_trusted`).

    Root names a path where a user can be first (/tmp/pyunion.log, her project's
    iid file): her symlink (to /etc/shadow) had root write there, her FIFO hung the
    open for good. The open never blocks (a FIFO without reader is ENXIO), and a FIFO
    or socket is refused: its reader, hers, could stop reading and stall every write.
    Her file there is refused too (the open does not create it, so the kernel's
    protected_regular does not apply): what root wrote was hers to read, and her hard
    link (where protected_hardlinks is off) had root write to /etc/shadow.
    """
    flags |= os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC
    full = os.path.abspath(path)
    try:
        fd = open_trusted(full, flags)
    except OSError as e:
        if e.errno == errno.ENXIO:
            raise OSError(e.errno, "is a FIFO or a socket, not a file", path) from None
        if e.errno != errno.ENOENT:
            raise
        parent, name = os.path.split(full)
        pfd = open_trusted(parent)
        try:
            fd = os.open(name, flags | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644, dir_fd=pfd)
        except FileExistsError:  # made meanwhile (another daemon's log too): as any other
            fd = open_trusted(full, flags)
        finally:
            os.close(pfd)
    st = os.fstat(fd)
    why = None
    if not (stat.S_ISREG(st.st_mode) or stat.S_ISCHR(st.st_mode)):
        why = errno.EINVAL, "is not a regular file or a terminal"
    elif stat.S_ISREG(st.st_mode) and st.st_uid not in trusted_uids():
        why = errno.EACCES, f"belongs to uid {st.st_uid}"
    elif stat.S_ISREG(st.st_mode) and st.st_nlink != 1:
        why = errno.EACCES, "has other names (hard links)"
    if why:
        os.close(fd)
        raise OSError(*why, path)
    os.set_blocking(fd, True)
    return fd


class SharedDirectory(OSError):
    """`open_private_dir` met a directory that another user can change."""


def _users_own_group(st: os.stat_result) -> bool:
    """Whether a directory of the caller's (not root's) has her user-private group: named
    as she is, with no other member and no one else's primary group. Under umask 002
    (Fedora's shells, for such groups) every directory she makes is group-writable: her
    ~/.local, her ~/tmp; that bit lets no one else in. IDs are the host's (a rootless
    user namespace shows her as 0)."""
    import grp
    import pwd

    from .userns import to_host

    uid, gid = to_host(st.st_uid), to_host(st.st_gid, "gid")
    if st.st_uid != os.geteuid() or uid in (None, 0) or gid is None:
        return False
    try:
        user, group = pwd.getpwuid(uid), grp.getgrgid(gid)
    except KeyError:
        return False
    if group.gr_name != user.pw_name or set(group.gr_mem) - {user.pw_name}:
        return False
    return all(p.pw_gid != gid or p.pw_uid == uid for p in pwd.getpwall())


def _others_can_change(
    st: os.stat_result, trusted: set[int], mounters: Mounters | None = None, fd: int = -1
) -> str | None:
    """Why a user other than root and the caller can change the object `st` (its owner,
    its write bits), or None: not when only a sticky directory's (/tmp: she cannot move
    another's entry) or her user-private group's (`_users_own_group`) allow it.
    `mounters`, `fd`: as `_owner`'s."""
    owner, who = _owner(st, mounters, fd)
    if owner not in trusted:
        return f"owned by {who}"
    shared = st.st_mode & 0o022 and not (stat.S_ISDIR(st.st_mode) and st.st_mode & stat.S_ISVTX)
    if shared and not st.st_mode & 0o002 and _users_own_group(st):
        shared = False  # her group is she alone (umask 002): no one else writes
    return "which others can write" if shared else None


def open_private_file(dirfd: int, name: Name) -> int:
    """NAME in `dirfd` (from `open_private_dir`) opened for reading: a regular file
    (`open_regular`: no FIFO to hang on, no symlink of another user's) that no other user
    can change, as what root trusts (a CA, a client key) must be. Raises `SharedDirectory`
    (EACCES) for one she owns or can write."""
    fd = open_regular(dirfd, name, resolve="trusted")
    try:
        why = _others_can_change(os.fstat(fd), trusted_uids(), None, fd)
        if why is not None:
            raise SharedDirectory(errno.EACCES, f"is {why}", name)
    except BaseException:
        os.close(fd)
        raise
    return fd


def open_private_dir(path: Name) -> int:
    """`open_trusted(path)`, and only if no other user can change what PATH names.

    Root keeping a tree of its own by name (`pyunion run`'s temporary directory)
    under a directory another user can write, without the sticky bit (`su` keeps
    her TMPDIR), finds her tree under its names: she renames root's away and puts
    hers, with her symlinks, in its place; no `O_NOFOLLOW` on the last component
    helps. So every directory from `/` down to PATH (as resolved) must be root's or
    the caller's and writable by no one else (her group-writable directories are
    fine when the group is hers alone: `_users_own_group`), unless sticky (/tmp:
    there she cannot move another's entry); else `SharedDirectory` (EACCES) names
    the first one that is not. Returns PATH's O_PATH fd.
    """
    fd = open_trusted(path)
    mounters = Mounters()
    try:
        trusted = trusted_uids()
        real = os.readlink(f"/proc/self/fd/{fd}")
        dfd = os.open("/", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            where = ""
            for comp in [""] + [c for c in real.split("/") if c]:
                if comp:
                    nfd = os.open(comp, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=dfd)
                    os.close(dfd)
                    dfd = nfd
                    where += "/" + comp
                why = _others_can_change(os.fstat(dfd), trusted, mounters, dfd)
                if why is not None:
                    raise SharedDirectory(errno.EACCES, f"crosses {where or '/'}, {why}", path)
            if _ident(os.fstat(dfd)) != _ident(os.fstat(fd)):
                raise OSError(errno.ESTALE, "moved while it was checked", path)
        finally:
            os.close(dfd)
            mounters.close()
    except BaseException:
        os.close(fd)
        raise
    return fd


def reachable_by_others(path: str) -> str | None:
    """Whether users other than root and the caller can reach resolved directory PATH:
    the directory above it they can all pass (the last on the way that every one can
    search), or None when one on the way lets none of them in.

    A directory stops them when others may not search it and its group may not either,
    or may only as root's group or the caller's user-private one (`_users_own_group`).
    An ACL that lets a named user in without the group bits saying so is not seen."""
    dfd = os.open("/", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        where = "/"
        comps = [c for c in path.split("/") if c][:-1]
        for i in range(len(comps) + 1):
            st = os.fstat(dfd)
            mode = st.st_mode
            if not mode & 0o001 and (not mode & 0o010 or st.st_gid == 0 or _users_own_group(st)):
                return None
            if i == len(comps):
                break
            nfd = os.open(comps[i], os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=dfd)
            os.close(dfd)
            dfd = nfd
            where = "/" + "/".join(comps[: i + 1])
        return where
    finally:
        os.close(dfd)


def private_dir(path: Name) -> str:
    """The directory `open_private_dir` checked, as resolved: the path to use by name.

    PATH itself may cross a symlink of root's (or the caller's) that lies in a
    directory another user can change (root's `/home/u/data -> /srv/data`): she
    renames it away and puts her own in its place, and PATH names her tree again.
    The resolved path crosses no symlink, and only directories she cannot change.
    """
    fd = open_private_dir(path)
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    finally:
        os.close(fd)


def _anonymous_pipe(st: os.stat_result) -> bool:
    """Whether `st` is a pipe with no name (pipe(2)'s: on the kernel's pipefs, not a FIFO
    on a filesystem)."""
    if not stat.S_ISFIFO(st.st_mode):
        return False
    r, w = os.pipe()
    try:
        return os.fstat(r).st_dev == st.st_dev
    finally:
        os.close(r)
        os.close(w)


def read_named(path: Name, limit: int) -> bytes:
    """A file the caller named (`build -f`, `run --env-file`), at most `limit` bytes.

    Reached through no symlink of another user's (`open_trusted`; `<(...)`'s
    /dev/fd/N is root's or the caller's, a magic link the kernel follows), and a
    regular file, or a FIFO or character device of root's or the caller's (that
    pipe, /dev/stdin's terminal; /dev/zero is bounded by `limit`): in a user's
    project, her symlink to /etc/shadow was read (into an error, or the
    container's environment), and her FIFO hung the command for good. A pipe
    with no name (`... | sudo pyunion run --env-file /dev/stdin`: her shell made
    it, it is hers) is fine whoever made it: only a process's fd reaches it, and
    the only ones followed are root's and the caller's, which were handed it.
    """
    pfd = open_trusted(path, os.O_PATH)
    try:
        st = os.fstat(pfd)
        special = stat.S_ISFIFO(st.st_mode) or stat.S_ISCHR(st.st_mode)
        ok = stat.S_ISREG(st.st_mode) or _anonymous_pipe(st)
        if not (ok or (special and st.st_uid in trusted_uids())):
            why = "is not a regular file, or a pipe or device of this user's"
            raise NotRegularFile(errno.EINVAL, why)
        fd = os.open(f"/proc/self/fd/{pfd}", os.O_RDONLY | os.O_CLOEXEC)
    finally:
        os.close(pfd)
    try:
        return _read_at_most(fd, limit)
    finally:
        os.close(fd)
