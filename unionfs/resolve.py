"""Path resolution: what a name means in a merged directory, and the merged listing.

Lookup goes top-down through the layers of the parent's chain; the first layer
that has the name decides (see shared/SPEC.md): a whiteout hides it, a
non-directory hides everything below, a directory merges with the directories
of the same name below it, down to the first opaque one. OCI markers
(`.wh.NAME`, `.wh..wh..opq`) act on the layers below their own only.

Every access is relative to a directory fd of the parent in that layer, one
name at a time, with no symlink followed. A directory's fds are opened on
demand from its parent's, so the cost of a lookup is a few fstatat calls per
layer, whatever the size of the tree.
"""

from __future__ import annotations

import errno
import os
import stat
from typing import NamedTuple

from .errors import FsError
from .inodes import InodeTable, Node
from .layers import LayerStack, open_dir_at
from .whiteout import (
    OPAQUE_XATTRS,
    OPQ_CHAR,
    WH_PREFIX,
    dir_flags,
    is_xwhiteout,
    oci_whiteout_target,
)


class Entry(NamedTuple):
    """A resolved name: where its topmost instance lives and, for a directory, its chain."""

    layer: int
    st: os.stat_result
    chain: tuple[int, ...]
    origin: tuple[int, int]  # (dev, ino) that gives the object its identity


_OCI_WH = -1  # pseudo d_type for a `.wh.NAME` marker in a listing


class Resolver:
    def __init__(self, stack: LayerStack, table: InodeTable) -> None:
        self.stack = stack
        self.table = table

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
        for n, p in reversed(todo):
            fd = n.fds[p] = open_dir_at(fd, n.name)
        return fd

    def layer_dirfd(self, node: Node, layer: int) -> int:
        return self.dirfd(node, node.chain.index(layer))

    def location_fd(self, node: Node) -> int:
        """The fd of the directory holding non-directory `node` in its layer.

        An unlinked upper object has no name any more: whatever holds its old
        name now (a whiteout, a new file) is another object, so it is ENOENT.
        (An unlinked lower object is still at its name in its immutable layer.)
        """
        if node.unlinked and node.layer == 0:
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
            d.xwh = frozenset(found)
        return d.xwh

    def _is_xwhiteout(self, d: Node, pos: int, name: bytes, st: os.stat_result) -> bool:
        return (st.st_size == 0 and stat.S_ISREG(st.st_mode)
                and d.chain[pos] in self.xwh_layers(d)
                and is_xwhiteout(self.dirfd(d, pos), name, st))

    def resolve(self, d: Node, name: bytes, start: int = 0) -> Entry | None:
        """Resolve `name` in directory `d`, looking only at chain positions >= start."""
        if start == 0 and d.listing is not None:
            return d.listing.get(name)
        chain: list[int] = []
        top: tuple[int, os.stat_result] | None = None
        origin_st: os.stat_result | None = None
        n = len(d.chain)
        for pos in range(start, n):
            layer = d.chain[pos]
            fd = self.dirfd(d, pos)
            try:
                st = os.stat(name, dir_fd=fd, follow_symlinks=False)
            except (FileNotFoundError, NotADirectoryError):
                if pos < n - 1 and self._has_oci_whiteout(fd, name):
                    break
                continue
            mode = st.st_mode
            if stat.S_ISCHR(mode) and st.st_rdev == 0:
                break
            if top is None and self._is_xwhiteout(d, pos, name, st):
                break
            if top is None:
                top = (layer, st)
                if not stat.S_ISDIR(mode):
                    return Entry(layer, st, (), (st.st_dev, st.st_ino))
            elif not stat.S_ISDIR(mode):
                break
            chain.append(layer)
            if origin_st is None and layer != 0:
                origin_st = st
            if pos < n - 1:
                if self._child_opaque(fd, name) or self._has_oci_whiteout(fd, name):
                    break
        if top is None:
            return None
        ost = origin_st or top[1]
        return Entry(top[0], top[1], tuple(chain), (ost.st_dev, ost.st_ino))

    # -- listing -------------------------------------------------------------
    def listing(self, d: Node) -> dict[bytes, Entry]:
        """The merged listing of `d` (cached on the node until something in it changes)."""
        if d.listing is not None:
            return d.listing
        occ: dict[bytes, list[tuple[int, int, os.DirEntry[str] | None]]] = {}
        n = len(d.chain)
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
        for name, lst in occ.items():
            entry = self._merge_occurrences(d, name, lst)
            if entry is not None:
                result[name] = entry
        d.listing = result
        return result

    def _merge_occurrences(self, d: Node, name: bytes,
                           lst: list[tuple[int, int, os.DirEntry[str] | None]]) -> Entry | None:
        chain: list[int] = []
        top: tuple[int, os.stat_result] | None = None
        origin_st: os.stat_result | None = None
        count = len(lst)
        for i, (pos, kind, e) in enumerate(lst):
            if kind == _OCI_WH:
                break
            assert e is not None
            layer = d.chain[pos]
            if kind == stat.S_IFCHR:
                st = e.stat(follow_symlinks=False)
                if st.st_rdev == 0:
                    break
            elif kind == stat.S_IFREG and top is None:
                if self._is_xwhiteout(d, pos, name, e.stat(follow_symlinks=False)):
                    break
            if top is None:
                st = e.stat(follow_symlinks=False)
                top = (layer, st)
                if not stat.S_ISDIR(st.st_mode):
                    return Entry(layer, st, (), (st.st_dev, st.st_ino))
                if layer != 0:
                    origin_st = st
            elif kind != stat.S_IFDIR:
                break
            elif origin_st is None:
                origin_st = e.stat(follow_symlinks=False)
            chain.append(layer)
            if i < count - 1:
                if self._child_opaque(self.dirfd(d, pos), name):
                    break
        if top is None:
            return None
        ost = origin_st or top[1]
        return Entry(top[0], top[1], tuple(chain), (ost.st_dev, ost.st_ino))


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
