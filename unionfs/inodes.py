"""The inode table: merged objects the kernel knows about, by node id.

A node id is also the st_ino the kernel shows, so it must be a function of
the object, not of when the kernel happened to look it up: it is derived from
the object's identity, the (st_dev, st_ino) of its topmost lower instance
(its origin) or of its upper instance when it has no lower one. Layers on the
filesystem of the first layer use the real inode number; other filesystems get
their index in the high bits (like the kernel's xino). Copy-up keeps the
origin's number: `copied` remembers upper inode -> origin id for the mount's life,
a table that grows with copy-ups, never with the size of the tree.

Nodes are released when the kernel forgets them (lookup count zero), except
pinned ones (open handles, hard-linked copy-ups), so a long walk does not grow
memory without bound.

The kernel holds on to what it looked up for as long as it has memory to
spare, so the daemon keeps a node, and a stat of each lower object, for every
name a walk met. The stats are kept as `Stat` records, built once per stat
call (`compact`): an `os.stat_result` holds every time three times over (int
seconds, float, int ns) in objects of its own, about 620 bytes in all; the
thirteen fields the daemon reads, packed in one bytes object in the narrowest
types their values need (`_LAYOUT`), take 123. A field read unpacks it (~0.25 µs, against ~0.05
for a slot), which the request path pays a few times per new object; the
adaptor reads all of them at once (`stat_fields`).
"""

from __future__ import annotations

import contextlib
import functools
import operator
import os
import struct
import sys
import weakref
from typing import TYPE_CHECKING, TypeAlias, TypeVar

from .syscalls import file_handle

if TYPE_CHECKING:
    from .handles import Handle
    from .resolve import Entry

ROOT_ID = 1
COMPACT_MIN = 1024  # nodes released before the tables are looked at (`InodeTable._compact`)
# Bytes per entry past which a table is rebuilt: one grown to hold its entries takes 27-60
# (1.5 to 3 places per entry, 24 bytes per entry and 2-4 per place).
_ROOMY = 64
_HIGH_SHIFT = 56
_OVERFLOW_BASE = 1 << 62


# The fields a `Stat` keeps, by their stat names (os.stat_result's names).
STAT_FIELDS = (
    "st_mode",
    "st_ino",
    "st_dev",
    "st_nlink",
    "st_uid",
    "st_gid",
    "st_size",
    "st_atime_ns",
    "st_mtime_ns",
    "st_ctime_ns",
    "st_blksize",
    "st_blocks",
    "st_rdev",
)
_fields = operator.attrgetter(*STAT_FIELDS)
# The fields in the order of STAT_FIELDS, each in the narrowest type that holds every value
# Linux gives it: a mode is 16 bits, a device number (st_dev, st_rdev: the kernel's dev_t,
# 12-bit major, 20-bit minor, as glibc encodes it) 32, a link count and st_blksize 32
# (struct stat's nlink_t is 64 bits, the kernel's counts 32); times as int64 ns (until 2262).
# A value that does not fit is a struct.error: the stat is kept whole (`compact`). With
# struct stat's own types the fields took 92 bytes, which with the object's header and
# the garbage collector's (a subclass of bytes has one) made 144 with pymalloc's rounding;
# in 74 they take 128 (a `FileEntry` too, with its layer), for every lower object met.
_LAYOUT = struct.Struct("=HQIIIIqqqqIqI")
STAT_SIZE = _LAYOUT.size  # bytes of a `Stat`'s fields (a subclass's own follow them)


def _field(i: int) -> property:
    fmt = _LAYOUT.format[1:]
    offset = struct.calcsize("=" + fmt[:i])
    unpack = struct.Struct("=" + fmt[i]).unpack_from
    return property(lambda s: unpack(s, offset)[0])


class Stat(bytes):
    """The fields of a stat the daemon reads (`STAT_FIELDS`), packed in one bytes object
    (see the module docstring); read by their stat names, or all at once with
    `stat_fields`."""

    __slots__ = ()
    st_mode = _field(0)
    st_ino = _field(1)
    st_dev = _field(2)
    st_nlink = _field(3)
    st_uid = _field(4)
    st_gid = _field(5)
    st_size = _field(6)
    st_atime_ns = _field(7)
    st_mtime_ns = _field(8)
    st_ctime_ns = _field(9)
    st_blksize = _field(10)
    st_blocks = _field(11)
    st_rdev = _field(12)

    def __eq__(self, other: object) -> bool:
        if type(other) is not Stat:
            return NotImplemented
        return bytes.__eq__(self, other)

    def __ne__(self, other: object) -> bool:
        if type(other) is not Stat:
            return NotImplemented
        return bytes.__ne__(self, other)

    __hash__ = bytes.__hash__

    def __repr__(self) -> str:
        return "Stat(" + ", ".join(f"{f}={getattr(self, f)}" for f in STAT_FIELDS) + ")"


