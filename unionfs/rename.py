"""Rename and exchange, and the materializing walk that a merged directory needs first.

A non-directory is copied up and renamed in the upper. A directory with
lower content cannot simply be renamed in the upper (the lower part would stay
behind; the kernel says EXDEV unless redirect_dir is on): pyunion copies its
whole merged subtree into the upper and makes it opaque (`materialize`), after
which it is an upper-only directory that renames in place, and kernel
overlayfs mounts the result with the same view. A whiteout is left where a
name that still exists below was moved away (RENAME_WHITEOUT), and a directory
moved into a merged parent is made opaque so that it does not merge with a
lower one there.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from typing import TYPE_CHECKING

from .copyup import CopyStep
from .errors import FsError
from .inodes import DirNode, Node
from .syscalls import RENAME_EXCHANGE, RENAME_NOREPLACE, renameat2
from .whiteout import OPQ_OCI, WH_PREFIX, is_whiteout_stat

if TYPE_CHECKING:
    from .union import Union


def check_rename_flags(flags: int) -> None:
    """Only RENAME_NOREPLACE and RENAME_EXCHANGE, as kernel overlayfs: no RENAME_WHITEOUT here."""
    if flags & ~(RENAME_NOREPLACE | RENAME_EXCHANGE):
        raise FsError(errno.EINVAL)


def needs_materialize(d: Node) -> bool:
    """Whether directory `d` has lower content (renaming it needs `materialize`)."""
    return d.chain[0] != 0 or len(d.chain) > 1


class Renamer:
    """The core's rename (`Union.rename`), with the helpers only it uses."""

    def __init__(self, core: Union) -> None:
        self.core = core

    # -- the materializing walk --------------------------------------------------
    def walk(self, top: Node, seal: bool) -> Iterator[CopyStep]:
        """Copy `top`'s merged subtree into the upper: the files are yielded for copy-up.

        Directories are copied up as they are entered; the caller copies up each
        file yielded before asking for the next. With `seal`, each directory is
        made opaque and upper-only once all its entries are in the upper.
        Without, the walk only moves the data (the FUSE adaptor runs it before the
        rename, big files in a worker thread, and the rename's own `seal`ed walk
        then finds nothing left to copy). Depth first with a stack of our own: a
        tree can be deeper than Python's recursion limit.
        """
        core = self.core
        stack: list[tuple[Node, Iterator[bytes]]] = []

        def enter(n: Node) -> bool:
            core.copyup.upper_dirfd(n)
            if len(n.chain) == 1:
                return False
            stack.append((n, iter(list(core.resolver.listing(n)))))
            return True

        if not enter(top):
            return
        try:
            while stack:
                n, items = stack[-1]
                for name in items:
                    # What the name is now: a walk that only moves data runs between
                    # other requests (fuseops: a big file's copy in a worker thread),
                    # which may have removed or moved it since the listing was taken.
                    entry = core.resolver.resolve(n, name)
                    if entry is None:
                        continue
                    child = core.identity.node_for(n, name, entry)
                    if child.is_dir:
                        if enter(child):
                            break  # released once its own subtree is done
                    else:
                        try:
                            yield child, True
                        finally:
                            core.table.release_if_unused(child)
                        continue
                    core.table.release_if_unused(child)
                else:
                    stack.pop()
                    if seal:
                        self._seal(n)
                    if n is not top:
                        core.table.release_if_unused(n)
        finally:
            for n, _ in stack:
                if n is not top:
                    core.table.release_if_unused(n)

    def materialize(self, d: Node) -> None:
        """Copy a directory's whole merged subtree into the upper and make it opaque.

        It costs a copy of every file below it.
        """
        copy_up = self.core.copyup.copy_up
        for node, with_data in self.walk(d, seal=True):
            copy_up(node, with_data)

    def _seal(self, d: Node) -> None:
        """Every entry of `d` is in the upper now: make it opaque and upper-only."""
        core = self.core
        ufd = core.resolver.dirfd(d, 0)
        core.whiteouts.set_opaque(ufd)
        self._drop_whiteouts(ufd)
        st = os.fstat(ufd)
        for fd in d.fds[1:]:
            if d.parent is not None and fd >= 0:
                os.close(fd)
        assert isinstance(d, DirNode)
        d.chain = (0,)
        d.fds = [ufd]
        d.listing = None
        d.xwh = None
        d.xnames = None
        core.table.copied[(st.st_dev, st.st_ino)] = d.ino

    @staticmethod
    def _drop_whiteouts(fd: int) -> None:
        """Whiteouts are useless (and not allowed) inside an opaque directory."""
        for e in list(os.scandir(fd)):
            n = os.fsencode(e.name)
            if n == OPQ_OCI:
                continue
            if n.startswith(WH_PREFIX) or (
                not (
                    e.is_dir(follow_symlinks=False)
                    or e.is_file(follow_symlinks=False)
                    or e.is_symlink()
                )
                and is_whiteout_stat(e.stat(follow_symlinks=False))
            ):
                os.unlink(n, dir_fd=fd)

    # -- rename ------------------------------------------------------------------
    def _prepare_source(self, node: Node) -> None:
        if node.is_dir:
            if needs_materialize(node):
                self.materialize(node)
        else:
            self.core.copyup.copy_up(node)

    def _opaque_for_move(self, node: Node, new_parent: Node) -> None:
        """A directory moved into a merged parent must not merge with lower ones there."""
        if node.is_dir and len(new_parent.chain) > 1:
            self.core.whiteouts.set_opaque(self.core.resolver.dirfd(node, 0))

    def rename(
        self, old_parent: Node, old_name: bytes, new_parent: Node, new_name: bytes, flags: int
    ) -> None:
        core = self.core
        _, src = core.existing(old_parent, old_name)
        if not new_parent.is_dir:
            raise FsError(errno.ENOTDIR)
        dst_entry = core.resolver.resolve(new_parent, new_name)
        dst = core.identity.node_for(new_parent, new_name, dst_entry) if dst_entry else None
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
                    core.check_empty(dst)
            self._move(old_parent, old_name, src, new_parent, new_name, dst)
        finally:
            core.table.release_if_unused(src)
            if dst is not None:
                core.table.release_if_unused(dst)

    def _move(
        self,
        old_parent: Node,
        old_name: bytes,
        src: Node,
        new_parent: Node,
        new_name: bytes,
        dst: Node | None,
    ) -> None:
        core = self.core
        self._prepare_source(src)
        src_wh = core.lower_has(old_parent, old_name)
        old_pfd = core.copyup.upper_dirfd(old_parent)
        new_pfd = core.copyup.upper_dirfd(new_parent)
        wh = None
        dst_st = None
        if dst is not None:
            if dst.is_dir and dst.chain[0] == 0:
                core.clean_upper_dir(core.resolver.dirfd(dst, 0))
                dst_st = os.fstat(core.resolver.dirfd(dst, 0))
            elif not dst.is_dir and dst.layer == 0:
                dst_st = os.stat(new_name, dir_fd=new_pfd, follow_symlinks=False)
        else:
            wh = core.upper_whiteout(new_parent, new_pfd, new_name)
        if src.is_dir:
            self._opaque_for_move(src, new_parent)
        if wh == "kernel" and src.is_dir:
            # A directory cannot replace a file: swap it with the whiteout instead.
            renameat2(old_pfd, old_name, new_pfd, new_name, RENAME_EXCHANGE)
            if not src_wh:
                os.unlink(old_name, dir_fd=old_pfd)
        else:
            if src_wh:
                core.whiteouts.rename_leaving_whiteout(old_pfd, old_name, new_pfd, new_name)
            else:
                os.rename(old_name, new_name, src_dir_fd=old_pfd, dst_dir_fd=new_pfd)
            if wh == "oci":
                os.unlink(WH_PREFIX + new_name, dir_fd=new_pfd)
        old_parent.drop_listing()
        new_parent.drop_listing()
        core.handles.name_changed(old_parent)
        core.handles.name_changed(new_parent)
        if dst is not None:
            core.identity.dropped(dst, new_parent, new_name, dst_st)
        core.identity.relink(src, old_parent, old_name, new_parent, new_name)

    def _exchange(
        self, old_parent: Node, old_name: bytes, a: Node, new_parent: Node, new_name: bytes, b: Node
    ) -> None:
        if a is b:
            return
        self._prepare_source(a)
        self._prepare_source(b)
        core = self.core
        old_pfd = core.copyup.upper_dirfd(old_parent)
        new_pfd = core.copyup.upper_dirfd(new_parent)
        if a.is_dir:
            self._opaque_for_move(a, new_parent)
        if b.is_dir:
            self._opaque_for_move(b, old_parent)
        renameat2(old_pfd, old_name, new_pfd, new_name, RENAME_EXCHANGE)
        old_parent.drop_listing()
        new_parent.drop_listing()
        core.handles.name_changed(old_parent)
        core.handles.name_changed(new_parent)
        # Each relink changes its own node only, and neither node has the other's name.
        core.identity.relink(a, old_parent, old_name, new_parent, new_name)
        core.identity.relink(b, new_parent, new_name, old_parent, old_name)
