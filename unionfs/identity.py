"""Node identity: which node a resolved name is, and the other names of one object.

A name resolves to an `Entry` (where its topmost instance lives); the node of
that entry is the live one with the entry's id, or a new one. The id comes from
the object, not the name (see inodes.py), so two names of one lower hard link
are one node, and a copied-up object keeps its lower id (`InodeTable.copied`).

Hard links: copy-up gives the upper one new inode, so the other names of a
lower hard link would show the old lower object. Every other name the daemon
knows is linked to the copy when it is made (copyup.py), and a name met later
(a lookup of another name of a copied-up object) is linked then, here.
"""

from __future__ import annotations

import contextlib
import os
import stat

from .copyup import CopyUp
from .inodes import (
    UNLINKED,
    AnyStat,
    DirNode,
    InodeTable,
    Node,
    compact,
    new_node,
    stat_fields,
)
from .layers import LayerStack
from .resolve import Entry, FileEntry, Resolver


class Identity:
    def __init__(
        self, stack: LayerStack, table: InodeTable, resolver: Resolver, copyup: CopyUp
    ) -> None:
        self.stack = stack
        self.table = table
        self.resolver = resolver
        self.copyup = copyup

    def _entry_id(self, entry: Entry) -> int:
        if entry.layer == 0:
            st = entry.st
            mapped = self.table.copied.get((st.st_dev, st.st_ino))
            if mapped is not None:
                return mapped
        return self.table.ident_to_id(*entry.ident())

    def upper_file_id(self, st: AnyStat) -> int:
        """The node id of the upper non-directory `st`, as `_entry_id` gives it (only a
        directory's entry has an origin): a copied-up object keeps its lower one."""
        mapped = self.table.copied.get((st.st_dev, st.st_ino))
        if mapped is not None:
            return mapped
        return self.table.ident_to_id(st.st_dev, st.st_ino)

    def node_for(self, parent: Node, name: bytes, entry: Entry) -> Node:
        """The node of a resolved entry: the live one with its id, or a new one."""
        is_dir = stat.S_ISDIR(entry.st.st_mode)
        nid = self._entry_id(entry)
        node = self.table.get(nid)
        if node is not None and node.is_dir == is_dir and node.links is not UNLINKED:
            if not is_dir and entry.layer == 0 and node.ino not in self.table.fids:
                self.table.bind(node, self.resolver.location_fd(node), node.name)
            if not is_dir and node.layer == 0 and entry.layer != 0 and self.stack.writable:
                # Another name of a lower hard link whose object was copied up: link it too.
                self._link_alias(node, parent, name)
            elif isinstance(node, DirNode):
                if node.parent is not parent or node.name != name:
                    node.close_fds()
                    node.parent, node.name = parent, name
                    node.chain, node.fds = entry.chain, [-1] * len(entry.chain)
            else:
                node.add_link(parent, name)
            return node
        if not is_dir and entry.layer != 0 and entry.st.st_nlink > 1:
            up = self.copyup.hardlinks.get(entry.ident())
            if up is not None and up.links is not UNLINKED and self.stack.writable:
                self._link_alias(up, parent, name)
                self.table.nodes[up.ino] = up
                return up
        new = new_node(nid, parent, name, is_dir, entry.layer, entry.chain)
        if is_dir and entry.layer != 0:
            # A lower directory's stat is its attributes (`Union.stat`). A non-directory
            # keeps none: the reply takes the entry's (`Union.attrs`), the kernel keeps it,
            # and the entry (~130 bytes) goes with the listing.
            new.st = entry.st
        if node is None:
            self.table.add(new)
        else:
            # Unlinked and of the same type: the same object, met under another name (an
            # id follows the object, and a new object never takes the id of one the
            # kernel holds: `new_upper_node`). Of another type, another object.
            self.table.replace(node, new, same_object=node.is_dir == is_dir)
        if not is_dir and entry.layer == 0:
            self.table.bind(new, self.resolver.location_fd(new), name)
        return new

    def held(self, parent: Node, name: bytes, entry: Entry) -> Node | None:
        """The node of a lower non-directory entry if the kernel holds it under this very
        name, else None. A listing read again meets mostly those: `node_for` would find
        the node, link nothing and change nothing, and its lookup count would only go up
        for the entry and down again when the kernel takes none (fuseops.BareEntry, whose
        type is the entry's)."""
        if type(entry) is not FileEntry:
            return None
        layer = entry.layer
        if layer == 0:  # an upper object's id may be a copied-up one's (`_entry_id`)
            return None
        _, ino, dev = stat_fields(entry)[:3]
        node = self.table.nodes.get(self.table.ident_to_id(dev, ino))
        if (
            node is None
            or node.nlookup <= 0
            or node.layer != layer  # copied up since: another name to link (`node_for`)
            or node.parent is not parent
            or node.name != name
            or node.is_dir
            or node.links is UNLINKED
        ):
            return None
        return node

    def _link_alias(self, up: Node, parent: Node, name: bytes) -> None:
        """Link `name` in `parent` to the copied-up object `up`, another name of it below."""
        assert up.parent is not None
        self.copyup.link_alias(up, self.resolver.dirfd(up.parent, 0), parent, name)
        up.add_link(parent, name)
        parent.drop_listing()
        self.copyup.changed(up, True)

    def new_upper_node(
        self, parent: Node, name: bytes, st: os.stat_result, fd: int | None = None
    ) -> Node:
        """The node of an object just made in the upper (`fd`: open on it), its lookup
        count raised."""
        is_dir = stat.S_ISDIR(st.st_mode)
        nid = self.table.ident_to_id(st.st_dev, st.st_ino)
        old = self.table.nodes.get(nid)
        if old is not None and old.links is UNLINKED:
            # The upper's filesystem reused the inode number of a removed object
            # that the kernel still holds: the same node id would make the kernel
            # take the new object for the old one (ESTALE on mkdir, another
            # file's data on a reopen). Give it a number of its own.
            nid = self.table.fresh_id()
            self.table.copied[(st.st_dev, st.st_ino)] = nid
            old = None
        chain = (0,) if is_dir else ()
        node = new_node(nid, parent, name, is_dir, 0, chain)
        if old is None:
            self.table.add(node)
        else:
            # A node still linked has this id: its object left the upper without the
            # daemon (changed under the mount). The new object is another one.
            self.table.replace(old, node, same_object=False)
        if fd is not None:
            self.table.bind(node, fd)
        elif not is_dir:
            self.table.bind(node, self.resolver.location_fd(node), name)
        node.nlookup += 1
        return node

    def keep_lower_stat(
        self, node: Node, loc: int | None = None, st: os.stat_result | None = None
    ) -> None:
        """Keep lower non-directory `node`'s stat as it is now (`loc`: its directory's fd,
        if at hand; `st`: its stat, just taken), where `Union.stat` would otherwise read
        it where it lies: once its name is gone (`dropped`), and before the daemon reads
        the object in a way that may set its atime (readlink, where the layer is no
        read-only view: `layers.read_only_view`; an open refused O_NOATIME), so that
        `stat` shows it as it was before, as kernel overlayfs, which reads lower objects
        without touching their times, shows their atime. Few objects: the kernel keeps
        symlinks' targets (fuseinit), and O_NOATIME is refused only to whoever neither
        owns the file nor has CAP_FOWNER."""
        if node.layer != 0 and node.st is None:
            if st is None:
                if loc is None:
                    loc = self.resolver.location_fd(node)
                st = os.stat(node.name, dir_fd=loc, follow_symlinks=False)
            node.st = compact(st)

    def dropped(self, node: Node, parent: Node, name: bytes, st: AnyStat | None) -> None:
        """Bookkeeping after `name` in `parent` stopped naming `node` (`st`: its upper stat)."""
        node.drop_link(parent, name)
        if node.links is UNLINKED and not node.is_dir:
            # What `Union.stat` shows of it from now on (for what the kernel still holds):
            # its stat where it lies below, read while the directories above are as they were.
            with contextlib.suppress(OSError):  # the name is gone all the same
                self.keep_lower_stat(node)
        if node.is_dir:
            node.links = UNLINKED
            # Its upper fd stays open: the removed directory itself, which what the kernel
            # still holds of it (an fd, a cwd) stats, chmods, lists, as on overlayfs.
            # Opened again by its name, it was the directory made there since (its
            # fchmod and fsetxattr went to that one) or ENOENT (fstat of a cwd).
            node.close_fds(keep=0 if node.chain[0] == 0 else -1)
            node.drop_listing()
        if node.links is UNLINKED and st is not None and (node.is_dir or st.st_nlink <= 1):
            self.table.copied.pop((st.st_dev, st.st_ino), None)
            origin = self.copyup.origins.pop(node, None)
            if origin is not None:
                del self.copyup.hardlinks[origin]

    def relink(
        self, node: Node, old_parent: Node, old_name: bytes, new_parent: Node, new_name: bytes
    ) -> None:
        """`node`'s name `old_name` in `old_parent` is now `new_name` in `new_parent`."""
        if node.is_dir and new_parent is not old_parent:
            # Its `..` names another directory now: the listing the kernel keeps of it
            # (fuseinit.keep_listings), which no change in it drops, is stale.
            self.copyup.changed(node, True)
        if node.parent is old_parent and node.name == old_name:
            node.parent, node.name = new_parent, new_name
        elif node.links and (old_parent, old_name) in node.links:
            del node.links[(old_parent, old_name)]
            node.links[(new_parent, new_name)] = None
