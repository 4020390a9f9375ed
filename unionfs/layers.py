"""The layer stack: the upper (index 0, absent on a read-only mount), the lowers (1..n, top first).

Each layer is held open by a directory fd; every later access is an `*at`
call relative to an fd of a directory inside that layer, one name at a time
and without following symlinks, so a layer's symlink can never lead the
daemon out of its tree.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass

from .errors import UserError
from .tree import DIR_FLAGS


@dataclass
class Layer:
    index: int
    path: str
    fd: int
    dev: int
    ino: int


def open_dir_at(dirfd: int, name: bytes) -> int:
    """Open a directory below `dirfd` without following a symlink."""
    try:
        return os.open(name, DIR_FLAGS, dir_fd=dirfd)
    except PermissionError:
        # An unreadable directory can still be used as a dir fd for *at calls.
        return os.open(
            name, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dirfd
        )


def _open_layer(path: str, index: int, what: str) -> Layer:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise UserError(f"{what} {path!r} does not exist") from None
    except OSError as e:
        raise UserError(f"{what} {path!r}: {e.strerror}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise UserError(f"{what} {path!r} is not a directory")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as e:
        raise UserError(f"{what} {path!r}: {e.strerror}") from None
    return Layer(index, os.path.abspath(path), fd, st.st_dev, st.st_ino)


class LayerStack:
    """`layers[0]` is the upper or None; `layers[1:]` are the lowers, top first."""

    def __init__(self, lowers: list[str], upper: str | None) -> None:
        if not lowers and upper is None:
            raise UserError("no layers given")
        self.layers: list[Layer | None] = [None]
        try:
            if upper is not None:
                self.layers[0] = _open_layer(upper, 0, "upper directory")
            for i, path in enumerate(lowers, start=1):
                self.layers.append(_open_layer(path, i, "layer"))
        except BaseException:
            self.close()
            raise
        devs: list[int] = []
        for layer in self.layers:
            if layer is not None and layer.dev not in devs:
                devs.append(layer.dev)
        self.devs = devs

    @property
    def upper(self) -> Layer | None:
        return self.layers[0]

    @property
    def writable(self) -> bool:
        return self.layers[0] is not None

    def fd(self, index: int) -> int:
        """The directory fd of the layer at `index` (0: the upper, which must exist)."""
        layer = self.layers[index]
        assert layer is not None
        return layer.fd

    def root_chain(self) -> tuple[int, ...]:
        return tuple(layer.index for layer in self.layers if layer is not None)

    def close(self) -> None:
        for layer in self.layers:
            if layer is not None and layer.fd >= 0:
                os.close(layer.fd)
                layer.fd = -1
