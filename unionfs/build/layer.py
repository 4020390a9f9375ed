"""A build step's writable layer becomes a layer of the store, and a stage an image.

The step ran on a fresh upper directory over the image's layers; that upper is
already in the kernel's format the store keeps its unpacked layers in (char
0/0 whiteouts, `trusted.overlay.opaque`). So committing it writes the OCI tar
once (`image.commit.write_layer_tar`), hashing it on the way (DiffID) and
compressing it into the blob (digest), and then *moves the upper itself* into
the store as the layer's `diff/` tree: no second unpack. What the tar cannot
hold (sockets) is removed from the tree first, so the tree is what the blob
unpacks to, timestamps aside (a tar keeps whole seconds).

Before that, directories that copy-up left in the upper unchanged (same type,
mode and owner as in the layers below, nothing in them, not opaque) are
dropped: a `RUN true` whose container only looked at /etc leaves an empty
change, recorded as an `empty_layer` history entry rather than a layer.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import os
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

from .. import syscalls
from ..errors import UserError
from ..image.commit import (
    DOCKER_TO_OCI,
    LAYER_PATH_MAX,
    HashingWriter,
    walk_error,
    write_layer_tar,
)
from ..image.load import MEDIA_BY_COMPRESSION
from ..image.store import MT_CONFIG, MT_MANIFEST, Store, canonical_json
from ..tree import DIR_FLAGS, DirCursor, open_rel, rmtree_at, walk_at
from ..whiteout import WH_PREFIX, dir_flags, is_whiteout_stat

GZIP_LEVEL = 1  # build layers are written often and read rarely: speed over size


@dataclass
class NewLayer:
    diff_id: str
    digest: str
    size: int  # uncompressed bytes
    compressed_size: int

    def descriptor(self) -> dict[str, Any]:
        return {
            "mediaType": MEDIA_BY_COMPRESSION["gzip"],
            "digest": self.digest,
            "size": self.compressed_size,
        }


# --- what changed ------------------------------------------------------------------------
_BENEATH = syscalls.RESOLVE_BENEATH | syscalls.RESOLVE_NO_SYMLINKS | syscalls.RESOLVE_NO_MAGICLINKS
_Seen = tuple[str, bool]  # what a layer has at a directory's path: (kind, opaque on the way)
T = TypeVar("T")


def _open_dir_at(fd: int, rel: bytes) -> int:
    """The directory `rel` below `fd` in one call, no symlink on the way."""
    return syscalls.openat2(fd, rel or b".", DIR_FLAGS, _BENEATH)


def _along(memo: dict[bytes, T], rel: bytes, step: Callable[[T, bytes], T]) -> T:
    """memo[rel], each missing directory on the way worked out once from its parent's."""
    todo = []
    while rel not in memo:
        todo.append(rel)
        rel = rel.rpartition(b"/")[0]
    value = memo[rel]
    for r in reversed(todo):
        value = memo[r] = step(value, r)
    return value


class _Changes:
    """What the upper and the layers below it say about a path, overlay rules applied.

    Pruning goes deepest first, and each directory's answer needs every directory on
    its way: walked from the top for each one, a chain 2,000 deep (which a container,
    or a base image, makes in a second) cost 8 million calls, 88 s. Each directory's
    answer is kept, so each costs a few calls (`_along`).
    """

    def __init__(self, upper_fd: int, lower_fds: list[int]) -> None:
        self.ufd = upper_fd
        self.lfds = lower_fds
        self.opaque: dict[bytes, bool] = {b"": False}  # an opaque directory on the way
        self.seen: list[dict[bytes, _Seen]] = [{b"": ("dir", False)} for _ in lower_fds]

    def opaque_ancestor(self, rel: bytes) -> bool:
        """Whether the upper's directory `rel`, or one above it, is opaque."""

        def step(above: bool, r: bytes) -> bool:
            if above:
                return True
            fd = _open_dir_at(self.ufd, r)
            try:
                return dir_flags(fd)[0]
            finally:
                os.close(fd)

        return _along(self.opaque, rel, step)

    def lower_entry(self, rel: bytes) -> os.stat_result | None:
        """What the layers (top first) show at `rel`; None if nothing."""
        parent, _, name = rel.rpartition(b"/")
        for fd, seen in zip(self.lfds, self.seen, strict=True):
            kind, opaque_above = _along(seen, parent, functools.partial(_seen_step, fd))
            if kind == "hidden":
                return None
            if kind == "dir":
                pfd = _open_dir_at(fd, parent)
                try:
                    st = _lstat(pfd, name)
                    if st is None and _lstat(pfd, WH_PREFIX + name) is not None:
                        return None  # an OCI whiteout
                finally:
                    os.close(pfd)
                if st is not None:
                    return None if is_whiteout_stat(st) else st
            if opaque_above:
                return None  # an opaque directory on the way hides the layers below
        return None


def _lstat(dfd: int, name: bytes) -> os.stat_result | None:
    try:
        return os.stat(name, dir_fd=dfd, follow_symlinks=False)
    except FileNotFoundError:
        return None


def _seen_step(fd: int, above: _Seen, rel: bytes) -> _Seen:
    """What the layer at `fd` has at the directory path `rel`, given its parent's."""
    kind, opaque = above
    if kind != "dir":
        return above  # hidden, or absent, below too
    parent, _, name = rel.rpartition(b"/")
    pfd = _open_dir_at(fd, parent)
    try:
        st = _lstat(pfd, name)
        if st is None:
            hidden = _lstat(pfd, WH_PREFIX + name) is not None  # an OCI whiteout
            return ("hidden" if hidden else "absent", opaque)
        if is_whiteout_stat(st) or not stat.S_ISDIR(st.st_mode):
            return ("hidden", opaque)
        dfd = os.open(name, DIR_FLAGS, dir_fd=pfd)
        try:
            return ("dir", opaque or dir_flags(dfd)[0])
        finally:
            os.close(dfd)
    finally:
        os.close(pfd)


