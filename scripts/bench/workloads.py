"""The workloads W1..W10, each run in a child process that times itself.

The harness starts `python -m bench.workloads SPEC` with a JSON spec (workload,
root of the merged tree, sizes, paths in the image); the child prints
{"seconds": ...}. Timing inside the child leaves out the interpreter's start,
and a child can be killed (with everything it started) when a mount hangs.

A warm run first runs the workload's warm-up on the same instance: the
workload itself for the read-only ones; for the ones that change the tree,
reading what they will touch, so that only the first-write work is left (the
runner drops the page cache before it: runner.py says why).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .sizes import Sizes


@dataclass(frozen=True)
class Workload:
    id: str
    title: str
    changes_tree: bool = False


WORKLOADS = [
    Workload("W1", "find + stat of every entry"),
    Workload("W2", "read every file (tar | cat)"),
    Workload("W3", "sequential read of the big file"),
    Workload("W4", "copy-up: append 1 byte to the mid file + fsync", True),
    Workload("W5", "create small files, then delete them", True),
    Workload("W6", "/bin/true and python3 imports in a chroot"),
    Workload("W7", "rename lower files, delete as many others", True),
    Workload("W8", "untar a tarball into the mount", True),
    Workload("W9", "random 4 KiB reads of the big file (fio)"),
    Workload("W10", "two processes reading different trees at once"),
]
BY_ID = {w.id: w for w in WORKLOADS}
Args = dict[str, Any]  # sizes and paths in the image, from the runner
CHROOT_ENV = {
    "PATH": "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin",
    "LANG": "C",
    "PYTHONDONTWRITEBYTECODE": "1",
    "HOME": "/root",
}


def title(wid: str, s: Sizes) -> str:
    """The workload's title with this run's sizes."""
    mib = 1 << 20
    return {
        "W1": "W1 find + stat every entry",
        "W2": "W2 read every file (tar|cat)",
        "W3": f"W3 seq read {s.big / mib:g} MiB file",
        "W4": f"W4 copy-up: append to {s.mid / mib:g} MiB + fsync",
        "W5": f"W5 create+delete {s.w5_files} files",
        "W6": f"W6 chroot {s.w6_true}x true, {s.w6_python}x python3",
        "W7": f"W7 rename {s.w7_files} + delete {s.w7_files} lower files",
        "W8": f"W8 untar {s.w8_bytes / mib:g} MiB",
        "W9": f"W9 fio randread 4k, {s.w9_bytes / mib:g} MiB (read latency sum)",
        "W10": "W10 two parallel tree reads",
    }[wid]


# -- child side ---------------------------------------------------------------------
def _sh(cmd: list[str] | str, ok: tuple[int, ...] = (0,), **kw: object) -> None:
    r = subprocess.run(
        cmd,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        shell=isinstance(cmd, str),
        executable="/bin/bash" if isinstance(cmd, str) else None,
        check=False,
        **kw,
    )  # type: ignore[call-overload]
    if r.returncode not in ok:
        raise RuntimeError(
            f"{cmd if isinstance(cmd, str) else ' '.join(cmd)}: exit "
            f"{r.returncode}: {r.stderr.decode(errors='replace')[:1500]}"
        )


def _read_all(path: str) -> None:
    buf = bytearray(1 << 20)
    with open(path, "rb", buffering=0) as f:
        while f.readinto(buf):
            pass


def _tar_read(root: str, *trees: str) -> str:
    # GNU tar skips reading file data when its output is /dev/null: hence the cat.
    # Exit 1 means "a file changed as we read it", which a tar of a live tree may say.
    q = " ".join(f"'{t}'" for t in trees)
    return f"set -o pipefail; tar -C '{root}' -cf - {q} | cat > /dev/null"


def _w1(root: str, a: Args) -> None:
    _sh(["find", root, "-printf", "%i %s %m %n %y\n"])


def _w2(root: str, a: Args) -> None:
    _sh(_tar_read(root, "."), ok=(0, 1))


def _w3(root: str, a: Args) -> None:
    _read_all(os.path.join(root, a["big"]))


def _w4(root: str, a: Args) -> None:
    fd = os.open(os.path.join(root, a["mid"]), os.O_WRONLY | os.O_APPEND)
    try:
        os.write(fd, b"x")
        os.fsync(fd)
    finally:
        os.close(fd)


def _w4_warm(root: str, a: Args) -> None:
    _read_all(os.path.join(root, a["mid"]))


def _w5(root: str, a: Args) -> None:
    d = os.path.join(root, "var/tmp/bench-w5")
    os.mkdir(d)
    data = b"x" * 100
    names = [os.path.join(d, f"f{i:06d}") for i in range(a["w5_files"])]
    for p in names:
        fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        os.write(fd, data)
        os.close(fd)
    for p in names:
        os.unlink(p)
    os.rmdir(d)


def _w5_warm(root: str, a: Args) -> None:
    os.listdir(os.path.join(root, "var/tmp"))


def _w6(root: str, a: Args) -> None:
    true = "/usr/bin/true" if os.path.lexists(os.path.join(root, "usr/bin/true")) else "/bin/true"
    for _ in range(a["w6_true"]):
        _sh(["chroot", root, true], env=CHROOT_ENV)
    if a["has_python"]:
        for _ in range(a["w6_python"]):
            _sh(
                ["chroot", root, "/usr/bin/python3", "-c", "import json,email,http.client"],
                env=CHROOT_ENV,
            )


def _w7(root: str, a: Args) -> None:
    d = os.path.join(root, a["w7_dir"])
    n = a["w7_files"]
    for i in range(n):
        p = os.path.join(d, f"f{i:05d}")
        os.rename(p, p + ".moved")
    for i in range(n, 2 * n):
        os.unlink(os.path.join(d, f"f{i:05d}"))


def _w7_warm(root: str, a: Args) -> None:
    """Every entry looked up, and the data of the files to be renamed read: a rename
    copies them up."""
    d = os.path.join(root, a["w7_dir"])
    for name in os.listdir(d):
        os.lstat(os.path.join(d, name))
    for i in range(a["w7_files"]):
        _read_all(os.path.join(d, f"f{i:05d}"))


def _w8(root: str, a: Args) -> None:
    d = os.path.join(root, "srv/bench-w8")
    os.mkdir(d)
    _sh(["tar", "-C", d, "-xf", a["tarball"]])


def _w8_warm(root: str, a: Args) -> None:
    _read_all(a["tarball"])
    os.listdir(os.path.join(root, "srv"))


def _w9(root: str, a: Args) -> float:
    """fio takes ~0.3 s to start, more than the reads themselves in a quick run: the
    result is the sum of the reads' latencies as fio measured them."""
    r = subprocess.run(
        [
            "fio",
            "--name=w9",
            f"--filename={os.path.join(root, a['big'])}",
            "--readonly",
            "--rw=randread",
            "--bs=4k",
            "--ioengine=psync",
            f"--io_size={a['w9_bytes']}",
            "--invalidate=0",
            "--randrepeat=1",
            "--norandommap",
            "--output-format=json",
        ],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        check=False,
    )
    if r.returncode != 0:
        raise RuntimeError(f"fio: exit {r.returncode}: {r.stderr[-1500:]}")
    job = json.loads(r.stdout[r.stdout.index("{") :])["jobs"][0]["read"]
    if job.get("total_ios", 0) == 0:
        raise RuntimeError(f"fio read nothing: {r.stderr[-500:]}")
    return float(job["lat_ns"]["mean"]) * int(job["total_ios"]) / 1e9


