"""Path resolution: what a name means in a merged directory, and the merged listing.

Lookup goes top-down through the layers of the parent's chain; the first layer
that has the name decides (docs/semantics.md): a whiteout hides it, a
non-directory hides everything below, a directory merges with the directories
of the same name below it, down to the first opaque one. OCI markers
(`.wh.NAME`, `.wh..wh..opq`) act on the layers below their own only. That rule
is written once (`_merge`), fed the name's occurrences layer by layer: by a
stat in each layer for a lookup, from the directory scans for a listing.

Every access is relative to a directory fd of the parent in that layer, one
name at a time, with no symlink followed. A directory's fds are opened on
demand from its parent's, so the cost of a lookup is a few fstatat calls per
layer, whatever the size of the tree.

The kernel holds every ancestor of a directory it references, so a container
that builds a tree 20000 levels deep would make the daemon hold 20000 fds
(EMFILE for every mount it serves). So at most `DIR_FDS` directory fds stay
open: past that, the oldest are closed at the end of a request (`trim`; never
during one, so no operation loses an fd it holds) and opened again by name from
the parent when needed, and the ancestors a deep lookup passes are only kept
while there is room.
"""

from __future__ import annotations

import collections
import errno
import os
import resource
import stat
import struct
import weakref
from typing import NamedTuple, TypeAlias

from .errors import FsError
from .inodes import (
    STAT_SIZE,
    UNLINKED,
    AnyStat,
    DirNode,
    InodeTable,
    Node,
    Stat,
    compact,
    pack_stat,
)
from .layers import LayerStack, open_dir_at
from .whiteout import (
    OPAQUE_XATTRS,
    OPQ_CHAR,
    WH_PREFIX,
    dir_flags,
    is_xwhiteout,
    oci_whiteout_target,
)


class MergedEntry(NamedTuple):
    """A resolved name: where its topmost instance lives and, for a directory, its chain.

    Most names are non-directories: those are a `FileEntry`, one object where this
    takes two (`Entry` is either)."""

    layer: int
    st: AnyStat  # kept in listings and nodes: compact (inodes.compact)
    chain: tuple[int, ...]
    # (dev, ino) of the instance that gives the object its identity, when that is not
    # `st`'s own (a directory whose top is the upper): kept only then, see `ident`.
    origin: tuple[int, int] | None

    def ident(self) -> tuple[int, int]:
        """(dev, ino) that gives the object its identity: its topmost lower instance's."""
        o = self.origin
        return o if o is not None else (self.st.st_dev, self.st.st_ino)


class FileEntry(Stat):
    """A resolved non-directory: its `Stat` with its layer in two more bytes, read as an
    `Entry` is (no chain, no origin). A listing keeps one object per such name where an
    `Entry` would add a tuple (80 bytes) beside the `Stat`; `st` is the entry itself."""

    __slots__ = ()
    chain: tuple[int, ...] = ()
    origin: tuple[int, int] | None = None

    @property
    def layer(self) -> int:
        layer: int = _layer(self, STAT_SIZE)[0]
        return layer

    @property
    def st(self) -> FileEntry:
        return self

    def ident(self) -> tuple[int, int]:
        return (self.st_dev, self.st_ino)

    def __eq__(self, other: object) -> bool:
        if type(other) is not FileEntry:
            return NotImplemented
        return bytes.__eq__(self, other)

    def __ne__(self, other: object) -> bool:
        if type(other) is not FileEntry:
            return NotImplemented
        return bytes.__ne__(self, other)

    __hash__ = bytes.__hash__

    def __repr__(self) -> str:
        return f"FileEntry(layer={self.layer}, st={Stat.__repr__(self)})"


_layer = struct.Struct("=H").unpack_from
# What a name resolves to: a `FileEntry` for most non-directories, else a `MergedEntry`.
Entry: TypeAlias = "MergedEntry | FileEntry"


_IFMT, _IFDIR, _IFREG, _IFCHR = 0o170000, stat.S_IFDIR, stat.S_IFREG, stat.S_IFCHR
_OCI_WH = -1  # pseudo file type of an OCI whiteout `.wh.NAME` of the name in a layer

# One occurrence of a name in a layer of a directory: (position in the chain, file
# type, and its stat or the DirEntry to stat lazily; None for an OCI whiteout).
Occurrence = tuple[int, int, "os.stat_result | os.DirEntry[str] | None"]


