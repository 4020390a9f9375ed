"""The union filesystem core: every operation, in terms of nodes, without FUSE.

Operations take and return `Node`s and raise `OSError`/`FsError` carrying an
errno; the FUSE adaptor (`fuseops.py`) is a thin shell that turns inode numbers
into nodes and errors into replies. Tests can drive this class directly.

Writes follow the kernel's overlayfs: copy-up before the first change, a
whiteout where a removed name still exists below, an opaque directory where a
new directory replaces a whiteout, and every change that must be atomic done as
one rename (RENAME_WHITEOUT, RENAME_EXCHANGE, or a rename from the work dir).

Which copy-ups an operation needs is decided here, once (`copyups_for_*`): the
operations run them themselves, and the FUSE adaptor asks first so that it can
run the big data copies in a worker thread. The parts with a concept of their
own live beside this module: node identity and hard-link aliases
(identity.py), the handle table (handles.py), rename (rename.py), copy-up
(copyup.py), name resolution (resolve.py), whiteouts (whiteout.py).
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import weakref
from collections.abc import Callable, Iterator

from .copyup import NO_COPYUPS, Changed, CopyJob, CopyPlan, CopyUp, chown_failed
from .errors import FsError
from .handles import DirHandle, HandleTable
from .identity import Identity
from .inodes import ROOT_ID, UNLINKED, AnyStat, DirNode, InodeTable, Node
from .layers import LayerStack, open_file_at, open_lower_file
from .rename import Renamer, check_rename_flags, needs_materialize
from .resolve import Entry, Resolver
from .syscalls import RENAME_EXCHANGE, chmod_nofollow, fdpath, renameat2, utimens
from .tree import rmtree_at
from .whiteout import (
    OPQ_OCI,
    WH_PREFIX,
    WhiteoutWriter,
    is_whiteout_stat,
    missing_xattr_errno,
    shown_xattr,
    stored_xattr,
)

NAME_MAX = 255
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_TRUNC
_OPEN_KEEP = os.O_SYNC | os.O_DSYNC | os.O_TRUNC
ACL_ACCESS = b"system.posix_acl_access"
NO_XATTRS: frozenset[bytes] = frozenset()  # the xattr names of most objects (`_xattr_names`)


class Ctx:
    """Who asks: the caller's credentials (from the FUSE request)."""

    __slots__ = ("gid", "uid", "umask")

    def __init__(self, uid: int = 0, gid: int = 0, umask: int = 0) -> None:
        self.uid = uid
        self.gid = gid
        self.umask = umask


def check_name(name: bytes) -> None:
    if len(name) > NAME_MAX:
        raise FsError(errno.ENAMETOOLONG)
    if name.startswith(WH_PREFIX):
        raise FsError(errno.EINVAL)


