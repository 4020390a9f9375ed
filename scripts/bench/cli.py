"""The command line of scripts/bench.py."""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import signal
import sys
import time
from pathlib import Path
from typing import Any

from . import impls as impls_mod
from .build import missing_tools, render_build, run_build_bench
from .containers import render_containers, run_container_bench
from .image import ensure_image, ensure_stack, log
from .report import render
from .runner import Config, Runner
from .sizes import FULL, PRESETS, QUICK
from .workloads import BY_ID

DEFAULT_CACHE = "/var/tmp/pyunion-bench"
CONTAINER_WORKLOADS = ("start", "parallel")
START_REPS = 10  # container starts are short: a median of ten


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="bench.py",
        description="Benchmark pyunion against kernel overlayfs, fuse-overlayfs, unionfs-fuse "
        "and a plain merged copy (issue 5). Needs root.",
    )
    p.add_argument(
        "--quick", action="store_true", help="small sizes, one warm repetition: under 3 minutes"
    )
    p.add_argument(
        "--impl",
        default="",
        help=f"comma-separated implementations (default all: {','.join(impls_mod.ORDER)})",
    )
    p.add_argument(
        "--workloads",
        default="",
        help="comma-separated workloads W1..W10, 'mount', 'build' (pyunion build "
        "against buildah bud), 'start' (container start latency) and 'parallel' "
        "(20 containers at once; default all)",
    )
    p.add_argument(
        "--size",
        choices=sorted(PRESETS),
        help="sizes preset (--quick = --size quick; tiny is for smoke tests)",
    )
    p.add_argument("--reps", type=int, help="repetitions (default 3, --quick 1)")
    p.add_argument("--modes", help="cold,warm (default both, --quick warm)")
    p.add_argument(
        "--cache",
        default=DEFAULT_CACHE,
        help=f"where the image is built once and kept (default {DEFAULT_CACHE})",
    )
    p.add_argument(
        "--source",
        choices=("auto", "debootstrap", "generated"),
        default="auto",
        help="root filesystem: debootstrap when it works (auto), or a generated tree",
    )
    p.add_argument("--out", metavar="FILE.json", help="save the raw results")
    p.add_argument("--markdown", action="store_true", help="print the table as markdown")
    p.add_argument(
        "--no-session",
        action="store_true",
        help="skip the one-mount pass that measures the daemons' CPU time",
    )
    p.add_argument("--pyunion", help="command that runs pyunion (default .venv/bin/pyunion)")
    p.add_argument(
        "--baseline",
        metavar="CMD",
        help="another pyunion run as pyunion-base in the same run (a change's A/B: "
        "another checkout's .venv/bin/pyunion, say); its ratio is the py/base column",
    )
    p.add_argument(
        "--verify",
        action="store_true",
        help="only check that every implementation shows the same merged tree",
    )
    p.add_argument(
        "--pull",
        action="store_true",
        help="only the pull workload: the image from a local registry into a cold "
        "store, pyunion vs skopeo copy + umoci unpack (scripts/bench/pull.py)",
    )
    p.add_argument(
        "--report",
        metavar="FILE.json",
        help="only print the table of saved results (with --markdown for markdown)",
    )
    return p.parse_args(argv)