def _walk(upper: str, fd: int) -> Iterator[tuple[bytes, int]]:
    """The step's tree (`tree.walk_at`), stopped at a path no layer can hold."""
    try:
        yield from walk_at(fd, LAYER_PATH_MAX)
    except OSError as e:
        raise walk_error(upper, e.filename or b".", e) from None


def prune_upper(upper: str, lowers: list[str]) -> None:
    """Drop directories that copy-up left unchanged and empty (deepest first)."""
    ufd = os.open(upper, DIR_FLAGS)
    lfds = [os.open(low, DIR_FLAGS) for low in lowers]
    cur = DirCursor(ufd)
    changes = _Changes(ufd, lfds)
    try:
        dirs = [rel for rel, mode in _walk(upper, ufd) if stat.S_ISDIR(mode)]
        for rel in reversed(dirs):
            parts = rel.split(b"/")
            name = parts[-1]
            try:
                pfd = cur.goto(parts[:-1])
            except OSError:
                cur.reset()
                continue
            try:
                st = os.stat(name, dir_fd=pfd, follow_symlinks=False)
                dfd = os.open(name, DIR_FLAGS, dir_fd=pfd)
                try:
                    if os.listdir(dfd) or dir_flags(dfd)[0]:
                        continue
                finally:
                    os.close(dfd)
                if changes.opaque_ancestor(rel.rpartition(b"/")[0]):
                    continue
                low = changes.lower_entry(rel)
                if low is None or not stat.S_ISDIR(low.st_mode):
                    continue
                if (low.st_mode, low.st_uid, low.st_gid) != (st.st_mode, st.st_uid, st.st_gid):
                    continue
                os.rmdir(name, dir_fd=pfd)
            except OSError:
                continue
    finally:
        cur.close()
        os.close(ufd)
        for fd in lfds:
            os.close(fd)


def _drop_untarrable(upper: str) -> None:
    """Sockets have no tar form: remove them so the tree matches the blob."""
    fd = os.open(upper, DIR_FLAGS)
    try:
        for rel, mode in _walk(upper, fd):
            if stat.S_ISSOCK(mode):
                parent, _, name = rel.rpartition(b"/")
                pfd = open_rel(fd, parent)
                try:
                    os.unlink(name, dir_fd=pfd)
                finally:
                    os.close(pfd)
    finally:
        os.close(fd)


def is_empty(upper: str) -> bool:
    return not os.listdir(upper)


# --- commit ----------------------------------------------------------------------------
def commit_upper(store: Store, upper: str, tmpdir: str) -> NewLayer:
    """Turn `upper` (under the store's tmp/, unmounted) into a store layer; it is moved."""
    _drop_untarrable(upper)
    blob_tmp = os.path.join(tmpdir, "blob-" + os.urandom(8).hex())
    with open(blob_tmp, "wb") as f:
        outer = HashingWriter(f)
        with gzip.GzipFile(
            filename="", mode="wb", fileobj=outer, mtime=0, compresslevel=GZIP_LEVEL
        ) as z:
            inner = HashingWriter(z)
            write_layer_tar(upper, inner)
        f.flush()
        os.fsync(f.fileno())
    layer = NewLayer(inner.digest(), outer.digest(), inner.count, outer.count)
    store.sync()  # the tree and the blob are on disk before they become visible
    store.publish_blob(blob_tmp, layer.digest)
    if store.has_layer(layer.diff_id):
        rm = os.open(os.path.dirname(upper), DIR_FLAGS)
        try:
            rmtree_at(rm, os.path.basename(upper))
        finally:
            os.close(rm)
    else:
        store.publish_layer_tree(
            upper, layer.diff_id, layer.size, layer.digest, MEDIA_BY_COMPRESSION["gzip"], "kernel"
        )
    return layer


# --- images --------------------------------------------------------------------------------
def config_digest(config: dict[str, Any]) -> str:
    return "sha256:" + hashlib.sha256(canonical_json(config)).hexdigest()


def oci_layers(layers: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Layer descriptors with Docker media types turned into OCI ones (same blobs)."""
    out = []
    for d in layers:
        d = {k: v for k, v in d.items() if k in ("mediaType", "digest", "size", "annotations")}
        d["mediaType"] = DOCKER_TO_OCI.get(d.get("mediaType", ""), d.get("mediaType"))
        out.append(d)
    return out


def write_image(
    store: Store, config: dict[str, Any], layers: list[dict[str, Any]], tags: list[str], tmpdir: str
) -> tuple[str, str]:
    """Write config and manifest blobs, then name the image; returns (manifest, config) digests."""
    for d in layers:
        if not store.has_blob(d["digest"]):
            raise UserError(f"layer blob {d['digest']} is missing from the store")
    cbytes = canonical_json(config)
    cdigest = "sha256:" + hashlib.sha256(cbytes).hexdigest()
    store.put_blob_bytes(cbytes, cdigest, tmpdir)
    man = {
        "schemaVersion": 2,
        "mediaType": MT_MANIFEST,
        "config": {"mediaType": MT_CONFIG, "digest": cdigest, "size": len(cbytes)},
        "layers": oci_layers(layers),
    }
    mbytes = canonical_json(man)
    mdigest = "sha256:" + hashlib.sha256(mbytes).hexdigest()
    store.put_blob_bytes(mbytes, mdigest, tmpdir)
    store.sync()
    store.add_image(mdigest, len(mbytes), tags, MT_MANIFEST)
    return mdigest, cdigest
