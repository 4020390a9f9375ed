"""The FUSE adaptor: pyfuse3 requests in, `Union` calls out.

Thin on purpose. It turns inode numbers into nodes, errors into FUSE replies
(the only place that happens: an OSError becomes its errno, anything else is
logged and becomes EIO, so no request can crash the daemon), decides what the
kernel may cache (`_attr`), and runs the copy-ups the core says an operation
needs before calling it (`_copy_ups`), the big data copies in a worker thread.
It makes no union decision of its own.

Cache policy, and why it is safe: every change to the merged tree goes through
this daemon, and the kernel keeps its own dentry and attribute caches coherent
across the operations it sends us (it invalidates a parent's attributes after
create/unlink/rename, a file's after write and setattr). Lower layers never
change while mounted. So entries, negative entries and attributes are given
long timeouts, and file data keeps the page cache across opens (`keep_cache`).
Attributes are built for each reply and kept nowhere: a listing read again
(readdirplus) gives the names whose node the kernel holds without them
(`BareEntry`), and the kernel keeps those it has. When the daemon changes an
object on its own (a hard link's other names linked up by a copy-up:
`Union.changed`), the kernel's copy is invalidated. The one slow
operation, the data copy of a large copy-up, runs in a worker thread; other
requests on the same node wait for it, the rest go on.

Owners: fuse-overlayfs' owner options (`uidmapping=`, `squash_to_*`,
`static_nlink`; idmap.py) are applied by `MappedFuseOps`, chosen at mount
time (`make_ops`), in the four places owners cross the adaptor: the
attributes it builds (`_attr`, which every reply with attributes uses),
the caller's IDs (`_caller`), setattr's new owner, and the IDs inside POSIX
ACL xattrs. The plain `FuseOps` never looks at a map, and the core never
knows one exists.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import logging
import mmap
import os
import stat
import sys
import time
from collections.abc import Awaitable, Callable, Generator
from typing import Any, TypeVar

import pyfuse3
import trio

from . import fuseinit, fuseread, procfs
from .copyup import CopyPlan
from .errors import FsError
from .idmap import ACL_XATTRS, IdMap
from .inodes import AnyStat, Node, stat_fields
from .union import ACL_ACCESS, Ctx, Union
from .whiteout import missing_xattr_errno

log = logging.getLogger(__name__)

TIMEOUT = 86400.0
THREAD_COPY_MIN = 1 << 20  # copy-ups of more bytes than this run in a worker thread
# The read buffer's pages go back at most this often (s): each time costs the next reads
# the faults of the pages they write (~0.2 ms a MiB).
READ_BUF_BACK_S = 1.0

F = TypeVar("F", bound=Callable[..., Awaitable[Any]])


class BareEntry:
    """Readdirplus entries without attributes, for names whose node the kernel holds.

    An entry whose node id is 0 is only a name, an inode number and a type to
    the kernel (fs/fuse/readdir.c, `fuse_direntplus_link`: "zero nodeid ...
    only means the userspace filesystem did not want to return
    attributes/handle for this entry"): it takes no reference and keeps the
    attributes it has (given for a day, `TIMEOUT`). So a listing read again
    (every `find`, `tar`, `ls -R`) costs no attributes for what the kernel
    already knows, where the daemon kept every lower object's attributes built
    (~210 bytes each, 2.4 MiB for the benchmark's image) to send them again.

    pyfuse3 sets the node id and the entry's inode number together (`st_ino`);
    the node id alone is cleared in the object, at the offset its layout gives
    (`fuse_entry_param` right after the object's header), checked once with a
    probe value: `make` returns None if this pyfuse3 lays it out otherwise, and
    every entry then carries its attributes.
    """

    _OFFSET = 16  # of struct fuse_entry_param in an EntryAttributes: after refcount and type
    _PROBE = 0x5A3C_1F2E_4B6D_7081

    def __init__(self, attr: pyfuse3.EntryAttributes, nodeid: ctypes.c_uint64) -> None:
        self._attr = attr  # one object for every entry: readdir_reply copies it
        self._nodeid = nodeid

    @classmethod
    def make(cls) -> BareEntry | None:
        a = pyfuse3.EntryAttributes()
        if sys.getsizeof(a) < cls._OFFSET + 32:  # not even the fields probed
            return None
        a.st_ino = cls._PROBE
        base = id(a) + cls._OFFSET
        # fuse_entry_param: ino, generation, then struct stat: st_dev, st_ino.
        nodeid = ctypes.c_uint64.from_address(base)
        if (
            nodeid.value != cls._PROBE
            or ctypes.c_uint64.from_address(base + 24).value != cls._PROBE
        ):
            log.warning(
                "pyfuse3's EntryAttributes layout is not the one known: listings send attributes"
            )
            return None
        nodeid.value = 0
        if a.st_ino != 0:
            return None
        return cls(a, nodeid)

    def entry(self, ino: int, mode: int) -> pyfuse3.EntryAttributes:
        """The entry of node `ino` (its inode number) of type `mode`, without attributes."""
        a = self._attr
        a.st_ino = ino
        self._nodeid.value = 0
        a.st_mode = mode
        return a


def _fuse_errors(fn: F) -> F:
    """Every handler: OSError -> its errno; a bug -> logged, EIO; never a crash."""

    @functools.wraps(fn)
    async def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return await fn(*args, **kwargs)
        except pyfuse3.FUSEError:
            raise
        except OSError as e:
            raise pyfuse3.FUSEError(e.errno or errno.EIO) from None
        except Exception:
            log.exception("internal error in %s", fn.__name__)
            raise pyfuse3.FUSEError(errno.EIO) from None
        finally:
            # Between requests: directory fds past the bound can be closed (resolve.py).
            args[0].core.resolver.trim()

    return wrapper  # type: ignore[return-value]


_CAP_FSETID = 1 << 4  # linux/capability.h
_INIT_USER_NS = 0xEFFFFFFD  # PROC_USER_INIT_INO: the host's user namespace, its inode on nsfs


def _fsetid(ctx: Any) -> bool:
    """Whether the caller may keep set-ID bits: CAP_FSETID as the kernel's capable()
    asks, in its effective set and in the host's user namespace (a container's root, or
    root whose bounding set lacks it, does not hold it: uid 0 alone says nothing).

    The request carries ids only, so /proc/PID is read; its fs uid there must be the
    request's (a /proc of another pid namespace, a caller gone: no), and any doubt
    answers no, so that the bits go: the safe side. Root only: a user with the
    capability (a file capability) loses the bits, where the kernel would keep them.
    """
    if ctx is None:  # the daemon's own
        return True
    if ctx.uid != 0:
        return False
    try:
        if os.stat(f"/proc/{ctx.pid}/ns/user").st_ino != _INIT_USER_NS:
            return False
        fields = procfs.status(ctx.pid, (b"Uid", b"CapEff"))
        fsuid = int(fields[b"Uid"].split()[3])
        caps = int(fields[b"CapEff"], 16)
    except (OSError, ValueError, IndexError, KeyError):
        return False
    return fsuid == ctx.uid and bool(caps & _CAP_FSETID)


def _in_group(ctx: Any, gid: int) -> bool:
    """Whether the caller is in group `gid`: its own, or one of its supplementary
    groups (the request has none: they are read from /proc, as the kernel sees them)."""
    if ctx.gid == gid:
        return True
    try:
        groups = procfs.status(ctx.pid, (b"Groups",)).get(b"Groups", b"")
    except OSError:  # the caller is gone: nobody to keep the bit for
        return False
    return str(gid).encode() in groups.split()


def _ctx(ctx: Any) -> Ctx:
    return Ctx(ctx.uid, ctx.gid, getattr(ctx, "umask", 0))


class FuseOps(pyfuse3.Operations):
    supports_dot_lookup = False
    enable_writeback_cache = False
    enable_acl = True

    _caller = staticmethod(_ctx)  # who asks, as the core sees them (MappedFuseOps shifts it)

    def __init__(self, core: Union, debug: bool = False, killpriv: bool = True) -> None:
        super().__init__()
        self.core = core
        # Read by pyfuse3.init(). The kernel then gathers small writes into big
        # ones and keeps size and mtime itself; we open every writable file
        # O_RDWR without O_APPEND, as that mode needs (see Union.open).
        self.enable_writeback_cache = core.writeback
        self._copying: dict[int, trio.Event] = {}
        self._bare = BareEntry.make()
        self._generations = core.table.generations  # see InodeTable.replace
        # See read: an anonymous map as big as the largest read, whose pages are given
        # back whenever the mount has no handle open (`_idle`).
        self._read_map: mmap.mmap | None = None
        self._read_buf = memoryview(b"")
        self._read_dirty = False  # read into since its pages were last given back
        self._read_back = -READ_BUF_BACK_S  # when they were (time.monotonic)
        # Run once the kernel's INIT is answered (mount.py: the readahead window).
        self.after_init: Callable[[], None] | None = None
        self.fast_reads: fuseread.FastReads | None = None  # READ's own handler, once INIT set it
        # Answer INIT with HANDLE_KILLPRIV_V2 (fuseinit.handle_killpriv); off: -o killpriv=0.
        self.killpriv = killpriv
        core.changed = self._changed
        self._debug = debug
        if debug:
            self._wrap_debug()

    def _wrap_debug(self) -> None:
        for name in (
            "lookup",
            "getattr",
            "setattr",
            "readlink",
            "mknod",
            "mkdir",
            "unlink",
            "rmdir",
            "symlink",
            "rename",
            "link",
            "open",
            "read",
            "write",
            "flush",
            "release",
            "fsync",
            "opendir",
            "readdir",
            "releasedir",
            "fsyncdir",
            "statfs",
            "setxattr",
            "getxattr",
            "listxattr",
            "removexattr",
            "access",
            "create",
            "forget",
        ):
            fn = getattr(self, name)

            async def logged(*args: Any, _fn: Any = fn, _name: str = name) -> Any:
                shown = [
                    a
                    if not isinstance(a, (bytes, bytearray)) or len(a) < 64
                    else f"<{len(a)} bytes>"
                    for a in args
                    if not isinstance(a, (pyfuse3.RequestContext, pyfuse3.ReaddirToken))
                ]
                try:
                    result = await _fn(*args)
                except pyfuse3.FUSEError as e:
                    log.debug(
                        "%s%r -> %s", _name, tuple(shown), errno.errorcode.get(e.errno, e.errno)
                    )
                    raise
                attr = result[1] if isinstance(result, tuple) else result
                if isinstance(attr, pyfuse3.EntryAttributes):
                    log.debug(
                        "%s%r -> ino %d mode %o size %d",
                        _name,
                        tuple(shown),
                        attr.st_ino,
                        attr.st_mode,
                        attr.st_size,
                    )
                else:
                    log.debug("%s%r -> ok", _name, tuple(shown))
                return result

            setattr(self, name, logged)

    def init(self) -> None:
        """pyfuse3: INIT is being answered. `after_init` runs once the answer is sent:
        pyfuse3 calls this within the request's processing, which writes the answer
        before the loop's task yields, and trio runs the callback only then. Until
        then the answer can still ask for what pyfuse3 does not (`fuseinit`)."""
        why = fuseinit.want(pyfuse3.__file__ or "", fuseinit.FUSE_CAP_CACHE_SYMLINKS)
        if why is None:
            log.debug("INIT: the kernel keeps symlinks' targets (FUSE_CACHE_SYMLINKS)")
        else:  # slower, not wrong: said once, and the tests read it in the debug log
            level = logging.DEBUG if why == fuseinit.NOT_OFFERED else logging.WARNING
            log.log(level, "INIT: symlinks' targets not cached by the kernel: %s", why)
        why = fuseinit.keep_listings(pyfuse3.__file__ or "")
        if why is None:
            self.core.kernel_keeps_listings = True
            log.debug("INIT: the kernel keeps directory listings (FOPEN_CACHE_DIR)")
        else:
            log.warning("INIT: directory listings not kept by the kernel: %s", why)
        reads = fuseread.install(
            pyfuse3.__file__ or "", self.core.read_fd, self._read_buffer, self._debug
        )
        if isinstance(reads, str):
            log.warning("INIT: reads answered by pyfuse3, not spliced: %s", reads)
        else:
            log.debug(
                "INIT: reads answered in libfuse's callback, spliced up to %d bytes",
                reads.splice_max,
            )
            self.fast_reads = reads
        if self.killpriv:
            why = fuseinit.handle_killpriv(pyfuse3.__file__ or "")
            if why is None:
                log.debug("INIT: asking for HANDLE_KILLPRIV_V2 (set-ID bits cleared here)")
            else:
                level = logging.DEBUG if why == fuseinit.NOT_OFFERED else logging.WARNING
                log.log(level, "INIT: set-ID bits left to the kernel: %s", why)
        after = self.after_init
        if after is None:
            return

        def run() -> None:
            try:
                after()
            except Exception:  # an exception here would end trio's run, and the mount
                log.exception("internal error after INIT")

        trio.lowlevel.current_trio_token().run_sync_soon(run)

    # -- attributes ------------------------------------------------------------
    def _attr(
        self, node: Node, attrs: tuple[AnyStat, int] | None = None
    ) -> pyfuse3.EntryAttributes:
        """The reply's attributes of `node`: `Union.stat`'s, or `attrs` that an operation
        returned in its place (create: of the fd it made)."""
        st, nlink = self.core.stat(node) if attrs is None else attrs
        a = pyfuse3.EntryAttributes()
        a.st_ino = node.ino
        # Every entry reply's (lookup, create, mknod, mkdir, symlink, link, readdirplus
        # with attributes); a bare entry has no node id, and the kernel reads none.
        a.generation = self._generations.get(node.ino, 0)
        a.entry_timeout = TIMEOUT
        a.attr_timeout = TIMEOUT
        mode, _, _, _, uid, gid, size, atime, mtime, ctime, blksize, blocks, rdev = stat_fields(st)
        a.st_mode = mode
        a.st_nlink = nlink
        a.st_uid = uid
        a.st_gid = gid
        a.st_rdev = rdev
        a.st_size = size
        a.st_blksize = blksize
        a.st_blocks = blocks
        a.st_atime_ns = atime
        a.st_mtime_ns = mtime
        a.st_ctime_ns = ctime
        return a

    def _changed(self, node: Node, links: bool) -> None:
        """The core's notification: `node` was copied up, or (`links`) linked by the daemon."""
        if links:  # the kernel's st_nlink of the inode is stale (a directory's listing too)
            # OSError: the kernel does not know the inode (ENOENT): nothing cached.
            with contextlib.suppress(OSError):
                pyfuse3.invalidate_inode(node.ino, attr_only=not node.is_dir)

    # -- copy-up off the event loop ----------------------------------------------
    async def _settle(self, node: Node | None) -> None:
        """Wait until no copy-up of `node` is under way."""
        while node is not None and node.ino in self._copying:
            await self._copying[node.ino].wait()

    async def _copy_ups(self, plan: CopyPlan) -> None:
        """Run the copy-ups the core planned, the big data copies in a worker thread."""
        core = self.core
        for node, with_data in plan:
            await self._settle(node)
            job = core.copyup_begin(node, with_data)
            if job is None:
                continue
            if job.size < THREAD_COPY_MIN:
                job.run()
                continue
            done = trio.Event()
            self._copying[node.ino] = done
            try:
                try:
                    await trio.to_thread.run_sync(job.copy_data, abandon_on_cancel=False)
                except BaseException:
                    job.abort()
                    raise
                job.finish()
            finally:
                del self._copying[node.ino]
                done.set()

    # -- requests ----------------------------------------------------------------
    @_fuse_errors
    async def lookup(
        self, parent_inode: int, name: bytes, ctx: Any = None
    ) -> pyfuse3.EntryAttributes:
        core = self.core
        found = core.lookup_entry(core.node(parent_inode), name)
        if found is None:
            a = pyfuse3.EntryAttributes()
            a.st_ino = 0
            a.entry_timeout = TIMEOUT
            return a
        node, entry = found
        return self._attr(node, core.attrs(node, entry))

    async def forget(self, inode_list: Any) -> None:
        forget = self.core.forget
        try:
            for ino, n in inode_list:
                forget(ino, n)
        except Exception:  # forget has no reply: never let it end the main loop
            log.exception("internal error in forget")

    @_fuse_errors
    async def getattr(self, inode: int, ctx: Any = None) -> pyfuse3.EntryAttributes:
        return self._attr(self.core.node(inode))

    @_fuse_errors
    async def setattr(
        self, inode: int, attr: Any, fields: Any, fh: int | None, ctx: Any
    ) -> pyfuse3.EntryAttributes:
        valid = fuseinit.setattr_valid(inode)  # HANDLE_KILLPRIV_V2, read before any await
        core = self.core
        node = core.node(inode)
        size = attr.st_size if fields.update_size else None
        mode = attr.st_mode if fields.update_mode else None
        uid = attr.st_uid if fields.update_uid else None
        gid = attr.st_gid if fields.update_gid else None
        kill = 0
        if valid is not None and (not valid or valid & fuseinit.FATTR_KILL_SUIDGID):
            # Set-ID bits are ours to clear (HANDLE_KILLPRIV_V2). The kernel's flag on a
            # truncation says the caller lacks CAP_FSETID; on a chown it is always set.
            kill = self._setid_to_kill(node, ctx, valid, size is None)
        plan = core.copyups_for_setattr(node, size=size, mode=mode, uid=uid, gid=gid)
        if plan:
            await self._copy_ups(plan)
        core.setattr(
            node,
            mode=mode,
            uid=uid,
            gid=gid,
            size=size,
            atime_ns=attr.st_atime_ns if fields.update_atime else None,
            mtime_ns=attr.st_mtime_ns if fields.update_mtime else None,
            fh=fh,
            kill_setid=kill,
        )
        return self._attr(node)

    def _setid_to_kill(self, node: Node, ctx: Any, valid: int, fsetid: bool) -> int:
        """The set-ID bits a SETATTR clears under HANDLE_KILLPRIV_V2, as the kernel's
        VFS would have (setattr_should_drop_suidgid): set-user-ID, and set-group-ID
        with group execute, or without it for a caller outside the file's group
        without CAP_FSETID (`fsetid`: the caller may hold it; then `_fsetid` says).

        A SETATTR with nothing to set (`valid` 0) is the kernel's own clearing before
        a write by a caller without CAP_FSETID, or a chown(-1, -1). The kernel sent no
        mode for it, and so checked no ownership, which that mode needs on overlayfs:
        a caller who neither owns the file nor may write it gets overlayfs' EPERM;
        one who may write it is taken for a writer (docs/semantics.md: Limits that
        come from FUSE).
        """
        a = self._attr(node)  # owners as the caller sees them
        m = a.st_mode
        if not stat.S_ISREG(m) or not m & (stat.S_ISUID | stat.S_ISGID):
            return 0
        if ctx is None:  # not a caller's: the daemon's own
            return 0
        uid = ctx.uid
        kill = m & stat.S_ISUID
        if m & stat.S_IXGRP or (not _in_group(ctx, a.st_gid) and not (fsetid and _fsetid(ctx))):
            kill |= m & stat.S_ISGID
        if kill and not valid and uid not in (0, a.st_uid):
            may_write = stat.S_IWGRP if _in_group(ctx, a.st_gid) else stat.S_IWOTH
            if not m & may_write:
                raise FsError(errno.EPERM)
        return kill

    @_fuse_errors
    async def readlink(self, inode: int, ctx: Any = None) -> bytes:
        return self.core.readlink(self.core.node(inode))

    @_fuse_errors
    async def mknod(
        self, parent_inode: int, name: bytes, mode: int, rdev: int, ctx: Any
    ) -> pyfuse3.EntryAttributes:
        return self._attr(
            self.core.mknod(self.core.node(parent_inode), name, mode, rdev, self._caller(ctx))
        )

    @_fuse_errors
    async def mkdir(
        self, parent_inode: int, name: bytes, mode: int, ctx: Any
    ) -> pyfuse3.EntryAttributes:
        return self._attr(
            self.core.mkdir(self.core.node(parent_inode), name, mode, self._caller(ctx))
        )

    async def _settle_name(self, parent: Node, name: bytes) -> None:
        """Wait for a copy-up under way of what `name` in `parent` names."""
        if self._copying:
            node = self.core.peek(parent, name)
            if node is not None:
                try:
                    await self._settle(node)
                finally:
                    self.core.release_node(node)

    @_fuse_errors
    async def unlink(self, parent_inode: int, name: bytes, ctx: Any = None) -> None:
        parent = self.core.node(parent_inode)
        await self._settle_name(parent, name)
        self.core.unlink(parent, name)

    @_fuse_errors
    async def rmdir(self, parent_inode: int, name: bytes, ctx: Any = None) -> None:
        self.core.rmdir(self.core.node(parent_inode), name)

    @_fuse_errors
    async def symlink(
        self, parent_inode: int, name: bytes, target: bytes, ctx: Any
    ) -> pyfuse3.EntryAttributes:
        return self._attr(
            self.core.symlink(self.core.node(parent_inode), name, target, self._caller(ctx))
        )

    @_fuse_errors
    async def rename(
        self,
        parent_inode_old: int,
        name_old: bytes,
        parent_inode_new: int,
        name_new: bytes,
        flags: int,
        ctx: Any = None,
    ) -> None:
        core = self.core
        old_parent = core.node(parent_inode_old)
        new_parent = core.node(parent_inode_new)
        plan = core.copyups_for_rename(old_parent, name_old, flags)
        try:
            await self._copy_ups(plan)
            await self._settle_name(new_parent, name_new)
            core.rename(old_parent, name_old, new_parent, name_new, flags)
        finally:
            if isinstance(plan, Generator):
                plan.close()  # lets go of the nodes it held

    @_fuse_errors
    async def link(
        self, inode: int, new_parent_inode: int, new_name: bytes, ctx: Any = None
    ) -> pyfuse3.EntryAttributes:
        node = self.core.node(inode)
        plan = self.core.copyups_for_link(node)
        if plan:
            await self._copy_ups(plan)
        return self._attr(self.core.link(node, self.core.node(new_parent_inode), new_name))

    @_fuse_errors
    async def open(self, inode: int, flags: int, ctx: Any = None) -> pyfuse3.FileInfo:
        node = self.core.node(inode)
        plan = self.core.copyups_for_open(node, flags)
        if plan:  # most opens need nothing: no coroutine for them
            await self._copy_ups(plan)
        setid = None
        if flags & os.O_TRUNC and ctx is not None:

            def setid() -> int | None:
                """The set-ID bits this O_TRUNC clears (asked of a set-ID file only): none
                with CAP_FSETID (the kernel's test; its word on it, FUSE_OPEN_KILL_SUIDGID,
                does not reach here), set-group-ID even without group execute for a
                caller outside the group (setattr_should_drop_sgid), else the default."""
                if _fsetid(ctx):
                    return 0
                if not _in_group(ctx, self._attr(node).st_gid):
                    return stat.S_ISUID | stat.S_ISGID
                return None

        fh = self.core.open(node, flags, setid)
        return pyfuse3.FileInfo(fh=fh, keep_cache=True)

    @_fuse_errors
    async def read(self, fh: int, off: int, size: int) -> memoryview:  # type: ignore[override]
        # Inline, a page-cache miss included: misses handed to worker threads lost on
        # the benchmark's machine (docs/architecture.md: Caching). Into one buffer kept for
        # every read: pyfuse3 sends the reply as soon as this returns, with no other task
        # run in between, so the next read cannot overwrite it before. A new bytes object
        # of up to 1 MiB per read left the daemon's heap holding several such blocks.
        # An anonymous map, not a bytearray: its pages come as reads write them (a
        # bytearray's are all zeroed at once), and go at `_idle`.
        # (pyfuse3 takes any buffer, though its stub says bytes.)
        buf = self._read_buffer(size)
        return buf[: self.core.read_into(fh, off, buf[:size])]

    def _read_buffer(self, size: int) -> memoryview:
        """The read buffer, at least `size` bytes (`read`; `fuseread` for small reads)."""
        if size > len(self._read_buf):
            self._read_map = mmap.mmap(-1, size)  # the old one goes with its last view
            self._read_buf = memoryview(self._read_map)
        self._read_dirty = True
        return self._read_buf

    @_fuse_errors
    async def write(self, fh: int, off: int, buf: bytes) -> int:
        return self.core.write(fh, off, buf)

    async def flush(self, fh: int) -> None:
        # Writes go straight to the upper file and we hold no per-open state to
        # settle on close, so there is nothing to do: ENOSYS tells the kernel to
        # stop sending FLUSH at all, one round trip less on every close().
        raise pyfuse3.FUSEError(errno.ENOSYS)

    @_fuse_errors
    async def release(self, fh: int) -> None:
        self.core.release(fh)
        if self._read_dirty:
            self._idle()

    def _idle(self) -> None:
        """Give the read buffer's pages back if no handle is open: a mount that is not
        being read keeps none (up to 1 MiB, where a big file was read; the next read
        faults in those it writes). Not while a reader (`tar`, `find`) holds a directory
        open between its files, and at most every `READ_BUF_BACK_S`, so that a program
        that opens nothing else between its files (`cat` in a loop) does not fault them
        in again for each."""
        if self._read_map is not None and self.core.handles.idle():
            now = time.monotonic()
            if now - self._read_back >= READ_BUF_BACK_S:
                self._read_map.madvise(mmap.MADV_DONTNEED)
                self._read_dirty = False
                self._read_back = now

    @_fuse_errors
    async def fsync(self, fh: int, datasync: bool) -> None:
        self.core.fsync(fh, datasync)

    @_fuse_errors
    async def opendir(self, inode: int, ctx: Any = None) -> int:
        return self.core.opendir(self.core.node(inode))

    @_fuse_errors
    async def readdir(self, fh: int, start_id: int, token: Any) -> None:
        core = self.core
        reply = pyfuse3.readdir_reply
        build = self._attr
        bare = self._bare
        attrs = core.attrs
        for name, node, entry, nxt, counted in core.readdir(fh, start_id, bare is not None):
            try:
                if not counted and not node.is_dir:
                    # Held by the kernel under this name (`.` and `..` are directories):
                    # never with attributes, which would hand it a reference not counted.
                    assert bare is not None and entry is not None  # Identity.held
                    attr = bare.entry(node.ino, entry.st.st_mode)
                elif (
                    counted
                    and bare is not None
                    and node.nlookup > 1
                    and (node.is_dir or node.layer != 0)
                ):
                    # The kernel holds this node already: its name and type suffice (an
                    # upper file's attributes are sent again, read afresh).
                    assert entry is not None  # (`.` and `..` are not counted)
                    mode = stat.S_IFDIR if node.is_dir else entry.st.st_mode
                    core.unlookup(node)  # an entry without a node id takes no reference
                    counted = False
                    attr = bare.entry(node.ino, mode)
                else:
                    attr = build(node, attrs(node, entry))
            except OSError as e:
                if e.errno != errno.ENOENT:
                    raise
                # Removed since the handle's listing was taken (a program deleting as
                # it reads): skipped, as a fresh listing would; not an error for the pass.
                if counted:
                    core.unlookup(node)
                continue
            try:
                taken = reply(token, name, attr, nxt)
            except BaseException:
                taken = False
                raise
            finally:
                if not taken and counted:
                    core.unlookup(node)
            if not taken:
                break

    @_fuse_errors
    async def releasedir(self, fh: int) -> None:
        self.core.releasedir(fh)
        if self._read_dirty:
            self._idle()

    @_fuse_errors
    async def fsyncdir(self, fh: int, datasync: bool) -> None:
        self.core.fsyncdir(fh)

    @_fuse_errors
    async def statfs(self, ctx: Any = None) -> pyfuse3.StatvfsData:
        sv = self.core.statfs()
        d = pyfuse3.StatvfsData()
        d.f_bsize = sv.f_bsize
        d.f_frsize = sv.f_frsize
        d.f_blocks = sv.f_blocks
        d.f_bfree = sv.f_bfree
        d.f_bavail = sv.f_bavail
        d.f_files = sv.f_files
        d.f_ffree = sv.f_ffree
        d.f_favail = sv.f_favail
        d.f_namemax = sv.f_namemax
        return d

    @_fuse_errors
    async def setxattr(self, inode: int, name: bytes, value: bytes, ctx: Any = None) -> None:
        node = self.core.node(inode)
        plan = self.core.copyups_for_xattr(node, name, remove=False)
        if plan:
            await self._copy_ups(plan)
        # CAP_FSETID read as for open (`_fsetid`): uid 0 alone does not keep the bit.
        kill = (
            name == ACL_ACCESS
            and ctx is not None
            and not _in_group(ctx, self._attr(node).st_gid)
            and not _fsetid(ctx)
        )
        self.core.setxattr(node, name, value, kill_sgid=kill)

    @_fuse_errors
    async def getxattr(self, inode: int, name: bytes, ctx: Any = None) -> bytes:
        node = self.core.node(inode)
        if not self.core.has_xattr(node, name):
            # The usual answer (security.capability, asked before every write and
            # exec): the FUSE error at once, ~4 µs less than an FsError turned into it.
            raise pyfuse3.FUSEError(missing_xattr_errno(name))
        return self.core.getxattr(node, name)

    @_fuse_errors
    async def listxattr(self, inode: int, ctx: Any = None) -> list[bytes]:
        return self.core.listxattr(self.core.node(inode))

    @_fuse_errors
    async def removexattr(self, inode: int, name: bytes, ctx: Any = None) -> None:
        node = self.core.node(inode)
        plan = self.core.copyups_for_xattr(node, name, remove=True)
        if plan:
            await self._copy_ups(plan)
        self.core.removexattr(node, name)

    async def access(self, inode: int, mode: int, ctx: Any = None) -> bool:
        return True  # default_permissions: the kernel has checked already

    @_fuse_errors
    async def create(
        self, parent_inode: int, name: bytes, mode: int, flags: int, ctx: Any
    ) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        fh, node, attrs = self.core.create(
            self.core.node(parent_inode), name, mode, flags, self._caller(ctx)
        )
        return pyfuse3.FileInfo(fh=fh, keep_cache=True), self._attr(node, attrs)


class MappedFuseOps(FuseOps):
    """The adaptor with fuse-overlayfs' owner options: IDs shifted or squashed on the way.

    Replies show `IdMap.shown_*` of what is on disk; requests hand the core
    `IdMap.disk_*` of what the kernel sent. Attributes are mapped as they are
    built (`_attr`); a bare entry (`BareEntry`) carries no owners to map.
    """

    def __init__(
        self, core: Union, idmap: IdMap, debug: bool = False, killpriv: bool = True
    ) -> None:
        self.idmap = idmap
        super().__init__(core, debug, killpriv)

    def _attr(
        self, node: Node, attrs: tuple[AnyStat, int] | None = None
    ) -> pyfuse3.EntryAttributes:
        # Mapped here, before anything reads it.
        a = super()._attr(node, attrs)
        m = self.idmap
        a.st_uid = m.shown_uid(a.st_uid)
        a.st_gid = m.shown_gid(a.st_gid)
        if m.static_nlink and stat.S_ISDIR(a.st_mode):
            a.st_nlink = 1
        return a

    def _caller(self, ctx: Any) -> Ctx:
        m = self.idmap
        return Ctx(m.disk_uid(ctx.uid), m.disk_gid(ctx.gid), getattr(ctx, "umask", 0))

    async def setattr(
        self, inode: int, attr: Any, fields: Any, fh: int | None, ctx: Any
    ) -> pyfuse3.EntryAttributes:
        m = self.idmap
        if fields.update_uid:
            attr.st_uid = m.disk_uid(attr.st_uid)
        if fields.update_gid:
            attr.st_gid = m.disk_gid(attr.st_gid)
        return await super().setattr(inode, attr, fields, fh, ctx)

    async def getxattr(self, inode: int, name: bytes, ctx: Any = None) -> bytes:
        value = await super().getxattr(inode, name, ctx)
        return self.idmap.acl(value, True) if name in ACL_XATTRS else value

    async def setxattr(self, inode: int, name: bytes, value: bytes, ctx: Any = None) -> None:
        if name in ACL_XATTRS:
            value = self.idmap.acl(value, False)
        await super().setxattr(inode, name, value, ctx)


def make_ops(
    core: Union, idmap: IdMap | None, debug: bool = False, killpriv: bool = True
) -> FuseOps:
    """The adaptor for a mount: the plain one unless owner options change something."""
    if idmap is None:
        return FuseOps(core, debug, killpriv)
    return MappedFuseOps(core, idmap, debug, killpriv)
