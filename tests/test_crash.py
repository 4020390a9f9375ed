"""Crashes: kill -9 the daemon in the middle of copy-ups, renames, rmdirs, whiteouts and big writes.

Each run mounts, starts a workload in a child process that records its
progress in a file outside the mount (an entry is written only once the
operation returned, after fsync where it matters), kills the daemon with
SIGKILL at a random point of the workload, and then checks what a user would:

- `pyunion umount` cleans the dead mount; `pyunion mount` of the same upper
  works, and the work dir's `work` is empty once mounted;
- no half-done state is visible: every object is either as before the
  interrupted operation or as after it (no half-copied file, no directory
  half renamed, no removed directory's entries coming back);
- everything the workload saw completed (and fsync'd) is there;
- kernel overlayfs over the same layers shows the same view as pyunion.

Sizes: PYUNION_CRASH_RUNS kill points per scenario (default 3, 20 with
PYUNION_SOAK=1); PYUNION_CRASH_SEED fixes the seed (printed).
"""

from __future__ import annotations

import hashlib
import os
import random
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from support import (
    daemon_of,
    force_unmount,
    is_mounted,
    join_children,
    kernel_overlay,
    kill_daemon,
    mounted,
    needs_fuse,
    pyunion,
    soak,
    start_children,
    tree_view,
)

RUNS = int(os.environ.get("PYUNION_CRASH_RUNS", soak(3, 20)))
SEED = int(os.environ.get("PYUNION_CRASH_SEED", int(time.time()) % 100000))

pytestmark = [needs_fuse, pytest.mark.timeout(300)]


def _note(progress: str, line: str) -> None:
    fd = os.open(progress, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode() + b"\n")
    finally:
        os.close(fd)


def _progress(progress: Path) -> list[str]:
    try:
        return progress.read_text().splitlines()
    except FileNotFoundError:
        return []


def crash_run(
    tmp: Path,
    lows: list[Path],
    workload: Callable[[str, str], None],
    kill_after: tuple[int, float],
    rng: random.Random,
) -> tuple[Path, list[str], dict]:
    """Mount, run `workload(mnt, progress)`, kill the daemon after `kill_after`
    = (progress entries, then up to that many seconds); recover; return (upper,
    progress, pyunion's view after the recovery), having checked the recovery
    and that kernel overlayfs agrees."""
    upper, work, mnt = tmp / "upper", tmp / "work", tmp / "mnt"
    progress = tmp / "progress"
    opts = f"lowerdir={':'.join(map(str, lows))},upperdir={upper},workdir={work}"
    mnt.mkdir(exist_ok=True)
    env = dict(os.environ, PYUNION_LOG=str(tmp / "daemon.log"))
    pyunion("mount", "-o", opts, str(mnt), env=env)
    try:
        pid = daemon_of(mnt)
        child = start_children([(workload, (str(mnt), str(progress)))])
        entries, delay = kill_after
        deadline = time.monotonic() + 60
        while len(_progress(progress)) < entries and time.monotonic() < deadline:
            done, _ = os.waitpid(child[0], os.WNOHANG)
            if done:
                child = []
                break
            time.sleep(0.002)
        time.sleep(rng.uniform(0, delay))
        kill_daemon(mnt, pid)
        if child:
            join_children(child, timeout=30)  # it fails with ENOTCONN; it must not hang
        # The dead mount: `pyunion umount` cleans it.
        assert is_mounted(mnt)
        pyunion("umount", str(mnt), timeout=30)
        assert not is_mounted(mnt)
    finally:
        kill_daemon(mnt)
        force_unmount(mnt)
    done = _progress(progress)
    with mounted(lows, mnt, upper, work, env=env):
        assert os.listdir(work / "work") == [], "the work dir was not emptied"
        view = tree_view(mnt)
        for p in view:
            assert b"#pyunion" not in p, f"a temporary name is visible: {p!r}"
    with kernel_overlay(lows, tmp / "kmnt", upper=upper, work=tmp / "kwork") as k:
        kview = tree_view(k)
    diff = {
        p: (view.get(p), kview.get(p))
        for p in set(view) | set(kview)
        if view.get(p) != kview.get(p)
    }
    assert not diff, f"pyunion and kernel overlayfs differ after the crash: {diff}"
    log = (tmp / "daemon.log").read_text() if (tmp / "daemon.log").exists() else ""
    assert "Traceback" not in log, log
    return upper, done, view


