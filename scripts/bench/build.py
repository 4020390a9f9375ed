"""The build workload: `pyunion build` against `buildah bud`, in the same run.

A ten-step Containerfile on the benchmark's debootstrap root filesystem (one
layer image): three RUNs that install local .debs with dpkg, a useradd, a COPY
of a source tree of small files, a RUN over that tree, and metadata steps.
Both tools build it three ways, each from a fresh storage that holds only the
base image (importing it is not timed):

- cold: an empty build cache (and the page cache dropped first);
- warm: the same build again, nothing changed (every step from the cache);
- edit: one source file changed (the COPY and the steps after it run again).

buildah runs with `--layers`, the overlay driver with fuse-overlayfs as its
mount program (`overlay.mount_program`), and `--isolation chroot`, as rootful
buildah on a machine without kernel overlay for containers would.

Cached under --cache/build: the base image as an OCI layout, the .debs, the
source tree; the stores themselves are made afresh for every repetition.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any

from .image import ensure_rootfs, log
from .impls import FuseOverlayfs
from .procs import drop_caches, run

FORMAT = 1
CONTAINERFILE = """FROM base
ENV APP_HOME=/opt/app LANG=C.UTF-8
COPY debs/ /tmp/debs/
RUN dpkg -i /tmp/debs/bench-data-a.deb
RUN dpkg -i /tmp/debs/bench-data-b.deb /tmp/debs/bench-tools.deb
RUN rm -rf /tmp/debs && useradd -m -u 1500 app
WORKDIR /opt/app
COPY --chown=app src/ ./
RUN python3 -m compileall -q . && bench-tool > /opt/app/tool.out
USER app
CMD ["python3", "-m", "app"]
"""
N_SOURCE_FILES = 400
PATH = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
EDITED = "src/app/edited.py"
MODES = ("cold", "warm", "edit")


def _write(path: Path, data: bytes, mode: int = 0o644) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    os.chmod(path, mode)


def _deb(out: Path, name: str, files: int, size: int, seed: int, script: bool = False) -> None:
    """A local package of `files` files of random data (dpkg has real work to do)."""
    rnd = random.Random(seed)
    root = out.parent / f"{name}-root"
    shutil.rmtree(root, ignore_errors=True)
    _write(
        root / "DEBIAN/control",
        (
            f"Package: {name}\nVersion: 1.0\nArchitecture: all\n"
            "Maintainer: bench <bench@example.org>\n"
            f"Description: {name}\n"
        ).encode(),
    )
    for i in range(files):
        _write(root / f"usr/share/{name}/d{i % 20}/f{i}.bin", rnd.randbytes(size))
    if script:
        _write(root / "usr/bin/bench-tool", b"#!/bin/sh\necho tool ran\n", 0o755)
    subprocess.run(
        ["dpkg-deb", "--root-owner-group", "-Zgzip", "-z1", "--build", str(root), str(out)],
        check=True,
        capture_output=True,
    )
    shutil.rmtree(root)


def _oci_base(rootfs: Path, out: Path) -> None:
    """The root filesystem as a one-layer OCI layout (uncompressed layer)."""
    blobs = out / "blobs/sha256"
    blobs.mkdir(parents=True)
    tar = out / "layer.tar"
    subprocess.run(
        ["tar", "-C", str(rootfs), "--numeric-owner", "--xattrs", "-cf", str(tar), "."], check=True
    )
    h = hashlib.sha256()
    with open(tar, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    ldigest, lsize = "sha256:" + h.hexdigest(), tar.stat().st_size
    tar.rename(blobs / h.hexdigest())

    def put(obj: dict[str, Any]) -> tuple[str, int]:
        data = json.dumps(obj).encode()
        d = hashlib.sha256(data).hexdigest()
        (blobs / d).write_bytes(data)
        return "sha256:" + d, len(data)

    arch = {"x86_64": "amd64", "aarch64": "arm64"}.get(os.uname().machine, os.uname().machine)
    cdigest, csize = put(
        {
            "architecture": arch,
            "os": "linux",
            "config": {"Env": [PATH], "Cmd": ["/bin/bash"]},
            "rootfs": {"type": "layers", "diff_ids": [ldigest]},
            "history": [{"created_by": "debootstrap"}],
        }
    )
    mdigest, msize = put(
        {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": cdigest,
                "size": csize,
            },
            "layers": [
                {
                    "mediaType": "application/vnd.oci.image.layer.v1.tar",
                    "digest": ldigest,
                    "size": lsize,
                }
            ],
        }
    )
    (out / "index.json").write_text(
        json.dumps(
            {
                "schemaVersion": 2,
                "manifests": [
                    {
                        "mediaType": "application/vnd.oci.image.manifest.v1+json",
                        "digest": mdigest,
                        "size": msize,
                        "annotations": {"org.opencontainers.image.ref.name": "base"},
                    }
                ],
            }
        )
    )
    (out / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')


def ensure_build_inputs(cache: Path, source: str) -> tuple[Path, Path, str]:
    """(base OCI layout, build context, rootfs name), built once into cache/build."""
    rootfs, name = ensure_rootfs(cache, source, 20000)
    top = cache / "build" / f"v{FORMAT}-{name}"
    done = top / "inputs.json"
    oci, ctx = top / "base-oci", top / "context"
    if done.exists():
        return oci, ctx, name
    shutil.rmtree(top, ignore_errors=True)
    top.mkdir(parents=True)
    log(f"build workload: base image and context in {top}")
    _oci_base(rootfs, oci)
    (ctx / "debs").mkdir(parents=True)
    _deb(ctx / "debs/bench-data-a.deb", "bench-data-a", 600, 8192, 1)
    _deb(ctx / "debs/bench-data-b.deb", "bench-data-b", 400, 16384, 2)
    _deb(ctx / "debs/bench-tools.deb", "bench-tools", 50, 4096, 3, script=True)
    rnd = random.Random(4)
    for i in range(N_SOURCE_FILES):
        body = "".join(f"def f{j}(x):\n    return x * {rnd.randint(1, 99)}\n\n" for j in range(20))
        _write(ctx / f"src/app/m{i // 40}/mod{i}.py", body.encode())
    _write(ctx / EDITED, b"VALUE = 0\n")
    _write(ctx / "src/app/__main__.py", b"print('app')\n")
    _write(ctx / "Containerfile", CONTAINERFILE.encode())
    done.write_text(json.dumps({"rootfs": str(rootfs), "source": name}))
    return oci, ctx, name


class _Tool:
    name = ""

    def __init__(self, work: Path) -> None:
        self.work = work

    def fresh(self, oci: Path) -> None:
        raise NotImplementedError

    def build(self, ctx: Path) -> None:
        raise NotImplementedError

    def cleanup(self) -> None:
        raise NotImplementedError

    def version(self) -> str:
        raise NotImplementedError


class PyunionBuild(_Tool):
    name = "pyunion"

    def __init__(self, work: Path, command: list[str]) -> None:
        super().__init__(work)
        self.command = command
        self.store = work / "pyunion-store"
        # What a user gets: Python's cached bytecode (a session may have turned it off).
        self.env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}

    def fresh(self, oci: Path) -> None:
        self.cleanup()
        run(
            [
                *self.command,
                "image",
                "import",
                str(oci),
                "--tag",
                "base",
                "--store",
                str(self.store),
                "-q",
            ],
            1200,
            "pyunion image import",
            env=self.env,
        )

    def build(self, ctx: Path) -> None:
        run(
            [*self.command, "build", "-q", "--store", str(self.store), "-t", "bench", str(ctx)],
            1800,
            "pyunion build",
            env=self.env,
        )

    def cleanup(self) -> None:
        shutil.rmtree(self.store, ignore_errors=True)

    def version(self) -> str:
        return " ".join(self.command)


class BuildahBuild(_Tool):
    name = "buildah"

    def __init__(self, work: Path) -> None:
        super().__init__(work)
        self.root, self.runroot = work / "buildah-root", work / "buildah-runroot"
        self.mount_program = shutil.which("fuse-overlayfs") or "/usr/bin/fuse-overlayfs"

    @property
    def cmd(self) -> list[str]:
        return [
            "buildah",
            "--root",
            str(self.root),
            "--runroot",
            str(self.runroot),
            "--storage-driver",
            "overlay",
            "--storage-opt",
            f"overlay.mount_program={self.mount_program}",
        ]

    def fresh(self, oci: Path) -> None:
        self.cleanup()
        cs = (
            f"containers-storage:[overlay@{self.root}+{self.runroot}:"
            f"overlay.mount_program={self.mount_program}]"
        )
        run(
            ["skopeo", "copy", "-q", f"oci:{oci}:base", cs + "localhost/base:latest"],
            1200,
            "skopeo copy",
        )

    def build(self, ctx: Path) -> None:
        run(
            [*self.cmd, "bud", "--layers", "--isolation", "chroot", "-q", "-t", "bench", str(ctx)],
            1800,
            "buildah bud",
        )

    def cleanup(self) -> None:
        if self.root.exists():
            subprocess.run(
                [*self.cmd, "rm", "--all"], capture_output=True, timeout=300, check=False
            )
            subprocess.run(
                ["umount", "-R", str(self.root)], capture_output=True, timeout=60, check=False
            )
            for sub in (self.root / "overlay",):
                if sub.exists():
                    for m in sorted(sub.glob("*/merged"), reverse=True):
                        subprocess.run(
                            ["umount", "-l", str(m)], capture_output=True, timeout=60, check=False
                        )
        shutil.rmtree(self.root, ignore_errors=True)
        shutil.rmtree(self.runroot, ignore_errors=True)

    def version(self) -> str:
        out = subprocess.run(
            ["buildah", "--version"], capture_output=True, text=True, check=False
        ).stdout.strip()
        return f"{out}; {FuseOverlayfs().version()}"


def missing_tools() -> str | None:
    for tool in ("buildah", "skopeo", "fuse-overlayfs", "dpkg-deb", "tar"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    return None


def run_build_bench(
    cache: Path, pyunion_cmd: list[str], reps: int, source: str = "auto"
) -> dict[str, Any]:
    """Time cold, warm and edit builds for each tool, `reps` times; raw seconds."""
    oci, ctx, name = ensure_build_inputs(cache, source)
    work = cache / "build" / "work"
    work.mkdir(parents=True, exist_ok=True)
    tools: list[_Tool] = [PyunionBuild(work, pyunion_cmd), BuildahBuild(work)]
    times: dict[str, dict[str, list[float]]] = {t.name: {m: [] for m in MODES} for t in tools}
    edited = ctx / EDITED
    try:
        for rep in range(reps):
            for tool in tools:
                log(f"build workload: {tool.name}, repetition {rep + 1}/{reps}")
                tool.fresh(oci)
                edited.write_text("VALUE = 0\n")
                drop_caches()
                for mode in MODES:
                    if mode == "edit":
                        edited.write_text(f"VALUE = {rep + 1}\n")
                    t0 = time.monotonic()
                    tool.build(ctx)
                    times[tool.name][mode].append(time.monotonic() - t0)
                tool.cleanup()
    finally:
        edited.write_text("VALUE = 0\n")
        for tool in tools:
            tool.cleanup()
    return {
        "rootfs": name,
        "containerfile": CONTAINERFILE,
        "reps": reps,
        "times": times,
        "versions": {t.name: t.version() for t in tools},
        "source_files": N_SOURCE_FILES,
    }


def render_build(build: dict[str, Any], markdown: bool) -> str:
    """The build table: median seconds per tool and mode, and pyunion/buildah."""
    t = build["times"]
    rows = [["build (median s)", "pyunion", "buildah", "py/buildah"]]
    for mode, label in (
        ("cold", "cold: empty build cache"),
        ("warm", "warm: nothing changed"),
        ("edit", "one source file changed"),
    ):
        p = statistics.median(t["pyunion"][mode]) if t["pyunion"][mode] else None
        b = statistics.median(t["buildah"][mode]) if t["buildah"][mode] else None
        ratio = f"{p / b:.2f}" if p and b else "-"
        rows.append([label, f"{p:.2f}" if p else "-", f"{b:.2f}" if b else "-", ratio])
    if markdown:
        lines = ["| " + " | ".join(rows[0]) + " |", "|---|---:|---:|---:|"]
        lines += ["| " + " | ".join(r) + " |" for r in rows[1:]]
    else:
        widths = [max(len(r[i]) for r in rows) for i in range(4)]
        lines = [
            "  ".join(
                c.ljust(w) if i == 0 else c.rjust(w)
                for i, (c, w) in enumerate(zip(r, widths, strict=True))
            )
            for r in rows
        ]
    head = (
        f"Build: a {len(build['containerfile'].splitlines()) - 1}-step Containerfile on the "
        f"{build['rootfs']} image, {build['reps']} repetition(s); "
        f"buildah: {build['versions'].get('buildah', '?')}"
    )
    return head + "\n\n" + "\n".join(lines) + "\n"
