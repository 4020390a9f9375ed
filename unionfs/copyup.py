"""Copy-up: bring a lower object into the upper before its first change.

Parents first, each with mode, owner, times and xattrs. The object is built
under a temporary name in the work dir (`WORKDIR/work`, the kernel's own
scratch directory, emptied at every mount) and renamed into place, so a crash
never leaves a half-copied file in the upper. Data goes through
copy_file_range hole by hole (sparse files stay sparse); a copy-up that
truncates to zero copies no data.

A copy-up is split in three so that the FUSE adaptor can run the data copy, the
only slow part, in a worker thread: `begin` (metadata, on the event loop),
`CopyJob.copy_data` (pure I/O on two fds, thread-safe), `CopyJob.finish` (rename
into place and update the node, on the event loop). Which copy-ups an
operation needs is the core's decision (`Union.copyups_*`); `CopyJob.run` does
all three on the calling thread.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import os
import stat
from collections.abc import Callable, Iterable

from .errors import FsError
from .inodes import UNLINKED, AnyStat, DirNode, InodeTable, Node
from .layers import LayerStack, open_file_at, open_lower_file
from .resolve import Resolver
from .syscalls import chmod_nofollow, fdpath
from .tree import DIR_FLAGS, rmtree_at
from .whiteout import shown_xattr

SEEK_DATA = getattr(os, "SEEK_DATA", 3)
SEEK_HOLE = getattr(os, "SEEK_HOLE", 4)
_CHUNK = 1 << 30


def copy_xattrs(src: int | bytes, dst: int | bytes) -> None:
    """Copy every xattr but overlay's markers from `src` to `dst` (fds, or paths never
    followed); escaped ones (whiteout.stored_xattr) are the object's own and go along."""
    sf = isinstance(src, int)
    df = isinstance(dst, int)
    try:
        names = os.listxattr(src, follow_symlinks=sf)
    except OSError:
        return
    for name in names:
        if shown_xattr(name.encode()) is None:
            continue
        try:
            value = os.getxattr(src, name, follow_symlinks=sf)
            os.setxattr(dst, name, value, follow_symlinks=df)
        except OSError as e:
            if e.errno not in (errno.EOPNOTSUPP, errno.EPERM, errno.ENODATA, errno.EACCES):
                raise


def chown_failed(e: OSError, optional: bool) -> None:
    """After a chown raised `e`: re-raise it unless owners are `optional` and it was refused.

    Owners are optional when the mount shows owners of its own (fuse-overlayfs'
    squash options): an unprivileged daemon cannot give a copied-up or new
    file another owner (EPERM, or EINVAL for an ID its namespace lacks), and
    fuse-overlayfs carries on with the daemon's own.
    """
    if not optional or e.errno not in (errno.EPERM, errno.EINVAL):
        raise e


def copy_file_data(src: int, dst: int, size: int, allocated: int = 0) -> int:
    """Copy `size` bytes, skipping holes; the end of the last byte written, which is the
    copy's size (a trailing hole, or a source that shrank, leaves it short: the caller's
    ftruncate sets the final size then).

    A file with `allocated` bytes (st_blocks * 512) as many as its size has no room for a
    hole, unless blocks of its xattrs or preallocated past its end are counted: it is
    copied whole without looking for holes (two lseeks less for most files, which are
    small), such a rare hole as the zeros it reads as."""
    if size and allocated >= size:
        return _copy_region(src, dst, 0, size)
    off = 0
    end = 0
    while off < size:
        try:
            data = os.lseek(src, off, SEEK_DATA)
        except OSError as e:
            if e.errno == errno.ENXIO:  # only a hole remains
                break
            data = off
        try:
            hole = os.lseek(src, data, SEEK_HOLE)
        except OSError:
            hole = size
        hole = min(hole, size)
        pos = _copy_region(src, dst, data, hole)
        if pos > data:
            end = pos
        off = max(hole, pos)
        if pos < hole:  # the source shrank under us
            break
    return end


def _copy_region(src: int, dst: int, pos: int, end: int) -> int:
    """Copy bytes `pos` to `end`; where it stopped (before `end`: the source shrank)."""
    while pos < end:
        n = _copy_range(src, dst, min(end - pos, _CHUNK), pos)
        if n == 0:
            break
        pos += n
    return pos


