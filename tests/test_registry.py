"""`pyunion pull`/`push`/`login`/`logout` against a real registry, skopeo as the oracle.

A session's registries (tests/registry_server.py): one plain HTTP, one with
TLS and htpasswd. skopeo pushes the images the tests start from (the built-in
busybox sample, a buildah-made image as OCI and as Docker v2 schema 2, a
two-platform index, a big one-layer image) and copies what pyunion pulls or
pushes into OCI layouts for comparison; umoci unpacks them; the registry's
access log counts the requests each command made.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from ocilayout import CONFIG, LAYER_TAR, Layout
from registry_server import PASSWORD, USER, Registry, running, skip_reason
from support import (
    PYUNION,
    buildah_busybox,
    buildah_image,
    force_unmount,
    needs_fuse,
    pyunion,
    sh,
    tree_view,
)

from unionfs.image import Store, resolve_layers


def _skip() -> str | None:
    if os.geteuid() != 0:
        return "needs root (buildah, umoci, mounts)"
    return skip_reason() or (
        None if shutil.which("buildah") and shutil.which("umoci") else "needs buildah and umoci"
    )


pytestmark = pytest.mark.skipif(_skip() is not None, reason=_skip() or "")
NOTLS = "--tls-verify=false"


def fails(*args: str, env: dict[str, str] | None = None) -> str:
    """pyunion ARGS must fail with one line on stderr, no traceback; returns that line."""
    r = pyunion(*args, check=False, env=env, timeout=120)
    assert r.returncode != 0, r.stdout
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    return lines[0]


# --- images, made once --------------------------------------------------------------------
def _write_layout(layout: Path, files: dict[str, bytes], ref: str = "latest") -> None:
    """A one-layer image (uncompressed tar) with `files` in it."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in files.items():
            ti = tarfile.TarInfo(name)
            ti.size, ti.mode = len(data), 0o644
            tar.addfile(ti, io.BytesIO(data))
    lay = Layout(layout)
    layer = lay.put(buf.getvalue(), LAYER_TAR)
    config = {"architecture": "amd64", "os": "linux", "config": {}}
    lay.tag(lay.image([layer], [layer["digest"]], config), ref)


def _add_platform_index(layout: Path, ref: str, new_ref: str) -> None:
    """Make `new_ref` an index: this machine's image `ref` plus a linux/arm64 twin."""
    lay = Layout(layout)
    desc = lay.find(ref)
    man = lay.read_json(desc["digest"])
    cfg = lay.read_json(man["config"]["digest"])
    host_arch = cfg["architecture"]
    cfg["architecture"] = "arm64"
    twin = lay.put_json({**man, "config": lay.put_json(cfg, CONFIG)}, desc["mediaType"])
    plain = {k: desc[k] for k in ("mediaType", "digest", "size")}
    index = lay.platform_index(
        [
            (plain, {"os": "linux", "architecture": host_arch}),
            (twin, {"os": "linux", "architecture": "arm64"}),
        ]
    )
    lay.tag(index, new_ref)


