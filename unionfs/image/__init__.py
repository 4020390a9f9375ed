"""Images: a store of layers shared between images, OCI and docker archive import, commit."""

from __future__ import annotations

from ..errors import UserError


def resolve_layers(ref: str, store: str | None = None) -> list[str]:
    """The layer directories (top first) of the image `ref` in the store."""
    raise UserError(f"{ref!r} is not a directory (and images are not supported yet)")