def _copy_range(src: int, dst: int, count: int, pos: int) -> int:
    try:
        return os.copy_file_range(src, dst, count, pos, pos)
    except OSError as e:
        if e.errno not in (errno.EXDEV, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
            raise
    buf = os.pread(src, min(count, 1 << 20), pos)
    if buf:
        os.pwrite(dst, buf, pos)
    return len(buf)


def set_times(target: int | bytes, st: AnyStat, follow: bool = True) -> None:
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns), follow_symlinks=follow)


# Told about a node whose attributes as shown changed other than by the request
# being served: (node, links) - copied up (links=False: same attributes, the
# object now lives in the upper), or linked under another name by the daemon
# itself, or its set-ID bits cleared on open(O_TRUNC), or a directory of one layer
# copied up, now merged with st_nlink 1, or a directory moved to another parent
# (links=True: attributes the kernel cached, st_nlink or the mode, changed behind its
# back; for a directory, also the listing it keeps, whose `..` is the old parent's).
Changed = Callable[[Node, bool], None]


def _unchanged(node: Node, links: bool) -> None:
    pass


# One copy-up an operation needs: the node, and whether its data must be copied
# (not when the operation truncates it to zero). A plan is the steps of one
# operation, in order (see Union.copyups_for_open and friends); an empty plan is
# falsy (NO_COPYUPS), so that the adaptor skips it without a coroutine.
CopyStep = tuple[Node, bool]
CopyPlan = Iterable[CopyStep]
NO_COPYUPS: tuple[CopyStep, ...] = ()


class CopyJob:
    """One copy-up under way: begun, its data to copy, then finished or aborted."""

    __slots__ = ("copied", "dst_fd", "engine", "node", "src_fd", "st", "tmp", "with_data")

    def __init__(
        self,
        engine: CopyUp,
        node: Node,
        st: AnyStat,
        tmp: bytes,
        src_fd: int = -1,
        dst_fd: int = -1,
        with_data: bool = True,
    ) -> None:
        self.engine = engine
        self.node = node
        self.st = st
        self.tmp = tmp
        self.src_fd = src_fd
        self.dst_fd = dst_fd
        self.with_data = with_data
        self.copied = 0  # bytes of the copy so far (its size: `copy_data`)

    @property
    def size(self) -> int:
        return self.st.st_size if self.with_data else 0

    def copy_data(self) -> None:
        """The data copy: I/O on two fds only, safe in a worker thread."""
        if self.with_data and self.src_fd >= 0 and self.st.st_size:
            st = self.st
            self.copied = copy_file_data(self.src_fd, self.dst_fd, st.st_size, st.st_blocks * 512)

    def finish(self) -> None:
        """Move the copy into place and point the node at it (on the event loop)."""
        self.engine.finish(self)

    def abort(self) -> None:
        """Throw the copy away: the node stays where it was."""
        self.engine.abort(self)

    def run(self) -> None:
        """The whole copy-up on the calling thread."""
        try:
            self.copy_data()
        except BaseException:
            self.abort()
            raise
        self.finish()

    def close(self) -> None:
        for fd in (self.src_fd, self.dst_fd):
            if fd >= 0:
                os.close(fd)
        self.src_fd = self.dst_fd = -1


