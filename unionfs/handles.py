"""Open file and directory handles, by the number (fh) the kernel holds for each open."""

from __future__ import annotations

import bisect
import contextlib
import errno
import itertools
import os
import weakref
import zlib
from array import array
from typing import TYPE_CHECKING

from .errors import FsError

if TYPE_CHECKING:
    from .inodes import Node
    from .resolve import Entry


class Handle:
    """An open file: `fd` is the real file in layer `layer` (re-pointed on copy-up)."""

    __slots__ = ("fd", "layer", "node", "writable")

    def __init__(self, fd: int, node: Node, layer: int, writable: bool) -> None:
        self.fd = fd
        self.node = node
        self.layer = layer
        self.writable = writable


# Where a name's entry goes: below 2**31 (a 32-bit program's readdir fails on a larger
# d_off), above the 1 and 2 of `.` and `..`, with room above for names pushed on by one
# that took their place.
_PLACES = (1 << 31) - (1 << 20)


def place(name: bytes) -> int:
    """Where `name`'s entry goes in every listing of its directory (its readdir offset
    unless another name took it)."""
    return 3 + zlib.crc32(name) % _PLACES


class Snapshot(list[tuple[bytes, "Entry"]]):
    """A directory's listing as a list, taken from one listing dict, which is never
    changed once made (a change makes a new one).

    The kernel keeps a listing (FOPEN_CACHE_DIR) by the readdir offsets it was given,
    and fills and serves its copy across passes of different handles, so an offset
    must mean the same place in every listing of the directory, before and after a
    change: each name's entry goes at a place of its own (a CRC of the name, the next
    free one if another name took it), in that order, and a pass goes on from an
    offset with the names placed after it. Offsets that were indexes of one
    snapshot made a pass completing another's start list a name twice and skip one
    (a copy-up reorders the merged listing, which the kernel does not see).
    """

    listing: dict[bytes, Entry]
    offsets: array[int]  # each entry's offset (its d_off: where a pass goes on after it)
    # A name was created, removed or replaced in the directory since the snapshot was
    # taken (`HandleTable.name_changed`); `restarted`: a pass began at the start of the
    # directory after such a change (`HandleTable.restarted`), which may have begun the
    # listing the kernel keeps again (`stale`).
    changed: bool = False
    restarted: bool = False

    @classmethod
    def of(cls, listing: dict[bytes, Entry]) -> Snapshot:
        names = list(listing)
        places = [place(name) for name in names]
        order = sorted(range(len(names)), key=places.__getitem__)
        names = [names[i] for i in order]
        places = [places[i] for i in order]
        if len(set(places)) != len(places):  # names that share a place (rare)
            names, places = _shared_places(names, places)
        snap = cls([(name, listing[name]) for name in names])
        snap.listing = listing
        snap.offsets = array("q", places)
        return snap

    def stale(self) -> bool:
        """Whether a pass goes on from the directory as it is now, not from this snapshot.

        The kernel completes the listing it keeps with the rest of whichever pass
        reaches its end, and serves every later listing from it, as of the version it
        saw when it began that listing: the rest of a pass begun before a change, once
        another pass began the kernel's listing after it (`restarted`), left the new
        names out of every `ls`. Wherever the change was: a name pushes the names placed
        after it on by one (removed, back) as far as they follow each other place by
        place, so an offset may name another name than in the old snapshot far past the
        change (names crafted to follow each other, as anyone can make a name of any
        CRC, made an old rest list a name twice or leave one out of every `ls`; only
        changes within 64 places of the offset counted). Without a pass begun since, a
        change drops the kernel's listing anyway: a program renaming each name it reads
        keeps its snapshot (the directory listed again at each of its reads took 7 times
        as long for 20,000 names); with one, the pass goes on in the listing that pass
        made, once.
        """
        return self.restarted

    def after(self, off: int) -> int:
        """The index of the first entry a pass that has read up to offset `off` (of
        this snapshot or of any other of the directory) reads next."""
        return bisect.bisect_right(self.offsets, off)


def _shared_places(names: list[bytes], places: list[int]) -> tuple[list[bytes], list[int]]:
    """Names in the order of their places, those that share one in the order of the
    names (as in every snapshot), each but the first of them at the next free place."""
    out_names: list[bytes] = []
    out_places: list[int] = []
    last = 2
    i = 0
    while i < len(names):
        j = i + 1
        while j < len(names) and places[j] == places[i]:
            j += 1
        for name in sorted(names[i:j]):
            last = max(places[i], last + 1)
            out_names.append(name)
            out_places.append(last)
        i = j
    return out_names, out_places


