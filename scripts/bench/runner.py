"""The measurement loop and its raw results.

Each measurement: a fresh instance (mount); for a warm run the warm-up, then
`sync`, for a cold run `sync` and the page cache, dentries and inodes dropped;
then the workload in a child process; then the daemon's peak RSS and CPU time;
then unmount. The loops run repetition, mode, workload, implementation from the
outside in, so a slow spell of the (shared) machine falls on every
implementation alike.

A warm run of a workload that writes drops the page cache (not the dentries and
inodes) before its warm-up. Without it, on ext4 without a journal (this VM's
root filesystem) it paid for the measurements before it: for a new inode, such
an ext4 passes over every free inode of the group that was deleted in the last
minute (five, while its inode-table block is dirty) and whose inode-table block
is cached (`recently_deleted()` in fs/ext4/ialloc.c), and each teardown and W5
itself delete thousands. Every create scanned those (perf: `recently_deleted`
and the buffer lookups under it the top of the profile); a cold run had dropped
the blocks, so W5, W7 and W8 ran up to 8x slower warm than cold for every
implementation, native included, by how many inodes the runs just before had
freed. The warm-up then reads again what the workload reads: the run stays warm.
Creates right after many deletes can still pass over some (reading the block of
a new inode reads its neighbours' blocks ahead), in both modes alike.

The mount time is the time for the mount command to return plus a stat and a
listing of the root of a stack of many files (cold: after dropping caches).

The session: for each FUSE implementation, one mount that runs every selected
workload once in turn; its daemon's CPU time before unmount and peak RSS are the
table's daemon rows (peak RSS is the highest of all its mounts in the run).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import procs
from .image import Image, Stack, rmtree
from .impls import Impl, Instance, NotApplicable, cleanup_all
from .sizes import Sizes
from .workloads import BY_ID

SCRIPTS = Path(__file__).resolve().parents[1]


@dataclass
class Config:
    cache: Path
    sizes: Sizes
    impls: list[Impl]
    workloads: list[str]  # W1..W10 and "mount"
    modes: tuple[str, ...]
    reps: int
    session: bool = True


@dataclass
class Runner:
    cfg: Config
    image: Image
    stack: Stack | None
    results: list[dict[str, Any]] = field(default_factory=list)
    session: dict[str, dict[str, Any]] = field(default_factory=dict)
    scratch: Path = Path()
    _n: int = 0

    def __post_init__(self) -> None:
        self.scratch = self.cfg.cache / "runs" / f"{os.getpid()}-{int(time.time())}"

    # -- helpers ----------------------------------------------------------------
    def _args(self) -> dict[str, Any]:
        s = self.cfg.sizes
        return {
            **self.image.files,
            "w5_files": s.w5_files,
            "w6_true": s.w6_true,
            "w6_python": s.w6_python,
            "w7_files": s.w7_files,
            "w9_bytes": s.w9_bytes,
            "tarball": str(self.image.tarball),
            "has_python": self.image.has_python,
        }

    def child(self, wid: str, root: Path, warmup: bool = False) -> float:
        """Run a workload in a child process; its own timing, in seconds."""
        spec = json.dumps({"w": wid, "root": str(root), "warmup": warmup, "args": self._args()})
        env = {**os.environ, "PYTHONPATH": str(SCRIPTS)}
        try:
            r = procs.run(
                [sys.executable, "-m", "bench.workloads", spec],
                self.cfg.sizes.timeout,
                wid,
                env=env,
            )
        except subprocess.TimeoutExpired:
            raise procs.CommandFailed(
                f"{wid}: timed out after {self.cfg.sizes.timeout:.0f} s"
            ) from None
        try:
            out = json.loads(r.stdout.strip().splitlines()[-1])
        except (ValueError, IndexError):
            raise procs.CommandFailed(
                f"{wid}: no result: {r.stdout[-500:]} {r.stderr[-500:]}"
            ) from None
        if "error" in out:
            raise procs.CommandFailed(out["error"])
        return float(out["seconds"])

    def _base(self, label: str) -> Path:
        self._n += 1
        return self.scratch / f"{self._n:04d}-{label}"

    def _private(self, wid: str) -> tuple[str, ...]:
        """Files a workload writes in place: "native" needs its own copy of them."""
        return (self.image.files["mid"],) if wid in ("W4", "SESSION") else ()

    def _record(
        self,
        impl: Impl,
        wid: str,
        mode: str,
        rep: int,
        seconds: float | None,
        error: str | None,
        stats: dict[str, float],
    ) -> None:
        self.results.append(
            {
                "impl": impl.name,
                "workload": wid,
                "mode": mode,
                "rep": rep,
                "seconds": seconds,
                "error": error,
                **stats,
            }
        )
        shown = f"{seconds:.4f} s" if seconds is not None else f"ERROR {error}"
        extra = (
            f"  (daemon {stats['rss_peak_mib']:.0f} MiB, {stats['cpu_s']:.2f} s cpu)"
            if stats
            else ""
        )
        print(f"  {impl.name:15} {wid:5} {mode:4} #{rep}: {shown}{extra}", flush=True)

    # -- measurements -------------------------------------------------------------
    def measure(self, impl: Impl, wid: str, mode: str, rep: int) -> None:
        if (wid == "W6" and not self.image.has_true) or impl.mount_only:
            return
        inst: Instance | None = None
        try:
            inst = impl.mount(
                self.image, self._base(f"{impl.name}-{wid}-{mode}"), self._private(wid)
            )
            inst.find_daemon()
            if mode == "warm":
                if BY_ID[wid].changes_tree:  # the module's docstring says why
                    procs.drop_caches(1)
                self.child(wid, inst.root, warmup=True)
                os.sync()
            else:
                procs.drop_caches()
            seconds = self.child(wid, inst.root)
            stats = inst.sample()
            inst.teardown()
            self._record(impl, wid, mode, rep, seconds, None, stats)
        except (procs.CommandFailed, OSError, RuntimeError) as e:
            stats = inst.stats if inst else {}
            if inst:
                try:
                    inst.teardown()
                except Exception as e2:  # noqa: BLE001  (cleanup_all retries at the end)
                    print(f"bench: teardown: {e2}", file=sys.stderr)
            self._record(impl, wid, mode, rep, None, str(e), stats)

    def measure_mount(self, impl: Impl, mode: str, rep: int) -> None:
        assert self.stack is not None
        try:
            impl.ready(self.stack, self._base(f"{impl.name}-mount-ready"))
            if mode == "warm":  # a first mount warms the caches
                impl.mount(self.stack, self._base(f"{impl.name}-mount-prewarm")).teardown()
                os.sync()
            else:
                procs.drop_caches()
            t0 = time.perf_counter()
            inst = impl.mount(self.stack, self._base(f"{impl.name}-mount-{mode}"))
            try:
                os.stat(inst.root)
                os.listdir(inst.root)
                seconds = time.perf_counter() - t0
                stats = inst.sample()
                impl.check(inst)
            finally:
                inst.teardown()
            self._record(impl, "mount", mode, rep, seconds, None, stats)
        except NotApplicable:
            return
        except (procs.CommandFailed, OSError, RuntimeError) as e:
            self._record(impl, "mount", mode, rep, None, str(e), {})

    def run_session(self, impl: Impl) -> None:
        wids = [
            w
            for w in self.cfg.workloads
            if w in BY_ID and not (w == "W6" and not self.image.has_true)
        ]
        errors: list[str] = []
        inst = impl.mount(self.image, self._base(f"{impl.name}-session"), self._private("SESSION"))
        try:
            inst.find_daemon()
            t0 = time.perf_counter()
            for wid in wids:
                try:
                    self.child(wid, inst.root)
                except procs.CommandFailed as e:
                    errors.append(f"{wid}: {e}")
            wall = time.perf_counter() - t0
            stats = inst.sample()
        finally:
            inst.teardown()
        self.session[impl.name] = {"workloads": wids, "wall_s": wall, "errors": errors, **stats}
        print(
            f"  {impl.name:15} session ({' '.join(wids)}): {wall:.2f} s wall, "
            f"daemon {stats.get('rss_peak_mib', 0):.0f} MiB peak, "
            f"{stats.get('cpu_s', 0):.2f} s cpu{'; errors: ' + str(errors) if errors else ''}",
            flush=True,
        )

    def listing(self, root: Path) -> list[str]:
        """Every entry of a merged tree: path, type, mode, size (not for directories),
        symlink target."""
        r = procs.run(
            ["find", str(root), "-mindepth", "1", "-printf", "%P\t%y\t%m\t%s\t%l\n"],
            self.cfg.sizes.timeout,
            "find",
        )
        out = []
        for line in r.stdout.splitlines():
            f = line.split("\t")
            if f[1] == "d":
                f[3] = ""
            out.append("\t".join(f))
        return sorted(out)

    def verify(self) -> dict[str, list[str]]:
        """Differences between each implementation's merged view and native's (the
        merged tree computed from the layers): the layers mean the same to all."""
        from .impls import Native

        self.scratch.mkdir(parents=True)
        diffs: dict[str, list[str]] = {}
        try:
            inst = Native().mount(self.image, self._base("verify-native"))
            try:
                want = set(self.listing(inst.root))
            finally:
                inst.teardown()
            for impl in self.cfg.impls:
                if impl.name == "native":
                    continue
                inst = impl.mount(self.image, self._base(f"verify-{impl.name}"))
                try:
                    got = set(self.listing(inst.root))
                finally:
                    inst.teardown()
                diffs[impl.name] = [f"missing {x}" for x in sorted(want - got)] + [
                    f"extra   {x}" for x in sorted(got - want)
                ]
                print(
                    f"  {impl.name:15} {len(got)} entries, {len(diffs[impl.name])} "
                    f"differences from native ({len(want)})",
                    flush=True,
                )
                for d in diffs[impl.name][:10]:
                    print(f"      {d}")
        finally:
            cleanup_all()
            for impl in self.cfg.impls:
                impl.close()
            rmtree(self.scratch)
        return diffs

    def clear_stale(self) -> None:
        """Remove the scratch of earlier runs that died (never a tree with a mount in it)."""
        runs = self.cfg.cache / "runs"
        for d in runs.glob("*-*") if runs.is_dir() else []:
            pid = int(d.name.split("-")[0]) if d.name.split("-")[0].isdigit() else 0
            if pid and not procs.alive(pid):
                try:
                    rmtree(d)
                except RuntimeError as e:
                    print(f"bench: {e}", file=sys.stderr)

    def run(self) -> None:
        self.clear_stale()
        self.scratch.mkdir(parents=True)
        try:
            wids = [w for w in self.cfg.workloads if w in BY_ID]
            for rep in range(1, self.cfg.reps + 1):
                # Every other repetition in reverse, so that no implementation always
                # follows the same one: a cold run depends on the run just before it
                # (README: The spin; of pyunion and pyunion-nospin, the one run second
                # read the 1 GiB file 1.3x faster, geometric mean of 37 repetitions).
                order = self.cfg.impls if rep % 2 else self.cfg.impls[::-1]
                for mode in self.cfg.modes:
                    print(f"-- repetition {rep}, {mode}", flush=True)
                    for wid in wids:
                        for impl in order:
                            self.measure(impl, wid, mode, rep)
                    if "mount" in self.cfg.workloads and self.stack is not None:
                        for impl in order:
                            self.measure_mount(impl, mode, rep)
            if self.cfg.session and wids:
                print("-- daemon session", flush=True)
                for impl in self.cfg.impls:
                    if impl.fuse and not impl.mount_only:
                        try:
                            self.run_session(impl)
                        except (procs.CommandFailed, OSError, RuntimeError) as e:
                            self.session[impl.name] = {"errors": [str(e)]}
                            print(f"  {impl.name:15} session: ERROR {e}", flush=True)
        finally:
            cleanup_all()
            for impl in self.cfg.impls:
                impl.close()
            rmtree(self.scratch)
