"""Importing images into the store: verify every blob, unpack each new layer once.

One pass per layer blob: the bytes are hashed (the blob digest) and copied to a
temporary blob file, decompressed, hashed again (the DiffID) and unpacked into a
temporary layer directory. Only when both digests match is anything renamed into
the store; a layer whose DiffID is already there is hashed but not unpacked again.
The images become visible (index.json) last, all in one write of it.
"""

from __future__ import annotations

import gzip
import os
import stat
from collections.abc import Callable, Hashable
from typing import IO, Any

from .. import compression
from ..digits import number
from ..errors import UserError
from ..progress import Bars
from ..tree import open_trusted
from . import reference
from .oci import (
    DECOMPRESS_ERRORS,
    Candidate,
    HashingReader,
    ImageFormatError,
    LayerRef,
    Source,
    decompressed,
    find_images,
    open_source,
)
from .store import (
    DOCKER_MANIFEST,
    MT_CONFIG,
    MT_LAYER,
    MT_LAYER_GZIP,
    MT_LAYER_ZSTD,
    MT_MANIFEST,
    PRIVATE,
    Store,
    canonical_json,
    digest_of,
    normalize_tag,
    short_id,
    write_json_atomic,
)
from .unpack import UnpackError, unpack

MEDIA_BY_COMPRESSION = {"none": MT_LAYER, "gzip": MT_LAYER_GZIP, "zstd": MT_LAYER_ZSTD}
# A compressed layer may unpack to EXPANSION times its compressed size, and to FLOOR
# whatever its size: real layers stay far below (2-10x); a gzip or zstd bomb does not.
EXPANSION, EXPANSION_FLOOR = 100, 256 << 20
EXPANSION_ENV = "PYUNION_MAX_EXPANSION"


def max_expansion() -> int:
    """The ratio a compressed layer may expand by: $PYUNION_MAX_EXPANSION, 0 for no bound."""
    text = os.environ.get(EXPANSION_ENV, "").strip()
    if not text:
        return EXPANSION
    ratio = number(text)  # str.isdigit() took `²`, which int() refused: a traceback
    if ratio is None:
        raise UserError(f"{EXPANSION_ENV}={text!r}: expected a whole number (0: no bound)")
    return ratio


class ExpansionError(ImageFormatError):
    """A layer that unpacks to more than `ExpansionBound` allows: refused whatever its
    bytes, so there is no point fetching them again to check them."""


class ExpansionBound:
    """Counts a layer's decompressed bytes as they are read (the `progress` of the
    `HashingReader` that hashes them for the DiffID), refusing more than the ratio
    allows of `compressed`: what was read of the blob so far, never its declared size
    (a registry's manifest could declare any size, and the body ends short only after
    the bomb is out)."""

    def __init__(self, compressed: Callable[[], int], what: str) -> None:
        self.compressed, self.what = compressed, what
        self.ratio = max_expansion()
        self.count = 0

    def __call__(self, n: int) -> None:
        self.count += n
        if self.ratio:
            limit = max(EXPANSION_FLOOR, self.ratio * self.compressed())
            if self.count > limit:
                raise ExpansionError(
                    f"{self.what}: unpacks to more than {limit} bytes ({self.ratio} times "
                    f"its compressed size; {EXPANSION_ENV}=N sets the ratio, 0 no bound)"
                )


def store_layer_stream(
    store: Store,
    tmpdir: str,
    stream: IO[bytes] | Any,
    diff_id: str | None,
    digest: str | None,
    what: str,
    progress: Callable[[int], None] | None = None,
    size: int | None = None,
    unpack_it: bool = True,
) -> dict[str, Any]:
    """Verify, keep and (if new) unpack one layer blob read from `stream`.

    `diff_id`/`digest` are what the blob must hash to (None: accept what it hashes to);
    `unpack_it=False` only verifies and keeps the blob (its DiffID is being unpacked
    from another blob of the same import);
    `size`, the blob's declared size when known, bounds every tar member of an
    uncompressed blob, and what a compressed one may expand to (`ExpansionBound`).
    Returns the layer's info: diff_id, digest, size, compression, and `publish`, a
    function that renames the blob and layer into the store: call it (after
    `store.sync()`) once every layer of the image has been verified, so that a
    failed import leaves nothing behind.
    """
    blob_tmp = os.path.join(tmpdir, "blob-" + os.urandom(8).hex())
    layer_tmp = os.path.join(tmpdir, "layer-" + os.urandom(8).hex())
    keep_blob = digest is None or not store.has_blob(digest)
    need_unpack = unpack_it and (diff_id is None or not store.has_layer(diff_id))
    with open(blob_tmp, "wb") if keep_blob else open(os.devnull, "wb") as tee:
        outer = HashingReader(stream, tee=tee, progress=progress)
        try:
            raw, comp = decompressed(outer)
            bound = ExpansionBound(lambda: outer.count, what) if comp != "none" else None
            inner = HashingReader(raw, progress=bound)
            whiteouts = "none"
            if need_unpack:
                os.mkdir(layer_tmp, PRIVATE)
                diff = os.path.join(layer_tmp, "diff")
                os.mkdir(diff, 0o755)
                whiteouts = unpack(inner, diff, max_member=size if comp == "none" else None)
            inner.drain()
            outer.drain()
        except UnpackError as e:
            raise UnpackError(f"{what}: {e}") from None
        except DECOMPRESS_ERRORS as e:
            raise ImageFormatError(f"{what}: corrupt or truncated archive ({e})") from None
        tee.flush()
        if keep_blob:
            os.fsync(tee.fileno())
    got_digest, got_diff = outer.digest(), inner.digest()
    if digest is not None and got_digest != digest:
        raise ImageFormatError(
            f"{what}: blob does not match its digest {digest} (got {got_digest})"
        )
    if diff_id is not None and got_diff != diff_id:
        raise ImageFormatError(
            f"{what}: uncompressed layer does not match its DiffID {diff_id} (got {got_diff})"
        )
    info = {
        "diff_id": got_diff,
        "digest": got_digest,
        "size": inner.count,
        "compressed_size": outer.count,
        "compression": comp,
    }
    if need_unpack and diff_id is None and store.has_layer(got_diff):
        need_unpack = False  # learnt its identity only now, and it is already there
    if need_unpack:
        write_json_atomic(
            os.path.join(layer_tmp, "layer.json"),
            {
                "diff_id": got_diff,
                "size": inner.count,
                "blob": got_digest,
                "media_type": MEDIA_BY_COMPRESSION[comp],
                "whiteouts": whiteouts,
            },
        )

    def publish() -> None:
        if keep_blob:
            store.publish_blob(blob_tmp, got_digest)
        if need_unpack:
            store.publish_layer(layer_tmp, got_diff)

    info["publish"] = publish
    return info


