"""The union filesystem core: every operation, in terms of nodes, without FUSE.

Operations take and return `Node`s and raise `OSError`/`FsError` carrying an
errno; the FUSE adaptor (`fuseops.py`) is a thin shell that turns inode numbers
into nodes and errors into replies. Tests can drive this class directly.

Writes follow the kernel's overlayfs: copy-up before the first change, a
whiteout where a removed name still exists below, an opaque directory where a
new directory replaces a whiteout, and every change that must be atomic done as
one rename (RENAME_WHITEOUT, RENAME_EXCHANGE, or a rename from the work dir).
"""

from __future__ import annotations

import errno
import itertools
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass

from .copyup import CopyJob, CopyUp
from .errors import FsError
from .handles import DirHandle, Handle
from .inodes import ROOT_ID, InodeTable, Node
from .layers import DIR_FLAGS, LayerStack
from .resolve import Entry, Resolver
from .syscalls import (
    RENAME_EXCHANGE,
    RENAME_NOREPLACE,
    RENAME_WHITEOUT,
    chmod_nofollow,
    fdpath,
    renameat2,
)
from .tree import rmtree_at
from .whiteout import OPQ_OCI, WH_PREFIX, WhiteoutWriter, is_internal_xattr, is_whiteout_stat

NAME_MAX = 255
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_TRUNC
_OPEN_KEEP = os.O_SYNC | os.O_DSYNC | os.O_TRUNC
_NOATIME = getattr(os, "O_NOATIME", 0)


@dataclass
class Ctx:
    """Who asks: the caller's credentials (from the FUSE request)."""

    uid: int = 0
    gid: int = 0
    umask: int = 0


def check_name(name: bytes) -> None:
    if len(name) > NAME_MAX:
        raise FsError(errno.ENAMETOOLONG)
    if name.startswith(WH_PREFIX):
        raise FsError(errno.EINVAL)


def check_rename_flags(flags: int) -> None:
    """Only RENAME_NOREPLACE and RENAME_EXCHANGE, as kernel overlayfs: no RENAME_WHITEOUT here."""
    if flags & ~(RENAME_NOREPLACE | RENAME_EXCHANGE):
        raise FsError(errno.EINVAL)