def _st(src: os.stat_result | os.DirEntry[str] | None) -> os.stat_result:
    if type(src) is os.stat_result:
        return src
    assert src is not None
    return src.stat(follow_symlinks=False)


DIR_FDS = 4096  # directory fds kept open at most, between requests (see the docstring)


def dir_fd_budget() -> int:
    """DIR_FDS, or half the fd limit when that is lower (`ulimit -n 1024`): the other
    half is for the files and handles the requests themselves open."""
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if soft == resource.RLIM_INFINITY:
        return DIR_FDS
    return max(16, min(DIR_FDS, soft // 2))


class Resolver:
    def __init__(self, stack: LayerStack, table: InodeTable) -> None:
        self.stack = stack
        self.table = table
        self.max_fds = dir_fd_budget()
        # The directory fds opened here, oldest first: each one's node and the fd, side by
        # side (a tuple of them would be 64 bytes more per fd: up to 256 KiB at `max_fds`).
        self._opened: collections.deque[weakref.ref[Node]] = collections.deque()
        self._opened_fds: collections.deque[int] = collections.deque()

    def keep_fd(self, node: Node, pos: int, fd: int) -> None:
        """`fd` is now node.fds[pos]: count it (`trim` may close it later)."""
        node.fds[pos] = fd
        self._opened.append(weakref.ref(node))
        self._opened_fds.append(fd)

    def trim(self) -> None:
        """Close the oldest directory fds past `max_fds` (between requests only).

        An entry whose node is gone, or whose fd was closed or replaced since
        (a removed directory's, but its upper one: `Identity.dropped`), is
        dropped. The root's fds are the layers' own and never counted. The fd is
        looked for by value: a copy-up puts the new upper fd in front of the
        node's chain, and every fd it kept moves one place (found at its old
        place, it was taken for closed, never counted again, and stayed open:
        repeated deep copy-ups brought the daemon to its fd limit).
        """
        opened, fds = self._opened, self._opened_fds
        while len(opened) > self.max_fds:
            n = opened.popleft()()
            fd = fds.popleft()
            if n is None or n.parent is None or fd not in n.fds:
                continue
            n.fds[n.fds.index(fd)] = -1
            os.close(fd)

    def let_go(self, node: Node) -> None:
        """Close `node`'s directory fds now if more than `max_fds` are open, for a node
        whose fds nothing in the request holds (a level a deep copy-up has gone past)."""
        if node.parent is None or len(self._opened) <= self.max_fds:
            return
        for pos, fd in enumerate(node.fds):
            if fd >= 0:
                node.fds[pos] = -1
                os.close(fd)

    # -- directory fds -------------------------------------------------------
    def dirfd(self, node: Node, pos: int) -> int:
        """The fd of directory `node` in the layer at `pos` of its chain.

        Opened from the nearest ancestor whose fd in that layer is open, one name
        at a time, top down: a loop, since a released chain of ancestors can be
        deeper than Python's recursion limit.
        """
        fd = node.fds[pos]
        if fd >= 0:
            return fd
        layer = node.chain[pos]
        if layer == 0 and node.links is UNLINKED:
            # A removed directory's upper (its fd kept, `Identity.dropped`, then closed by
            # `trim`): opened by its name, it would be whatever holds the name now.
            raise FsError(errno.ENOENT)
        todo: list[tuple[Node, int]] = []
        n, p = node, pos
        while True:
            fd = n.fds[p]
            if fd >= 0:
                break
            parent = n.parent
            if parent is None:
                lay = self.stack.layers[layer]
                assert lay is not None
                fd = n.fds[p] = lay.fd
                break
            todo.append((n, p))
            n, p = parent, parent.chain.index(layer)
        # The ancestors on the way are kept only while there is room (a very deep
        # chain would otherwise open one fd per level at once): past that, each is
        # closed as soon as the next level is open.
        passing = -1
        try:
            for n, p in reversed(todo):
                nfd = open_dir_at(fd, n.name, layer != 0)
                if passing >= 0:
                    os.close(passing)
                    passing = -1
                if n is node or len(self._opened) < self.max_fds:
                    self.keep_fd(n, p, nfd)
                else:
                    passing = nfd
                fd = nfd
        finally:
            if passing >= 0:
                os.close(passing)
        return fd

    def location_fd(self, node: Node) -> int:
        """The fd of the directory holding non-directory `node` in its layer.

        An unlinked upper object has no name any more: whatever holds its old
        name now (a whiteout, a new file) is another object, so it is ENOENT.
        (An unlinked lower object is still at its name in its immutable layer.)
        """
        if node.links is UNLINKED and node.layer == 0:
            raise FsError(errno.ENOENT)
        parent = node.parent
        assert parent is not None
        return self.dirfd(parent, parent.chain.index(node.layer))

    # -- lookup --------------------------------------------------------------
    def _has_oci_whiteout(self, fd: int, name: bytes) -> bool:
        try:
            os.stat(WH_PREFIX + name, dir_fd=fd, follow_symlinks=False)
        except OSError:
            return False
        return True

    def _child_opaque(self, fd: int, name: bytes) -> bool:
        try:
            cfd = open_dir_at(fd, name)
        except OSError:
            return False
        try:
            return dir_flags(cfd)[0]
        finally:
            os.close(cfd)

    def xwh_layers(self, d: Node) -> frozenset[int]:
        """Layers in which directory `d` is marked `x` (may hold xattr-form whiteouts).

        Asked only when a zero-size file could be such a whiteout, then kept.
        """
        if d.xwh is None:
            found = []
            for pos, layer in enumerate(d.chain):
                try:
                    if os.getxattr(self.dirfd(d, pos), OPAQUE_XATTRS[0]) == b"x":
                        found.append(layer)
                except OSError:
                    pass
            assert isinstance(d, DirNode)
            d.xwh = frozenset(found)
        return d.xwh

    def _is_xwhiteout(self, d: Node, pos: int, name: bytes, st: os.stat_result) -> bool:
        return (
            st.st_size == 0
            and stat.S_ISREG(st.st_mode)
            and d.chain[pos] in self.xwh_layers(d)
            and is_xwhiteout(self.dirfd(d, pos), name, st)
        )

    def resolve(self, d: Node, name: bytes, start: int = 0) -> Entry | None:
        """Resolve `name` in directory `d`, looking only at chain positions >= start."""
        if start == 0 and d.listing is not None:
            return d.listing.get(name)
        return self._merge(d, name, None, start, len(d.chain) - 1)

    def _merge(
        self, d: Node, name: bytes, found: list[Occurrence] | None, start: int, last: int
    ) -> Entry | None:
        """The rule for one name across the layers of `d`, top down: written once.

        The occurrences of the name come either from `found` (a listing's scans,
        top down) or, when it is None, from one stat per layer from position
        `start` on (a lookup: it stops at the first layer that decides, so a
        name found in the top layer costs one stat). `last` is the lowest
        position an occurrence can come from: below it there is nothing to hide,
        so no opaque mark needs reading. An OCI whiteout `.wh.NAME` in a layer
        without the name hides only what lies below it, so it is looked for
        once the name is met below (a name found nowhere, the usual miss, costs
        one stat per layer).
        """
        chain: list[int] = []
        top: tuple[int, os.stat_result] | None = None
        origin_st: os.stat_result | None = None
        pos = start - 1
        i = 0
        end = len(found) if found is not None else 0
        fd = -1
        src: os.stat_result | os.DirEntry[str] | None
        absent: list[int] = []  # fds of the layers above without the name (a lookup)
        while True:
            # -- the next occurrence ------------------------------------------
            if found is None:
                pos += 1
                if pos > last:
                    break
                fd = self.dirfd(d, pos)
                try:
                    src = os.stat(name, dir_fd=fd, follow_symlinks=False)
                except (FileNotFoundError, NotADirectoryError):
                    if pos < last:
                        absent.append(fd)
                    continue
                if absent:
                    if any(self._has_oci_whiteout(afd, name) for afd in absent):
                        break  # an OCI whiteout above: hides the name from there down
                    absent.clear()
                kind = src.st_mode & _IFMT
            else:
                if i == end:
                    break
                pos, kind, src = found[i]
                i += 1
                if kind == _OCI_WH:
                    break
            # -- the rule ------------------------------------------------------
            layer = d.chain[pos]
            if top is None:  # the first layer that has the name decides
                st = src if type(src) is os.stat_result else _st(src)
                if kind == _IFCHR:
                    if st.st_rdev == 0:
                        break  # a whiteout: hides the name here and below
                elif kind == _IFREG and st.st_size == 0 and self._is_xwhiteout(d, pos, name, st):
                    break
                top = (layer, st)
                if not stat.S_ISDIR(st.st_mode):  # hides all below
                    packed = pack_stat(st, layer)
                    if packed is None:
                        return MergedEntry(layer, st, (), None)  # a time no `Stat` holds
                    return FileEntry(packed)
                if layer != 0:
                    origin_st = st
            elif kind != _IFDIR:
                break  # below a directory, a non-directory or a whiteout ends the merge
            elif origin_st is None:
                origin_st = _st(src)
            chain.append(layer)
            if pos < last:
                # An opaque directory, or an OCI whiteout of its name beside it in
                # its own layer (a listing meets that as the next occurrence), ends it.
                if found is None:
                    if self._child_opaque(fd, name) or self._has_oci_whiteout(fd, name):
                        break
                elif self._child_opaque(self.dirfd(d, pos), name):
                    break
        if top is None:
            return None
        ost = None if origin_st is None or origin_st is top[1] else origin_st
        origin = None if ost is None else (ost.st_dev, ost.st_ino)
        return MergedEntry(top[0], compact(top[1]), tuple(chain), origin)

    # -- listing -------------------------------------------------------------
    def listing(self, d: Node) -> dict[bytes, Entry]:
        """The merged listing of `d` (cached on the node until something in it changes)."""
        if d.listing is not None:
            return d.listing
        n = len(d.chain)
        if n == 1:
            return self._listing_of_one(d)
        occ: dict[bytes, list[Occurrence]] = {}
        for pos in range(n):
            fd = self.dirfd(d, pos)
            wh_here: list[bytes] = []
            with os.scandir(fd) as it:
                for e in it:
                    name = os.fsencode(e.name)
                    if name.startswith(WH_PREFIX):
                        if name != OPQ_CHAR:
                            target = oci_whiteout_target(name)
                            if target is not None:
                                wh_here.append(target)
                        continue
                    lst = occ.get(name)
                    if lst is None:
                        occ[name] = [(pos, _dtype(e), e)]
                    else:
                        lst.append((pos, _dtype(e), e))
            for target in wh_here:
                lst = occ.get(target)
                if lst is None:
                    occ[target] = [(pos, _OCI_WH, None)]
                else:
                    lst.append((pos, _OCI_WH, None))
        result: dict[bytes, Entry] = {}
        merge = self._merge
        for name, lst in occ.items():
            entry = merge(d, name, lst, 0, lst[-1][0])
            if entry is not None:
                result[name] = entry
        assert isinstance(d, DirNode)
        d.listing = result
        return result

    def _listing_of_one(self, d: Node) -> dict[bytes, Entry]:
        """`listing` of a directory in one layer: each name merged as it is read.

        Nothing lies below to hide, so markers hide nothing (an OCI whiteout is skipped,
        as a listing of more layers skips it in its own layer) and each name's
        occurrence is its only one. Merged at once, a name's scan entry and stat go
        before the next is read: gathered first, a 4,000-name directory held ~3 MiB of
        them at once, and the pymalloc pools they left among the entries that stay were
        never returned (3.6 MiB of unused pools after the benchmark's `find`).
        """
        result: dict[bytes, Entry] = {}
        merge = self._merge
        with os.scandir(self.dirfd(d, 0)) as it:
            for e in it:
                name = os.fsencode(e.name)
                if name.startswith(WH_PREFIX):
                    continue
                entry = merge(d, name, [(0, _dtype(e), e)], 0, 0)
                if entry is not None:
                    result[name] = entry
        assert isinstance(d, DirNode)
        d.listing = result
        return result


def _dtype(e: os.DirEntry[str]) -> int:
    """The entry's file type from d_type, without a stat call where possible."""
    if e.is_dir(follow_symlinks=False):
        return stat.S_IFDIR
    if e.is_file(follow_symlinks=False):
        return stat.S_IFREG
    if e.is_symlink():
        return stat.S_IFLNK
    st = e.stat(follow_symlinks=False)
    return stat.S_IFMT(st.st_mode)