def _import_layer(
    store: Store,
    src: Source,
    tmpdir: str,
    lr: LayerRef,
    n: int,
    total: int,
    bars: Bars,
    unpack_it: bool = True,
) -> dict[str, Any]:
    what = f"layer {n}/{total} ({short_id(lr.diff_id)})"
    if lr.digest is not None and store.has_blob(lr.digest) and store.has_layer(lr.diff_id):
        bars.note(f"{what}: already in the store")
        return {
            "diff_id": lr.diff_id,
            "digest": lr.digest,
            "compressed_size": store.blob_size(lr.digest),
            "compression": None,
        }
    bar = bars.bar(what, lr.size)
    try:
        with src.open(lr.path, lr.size) as f:
            info = store_layer_stream(
                store, tmpdir, f, lr.diff_id, lr.digest, what, bar.update, lr.size, unpack_it
            )
    except ImageFormatError as e:
        bar.done()
        if str(e).startswith(what):
            raise
        raise ImageFormatError(f"{what}: {e}") from None
    except BaseException:
        bar.done()
        raise
    bar.done("done")
    return info


# A layer file of the source, as a DiffID it was verified to unpack to -> what it is in
# the store (an import's earlier image had it): kept across the images of one import.
Known = dict[tuple[Hashable, str], dict[str, Any]]


def _store_candidate(
    store: Store, src: Source, c: Candidate, tags: list[str], progress: Bars, known: Known
) -> tuple[str, int, list[str], str]:
    """Store one image's blobs and layers; returns what `Store.add_images` records of it
    (manifest digest, size, tags, media type)."""
    with store.tempdir() as tmp:
        # A blob listed again is the same layer (`schema.diff_ids`), and a DiffID is
        # unpacked once whatever number of blobs hold it: nothing is published before
        # the last layer is verified, so each repeat would otherwise be read, kept and
        # unpacked again (a manifest repeating a small bomb filled the disk). A layer
        # file an earlier image of the import had is not read again either (an old
        # docker archive names its layers by path, not by digest: 1,000 images naming
        # one 100 MB layer had it read and hashed 1,000 times).
        by_path: dict[str, dict[str, Any]] = {}
        unpacked: set[str] = set()
        infos = []
        for i, lr in enumerate(c.layers):
            key = (src.identity(lr.path), lr.diff_id)
            info = by_path.get(lr.path) or known.get(key)
            if info is None:
                first = lr.diff_id not in unpacked
                info = _import_layer(store, src, tmp, lr, i + 1, len(c.layers), progress, first)
                by_path[lr.path] = info
                unpacked.add(lr.diff_id)
            infos.append(info)
        pending = [info["publish"] for info in by_path.values() if "publish" in info]
        if pending:  # an image whose layers are all in the store has nothing to flush
            store.sync()
        for publish in pending:
            publish()
        for lr, info in zip(c.layers, infos, strict=True):
            if info.get("compression") is not None:  # None: it was in the store already
                known[(src.identity(lr.path), lr.diff_id)] = {
                    k: v for k, v in info.items() if k != "publish"
                }
        store.put_blob_bytes(c.config_bytes, c.config_digest, tmp)
        if c.manifest_bytes is not None and c.manifest_digest is not None:
            mbytes, mdigest, mtype = c.manifest_bytes, c.manifest_digest, c.manifest_media_type
        else:
            layers = []
            for _lr, info in zip(c.layers, infos, strict=False):
                comp = info.get("compression") or "none"
                layers.append(
                    {
                        "mediaType": MEDIA_BY_COMPRESSION[comp],
                        "digest": info["digest"],
                        "size": info["compressed_size"],
                    }
                )
            man = {
                "schemaVersion": 2,
                "mediaType": MT_MANIFEST,
                "config": {
                    "mediaType": MT_CONFIG,
                    "digest": c.config_digest,
                    "size": len(c.config_bytes),
                },
                "layers": layers,
            }
            mbytes = canonical_json(man)
            mdigest = digest_of(mbytes)
            mtype = MT_MANIFEST
        store.put_blob_bytes(mbytes, mdigest, tmp)
    if mtype not in (MT_MANIFEST, DOCKER_MANIFEST):
        mtype = MT_MANIFEST
    return mdigest, len(mbytes), tags, mtype


