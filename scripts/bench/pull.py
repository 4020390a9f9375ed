"""The pull workload: the benchmark image from a local registry into a cold store.

The image's three kernel-format layers are written once as an OCI layout of
gzip layers (`.wh.` markers, as a registry would hold them; cached beside the
image), then a throw-away docker-registry (Debian's CNCF distribution server)
on a loopback port gets it from skopeo. Each repetition, after dropping the
page cache, times in turn:

- pyunion: `pyunion pull` into an empty store (download, verify, unpack);
- skopeo+umoci: `skopeo copy docker://... oci:DIR` then `umoci unpack`, the
  same work done by the two tools people use for it (timed apart and summed).

Run with `python3 scripts/bench.py --pull` (sizes as for the other workloads:
`--quick` gives a smaller image).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, BinaryIO

from . import procs
from .image import Image, log

ROOT = Path(__file__).resolve().parents[2]
REF = "bench"
# pyunion's own commit code writes each layer (kernel whiteouts -> `.wh.` markers), in
# the interpreter that has pyunion's dependencies.
_TAR = (
    "import sys; from unionfs.image import write_layer_tar; "
    "write_layer_tar(sys.argv[1], sys.stdout.buffer, timestamp=0)"
)


class _Hashing:
    """A write-only file object that hashes (and counts) what passes to `dst`."""

    def __init__(self, dst: BinaryIO | Any) -> None:
        self.dst, self.h, self.n = dst, hashlib.sha256(), 0

    def write(self, b: bytes) -> int:
        self.h.update(b)
        self.n += len(b)
        self.dst.write(b)
        return len(b)

    def flush(self) -> None:
        self.dst.flush()

    def digest(self) -> str:
        return "sha256:" + self.h.hexdigest()


def _blob(blobs: Path, data: bytes) -> dict[str, Any]:
    d = "sha256:" + hashlib.sha256(data).hexdigest()
    (blobs / d[7:]).write_bytes(data)
    return {"digest": d, "size": len(data)}


def _python(pyunion: list[str]) -> str:
    """The interpreter of the pyunion command (its venv's), else this one."""
    cand = Path(pyunion[0]).parent / "python"
    return str(cand) if cand.exists() else sys.executable


def ensure_layout(image: Image, python: str) -> Path:
    """The image as an OCI layout (gzip layers), built once beside it."""
    out = image.root / "oci"
    if (out / "index.json").exists():
        return out
    tmp = image.root / f"oci.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    blobs = tmp / "blobs/sha256"
    blobs.mkdir(parents=True)
    layers, diff_ids = [], []
    t0 = time.monotonic()
    for layer in reversed(image.kernel_layers):  # bottom first
        part = tmp / "layer.part"
        with open(part, "wb") as f:
            comp = _Hashing(f)
            with gzip.GzipFile(fileobj=comp, mode="wb", compresslevel=6, mtime=0) as gz:
                raw = _Hashing(gz)
                p = subprocess.Popen(
                    [python, "-c", _TAR, str(layer)], stdout=subprocess.PIPE, cwd=ROOT
                )
                assert p.stdout is not None
                while chunk := p.stdout.read(1 << 20):
                    raw.write(chunk)
                if p.wait() != 0:
                    raise RuntimeError(f"writing the layer tar of {layer} failed")
        os.rename(part, blobs / comp.digest()[7:])
        layers.append(
            {
                "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                "digest": comp.digest(),
                "size": comp.n,
            }
        )
        diff_ids.append(raw.digest())
    config = {
        "architecture": "amd64",
        "os": "linux",
        "config": {"Cmd": ["/bin/sh"]},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    }
    cdesc = _blob(blobs, json.dumps(config).encode())
    man = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", **cdesc},
        "layers": layers,
    }
    mdesc = _blob(blobs, json.dumps(man).encode())
    (tmp / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    (tmp / "index.json").write_text(
        json.dumps(
            {
                "schemaVersion": 2,
                "manifests": [
                    {
                        "mediaType": man["mediaType"],
                        **mdesc,
                        "annotations": {"org.opencontainers.image.ref.name": REF},
                    }
                ],
            }
        )
    )
    shutil.rmtree(out, ignore_errors=True)
    os.rename(tmp, out)
    log(
        f"OCI layout of the image written in {time.monotonic() - t0:.0f} s "
        f"({sum(x['size'] for x in layers) / 1e6:.0f} MB of gzip layers)"
    )
    return out


class LocalRegistry:
    """A docker-registry process on a free loopback port, storage under `root`."""

    def __init__(self, root: Path) -> None:
        shutil.rmtree(root, ignore_errors=True)
        root.mkdir(parents=True)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.host = f"127.0.0.1:{s.getsockname()[1]}"
        (root / "config.yml").write_text(
            f"version: 0.1\nlog:\n  level: error\n  accesslog:\n    disabled: true\n"
            f"storage:\n  filesystem:\n    rootdirectory: {root / 'storage'}\n"
            f"http:\n  addr: {self.host}\n"
        )
        self.log = open(root / "registry.log", "wb")  # noqa: SIM115 - closed by stop()
        self.proc = subprocess.Popen(
            ["docker-registry", "serve", str(root / "config.yml")],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        ok = procs.wait_until(lambda: self._up(), 30, 0.05)
        if not ok:
            self.stop()
            raise RuntimeError("docker-registry did not start")

    def _up(self) -> bool:
        import urllib.request

        try:
            urllib.request.urlopen(f"http://{self.host}/v2/", timeout=2)
            return True
        except OSError:
            return False

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self.log.close()


def _timed(cmd: list[str], timeout: float) -> float:
    t0 = time.monotonic()
    procs.run(cmd, timeout, what=os.path.basename(cmd[0]))
    return time.monotonic() - t0


def run(
    cache: Path, image: Image, pyunion: list[str], reps: int, timeout: float = 1800.0
) -> dict[str, Any]:
    """Time both ways `reps` times, alternating; returns the raw seconds and the medians."""
    missing = [t for t in ("docker-registry", "skopeo", "umoci") if shutil.which(t) is None]
    if missing:
        raise SystemExit(
            f"bench: the pull workload needs {', '.join(missing)} (scripts/setup.sh installs them)"
        )
    layout = ensure_layout(image, _python(pyunion))
    work = cache / "pull-run"
    reg = LocalRegistry(work / "registry")
    results: dict[str, list[float]] = {
        "pyunion": [],
        "skopeo copy": [],
        "umoci unpack": [],
        "skopeo+umoci": [],
    }
    try:
        ref = f"{reg.host}/bench:1"
        log(f"pushing the image to {reg.host} with skopeo")
        procs.run(
            [
                "skopeo",
                "copy",
                "-q",
                "--dest-tls-verify=false",
                f"oci:{layout}:{REF}",
                f"docker://{ref}",
            ],
            timeout,
            "skopeo copy (push)",
        )
        for rep in range(reps):
            for who in ("pyunion", "skopeo+umoci") if rep % 2 == 0 else ("skopeo+umoci", "pyunion"):
                scratch = work / "dest"
                shutil.rmtree(scratch, ignore_errors=True)
                scratch.mkdir()
                os.sync()
                procs.drop_caches()
                if who == "pyunion":
                    t = _timed(
                        [
                            *pyunion,
                            "pull",
                            "-q",
                            "--tls-verify=false",
                            "--store",
                            str(scratch / "store"),
                            ref,
                        ],
                        timeout,
                    )
                    results["pyunion"].append(t)
                else:
                    t1 = _timed(
                        [
                            "skopeo",
                            "copy",
                            "-q",
                            "--src-tls-verify=false",
                            f"docker://{ref}",
                            f"oci:{scratch / 'oci'}:{REF}",
                        ],
                        timeout,
                    )
                    t2 = _timed(
                        [
                            "umoci",
                            "unpack",
                            "--image",
                            f"{scratch / 'oci'}:{REF}",
                            str(scratch / "bundle"),
                        ],
                        timeout,
                    )
                    results["skopeo copy"].append(t1)
                    results["umoci unpack"].append(t2)
                    results["skopeo+umoci"].append(t1 + t2)
                    t = t1 + t2
                log(f"pull rep {rep + 1}/{reps}: {who} {t:.2f} s")
                shutil.rmtree(scratch, ignore_errors=True)
    finally:
        reg.stop()
        shutil.rmtree(work, ignore_errors=True)
    med = {k: statistics.median(v) for k, v in results.items() if v}
    blobs = json.loads((layout / "index.json").read_text())["manifests"][0]["digest"]
    man = json.loads((layout / "blobs/sha256" / blobs[7:]).read_text())
    return {
        "seconds": results,
        "median": med,
        "compressed_bytes": sum(x["size"] for x in man["layers"]),
        "ratio": med["pyunion"] / med["skopeo+umoci"],
    }


def render(res: dict[str, Any]) -> str:
    med = res["median"]
    head = (
        f"pull workload: {res['compressed_bytes'] / 1e6:.0f} MB of gzip layers from a "
        f"local registry into a cold store (medians of {len(res['seconds']['pyunion'])})"
    )
    lines = [head, "| way | median s |", "|---|---:|"]
    for k in ("pyunion", "skopeo copy", "umoci unpack", "skopeo+umoci"):
        lines.append(f"| {k} | {med[k]:.2f} |")
    lines.append(f"| pyunion / (skopeo+umoci) | {res['ratio']:.2f} |")
    return "\n".join(lines) + "\n"