def _fresh(tmp_path: Path, i: int) -> tuple[Path, list[Path]]:
    tmp = tmp_path / f"run{i}"
    lows = [tmp / "l1", tmp / "l2"]
    for p in [*lows, tmp / "upper", tmp / "work"]:
        p.mkdir(parents=True)
    return tmp, lows


def _content(i: int, size: int) -> bytes:
    return random.Random(i).randbytes(size)


# -- copy-up of big files --------------------------------------------------------------
N_BIG, BIG = 12, 3 << 20


def _copyup_workload(mnt: str, progress: str) -> None:
    for i in range(N_BIG):
        with open(f"{mnt}/big/f{i}", "r+b") as f:  # copy-up (in a worker thread: > 1 MiB)
            f.seek(0, 2)
            f.write(b"APPENDED")
            f.flush()
            os.fsync(f.fileno())
        _note(progress, str(i))


def test_kill_during_copy_up(tmp_path: Path) -> None:
    rng = random.Random(SEED)
    print(f"PYUNION_CRASH_SEED={SEED} runs={RUNS}")
    for run in range(RUNS):
        tmp, lows = _fresh(tmp_path, run)
        (lows[1] / "big").mkdir()
        for i in range(N_BIG):
            (lows[1] / "big" / f"f{i}").write_bytes(_content(i, BIG))
        _upper, done, view = crash_run(
            tmp, lows, _copyup_workload, (rng.randrange(N_BIG), 0.05), rng
        )
        for i in range(N_BIG):
            base = _content(i, BIG)
            got = view[b"big/f%d" % i]
            ok = {hashlib.sha256(base).hexdigest(), hashlib.sha256(base + b"APPENDED").hexdigest()}
            assert got[5] in ok, f"run {run}: big/f{i} is neither the old nor the new content"
            if str(i) in done:
                assert got[5] == hashlib.sha256(base + b"APPENDED").hexdigest(), (
                    f"run {run}: the fsync'd append to big/f{i} is lost"
                )


# -- rename of merged directories -------------------------------------------------------
N_DIRS, N_FILES = 8, 60


def _rename_workload(mnt: str, progress: str) -> None:
    _note(progress, "start")
    for i in range(N_DIRS):
        os.rename(f"{mnt}/d{i}", f"{mnt}/r{i}")  # a merged dir: copied up, then renamed
        _note(progress, str(i))
    for i in range(N_DIRS):
        os.rename(f"{mnt}/r{i}/f0", f"{mnt}/r{i}/g0")  # a file
        _note(progress, f"f{i}")


def test_kill_during_rename_of_merged_dirs(tmp_path: Path) -> None:
    rng = random.Random(SEED + 1)
    for run in range(RUNS):
        tmp, lows = _fresh(tmp_path, run)
        for i in range(N_DIRS):
            for layer, rng_files in ((lows[1], range(N_FILES)), (lows[0], range(0, N_FILES, 7))):
                (layer / f"d{i}").mkdir()
                for j in rng_files:
                    (layer / f"d{i}" / f"f{j}").write_bytes(
                        b"%d/%d/%s" % (i, j, layer.name.encode())
                    )
        _upper, done, view = crash_run(tmp, lows, _rename_workload, (1, rng.uniform(0.0, 0.6)), rng)
        for i in range(N_DIRS):
            old, new = b"d%d" % i, b"r%d" % i
            assert (old in view) != (new in view), (
                f"run {run}: d{i} and r{i}: {old in view}, {new in view}"
            )
            d = old if old in view else new
            if str(i) in done:
                assert d == new, f"run {run}: the completed rename of d{i} was undone"
            names = {p.split(b"/", 1)[1] for p in view if p.startswith(d + b"/")}
            want = {b"f%d" % j for j in range(N_FILES)}
            if b"g0" in names:
                want = (want - {b"f0"}) | {b"g0"}
            assert names == want, f"run {run}: {d!r} holds {sorted(names)}"
            if f"f{i}" in done:
                assert b"g0" in names


# -- rmdir of merged directories ----------------------------------------------------------
N_RM, N_RM_FILES = 6, 150


