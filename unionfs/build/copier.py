"""Writing COPY and ADD sources into a container's root, confined to that root.

The destination is resolved with openat2(RESOLVE_IN_ROOT) on the container's
merged tree, so a symlink in the image (`/app -> /opt/app`, or an absolute link
to `/etc`) is followed the way the container sees it and never leads to the
host. Everything below the destination is created with *at calls relative to
its parent's fd and O_NOFOLLOW: an existing symlink where a copied directory
or file goes is replaced, never written through.

Ownership: `--chown` wins; otherwise files from the context belong to root and
files from another stage or image keep their owners (what buildah and Docker
do). `--chmod` sets the mode of every copied file and directory. Times are
kept. Hard links inside one copy stay linked. ADD unpacks a local tar archive
(plain, gzip, bzip2, xz or zstd) into the destination with the archive's owners,
modes and times, whatever `--chown` and `--chmod` say (they apply to the
destination directory only, as buildah and Docker's classic builder do); anything
else it copies like COPY.
"""

from __future__ import annotations

import contextlib
import errno
import io
import lzma
import os
import posixpath
import stat
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO, Any

import zstandard

from .. import compression, sparse, syscalls
from ..digits import number
from ..errors import UserError
from ..sandbox import SetupError, read_user_db
from ..tarsafe import open_tar
from ..tree import DirCursor
from .sources import Entry, Source, SourceTree

DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_SKIP_XATTR_PREFIXES = ("trusted.", "security.selinux")
# What the holes of an ADD archive's sparse members may add to the layer, all members
# together: the disk holds only their data, but the layer's tar (and its digest, and
# every pull of it) holds their whole apparent size.
MAX_HOLES = 1 << 30


class CopyError(UserError):
    """A COPY or ADD that cannot be done (bad destination, unreadable source)."""


# What reading a hostile archive can raise (tarfile's ValueError: a pax sparse map with
# empty fields, say).
ARCHIVE_ERRORS = (
    tarfile.TarError,
    EOFError,
    ValueError,
    lzma.LZMAError,
    zstandard.ZstdError,
    OSError,
)


@dataclass
class Owner:
    uid: int
    gid: int


@dataclass
class CopySpec:
    """How the entries are to be written."""

    chown: Owner | None = None
    chmod: int | None = None
    keep_owner: bool = False  # --from: keep the source's owners


# --- users and groups of the container ------------------------------------------------
def _read_db(rootfd: int, path: str, spec: str) -> list[list[str]]:
    """The image's passwd or group file, read by the one rule `pyunion run` uses."""
    try:
        return read_user_db(rootfd, path)
    except SetupError as e:
        raise CopyError(f"--chown={spec}: {e}") from None


def resolve_owner(rootfd: int, spec: str) -> Owner:
    """[USER][:GROUP] (names or ids) from the container's /etc/passwd and /etc/group;
    no user is root (`--chown=:GROUP`), as buildah takes it."""
    user, _, group = spec.partition(":")
    if not user and group:
        user = "0"
    if not user:
        raise CopyError(f"--chown={spec}: no user given")
    passwd = [e for e in _read_db(rootfd, "/etc/passwd", spec) if len(e) >= 4]
    given = number(user)
    if given is not None:
        uid = given
        entry = next((e for e in passwd if number(e[2]) == uid), None)
        found = number(entry[3]) if entry is not None else None
        gid = uid if found is None else found
    else:
        entry = next((e for e in passwd if e[0] == user), None)
        found = number(entry[2]) if entry is not None else None
        if entry is None or found is None:
            raise CopyError(f"--chown={spec}: no user {user!r} in the image's /etc/passwd")
        uid = found
        found = number(entry[3])
        gid = uid if found is None else found
    if group:
        given = number(group)
        if given is not None:
            gid = given
        else:
            g = next(
                (e for e in _read_db(rootfd, "/etc/group", spec) if len(e) >= 3 and e[0] == group),
                None,
            )
            found = number(g[2]) if g is not None else None
            if found is None:
                raise CopyError(f"--chown={spec}: no group {group!r} in the image's /etc/group")
            gid = found
    for kind, n in (("user", uid), ("group", gid)):
        if n >= 2**32 - 1:  # (uid_t)-1 means "unchanged" to chown(2)
            raise CopyError(f"--chown={spec}: {kind} id {n} is out of range")
    return Owner(uid, gid)


