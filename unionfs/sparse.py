"""Sparse tar members: their data regions, and writing them with the holes left as holes.

tarfile reads a sparse member (GNU old, PAX 0.0, 0.1 and 1.0) as a file whose
holes are zeros; written that way, a few KiB of archive become gigabytes of
disk. Docker and containers/storage seek over the holes, and so does pyunion,
for image layers (`image/unpack.py`) and `ADD` (`build/copier.py`) alike: the
regions' data lie one after the other in the archive, from the member's
`offset_data`, and each is written at its offset.
"""

from __future__ import annotations

import os
import tarfile
from typing import IO, cast


class SparseError(ValueError):
    """A sparse map that does not describe a file (the caller names the member)."""


def data_regions(m: tarfile.TarInfo) -> list[tuple[int, int]] | None:
    """A sparse member's (offset, length) data regions, in order and inside its size,
    without the empty slots of an old GNU header; None for a plain member."""
    if not m.issparse():
        return None
    raw = cast("list[tuple[int, int]]", m.sparse)  # typeshed says bytes: it is not
    regions = [(int(off), int(n)) for off, n in raw if n != 0]
    end = 0
    for offset, length in regions:
        if offset < end or length < 0 or offset + length > m.size:
            raise SparseError("its sparse map is out of order or range")
        end = offset + length
    return regions


def stored_size(m: tarfile.TarInfo, regions: list[tuple[int, int]] | None) -> int:
    """What the archive holds of the member: a sparse one's holes take no room in it."""
    return m.size if regions is None else sum(n for _, n in regions)


def open_data(tf: tarfile.TarFile, m: tarfile.TarInfo, regions: list[tuple[int, int]]) -> IO[bytes]:
    """The archive's stream at the member's stored data, once it is sure to hold all of it
    (call while iterating, with `m` the member just read: `tf.offset` is the next header)."""
    if stored_size(m, regions) > tf.offset - m.offset_data:
        raise SparseError("its sparse map names more data than it holds")
    f = tf.fileobj
    assert f is not None
    f.seek(m.offset_data)
    return cast("IO[bytes]", f)


def write_regions(src: IO[bytes], fd: int, regions: list[tuple[int, int]], size: int) -> None:
    """Each region's bytes from `src` (read forward) at its offset in `fd`; then `fd` is
    made `size` bytes long, the holes left as holes."""
    for offset, length in regions:
        while length > 0:
            chunk = src.read(min(length, 1 << 20))
            if not chunk:
                raise EOFError("the archive ends inside a sparse file's data")
            view = memoryview(chunk)
            while view:
                n = os.pwrite(fd, view, offset)
                view = view[n:]
                offset += n
            length -= len(chunk)
    os.ftruncate(fd, size)
