"""Registries: `pull`, `push`, `login`, `logout` over the OCI distribution API.

What users type is read by `image.reference.parse_remote` (docker's short names,
`docker://`). Modules: `auth` (credential files, registry names and
`WWW-Authenticate` challenges), `client` (the `/v2/` protocol on httpx and trio:
auth, retries, manifests, blobs, uploads), `pull` and `push` (what moves, into
and out of the image store), `locations` (where blobs were seen, for
cross-repository mounts), `cli`; progress bars are `unionfs.progress`'s, as import's.
"""

from __future__ import annotations

from .client import Options, RegistryError
from .pull import pull
from .push import push

__all__ = ["Options", "RegistryError", "pull", "push"]
