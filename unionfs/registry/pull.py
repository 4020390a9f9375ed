"""`pyunion pull`: an image from a registry into the store, fetching only what is missing.

1. The manifest (OCI or Docker v2 schema 2) by tag or digest; an index (OCI or
   Docker manifest list) is resolved to this machine's platform or `--platform`
   (`image.platforms`, as import does).
2. The config, verified; its DiffIDs name the layers. The index, manifest and
   config are checked by `image.schema` exactly as an import checks them
   (strict JSON, the shapes `run` and the store rely on) before anything is
   stored: a malformed one is one line, and the store is left as it was.
3. Every layer whose blob and unpacked tree are both in the store is skipped.
   The others are downloaded concurrently (6 at a time, like skopeo), each
   streamed through a pipe into the store's own import path
   (`image.load.store_layer_stream`) in a worker thread, so a layer is hashed,
   kept and unpacked while it arrives: its digest, size and DiffID are checked
   on the way, and nothing is published unless all three match. A blob that is
   in the store but not unpacked is unpacked from there.
4. Each verified layer is published at once (content-addressed, so a pull cut
   short leaves only complete layers that a later pull reuses); the config,
   the manifest and, last, the image's entry in index.json follow.
An interrupted pull therefore leaves nothing a later command trusts: at most
unreferenced complete layers (reused) and temporary files (removed by the next
command that uses the store).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import trio

from ..errors import UserError
from ..image import platforms, schema
from ..image.load import ExpansionError, store_layer_stream
from ..image.oci import ImageFormatError
from ..image.reference import RemoteReference, parse_remote
from ..image.schema import MAX_JSON
from ..image.store import (
    DOCKER_CONFIG,
    DOCKER_LAYER,
    DOCKER_LAYER_GZIP,
    DOCKER_LIST,
    DOCKER_MANIFEST,
    MT_CONFIG,
    MT_INDEX,
    MT_LAYER,
    MT_LAYER_GZIP,
    MT_LAYER_ZSTD,
    MT_MANIFEST,
    Image,
    Store,
    short_id,
)
from ..image.unpack import UnpackError
from ..progress import Bars
from . import locations
from .auth import lookup as lookup_creds
from .client import Client, Options, RegistryError

ACCEPT = f"{MT_MANIFEST}, {MT_INDEX}, {DOCKER_MANIFEST}, {DOCKER_LIST}"
LAYER_TYPES = {
    MT_LAYER,
    MT_LAYER_GZIP,
    MT_LAYER_ZSTD,
    DOCKER_LAYER,
    DOCKER_LAYER_GZIP,
    "application/vnd.oci.image.layer.nondistributable.v1.tar",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd",
    "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
}
PARALLEL = 6


@dataclass
class Descriptor:
    media_type: str
    digest: str
    size: int


def _descriptor(d: dict[str, Any]) -> Descriptor:
    """A descriptor of a document `_document` checked (digest and size are sound)."""
    return Descriptor(d.get("mediaType") or "", d["digest"], d["size"])


def _document(body: bytes, header: str, what: str) -> tuple[dict[str, Any], str]:
    """A manifest or index from the registry, checked as import checks one (`schema`):
    strict JSON of the right shape. Returns it and its media type."""
    obj = schema.parse_json(body, f"the manifest of {what}")
    if not isinstance(obj, dict):
        raise RegistryError(f"the manifest of {what} is not a JSON object")
    mtype = media_type(obj, header)
    if mtype in (MT_INDEX, DOCKER_LIST):
        schema.check(obj, schema.Index, f"the index of {what}")
    elif mtype in (MT_MANIFEST, DOCKER_MANIFEST):
        schema.check(obj, schema.Manifest, f"the manifest of {what}")
    else:
        raise RegistryError(f"{what}: unsupported manifest type {mtype!r}")
    return obj, mtype


def media_type(obj: dict[str, Any], header: str) -> str:
    """The manifest's own mediaType, else the Content-Type, else guessed from its shape."""
    mt = obj.get("mediaType")
    if isinstance(mt, str) and mt:
        return mt
    if header in (MT_MANIFEST, MT_INDEX, DOCKER_MANIFEST, DOCKER_LIST):
        return header
    return MT_INDEX if "manifests" in obj else MT_MANIFEST


