"""The two kinds of error pyunion has.

Inside the filesystem the only currency is errno: `FsError` carries one and the
FUSE adaptor turns it (and any stray OSError) into a FUSE reply in one place.
Outside it, `UserError` is a mistake by the user: the CLI prints its one-line
message and exits with its code, never a traceback. Text from an image in such
a message goes through `printable` (image/safetext.py says why); it lives here,
where the container's init finds it loaded before it leaves the host's tree.
"""

from __future__ import annotations

import os


class FsError(OSError):
    """A filesystem operation failed with `errno`."""

    def __init__(self, err: int, msg: str | None = None) -> None:
        super().__init__(err, msg or os.strerror(err))


class UserError(Exception):
    """Bad input or environment: printed as one line, exit with `code`."""

    def __init__(self, msg: str, code: int = 1) -> None:
        super().__init__(msg)
        self.code = code


_NAMED = {"\t": "\\t", "\n": "\\n", "\r": "\\r"}


def _escape(ch: str) -> str:
    """`ch` as Python's unicode_escape writes it, without that codec: the container's init
    prints with this once the host's tree, where the codec would be loaded from, is gone."""
    n = ord(ch)
    if ch in _NAMED:
        return _NAMED[ch]
    return f"\\x{n:02x}" if n < 0x100 else f"\\u{n:04x}" if n < 0x10000 else f"\\U{n:08x}"


def printable(text: object) -> str:
    """`text` with every non-printable character shown as its escape."""
    s = text if isinstance(text, str) else str(text)
    if s.isprintable():
        return s
    return "".join(ch if ch.isprintable() else _escape(ch) for ch in s)
