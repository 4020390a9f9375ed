"""Compressed streams: which compression a stream has, by its magic number, and a
reader that decompresses it.

Image layers, `docker save` archives and `ADD` archives are all recognised here,
by their first bytes and never by a file name or media type (both are often
wrong). Each reader decides which kinds it takes: OCI layers are gzip or zstd
(what a manifest's media types can say), whole archives and `ADD` also take
bzip2 and xz, as docker does.
"""

from __future__ import annotations

import io
import lzma
import zlib
from typing import IO, Any

import zstandard

GZIP, BZIP2, XZ, ZSTD, NONE = "gzip", "bzip2", "xz", "zstd", "none"
ALL = (GZIP, BZIP2, XZ, ZSTD)
_MAGIC = {
    GZIP: b"\x1f\x8b",
    BZIP2: b"BZh",
    XZ: b"\xfd7zXZ\x00",
    ZSTD: b"\x28\xb5\x2f\xfd",
}
TAR_BLOCK = 512
HEAD = TAR_BLOCK
"""How many first bytes `kind_of` reads: a whole tar header."""


def is_tar_header(block: bytes) -> bool:
    """Whether `block` is a tar header: ustar magic, or a checksum that adds up (old
    v7 and GNU headers)."""
    if len(block) < TAR_BLOCK:
        return False
    if block[257:262] == b"ustar":
        return True
    try:
        chk = int(block[148:156].split(b"\0", 1)[0].strip() or b"-1", 8)
    except ValueError:
        return False
    return chk == sum(block[:148]) + 256 + sum(block[156:TAR_BLOCK])


def kind_of(head: bytes, kinds: tuple[str, ...] = ALL) -> str:
    """The compression among `kinds` that `head` (a stream's first bytes) starts with,
    or NONE. A plain tar whose first member's name begins like a magic number (`BZh...`
    is bzip2's) is a tar: its first block is a valid header, which compressed data is
    not (the odds are those of a checksum matching by chance)."""
    if is_tar_header(head[:TAR_BLOCK]):
        return NONE
    return next((k for k in kinds if head.startswith(_MAGIC[k])), NONE)


ERRORS: tuple[type[Exception], ...] = (
    OSError,  # gzip's BadGzipFile among them
    EOFError,
    zlib.error,
    lzma.LZMAError,
    zstandard.ZstdError,
)
"""What a decompressing reader raises on a corrupt or truncated stream."""


def reader(kind: str, raw: IO[bytes]) -> Any:
    """A stream of `raw` decompressed as `kind` (NONE: `raw` itself); concatenated
    gzip members and zstd frames are read through, as gzip(1) and zstd(1) do."""
    if kind == GZIP:
        import gzip

        return gzip.GzipFile(fileobj=raw, mode="rb")
    if kind == BZIP2:
        import bz2

        return bz2.BZ2File(raw)
    if kind == XZ:
        return lzma.LZMAFile(raw)
    if kind == ZSTD:
        return zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True)
    return raw


class Prefixed(io.RawIOBase):
    """A stream with some already-read bytes put back in front."""

    def __init__(self, prefix: bytes, src: Any) -> None:
        self.prefix = prefix
        self.src = src

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        if self.prefix:
            n = min(len(b), len(self.prefix))
            b[:n] = self.prefix[:n]
            self.prefix = self.prefix[n:]
            return n
        data = self.src.read(len(b))
        b[: len(data)] = data
        return len(data)


def read_head(src: Any, n: int = HEAD) -> bytes:
    """Up to `n` first bytes of a stream (a pipe or socket may give fewer per read)."""
    head = b""
    while len(head) < n:
        more = src.read(n - len(head))
        if not more:
            break
        head += more
    return head


def decompressed(src: Any, kinds: tuple[str, ...] = ALL) -> tuple[Any, str]:
    """(`src` decompressed, its kind), for a stream that cannot seek back."""
    head = read_head(src)
    kind = kind_of(head, kinds)
    raw = io.BufferedReader(Prefixed(head, src), 1 << 16)
    return reader(kind, raw), kind