def parse_chmod(text: str) -> int:
    # ASCII octal digits only: int(text, 8) also took "+755", "0o755", "7_55" and other
    # scripts' digits.
    if not text or text.strip("01234567"):
        raise CopyError(f"--chmod={text}: expected an octal mode such as 0755")
    mode = int(text, 8)
    if not 0 <= mode <= 0o7777:
        raise CopyError(f"--chmod={text}: out of range")
    return mode


# --- the destination --------------------------------------------------------------------
class Root:
    """A container's root directory (the merged mount), for writing into it."""

    def __init__(self, path: str) -> None:
        self.fd = os.open(path, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def lookup(self, path: str) -> os.stat_result | None:
        """stat of PATH as the container sees it (symlinks followed inside), or None."""
        try:
            fd = syscalls.open_in_root(self.fd, path)
        except OSError:
            return None
        try:
            return os.stat(fd)
        finally:
            os.close(fd)

    def ensure_dir(self, path: str, owner: Owner | None = None) -> int:
        """An open fd of directory PATH, creating what is missing (mode 0755, root's
        or `owner`'s); every existing component is resolved inside the root."""
        parts = [p for p in path.split("/") if p and p != "."]
        try:
            return syscalls.open_in_root(self.fd, "/".join(parts), DIR_FLAGS & ~os.O_NOFOLLOW)
        except OSError as e:
            if e.errno not in (errno.ENOENT, errno.ENOTDIR):
                raise CopyError(f"cannot open {path!r} in the container: {e.strerror}") from None
        fd = syscalls.open_in_root(self.fd, ".", DIR_FLAGS & ~os.O_NOFOLLOW)
        try:
            for i, comp in enumerate(parts):
                if comp == "..":
                    nfd = syscalls.open_in_root(
                        self.fd, "/".join(parts[: i + 1]), DIR_FLAGS & ~os.O_NOFOLLOW
                    )
                else:
                    nfd = self._child_dir(fd, comp, "/" + "/".join(parts[: i + 1]), owner)
                os.close(fd)
                fd = nfd
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _child_dir(self, pfd: int, name: str, where: str, owner: Owner | None) -> int:
        try:
            st = os.stat(name, dir_fd=pfd, follow_symlinks=False)
        except FileNotFoundError:
            st = None
        if st is not None and stat.S_ISLNK(st.st_mode):
            # Followed, but inside the root: resolve the whole path from the root again.
            try:
                return syscalls.open_in_root(self.fd, where, DIR_FLAGS & ~os.O_NOFOLLOW)
            except OSError as e:
                raise CopyError(
                    f"{where!r} in the container is a symlink to something that is "
                    f"not a directory ({e.strerror})"
                ) from None
        if st is not None and not stat.S_ISDIR(st.st_mode):
            raise CopyError(f"{where!r} exists in the container and is not a directory")
        if st is None:
            os.mkdir(name, 0o755, dir_fd=pfd)
            os.chmod(name, 0o755, dir_fd=pfd, follow_symlinks=False)
            if owner is not None:
                os.chown(name, owner.uid, owner.gid, dir_fd=pfd, follow_symlinks=False)
        return os.open(name, DIR_FLAGS, dir_fd=pfd)


# --- writing entries -------------------------------------------------------------------
def _copy_xattrs(src: int | str, dst: int | str, follow: bool) -> None:
    try:
        names = os.listxattr(src, follow_symlinks=follow)
    except OSError:
        return
    for n in names:
        if n.startswith(_SKIP_XATTR_PREFIXES):
            continue
        with contextlib.suppress(OSError):
            os.setxattr(dst, n, os.getxattr(src, n, follow_symlinks=follow), follow_symlinks=follow)


def _clear(pfd: int, name: str, want_dir: bool, where: str) -> bool:
    """Make room for NAME; True when an existing directory is to be merged into."""
    try:
        st = os.stat(name, dir_fd=pfd, follow_symlinks=False)
    except FileNotFoundError:
        return False
    if stat.S_ISDIR(st.st_mode):
        if want_dir:
            return True
        raise CopyError(f"cannot replace directory {where!r} with a non-directory")
    os.unlink(name, dir_fd=pfd)
    return False


class Writer:
    """Writes entries below one destination directory, `base` (borrowed, kept open by
    the caller). It holds no fd of its own between calls: directories are reached
    again from `base` by their path (a `DirCursor`), so a copy of any number of
    directories, at any depth, needs a few fds."""

    def __init__(self, spec: CopySpec, where: str, base: int) -> None:
        self.spec = spec
        self.where = where
        self.base = base
        self.links: dict[tuple[int, int], list[str]] = {}  # (dev, ino) -> path below base
        self.dir_times: dict[tuple[str, ...], tuple[int, int]] = {}  # path -> (atime, mtime)

    def close(self) -> None:
        """Give the directories their times, now that nothing more is made in them."""
        if self.dir_times:
            cur = DirCursor(self.base)
            try:
                for parts in sorted(self.dir_times):
                    at, mt = self.dir_times[parts]
                    with contextlib.suppress(OSError):
                        pfd = cur.goto(list(parts[:-1]))
                        os.utime(parts[-1], ns=(at, mt), dir_fd=pfd, follow_symlinks=False)
            finally:
                cur.close()
        self.links.clear()
        self.dir_times.clear()

    def _owner(self, uid: int, gid: int) -> tuple[int, int]:
        if self.spec.chown is not None:
            return self.spec.chown.uid, self.spec.chown.gid
        if self.spec.keep_owner:
            return uid, gid
        return 0, 0

    def _mode(self, mode: int) -> int:
        return self.spec.chmod if self.spec.chmod is not None else stat.S_IMODE(mode)

    def _meta(self, pfd: int, name: str, uid: int, gid: int, mode: int) -> None:
        o = self._owner(uid, gid)
        os.chown(name, o[0], o[1], dir_fd=pfd, follow_symlinks=False)
        os.chmod(name, self._mode(mode), dir_fd=pfd, follow_symlinks=False)

    def metadata(
        self, pfd: int, name: str, uid: int, gid: int, mode: int, atime: int, mtime: int
    ) -> None:
        """Owner, mode and times of NAME, which exists already (a symlink has no mode)."""
        if stat.S_ISLNK(os.stat(name, dir_fd=pfd, follow_symlinks=False).st_mode):
            o = self._owner(uid, gid)
            os.chown(name, o[0], o[1], dir_fd=pfd, follow_symlinks=False)
        else:
            self._meta(pfd, name, uid, gid, mode)
        os.utime(name, ns=(atime, mtime), dir_fd=pfd, follow_symlinks=False)

    def directory(
        self,
        pfd: int,
        name: str,
        rel: list[str],
        uid: int,
        gid: int,
        mode: int,
        atime: int,
        mtime: int,
        where: str,
        xattr_src: int | str | None = None,
    ) -> None:
        """Create (or merge into) directory NAME, which is `rel` below the base; its times
        are set at `close`."""
        if not _clear(pfd, name, True, where):
            os.mkdir(name, 0o700, dir_fd=pfd)
        self._meta(pfd, name, uid, gid, mode)
        if xattr_src is not None:
            fd = os.open(name, DIR_FLAGS, dir_fd=pfd)
            try:
                _copy_xattrs(xattr_src, syscalls.fd_str(fd), True)
            finally:
                os.close(fd)
        self.dir_times[tuple(rel)] = (atime, mtime)

    def file(
        self,
        pfd: int,
        name: str,
        src: IO[bytes] | int,
        size: int | None,
        uid: int,
        gid: int,
        mode: int,
        atime: int,
        mtime: int,
        where: str,
        regions: list[tuple[int, int]] | None = None,
    ) -> None:
        """A regular file from `src` (an fd: `size` bytes at most; a stream: all of it,
        or only its (offset, length) `regions` of a sparse member, the holes left as holes)."""
        _clear(pfd, name, False, where)
        fd = os.open(
            name,
            os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
            0o600,
            dir_fd=pfd,
        )
        try:
            if isinstance(src, int):
                _sendfile(src, fd, size)
                _copy_xattrs(syscalls.fd_str(src), syscalls.fd_str(fd), True)
            elif regions is not None and size is not None:
                sparse.write_regions(src, fd, regions, size)
            else:
                while chunk := src.read(1 << 20):
                    _write_all(fd, chunk)
            o = self._owner(uid, gid)
            os.fchown(fd, o[0], o[1])
            os.fchmod(fd, self._mode(mode))
            os.utime(fd, ns=(atime, mtime))
        finally:
            os.close(fd)

    def hardlink(self, key: tuple[int, int] | None, pfd: int, name: str, where: str) -> bool:
        """Link NAME to the file already written for `key`; False if there is none yet."""
        if key is None or key not in self.links:
            return False
        if not _link_below(self.base, self.links[key], pfd, name, where):
            raise FileNotFoundError(errno.ENOENT, "the first copy of the link is gone")
        return True

    def remember_link(self, key: tuple[int, int], rel: list[str]) -> None:
        """The file written for `key` is `rel` below the base."""
        self.links.setdefault(key, rel)

    def symlink(
        self,
        pfd: int,
        name: str,
        target: str,
        uid: int,
        gid: int,
        atime: int,
        mtime: int,
        where: str,
    ) -> None:
        _clear(pfd, name, False, where)
        os.symlink(target, name, dir_fd=pfd)
        o = self._owner(uid, gid)
        os.chown(name, o[0], o[1], dir_fd=pfd, follow_symlinks=False)
        os.utime(name, ns=(atime, mtime), dir_fd=pfd, follow_symlinks=False)

    def special(
        self,
        pfd: int,
        name: str,
        st_mode: int,
        rdev: int,
        uid: int,
        gid: int,
        atime: int,
        mtime: int,
        where: str,
    ) -> None:
        _clear(pfd, name, False, where)
        if stat.S_ISFIFO(st_mode):
            os.mkfifo(name, 0o600, dir_fd=pfd)
        else:
            os.mknod(name, stat.S_IFMT(st_mode) | 0o600, rdev, dir_fd=pfd)
        self._meta(pfd, name, uid, gid, st_mode)
        os.utime(name, ns=(atime, mtime), dir_fd=pfd, follow_symlinks=False)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _sendfile(src: int, dst: int, size: int | None) -> None:
    """Copy `src` to `dst`: `size` bytes at most (the size walked: a file that grows
    meanwhile, or is endless, cannot fill the layer)."""
    offset = 0
    end = (1 << 63) - 1 if size is None else size
    while offset < end:
        try:
            n = os.sendfile(dst, src, offset, min(1 << 24, end - offset))
        except OSError as e:
            if e.errno not in (errno.EINVAL, errno.ENOSYS):
                raise
            while offset < end and (chunk := os.pread(src, min(1 << 20, end - offset), offset)):
                _write_all(dst, chunk)
                offset += len(chunk)
            return
        if n == 0:
            return
        offset += n


# --- COPY -------------------------------------------------------------------------------
def copy_sources(
    root: Root,
    tree: SourceTree,
    sources: list[Source],
    dest: str,
    spec: CopySpec,
    dest_is_dir: bool,
) -> None:
    """Copy every source to `dest` (an absolute path in the container)."""
    for src in sources:
        if src.is_dir:
            dfd = root.ensure_dir(dest, spec.chown)
            try:
                _copy_tree(dfd, tree, src, spec, dest)
            finally:
                os.close(dfd)
            continue
        if dest_is_dir:
            parent, name = dest, posixpath.basename(src.name.rstrip("/")) or "root"
        else:
            parent, name = posixpath.split(dest.rstrip("/"))
        pfd = root.ensure_dir(parent or "/", spec.chown)
        w = Writer(spec, dest, pfd)
        try:
            _copy_entry(w, pfd, name, [name], tree, src.entries[0], posixpath.join(parent, name))
        finally:
            w.close()
            os.close(pfd)


def _copy_entry(
    w: Writer, pfd: int, name: str, rel: list[str], tree: SourceTree, e: Entry, where: str
) -> None:
    st = e.st
    at, mt = st.st_atime_ns, st.st_mtime_ns
    key = (st.st_dev, st.st_ino) if st.st_nlink > 1 and not stat.S_ISDIR(st.st_mode) else None
    try:
        if w.hardlink(key, pfd, name, where):
            return
        if stat.S_ISREG(st.st_mode):
            fd = tree.open_file(e)
            try:
                w.file(pfd, name, fd, st.st_size, st.st_uid, st.st_gid, st.st_mode, at, mt, where)
            finally:
                os.close(fd)
        elif stat.S_ISLNK(st.st_mode):
            w.symlink(pfd, name, e.target or "", st.st_uid, st.st_gid, at, mt, where)
        elif stat.S_ISFIFO(st.st_mode) or stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
            w.special(pfd, name, st.st_mode, st.st_rdev, st.st_uid, st.st_gid, at, mt, where)
        else:
            return  # a socket: nothing to copy
        if key is not None:
            w.remember_link(key, rel)
    except CopyError:
        raise
    except OSError as e2:
        raise CopyError(f"cannot copy {e.path or '.'!r} to {where!r}: {e2.strerror}") from None


def _copy_tree(dfd: int, tree: SourceTree, src: Source, spec: CopySpec, dest: str) -> None:
    """The contents of a source directory into the open directory `dfd`."""
    w = Writer(spec, dest, dfd)
    cur = DirCursor(dfd)
    try:
        for e in src.entries[1:]:
            rel = e.rel.split("/")
            where = posixpath.join(dest, e.rel)
            try:
                pfd = cur.goto(rel[:-1])
                if stat.S_ISDIR(e.st.st_mode):
                    src_fd = tree.open(e.path, DIR_FLAGS)
                    try:
                        w.directory(
                            pfd,
                            rel[-1],
                            rel,
                            e.st.st_uid,
                            e.st.st_gid,
                            e.st.st_mode,
                            e.st.st_atime_ns,
                            e.st.st_mtime_ns,
                            where,
                            syscalls.fd_str(src_fd),
                        )
                    finally:
                        os.close(src_fd)
                else:
                    _copy_entry(w, pfd, rel[-1], rel, tree, e, where)
            except CopyError:
                raise
            except OSError as err:
                raise CopyError(f"cannot copy {e.path!r} to {where!r}: {err.strerror}") from None
    finally:
        cur.close()
        w.close()


# --- ADD of a local archive ------------------------------------------------------------------
@dataclass
class Archive:
    """An open tar archive, and how much a member's data can be: a plain tar holds no
    member larger than itself (None: compressed, whatever the stream gives)."""

    tar: tarfile.TarFile
    max_member: int | None


@contextlib.contextmanager
def open_archive(fd: int) -> Iterator[Archive | None]:
    """The tar archive in the file `fd` (plain or compressed), or None if it is not one."""
    kind = compression.kind_of(os.pread(fd, compression.HEAD, 0))
    with contextlib.ExitStack() as stack:
        raw = stack.enter_context(os.fdopen(os.dup(fd), "rb"))
        stream: Any = raw
        if kind != compression.NONE:
            stream = stack.enter_context(compression.reader(kind, raw))
        try:
            first = compression.read_head(stream, 512)
        except compression.ERRORS:
            first = b""
        if not compression.is_tar_header(first):
            yield None
            return
        prefixed = io.BufferedReader(compression.Prefixed(first, stream), 1 << 16)
        try:
            tf = open_tar(fileobj=prefixed, mode="r|")
        except ARCHIVE_ERRORS as e:  # tarfile reads the first header here
            raise CopyError(f"corrupt or truncated archive ({e})") from None
        with tf:
            yield Archive(tf, os.fstat(fd).st_size if kind == compression.NONE else None)


def extract_archive(root: Root, archive: Archive, dest: str, spec: CopySpec, what: str) -> None:
    """Unpack an archive into `dest`, confined to it; owners and modes from the archive.

    Members come in any order: each is reached from `dest` by its path, one
    O_NOFOLLOW component at a time (a `DirCursor`: a few fds at any depth). A sparse
    member is written sparse, and its holes count against `MAX_HOLES`.
    """
    dfd = root.ensure_dir(dest, spec.chown)
    w = Writer(CopySpec(keep_owner=True), dest, dfd)
    cur = DirCursor(dfd)
    holes = 0
    dest_time: int | None = None  # the `./` member's, set once the members are in
    try:
        for m in archive.tar:
            parts = [p for p in m.name.split("/") if p not in ("", ".")]
            for id_kind, n in (("owner", m.uid), ("group", m.gid)):
                if not 0 <= n < 2**32 - 1:  # GNU base-256 headers hold any number
                    raise CopyError(
                        f"ADD {what}: refusing {m.name!r}: {id_kind} id {n} is out of range"
                    )
            if not parts:
                # `./` (`tar -C dir -cf x.tar .`) is the destination itself: its owner,
                # mode and time, as buildah and Docker's classic builder give them.
                if m.isdir():
                    try:
                        os.chown(dfd, m.uid, m.gid)
                        os.chmod(dfd, stat.S_IMODE(m.mode))
                    except OSError as e:  # an ID unmapped in her namespace: not "corrupt"
                        raise CopyError(
                            f"ADD {what}: cannot unpack {m.name!r}: {e.strerror}"
                        ) from None
                    dest_time = int(m.mtime * 1_000_000_000)
                continue
            if ".." in parts:
                raise CopyError(f"ADD {what}: refusing archive member {m.name!r} ('..')")
            if parts[-1].startswith(".wh."):
                raise CopyError(
                    f"ADD {what}: refusing archive member {m.name!r} (a whiteout marker)"
                )
            name = parts[-1]
            where = posixpath.join(dest, "/".join(parts))
            mt = int(m.mtime * 1_000_000_000)
            try:
                pfd = _archive_parent(cur, parts[:-1])
                if m.isdir():
                    w.directory(pfd, name, parts, m.uid, m.gid, m.mode, mt, mt, where)
                elif m.isreg():
                    try:
                        regions = sparse.data_regions(m)
                    except sparse.SparseError as e:
                        raise CopyError(f"ADD {what}: refusing {m.name!r}: {e}") from None
                    data = sparse.stored_size(m, regions)
                    if archive.max_member is not None and data > archive.max_member:
                        raise CopyError(
                            f"ADD {what}: refusing {m.name!r}: its header declares {data} "
                            "bytes, more than the archive holds"
                        )
                    holes += m.size - data
                    if holes > MAX_HOLES:
                        raise CopyError(
                            f"ADD {what}: refusing {m.name!r}: a sparse file of {m.size} "
                            f"bytes; the holes of the archive's sparse files come to more "
                            f"than {MAX_HOLES >> 30} GiB"
                        )
                    f: IO[bytes] | None
                    if regions is not None:
                        try:
                            f = sparse.open_data(archive.tar, m, regions)
                        except sparse.SparseError as e:
                            raise CopyError(f"ADD {what}: refusing {m.name!r}: {e}") from None
                    else:
                        f = archive.tar.extractfile(m)
                    if f is None:
                        continue
                    w.file(pfd, name, f, m.size, m.uid, m.gid, m.mode, mt, mt, where, regions)
                elif m.issym():
                    w.symlink(pfd, name, m.linkname, m.uid, m.gid, mt, mt, where)
                elif m.islnk():
                    # The link's header sets the (shared) inode's owner, mode and time,
                    # as buildah and Docker unpack it.
                    _archive_link(dfd, pfd, name, m.linkname, where, what)
                    w.metadata(pfd, name, m.uid, m.gid, m.mode, mt, mt)
                elif m.ischr() or m.isblk() or m.isfifo():
                    kind = (
                        stat.S_IFCHR if m.ischr() else stat.S_IFBLK if m.isblk() else stat.S_IFIFO
                    )
                    w.special(
                        pfd,
                        name,
                        kind | m.mode,
                        os.makedev(m.devmajor, m.devminor),
                        m.uid,
                        m.gid,
                        mt,
                        mt,
                        where,
                    )
            except CopyError:
                raise
            except OSError as e:
                raise CopyError(f"ADD {what}: cannot unpack {m.name!r}: {e.strerror}") from None
    except ARCHIVE_ERRORS as e:
        raise CopyError(f"ADD {what}: corrupt or truncated archive ({e})") from None
    finally:
        cur.close()
        w.close()
        if dest_time is not None:
            with contextlib.suppress(OSError):
                os.utime(dfd, ns=(dest_time, dest_time))
        os.close(dfd)


def _archive_parent(cur: DirCursor, parts: list[str]) -> int:
    """The fd of an archive member's parent directory `parts` (below the destination),
    made where the archive skipped it (0755, root's); a non-directory in
    the way, a symlink included, is replaced, never followed."""
    while True:
        try:
            return cur.goto(parts)
        except OSError as e:
            if e.errno not in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP):
                raise
        pfd, name = cur.fd, parts[len(cur.parts)]
        with contextlib.suppress(FileNotFoundError):
            os.unlink(name, dir_fd=pfd)
        os.mkdir(name, 0o755, dir_fd=pfd)
        os.chmod(name, 0o755, dir_fd=pfd, follow_symlinks=False)


def _archive_link(dfd: int, pfd: int, name: str, target: str, where: str, what: str) -> None:
    tparts = [p for p in target.split("/") if p not in ("", ".")]
    if not tparts or ".." in tparts:
        raise CopyError(f"ADD {what}: refusing hard link {where!r} to {target!r}")
    if not _link_below(dfd, tparts, pfd, name, where):
        raise CopyError(
            f"ADD {what}: hard link {where!r} to {target!r}, which is not in the archive"
        )


def _link_below(base: int, target: list[str], pfd: int, name: str, where: str) -> bool:
    """Hard-link NAME in `pfd` (replacing what is there) to the file `target` below `base`;
    False if `target`'s directory cannot be reached (no symlink, no way out on the path)."""
    try:
        tfd = syscalls.openat2(
            base,
            "/".join(target[:-1]) or ".",
            DIR_FLAGS,
            syscalls.RESOLVE_BENEATH | syscalls.RESOLVE_NO_SYMLINKS,
        )
    except OSError:
        return False
    try:
        _clear(pfd, name, False, where)
        os.link(target[-1], name, src_dir_fd=tfd, dst_dir_fd=pfd, follow_symlinks=False)
    finally:
        os.close(tfd)
    return True