class Union:
    """A mounted stack: lookups, listings, copy-up and every write."""

    def __init__(
        self,
        stack: LayerStack,
        work_fd: int = -1,
        volatile: bool = False,
        writeback: bool = False,
        owners_optional: bool = False,
    ) -> None:
        self.stack = stack
        # A chown the daemon may not make is no error (copyup.chown_failed).
        self.owners_optional = owners_optional
        # With the kernel's writeback cache, the kernel keeps mtime and sends it in
        # a setattr, which can overtake the last data writes it flushes: the mtime
        # it set is re-applied after such writes (`_pins`: a file's (atime, mtime) ns,
        # beside the nodes, not a slot of every one, since only this mode sets it).
        self.writeback = writeback
        self._pins: weakref.WeakKeyDictionary[Node, tuple[int, int]] = weakref.WeakKeyDictionary()
        self.table = InodeTable(list(stack.devs))
        self.resolver = Resolver(stack, self.table)
        self.volatile = volatile
        chain = stack.root_chain()
        root = DirNode(ROOT_ID, None, b"", chain[0], chain)
        root.fds = [stack.fd(i) for i in chain]
        root.nlookup = 1
        self.root = root
        self.table.add(root)
        self.work_fd = work_fd
        # The one notification from the core: see copyup.Changed. The FUSE adaptor
        # sets it to drop (and, for links, invalidate) what it showed the kernel.
        self.changed: Changed = lambda node, links: None
        self.copyup = CopyUp(
            stack,
            self.table,
            self.resolver,
            work_fd,
            lambda node, links: self.changed(node, links),
            owners_optional,
        )
        self.identity = Identity(stack, self.table, self.resolver, self.copyup)
        self.whiteouts = WhiteoutWriter()
        self.handles = HandleTable()
        self._renamer = Renamer(self)
        # Whether the kernel keeps directory listings (the FUSE adaptor says so once INIT
        # is answered, fuseinit.keep_listings): then the daemon keeps none past a pass.
        self.kernel_keeps_listings = False

    # -- nodes -----------------------------------------------------------------
    def node(self, ino: int) -> Node:
        """The node the kernel knows as `ino` (ENOENT if it does not exist)."""
        node = self.table.nodes.get(ino)
        if node is None:
            raise FsError(errno.ENOENT)
        return node

    def peek(self, parent: Node, name: bytes) -> Node | None:
        """The node `name` in `parent` names now, without counting a lookup.

        For the FUSE adaptor, which waits for a copy-up of that node under way
        before it removes or replaces it; hand it back with `release_node`.
        """
        if not parent.is_dir or len(name) > NAME_MAX or name.startswith(WH_PREFIX):
            return None
        entry = self.resolver.resolve(parent, name)
        return self.identity.node_for(parent, name, entry) if entry is not None else None

    def forget(self, ino: int, n: int) -> None:
        """The kernel dropped `n` lookups of `ino`."""
        self.table.forget(ino, n)

    def release_node(self, node: Node) -> None:
        """Let `node` go if nothing holds it (after `peek`)."""
        self.table.release_if_unused(node)

    def unlookup(self, node: Node) -> None:
        """Undo the lookup `readdir` counted for an entry the kernel did not take."""
        node.nlookup -= 1
        self.table.release_if_unused(node)

    # -- reading ---------------------------------------------------------------
    def lookup(self, parent: Node, name: bytes) -> Node | None:
        """Resolve `name`; the returned node has its lookup count raised."""
        found = self.lookup_entry(parent, name)
        return None if found is None else found[0]

    def lookup_entry(self, parent: Node, name: bytes) -> tuple[Node, Entry] | None:
        """`lookup`, with the entry `name` resolved to (its attributes: `attrs`)."""
        check_name(name)
        if not parent.is_dir:
            raise FsError(errno.ENOTDIR)
        entry = self.resolver.resolve(parent, name)
        if entry is None:
            return None
        node = self.identity.node_for(parent, name, entry)
        node.nlookup += 1
        return node, entry

    def attrs(self, node: Node, entry: Entry | None) -> tuple[AnyStat, int]:
        """`stat(node)`, taken from `entry` (what its name resolved to, or its listing's
        entry) where that is the object's own stat: a lower non-directory's, which never
        changes. A reply to a lookup or a listing then costs no stat of its own, and the
        node need not keep one (`Identity.node_for`); one it keeps (`stat`) comes first."""
        if (
            entry is not None
            and not node.is_dir
            and node.layer != 0
            and node.st is None
            and entry.layer == node.layer
        ):
            st = entry.st
            return st, st.st_nlink
        return self.stat(node)

    def stat(self, node: Node) -> tuple[AnyStat, int]:
        """(stat of the object's topmost instance, st_nlink to show)."""
        if node.is_dir:
            if node.chain[0] != 0 and node.st is not None:
                st = node.st
            else:
                st = os.fstat(self.resolver.dirfd(node, 0))
                if node.chain[0] != 0:
                    node.st = st
            return st, (1 if len(node.chain) > 1 else st.st_nlink)
        if node.layer != 0:
            # Kept only once its name is gone (`Identity.dropped`) or the daemon's own reading
            # sets its atime (`Identity.keep_lower_stat`), else read where it lies: the kernel keeps
            # the attributes a lookup or a listing sent (`attrs`), and asks again seldom.
            kept = node.st
            if kept is not None:
                return kept, kept.st_nlink
            loc = self.resolver.location_fd(node)
            st = os.stat(node.name, dir_fd=loc, follow_symlinks=False)
            return st, st.st_nlink
        if node.links is UNLINKED:
            for h in node.handles or ():
                st = os.fstat(h.fd)
                return st, st.st_nlink
            if node.st is not None:
                return node.st, 0
            raise FsError(errno.ENOENT)
        st = os.stat(node.name, dir_fd=self.resolver.location_fd(node), follow_symlinks=False)
        return st, st.st_nlink

    def readlink(self, node: Node) -> bytes:
        if node.is_dir:
            raise FsError(errno.EINVAL)
        loc = self.resolver.location_fd(node)
        self.identity.keep_lower_stat(node, loc)  # reading a symlink sets its atime
        return os.readlink(node.name, dir_fd=loc)

    def opendir(self, node: Node) -> int:
        if not node.is_dir:
            raise FsError(errno.ENOTDIR)
        return self.handles.add_dir(node)

    def dir_handle(self, fh: int) -> DirHandle:
        return self.handles.dir(fh)

    def readdir(
        self, fh: int, off: int, held: bool = False
    ) -> Iterator[tuple[bytes, Node, Entry | None, int, bool]]:
        """Entries from offset `off`: (name, node, its listing's entry (None for `.` and
        `..`), next offset, counted-as-lookup).

        Each entry but `.` and `..` counts as a lookup (readdirplus hands the
        kernel a reference); the caller gives back, with `unlookup`, the one
        the kernel did not take and stops there. With `held`, a lower
        non-directory that the kernel holds under that very name is not counted
        either (`Identity.held`): the caller sends it without attributes, which
        takes no reference.
        """
        dh = self.handles.dir(fh)
        d = dh.node
        if off == 0:
            self.handles.restarted(d)
        if dh.entries is None or off == 0 or dh.entries.stale():
            # Offset 0 again is rewinddir: it shows the directory as it is now, as the
            # kernel's overlayfs does (its cache is dropped when the directory changed).
            dh.entries = self.handles.snapshot(d, self.resolver.listing(d))
        if off == 0:
            yield b".", d, None, 1, False
            off = 1
        if off == 1:
            yield b"..", d.parent or d, None, 2, False
            off = 2
        entries = dh.entries
        offsets = entries.offsets
        node_for = self.identity.node_for
        known = self.identity.held if held else None
        # The directory changed since the snapshot was taken (its listing was dropped:
        # a name made, removed or moved, a copy-up): an entry may be of an object gone
        # from its name, or say where it was before a copy-up, and `node_for` would
        # bring that back there (a removed lower file's node at the name of the file
        # made since, or a copied-up file's lower node once the kernel had forgotten
        # it: the kernel read the old data there, and a write copied it up again over
        # the new; a directory moved away taken back to its old name; a directory
        # replaced by a file, ENOTDIR for the whole pass). Each name is the object it
        # is now, or is left out if it is gone.
        resolve = self.resolver.resolve if entries.listing is not d.listing else None
        for i in range(entries.after(off), len(entries)):
            name, entry = entries[i]
            if resolve is not None:
                now = resolve(d, name)
                if now is None:
                    continue
                entry = now
            if known is not None:
                node = known(d, name, entry)
                if node is not None:
                    yield name, node, entry, offsets[i], False
                    continue
            node = node_for(d, name, entry)
            node.nlookup += 1
            yield name, node, entry, offsets[i], True

    def releasedir(self, fh: int) -> None:
        d = self.handles.close_dir(fh)
        if d is not None and self.kernel_keeps_listings:
            # Its last pass is over, and the kernel keeps what it read (fuseinit.
            # keep_listings): a listing kept here too would be read again only once the
            # kernel drops its own (a change here drops both). Its entries were most of
            # what the daemon held per name: ~170 bytes each, with the listing.
            d.drop_listing()

    def statfs(self) -> os.statvfs_result:
        return os.fstatvfs(self.stack.fd(0 if self.stack.upper is not None else 1))

    def _xattr_target(self, node: Node) -> tuple[int | bytes, bool]:
        """Where to read `node`'s xattrs (by name: reading another object gives nothing)."""
        if node.is_dir:
            return self.resolver.dirfd(node, 0), True
        return fdpath(self.resolver.location_fd(node), node.name), False

    @contextlib.contextmanager
    def _xattr_object(self, node: Node) -> Iterator[int | bytes]:
        """Where to change `node`'s xattrs: the object itself (`_upper_object`), never
        another put at its name (security.capability given to her own program)."""
        if node.is_dir:
            yield self.resolver.dirfd(node, 0)
            return
        with self._upper_object(node) as (fd, _):
            yield fdpath(fd)

    @contextlib.contextmanager
    def _upper_object(self, node: Node) -> Iterator[tuple[int, os.stat_result]]:
        """An O_PATH fd of non-directory `node`'s upper object, found at its name, and
        only if it is that very object; with its stat.

        Whoever can write the upper (root's mount over a user's directory) may rename
        her own file onto that name at any time: root's `chown 0:0 f; chmod 4755 f`
        by name then made it a set-user-ID program of root's. Kernel overlayfs acts on
        the dentry it holds; the daemon acts on the object it checked, through its magic
        link (which reaches a symlink itself too). Another object there is ENOENT:
        the node's own is gone from its name (ESTALE would have the kernel look the
        name up again and retry, on hers)."""
        fd = os.open(
            node.name,
            os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC,
            dir_fd=self.resolver.location_fd(node),
        )
        try:
            st = os.fstat(fd)
            if node.layer == 0 and (
                self.identity.upper_file_id(st) != node.ino
                or not self.table.is_bound_object(node, fd)
            ):
                raise FsError(errno.ENOENT)
            yield fd, st
        finally:
            os.close(fd)

    def _xattr_names(self, node: Node) -> frozenset[bytes]:
        names = node.xnames
        if names is None:
            target, follow = self._xattr_target(node)
            listed = os.listxattr(target, follow_symlinks=follow)
            # Most objects have none: one shared empty set, not ~220 bytes each (10,000
            # files just written held 2.1 MiB of empty sets).
            names = frozenset(n.encode() for n in listed) if listed else NO_XATTRS
            node.xnames = names
        return names

    def has_xattr(self, node: Node, name: bytes) -> bool:
        """Whether `node` has xattr `name`, from the cached list (no syscall).

        The kernel asks for security.capability before every write(2) and exec:
        the FUSE adaptor answers its usual ENODATA from this.
        """
        stored = stored_xattr(name)
        return stored is not None and stored in self._xattr_names(node)

    def getxattr(self, node: Node, name: bytes) -> bytes:
        stored = stored_xattr(name)
        if stored is None or stored not in self._xattr_names(node):
            raise FsError(missing_xattr_errno(name))
        target, follow = self._xattr_target(node)
        return os.getxattr(target, stored, follow_symlinks=follow)

    def listxattr(self, node: Node) -> list[bytes]:
        shown = (shown_xattr(n) for n in self._xattr_names(node))
        return sorted(n for n in shown if n is not None)

    # -- copy-up plans ------------------------------------------------------------
    # The copy-ups an operation needs before it can change a node, decided here
    # once. Each operation runs its own plan (`_copy_ups`); the FUSE adaptor
    # runs it first, big files in a worker thread, so that the operation finds
    # nothing left to copy. A plan is a sequence of (node, with_data) steps; the
    # rename plan is a generator holding its nodes: close it after the rename.
    def needs_copyup(self, node: Node) -> bool:
        """Whether `node` is not in the upper yet (a directory: not even partly)."""
        return (node.chain[0] != 0) if node.is_dir else node.layer != 0

    def copyups_for_open(self, node: Node, flags: int) -> CopyPlan:
        if node.is_dir or not flags & _WRITE_FLAGS:
            return NO_COPYUPS
        self._writable()
        if node.layer == 0:
            return NO_COPYUPS
        return ((node, not flags & os.O_TRUNC),)  # O_TRUNC: no data to copy

    def copyups_for_setattr(
        self, node: Node, *, size: int | None, mode: int | None, uid: int | None, gid: int | None
    ) -> CopyPlan:
        if not self.stack.writable or not self.needs_copyup(node):
            return NO_COPYUPS
        only_trunc0 = size == 0 and mode is None and uid is None and gid is None
        return ((node, not only_trunc0),)

    def copyups_for_link(self, node: Node) -> CopyPlan:
        if node.is_dir or not self.stack.writable or node.layer == 0:
            return NO_COPYUPS
        return ((node, True),)

    def copyups_for_xattr(self, node: Node, name: bytes, remove: bool) -> CopyPlan:
        """Before setxattr/removexattr of `name`; removing a missing one is ENODATA first."""
        if remove:
            self.getxattr(node, name)
        reserved = stored_xattr(name) is None
        if not self.stack.writable or reserved or not self.needs_copyup(node):
            return NO_COPYUPS
        return ((node, True),)

    def copyups_for_rename(self, old_parent: Node, old_name: bytes, flags: int) -> CopyPlan:
        """The source's copy-up; for a directory with lower content, every file below it."""
        check_rename_flags(flags)  # EINVAL before any copy-up
        if not self.stack.writable:
            return NO_COPYUPS
        src = self.peek(old_parent, old_name)
        if src is None:
            return NO_COPYUPS
        return self._rename_plan(src)

    def _rename_plan(self, src: Node) -> Iterator[tuple[Node, bool]]:
        try:
            if not src.is_dir:
                yield src, True
            elif needs_materialize(src):
                yield from self._renamer.walk(src, seal=False)
        finally:
            self.table.release_if_unused(src)

    def _copy_ups(self, plan: CopyPlan) -> None:
        for node, with_data in plan:
            self.copyup.copy_up(node, with_data)

    def copyup_begin(self, node: Node, with_data: bool = True) -> CopyJob | None:
        """Begin one step of a plan (None: nothing left to copy)."""
        self._writable()
        return self.copyup.begin(node, with_data)

    def copy_up(self, node: Node, with_data: bool = True) -> None:
        self._writable()
        self.copyup.copy_up(node, with_data)

    # -- files -------------------------------------------------------------------
    def open(self, node: Node, flags: int, setid: Callable[[], int | None] | None = None) -> int:
        """Open `node`; `setid`: for O_TRUNC, which set-ID bits the caller's truncation
        clears (`_kill_setid`'s `bits`), asked only of a set-ID file; None: the
        daemon's own, which keeps them."""
        if node.is_dir:
            raise FsError(errno.EISDIR)
        writing = bool(flags & _WRITE_FLAGS)
        if writing:
            self._copy_ups(self.copyups_for_open(node, flags))
            acc = flags & os.O_ACCMODE
            keep = flags & _OPEN_KEEP
            pfd = self.resolver.location_fd(node)
            try:
                fd = open_file_at(pfd, node.name, os.O_RDWR | keep)
            except PermissionError:
                fd = open_file_at(pfd, node.name, acc | keep)
            if flags & os.O_TRUNC:
                # The truncation, ours, dropped security.capability: the kernel asks
                # for it right after (to drop it itself) and must hear it is gone.
                node.xnames = None
                if setid is not None:
                    try:
                        self._kill_setid(node, fd, True, setid)
                    except BaseException:
                        os.close(fd)
                        raise
        else:
            pfd = self.resolver.location_fd(node)
            if node.layer == 0:
                fd = open_file_at(pfd, node.name, os.O_RDONLY)
            else:
                fd, st, noatime = open_lower_file(pfd, node.name)
                if not noatime:  # O_NOATIME refused: reading it sets its atime
                    self.identity.keep_lower_stat(node, pfd, st)
        return self.handles.add_file(node, fd, writing)

    def _kill_setid(
        self,
        node: Node,
        target: int | bytes,
        notify: bool,
        bits: int | Callable[[], int | None] | None = None,
    ) -> None:
        """Clear `bits` of a regular file's set-ID bits (`target`: an fd or a path); by
        default set-user-ID, and set-group-ID with group execute: what a truncation by
        a caller without CAP_FSETID clears. A callable `bits` is asked for them only
        when the file has any (it may read /proc).

        The daemon truncates and chowns as root, which keeps them. The kernel leaves
        them to it for open(O_TRUNC) (atomic_o_trunc: it sends no new mode), and for
        writes, truncations and chowns too once INIT said HANDLE_KILLPRIV_V2
        (fuseinit.handle_killpriv, FuseOps.setattr). `notify`: no reply will carry
        the new mode, so the kernel's cached one is stale: `changed` says so.
        """
        mode = os.stat(target).st_mode
        if not mode & (stat.S_ISUID | stat.S_ISGID):
            return
        if callable(bits):
            bits = bits()
        if bits is None:
            bits = stat.S_ISUID | (stat.S_ISGID if mode & stat.S_IXGRP else 0)
        kill = mode & bits & (stat.S_ISUID | stat.S_ISGID)
        if kill and stat.S_ISREG(mode):
            os.chmod(target, stat.S_IMODE(mode) & ~kill)
            node.xnames = None  # a mode change may rewrite an ACL
            if notify:
                self.changed(node, True)

    def read_fd(self, fh: int) -> int:
        """The fd a read of `fh` reads from (EBADF for no such file handle)."""
        return self.handles.file(fh).fd

    def read_into(self, fh: int, off: int, buf: memoryview) -> int:
        """Read handle `fh` at `off` into `buf` (as much as it holds): the number of
        bytes read. The adaptor's READ when libfuse's callback does not answer it
        (`fuseread`, which reads `read_fd`)."""
        return os.preadv(self.handles.file(fh).fd, (buf,), off)

    def write(self, fh: int, off: int, data: bytes) -> int:
        h = self.handles.file(fh)
        if not h.writable:
            raise FsError(errno.EBADF)
        n = os.pwrite(h.fd, data, off)
        if self._pins:
            pin = self._pins.get(h.node)
            if pin is not None:
                os.utime(h.fd, ns=pin)
        return n

    def fsync(self, fh: int, datasync: bool) -> None:
        if self.volatile:
            return
        h = self.handles.file(fh)
        if datasync:
            os.fdatasync(h.fd)
        else:
            os.fsync(h.fd)

    def fsyncdir(self, fh: int) -> None:
        if self.volatile:
            return
        d = self.handles.dir(fh).node
        if d.chain[0] == 0:
            os.fsync(self.resolver.dirfd(d, 0))

    def release(self, fh: int) -> None:
        node = self.handles.close_file(fh)
        if node is not None:
            self.table.release_if_unused(node)

    # -- creating ----------------------------------------------------------------
    def _writable(self) -> None:
        if not self.stack.writable:
            raise FsError(errno.EROFS)

    def upper_whiteout(self, d: Node, pfd: int, name: bytes) -> str | None:
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
        # In an upper-only directory whose listing is not at hand, the name's one stat
        # would tell only what making the object tells as well: EEXIST (no layer below,
        # no whiteout to replace: `upper_whiteout`).
        upper_only = parent.chain == (0,) and parent.listing is None
        if not upper_only and self.resolver.resolve(parent, name) is not None:
            raise FsError(errno.EEXIST)
        pfd = self.copyup.upper_dirfd(parent)
        return pfd, self.upper_whiteout(parent, pfd, name)

    def _owner(self, pfd: int, ctx: Ctx, is_dir: bool, mode: int) -> tuple[int, int, int]:
        """uid, gid and mode of a new object: BSD group semantics under a setgid directory."""
        gid = ctx.gid
        pst = os.fstat(pfd)
        if pst.st_mode & stat.S_ISGID:
            gid = pst.st_gid
            if is_dir:
                mode |= stat.S_ISGID
        return ctx.uid, gid, mode

    def _chown_new(self, st: os.stat_result, uid: int, gid: int, chown: Callable[[], None]) -> bool:
        """Give an object just made (`st`) its owner with `chown()`, unless it has it already:
        the daemon making its own caller's objects (root's, as root: most of them), or a
        group a set-group-ID parent gave it, as asked (`_owner`). Whether it chowned."""
        if st.st_uid == uid and st.st_gid == gid:
            return False
        try:
            chown()
        except OSError as e:
            chown_failed(e, self.owners_optional)
        return True

    def _chown_new_at(self, dfd: int, name: bytes, uid: int, gid: int) -> os.stat_result:
        """`_chown_new` of the object `name` in `dfd`, by name, never followed; its stat
        (as made: its identity and type hold, its owner may have changed since)."""
        st = os.stat(name, dir_fd=dfd, follow_symlinks=False)

        def chown() -> None:
            os.chown(name, uid, gid, dir_fd=dfd, follow_symlinks=False)

        self._chown_new(st, uid, gid, chown)
        return st

    def _place(
        self,
        parent: Node,
        pfd: int,
        name: bytes,
        wh: str | None,
        is_dir: bool,
        make: Callable[[int, bytes], os.stat_result],
    ) -> os.stat_result:
        """Create an object with `make(dirfd, name)`, replacing a whiteout atomically.

        `make` returns the new object's stat; a rename into place keeps its identity
        and type, all that the caller reads of it."""
        if wh == "kernel":
            tmp = self.copyup.tmpname()
            st = make(self.work_fd, tmp)
            try:
                if is_dir:
                    self.whiteouts.set_opaque_at(self.work_fd, tmp)
                    renameat2(self.work_fd, tmp, pfd, name, RENAME_EXCHANGE)
                    os.unlink(tmp, dir_fd=self.work_fd)
                else:
                    os.rename(tmp, name, src_dir_fd=self.work_fd, dst_dir_fd=pfd)
            except BaseException:
                rmtree_at(self.work_fd, tmp)
                raise
        else:
            st = make(pfd, name)
            if wh == "oci":
                if is_dir:
                    self.whiteouts.set_opaque_at(pfd, name)
                os.unlink(WH_PREFIX + name, dir_fd=pfd)
        parent.drop_listing()
        self.handles.name_changed(parent)
        return st

    def create(
        self, parent: Node, name: bytes, mode: int, flags: int, ctx: Ctx
    ) -> tuple[int, Node, tuple[AnyStat, int]]:
        """The new file's handle, its node, and its attributes as `stat` gives them: taken
        from the fd just made, so that the reply costs no stat of its own."""
        pfd, wh = self._prepare_new(parent, name)
        uid, gid, mode = self._owner(pfd, ctx, False, mode & 0o7777)
        fds: list[int] = []

        def make(dfd: int, n: bytes) -> os.stat_result:
            fd = os.open(
                n,
                os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                mode,
                dir_fd=dfd,
            )
            fds.append(fd)
            st = os.fstat(fd)
            changed = self._chown_new(st, uid, gid, lambda: os.fchown(fd, uid, gid))
            if mode & (stat.S_ISUID | stat.S_ISGID):
                os.fchmod(fd, mode)
                changed = True
            return os.fstat(fd) if changed else st

        try:
            st = self._place(parent, pfd, name, wh, False, make)
            if wh == "kernel":  # renamed into place since: a new ctime
                st = os.fstat(fds[0])
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise
        node = self.identity.new_upper_node(parent, name, st, fds[0])
        return self.handles.add_file(node, fds[0], True), node, (st, st.st_nlink)

    def mkdir(self, parent: Node, name: bytes, mode: int, ctx: Ctx) -> Node:
        pfd, wh = self._prepare_new(parent, name)
        uid, gid, mode = self._owner(pfd, ctx, True, mode & 0o7777)

        def make(dfd: int, n: bytes) -> os.stat_result:
            os.mkdir(n, mode, dir_fd=dfd)
            st = self._chown_new_at(dfd, n, uid, gid)
            if mode & (stat.S_ISUID | stat.S_ISGID | stat.S_ISVTX):
                chmod_nofollow(dfd, n, mode)
            return st

        st = self._place(parent, pfd, name, wh, True, make)
        return self.identity.new_upper_node(parent, name, st)

    def mknod(self, parent: Node, name: bytes, mode: int, rdev: int, ctx: Ctx) -> Node:
        if stat.S_ISCHR(mode) and rdev == 0:
            # A whiteout: it would hide the lower name and stay stuck in the upper
            # (missing from ls, ENOENT for rm). Kernel overlayfs refuses it too.
            raise FsError(errno.EPERM)
        pfd, wh = self._prepare_new(parent, name)
        uid, gid, _ = self._owner(pfd, ctx, False, 0)

        def make(dfd: int, n: bytes) -> os.stat_result:
            os.mknod(n, mode, rdev, dir_fd=dfd)
            st = self._chown_new_at(dfd, n, uid, gid)
            if mode & (stat.S_ISUID | stat.S_ISGID):
                chmod_nofollow(dfd, n, mode & 0o7777)
            return st

        st = self._place(parent, pfd, name, wh, False, make)
        return self.identity.new_upper_node(parent, name, st)

    def symlink(self, parent: Node, name: bytes, target: bytes, ctx: Ctx) -> Node:
        pfd, wh = self._prepare_new(parent, name)
        uid, gid, _ = self._owner(pfd, ctx, False, 0)

        def make(dfd: int, n: bytes) -> os.stat_result:
            os.symlink(target, n, dir_fd=dfd)
            return self._chown_new_at(dfd, n, uid, gid)

        st = self._place(parent, pfd, name, wh, False, make)
        return self.identity.new_upper_node(parent, name, st)

    def link(self, node: Node, parent: Node, name: bytes) -> Node:
        if node.is_dir:
            raise FsError(errno.EPERM)
        pfd, wh = self._prepare_new(parent, name)
        self._copy_ups(self.copyups_for_link(node))
        src_fd = self.resolver.location_fd(node)

        def make(dfd: int, n: bytes) -> os.stat_result:
            os.link(node.name, n, src_dir_fd=src_fd, dst_dir_fd=dfd, follow_symlinks=False)
            return os.stat(n, dir_fd=dfd, follow_symlinks=False)

        self._place(parent, pfd, name, wh, False, make)
        node.add_link(parent, name)
        node.nlookup += 1
        return node

    # -- removing ----------------------------------------------------------------
    def lower_has(self, parent: Node, name: bytes) -> bool:
        """Whether a layer below the upper still shows `name` in `parent`."""
        if parent.chain[0] != 0:
            return self.resolver.resolve(parent, name) is not None
        return len(parent.chain) > 1 and self.resolver.resolve(parent, name, start=1) is not None

    def _lower_has_entry(self, parent: Node, name: bytes, entry: Entry) -> bool:
        """`lower_has` of a name just resolved to `entry`: no lookup when the entry itself
        lies in a lower layer, wholly or merged (the upper held nothing that hid it)."""
        if entry.layer != 0 or any(entry.chain[1:]):
            return True
        return self.lower_has(parent, name)

    def _remove_upper(self, pfd: int, name: bytes, whiteout: bool, is_dir: bool) -> None:
        """Remove an upper entry, leaving a whiteout in its place if asked, atomically."""
        if not whiteout:
            if is_dir:
                rmtree_at(pfd, name)
            else:
                os.unlink(name, dir_fd=pfd)
            return
        tmp = self.copyup.tmpname()
        self.whiteouts.rename_leaving_whiteout(pfd, name, self.work_fd, tmp)
        rmtree_at(self.work_fd, tmp)

    def existing(self, parent: Node, name: bytes) -> tuple[Entry, Node]:
        """The entry and node of `name`, which must exist (ENOENT)."""
        check_name(name)
        entry = self.resolver.resolve(parent, name)
        if entry is None:
            raise FsError(errno.ENOENT)
        return entry, self.identity.node_for(parent, name, entry)

    def unlink(self, parent: Node, name: bytes) -> None:
        self._writable()
        # Without a cached listing, resolving the name stats it: that stat is current.
        fresh = parent.listing is None
        entry, node = self.existing(parent, name)
        if node.is_dir:
            raise FsError(errno.EISDIR)
        whiteout = self._lower_has_entry(parent, name, entry)
        pfd = self.copyup.upper_dirfd(parent)
        st: AnyStat | None = None
        if entry.layer == 0:
            # What a stat of the removed file shows (`stat`, unlinked and not open), and
            # its link count for `Identity.dropped`.
            st = entry.st if fresh else os.stat(name, dir_fd=pfd, follow_symlinks=False)
            node.st = st
            self._remove_upper(pfd, name, whiteout, False)
        else:
            self.whiteouts.make_whiteout(pfd, name)
        parent.drop_listing()
        self.handles.name_changed(parent)
        self.identity.dropped(node, parent, name, st)
        self.table.release_if_unused(node)

    def check_empty(self, d: Node) -> None:
        if self.resolver.listing(d):
            raise FsError(errno.ENOTEMPTY)

    def clean_upper_dir(self, fd: int) -> None:
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
        entry, node = self.existing(parent, name)
        if not node.is_dir:
            raise FsError(errno.ENOTDIR)
        self.check_empty(node)
        whiteout = self._lower_has_entry(parent, name, entry)
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
                self.clean_upper_dir(ufd)
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(OPQ_OCI, dir_fd=ufd)
                os.rmdir(name, dir_fd=pfd)
        else:
            self.whiteouts.make_whiteout(pfd, name)
        parent.drop_listing()
        self.handles.name_changed(parent)
        self.identity.dropped(node, parent, name, st)
        self.table.release_if_unused(node)

    # -- rename ------------------------------------------------------------------
    def rename(
        self, old_parent: Node, old_name: bytes, new_parent: Node, new_name: bytes, flags: int = 0
    ) -> None:
        check_rename_flags(flags)
        self._writable()
        check_name(new_name)
        self._renamer.rename(old_parent, old_name, new_parent, new_name, flags)

    def materialize_dir(self, d: Node) -> None:
        """Copy a directory's merged subtree into the upper, opaque (see rename.py)."""
        self._renamer.materialize(d)

    # -- attributes --------------------------------------------------------------
    def setattr(
        self,
        node: Node,
        *,
        mode: int | None = None,
        uid: int | None = None,
        gid: int | None = None,
        size: int | None = None,
        atime_ns: int | None = None,
        mtime_ns: int | None = None,
        fh: int | None = None,
        kill_setid: int = 0,
    ) -> None:
        """`kill_setid`: the set-ID bits to clear after a truncation or a chown (or
        alone), as the kernel would have by a new mode (HANDLE_KILLPRIV_V2)."""
        self._writable()
        handle = self.handles.get(fh) if fh is not None else None
        self._copy_ups(self.copyups_for_setattr(node, size=size, mode=mode, uid=uid, gid=gid))
        with contextlib.ExitStack() as stack:
            target: int | bytes
            is_link = False
            if node.is_dir:
                target = self.resolver.dirfd(node, 0)
                if size is not None:
                    raise FsError(errno.EISDIR)
            else:
                fd = self.handles.upper_fd(node, handle)
                if fd is not None:
                    target = fd  # also right for a removed file still open
                elif node.links is UNLINKED:
                    # A removed file nobody has open: the kernel flushing its times on
                    # eviction (writeback cache). Nothing is left to change.
                    return
                else:  # the object itself, a symlink too, through its magic link
                    ofd, ost = stack.enter_context(self._upper_object(node))
                    kind = stat.S_IFMT(ost.st_mode)
                    if size is not None and kind != stat.S_IFREG:
                        # the kernel sends a size for a regular file only: hers, put at
                        # the name (its inode number reused), is a FIFO or the like
                        raise FsError(errno.EINVAL)
                    is_link = kind == stat.S_IFLNK
                    target = fdpath(ofd)
            if size is not None:
                wfd = self.handles.upper_fd(node, handle, writable=True)
                if wfd is not None:
                    os.ftruncate(wfd, size)
                else:  # no writable handle: one opened through the object's fd
                    path = fdpath(target) if isinstance(target, int) else target
                    # never waiting, whatever the object (checked above)
                    tfd = os.open(path, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
                    try:
                        os.ftruncate(tfd, size)
                    finally:
                        os.close(tfd)
            if uid is not None or gid is not None:
                try:
                    os.chown(target, -1 if uid is None else uid, -1 if gid is None else gid)
                except OSError as e:
                    chown_failed(e, self.owners_optional)
            if kill_setid and not node.is_dir and not is_link:
                self._kill_setid(node, target, False, kill_setid)  # the reply has the mode
            if mode is not None and not is_link:  # a symlink's mode cannot change
                os.chmod(target, stat.S_IMODE(mode))
            if atime_ns is not None or mtime_ns is not None:
                pin = self.writeback and not node.is_dir
                if pin and (atime_ns is None or mtime_ns is None):
                    # the pin re-applies both times: the one not given is read first
                    cur = self.stat(node)[0]
                    atime_ns = cur.st_atime_ns if atime_ns is None else atime_ns
                    mtime_ns = cur.st_mtime_ns if mtime_ns is None else mtime_ns
                utimens(target, atime_ns, mtime_ns)  # one not given: left as it is
                if pin and atime_ns is not None and mtime_ns is not None:
                    self._pins[node] = (atime_ns, mtime_ns)
        if mode is not None or uid is not None or gid is not None or size is not None:
            # chmod rewrites an ACL; a chown or a truncation drops security.capability.
            # Times alone change no xattr.
            node.xnames = None

    def setxattr(
        self, node: Node, name: bytes, value: bytes, flags: int = 0, kill_sgid: bool = False
    ) -> None:
        """`kill_sgid`: the caller may not keep the set-group-ID bit (outside the file's
        group, without CAP_FSETID), which setting an access ACL then clears."""
        self._writable()
        stored = stored_xattr(name)
        if stored is None:
            raise FsError(errno.EPERM)
        self._copy_ups(self.copyups_for_xattr(node, name, remove=False))
        with self._xattr_object(node) as target:
            os.setxattr(target, stored, value, flags)
        node.xnames = None
        if kill_sgid and name == ACL_ACCESS:
            self._kill_sgid_acl(node)

    def _kill_sgid_acl(self, node: Node) -> None:
        """Clear set-group-ID after an access ACL was set, as the kernel does for a caller
        outside the group (posix_acl_update_mode). The daemon set the ACL as root, so
        the upper's filesystem kept the bit; the FUSE kernel would ask for this with
        FUSE_SETXATTR_ACL_KILL_SGID, which needs setxattr_ext that pyfuse3 3.5 lacks."""
        if node.is_dir:
            fd = os.dup(self.resolver.dirfd(node, 0))
        else:
            fd = os.open(
                node.name,
                os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC,
                dir_fd=self.resolver.location_fd(node),
            )
        try:
            st = os.fstat(fd)
            if st.st_mode & stat.S_ISGID and not stat.S_ISLNK(st.st_mode):
                os.chmod(fdpath(fd), stat.S_IMODE(st.st_mode) & ~stat.S_ISGID)
                node.xnames = None  # a mode change may rewrite an ACL
                self.changed(node, True)
        finally:
            os.close(fd)

    def removexattr(self, node: Node, name: bytes) -> None:
        self._writable()
        stored = stored_xattr(name)
        if stored is None:
            raise FsError(missing_xattr_errno(name))
        self._copy_ups(self.copyups_for_xattr(node, name, remove=True))  # ENODATA first
        with self._xattr_object(node) as target:
            os.removexattr(target, stored)
        node.xnames = None

    def close(self) -> None:
        """Close every handle and layer: the daemon holds nothing of the layers after this."""
        self.handles.close_all()
        for node in self.table.all_nodes():
            node.close_fds()
        if self.work_fd >= 0:
            os.close(self.work_fd)
            self.work_fd = -1
        self.stack.close()