def _w10(root: str, a: Args) -> None:
    trees = [t for t in ("usr/lib", "usr/share") if os.path.isdir(os.path.join(root, t))]
    procs = [
        subprocess.Popen(
            ["/bin/bash", "-c", _tar_read(root, t)],
            stdin=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        for t in trees
    ]
    errors = []
    for p, t in zip(procs, trees, strict=True):
        _, err = p.communicate()
        if p.returncode not in (0, 1):
            errors.append(f"tar {t}: exit {p.returncode}: {err.decode(errors='replace')[-500:]}")
    if errors:
        raise RuntimeError("; ".join(errors))


RUN: dict[str, Callable[[str, Args], object]] = {
    "W1": _w1,
    "W2": _w2,
    "W3": _w3,
    "W4": _w4,
    "W5": _w5,
    "W6": _w6,
    "W7": _w7,
    "W8": _w8,
    "W9": _w9,
    "W10": _w10,
}
WARM = {**RUN, "W4": _w4_warm, "W5": _w5_warm, "W7": _w7_warm, "W8": _w8_warm}


def child_main(argv: list[str]) -> int:
    spec = json.loads(argv[0])
    fn = (WARM if spec.get("warmup") else RUN)[spec["w"]]
    t0 = time.perf_counter()
    try:
        measured = fn(spec["root"], spec["args"])
    except Exception as e:  # noqa: BLE001  (any failure is the workload's result)
        print(json.dumps({"error": f"{type(e).__name__}: {e}"}))
        return 0
    elapsed = time.perf_counter() - t0
    print(json.dumps({"seconds": measured if isinstance(measured, float) else elapsed}))
    return 0


if __name__ == "__main__":
    sys.exit(child_main(sys.argv[1:]))