def choose_platform(index: dict[str, Any], want: dict[str, str], what: str) -> Descriptor:
    try:
        chosen = platforms.select(index["manifests"], want)
    except platforms.NoMatchingPlatform as e:
        raise RegistryError(f"{what}: {e}") from None
    if not chosen:
        raise RegistryError(f"{what}: the index lists no images")
    return _descriptor(chosen[0])


def _store_error(e: OSError, store: Store, what: str) -> UserError:
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return UserError(f"out of space in the image store {store.root} while writing {what}")
    return UserError(f"{what}: {e.strerror or e}")


def _out_of_space(exc: BaseException) -> OSError | None:
    """The ENOSPC/EDQUOT behind an error that the unpacker reworded, if any."""
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return e
        e = e.__cause__ or e.__context__
    return None


async def run_all(jobs: list[Callable[[], Awaitable[None]]]) -> None:
    """Run jobs concurrently; the first failure cancels the others and is raised alone."""
    errors: list[BaseException] = []
    async with trio.open_nursery() as n:
        for job in jobs:

            async def wrapped(job: Callable[[], Awaitable[None]] = job) -> None:
                try:
                    await job()
                except Exception as e:  # noqa: BLE001 - the first one is raised below
                    if not errors:
                        errors.append(e)
                    n.cancel_scope.cancel()

            n.start_soon(wrapped)
    if errors:
        raise errors[0]


class Puller:
    def __init__(
        self, store: Store, client: Client, ref: RemoteReference, bars: Bars, tmp: str
    ) -> None:
        self.store, self.client, self.ref, self.bars, self.tmp = store, client, ref, bars, tmp
        self.limit = trio.CapacityLimiter(PARALLEL)
        self.downloaded: list[str] = []

    async def layer(self, desc: Descriptor, diff_id: str, n: int, total: int) -> None:
        store = self.store
        what = f"layer {n}/{total} ({short_id(desc.digest)})"
        label = f"Copying blob {short_id(desc.digest)}"
        if store.has_blob(desc.digest) and store.has_layer(diff_id):
            self.bars.note(f"{label} skipped: already exists")
            return
        async with self.limit:
            if store.has_blob(desc.digest):  # kept, not unpacked: unpack the local copy

                def local() -> dict[str, Any]:
                    with open(store.blob_path(desc.digest), "rb") as f:
                        return store_layer_stream(
                            store, self.tmp, f, diff_id, desc.digest, what, size=desc.size
                        )

                info = await trio.to_thread.run_sync(self._guard, local, what)
            else:
                bar = self.bars.bar(label, desc.size)
                info = await self._stream(desc, diff_id, what, bar.update)
                bar.done("done")
                self.downloaded.append(desc.digest)
            await trio.to_thread.run_sync(self._guard, lambda: self._publish(info), what)

    def _publish(self, info: dict[str, Any]) -> None:
        self.store.sync()
        info["publish"]()

    def _guard(self, fn: Callable[[], Any], what: str) -> Any:
        try:
            return fn()
        except OSError as e:
            raise _store_error(e, self.store, what) from None
        except UserError as e:
            full = _out_of_space(e)
            if full is not None:
                raise _store_error(full, self.store, what) from None
            raise

    async def _stream(
        self, desc: Descriptor, diff_id: str, what: str, progress: Callable[[int], None]
    ) -> dict[str, Any]:
        """Download into a pipe whose other end the store's layer import reads, in a thread."""
        r, w = os.pipe()
        with contextlib.suppress(OSError):
            fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, 1 << 20)
        box: dict[str, Any] = {}

        def consume() -> dict[str, Any]:
            with open(r, "rb", buffering=1 << 20) as f:
                return store_layer_stream(
                    self.store, self.tmp, f, diff_id, desc.digest, what, size=desc.size
                )

        async def consumer() -> None:
            try:
                box["info"] = await trio.to_thread.run_sync(self._guard, consume, what)
            except Exception as e:  # noqa: BLE001 - raised after the download ends
                box["error"] = e
                # Nothing more of a blob already refused: a server that sends it slowly,
                # or never finishes, is not waited for.
                nursery.cancel_scope.cancel()

        failed: Exception | None = None
        async with trio.open_nursery() as nursery:
            nursery.start_soon(consumer)
            out = trio.lowlevel.FdStream(w)
            try:
                await self.client.download(
                    self.ref.path, desc.digest, desc.size, out.send_all, what, progress
                )
            except trio.BrokenResourceError:
                pass  # the reader stopped early: its error says why
            except Exception as e:  # noqa: BLE001 - raised once the reader is done
                failed = e
            finally:
                await out.aclose()
        if failed is not None:
            raise failed
        if "error" in box:
            err = box["error"]
            if isinstance(err, (ImageFormatError, UnpackError)) and not isinstance(
                err, ExpansionError
            ):
                # Not a tar, or not this DiffID: say so only if the bytes are the right ones.
                await self.client.check_digest(self.ref.path, desc.digest, desc.size, what)
            raise err
        info: dict[str, Any] = box["info"]
        return info


