"""OCI image layouts written by hand: the image sources of the tests.

The tests need images pyunion did not make (so that importing, pulling and
building are checked against what the spec says, not against our own writer),
with exactly the blobs, configs and indexes a test wants, including broken ones.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

MANIFEST = "application/vnd.oci.image.manifest.v1+json"
INDEX = "application/vnd.oci.image.index.v1+json"
CONFIG = "application/vnd.oci.image.config.v1+json"
LAYER_TAR = "application/vnd.oci.image.layer.v1.tar"
REF_NAME = "org.opencontainers.image.ref.name"


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


class Layout:
    """An OCI image layout at `path`: blobs, `oci-layout` and `index.json` (read if present)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.blobs = path / "blobs" / "sha256"
        self.blobs.mkdir(parents=True, exist_ok=True)
        (path / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
        index = path / "index.json"
        self.index: dict[str, Any] = (
            json.loads(index.read_text())
            if index.exists()
            else {"schemaVersion": 2, "manifests": []}
        )

    def put(self, data: bytes, media_type: str) -> dict[str, Any]:
        """Store a blob; its descriptor."""
        d = sha(data)
        (self.blobs / d[7:]).write_bytes(data)
        return {"mediaType": media_type, "digest": d, "size": len(data)}

    def put_json(self, doc: dict[str, Any], media_type: str) -> dict[str, Any]:
        return self.put(json.dumps(doc).encode(), media_type)

    def put_file(self, src: Path, media_type: str = LAYER_TAR) -> dict[str, Any]:
        """Move a (large) file in as a blob, hashed while read in chunks."""
        h = hashlib.sha256()
        with open(src, "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
        size = src.stat().st_size
        os.rename(src, self.blobs / h.hexdigest())
        return {"mediaType": media_type, "digest": "sha256:" + h.hexdigest(), "size": size}

    def read(self, digest: str) -> bytes:
        return (self.blobs / digest[7:]).read_bytes()

    def read_json(self, digest: str) -> Any:
        return json.loads(self.read(digest))

    def image(
        self, layers: list[dict[str, Any]], diff_ids: list[str], config: dict[str, Any]
    ) -> dict[str, Any]:
        """Store an image's config (its rootfs from `diff_ids`) and manifest; the
        manifest's descriptor (not yet named in the index: see `tag`)."""
        cfg = {**config, "rootfs": {"type": "layers", "diff_ids": diff_ids}}
        return self.put_json(
            {
                "schemaVersion": 2,
                "mediaType": MANIFEST,
                "config": self.put_json(cfg, CONFIG),
                "layers": layers,
            },
            MANIFEST,
        )

    def platform_index(
        self, entries: list[tuple[dict[str, Any], dict[str, str]]]
    ) -> dict[str, Any]:
        """Store an image index of (manifest descriptor, platform) pairs; its descriptor."""
        return self.put_json(
            {
                "schemaVersion": 2,
                "mediaType": INDEX,
                "manifests": [{**desc, "platform": plat} for desc, plat in entries],
            },
            INDEX,
        )

    def tag(self, desc: dict[str, Any], ref: str) -> None:
        """Name `desc` as `ref` in index.json (written at once)."""
        self.index["manifests"].append({**desc, "annotations": {REF_NAME: ref}})
        (self.path / "index.json").write_text(json.dumps(self.index))

    def find(self, ref: str) -> dict[str, Any]:
        """The index.json descriptor named `ref`."""
        return next(
            d for d in self.index["manifests"] if d.get("annotations", {}).get(REF_NAME) == ref
        )