_ARCHIVE_ERRORS: tuple[type[Exception], ...] = (*compression.ERRORS, ValueError)


def open_archive(path: str) -> IO[bytes]:
    """The archive PATH, opened once: only a regular file (opened non-blocking, so a FIFO
    swapped in after a check by name cannot hang the import; read as usual after),
    reached through no symlink of another user's (`tree.open_trusted`): root importing
    her archive read root's private one through her symlink."""
    try:
        fd = open_trusted(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
    except FileNotFoundError:
        raise UserError(f"{path}: no such file or directory") from None
    except OSError as e:
        raise UserError(f"{path}: {e.strerror}") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise UserError(f"{path}: not a directory nor a regular file")
    os.set_blocking(fd, True)
    return os.fdopen(fd, "rb")


def plain_archive(path: str, scratch: str) -> IO[bytes]:
    """The archive PATH (`open_archive`), or for a compressed one (gzip, bzip2, xz, zstd:
    what docker load takes) a plain copy made in SCRATCH.

    tarfile reads a member of a compressed archive by seeking in it, and a seek
    backwards decompresses the stream again from its start: each layer stored
    before the one read last cost the whole archive again (a 263 KB archive whose
    20 layers follow 256 MiB of gzipped zeros took 20 s of CPU; thousands of
    layers, hours). Decompressed once, within the bound a compressed layer has
    (`ExpansionBound`), it is then read by plain seeks."""
    f = open_archive(path)
    try:
        head = os.pread(f.fileno(), compression.HEAD, 0)
    except BaseException:
        f.close()
        raise
    kind = compression.kind_of(head)
    if kind == compression.NONE:
        return f
    with f:
        bound = ExpansionBound(f.tell, f"archive {path}")  # compressed bytes read so far
        out = os.path.join(scratch, "archive.tar")
        try:
            with compression.reader(kind, f) as z, open(out, "wb") as w:
                while chunk := z.read(1 << 20):
                    bound(len(chunk))
                    w.write(chunk)
        except OSError as e:
            if isinstance(e, gzip.BadGzipFile) or e.errno is None:
                raise ImageFormatError(f"cannot read archive {path}: {e}") from None
            raise UserError(f"cannot decompress {path} into {scratch}: {e.strerror}") from None
        except _ARCHIVE_ERRORS as e:
            raise ImageFormatError(f"cannot read archive {path}: {e}") from None
    return open(out, "rb")


def _archive_name(name: str) -> str:
    """A name the archive gives an image, validated; --tag is the way around a bad one."""
    try:
        return reference.tagged(name, "image name in the archive")
    except reference.InvalidReference as e:
        raise ImageFormatError(f"{e}; give the image a name with --tag") from None


def import_image(
    path: str,
    store: Store,
    tag: str | None = None,
    ref: str | None = None,
    platform: dict[str, str] | None = None,
    progress: Bars | None = None,
) -> list[tuple[str, list[str]]]:
    """Import every image (or the one named `ref`) of a layout or archive.

    Returns (manifest digest, tags) per image imported.
    """
    progress = progress or Bars(False)
    if tag is not None:
        tag = normalize_tag(tag)
    with store.using(), store.tempdir() as scratch:
        if os.path.isdir(path):
            src = open_source(path)
        else:  # opened once: what was checked is what is read
            src = open_source(path, plain_archive(path, scratch))
        try:
            repo = os.path.basename(os.path.normpath(path))
            for suffix in (".tar.gz", ".tgz", ".tar.zst", ".tar"):
                repo = repo.removesuffix(suffix)
            repo = reference.repository_from(repo)
            cands = find_images(src, ref, platform, repo)
            if tag is not None and len(cands) > 1:
                raise UserError(
                    f"{path} holds {len(cands)} images; choose one with --ref to tag it"
                )
            # Every name is checked before anything is stored.
            names = [
                [tag] if tag is not None else [_archive_name(t) for t in c.tags] for c in cands
            ]
            known: Known = {}
            images = [
                _store_candidate(store, src, c, tags, progress, known)
                for c, tags in zip(cands, names, strict=True)
            ]
            store.add_images(images)  # all at once: one write of the store's index
            return [(digest, tags) for digest, _size, tags, _mt in images]
        finally:
            src.close()
