"""The build cache: which image state a step produced from which parent.

A step's key is the sha256 of its parent state's image ID without the times
of day (`ImageState.cache_id`: a step run again keeps the entries after it) and
of what the step does after substitution: the instruction's text, the build
arguments it sees (all of them for RUN, which gets them as environment
variables), and for COPY and ADD the digest of every source file's name, mode,
owner and bytes after the ignore rules (`sources.SourceTree.digest`). A `COPY
--from` step has two keys: one with the source stage's ID standing for its
content (found without mounting it), and one with the digest of what it copies,
as buildah keys it. The history text the step records is in its key as well, so a
hit gives what the step would have written (buildah compares it too). The value
is the state after the step: its full config (history included) and its layer
descriptors, so a hit costs one small file read and no layer work, and the same
parent gives the same child ID, on and on down the Containerfile.

Entries live in STORE/build-cache/, one JSON file per key. They keep no layer
alive: an entry whose layers `rmi` has removed is a miss (and is dropped).

Each entry holds its state's whole config, history included, so what a build
writes grows with the square of its steps: an entry is at most what `get` reads
back (`MAX_ENTRY`), and one build writes at most `MAX_WRITTEN` of them (a 200 KB
Containerfile of 20,000 ENV lines wrote 5 GB in five minutes, and went on).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from typing import Any

from .. import jsondoc
from ..errors import UserError
from ..image.store import Store, write_json_atomic

CACHE_DIR = "build-cache"
# In every key: entries written before what a step records changed (its history became
# buildah's, and a RUN that changes nothing got a layer) miss once, not give the old.
KEY_VERSION = 2
MAX_ENTRY = 1 << 22
MAX_WRITTEN = 64 << 20  # bytes of entries one build writes: sixteen of the largest


def step_key(parent_id: str, *parts: Any) -> str:
    data = json.dumps([KEY_VERSION, parent_id, *parts], sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(data.encode("utf-8", "surrogateescape")).hexdigest()


class BuildCache:
    def __init__(self, store: Store) -> None:
        self.store = store
        self.dir = os.path.join(store.root, CACHE_DIR)
        self.written = 0  # bytes of entries this build wrote (MAX_WRITTEN)

    def _path(self, key: str) -> str:
        return os.path.join(self.dir, key + ".json")

    def get(self, key: str) -> tuple[dict[str, Any], list[dict[str, Any]]] | None:
        """(config, layer descriptors) stored for `key`, if all its layers are still here."""
        try:
            with open(self._path(key), "rb") as f:
                entry = jsondoc.parse(f.read(MAX_ENTRY), "a build cache entry")
            config, layers = entry["config"], entry["layers"]
            diff_ids = config["rootfs"]["diff_ids"]
            if not isinstance(layers, list) or len(layers) != len(diff_ids):
                raise ValueError("layers and diff_ids differ")
            for desc, diff_id in zip(layers, diff_ids, strict=True):
                if not (self.store.has_layer(diff_id) and self.store.has_blob(desc["digest"])):
                    raise ValueError("a layer is gone")
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError, UserError):
            with contextlib.suppress(OSError):
                os.unlink(self._path(key))
            return None
        return config, layers

    def put(self, key: str, config: dict[str, Any], layers: list[dict[str, Any]]) -> None:
        if self.written > MAX_WRITTEN:
            raise UserError(
                f"the build's steps take more than {MAX_WRITTEN} bytes of build cache "
                "(configs too large, or too many steps; --layers=false keeps no cache)"
            )
        os.makedirs(self.dir, mode=0o700, exist_ok=True)  # private, like the rest of the store
        self.written += write_json_atomic(
            self._path(key),
            {"config": config, "layers": layers},
            MAX_ENTRY,
            "the step's image config is too large",
        )
