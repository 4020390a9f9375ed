"""The two kinds of error pyunion has.

Inside the filesystem the only currency is errno: `FsError` carries one and the
FUSE adaptor turns it (and any stray OSError) into a FUSE reply in one place.
Outside it, `UserError` is a mistake by the user: the CLI prints its one-line
message and exits with its code, never a traceback.
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
