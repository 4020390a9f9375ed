"""Images: a store of layers shared between images, OCI and docker archive import, commit.

The public face of the package; the CLI (`cli.py`) is a thin layer over it.
Modules: `store` (the on-disk store, its atomicity and privacy), `oci` (reading
layouts and archives), `schema` (the shapes of image JSON, checked before use),
`reference` (image names), `safetext` (printing text that came from an image),
`unpack` (hostile-input-safe layer extraction), `load` (import), `commit` (an
upper directory as a new layer), `export`.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING, Any

from ..errors import UserError
from .store import Image, Store, default_store

if TYPE_CHECKING:
    from .commit import Changes, commit, write_layer_tar
    from .export import export_image
    from .load import import_image

# Import, export and commit pull in tar, compression and the registry's formats: loaded
# on first use, so that `pyunion run IMAGE` (which only reads the store) starts fast.
_LAZY = {
    "Changes": "commit",
    "commit": "commit",
    "write_layer_tar": "commit",
    "export_image": "export",
    "import_image": "load",
}


def __getattr__(name: str) -> Any:
    mod = _LAZY.get(name)
    if mod is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{mod}", __name__), name)
    globals()[name] = value
    return value


class _Package(types.ModuleType):
    """Keeps `unionfs.image.commit` the function, as the eager import did.

    Importing a submodule binds it on its package under its own name; the submodule
    `commit` would then hide the function `commit`. The function wins here.
    """

    def __setattr__(self, name: str, value: Any) -> None:
        if _LAZY.get(name) == name and isinstance(value, types.ModuleType):
            value = getattr(value, name)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


__all__ = [
    "Changes",
    "Image",
    "Store",
    "commit",
    "default_store",
    "export_image",
    "import_image",
    "resolve_config",
    "resolve_layers",
    "write_layer_tar",
]


def resolve_layers(ref: str, store: str | None = None) -> list[str]:
    """The layer directories of the image `ref` in the store, TOP FIRST (as lowerdir wants).

    `store` is the store directory (default: $PYUNION_STORE, else under
    $XDG_DATA_HOME or ~/.local/share). Raises UserError if the image is unknown.
    """
    try:
        s = Store(store, create=False)
        img = s.lookup(ref)
    except UserError as e:
        raise UserError(f"{ref!r} is neither a directory nor an image: {e}", e.code) from None
    for diff_id in img.diff_ids:
        if not s.has_layer(diff_id):
            raise UserError(f"image {ref!r}: layer {diff_id} is missing from the store")
    dirs = s.lower_dirs(img.diff_ids)
    if not dirs:
        raise UserError(f"image {ref!r} has no layers")
    return dirs


def resolve_config(ref: str, store: str | None = None) -> dict[str, Any]:
    """The FULL OCI image config JSON of `ref` (architecture, os, rootfs, history, ...).

    What `run` wants is its "config" section (may be missing or null): Env (list of
    "K=V"), WorkingDir, User, Entrypoint and Cmd (lists), ExposedPorts, Labels, ...,
    e.g. `resolve_config(ref).get("config") or {}`. Its shape was checked by
    `schema.ImageConfig`: those that are present are strings or lists of strings
    without NUL (Entrypoint, Cmd, Env may be null).
    """
    return Store(store, create=False).lookup(ref).config
