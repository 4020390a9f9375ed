"""Open file and directory handles."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .inodes import Node
    from .resolve import Entry


@dataclass(eq=False)
class Handle:
    """An open file: `fd` is the real file in layer `layer` (re-pointed on copy-up)."""

    fd: int
    node: Node
    layer: int
    writable: bool


@dataclass(eq=False)
class DirHandle:
    """An open directory: a snapshot of its listing, taken at the first readdir."""

    node: Node
    entries: list[tuple[bytes, Entry]] | None = None
    extra: dict[str, object] = field(default_factory=dict)
