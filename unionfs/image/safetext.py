"""Text that came from an image, made safe to print on a terminal.

History entries, comments, labels and file names in an image are written by
whoever built it. Printed raw, an escape sequence in them could retitle the
terminal, hide lines or fake output; a newline could forge a second message.
Every such text goes through `printable` before it is shown: each character
that is not printable (controls, escapes, bidirectional overrides, line and
paragraph separators, lone surrogates) is shown as a Python escape (`\\x1b`,
`\\u202e`), the rest as it is. The data itself is kept unchanged.
"""

from __future__ import annotations

from ..errors import UserError
from ..errors import printable as printable  # its home: init prints with it too


class ImageError(UserError):
    """A user error whose message may quote the image (names, paths, JSON): printed escaped,
    so it stays one line and cannot reach the terminal's control sequences."""

    def __init__(self, msg: str, code: int = 1) -> None:
        super().__init__(printable(msg), code)