def _rmdir_workload(mnt: str, progress: str) -> None:
    for i in range(N_RM):
        for j in range(N_RM_FILES):
            os.unlink(f"{mnt}/m{i}/f{j}")  # whiteouts in the upper m{i}
        _note(progress, f"emptied {i}")
    _note(progress, "rmdir")
    for i in range(N_RM):
        os.rmdir(f"{mnt}/m{i}")  # a merged dir full of whiteouts
        _note(progress, f"removed {i}")


def test_kill_during_rmdir_of_merged_dirs(tmp_path: Path) -> None:
    rng = random.Random(SEED + 2)
    for run in range(RUNS):
        tmp, lows = _fresh(tmp_path, run)
        for i in range(N_RM):
            (lows[1] / f"m{i}").mkdir()
            (lows[0] / f"m{i}").mkdir()
            for j in range(N_RM_FILES):
                (lows[1] / f"m{i}" / f"f{j}").write_bytes(b"x")
        # Half the runs kill during the unlinks, half during the rmdirs.
        when = (rng.randrange(1, N_RM), 0.01) if run % 2 else (N_RM + 1, 0.03)
        _upper, done, view = crash_run(tmp, lows, _rmdir_workload, when, rng)
        for i in range(N_RM):
            d = b"m%d" % i
            names = {p for p in view if p.startswith(d + b"/")}
            if f"removed {i}" in done:
                assert d not in view, f"run {run}: the removed m{i} is back"
            if f"emptied {i}" in done:
                assert d not in view or not names, (
                    f"run {run}: removed entries of m{i} came back: {sorted(names)[:5]}..."
                )


# -- whiteout creation --------------------------------------------------------------------
N_WH = 400


def _unlink_workload(mnt: str, progress: str) -> None:
    for j in range(N_WH):
        os.unlink(f"{mnt}/w/f{j}")
        _note(progress, str(j))


def test_kill_during_whiteout_creation(tmp_path: Path) -> None:
    rng = random.Random(SEED + 3)
    for run in range(RUNS):
        tmp, lows = _fresh(tmp_path, run)
        (lows[1] / "w").mkdir()
        for j in range(N_WH):
            (lows[1] / "w" / f"f{j}").write_bytes(b"%d" % j)
        _upper, done, view = crash_run(
            tmp, lows, _unlink_workload, (rng.randrange(N_WH), 0.01), rng
        )
        gone = {int(x) for x in done}
        for j in range(N_WH):
            p = b"w/f%d" % j
            if j in gone:
                assert p not in view, f"run {run}: the unlinked w/f{j} is back"
            elif p in view:
                assert view[p][4] == len(b"%d" % j)
        # Only the one unlink in flight may be either way.
        missing = {j for j in range(N_WH) if b"w/f%d" % j not in view}
        assert len(missing - gone) <= 1, f"run {run}: {sorted(missing - gone)} vanished"


# -- big writes and fsync -----------------------------------------------------------------
CHUNK, N_CHUNKS = 1 << 20, 24


def _write_workload(mnt: str, progress: str) -> None:
    fds = [
        os.open(f"{mnt}/new", os.O_CREAT | os.O_WRONLY, 0o644),
        os.open(f"{mnt}/low", os.O_WRONLY),
    ]
    for k in range(N_CHUNKS):
        for n, fd in enumerate(fds):
            os.pwrite(fd, _content(1000 + k + n, CHUNK), k * CHUNK)
            os.fsync(fd)
        _note(progress, str(k))


def test_kill_during_big_writes(tmp_path: Path) -> None:
    rng = random.Random(SEED + 4)
    for run in range(RUNS):
        tmp, lows = _fresh(tmp_path, run)
        (lows[1] / "low").write_bytes(b"L" * (CHUNK * 2 + 17))
        upper, done, _view = crash_run(
            tmp, lows, _write_workload, (rng.randrange(N_CHUNKS), 0.02), rng
        )
        synced = max((int(x) for x in done), default=-1) + 1
        for name, n in ((b"new", 0), (b"low", 1)):
            if synced == 0:
                continue
            data = (upper / name.decode()).read_bytes()
            for k in range(synced):
                assert data[k * CHUNK : (k + 1) * CHUNK] == _content(1000 + k + n, CHUNK), (
                    f"run {run}: fsync'd chunk {k} of {name!r} is not intact"
                )