@pytest.fixture(scope="module")
def reg(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    with running(tmp_path_factory.mktemp("registry")) as r:
        yield r


@pytest.fixture(scope="module")
def images(reg: Registry, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """skopeo pushes: sample:1 (busybox sample), bah:1 (buildah, OCI), bah-docker:1 (v2s2),
    multi:1 (index of bah:1 and an arm64 twin), big:1 (one 48 MiB layer)."""
    from unionfs.sample import build_sample, build_sample_oci

    t = tmp_path_factory.mktemp("images")
    dest = f"docker://{reg.host}"
    copy = ["skopeo", "copy", "-q", "--dest-tls-verify=false"]
    sh(
        *copy,
        f"oci:{build_sample_oci(t / 'sample', build_sample(t / 'sample'))}:latest",
        f"{dest}/sample:1",
    )
    with buildah_busybox(t) as (bah, c):
        sh(*bah, "config", "--env", "FOO=bar", "--cmd", '["/bin/busybox", "sh"]', c)
        sh(
            *bah,
            "run",
            "--isolation",
            "chroot",
            c,
            "--",
            "/bin/busybox",
            "sh",
            "-c",
            "B=/bin/busybox; $B mkdir -p /etc /data; echo hi > /etc/hi; $B ln -s hi /etc/sym; "
            "echo x > /data/x; $B chown 12:34 /data/x; $B rm /bin/busybox.gone 2>/dev/null; :",
        )
        sh(*bah, "commit", "-q", c, "bah")
        sh("skopeo", "copy", "-q", buildah_image(t, "bah"), f"oci:{t / 'bah'}:1")
    sh(*copy, f"oci:{t / 'bah'}:1", f"{dest}/bah:1")
    sh(*copy, "--format", "v2s2", f"oci:{t / 'bah'}:1", f"{dest}/bah-docker:1")
    _add_platform_index(t / "bah", "1", "multi")
    sh(*copy, "--all", f"oci:{t / 'bah'}:multi", f"{dest}/multi:1")
    _write_layout(t / "big", {"big.bin": os.urandom(48 << 20), "small": b"small\n"})
    sh(*copy, f"oci:{t / 'big'}:latest", f"{dest}/big:1")
    yield t


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("store")


def skopeo_layout(reg: Registry, name: str, out: Path) -> tuple[dict, bytes, Path]:
    """skopeo's copy of NAME into an OCI layout: (manifest, manifest bytes, umoci rootfs)."""
    sh(
        "skopeo",
        "copy",
        "-q",
        "--src-tls-verify=false",
        f"docker://{reg.host}/{name}",
        f"oci:{out}:x",
    )
    idx = json.loads((out / "index.json").read_text())
    mbytes = (out / "blobs/sha256" / idx["manifests"][0]["digest"][7:]).read_bytes()
    sh("umoci", "unpack", "--image", f"{out}:x", out.parent / (out.name + "-bundle"))
    return json.loads(mbytes), mbytes, out.parent / (out.name + "-bundle") / "rootfs"


def mounted_view(store: Path, image: str, mnt: Path) -> dict:
    mnt.mkdir(parents=True, exist_ok=True)
    pyunion("mount", "--store", str(store), image, str(mnt))
    try:
        return tree_view(mnt)
    finally:
        if pyunion("umount", str(mnt), check=False).returncode != 0:
            force_unmount(mnt)


def blob_gets(reqs: list) -> list[str]:
    return [r.path for r in reqs if r.method == "GET" and "/blobs/sha256:" in r.path]


# --- tests ---------------------------------------------------------------------------------
@needs_fuse
@pytest.mark.parametrize("name", ["sample:1", "bah:1", "bah-docker:1", "multi:1"])
def test_pull_equals_skopeo_copy(
    reg: Registry, images: Path, store: Path, tmp_path: Path, name: str
) -> None:
    ref = f"{reg.host}/{name}"
    image_id = pyunion("pull", NOTLS, "--store", str(store), ref, timeout=120).stdout.strip()
    man, mbytes, rootfs = skopeo_layout(reg, name, tmp_path / "skopeo")
    img = Store(str(store)).lookup(ref)
    assert img.id == image_id == man["config"]["digest"]
    assert [d["digest"] for d in img.manifest["layers"]] == [d["digest"] for d in man["layers"]]
    if name != "bah-docker:1":  # skopeo turns a Docker manifest into an OCI one
        assert Store(str(store)).read_blob(img.digest) == mbytes
    else:
        assert img.manifest["mediaType"] == "application/vnd.docker.distribution.manifest.v2+json"
    assert mounted_view(store, ref, tmp_path / "mnt") == tree_view(rootfs)


def test_second_pull_and_shared_layers_download_nothing(
    reg: Registry, images: Path, tmp_path: Path
) -> None:
    s = ["--store", str(tmp_path / "s")]
    pyunion("pull", NOTLS, *s, f"{reg.host}/bah:1")
    mark = reg.mark()
    pyunion("pull", NOTLS, *s, f"{reg.host}/bah:1")
    assert blob_gets(reg.requests(mark)) == []
    # The arm64 twin in the index has the same layers, only its config is new.
    mark = reg.mark()
    pyunion("pull", NOTLS, *s, "--platform", "linux/arm64", f"{reg.host}/multi:1")
    gets = blob_gets(reg.requests(mark))
    arm = Store(s[1]).lookup(f"{reg.host}/multi:1")
    assert arm.config["architecture"] == "arm64"
    assert gets == [f"/v2/multi/blobs/{arm.config_digest}"]
    err = fails("pull", NOTLS, *s, "--platform", "linux/s390x", f"{reg.host}/multi:1")
    assert "no image for platform linux/s390x" in err and "arm64" in err


def _commit(store: Path, base: str, tag: str, files: dict[str, bytes], tmp: Path) -> str:
    upper = tmp / ("upper-" + tag.replace("/", "_").replace(":", "_"))
    upper.mkdir()
    for name, data in files.items():
        (upper / name).write_bytes(data)
    return pyunion(
        "commit",
        str(upper),
        "--image",
        base,
        "--tag",
        tag,
        "--timestamp",
        "0",
        "--cmd",
        "head -n1 /" + next(iter(files)),
        "--store",
        str(store),
    ).stdout.strip()


def _uploads(reqs: list) -> tuple[list[str], list[str], int]:
    """(digests uploaded, digests mounted, PATCH requests)."""
    put = [
        r.path.split("digest=")[1].replace("%3A", ":")
        for r in reqs
        if r.method == "PUT" and "/blobs/uploads/" in r.path and r.status == 201
    ]
    mounted = [
        r.path.split("mount=")[1].split("&")[0].replace("%3A", ":")
        for r in reqs
        if r.method == "POST" and "mount=" in r.path and r.status == 201
    ]
    return put, mounted, sum(1 for r in reqs if r.method == "PATCH")


@needs_fuse
def test_push_uploads_only_missing_blobs_and_skopeo_reads_it(
    reg: Registry, images: Path, tmp_path: Path
) -> None:
    s = tmp_path / "s"
    base = f"{reg.host}/sample:1"
    pyunion("pull", NOTLS, "--store", str(s), base)
    base_layers = [d["digest"] for d in Store(str(s)).lookup(base).manifest["layers"]]
    _commit(s, base, "app:a", {"a.txt": b"made by a\n" + os.urandom(200_000)}, tmp_path)
    _commit(s, base, "app:b", {"b.txt": b"made by b\n"}, tmp_path)
    a, b = Store(str(s)).lookup("app:a"), Store(str(s)).lookup("app:b")

    # First push to a new repository: the base is mounted from sample/, a's layer is
    # uploaded in 64 KiB chunks, then its config.
    mark = reg.mark()
    out = pyunion(
        "push",
        NOTLS,
        "--store",
        str(s),
        "--chunk-size",
        "64k",
        "app:a",
        f"docker://{reg.host}/apps/app:a",
    ).stdout.strip()
    assert out == a.digest
    put, mounted, patches = _uploads(reg.requests(mark))
    assert sorted(mounted) == sorted(base_layers)
    assert sorted(put) == sorted([a.manifest["layers"][-1]["digest"], a.config_digest])
    assert patches >= 3
    # A second image on the same base: only its own layer and config go up.
    mark = reg.mark()
    pyunion("push", NOTLS, "--store", str(s), "app:b", f"{reg.host}/apps/app:b")
    put, mounted, patches = _uploads(reg.requests(mark))
    assert sorted(put) == sorted([b.manifest["layers"][-1]["digest"], b.config_digest])
    assert mounted == [] and patches == 0
    # Pushing it again uploads nothing.
    mark = reg.mark()
    pyunion("push", NOTLS, "--store", str(s), "app:b", f"{reg.host}/apps/app:b")
    assert _uploads(reg.requests(mark))[:2] == ([], [])

    # skopeo gets the same manifest, config and layers ...
    raw = sh("skopeo", "inspect", "--raw", "--tls-verify=false", f"docker://{reg.host}/apps/app:a")
    assert "sha256:" + hashlib.sha256(raw.encode()).hexdigest() == a.digest
    man, _, rootfs = skopeo_layout(reg, "apps/app:a", tmp_path / "skopeo")
    assert man["config"]["digest"] == a.id
    assert (rootfs / "a.txt").read_bytes().startswith(b"made by a\n")
    # ... and a pull into another store is the same image, which runs.
    s2 = tmp_path / "s2"
    got = pyunion("pull", NOTLS, "--store", str(s2), f"{reg.host}/apps/app:a").stdout.strip()
    assert got == a.id
    r = pyunion("run", "--store", str(s2), f"{reg.host}/apps/app:a", timeout=120)
    assert r.stdout == "made by a\n"


class _CutFirstPut:
    """A TCP proxy to the registry that cuts the first blob PUT whose body is longer
    than 2 x `after` bytes, `after` bytes into its body (a link that drops)."""

    def __init__(self, upstream: str, after: int, method: bytes = b"PUT") -> None:
        self.method = method + b" /v2/"
        host, port = upstream.rsplit(":", 1)
        self.upstream = (host, int(port))
        self.after = after
        self.cut = threading.Event()
        self.lsock = socket.create_server(("127.0.0.1", 0))
        self.host = f"127.0.0.1:{self.lsock.getsockname()[1]}"
        self.socks: list[socket.socket] = [self.lsock]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                c, _ = self.lsock.accept()
            except OSError:
                return
            u = socket.create_connection(self.upstream, timeout=30)
            self.socks += [c, u]
            threading.Thread(target=self._pump, args=(c, u, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(u, c, False), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, upward: bool) -> None:
        left = -1  # bytes of the body to cut still to forward; -1: not armed
        try:
            while data := src.recv(1 << 16):
                if upward and left < 0 and not self.cut.is_set() and self.method in data:
                    m = re.search(rb"content-length: *(\d+)", data, re.IGNORECASE)
                    end = data.find(b"\r\n\r\n")
                    if m and end > 0 and int(m.group(1)) > 2 * self.after:
                        self.cut.set()
                        left = self.after + end + 4
                if left >= 0:
                    dst.sendall(data[:left])
                    left -= min(left, len(data))
                    if left == 0:
                        time.sleep(0.5)  # the registry stores what it got before the cut
                        break
                    continue
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        for s in self.socks:
            with contextlib.suppress(OSError):
                s.close()


@pytest.mark.parametrize("method", [b"PUT", b"PATCH"])
def test_a_cut_upload_is_sent_again(
    reg: Registry, images: Path, tmp_path: Path, method: bytes
) -> None:
    """A link that drops in the middle of a blob's single PUT, or of a chunk's PATCH: the
    push sends it again to a new upload (before: to the same upload, which the registry
    refuses once it has kept part of it: "blob upload invalid"). The image then pulls
    back whole."""
    s = tmp_path / "s"
    base = f"{reg.host}/sample:1"
    pyunion("pull", NOTLS, "--store", str(s), base)
    blob = os.urandom(1 << 20)
    _commit(s, base, "cut:1", {"cut.bin": blob}, tmp_path)
    proxy = _CutFirstPut(reg.host, 256 << 10, method)
    chunks = ["--chunk-size", "768KiB"] if method == b"PATCH" else []
    try:
        r = pyunion(
            "push",
            NOTLS,
            *("--retry", "2", "--retry-delay", "0.05", "--timeout", "10"),
            *chunks,
            "--store",
            str(s),
            "cut:1",
            f"{proxy.host}/cut/img:1",
            check=False,
            timeout=120,
        )
    finally:
        proxy.close()
    assert proxy.cut.is_set(), "no PUT was cut"
    assert r.returncode == 0, r.stderr
    s2 = tmp_path / "s2"
    pyunion("pull", NOTLS, "--store", str(s2), f"{reg.host}/cut/img:1", timeout=120)
    layer = resolve_layers(f"{reg.host}/cut/img:1", str(s2))[0]
    assert (Path(layer) / "cut.bin").read_bytes() == blob


def test_interrupted_pull_leaves_nothing_trusted_then_completes(
    reg: Registry, images: Path, tmp_path: Path
) -> None:
    s = tmp_path / "s"
    ref = f"{reg.host}/big:1"
    p = subprocess.Popen(
        [*PYUNION, "pull", NOTLS, "-q", "--store", str(s), ref],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 60
        partial: list[str] = []
        while time.monotonic() < deadline and p.poll() is None:
            partial = [
                f for f in glob.glob(str(s / "tmp/*/blob-*")) if os.path.getsize(f) > (1 << 20)
            ]
            if partial:
                break
            time.sleep(0.005)
        assert partial and p.poll() is None, "the pull ended before it could be interrupted"
        p.send_signal(signal.SIGKILL)
        p.wait(timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait(timeout=30)
    assert pyunion("images", "-q", "--store", str(s)).stdout.strip() == ""
    assert os.listdir(s / "layers") == []
    assert glob.glob(str(s / "tmp/*"))  # the leftovers are only in tmp/
    image_id = pyunion("pull", NOTLS, "--store", str(s), ref, timeout=120).stdout.strip()
    assert Store(str(s)).lookup(ref).id == image_id
    assert os.listdir(s / "tmp") == []
    big = Path(resolve_layers(ref, str(s))[0]) / "big.bin"
    blob = images / "big/blobs/sha256"
    man = json.loads((images / "big/index.json").read_text())["manifests"][0]["digest"]
    layer = json.loads((blob / man[7:]).read_text())["layers"][0]["digest"]
    with tarfile.open(blob / layer[7:]) as tar:
        f = tar.extractfile("big.bin")
        assert f is not None
        assert hashlib.sha256(f.read()).digest() == hashlib.sha256(big.read_bytes()).digest()


def test_errors_are_one_line(reg: Registry, images: Path, tmp_path: Path) -> None:
    s = ["--store", str(tmp_path / "s")]
    assert "unknown image" in fails("pull", NOTLS, *s, f"{reg.host}/nothere:1")
    assert "unknown image" in fails("pull", NOTLS, *s, f"{reg.host}/sample:nosuchtag")
    assert "unreachable" in fails("pull", "--retry", "0", *s, "127.0.0.1:1/x:1")
    assert "TLS failure" in fails("pull", *s, f"{reg.host}/sample:1")  # it speaks plain HTTP
    assert "invalid image reference" in fails("pull", *s, "Bad/Name")
    # A blob corrupted in the registry's storage: refused, nothing kept.
    layout = tmp_path / "corrupt"
    _write_layout(layout, {"f": os.urandom(4096)})
    sh(
        "skopeo",
        "copy",
        "-q",
        "--dest-tls-verify=false",
        f"oci:{layout}:latest",
        f"docker://{reg.host}/corrupt:1",
    )
    man = json.loads(
        sh("skopeo", "inspect", "--raw", "--tls-verify=false", f"docker://{reg.host}/corrupt:1")
    )
    data = reg.blob_file(man["layers"][0]["digest"])
    data.write_bytes(bytes(b ^ 0xFF for b in data.read_bytes()))
    err = fails("pull", NOTLS, *s, f"{reg.host}/corrupt:1")
    assert "digest" in err and "does not match" in err
    assert os.listdir(tmp_path / "s/layers") == []
    assert pyunion("images", "-q", *s).stdout.strip() == ""


MALFORMED_CONFIG = {  # runtime config, extra DiffIDs, what the line says
    "env-not-strings": ({"Env": [1]}, 0, "Expected `str`, got `int` - at `$.config.Env[0]`"),
    "nul-in-cmd": (
        {"Cmd": ["/bin/sh", "a\u0000b"]},
        0,
        "Expected a string without NUL - at `$.config.Cmd[1]`",
    ),
    "more-diff-ids": ({}, 1, "has 1 layers but its config lists 2 diff_ids"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED_CONFIG))
def test_malformed_config_is_one_line_and_stores_nothing(
    reg: Registry, tmp_path: Path, case: str
) -> None:
    """A registry serves whatever was pushed to it: the config is checked as import checks it."""
    runtime, extra, says = MALFORMED_CONFIG[case]
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        ti = tarfile.TarInfo("f")
        ti.size = 2
        tar.addfile(ti, io.BytesIO(b"f\n"))
    layer = reg.upload_blob("malformed", buf.getvalue())  # uncompressed: DiffID = digest
    config = reg.upload_blob(
        "malformed",
        json.dumps(
            {
                "architecture": "amd64",
                "os": "linux",
                "config": runtime,
                "rootfs": {"type": "layers", "diff_ids": [layer["digest"]] * (1 + extra)},
            }
        ).encode(),
    )
    mt = "application/vnd.oci.image.manifest.v1+json"
    man = {
        "schemaVersion": 2,
        "mediaType": mt,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", **config},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", **layer}],
    }
    reg.put_manifest("malformed", case, json.dumps(man).encode(), mt)
    s = tmp_path / "s"
    mark = reg.mark()
    err = fails("pull", NOTLS, "--store", str(s), f"{reg.host}/malformed:{case}")
    assert err.startswith(
        f"pyunion: {'the config of ' if not extra else ''}{reg.host}/malformed:{case}: "
    ), err
    assert says in err, err
    assert blob_gets(reg.requests(mark)) == [f"/v2/malformed/blobs/{config['digest']}"]
    assert pyunion("images", "-q", "--store", str(s)).stdout.strip() == ""
    for d in ("blobs/sha256", "layers", "tmp"):
        assert os.listdir(s / d) == [], d


def test_out_of_space(reg: Registry, images: Path, tmp_path: Path) -> None:
    small = tmp_path / "small"
    small.mkdir()
    sh("mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", small)
    try:
        err = fails("pull", NOTLS, "--store", str(small / "s"), f"{reg.host}/big:1")
        assert err.startswith("pyunion: out of space in the image store"), err
        assert os.listdir(small / "s/layers") == [] and os.listdir(small / "s/tmp") == []
    finally:
        sh("umount", small)


@pytest.fixture(scope="module")
def secure(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    with running(tmp_path_factory.mktemp("secure"), tls=True, htpasswd=True, redirect=True) as r:
        yield r


def test_tls_and_basic_auth(secure: Registry, images: Path, tmp_path: Path) -> None:
    assert secure.ca_dir is not None
    home = tmp_path / "home"
    (home / ".docker").mkdir(parents=True)
    env = {
        **os.environ,
        "HOME": str(home),
        "XDG_RUNTIME_DIR": str(tmp_path / "run"),
        "XDG_CONFIG_HOME": str(home / ".config"),
    }
    env.pop("REGISTRY_AUTH_FILE", None)
    (tmp_path / "run").mkdir(mode=0o700)
    certs = ["--cert-dir", str(secure.ca_dir)]
    ref = f"{secure.host}/sample:1"
    sh(
        "skopeo",
        "copy",
        "-q",
        "--dest-cert-dir",
        secure.ca_dir,
        "--dest-creds",
        f"{USER}:{PASSWORD}",
        f"oci:{images / 'sample/oci'}:latest",
        f"docker://{ref}",
    )
    s = ["--store", str(tmp_path / "s")]
    assert "TLS failure" in fails("pull", *s, ref, env=env)
    assert "unauthorized" in fails("pull", *s, *certs, ref, env=env)
    assert "unauthorized" in fails("pull", *s, *certs, "--creds", f"{USER}:wrong", ref, env=env)
    assert "unauthorized" in fails("login", *certs, "-u", USER, "-p", "wrong", secure.host, env=env)
    assert secure.redirect is not None
    seen = len(secure.redirect.requests)
    pyunion("pull", *s, *certs, "--creds", f"{USER}:{PASSWORD}", ref, env=env)
    # The blobs came from the storage the registry redirected to, without our credentials.
    fetched = [r for r in secure.redirect.requests[seen:] if r[0] == "GET"]
    assert len(fetched) == 4 and all(r[1].endswith("/data") and not r[2] for r in fetched)

    # login writes $XDG_RUNTIME_DIR/containers/auth.json, which skopeo reads too.
    pyunion(
        "login", *certs, "-u", USER, "--password-stdin", secure.host, env=env, input=PASSWORD + "\n"
    )
    authfile = tmp_path / "run/containers/auth.json"
    assert authfile.stat().st_mode & 0o777 == 0o600
    assert pyunion("login", "--get-login", secure.host, env=env).stdout.strip() == USER
    sh("skopeo", "inspect", "--cert-dir", secure.ca_dir, f"docker://{ref}", env=env)
    pyunion("pull", *s, "--tls-verify=false", ref, env=env)  # no CA, no check
    pyunion("push", *s, *certs, ref, f"{secure.host}/again:1", env=env)
    pyunion("logout", secure.host, env=env)
    assert "unauthorized" in fails("pull", *s, *certs, ref, env=env)
    assert "not logged in" in fails("logout", secure.host, env=env)

    # docker's ~/.docker/config.json is read too; skopeo login's file is pyunion's.
    import base64

    (home / ".docker/config.json").write_text(
        json.dumps(
            {
                "auths": {
                    f"https://{secure.host}": {
                        "auth": base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
                    }
                }
            }
        )
    )
    pyunion("pull", *s, *certs, ref, env=env)
    (home / ".docker/config.json").unlink()
    sh(
        "skopeo",
        "login",
        "--cert-dir",
        secure.ca_dir,
        "-u",
        USER,
        "-p",
        PASSWORD,
        secure.host,
        env=env,
    )
    pyunion("pull", *s, *certs, f"{secure.host}/again:1", env=env)
    pyunion("logout", "--all", env=env)
    assert json.loads(authfile.read_text())["auths"] == {}


@pytest.fixture(scope="module")
def tokreg(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    with running(tmp_path_factory.mktemp("tokreg"), token=True) as r:
        yield r


def test_bearer_token_auth(tokreg: Registry, images: Path, tmp_path: Path) -> None:
    assert tokreg.token is not None
    env = {**os.environ, "REGISTRY_AUTH_FILE": str(tmp_path / "auth.json")}
    creds = ["--creds", f"{USER}:{PASSWORD}"]
    ref = f"{tokreg.host}/tok/sample:1"
    sh(
        "skopeo",
        "copy",
        "-q",
        "--dest-tls-verify=false",
        "--dest-creds",
        f"{USER}:{PASSWORD}",
        f"oci:{images / 'sample/oci'}:latest",
        f"docker://{ref}",
    )
    s = ["--store", str(tmp_path / "s")]
    assert "unauthorized" in fails("pull", NOTLS, *s, ref, env=env)
    assert "unauthorized" in fails("pull", NOTLS, *s, "--creds", f"{USER}:nope", ref, env=env)
    tokreg.token.scopes.clear()
    pyunion("pull", NOTLS, *s, *creds, ref, env=env)
    assert tokreg.token.scopes == [["repository:tok/sample:pull"]]  # one token, reused
    # A push to another repository asks for a token that may also pull from the source
    # of the mount, and mounts instead of uploading.
    tokreg.token.scopes.clear()
    mark = tokreg.mark()
    pyunion("push", NOTLS, *s, *creds, ref, f"{tokreg.host}/tok/copy:1", env=env)
    assert ["repository:tok/copy:pull,push", "repository:tok/sample:pull"] in tokreg.token.scopes
    put, mounted, _ = _uploads(tokreg.requests(mark))
    assert put == [] and len(mounted) == 4
    pyunion("login", NOTLS, "-u", USER, "-p", PASSWORD, tokreg.host, env=env)
    pyunion("pull", NOTLS, *s, f"{tokreg.host}/tok/copy:1", env=env)


def test_cli_lists_registry_commands() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "unionfs", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    for cmd in ("pull", "push", "login", "logout"):
        assert cmd in out
