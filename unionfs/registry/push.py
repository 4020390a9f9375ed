"""`pyunion push`: an image of the store to a registry, uploading only what it lacks.

For each layer and the config: HEAD tells whether the repository has the
blob; if not, and the blob was seen in another repository of the same registry
(pulled from it or pushed to it), a cross-repository mount is asked for; only
then is it uploaded, in one PUT or, when larger than the chunk size, in PATCH
chunks that resume after a transient failure. Blobs go as they are in the
store (same bytes, same digests), and the manifest last, byte for byte, so the
image keeps its manifest digest and image ID wherever it is pulled.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Awaitable, Callable

import trio

from ..image.reference import RemoteReference, parse_remote
from ..image.store import Image, Store, short_id
from ..progress import Bars
from . import locations
from .auth import lookup as lookup_creds
from .client import Client, Options, RegistryError, push_scope
from .pull import PARALLEL, run_all

CHUNK = 64 << 20


async def _push_blob(
    client: Client,
    store: Store,
    ref: RemoteReference,
    digest: str,
    bars: Bars,
    limit: trio.CapacityLimiter,
    chunk: int,
    uploaded: list[str],
) -> None:
    repo = ref.path
    label = f"Copying blob {short_id(digest)}"
    path = store.blob_path(digest)
    try:
        size = os.path.getsize(path)
    except OSError:
        raise RegistryError(f"blob {digest} is missing from the store {store.root}") from None
    async with limit:
        if await client.blob_exists(repo, digest, push_scope(repo)):
            bars.note(f"{label} skipped: already exists")
            return
        location = None
        for src in locations.candidates(store.root, ref.domain, digest, repo):
            location = await client.start_upload(repo, digest, mount_from=src)
            if location is None:
                bars.note(f"{label} mounted from {src}")
                return
            break  # refused: the registry opened an ordinary upload instead
        if location is None:
            location = await client.start_upload(repo)
        assert location is not None
        bar = bars.bar(label, size)
        await client.upload(repo, location, path, size, digest, chunk, bar.update)
        bar.done("done")
        uploaded.append(digest)


async def _push(
    store: Store, img: Image, ref: RemoteReference, opts: Options, bars: Bars, chunk: int
) -> list[str]:
    creds = opts.creds or lookup_creds(ref.domain, ref.path, opts.authfile)
    body = store.read_blob(img.digest)
    digests = [d.get("digest") for d in img.manifest.get("layers") or []]
    blobs = list(dict.fromkeys([*digests, img.config_digest]))
    uploaded: list[str] = []
    async with Client(ref.domain, opts, creds) as client:
        limit = trio.CapacityLimiter(PARALLEL)
        jobs: list[Callable[[], Awaitable[None]]] = [
            functools.partial(_push_blob, client, store, ref, d, bars, limit, chunk, uploaded)
            for d in blobs
        ]
        await run_all(jobs)
        if ref.digest is not None and ref.digest != img.digest:
            raise RegistryError(f"{ref}: the image's manifest digest is {img.digest}")
        await client.put_manifest(ref.path, ref.tag or img.digest, body, img.media_type, img.digest)
    locations.record(store.root, ref.domain, ref.path, blobs)
    bars.note(f"Writing manifest to image destination ({short_id(img.digest)})")
    return uploaded


def push(
    name: str,
    dest: str | None,
    store: Store,
    opts: Options,
    quiet: bool = False,
    chunk: int = CHUNK,
) -> tuple[Image, RemoteReference, list[str]]:
    """Push the store's image `name` to `dest` (default: `name` read as a reference).

    Returns the image, where it went and the blobs actually uploaded.
    """
    img = store.lookup(name)
    ref = parse_remote(dest or name)
    bars = Bars(False if quiet else None)
    uploaded = trio.run(_push, store, img, ref, opts, bars, chunk)
    return img, ref, uploaded