async def _pull(
    store: Store, ref: RemoteReference, opts: Options, platform: dict[str, str] | None, bars: Bars
) -> tuple[str, list[str]]:
    creds = opts.creds or lookup_creds(ref.domain, ref.path, opts.authfile)
    what = str(ref)
    async with Client(ref.domain, opts, creds) as client:
        # Everything is checked (shapes as import checks them) before anything is stored.
        body, header, digest = await client.get_manifest(ref.path, ref.target, ACCEPT, what)
        man, mtype = _document(body, header, what)
        if mtype in (MT_INDEX, DOCKER_LIST):
            d = choose_platform(man, platform or platforms.host(), what)
            body, header, digest = await client.get_manifest(ref.path, d.digest, ACCEPT, what)
            man, mtype = _document(body, header, what)
        if mtype not in (MT_MANIFEST, DOCKER_MANIFEST):
            raise RegistryError(f"{what}: unsupported manifest type {mtype!r}")
        if man.get("schemaVersion") != 2:
            raise RegistryError(
                f"{what}: unsupported manifest schema version {man.get('schemaVersion')!r}"
            )
        cdesc = _descriptor(man["config"])
        if cdesc.media_type not in (MT_CONFIG, DOCKER_CONFIG):
            raise RegistryError(
                f"{what} is not a container image (config type {cdesc.media_type!r})"
            )
        if cdesc.size > MAX_JSON:
            raise RegistryError(
                f"{what}: config of {cdesc.size} bytes is too large (at most {MAX_JSON})"
            )
        layers = [_descriptor(x) for x in man["layers"]]
        for ld in layers:
            if ld.media_type not in LAYER_TYPES:
                raise RegistryError(f"{what}: unsupported layer type {ld.media_type!r}")
        if store.has_blob(cdesc.digest):
            config_bytes = store.read_blob(cdesc.digest)
        else:
            config_bytes = await client.get_blob_bytes(
                ref.path, cdesc.digest, cdesc.size, f"the config of {what}"
            )
        config = schema.load_object(config_bytes, schema.ImageConfig, f"the config of {what}")
        diff_ids = schema.diff_ids(config, [ld.digest for ld in layers], f"{what}: the manifest")

        with store.using(), store.tempdir() as tmp:
            puller = Puller(store, client, ref, bars, tmp)
            jobs: list[Callable[[], Awaitable[None]]] = []
            seen: set[str] = set()  # a blob listed twice has one DiffID (schema.diff_ids)
            for i, (ld, diff) in enumerate(zip(layers, diff_ids, strict=False)):
                if ld.digest in seen:
                    continue
                seen.add(ld.digest)
                jobs.append(functools.partial(puller.layer, ld, diff, i + 1, len(layers)))
            await run_all(jobs)
            try:
                store.put_blob_bytes(config_bytes, cdesc.digest, tmp)
                store.put_blob_bytes(body, digest, tmp)
            except OSError as e:
                raise _store_error(e, store, "the manifest") from None
            # Named while the store is held (see Store.add_image).
            tag = f"{ref.name}:{ref.tag}" if ref.tag else None
            store.add_image(digest, len(body), tag, mtype)
        locations.record(
            store.root, ref.domain, ref.path, [cdesc.digest] + [ld.digest for ld in layers]
        )
        bars.note(f"Writing manifest to image destination ({short_id(digest)})")
        return digest, puller.downloaded


def pull(
    text: str,
    store: Store,
    opts: Options,
    platform: dict[str, str] | None = None,
    quiet: bool = False,
) -> tuple[Image, list[str]]:
    """Pull `text` (a reference) into `store`; returns the image and the blobs downloaded."""
    ref = parse_remote(text)
    bars = Bars(False if quiet else None)
    digest, downloaded = trio.run(_pull, store, ref, opts, platform, bars)
    return store.lookup(digest), downloaded
