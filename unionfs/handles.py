"""Open file and directory handles, by the number (fh) the kernel holds for each open."""

from __future__ import annotations

import contextlib
import errno
import itertools
import os
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .errors import FsError

if TYPE_CHECKING:
    from .inodes import Node
    from .resolve import Entry


@dataclass(eq=False)
class Handle:
    """An open file: `fd` is the real file in layer `layer` (re-pointed on copy-up)."""

    fd: int
    node: Node
    layer: int
    writable: bool


class Snapshot(list[tuple[bytes, "Entry"]]):
    """A directory's listing as a list (readdir offsets index it), taken from one listing
    dict, which is never changed once made (a change makes a new one)."""

    listing: dict[bytes, Entry]


@dataclass(eq=False)
class DirHandle:
    """An open directory: a snapshot of its listing, taken at the first readdir."""

    node: Node
    entries: Snapshot | None = None


class HandleTable:
    """fh -> handle. A file handle is also listed on its node (`Node.handles`), which
    keeps the node alive and lets copy-up re-point it."""

    def __init__(self) -> None:
        self._open: dict[int, Handle | DirHandle] = {}
        self._fh = itertools.count(1)
        # Node id -> the snapshot its open handles share, while one holds it.
        self._snapshots: weakref.WeakValueDictionary[int, Snapshot] = weakref.WeakValueDictionary()

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
            snap = Snapshot(listing.items())
            snap.listing = listing
            self._snapshots[node.ino] = snap
        return snap

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

    def close_dir(self, fh: int) -> None:
        self._open.pop(fh, None)

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