class CopyUp:
    def __init__(
        self,
        stack: LayerStack,
        table: InodeTable,
        resolver: Resolver,
        work_fd: int,
        changed: Changed = _unchanged,
        owners_optional: bool = False,
    ) -> None:
        self.stack = stack
        self.owners_optional = owners_optional  # see chown_failed
        self.table = table
        self.resolver = resolver
        self.work_fd = work_fd
        self._serial = itertools.count(1)
        self._pid = os.getpid()  # of the daemon, which serves this mount alone
        upper = stack.upper
        self.upper_dev = upper.dev if upper is not None else 0
        # Lower hard links copied up this mount: origin (dev, ino) -> the (upper) node,
        # and the other way (kept here, not in a slot of every node).
        self.hardlinks: dict[tuple[int, int], Node] = {}
        self.origins: dict[Node, tuple[int, int]] = {}
        self.changed = changed

    def tmpname(self) -> bytes:
        return b"#pyunion-%d-%d" % (self._pid, next(self._serial))

    # -- directories -----------------------------------------------------------
    def upper_dirfd(self, d: Node) -> int:
        """The upper fd of directory `d`, copying it (and its parents) up if needed."""
        if not d.chain or d.chain[0] != 0:
            if self.stack.upper is None:
                raise FsError(errno.EROFS)
            # Parents first, top down, in a loop: a tree can be deeper than Python's stack.
            todo = []
            n: Node | None = d
            while n is not None and (not n.chain or n.chain[0] != 0):
                todo.append(n)
                n = n.parent
            # Each level needs only its parent's new upper fd: past the fd budget, the
            # fds of the level before are closed as the next is made (none of them was
            # in the upper before, so the request holds none of their fds). All kept,
            # a tree deeper than the fd limit failed with EMFILE half-way.
            prev: Node | None = None
            for n in reversed(todo):
                self.copy_up_dir(n)
                if prev is not None:
                    self.resolver.let_go(prev)
                prev = n
        return self.resolver.dirfd(d, 0)

    def copy_up_dir(self, d: Node) -> None:
        if self.stack.upper is None:
            raise FsError(errno.EROFS)
        parent = d.parent
        assert parent is not None, "the root always has an upper"
        pfd = self.upper_dirfd(parent)
        src_fd = self.resolver.dirfd(d, 0)
        st = os.fstat(src_fd)
        pst = os.fstat(pfd)
        tmp = self.tmpname()
        os.mkdir(tmp, 0o700, dir_fd=self.work_fd)
        fd = os.open(tmp, DIR_FLAGS, dir_fd=self.work_fd)
        try:
            try:
                os.chown(fd, st.st_uid, st.st_gid)
            except OSError as e:
                chown_failed(e, self.owners_optional)
            os.chmod(fd, stat.S_IMODE(st.st_mode))
            copy_xattrs(src_fd, fd)
            os.rename(tmp, d.name, src_dir_fd=self.work_fd, dst_dir_fd=pfd)
            set_times(fd, st)
        except BaseException:
            os.close(fd)
            rmtree_at(self.work_fd, tmp)
            raise
        set_times(pfd, pst)
        assert isinstance(d, DirNode)
        d.chain = (0, *d.chain)
        d.fds.insert(0, -1)
        self.resolver.keep_fd(d, 0, fd)
        d.xwh = None
        d.xnames = None
        parent.drop_listing()
        # A directory of one layer shows its own st_nlink, a merged one 1 (as the
        # kernel's): the kernel's cached count is stale when it just became merged.
        self.changed(d, len(d.chain) == 2)

    # -- non-directories -----------------------------------------------------
    def begin(self, node: Node, with_data: bool = True) -> CopyJob | None:
        """Start copying `node` up; None if it is in the upper already."""
        if node.is_dir:
            if node.chain[0] != 0:
                self.copy_up_dir(node)
            return None
        if node.layer == 0:
            return None
        if node.links is UNLINKED:
            # Copying it up would put a removed name back in the merged view.
            raise FsError(errno.ENOENT)
        if self.stack.upper is None:
            raise FsError(errno.EROFS)
        assert node.parent is not None
        self.upper_dirfd(node.parent)
        src_dir = self.resolver.location_fd(node)
        # A lower object's stat from its lookup: layers below the upper never change.
        st = node.st
        if st is None:
            st = os.stat(node.name, dir_fd=src_dir, follow_symlinks=False)
        job = CopyJob(self, node, st, self.tmpname(), with_data=with_data)
        mode = st.st_mode
        try:
            if stat.S_ISREG(mode):
                if with_data and st.st_size:
                    # Data is read through this fd only; its own stat rules (size, owner).
                    job.src_fd, job.st, _ = open_lower_file(src_dir, node.name)
                job.dst_fd = os.open(
                    job.tmp,
                    os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC,
                    0o600,
                    dir_fd=self.work_fd,
                )
            elif stat.S_ISLNK(mode):
                target = os.readlink(node.name, dir_fd=src_dir)
                os.symlink(target, job.tmp, dir_fd=self.work_fd)
            else:
                os.mknod(job.tmp, mode, st.st_rdev, dir_fd=self.work_fd)
        except BaseException:
            self.abort(job)
            raise
        return job

    def abort(self, job: CopyJob) -> None:
        job.close()
        with contextlib.suppress(OSError):
            os.unlink(job.tmp, dir_fd=self.work_fd)

    def finish(self, job: CopyJob) -> None:
        node = job.node
        st = job.st
        try:
            assert node.parent is not None
            src_dir = self.resolver.location_fd(node)
            pfd = self.resolver.dirfd(node.parent, 0)
            tmp_path = fdpath(self.work_fd, job.tmp)
            if job.dst_fd >= 0:
                fd = job.dst_fd
                if job.with_data and job.copied < st.st_size:  # a trailing hole
                    os.ftruncate(fd, st.st_size)
                try:
                    os.fchown(fd, st.st_uid, st.st_gid)
                except OSError as e:
                    chown_failed(e, self.owners_optional)
                os.fchmod(fd, stat.S_IMODE(st.st_mode))
                copy_xattrs(job.src_fd if job.src_fd >= 0 else fdpath(src_dir, node.name), fd)
                set_times(fd, st)
            else:
                try:
                    os.chown(
                        job.tmp, st.st_uid, st.st_gid, dir_fd=self.work_fd, follow_symlinks=False
                    )
                except OSError as e:
                    chown_failed(e, self.owners_optional)
                # Never through a symlink: whoever can write the work dir could swap
                # one in for the node just made, and root would chmod its target.
                chmod_nofollow(self.work_fd, job.tmp, stat.S_IMODE(st.st_mode))
                copy_xattrs(fdpath(src_dir, node.name), tmp_path)
                set_times(tmp_path, st, follow=False)
            pst = os.fstat(pfd)
            os.rename(job.tmp, node.name, src_dir_fd=self.work_fd, dst_dir_fd=pfd)
            set_times(pfd, pst)
        except BaseException:
            self.abort(job)
            raise
        try:  # the copy's identity: by its fd when it has one (no path walk)
            if job.dst_fd >= 0:
                new = os.fstat(job.dst_fd)
                self.table.bind(node, job.dst_fd)
            else:
                new = os.stat(node.name, dir_fd=pfd, follow_symlinks=False)
                self.table.bind(node, pfd, node.name)
        finally:
            job.close()
        self.table.copied[(new.st_dev, new.st_ino)] = node.ino
        old_layer = node.layer
        node.layer = 0
        node.xnames = None
        node.parent.drop_listing()
        self._reopen_handles(node, pfd)
        self.changed(node, False)
        if stat.S_ISREG(st.st_mode) and st.st_nlink > 1 and old_layer != 0:
            self._link_aliases(node, (st.st_dev, st.st_ino))

    def _reopen_handles(self, node: Node, pfd: int) -> None:
        """Point read handles opened on the lower file at the upper copy."""
        for h in node.handles or ():
            if h.layer != 0:
                newfd = open_file_at(pfd, node.name, os.O_RDONLY)
                os.dup2(newfd, h.fd, inheritable=False)
                os.close(newfd)
                h.layer = 0

    def _link_aliases(self, node: Node, origin: tuple[int, int]) -> None:
        """Keep the other names of a lower hard link pointing at the copy (those we know)."""
        old = self.hardlinks.get(origin)
        if old is not None:
            del self.origins[old]
        self.hardlinks[origin] = node
        self.origins[node] = origin
        assert node.parent is not None
        src_fd = self.resolver.dirfd(node.parent, 0)
        for parent, name in list(node.links or ()):
            self.link_alias(node, src_fd, parent, name)
            if parent.listing is not None:
                parent.drop_listing()
        if node.links:
            self.changed(node, True)

    def link_alias(self, node: Node, src_fd: int, parent: Node, name: bytes) -> None:
        pfd = self.upper_dirfd(parent)
        try:
            os.stat(name, dir_fd=pfd, follow_symlinks=False)
            return  # the upper has that name already (it hides the lower alias)
        except FileNotFoundError:
            pass
        pst = os.fstat(pfd)
        os.link(node.name, name, src_dir_fd=src_fd, dst_dir_fd=pfd, follow_symlinks=False)
        set_times(pfd, pst)  # the name was there already in the merged view: no visible change

    def copy_up(self, node: Node, with_data: bool = True) -> None:
        """Copy-up in one go, on the calling thread."""
        job = self.begin(node, with_data)
        if job is not None:
            job.run()
