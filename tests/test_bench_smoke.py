"""Keeps scripts/bench.py from rotting: builds a tiny image with the harness's own
builder, checks both layer formats and the merged tree, and runs two workloads on
native and kernel overlayfs (no FUSE, no pyunion: this is about the harness)."""

from __future__ import annotations

import os
import stat
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

from bench import impls, report
from bench.image import ensure_image, is_opaque, is_whiteout, walk
from bench.runner import Config, Runner
from bench.sizes import TINY


def _overlay_skip_reason() -> str | None:
    if os.geteuid() != 0:
        return "needs root (mounts, mknod, trusted xattrs)"
    return impls.Kernel().missing()


pytestmark = [
    pytest.mark.skipif(_overlay_skip_reason() is not None, reason=_overlay_skip_reason() or ""),
    pytest.mark.timeout(60),
]


def test_image_and_one_run(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    image = ensure_image(cache, TINY, source="generated")
    assert ensure_image(cache, TINY, source="generated").root == image.root  # cached

    # kernel format: whiteouts and an opaque directory in the upper layers
    top, mid, bottom = image.kernel_layers
    for layer in (top, mid):
        entries = walk(layer)
        assert any(is_whiteout(st) for _, st in entries), layer
        assert any(stat.S_ISDIR(st.st_mode) and is_opaque(layer / rel) for rel, st in entries)
    assert (bottom / image.files["big"]).stat().st_size == TINY.big
    # unionfs-fuse's format: no char devices, a hide file for each whiteout
    hidden = [rel for rel, _ in walk(image.unionfs_layers[0]) if rel.endswith("_HIDDEN~")]
    n_whiteouts = image.counts[0]["whiteouts"] + image.counts[0]["opaque"]
    assert len(hidden) == n_whiteouts > 0
    assert not any(is_whiteout(st) for _, st in walk(image.unionfs_layers[0]))
    # the merged tree has no whited-out path
    gone = [rel for rel, st in walk(top) if is_whiteout(st)]
    assert gone and not any(os.path.lexists(image.merged / rel) for rel in gone)

    cfg = Config(
        cache=cache,
        sizes=TINY,
        impls=[impls.Native(), impls.Kernel()],
        workloads=["W1", "W7"],
        modes=("warm",),
        reps=1,
        session=False,
    )
    runner = Runner(cfg, image, None)
    try:
        assert runner.verify() == {"kernel": []}
        runner.run()
    finally:
        impls.cleanup_all()
    assert not impls.ACTIVE
    assert {(r["impl"], r["workload"]) for r in runner.results} == {
        (i, w) for i in ("native", "kernel") for w in ("W1", "W7")
    }
    assert all(r["error"] is None and r["seconds"] > 0 for r in runner.results), runner.results
    assert not (cache / "runs").exists() or not any((cache / "runs").iterdir())

    data = {
        "meta": {
            "date": "now",
            "machine": {"cpu": "cpu", "cpus": 1, "mem_gib": 1.0, "kernel": "k", "fs": "fs"},
            "sizes": {"name": "tiny"},
            "reps": 1,
            "modes": ["warm"],
            "impls": ["native", "kernel"],
            "versions": {},
            "skipped": {},
            "image": {"source": image.source, "counts": image.counts},
        },
        "results": runner.results,
        "session": {},
    }
    text = report.render(data, markdown=True)
    assert "| W1 find" in text and "W7 rename" in text


def test_a_command_is_timed_to_its_exit_not_to_a_poll(tmp_path: Path) -> None:
    """`procs.run` with a log returns when the command exits: `Popen.wait(timeout)` slept
    in doubling steps (1, 2, 4, ... 32 ms), and a 35 ms command was timed 63 ms (the mount
    workload times `pyunion mount` so). A 65 ms command: the poll said 113 ms at the least
    (1+2+...+32+50); its own exit is 40 ms below that, room for a loaded machine's noise.
    The fastest of three."""
    from bench import procs

    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        procs.run(["sleep", "0.065"], 10, "sleep", log=tmp_path / "log")
        times.append(time.perf_counter() - t0)
    assert min(times) < 0.105, times


def _cached(path: Path) -> bool:
    """Whether the first page of `path` is in the page cache (a read that may not wait)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.preadv(fd, [bytearray(4096)], 0, os.RWF_NOWAIT)
        return True
    except BlockingIOError:
        return False
    finally:
        os.close(fd)


def test_a_warm_run_that_writes_starts_from_a_dropped_page_cache(tmp_path: Path) -> None:
    """On ext4 without a journal, the inode-table blocks left cached by the runs before
    made every create of a warm write workload pass over their recently freed inodes
    (runner.py); the page cache is dropped before the warm-up of such a workload. A file
    read just before the run is no longer cached after it (another process dropping
    caches meanwhile can only make this pass, never fail)."""
    cache = tmp_path / "cache"
    image = ensure_image(cache, TINY, source="generated")
    other = tmp_path / "other"
    other.write_bytes(os.urandom(1 << 16))
    os.sync()
    other.read_bytes()
    assert _cached(other)
    cfg = Config(
        cache=cache,
        sizes=TINY,
        impls=[impls.Native()],
        workloads=["W7"],
        modes=("warm",),
        reps=1,
        session=False,
    )
    runner = Runner(cfg, image, None)
    try:
        runner.run()
    finally:
        impls.cleanup_all()
    assert [r["error"] for r in runner.results] == [None]
    assert not _cached(other)