# A stat as the daemon keeps it (`Stat`) or as a syscall returned it, read the same way.
AnyStat: TypeAlias = "Stat | os.stat_result"

_unpack = _LAYOUT.unpack
_unpack_from = _LAYOUT.unpack_from


def stat_fields(
    st: AnyStat,
) -> tuple[int, int, int, int, int, int, int, int, int, int, int, int, int]:
    """All of `STAT_FIELDS` at once, in that order (one unpack for a `Stat`)."""
    if type(st) is Stat:
        return _unpack(st)
    if isinstance(st, Stat):  # with more bytes after the fields (resolve.FileEntry)
        return _unpack_from(st)
    return _fields(st)


def compact(st: AnyStat) -> AnyStat:
    """`st` as a `Stat`, or itself if it is one already or does not fit one (a time
    before 1678 or after 2262: kept whole, rare enough)."""
    if isinstance(st, Stat):
        return st
    packed = pack_stat(st)
    return st if packed is None else Stat(packed)


def pack_stat(st: os.stat_result, *extra: int) -> bytes | None:
    """The `Stat` bytes of `st`, followed by `extra` as unsigned 16-bit numbers (a subclass's
    own fields); None if a time does not fit (see `compact`)."""
    try:
        return (_LAYOUT if not extra else _layout_plus(len(extra))).pack(*_fields(st), *extra)
    except struct.error:
        return None


@functools.cache
def _layout_plus(n: int) -> struct.Struct:
    return struct.Struct(_LAYOUT.format + "H" * n)


# The `fds` of every non-directory: one shared list, never changed (only a directory's are).
_NO_FDS: list[int] = []
# `Node.links` of an object with no name left in the merged tree: empty, never changed.
UNLINKED: dict[tuple[Node, bytes], None] = {}


class Node:
    """A merged object.

    Non-directories live at (`parent`, `name`) in layer `layer` (0: upper).
    Directories (`DirNode`) merge the same name in every layer of `chain` (top
    first); `fds` holds their directory fds in those layers, opened on demand.
    A non-directory has no slots for those: one is kept per name the kernel
    holds, most names are files, and each slot is 8 bytes of every one.
    """

    __slots__ = (
        "__weakref__",
        "handles",
        "ino",
        "layer",
        "links",
        "name",
        "nlookup",
        "parent",
        "st",
        "xnames",
    )
    is_dir = False
    # What a directory has of its own (`DirNode`): a non-directory's, never changed.
    chain: tuple[int, ...] = ()
    fds: list[int] = _NO_FDS
    listing: dict[bytes, Entry] | None = None  # see Resolver.listing
    xwh: frozenset[int] | None = None  # see Resolver.xwh_layers

    def __init__(self, ino: int, parent: Node | None, name: bytes, layer: int) -> None:
        self.ino = ino
        self.nlookup = 0
        self.parent = parent
        self.name = name
        # Its other names (hard links), in the order met: a dict, so that meeting one
        # again is no walk of them all (a list made `ln` and `ls -l` of a file with
        # 20,000 names take 37 s of the daemon, all requests waiting). `UNLINKED` once
        # it has no name left (read as `node.links is UNLINKED`: a slot of its own would
        # be 16 bytes more per node with the one below CopyUp.origins holds).
        self.links: dict[tuple[Node, bytes], None] | None = None
        self.layer = layer
        self.handles: list[Handle] | None = None
        self.st: AnyStat | None = None  # lower objects: their (immutable) stat
        # The object's xattr names, kept once asked: lower objects never change, and an
        # upper object's xattrs change only through the daemon, which clears this.
        self.xnames: frozenset[bytes] | None = None

    def drop_listing(self) -> None:
        """Forget the merged listing, which a change in the directory made stale (a
        directory's: a non-directory has none)."""

    def close_fds(self, keep: int = -1) -> None:
        """Close the directory's fds, but the one at position `keep` of its chain."""
        if self.parent is None:
            return  # the root's fds are the layers' own
        for i, fd in enumerate(self.fds):
            if fd >= 0 and i != keep:
                with contextlib.suppress(OSError):
                    os.close(fd)
                self.fds[i] = -1

    def add_link(self, parent: Node, name: bytes) -> None:
        """Remember another name of this object (hard links)."""
        if parent is self.parent and name == self.name:
            return
        links = self.links
        if links is None or links is UNLINKED:  # (none for an unlinked one: link is ENOENT)
            links = self.links = {}
        links.setdefault((parent, name), None)

    def drop_link(self, parent: Node, name: bytes) -> None:
        """Forget one name; if it was the primary one, promote another."""
        if self.parent is parent and self.name == name:
            if self.links:
                (self.parent, self.name), _ = self.links.popitem()
            else:
                self.links = UNLINKED
        elif self.links:
            self.links.pop((parent, name), None)

    def __repr__(self) -> str:
        return f"<Node {self.ino} {self.name!r} layer={self.layer} chain={self.chain}>"