class DirHandle:
    """An open directory: a snapshot of its listing, taken at the first readdir."""

    __slots__ = ("entries", "node")

    def __init__(self, node: Node, entries: Snapshot | None = None) -> None:
        self.node = node
        self.entries = entries


class HandleTable:
    """fh -> handle. A file handle is also listed on its node (`Node.handles`), which
    keeps the node alive and lets copy-up re-point it."""

    def __init__(self) -> None:
        self._open: dict[int, Handle | DirHandle] = {}
        self._fh = itertools.count(1)
        # Node id -> the snapshot its open handles share, while one holds it.
        self._snapshots: weakref.WeakValueDictionary[int, Snapshot] = weakref.WeakValueDictionary()
        # Node id -> every snapshot of it an open handle holds (`name_changed`); a list of
        # weak references, not a WeakSet: a snapshot is a list, equal to any other of the
        # same entries.
        self._live: dict[int, list[weakref.ref[Snapshot]]] = {}

    def snapshot(self, node: Node, listing: dict[bytes, Entry]) -> Snapshot:
        """The snapshot of `listing` (node's current one) for a handle's first readdir.

        Handles of one directory share it while its listing is unchanged, as the
        kernel's overlayfs shares one cache per directory: each used to take its own
        list, and a user who opened a 200,000-entry directory 100 times and read
        one batch from each grew a root daemon by 600 MB (1 GB per 1,000 opens of
        a 20,000-entry one; the fd limit is the only bound).
        """
        snap = self._snapshots.get(node.ino)
        if snap is None or snap.listing is not listing:
            snap = Snapshot.of(listing)
            self._snapshots[node.ino] = snap
            live = self._live.setdefault(node.ino, [])
            live[:] = [r for r in live if r() is not None]
            live.append(weakref.ref(snap))
        return snap

    def restarted(self, node: Node) -> None:
        """A pass over directory `node` begins (offset 0): see `Snapshot.stale`."""
        for ref in self._live.get(node.ino, ()):
            snap = ref()
            if snap is not None and snap.changed:
                snap.restarted = True

    def name_changed(self, node: Node) -> None:
        """A name in directory `node` was created, removed or replaced through the mount."""
        for ref in self._live.get(node.ino, ()):
            snap = ref()
            if snap is not None:
                snap.changed = True

    def add_file(self, node: Node, fd: int, writable: bool) -> int:
        h = Handle(fd, node, node.layer, writable)
        if node.handles is None:
            node.handles = []
        node.handles.append(h)
        fh = next(self._fh)
        self._open[fh] = h
        return fh

    def add_dir(self, node: Node) -> int:
        fh = next(self._fh)
        self._open[fh] = DirHandle(node)
        return fh

    def get(self, fh: int) -> Handle | DirHandle | None:
        return self._open.get(fh)

    def idle(self) -> bool:
        """No handle is open, of a file or a directory."""
        return not self._open

    def file(self, fh: int) -> Handle:
        h = self._open.get(fh)
        if not isinstance(h, Handle):
            raise FsError(errno.EBADF)
        return h

    def dir(self, fh: int) -> DirHandle:
        h = self._open.get(fh)
        if not isinstance(h, DirHandle):
            raise FsError(errno.EBADF)
        return h

    def close_file(self, fh: int) -> Node | None:
        """Close file handle `fh`; its node (to release if unused), None if no such handle."""
        h = self._open.pop(fh, None)
        if not isinstance(h, Handle):
            return None
        os.close(h.fd)
        node = h.node
        if node.handles:
            node.handles.remove(h)
            if not node.handles:
                node.handles = None
        return node

    def close_dir(self, fh: int) -> Node | None:
        """Close directory handle `fh`; its directory if no open handle holds a snapshot
        of it any more (none is taken from its listing until another pass begins)."""
        h = self._open.pop(fh, None)
        if not isinstance(h, DirHandle):
            return None
        node = h.node
        del h  # its snapshot goes with it, unless another handle holds it
        live = self._live.get(node.ino)
        if live is not None:
            live[:] = [r for r in live if r() is not None]
            if live:
                return None
            del self._live[node.ino]
        return node

    def close_all(self) -> None:
        for h in self._open.values():
            if isinstance(h, Handle):
                with contextlib.suppress(OSError):
                    os.close(h.fd)
        self._open.clear()

    @staticmethod
    def upper_fd(
        node: Node, handle: Handle | DirHandle | None, writable: bool = False
    ) -> int | None:
        """An fd on `node`'s upper file, when one is open: the caller's handle first."""
        for h in (handle, *(node.handles or ())):
            if (
                isinstance(h, Handle)
                and h.layer == 0
                and h.node is node
                and (h.writable or not writable)
            ):
                return h.fd
        return None
