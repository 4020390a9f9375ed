"""Reads through the mount come back byte for byte (unionfs/fuseread.py: READ answered in
libfuse's callback, a big one spliced from the file): sizes on both sides of the splice
bounds, unaligned starts, reads cut short by the end of the file, holes, files of the
upper, the page cache dropped between passes, and several readers at once."""

from __future__ import annotations

import hashlib
import os
import random
import re
from pathlib import Path

import pyfuse3
from support import debug_mount, join_children, mounted, needs_fuse, start_children

from unionfs import fuseread
from unionfs.fuseread import SPLICE_MIN
from unionfs.mount import READAHEAD_KB

KiB = 1 << 10
MiB = 1 << 20
DATA_SIZE = 5 * MiB + 777  # not a whole page: the last read of a pass comes short
# Read sizes: either side of the smallest spliced read, of a page, and of the largest
# read the kernel sends (1 MiB), and past it (the kernel splits those).
SIZES = [
    1,
    4095,
    4096,
    4097,
    SPLICE_MIN - 1,
    SPLICE_MIN,
    SPLICE_MIN + 1,
    128 * KiB,
    MiB - 8 * KiB,
    MiB - 1,
    MiB,
    MiB + 4097,
    3 * MiB,
]
HOLES_SIZE = 40 * MiB
HOLE_DATA = [(0, 5000), (8 * MiB + 123, 3 * MiB), (HOLES_SIZE - 9000, 9000)]


def _lowers(lows: list[Path]) -> dict[str, bytes]:
    """A random file, a sparse one, and a file under the upper's copy of a lower file."""
    rnd = random.Random(17)
    data = rnd.randbytes(DATA_SIZE)
    (lows[1] / "data").write_bytes(data)
    with open(lows[1] / "holes", "wb") as f:
        f.truncate(HOLES_SIZE)
        for off, n in HOLE_DATA:
            f.seek(off)
            f.write(rnd.randbytes(n))
    (lows[0] / "d").mkdir()
    (lows[0] / "d" / "small").write_bytes(b"tiny\n")
    (lows[0] / "empty").write_bytes(b"")
    return {
        "data": data,
        "holes": (lows[1] / "holes").read_bytes(),
        "d/small": b"tiny\n",
        "empty": b"",
    }


def _direct_reads(path: Path, want: bytes) -> None:
    """O_DIRECT reads, each a READ of its own size and offset (up to 1 MiB each), at
    aligned and unaligned starts and ending at, across or past the end of the file."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    try:
        end = len(want)
        for size in SIZES:
            buf = bytearray(size)
            for off in sorted({0, 1, 4095, 8192, max(0, end - size), max(0, end - size // 2)}):
                n = os.preadv(fd, [buf], off)
                assert n == min(size, max(0, end - off)), (path.name, size, off, n)
                assert buf[:n] == want[off : off + n], (path.name, size, off)
            assert os.preadv(fd, [buf], end) == 0, (path.name, size)
            assert os.preadv(fd, [buf], end + 12345) == 0, (path.name, size)
    finally:
        os.close(fd)


def _buffered_passes(path: Path, want: bytes) -> None:
    """Whole-file reads through the page cache with several buffer sizes, the mount's
    copy dropped before each, so that every pass is read from the daemon."""
    digest = hashlib.sha256(want).hexdigest()
    for chunk in (MiB, 4096, MiB + 7, 3 * MiB):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            h = hashlib.sha256()
            buf = bytearray(chunk)
            while n := os.readv(fd, [buf]):
                h.update(buf[:n])
            assert h.hexdigest() == digest, (path.name, chunk)
        finally:
            os.close(fd)


@needs_fuse
def test_reads_come_back_exactly(layers: tuple, tmp_path: Path) -> None:
    lows, upper, work, mnt = layers
    files = _lowers(lows)
    log = tmp_path / "daemon.log"
    with debug_mount(lows, mnt, log, upper, work):
        # A file of the upper: written through the mount, partly over a copied-up lower.
        rnd = random.Random(3)
        new = rnd.randbytes(2 * MiB + 5)
        (mnt / "new").write_bytes(new)
        files["new"] = new
        with open(mnt / "data", "r+b") as f:
            f.seek(MiB - 3)
            f.write(b"X" * 10_000)
        files["data"] = files["data"][: MiB - 3] + b"X" * 10_000 + files["data"][MiB - 3 + 10_000 :]
        for name, want in files.items():
            _direct_reads(mnt / name, want)
            _buffered_passes(mnt / name, want)
        assert (lows[1] / "data").read_bytes()[MiB - 3 : MiB] != b"XXX"  # the lower unchanged
    text = log.read_text()  # whole once the daemon has left
    # Answered in libfuse's callback; the kernel's sequential reads fit the pipe whole,
    # and both ways were taken.
    line = next(ln for ln in text.splitlines() if "INIT: reads answered" in ln)
    assert int(line.rsplit(" ", 2)[-2]) >= READAHEAD_KB << 10, line
    spliced, copied = re.findall(r"reads: (\d+) spliced, (\d+) copied", text)[-1]
    assert int(spliced) > 100 and int(copied) > 100, (spliced, copied)


def _reader(path: Path, want: bytes, seed: int) -> None:
    rnd = random.Random(seed)
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    try:
        for _ in range(150):
            size = rnd.choice(SIZES)
            off = rnd.randrange(len(want))
            buf = bytearray(size)
            n = os.preadv(fd, [buf], off)
            assert buf[:n] == want[off : off + size], (seed, size, off, n)
            assert n == min(size, len(want) - off)
    finally:
        os.close(fd)


@needs_fuse
def test_readers_at_once(layers: tuple) -> None:
    """Six processes reading big and small pieces of two files at once: each reply goes
    through the daemon's one pipe whole, never mixed with another's."""
    lows, upper, work, mnt = layers
    files = _lowers(lows)
    with mounted(lows, mnt, upper, work, strict=True):
        jobs = [
            (_reader, (mnt / name, files[name], seed))
            for seed, name in enumerate(["data", "holes"] * 3)
        ]
        assert join_children(start_children(jobs), 240, mnt) == [0] * len(jobs)
        # Buffered too, two at once over the same file, its pages dropped first.
        fd = os.open(mnt / "data", os.O_RDONLY)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)
        jobs2 = [(_buffered_passes, (mnt / "data", files["data"])) for _ in range(2)]
        assert join_children(start_children(jobs2), 240, mnt) == [0, 0]


def test_the_read_hook_changes_nothing_without_a_session() -> None:
    """pyfuse3 (its symbol is in this build) with no session yet: nothing is written; a
    file that is not pyfuse3's is refused too."""
    assert fuseread.install(pyfuse3.__file__ or "", os.open, memoryview) == "pyfuse3 has no session"
    assert isinstance(fuseread.install(os.devnull, os.open, memoryview), str)