class DirNode(Node):
    """A merged directory: a `Node` with its chain of layers, their fds, its listing."""

    __slots__ = ("chain", "fds", "listing", "xwh")
    is_dir = True

    def __init__(
        self, ino: int, parent: Node | None, name: bytes, layer: int, chain: tuple[int, ...]
    ) -> None:
        super().__init__(ino, parent, name, layer)
        self.chain = chain
        self.fds = [-1] * len(chain)
        self.listing = None
        self.xwh = None

    def drop_listing(self) -> None:
        self.listing = None

    def __del__(self) -> None:
        # A released directory's fds can be opened again (a child resolves through
        # it); when the node goes, they go with it, or they would pin the layer
        # until the daemon exits.
        with contextlib.suppress(AttributeError):  # a node whose __init__ failed
            self.close_fds()


def new_node(
    ino: int, parent: Node | None, name: bytes, is_dir: bool, layer: int, chain: tuple[int, ...]
) -> Node:
    """A `DirNode` for a directory, else a `Node`."""
    if is_dir:
        return DirNode(ino, parent, name, layer, chain)
    return Node(ino, parent, name, layer)


def _fid_hash(fid: bytes) -> int:
    """What `InodeTable.fids` keeps of a file handle: 60 bits of its hash, which is keyed
    per process (no one can aim at it). 60 bits fit an int of 32 bytes, where the whole
    hash (64) took 48: 10,000 upper files held 160 KiB less."""
    return hash(fid) & _FID_BITS


_FID_BITS = (1 << 60) - 1
_K = TypeVar("_K")
_V = TypeVar("_V")


def _rebuild_if_roomy(table: dict[_K, _V]) -> None:
    """Rebuild `table` in place if it has far more room than entries (`InodeTable._compact`)."""
    if sys.getsizeof(table) > _ROOMY * len(table):
        keys, values = list(table), list(table.values())
        table.clear()
        table.update(zip(keys, values, strict=True))


