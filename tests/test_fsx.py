"""fsx-style data integrity: random I/O on files that start in a lower layer, checked against a
model.

Each worker drives one file with random reads, writes at random offsets,
truncates up and down, mmap reads, shared mmap writes, fsyncs and re-opens,
and checks every read (and the size after every change) against an in-memory
model of the file. The file starts in a lower layer, so the first write open
copies it up; a read-only handle opened before that copy-up is kept and used
all along (it must see the new data). Several workers run at once on different
files, and two workers share one file: in lock step (every operation of either
is checked against one shared model) and concurrently on disjoint blocks.

At the end the upper file itself, a fresh pyunion mount and kernel overlayfs
over the same layers must all hold exactly the model's bytes.

Sizes: PYUNION_FSX_OPS sets the operations per worker (default 5000 in CI,
100000 with PYUNION_SOAK=1); PYUNION_FSX_SEED fixes the seed (it is printed).
"""

from __future__ import annotations

import contextlib
import mmap
import multiprocessing
import os
import random
import struct
import time
from pathlib import Path

import pytest
from support import join_children, kernel_overlay, mounted, needs_fuse, soak, start_children

OPS = int(os.environ.get("PYUNION_FSX_OPS", soak(5000, 100000)))
SEED = int(os.environ.get("PYUNION_FSX_SEED", int(time.time()) % 100000))
MAXLEN = 1 << 20  # the file never grows beyond this
PAGE = mmap.PAGESIZE

pytestmark = [needs_fuse, pytest.mark.timeout(300)]


class Mismatch(AssertionError):
    pass


class Model:
    """The expected content of the file; in shared memory when two workers share it."""

    def __init__(self, initial: bytes, shared: bool = False) -> None:
        if shared:
            self.buf: bytearray | mmap.mmap = mmap.mmap(-1, MAXLEN + 8)
        else:
            self.buf = bytearray(MAXLEN + 8)
        self.buf[8 : 8 + len(initial)] = initial
        self.size = len(initial)

    @property
    def size(self) -> int:
        return int(struct.unpack_from("<Q", self.buf, 0)[0])

    @size.setter
    def size(self, n: int) -> None:
        struct.pack_into("<Q", self.buf, 0, n)

    def get(self, off: int, n: int) -> bytes:
        end = min(off + n, self.size)
        return bytes(self.buf[8 + off : 8 + end]) if end > off else b""

    def write(self, off: int, data: bytes) -> None:
        size = self.size
        if off > size:
            self.buf[8 + size : 8 + off] = bytes(off - size)
        self.buf[8 + off : 8 + off + len(data)] = data
        self.size = max(size, off + len(data))

    def truncate(self, n: int) -> None:
        size = self.size
        if n < size:
            self.buf[8 + n : 8 + size] = bytes(size - n)
        self.size = n

    def all(self) -> bytes:
        return self.get(0, self.size)


def _diff(off: int, got: bytes, want: bytes) -> str:
    for i, (a, b) in enumerate(zip(got, want, strict=False)):
        if a != b:
            return f"first difference at file offset {off + i}: got {a:#x}, want {b:#x}"
    return f"length {len(got)} instead of {len(want)}"


