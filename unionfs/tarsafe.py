"""tarfile's pax header parsing without its quadratic regular expressions.

Python's tarfile before 3.11.10 (3.12.6, 3.13.0) looks for `hdrcharset` and
for GNU sparse 0.0 records with searches like `\\d+ hdrcharset=` over the whole
pax header (CVE-2024-6232): a header of a few MB of digits, 2 KiB once
gzipped, keeps the search busy for hours, and every layer, `ADD` archive and
`docker save` archive goes through that parser. Importing this module hands
tarfile a `re` whose three searches start only where a run of digits starts
(`(?<!\\d)`), which finds the same matches in linear time; every other use of
`re` is tarfile's own. Every archive pyunion reads is opened with `open_tar`.
Debian's 3.11.2 has the fix since 3.11.2-6+deb12u4 (such a header is then
refused as invalid); this module is for any other interpreter the venv uses.

tarfile also reads a pax or GNU long-name header whole into memory, whatever
size it declares: a layer of 128 KB (gzip) held one 100 MB name, read at once,
then made fifty million nested directories of it. `open_tar` reads through a
TarInfo that refuses such a header over 1 MiB, as Go's archive/tar does
(`maxSpecialFileSize`, so containers/image and podman): one line, nothing made.
"""

from __future__ import annotations

import re
import tarfile
from typing import Any

# tarfile's pattern -> the same pattern anchored at the start of a run of digits.
_LINEAR = {
    rb"\d+ hdrcharset=([^\n]+)\n": re.compile(rb"(?<!\d)\d+ hdrcharset=([^\n]+)\n"),
    rb"\d+ GNU.sparse.offset=(\d+)\n": re.compile(rb"(?<!\d)\d+ GNU.sparse.offset=(\d+)\n"),
    rb"\d+ GNU.sparse.numbytes=(\d+)\n": re.compile(rb"(?<!\d)\d+ GNU.sparse.numbytes=(\d+)\n"),
}


class _Re:
    """`re` as tarfile sees it: the searches above made linear, all else unchanged."""

    def __getattr__(self, name: str) -> Any:
        return getattr(re, name)

    @staticmethod
    def search(pattern: Any, string: Any, flags: int = 0) -> Any:
        linear = _LINEAR.get(pattern) if not flags else None
        return linear.search(string) if linear is not None else re.search(pattern, string, flags)

    @staticmethod
    def finditer(pattern: Any, string: Any, flags: int = 0) -> Any:
        linear = _LINEAR.get(pattern) if not flags else None
        if linear is not None:
            return linear.finditer(string)
        return re.finditer(pattern, string, flags)


if getattr(tarfile, "re", None) is re:
    tarfile.re = _Re()  # type: ignore[attr-defined]


MAX_SPECIAL = 1 << 20  # bytes of a pax or GNU long-name header: Go's maxSpecialFileSize
_SPECIAL = {
    tarfile.GNUTYPE_LONGNAME: "GNU long name",
    tarfile.GNUTYPE_LONGLINK: "GNU long link",
    tarfile.XHDTYPE: "pax",
    tarfile.XGLTYPE: "pax global",
    tarfile.SOLARIS_XHDTYPE: "pax",
}


class HeaderTooLarge(tarfile.ReadError):
    """A pax or GNU long-name header larger than MAX_SPECIAL."""


class _TarInfo(tarfile.TarInfo):
    """tarfile's TarInfo, refusing a pax or GNU long-name header larger than MAX_SPECIAL
    before tarfile reads it whole."""

    def _proc_member(self, tf: tarfile.TarFile) -> tarfile.TarInfo:
        kind = _SPECIAL.get(self.type)
        if kind is not None and self.size > MAX_SPECIAL:
            raise HeaderTooLarge(
                f"a {kind} header of {self.size} bytes (at most {MAX_SPECIAL} are read)"
            )
        return super()._proc_member(tf)  # type: ignore[misc,no-any-return]


def open_tar(*args: Any, **kwargs: Any) -> tarfile.TarFile:
    """`tarfile.open`, for an archive that may be hostile (this module is loaded, headers
    are read through `_TarInfo`)."""
    kwargs.setdefault("tarinfo", _TarInfo)
    return tarfile.open(*args, **kwargs)


def forget_members(tf: tarfile.TarFile) -> None:
    """Drop tarfile's record of the members read or written so far (`TarFile.members`,
    400-500 bytes each, kept for random access): a stream read or written once never
    looks back, and a layer of a million empty files is a few MB gzipped."""
    members: list[tarfile.TarInfo] = tf.members  # type: ignore[attr-defined]
    members.clear()