class Union:
    """A mounted stack: lookups, listings, copy-up and every write."""

    def __init__(self, stack: LayerStack, work_fd: int = -1, volatile: bool = False,
                 writeback: bool = False) -> None:
        self.stack = stack
        # With the kernel's writeback cache, the kernel keeps mtime and sends it in
        # a setattr, which can overtake the last data writes it flushes: the mtime
        # it set is re-applied after such writes (Node.mtime_pin).
        self.writeback = writeback
        self.table = InodeTable(list(stack.devs))
        self.resolver = Resolver(stack, self.table)
        self.volatile = volatile
        chain = stack.root_chain()
        top = stack.layers[chain[0]]
        assert top is not None
        root = Node(ROOT_ID, None, b"", True, chain[0], chain, (top.dev, top.ino))
        root.fds = [stack.layers[i].fd for i in chain]  # type: ignore[union-attr]
        root.nlookup = 1
        self.root = root
        self.table.add(root)
        self.work_fd = work_fd
        self.copyup = CopyUp(stack, self.table, self.resolver, work_fd)
        self.whiteouts = WhiteoutWriter()
        self.handles: dict[int, Handle | DirHandle] = {}
        self._fh = itertools.count(1)

    # -- nodes -----------------------------------------------------------------
    def node(self, ino: int) -> Node:
        node = self.table.nodes.get(ino)
        if node is None:
            raise FsError(errno.ENOENT)
        return node

    def _entry_id(self, entry: Entry) -> int:
        if entry.layer == 0:
            st = entry.st
            mapped = self.table.copied.get((st.st_dev, st.st_ino))
            if mapped is not None:
                return mapped
        return self.table.ident_to_id(*entry.origin)

    def _node_for(self, parent: Node, name: bytes, entry: Entry) -> Node:
        """The node of a resolved entry: the live one with its id, or a new one."""
        is_dir = stat.S_ISDIR(entry.st.st_mode)
        nid = self._entry_id(entry)
        node = self.table.get(nid)
        if node is not None and node.is_dir == is_dir and not node.unlinked:
            if not is_dir and node.layer == 0 and entry.layer != 0 and self.stack.writable:
                # Another name of a lower hard link whose object was copied up: link it too.
                assert node.parent is not None
                self.copyup.link_alias(node, self.resolver.dirfd(node.parent, 0), parent, name)
                parent.listing = None
                node.attr = None
                node.add_link(parent, name)
                self.copyup.links_changed(node)
            elif is_dir:
                if node.parent is not parent or node.name != name:
                    node.close_fds()
                    node.parent, node.name = parent, name
                    node.chain, node.fds = entry.chain, [-1] * len(entry.chain)
            else:
                node.add_link(parent, name)
            return node
        if not is_dir and entry.layer != 0 and entry.st.st_nlink > 1:
            up = self.copyup.hardlinks.get(entry.origin)
            if up is not None and not up.unlinked and self.stack.writable:
                assert up.parent is not None
                self.copyup.link_alias(up, self.resolver.dirfd(up.parent, 0), parent, name)
                up.add_link(parent, name)
                up.attr = None
                parent.listing = None
                self.copyup.links_changed(up)
                self.table.nodes[up.ino] = up
                return up
        new = Node(nid, parent, name, is_dir, entry.layer, entry.chain, entry.origin)
        if entry.layer != 0:
            new.st = entry.st
        if node is not None:
            new.nlookup = node.nlookup  # the kernel reuses its inode for this id
        self.table.add(new)
        return new

    def _new_upper_node(self, parent: Node, name: bytes, st: os.stat_result) -> Node:
        is_dir = stat.S_ISDIR(st.st_mode)
        nid = self.table.ident_to_id(st.st_dev, st.st_ino)
        old = self.table.nodes.get(nid)
        if old is not None and old.unlinked:
            # The upper's filesystem reused the inode number of a removed object
            # that the kernel still holds: the same node id would make the kernel
            # take the new object for the old one (ESTALE on mkdir, another
            # file's data on a reopen). Give it a number of its own.
            nid = self.table.fresh_id()
            self.table.copied[(st.st_dev, st.st_ino)] = nid
            old = None
        chain = (0,) if is_dir else ()
        node = Node(nid, parent, name, is_dir, 0, chain, (st.st_dev, st.st_ino))
        if old is not None:
            node.nlookup = old.nlookup
        self.table.add(node)
        return node

    def forget(self, ino: int, n: int) -> None:
        self.table.forget(ino, n)

    def release_node(self, node: Node) -> None:
        self.table.release_if_unused(node)

    # -- reading ---------------------------------------------------------------
    def lookup(self, parent: Node, name: bytes) -> Node | None:
        """Resolve `name`; the returned node has its lookup count raised."""
        check_name(name)
        if not parent.is_dir:
            raise FsError(errno.ENOTDIR)
        entry = self.resolver.resolve(parent, name)
        if entry is None:
            return None
        node = self._node_for(parent, name, entry)
        node.nlookup += 1
        return node

    def stat(self, node: Node) -> tuple[os.stat_result, int]:
        """(stat of the object's topmost instance, st_nlink to show)."""
        if node.is_dir:
            if node.chain[0] != 0 and node.st is not None:
                st = node.st
            else:
                st = os.fstat(self.resolver.dirfd(node, 0))
                if node.chain[0] != 0:
                    node.st = st
            return st, (1 if len(node.chain) > 1 else st.st_nlink)
        if node.layer != 0 and node.st is not None:
            return node.st, node.st.st_nlink
        if node.unlinked:
            for h in node.handles or ():
                st = os.fstat(h.fd)
                return st, st.st_nlink
            if node.st is not None:
                return node.st, 0
            raise FsError(errno.ENOENT)
        st = os.stat(node.name, dir_fd=self.resolver.location_fd(node), follow_symlinks=False)
        if node.layer != 0:
            node.st = st
        return st, st.st_nlink

    def readlink(self, node: Node) -> bytes:
        if node.is_dir:
            raise FsError(errno.EINVAL)
        return os.readlink(node.name, dir_fd=self.resolver.location_fd(node))

    def opendir(self, node: Node) -> int:
        if not node.is_dir:
            raise FsError(errno.ENOTDIR)
        fh = next(self._fh)
        self.handles[fh] = DirHandle(node)
        return fh

    def dir_handle(self, fh: int) -> DirHandle:
        h = self.handles.get(fh)
        if not isinstance(h, DirHandle):
            raise FsError(errno.EBADF)
        return h

    def readdir(self, fh: int, off: int) -> Iterator[tuple[bytes, Node, int, bool]]:
        """Entries from offset `off`: (name, node, next offset, counts-as-lookup).

        The caller raises the lookup count of each entry it hands to the kernel
        (readdirplus) and calls `release_node` on the first one it could not.
        """
        dh = self.dir_handle(fh)
        d = dh.node
        if dh.entries is None:
            dh.entries = list(self.resolver.listing(d).items())
        if off == 0:
            yield b".", d, 1, False
            off = 1
        if off == 1:
            yield b"..", d.parent or d, 2, False
            off = 2
        entries = dh.entries
        for i in range(off - 2, len(entries)):
            name, entry = entries[i]
            yield name, self._node_for(d, name, entry), i + 3, True

    def releasedir(self, fh: int) -> None:
        self.handles.pop(fh, None)

    def statfs(self) -> os.statvfs_result:
        layer = self.stack.upper or self.stack.layers[1]
        assert layer is not None
        return os.fstatvfs(layer.fd)

    def _xattr_target(self, node: Node) -> tuple[int | bytes, bool]:
        if node.is_dir:
            return self.resolver.dirfd(node, 0), True
        return fdpath(self.resolver.location_fd(node), node.name), False

    def _xattr_names(self, node: Node) -> frozenset[bytes]:
        names = node.xnames
        if names is None:
            target, follow = self._xattr_target(node)
            names = frozenset(n.encode() for n in os.listxattr(target, follow_symlinks=follow))
            node.xnames = names
        return names

    def getxattr(self, node: Node, name: bytes) -> bytes:
        # The kernel asks for security.capability before every write(2): answer a
        # missing name from the cached list, without a syscall.
        if is_internal_xattr(name) or name not in self._xattr_names(node):
            raise FsError(errno.ENODATA)
        target, follow = self._xattr_target(node)
        return os.getxattr(target, name, follow_symlinks=follow)

    def listxattr(self, node: Node) -> list[bytes]:
        return sorted(n for n in self._xattr_names(node) if not is_internal_xattr(n))

    # -- files -------------------------------------------------------------------
    def needs_copyup(self, node: Node) -> bool:
        return (node.chain[0] != 0) if node.is_dir else node.layer != 0

    def copyup_begin(self, node: Node, with_data: bool = True) -> CopyJob | None:
        self._writable()
        return self.copyup.begin(node, with_data)

    def copy_up(self, node: Node, with_data: bool = True) -> None:
        self._writable()
        self.copyup.copy_up(node, with_data)

    def open(self, node: Node, flags: int) -> int:
        """Open a file; a write open expects the caller to have copied it up."""
        if node.is_dir:
            raise FsError(errno.EISDIR)
        writing = bool(flags & _WRITE_FLAGS)
        if writing:
            self._writable()
            if node.layer != 0:
                self.copy_up(node, with_data=not flags & os.O_TRUNC)
            acc = flags & os.O_ACCMODE
            keep = flags & _OPEN_KEEP
            pfd = self.resolver.location_fd(node)
            try:
                fd = os.open(node.name, os.O_RDWR | keep | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=pfd)
            except PermissionError:
                fd = os.open(node.name, acc | keep | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=pfd)
        else:
            pfd = self.resolver.location_fd(node)
            base = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC
            try:
                fd = os.open(node.name, base | (_NOATIME if node.layer else 0), dir_fd=pfd)
            except PermissionError:
                fd = os.open(node.name, base, dir_fd=pfd)
        return self._add_handle(node, fd, writing)

    def _add_handle(self, node: Node, fd: int, writable: bool) -> int:
        h = Handle(fd, node, node.layer, writable)
        if node.handles is None:
            node.handles = []
        node.handles.append(h)
        fh = next(self._fh)
        self.handles[fh] = h
        return fh

    def file_handle(self, fh: int) -> Handle:
        h = self.handles.get(fh)
        if not isinstance(h, Handle):
            raise FsError(errno.EBADF)
        return h

    def read(self, fh: int, off: int, size: int) -> bytes:
        return os.pread(self.file_handle(fh).fd, size, off)

    def write(self, fh: int, off: int, data: bytes) -> int:
        h = self.file_handle(fh)
        if not h.writable:
            raise FsError(errno.EBADF)
        n = os.pwrite(h.fd, data, off)
        pin = h.node.mtime_pin
        if pin is not None:
            os.utime(h.fd, ns=pin)
        return n

    def fsync(self, fh: int, datasync: bool) -> None:
        if self.volatile:
            return
        h = self.file_handle(fh)
        if datasync:
            os.fdatasync(h.fd)
        else:
            os.fsync(h.fd)

    def fsyncdir(self, fh: int) -> None:
        if self.volatile:
            return
        d = self.dir_handle(fh).node
        if d.chain[0] == 0:
            os.fsync(self.resolver.dirfd(d, 0))

    def release(self, fh: int) -> None:
        h = self.handles.pop(fh, None)
        if not isinstance(h, Handle):
            return
        os.close(h.fd)
        node = h.node
        if node.handles:
            node.handles.remove(h)
            if not node.handles:
                node.handles = None
        self.table.release_if_unused(node)

    # -- creating ----------------------------------------------------------------
    def _writable(self) -> None:
        if not self.stack.writable:
            raise FsError(errno.EROFS)

    def _upper_whiteout(self, d: Node, pfd: int, name: bytes) -> str | None:
        """Which whiteout of `name` the upper dir holds: 'kernel', 'oci' or None."""
        if len(d.chain) == 1:
            return None  # an upper-only directory never holds whiteouts
        try:
            st = os.stat(name, dir_fd=pfd, follow_symlinks=False)
        except FileNotFoundError:
            st = None
        if st is not None:
            if is_whiteout_stat(st):
                return "kernel"
            raise FsError(errno.EEXIST)
        if len(WH_PREFIX) + len(name) > NAME_MAX:
            return None  # no `.wh.NAME` can exist (stat would say ENAMETOOLONG)
        try:
            os.stat(WH_PREFIX + name, dir_fd=pfd, follow_symlinks=False)
            return "oci"
        except FileNotFoundError:
            return None

    def _prepare_new(self, parent: Node, name: bytes) -> tuple[int, str | None]:
        check_name(name)
        self._writable()
        if not parent.is_dir:
            raise FsError(errno.ENOTDIR)
        if self.resolver.resolve(parent, name) is not None:
            raise FsError(errno.EEXIST)
        pfd = self.copyup.upper_dirfd(parent)
        return pfd, self._upper_whiteout(parent, pfd, name)

    def _owner(self, pfd: int, ctx: Ctx, is_dir: bool, mode: int) -> tuple[int, int, int]:
        """uid, gid and mode of a new object: BSD group semantics under a setgid directory."""
        gid = ctx.gid
        pst = os.fstat(pfd)
        if pst.st_mode & stat.S_ISGID:
            gid = pst.st_gid
            if is_dir:
                mode |= stat.S_ISGID
        return ctx.uid, gid, mode

    def _place(self, parent: Node, pfd: int, name: bytes, wh: str | None, is_dir: bool,
               make: "callable[[int, bytes], None]") -> os.stat_result:  # type: ignore[valid-type]
        """Create an object with `make(dirfd, name)`, replacing a whiteout atomically."""
        if wh == "kernel":
            tmp = self.copyup.tmpname()
            make(self.work_fd, tmp)
            try:
                if is_dir:
                    self._set_opaque_at(self.work_fd, tmp)
                    renameat2(self.work_fd, tmp, pfd, name, RENAME_EXCHANGE)
                    os.unlink(tmp, dir_fd=self.work_fd)
                else:
                    os.rename(tmp, name, src_dir_fd=self.work_fd, dst_dir_fd=pfd)
            except BaseException:
                rmtree_at(self.work_fd, tmp)
                raise
        else:
            make(pfd, name)
            if wh == "oci":
                if is_dir:
                    self._set_opaque_at(pfd, name)
                os.unlink(WH_PREFIX + name, dir_fd=pfd)
        parent.listing = None
        return os.stat(name, dir_fd=pfd, follow_symlinks=False)

    def _set_opaque_at(self, dirfd: int, name: bytes) -> None:
        fd = os.open(name, DIR_FLAGS, dir_fd=dirfd)
        try:
            self.whiteouts.set_opaque(fd)
        finally:
            os.close(fd)

    def create(self, parent: Node, name: bytes, mode: int, flags: int, ctx: Ctx) -> tuple[int, Node]:
        pfd, wh = self._prepare_new(parent, name)
        uid, gid, mode = self._owner(pfd, ctx, False, mode & 0o7777)
        fds: list[int] = []

        def make(dfd: int, n: bytes) -> None:
            fd = os.open(n, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                         mode, dir_fd=dfd)
            fds.append(fd)
            os.fchown(fd, uid, gid)
            if mode & (stat.S_ISUID | stat.S_ISGID):
                os.fchmod(fd, mode)

        try:
            st = self._place(parent, pfd, name, wh, False, make)
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise
        node = self._new_upper_node(parent, name, st)
        node.nlookup += 1
        return self._add_handle(node, fds[0], True), node

    def mkdir(self, parent: Node, name: bytes, mode: int, ctx: Ctx) -> Node:
        pfd, wh = self._prepare_new(parent, name)
        uid, gid, mode = self._owner(pfd, ctx, True, mode & 0o7777)

        def make(dfd: int, n: bytes) -> None:
            os.mkdir(n, mode, dir_fd=dfd)
            os.chown(n, uid, gid, dir_fd=dfd, follow_symlinks=False)
            if mode & (stat.S_ISUID | stat.S_ISGID | stat.S_ISVTX):
                chmod_nofollow(dfd, n, mode)

        st = self._place(parent, pfd, name, wh, True, make)
        node = self._new_upper_node(parent, name, st)
        node.nlookup += 1
        return node

    def mknod(self, parent: Node, name: bytes, mode: int, rdev: int, ctx: Ctx) -> Node:
        if stat.S_ISCHR(mode) and rdev == 0:
            # A whiteout: it would hide the lower name and stay stuck in the upper
            # (missing from ls, ENOENT for rm). Kernel overlayfs refuses it too.
            raise FsError(errno.EPERM)
        pfd, wh = self._prepare_new(parent, name)
        uid, gid, _ = self._owner(pfd, ctx, False, 0)

        def make(dfd: int, n: bytes) -> None:
            os.mknod(n, mode, rdev, dir_fd=dfd)
            os.chown(n, uid, gid, dir_fd=dfd, follow_symlinks=False)
            if mode & (stat.S_ISUID | stat.S_ISGID):
                chmod_nofollow(dfd, n, mode & 0o7777)

        st = self._place(parent, pfd, name, wh, False, make)
        node = self._new_upper_node(parent, name, st)
        node.nlookup += 1
        return node

    def symlink(self, parent: Node, name: bytes, target: bytes, ctx: Ctx) -> Node:
        pfd, wh = self._prepare_new(parent, name)
        uid, gid, _ = self._owner(pfd, ctx, False, 0)

        def make(dfd: int, n: bytes) -> None:
            os.symlink(target, n, dir_fd=dfd)
            os.chown(n, uid, gid, dir_fd=dfd, follow_symlinks=False)

        st = self._place(parent, pfd, name, wh, False, make)
        node = self._new_upper_node(parent, name, st)
        node.nlookup += 1
        return node

    def link(self, node: Node, parent: Node, name: bytes) -> Node:
        if node.is_dir:
            raise FsError(errno.EPERM)
        pfd, wh = self._prepare_new(parent, name)
        self.copy_up(node)
        src_fd = self.resolver.location_fd(node)

        def make(dfd: int, n: bytes) -> None:
            os.link(node.name, n, src_dir_fd=src_fd, dst_dir_fd=dfd, follow_symlinks=False)

        self._place(parent, pfd, name, wh, False, make)
        node.add_link(parent, name)
        node.attr = None
        node.nlookup += 1
        return node

    # -- removing ----------------------------------------------------------------
    def _lower_has(self, parent: Node, name: bytes) -> bool:
        """Whether a layer below the upper still shows `name` in `parent`."""
        if parent.chain[0] != 0:
            return self.resolver.resolve(parent, name) is not None
        return len(parent.chain) > 1 and self.resolver.resolve(parent, name, start=1) is not None

    def _remove_upper(self, pfd: int, name: bytes, whiteout: bool, is_dir: bool) -> None:
        """Remove an upper entry, leaving a whiteout in its place if asked, atomically."""
        if not whiteout:
            if is_dir:
                rmtree_at(pfd, name)
            else:
                os.unlink(name, dir_fd=pfd)
            return
        tmp = self.copyup.tmpname()
        if self.whiteouts.kernel_whiteouts:
            try:
                renameat2(pfd, name, self.work_fd, tmp, RENAME_WHITEOUT)
            except OSError as e:
                if e.errno not in (errno.EINVAL, errno.EPERM, errno.EOPNOTSUPP):
                    raise
            else:
                rmtree_at(self.work_fd, tmp)
                return
        os.rename(name, tmp, src_dir_fd=pfd, dst_dir_fd=self.work_fd)
        self.whiteouts.make_whiteout(pfd, name)
        rmtree_at(self.work_fd, tmp)

    def _dropped(self, node: Node, parent: Node, name: bytes, st: os.stat_result | None) -> None:
        """Bookkeeping after `name` in `parent` stopped naming `node`."""
        node.drop_link(parent, name)
        node.attr = None
        if node.is_dir:
            node.unlinked = True
            node.close_fds()
            node.listing = None
        if node.unlinked and st is not None and (node.is_dir or st.st_nlink <= 1):
            self.table.copied.pop((st.st_dev, st.st_ino), None)
            if self.copyup.hardlinks.get(node.origin) is node:
                del self.copyup.hardlinks[node.origin]

    def _existing(self, parent: Node, name: bytes) -> tuple[Entry, Node]:
        check_name(name)
        entry = self.resolver.resolve(parent, name)
        if entry is None:
            raise FsError(errno.ENOENT)
        return entry, self._node_for(parent, name, entry)

    def unlink(self, parent: Node, name: bytes) -> None:
        self._writable()
        entry, node = self._existing(parent, name)
        if node.is_dir:
            raise FsError(errno.EISDIR)
        whiteout = self._lower_has(parent, name)
        pfd = self.copyup.upper_dirfd(parent)
        st = None
        if entry.layer == 0:
            st = os.stat(name, dir_fd=pfd, follow_symlinks=False)
            node.st = st
            self._remove_upper(pfd, name, whiteout, False)
        else:
            self.whiteouts.make_whiteout(pfd, name)
        parent.listing = None
        self._dropped(node, parent, name, st)
        self.table.release_if_unused(node)

    def _check_empty(self, d: Node) -> None:
        if self.resolver.listing(d):
            raise FsError(errno.ENOTEMPTY)

    def _clean_upper_dir(self, fd: int) -> None:
        """Remove whiteouts and markers from an upper dir whose merged view is empty."""
        for e in list(os.scandir(fd)):
            name = os.fsencode(e.name)
            if e.is_dir(follow_symlinks=False):
                raise FsError(errno.ENOTEMPTY)
            if name == OPQ_OCI:
                continue
            os.unlink(name, dir_fd=fd)

    def rmdir(self, parent: Node, name: bytes) -> None:
        self._writable()
        entry, node = self._existing(parent, name)
        if not node.is_dir:
            raise FsError(errno.ENOTDIR)
        self._check_empty(node)
        whiteout = self._lower_has(parent, name)
        pfd = self.copyup.upper_dirfd(parent)
        st = None
        if node.chain[0] == 0:
            ufd = self.resolver.dirfd(node, 0)
            st = os.fstat(ufd)
            if whiteout:
                # One atomic step, whiteouts inside and all: emptying the upper dir
                # first would let a crash bring the lower entries back.
                self._remove_upper(pfd, name, True, True)
            else:
                self._clean_upper_dir(ufd)
                try:
                    os.unlink(OPQ_OCI, dir_fd=ufd)
                except FileNotFoundError:
                    pass
                os.rmdir(name, dir_fd=pfd)
        else:
            self.whiteouts.make_whiteout(pfd, name)
        parent.listing = None
        self._dropped(node, parent, name, st)
        self.table.release_if_unused(node)

    # -- rename ------------------------------------------------------------------
    def materialize_dir(self, d: Node) -> None:
        """Copy a directory's whole merged subtree into the upper and make it opaque.

        This is how a directory with lower content is renamed (the kernel says
        EXDEV): afterwards it is an upper-only directory, which renames in place,
        and kernel overlayfs mounts the result with the same view. It costs a
        copy of every file below it.
        """
        # Depth first with a stack of our own: a tree can be deeper than Python's.
        stack: list[tuple[Node, Iterator[tuple[bytes, Entry]]]] = []

        def enter(n: Node) -> bool:
            self.copyup.upper_dirfd(n)
            if len(n.chain) == 1:
                return False
            stack.append((n, iter(list(self.resolver.listing(n).items()))))
            return True

        if not enter(d):
            return
        while stack:
            n, items = stack[-1]
            for name, entry in items:
                child = self._node_for(n, name, entry)
                if child.is_dir:
                    if enter(child):
                        break  # released once its own subtree is done
                else:
                    self.copyup.copy_up(child)
                self.table.release_if_unused(child)
            else:
                stack.pop()
                self._seal_materialized(n)
                if n is not d:
                    self.table.release_if_unused(n)

    def _seal_materialized(self, d: Node) -> None:
        """Every entry of `d` is in the upper now: make it opaque and upper-only."""
        ufd = self.resolver.dirfd(d, 0)
        self.whiteouts.set_opaque(ufd)
        self._drop_whiteouts(ufd)
        st = os.fstat(ufd)
        for fd in d.fds[1:]:
            if d.parent is not None and fd >= 0:
                os.close(fd)
        d.chain = (0,)
        d.fds = [ufd]
        d.listing = None
        d.xwh = None
        d.attr = None
        d.xnames = None
        self.table.copied[(st.st_dev, st.st_ino)] = d.ino

    def _drop_whiteouts(self, fd: int) -> None:
        """Whiteouts are useless (and not allowed) inside an opaque directory."""
        for e in list(os.scandir(fd)):
            n = os.fsencode(e.name)
            if n == OPQ_OCI:
                continue
            if n.startswith(WH_PREFIX):
                os.unlink(n, dir_fd=fd)
            elif not (e.is_dir(follow_symlinks=False) or e.is_file(follow_symlinks=False)
                      or e.is_symlink()) and is_whiteout_stat(e.stat(follow_symlinks=False)):
                os.unlink(n, dir_fd=fd)

    def _prepare_source(self, node: Node) -> None:
        if node.is_dir:
            if len(node.chain) > 1 or node.chain[0] != 0:
                self.materialize_dir(node)
        else:
            self.copy_up(node)

    def _is_opaque_upper(self, d: Node) -> bool:
        return len(d.chain) == 1 and d.chain[0] == 0

    def _opaque_for_move(self, node: Node, new_parent: Node) -> None:
        """A directory moved into a merged parent must not merge with lower ones there."""
        if node.is_dir and len(new_parent.chain) > 1:
            self.whiteouts.set_opaque(self.resolver.dirfd(node, 0))

    def rename(self, old_parent: Node, old_name: bytes, new_parent: Node, new_name: bytes,
               flags: int = 0) -> None:
        check_rename_flags(flags)
        self._writable()
        check_name(new_name)
        src_entry, src = self._existing(old_parent, old_name)
        if not new_parent.is_dir:
            raise FsError(errno.ENOTDIR)
        dst_entry = self.resolver.resolve(new_parent, new_name)
        dst = self._node_for(new_parent, new_name, dst_entry) if dst_entry else None
        try:
            if flags & RENAME_EXCHANGE:
                if dst is None:
                    raise FsError(errno.ENOENT)
                self._exchange(old_parent, old_name, src, new_parent, new_name, dst)
                return
            if dst is not None:
                if flags & RENAME_NOREPLACE:
                    raise FsError(errno.EEXIST)
                if dst is src:
                    return
                if src.is_dir and not dst.is_dir:
                    raise FsError(errno.ENOTDIR)
                if not src.is_dir and dst.is_dir:
                    raise FsError(errno.EISDIR)
                if dst.is_dir:
                    self._check_empty(dst)
            self._move(old_parent, old_name, src, new_parent, new_name, dst)
        finally:
            self.table.release_if_unused(src)
            if dst is not None:
                self.table.release_if_unused(dst)

    def _move(self, old_parent: Node, old_name: bytes, src: Node, new_parent: Node,
              new_name: bytes, dst: Node | None) -> None:
        self._prepare_source(src)
        src_wh = self._lower_has(old_parent, old_name)
        old_pfd = self.copyup.upper_dirfd(old_parent)
        new_pfd = self.copyup.upper_dirfd(new_parent)
        wh = None
        dst_st = None
        if dst is not None:
            if dst.is_dir and dst.chain[0] == 0:
                self._clean_upper_dir(self.resolver.dirfd(dst, 0))
                dst_st = os.fstat(self.resolver.dirfd(dst, 0))
            elif not dst.is_dir and dst.layer == 0:
                dst_st = os.stat(new_name, dir_fd=new_pfd, follow_symlinks=False)
        else:
            wh = self._upper_whiteout(new_parent, new_pfd, new_name)
        if src.is_dir:
            self._opaque_for_move(src, new_parent)
        if wh == "kernel" and src.is_dir:
            # A directory cannot replace a file: swap it with the whiteout instead.
            renameat2(old_pfd, old_name, new_pfd, new_name, RENAME_EXCHANGE)
            if not src_wh:
                os.unlink(old_name, dir_fd=old_pfd)
        else:
            moved = False
            if src_wh and self.whiteouts.kernel_whiteouts:
                try:
                    renameat2(old_pfd, old_name, new_pfd, new_name, RENAME_WHITEOUT)
                    moved = True
                except OSError as e:
                    if e.errno not in (errno.EINVAL, errno.EPERM, errno.EOPNOTSUPP):
                        raise
            if not moved:
                os.rename(old_name, new_name, src_dir_fd=old_pfd, dst_dir_fd=new_pfd)
                if src_wh:
                    self.whiteouts.make_whiteout(old_pfd, old_name)
            if wh == "oci":
                os.unlink(WH_PREFIX + new_name, dir_fd=new_pfd)
        old_parent.listing = None
        new_parent.listing = None
        if dst is not None:
            self._dropped(dst, new_parent, new_name, dst_st)
        self._relink(src, old_parent, old_name, new_parent, new_name)

    def _relink(self, node: Node, old_parent: Node, old_name: bytes, new_parent: Node,
                new_name: bytes) -> None:
        if node.parent is old_parent and node.name == old_name:
            node.parent, node.name = new_parent, new_name
        elif node.links:
            node.links = [(new_parent, new_name) if (p is old_parent and n == old_name) else (p, n)
                          for p, n in node.links]
        node.attr = None

    def _exchange(self, old_parent: Node, old_name: bytes, a: Node, new_parent: Node,
                  new_name: bytes, b: Node) -> None:
        if a is b:
            return
        self._prepare_source(a)
        self._prepare_source(b)
        old_pfd = self.copyup.upper_dirfd(old_parent)
        new_pfd = self.copyup.upper_dirfd(new_parent)
        if a.is_dir:
            self._opaque_for_move(a, new_parent)
        if b.is_dir:
            self._opaque_for_move(b, old_parent)
        renameat2(old_pfd, old_name, new_pfd, new_name, RENAME_EXCHANGE)
        old_parent.listing = None
        new_parent.listing = None
        tmp_parent, tmp_name = object(), b""
        self._relink(a, old_parent, old_name, tmp_parent, tmp_name)  # type: ignore[arg-type]
        self._relink(b, new_parent, new_name, old_parent, old_name)
        self._relink(a, tmp_parent, tmp_name, new_parent, new_name)  # type: ignore[arg-type]

    # -- attributes --------------------------------------------------------------
    def setattr(self, node: Node, *, mode: int | None = None, uid: int | None = None,
                gid: int | None = None, size: int | None = None, atime_ns: int | None = None,
                mtime_ns: int | None = None, fh: int | None = None) -> None:
        self._writable()
        handle = self.handles.get(fh) if fh is not None else None
        if self.needs_copyup(node):
            only_trunc0 = size == 0 and mode is None and uid is None and gid is None
            self.copy_up(node, with_data=not only_trunc0)
        target: int | bytes
        dirfd: int | None = None
        if node.is_dir:
            target = self.resolver.dirfd(node, 0)
            if size is not None:
                raise FsError(errno.EISDIR)
        else:
            fd = self._upper_fd(node, handle)
            if fd is not None:
                target = fd  # also right for a removed file still open
            elif node.unlinked:
                # A removed file nobody has open: the kernel flushing its times on
                # eviction (writeback cache). Nothing is left to change.
                node.attr = None
                return
            else:
                dirfd = self.resolver.location_fd(node)
                target = fdpath(dirfd, node.name)
        if size is not None:
            wfd = self._upper_fd(node, handle, writable=True)
            if wfd is not None:
                os.ftruncate(wfd, size)
            else:
                # No writable handle: open one, by name or (a removed file) by its fd.
                if isinstance(target, int):
                    tfd = os.open(f"/proc/self/fd/{target}", os.O_WRONLY | os.O_CLOEXEC)
                else:
                    tfd = os.open(node.name, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dirfd)
                try:
                    os.ftruncate(tfd, size)
                finally:
                    os.close(tfd)
        nofollow = not isinstance(target, int)  # a path: never follow its last component
        if uid is not None or gid is not None:
            os.chown(target, -1 if uid is None else uid, -1 if gid is None else gid,
                     follow_symlinks=not nofollow)
        if mode is not None:
            if isinstance(target, int):
                os.chmod(target, stat.S_IMODE(mode))
            else:  # by name, which the upper's owner may swap for a symlink at any time
                assert dirfd is not None
                chmod_nofollow(dirfd, node.name, stat.S_IMODE(mode))
        if atime_ns is not None or mtime_ns is not None:
            if atime_ns is None or mtime_ns is None:
                cur = self.stat(node)[0]
                atime_ns = cur.st_atime_ns if atime_ns is None else atime_ns
                mtime_ns = cur.st_mtime_ns if mtime_ns is None else mtime_ns
            os.utime(target, ns=(atime_ns, mtime_ns), follow_symlinks=not nofollow)
            if self.writeback and not node.is_dir:
                node.mtime_pin = (atime_ns, mtime_ns)
        node.attr = None
        node.xnames = None  # chmod rewrites an ACL

    @staticmethod
    def _upper_fd(node: Node, handle: object, writable: bool = False) -> int | None:
        """An fd on the upper file, when one is open: the caller's handle first."""
        for h in (handle, *(node.handles or ())):
            if isinstance(h, Handle) and h.layer == 0 and h.node is node \
                    and (h.writable or not writable):
                return h.fd
        return None

    def setxattr(self, node: Node, name: bytes, value: bytes, flags: int = 0) -> None:
        self._writable()
        if is_internal_xattr(name):
            raise FsError(errno.EPERM)
        self.copy_up(node)
        target, follow = self._xattr_target(node)
        os.setxattr(target, name, value, flags, follow_symlinks=follow)
        node.attr = None
        node.xnames = None

    def removexattr(self, node: Node, name: bytes) -> None:
        self._writable()
        if is_internal_xattr(name):
            raise FsError(errno.ENODATA)
        self.getxattr(node, name)  # ENODATA before any copy-up
        self.copy_up(node)
        target, follow = self._xattr_target(node)
        os.removexattr(target, name, follow_symlinks=follow)
        node.attr = None
        node.xnames = None

    def close(self) -> None:
        for fh in list(self.handles):
            h = self.handles.pop(fh)
            if isinstance(h, Handle):
                try:
                    os.close(h.fd)
                except OSError:
                    pass
        for node in self.table.all_nodes():
            node.close_fds()
        if self.work_fd >= 0:
            os.close(self.work_fd)
            self.work_fd = -1
        self.stack.close()