class Worker:
    """One fsx process on one file. `lock` (if given) serialises it with a partner."""

    def __init__(
        self,
        path: str,
        model: Model,
        seed: int,
        ops: int,
        lock: object = None,
        blocks: tuple[int, int] | None = None,
    ) -> None:
        self.path = path
        self.model = model
        self.rng = random.Random(seed)
        self.seed = seed
        self.ops = ops
        self.lock = lock
        self.blocks = blocks  # (index, count): write only blocks b with b % count == index
        self.history: list[str] = []
        self.counts: dict[str, int] = {}

    # -- helpers -------------------------------------------------------------
    def fail(self, msg: str) -> None:
        tail = "\n  ".join(self.history[-25:])
        raise Mismatch(f"{self.path} seed {self.seed}: {msg}\n last operations:\n  {tail}")

    def check(self, what: str, off: int, got: bytes, n: int) -> None:
        want = self.model.get(off, n)
        if got != want:
            self.fail(f"{what}({off}, {n}): {_diff(off, got, want)}")

    def rand_range(self, size: int, maxlen: int = 65536) -> tuple[int, int]:
        off = self.rng.randrange(0, max(size, 1))
        n = self.rng.randint(1, maxlen)
        return off, n

    def my_offset(self, off: int, n: int) -> tuple[int, int]:
        """Clamp a write to one of this worker's blocks (disjoint mode)."""
        assert self.blocks is not None
        idx, count = self.blocks
        block = off // PAGE
        block -= block % count
        block += idx
        off = block * PAGE + self.rng.randrange(PAGE)
        n = min(n, (block + 1) * PAGE - off)
        return off, n

    # -- operations ----------------------------------------------------------
    def op_read(self) -> None:
        off, n = self.rand_range(self.model.size + 100)
        fd = self.rng.choice(self.read_fds())
        self.log(f"pread fd{fd} {off} {n}")
        self.check("pread", off, os.pread(fd, n, off), n)

    def op_write(self) -> None:
        off, n = self.rand_range(min(self.model.size + 65536, MAXLEN - 65536))
        if self.blocks:
            off, n = self.my_offset(off, n)
        data = self.rng.randbytes(n)
        self.log(f"pwrite {off} {n}")
        if os.pwrite(self.fd, data, off) != n:
            self.fail("short write")
        self.model.write(off, data)

    def op_truncate(self) -> None:
        size = self.model.size
        n = self.rng.choice(
            [
                0,
                self.rng.randrange(0, size + 1),
                self.rng.randrange(0, MAXLEN // 2),
                size + self.rng.randrange(1, 70000),
            ]
        )
        n = min(n, MAXLEN - 65536)
        self.log(f"ftruncate {n} (from {size})")
        if self.rng.random() < 0.3:
            os.truncate(self.path, n)  # setattr without a handle
        else:
            os.ftruncate(self.fd, n)
        self.model.truncate(n)

    def _map_range(self) -> tuple[int, int, int, int] | None:
        size = self.model.size
        if size == 0:
            return None
        off, n = self.rand_range(size)
        n = min(n, size - off)
        start = off - off % PAGE
        return off, n, start, off + n - start

    def op_mapread(self) -> None:
        r = self._map_range()
        if r is None:
            return
        off, n, start, length = r
        self.log(f"mapread {off} {n}")
        with mmap.mmap(self.fd, length, mmap.MAP_SHARED, mmap.PROT_READ, offset=start) as m:
            got = m[off - start : off - start + n]
        self.check("mapread", off, got, n)

    def op_mapwrite(self) -> None:
        r = self._map_range()
        if r is None:
            return
        off, n, start, length = r
        if self.blocks:
            off, n = self.my_offset(off, n)
            if off + n > self.model.size:
                return
            start = off - off % PAGE
            length = off + n - start
        data = self.rng.randbytes(n)
        self.log(f"mapwrite {off} {n}")
        with mmap.mmap(
            self.fd, length, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE, offset=start
        ) as m:
            m[off - start : off - start + n] = data
            if self.rng.random() < 0.5:
                m.flush()
        self.model.write(off, data)

    def op_fsync(self) -> None:
        self.log("fsync")
        (os.fdatasync if self.rng.random() < 0.5 else os.fsync)(self.fd)

    def op_dropcache(self) -> None:
        # Clean pages leave the page cache: the next reads come from the daemon.
        self.log("fadvise DONTNEED")
        os.posix_fadvise(self.fd, 0, 0, os.POSIX_FADV_DONTNEED)

    def op_reopen(self) -> None:
        self.log("close+open")
        os.close(self.fd)
        self.fd = os.open(self.path, os.O_RDWR)

    def op_stat(self) -> None:
        size = os.fstat(self.rng.choice([self.fd, self.ro_fd])).st_size
        if size != self.model.size:
            self.fail(f"fstat size {size}, want {self.model.size}")

    def locked(self) -> contextlib.AbstractContextManager[object]:
        return self.lock if self.lock is not None else contextlib.nullcontext()  # type: ignore[return-value]

    def read_fds(self) -> list[int]:
        return [self.fd, self.ro_fd]

    def log(self, s: str) -> None:
        self.history.append(s)
        if len(self.history) > 200:
            del self.history[:100]

    # -- the run ------------------------------------------------------------
    def run(self) -> None:
        # A handle on the lower file, opened before the copy-up and used to the end.
        with self.locked():
            self.ro_fd = os.open(self.path, os.O_RDONLY)
            if not self.blocks:
                self.check("pread-lower", 0, os.pread(self.ro_fd, MAXLEN, 0), MAXLEN)
            self.fd = os.open(self.path, os.O_RDWR)  # the copy-up
        ops = [
            (self.op_read, 30),
            (self.op_write, 30),
            (self.op_mapread, 8),
            (self.op_fsync, 3),
            (self.op_reopen, 2),
            (self.op_stat, 5),
            (self.op_dropcache, 4),
        ]
        if not self.blocks:
            ops += [(self.op_truncate, 6), (self.op_mapwrite, 8)]
        else:
            ops += [(self.op_mapwrite, 8)]
        funcs = [f for f, _ in ops]
        weights = [w for _, w in ops]
        for _ in range(self.ops):
            f = self.rng.choices(funcs, weights)[0]
            if self.lock is not None:
                with self.lock:  # type: ignore[attr-defined]
                    f()
                    if f is not self.op_read and not self.blocks:
                        self.op_stat()
            else:
                f()
                if f in (self.op_write, self.op_truncate, self.op_mapwrite):
                    self.op_stat()
            self.counts[f.__name__] = self.counts.get(f.__name__, 0) + 1
        with self.locked():
            os.fsync(self.fd)
            if not self.blocks:
                self.check("final", 0, os.pread(self.fd, MAXLEN, 0), MAXLEN)
                self.check("final-ro", 0, os.pread(self.ro_fd, MAXLEN, 0), MAXLEN)
        os.close(self.fd)
        os.close(self.ro_fd)


def _initial(rng: random.Random, size: int) -> bytes:
    return rng.randbytes(size)


def _setup(layers: tuple, names_sizes: list[tuple[str, int]]) -> dict[str, bytes]:
    lows = layers[0]
    rng = random.Random(SEED)
    contents = {}
    (lows[1] / "d").mkdir()
    for name, size in names_sizes:
        data = _initial(rng, size)
        # Half in the bottom layer under a merged directory, half at the top.
        where = lows[1] / "d" if len(contents) % 2 else lows[0]
        (where / name).write_bytes(data)
        os.chmod(where / name, 0o640)
        contents[name] = data
    (lows[0] / "d").mkdir()
    return contents


def _rel(name: str, i: int) -> str:
    return f"d/{name}" if i % 2 else name


def _verify_everywhere(layers: tuple, tmp_path: Path, expect: dict[str, bytes]) -> None:
    lows, upper, work, mnt = layers
    for i, (name, data) in enumerate(expect.items()):
        got = (upper / _rel(name, i)).read_bytes()
        assert got == data, f"upper {name}: {_diff(0, got, data)}"
    with mounted(lows, mnt, upper, work):
        for i, (name, data) in enumerate(expect.items()):
            got = (mnt / _rel(name, i)).read_bytes()
            assert got == data, f"remount {name}: {_diff(0, got, data)}"
            assert oct((mnt / _rel(name, i)).stat().st_mode & 0o7777) == oct(0o640)
    with kernel_overlay(lows, tmp_path / "kmnt", upper=upper, work=tmp_path / "kwork") as k:
        for i, (name, data) in enumerate(expect.items()):
            got = (k / _rel(name, i)).read_bytes()
            assert got == data, f"kernel overlayfs {name}: {_diff(0, got, data)}"


def _run_worker(w: Worker, out: str) -> None:
    w.run()
    with open(out, "wb") as f:
        f.write(w.model.all())
    print(f"fsx {w.path}: {w.ops} ops {sorted(w.counts.items())}")


def test_fsx_several_files_in_parallel(layers: tuple, tmp_path: Path) -> None:
    """Three workers, three files (one over 1 MiB: its copy-up runs in a worker thread)."""
    lows, upper, work, mnt = layers
    print(f"PYUNION_FSX_SEED={SEED} PYUNION_FSX_OPS={OPS}")
    files = [("a", 200_000), ("b", 1_000_001), ("c", 0)]
    initial = _setup(layers, files)
    with mounted(lows, mnt, upper, work):
        jobs = []
        for i, (name, _) in enumerate(files):
            model = Model(initial[name])
            w = Worker(str(mnt / _rel(name, i)), model, SEED + i, OPS)
            jobs.append((_run_worker, (w, str(tmp_path / f"model-{name}"))))
        codes = join_children(start_children(jobs), timeout=240, mnt=mnt)
        assert codes == [0] * len(jobs), f"fsx workers failed (seed {SEED}): {codes}"
    expect = {name: (tmp_path / f"model-{name}").read_bytes() for name, _ in files}
    _verify_everywhere(layers, tmp_path, expect)


def test_fsx_two_processes_one_file_lockstep(layers: tuple, tmp_path: Path) -> None:
    """Two workers take turns on one file, each with its own handles, one shared model."""
    lows, upper, work, mnt = layers
    print(f"PYUNION_FSX_SEED={SEED} PYUNION_FSX_OPS={OPS}")
    initial = _setup(layers, [("s", 300_000)])
    model = Model(initial["s"], shared=True)
    lock = multiprocessing.get_context("fork").Lock()
    with mounted(lows, mnt, upper, work):
        jobs = [
            (
                _run_worker,
                (
                    Worker(str(mnt / "s"), model, SEED + 10 + i, OPS // 2, lock=lock),
                    str(tmp_path / "model-s"),
                ),
            )
            for i in range(2)
        ]
        codes = join_children(start_children(jobs), timeout=240, mnt=mnt)
        assert codes == [0, 0], f"fsx workers failed (seed {SEED}): {codes}"
    _verify_everywhere(layers, tmp_path, {"s": model.all()})


def test_fsx_two_processes_one_file_concurrently(layers: tuple, tmp_path: Path) -> None:
    """Two workers at once on one file, each writing only its own pages, no lock."""
    lows, upper, work, mnt = layers
    print(f"PYUNION_FSX_SEED={SEED} PYUNION_FSX_OPS={OPS}")
    size = 600_000
    initial = _setup(layers, [("t", size)])
    with mounted(lows, mnt, upper, work):
        jobs = []
        for i in range(2):
            w = Worker(str(mnt / "t"), Model(initial["t"]), SEED + 20 + i, OPS // 2, blocks=(i, 2))
            # Reads of the partner's pages are not predictable: read only own data.
            w.op_read = _own_read(w)  # type: ignore[method-assign]
            w.op_mapread = w.op_read  # type: ignore[method-assign]
            w.op_stat = lambda: None  # type: ignore[method-assign]
            jobs.append((_run_worker, (w, str(tmp_path / f"model-t{i}"))))
        codes = join_children(start_children(jobs), timeout=240, mnt=mnt)
        assert codes == [0, 0], f"fsx workers failed (seed {SEED}): {codes}"
    m0 = (tmp_path / "model-t0").read_bytes()
    m1 = (tmp_path / "model-t1").read_bytes()
    # Merge: page p belongs to worker p % 2; beyond the initial size the longer one wins
    # for the bytes its partner never wrote (zeros from the partner's extension).
    n = max(len(m0), len(m1))
    m0, m1 = m0.ljust(n, b"\0"), m1.ljust(n, b"\0")
    merged = bytearray(n)
    for p in range(0, n, PAGE):
        src = m0 if (p // PAGE) % 2 == 0 else m1
        merged[p : p + PAGE] = src[p : p + PAGE]
    _verify_everywhere(layers, tmp_path, {"t": bytes(merged)})


def _own_read(w: Worker):  # type: ignore[no-untyped-def]
    def op_read() -> None:
        size = w.model.size
        if size == 0:
            return
        off, n = w.rand_range(size)
        off, n = w.my_offset(off, n)
        if off + n > size:
            return
        fd = w.rng.choice([w.fd, w.ro_fd])
        w.log(f"pread-own fd{fd} {off} {n}")
        w.check("pread", off, os.pread(fd, n, off), n)

    return op_read
