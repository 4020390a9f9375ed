"""Container workloads: start latency, and twenty containers of one image at once.

- **start**: `pyunion run IMAGE -- true` against a shell script doing what a
  minimal runtime does (`unshare` + a kernel overlay mount of the same layer
  + `chroot` + `true`), and against `podman run --rm` when podman runs here;
  cold (caches dropped before each start) and warm, medians of `reps` starts.
  `pyunion run` is measured twice: as installed, and with its opt-in fork
  server (`PYUNION_FORKSERVER=1`, daemons forked by a process that has
  already imported everything; README: Using it).
- **parallel**: twenty `pyunion run`s of the image started at once, each
  command marking in a shared volume that it runs, then waiting to be told to
  exit: the time until all twenty run, and, while they all run, the PSS
  (/proc/PID/smaps_rollup) of each mount daemon and of each whole container
  (the `pyunion run` process, its janitor, the container's pid 1, its daemon);
  then again with the fork server, whose own PSS is shared among the twenty.

The image is the debootstrap root filesystem as one layer (the build workload's
base), imported once per run into a store of its own.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any

from . import procs
from .build import ensure_build_inputs
from .image import log

N_PARALLEL = 20


_pss_kib = procs.read_pss_kib


def _children(pid: int) -> list[int]:
    out = []
    with contextlib.suppress(OSError):
        for tid in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError), open(f"/proc/{pid}/task/{tid}/children") as f:
                out += [int(x) for x in f.read().split()]
    return out


def _tree(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += _children(p)
    return out


def _fuse_daemons() -> set[int]:
    """The processes that hold /dev/fuse: mount daemons. A container's mount is
    detached, so its daemon has no pid record; forked by `run` or by a fork server."""
    return procs.holding("/dev/fuse")


class _Setup:
    def __init__(self, cache: Path, pyunion: list[str], source: str) -> None:
        oci, _ctx, _name = ensure_build_inputs(cache, source)
        self.work = cache / "containers"
        shutil.rmtree(self.work, ignore_errors=True)
        self.work.mkdir(parents=True)
        self.store = self.work / "store"
        self.pyunion = pyunion
        procs.run(
            [
                *pyunion,
                "image",
                "import",
                str(oci),
                "--tag",
                "bench-run",
                "--store",
                str(self.store),
                "-q",
            ],
            1200,
            "pyunion image import",
        )
        layers = sorted(self.store.glob("layers/*/diff"))
        if len(layers) != 1:
            raise RuntimeError(f"expected a one-layer image, found {len(layers)} layers")
        self.layer = layers[0]
        self.oci = oci
        self.podman_root = self.work / "podman"
        self.podman_image = ""
        self.state = self.work / "state"  # the fork server's

    def pyunion_run(self, *argv: str, volume: str = "", forkserver: bool = False) -> list[str]:
        vol = ["-v", volume] if volume else []
        # The fork server's state dir is the bench's own: removing it (cleanup) ends the server.
        env = (
            ["env", "PYUNION_FORKSERVER=1", f"PYUNION_STATE_DIR={self.state}"] if forkserver else []
        )
        cmd = [*self.pyunion, "run", "--store", str(self.store), *vol, "bench-run", "--", *argv]
        return [*env, *cmd]

    def kernel_script(self) -> list[str]:
        d = self.work / "kernel"
        script = (
            f"set -e; rm -rf '{d}'; mkdir -p '{d}/u' '{d}/w' '{d}/m'; "
            f'unshare -m sh -c "mount --make-rprivate / && mount -t overlay overlay '
            f"-o lowerdir='{self.layer}',upperdir='{d}/u',workdir='{d}/w' '{d}/m' && "
            f"chroot '{d}/m' true\""
        )
        return ["sh", "-c", script]

    def podman(self, *args: str) -> list[str]:
        r = self.podman_root
        return [
            "podman",
            "--root",
            str(r / "root"),
            "--runroot",
            str(r / "run"),
            "--storage-driver",
            "overlay",
            *args,
        ]

    def podman_ready(self) -> str | None:
        """Why podman cannot run a container here, or None (it pulled the image)."""
        if not shutil.which("podman"):
            return "podman is not installed"
        try:
            r = procs.run(self.podman("pull", "-q", f"oci:{self.oci}"), 600, "podman pull")
            self.podman_image = r.stdout.strip().splitlines()[-1]
            procs.run(self.podman_run(), 120, "podman run")
        except (procs.CommandFailed, subprocess.TimeoutExpired, IndexError) as e:
            return f"podman run fails here: {str(e).strip().splitlines()[-1][:200]}"
        return None

    def podman_run(self) -> list[str]:
        # podman's default limits (nofile 1048576, nproc 4194304) exceed this machine's
        # hard limits, and runc then fails to set them: ask for ordinary ones.
        limits = ("--ulimit", "nofile=1024:1024", "--ulimit", "nproc=4096:4096")
        return self.podman("run", "--rm", "--network", "none", *limits, self.podman_image, "true")

    def cleanup(self) -> None:
        if self.podman_image:
            with contextlib.suppress(Exception):
                procs.run(self.podman("system", "reset", "-f"), 300, "podman reset")
        shutil.rmtree(self.work, ignore_errors=True)


def _time(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    procs.run(cmd, 120, cmd[0])
    return time.perf_counter() - t0


def start_latency(setup: _Setup, reps: int, modes: tuple[str, ...]) -> dict[str, Any]:
    impls: dict[str, list[str]] = {
        "pyunion run": setup.pyunion_run("true"),
        "pyunion run (fork server)": setup.pyunion_run("true", forkserver=True),
        "unshare + kernel overlay + chroot": setup.kernel_script(),
    }
    skipped = {}
    why = setup.podman_ready()
    if why:
        skipped["podman run --rm"] = why
        log(f"start workload: skipping podman: {why}")
    else:
        impls["podman run --rm"] = setup.podman_run()
    out: dict[str, Any] = {"skipped": skipped, "reps": reps, "medians": {}, "all": {}}
    for mode in modes:
        times: dict[str, list[float]] = {name: [] for name in impls}
        for cmd in impls.values():
            _time(cmd)  # the first start after the others': warms what a warm start reuses
        for _ in range(reps):
            for name, cmd in impls.items():  # interleaved: a slow spell hits all alike
                if mode == "cold":
                    procs.drop_caches()
                times[name].append(_time(cmd))
        out["all"][mode] = times
        out["medians"][mode] = {n: statistics.median(v) for n, v in times.items()}
    return out


def parallel(setup: _Setup, n: int = N_PARALLEL, forkserver: bool = False) -> dict[str, Any]:
    """`n` containers started at once; time until all run, PSS while they all run.

    With `forkserver`, a first container starts the server (a mount that finds none
    starts it and forks its daemon itself), and the server's PSS is shared among the `n`.
    """
    marks = setup.work / "marks"
    shutil.rmtree(marks, ignore_errors=True)
    marks.mkdir()
    servers: set[int] = set()
    if forkserver:
        _time(setup.pyunion_run("true", forkserver=True))
        procs.wait_until(lambda: bool(procs.forkservers(setup.state)), 30, 0.01)
        _time(setup.pyunion_run("true", forkserver=True))  # served by it: its pages touched
        servers = procs.forkservers(setup.state)
        if not servers:
            raise RuntimeError("the fork server did not start")
    before = _fuse_daemons()
    wait = "while [ ! -e /m/stop ]; do sleep 0.05; done"
    t0 = time.perf_counter()
    running = [
        subprocess.Popen(
            setup.pyunion_run(
                "sh", "-c", f"touch /m/c{i}; {wait}", volume=f"{marks}:/m", forkserver=forkserver
            ),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
        for i in range(n)
    ]
    result: dict[str, Any] = {"n": n}
    try:
        ok = procs.wait_until(lambda: len(list(marks.glob("c*"))) == n, 120, 0.005)
        result["all_running_s"] = time.perf_counter() - t0 if ok else None
        if not ok:
            errs = [
                p.stderr.read().decode(errors="replace")[-300:]
                for p in running
                if p.poll() is not None and p.stderr
            ]
            raise RuntimeError(f"not all {n} containers started: {'; '.join(errs)[:600]}")
        time.sleep(0.5)  # settled
        daemons = sorted(_fuse_daemons() - before)
        result["daemon_pss_mib"] = [(_pss_kib(p) or 0) / 1024 for p in daemons]
        containers = []
        for p in running:
            # A daemon forked by `run` is its child: counted once, as a daemon, below.
            tree = [q for q in _tree(p.pid) if q not in daemons]
            containers.append(sum((_pss_kib(q) or 0) for q in tree) / 1024)
        result["run_tree_pss_mib"] = containers
        result["server_pss_mib"] = sum((_pss_kib(q) or 0) for q in servers) / 1024
    finally:
        (marks / "stop").touch()
        for p in running:
            try:
                p.wait(timeout=60)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, 9)
                p.wait(timeout=10)
    if result.get("daemon_pss_mib"):
        d = result["daemon_pss_mib"]
        c = result["run_tree_pss_mib"]
        result["daemon_pss_mean_mib"] = statistics.mean(d)
        # A container's whole cost: its processes, its daemon, its share of a fork server.
        share = result["server_pss_mib"] / n
        result["container_pss_mean_mib"] = statistics.mean(c) + statistics.mean(d) + share
    return result


def run_container_bench(
    cache: Path,
    pyunion: list[str],
    reps: int,
    modes: tuple[str, ...],
    source: str,
    workloads: list[str],
) -> dict[str, Any]:
    setup = _Setup(cache, pyunion, source)
    out: dict[str, Any] = {}
    try:
        if "start" in workloads:
            log("container start latency")
            out["start"] = start_latency(setup, reps, modes)
        if "parallel" in workloads:
            log(f"{N_PARALLEL} parallel containers")
            out["parallel"] = parallel(setup)
            log(f"{N_PARALLEL} parallel containers, with the fork server")
            out["parallel_forkserver"] = parallel(setup, forkserver=True)
    finally:
        setup.cleanup()
    return out


def render_containers(res: dict[str, Any], markdown: bool) -> str:
    lines = []
    st = res.get("start")
    if st:
        names = list(next(iter(st["medians"].values())))
        head = [f"container start (median s of {st['reps']})", *names]
        rows = [
            [f"`... true` ({mode})", *(f"{v:.3f}" for v in st["medians"][mode].values())]
            for mode in st["medians"]
        ]
        lines += _table(head, rows, markdown)
        if st.get("skipped"):
            lines.append("")
        for name, why in st.get("skipped", {}).items():
            lines.append(f"{name}: skipped ({why})")
        lines.append("")
    for key, how in (("parallel", ""), ("parallel_forkserver", " with the fork server")):
        par = res.get(key)
        if not par:
            continue
        server = (
            f", the server's {par['server_pss_mib']:.1f} MiB shared among them"
            if "forkserver" in key and "server_pss_mib" in par
            else ""
        )
        lines.append(
            f"{par['n']} parallel `pyunion run`s{how}: all running after "
            f"{par['all_running_s']:.2f} s; PSS per daemon {par.get('daemon_pss_mean_mib', 0):.1f}"
            f" MiB (max {max(par.get('daemon_pss_mib') or [0]):.1f}), per container (daemon, "
            f"run process, janitor, pid 1{server and ', a share of the server'}) "
            f"{par.get('container_pss_mean_mib', 0):.1f} MiB{server}"
        )
        lines.append("")
    return "\n".join(lines) + "\n"


def _table(head: list[str], rows: list[list[str]], markdown: bool) -> list[str]:
    if markdown:
        return ["| " + " | ".join(head) + " |", "|---" + "|---:" * (len(head) - 1) + "|"] + [
            "| " + " | ".join(r) + " |" for r in rows
        ]
    w = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    return ["  ".join(c.ljust(w[i]) for i, c in enumerate(r)) for r in [head, *rows]]