def machine(cache: Path) -> dict[str, Any]:
    cpu = platform.processor() or "?"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
        with open("/proc/meminfo") as f:
            mem = int(f.readline().split()[1]) / (1 << 20)
    except OSError:
        mem = 0.0
    fs = "?"
    best = ""
    real = os.path.realpath(cache)
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            mp = left.split()[4]
            if (real == mp or real.startswith(mp.rstrip("/") + "/")) and len(mp) >= len(best):
                best, fs = mp, right.split()[0]
    return {
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "mem_gib": mem,
        "kernel": platform.release(),
        "fs": fs,
        "hostname": platform.node(),
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.report:
        data = json.loads(Path(args.report).read_text())
        sys.stdout.write(render(data, args.markdown))
        return 0
    if os.geteuid() != 0:
        print("bench: needs root (mounts, drop_caches)", file=sys.stderr)
        return 2
    sizes = PRESETS[args.size] if args.size else QUICK if args.quick else FULL
    if args.reps:
        sizes = sizes.with_(reps=args.reps)
    if args.modes:
        modes = tuple(m for m in args.modes.split(",") if m)
        if not set(modes) <= {"cold", "warm"}:
            print("bench: --modes takes cold and/or warm", file=sys.stderr)
            return 2
        sizes = sizes.with_(modes=modes)
    wanted = [w.strip() for w in args.impl.split(",") if w.strip()] or impls_mod.ORDER
    unknown = [w for w in wanted if w not in impls_mod.ALL]
    if unknown:
        print(f"bench: unknown implementation {', '.join(unknown)}", file=sys.stderr)
        return 2
    workloads = [w.strip() for w in args.workloads.split(",") if w.strip()] or [
        *BY_ID,
        "mount",
        "build",
        *CONTAINER_WORKLOADS,
    ]
    bad = [
        w for w in workloads if w not in BY_ID and w not in ("mount", "build", *CONTAINER_WORKLOADS)
    ]
    if bad:
        print(f"bench: unknown workload {', '.join(bad)}", file=sys.stderr)
        return 2

    impls: list[impls_mod.Impl] = []
    skipped: dict[str, str] = {}
    for name in impls_mod.ORDER:
        if name not in wanted:
            continue
        cls = impls_mod.ALL[name]
        command = args.baseline if cls is impls_mod.PyunionBase else args.pyunion
        impl = (
            cls(shlex.split(command) if command else None)  # type: ignore[call-arg]
            if issubclass(cls, impls_mod.Pyunion)
            else cls()
        )
        why = impl.missing()
        if why:
            if args.impl:
                print(f"bench: {name}: {why}", file=sys.stderr)
                return 2
            log(f"skipping {name}: {why}")
            skipped[name] = why
            continue
        impls.append(impl)

    def on_term(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    t0 = time.monotonic()
    cache = Path(args.cache)
    build_only = workloads == ["build"]
    if build_only:
        return build_main(args, cache, sizes.reps, t0)
    file_workloads = [w for w in workloads if w not in ("build", *CONTAINER_WORKLOADS)]
    if not file_workloads and not args.pull and not args.verify:
        return containers_main(args, cache, sizes, workloads, t0)
    image = ensure_image(cache, sizes, args.source)
    if args.pull:
        from . import pull

        py = (
            next(i for i in impls if isinstance(i, impls_mod.Pyunion))
            if any(isinstance(i, impls_mod.Pyunion) for i in impls)
            else impls_mod.Pyunion()
        )
        res = pull.run(cache, image, py.command, sizes.reps)
        if args.out:
            Path(args.out).write_text(
                json.dumps(
                    {"machine": machine(cache), "pull": res, "version": py.version()}, indent=1
                )
            )
        sys.stdout.write(pull.render(res))
        return 0
    stack = (
        ensure_stack(cache, sizes.stack_files) if "mount" in workloads and not args.verify else None
    )
    cfg = Config(
        cache=cache,
        sizes=sizes,
        impls=impls,
        workloads=workloads,
        modes=sizes.modes,
        reps=sizes.reps,
        session=not args.no_session,
    )
    runner = Runner(cfg, image, stack)
    meta = {
        "date": datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
        "argv": sys.argv,
        "machine": machine(cache),
        "sizes": dict(vars(sizes).items()),
        "reps": sizes.reps,
        "modes": list(sizes.modes),
        "impls": [i.name for i in impls],
        "skipped": skipped,
        "versions": {i.name: i.version() for i in impls},
        "image": {"source": image.source, "counts": image.counts, "path": str(image.root)},
        "stack_files": sizes.stack_files,
    }
    if args.verify:
        try:
            diffs = runner.verify()
        finally:
            impls_mod.cleanup_all()
        return 1 if any(diffs.values()) else 0
    print(
        f"bench: {len(impls)} implementations, workloads {' '.join(workloads)}, "
        f"{sizes.reps} repetition(s), {'/'.join(sizes.modes)}",
        flush=True,
    )
    try:
        runner.run()
    except KeyboardInterrupt:
        print("bench: interrupted; unmounting", file=sys.stderr)
        impls_mod.cleanup_all()
        return 130
    finally:
        impls_mod.cleanup_all()
    data = {"meta": meta, "results": runner.results, "session": runner.session}
    if "build" in workloads and not build_skip(args):
        data["build"] = run_build_bench(cache, _pyunion_command(args), sizes.reps, args.source)
    if set(workloads) & set(CONTAINER_WORKLOADS):
        data["containers"] = run_container_bench(
            cache,
            _pyunion_command(args),
            max(sizes.reps, START_REPS),
            sizes.modes,
            args.source,
            workloads,
        )
    meta["elapsed_s"] = time.monotonic() - t0
    if args.out:
        Path(args.out).write_text(json.dumps(data, indent=1))
    print()
    sys.stdout.write(render(data, args.markdown))
    print(f"\n(bench took {meta['elapsed_s']:.0f} s)")
    return 0


def _pyunion_command(args: argparse.Namespace) -> list[str]:
    return impls_mod.Pyunion(shlex.split(args.pyunion) if args.pyunion else None).command


def containers_main(
    args: argparse.Namespace, cache: Path, sizes: Any, workloads: list[str], t0: float
) -> int:
    """Only the container workloads (start, parallel)."""
    try:
        res = run_container_bench(
            cache,
            _pyunion_command(args),
            max(sizes.reps, START_REPS),
            sizes.modes,
            args.source,
            workloads,
        )
    except KeyboardInterrupt:
        return 130
    data = {
        "meta": {
            "date": datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
            "argv": sys.argv,
            "machine": machine(cache),
            "elapsed_s": time.monotonic() - t0,
        },
        "containers": res,
    }
    if args.out:
        Path(args.out).write_text(json.dumps(data, indent=1))
    print()
    sys.stdout.write(render_containers(res, args.markdown))
    return 0


def build_skip(args: argparse.Namespace) -> str | None:
    why = missing_tools()
    if why:
        log(f"skipping the build workload: {why}")
    return why


def build_main(args: argparse.Namespace, cache: Path, reps: int, t0: float) -> int:
    """`--workloads build` alone: only the build workload."""
    why = build_skip(args)
    if why:
        print(f"bench: build: {why}", file=sys.stderr)
        return 2
    try:
        build = run_build_bench(cache, _pyunion_command(args), reps, args.source)
    except KeyboardInterrupt:
        return 130
    data = {
        "meta": {
            "date": datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
            "argv": sys.argv,
            "machine": machine(cache),
            "elapsed_s": time.monotonic() - t0,
        },
        "build": build,
    }
    if args.out:
        Path(args.out).write_text(json.dumps(data, indent=1))
    print()
    sys.stdout.write(render_build(build, args.markdown))
    print(f"\n(bench took {data['meta']['elapsed_s']:.0f} s)")
    return 0