class InodeTable:
    def __init__(self, devs: list[int]) -> None:
        self.devs = devs
        self.nodes: dict[int, Node] = {}
        # Released nodes still referenced (as a parent or a link) stay one object per id.
        self._zombies: weakref.WeakValueDictionary[int, Node] = weakref.WeakValueDictionary()
        self.copied: dict[tuple[int, int], int] = {}
        # The generation of a node id that went to another object while the kernel may
        # still have held the old one (`replace`); an id not here is generation 0.
        self.generations: dict[int, int] = {}
        # The hash of the file handle of each upper non-directory node's object while the
        # node is in the table (`bind`, `_fid_hash`): 32 bytes, not a handle's 49-65; None:
        # none could be read, which matches no object.
        self.fids: dict[int, int | None] = {}
        self.has_fids = True  # False once the upper's filesystem said it has no handles
        self._overflow: dict[tuple[int, int], int] = {}
        self._next_overflow = _OVERFLOW_BASE
        self._released = 0  # nodes released since the tables were last rebuilt (`_compact`)

    def ident_to_id(self, dev: int, ino: int) -> int:
        """The node id (and st_ino) of the object whose identity is (dev, ino)."""
        try:
            idx = self.devs.index(dev)
        except ValueError:
            idx = len(self.devs)
            self.devs.append(dev)
        if ino < (1 << _HIGH_SHIFT) and idx < 64:
            nid = (idx << _HIGH_SHIFT) | ino
            if nid > ROOT_ID:
                return nid
        key = (dev, ino)
        known = self._overflow.get(key)
        if known is not None:
            return known
        nid = self.fresh_id()
        self._overflow[key] = nid
        return nid

    def fresh_id(self) -> int:
        """A node id never used before in this mount (from the overflow range)."""
        nid = self._next_overflow
        self._next_overflow += 1
        return nid

    def all_nodes(self) -> list[Node]:
        """Every node still alive: those the kernel knows and released ones still referenced."""
        return list(self.nodes.values()) + [
            n for n in list(self._zombies.values()) if self.nodes.get(n.ino) is not n
        ]

    def get(self, ino: int) -> Node | None:
        node = self.nodes.get(ino)
        if node is None:
            node = self._zombies.pop(ino, None)
            if node is not None:
                self.nodes[ino] = node
        return node

    def add(self, node: Node) -> Node:
        self.nodes[node.ino] = node
        return node

    def replace(self, old: Node, new: Node, same_object: bool) -> None:
        """`new` takes the id of `old`, a node in the table, which the kernel may hold.

        The kernel's lookups of `old` now count for `new`: the same object (another name
        of a hard link whose other names are gone) keeps its inode there; another object
        gets a new generation, and the kernel, meeting the id with it, makes its inode of
        the old one bad and a new one for this (fs/fuse/inode.c `fuse_iget`: "nodeid was
        reused"), whose FORGETs then come for this id too. With the generation it kept,
        the kernel would take the new object for the old one: the old target of a
        symlink (`fuseinit`), the old data of a file. Not for an object only removed
        (`Identity.new_upper_node` gives the new one a fresh id): the kernel makes its
        old inode bad, and an open file removed would read EIO where overlayfs reads it.
        """
        new.nlookup = old.nlookup
        if not same_object:
            self.generations[new.ino] = self.generations.get(new.ino, 0) + 1
        self.nodes[new.ino] = new

    def bind(self, node: Node, fd: int, name: bytes = b"") -> None:
        """Record which object upper non-directory `node` is: the file handle of NAME in
        directory `fd`, or of `fd` itself (`syscalls.file_handle`). Called where an upper
        node gets its object: made, looked up, copied up.

        Whoever can write the upper (root's mount over a user's directory) may remove the
        node's object and make her own, which the filesystem gives its inode number (ext4
        at once), then rename it onto its name: device and inode number alone took hers
        for the node's own (`Union._upper_object`), and root's `chown 0:0; chmod 4755`
        made it a set-user-ID program of root's. A handle holds the inode's generation
        too. Where the filesystem has no handles, the inode number is all there is."""
        if not self.has_fids:
            return
        try:
            fid = file_handle(fd, name)
        except OSError:
            self.fids[node.ino] = None  # its object is gone from its name already
            return
        if fid is None:
            self.has_fids = False
            self.fids.clear()
        else:
            self.fids[node.ino] = _fid_hash(fid)

    def is_bound_object(self, node: Node, fd: int) -> bool:
        """Whether `fd` (O_PATH) is the very object `bind` recorded for upper `node`."""
        if not self.has_fids:
            return True
        fid = self.fids.get(node.ino)
        if fid is None:
            return False
        try:
            have = file_handle(fd)
        except OSError:
            return False
        return have is not None and _fid_hash(have) == fid

    def forget(self, ino: int, n: int) -> None:
        """The kernel dropped `n` references to node `ino`."""
        node = self.nodes.get(ino)
        if node is None:
            return
        node.nlookup -= n
        if node.nlookup <= 0:
            node.nlookup = 0
            self.release_if_unused(node)

    def _compact(self) -> None:
        """Rebuild the node and handle-hash tables where they have far more room than
        entries.

        A dict gives back no room when entries are deleted, only when it grows again:
        10,000 files made and removed (the benchmark's W5) left the node table at the
        65,536 places its peak took (1.3 MiB; 0.6 for what stays) and the handle hashes'
        at 16,384. Rebuilt in place: the old table goes before the new one grows (a copy
        beside it raised the daemon's peak by the copy, 0.6 MiB: the freed nodes' memory
        stays with the allocator). Looked at once as many nodes have been released as
        half of those left, so each release pays at most two entries' copying."""
        self._released = 0
        _rebuild_if_roomy(self.nodes)
        _rebuild_if_roomy(self.fids)

    def release_if_unused(self, node: Node) -> None:
        """Drop `node` from the table unless the kernel or an open handle still uses it."""
        if node.nlookup > 0 or node.handles or node.ino == ROOT_ID:
            return
        if self.nodes.get(node.ino) is node:
            del self.nodes[node.ino]
            self._zombies[node.ino] = node
            if self.generations:  # the kernel holds no inode of this id any more
                self.generations.pop(node.ino, None)
            self.fids.pop(node.ino, None)  # found again by a lookup, which binds it anew
            self._released += 1
            if self._released >= COMPACT_MIN and 2 * self._released >= len(self.nodes):
                self._compact()
        if node.is_dir:
            node.close_fds()
            node.drop_listing()
