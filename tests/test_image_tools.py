"""Images made by real tools: buildah builds, skopeo converts, umoci unpacks.

One image in three layers is built offline (buildah from scratch, a static
busybox copied in, then two `buildah run --isolation chroot` stages that add,
change, re-own and delete files), exported by skopeo as an OCI layout and as a
docker archive. The oracle for "what the image contains" is `umoci unpack`'s
rootfs; pyunion's store is checked by merging its layer directories with the
kernel's overlayfs (they are in the kernel's whiteout format when unpacked as
root) and with `pyunion mount IMAGE`. A commit made on the kernel overlayfs'
upper must round-trip through skopeo and umoci with the same files, owners,
modes and deletions.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from support import (
    BUSYBOX,
    buildah_busybox,
    buildah_image,
    force_unmount,
    fuse_skip_reason,
    kernel_overlay,
    pyunion,
    sh,
    tree_view,
)

from unionfs.image import Store, resolve_config, resolve_layers

TOOLS = ("buildah", "skopeo", "umoci")


def _skip_reason() -> str | None:
    if os.geteuid() != 0:
        return "needs root (buildah/umoci without user namespaces, kernel overlayfs, mknod)"
    missing = [t for t in TOOLS if shutil.which(t) is None]
    if missing:
        return f"needs {', '.join(missing)} (scripts/setup.sh installs them)"
    if (
        BUSYBOX is None
        or "statically linked"
        not in subprocess.run(["file", "-L", BUSYBOX], capture_output=True, text=True).stdout
    ):
        return "needs a static busybox (busybox-static)"
    return None


pytestmark = pytest.mark.skipif(_skip_reason() is not None, reason=_skip_reason() or "")


STAGE2 = """B=/bin/busybox
$B mkdir -p /etc /data/sub /gone/deep /work /usr/bin
echo hi > /etc/hello; $B ln /etc/hello /etc/hello-link; $B ln -s /etc/hello /etc/hello-sym
echo x > /data/sub/f; $B chown 1000:1000 /data/sub/f; $B chmod 4755 /data/sub/f
echo g > /gone/deep/file; $B ln -s /bin/busybox /usr/bin/env; $B mkfifo /data/fifo
$B chmod 700 /data/sub; echo keep > /usr/keep"""
STAGE3 = """B=/bin/busybox
$B rm /etc/hello-sym; $B rm -rf /gone; $B rm -rf /data; $B mkdir -p /data
echo new > /data/new; echo changed > /etc/hello; $B chown 123:456 /etc/hello"""


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """T/oci (refs v2, v3: the 2- and 3-layer images), T/img3.tar (docker archive), T/bundle3."""
    t = tmp_path_factory.mktemp("built")
    with buildah_busybox(t) as (bah, c):
        sh(
            *bah,
            "config",
            "--env",
            "FOO=bar",
            "--workingdir",
            "/work",
            "--user",
            "1000",
            "--cmd",
            '["/bin/busybox", "sh"]',
            c,
        )
        sh(*bah, "commit", "-q", c, "img1")
        for n, script in ((2, STAGE2), (3, STAGE3)):
            c = sh(*bah, "from", f"img{n - 1}")
            sh(
                *bah,
                "run",
                "--user",
                "0:0",
                "--isolation",
                "chroot",
                c,
                "--",
                "/bin/busybox",
                "sh",
                "-c",
                script,
            )
            sh(*bah, "commit", "-q", c, f"img{n}")
        src = buildah_image(t, "img")
        sh("skopeo", "copy", "-q", src + "2", f"oci:{t / 'oci'}:v2")
        sh("skopeo", "copy", "-q", src + "3", f"oci:{t / 'oci'}:v3")
        sh("skopeo", "copy", "-q", src + "3", f"docker-archive:{t / 'img3.tar'}:test/img3:latest")
        sh("umoci", "unpack", "--image", f"{t / 'oci'}:v3", t / "bundle3")
        yield t


def overlay(
    lowers: list[str], mnt: Path, upper: Path | None = None
) -> contextlib.AbstractContextManager[Path]:
    """Kernel overlayfs over store layers: the oracle that they are in its format."""
    work = None
    if upper is not None:
        upper.mkdir(parents=True, exist_ok=True)
        work = upper.parent / (upper.name + ".work")
    return kernel_overlay([Path(p) for p in lowers], mnt, upper, work)


@pytest.fixture(scope="module")
def store(built: Path, tmp_path_factory: pytest.TempPathFactory) -> Store:
    """A store with the OCI layout's two images and the docker archive imported."""
    s = tmp_path_factory.mktemp("store")
    out = pyunion("image", "import", str(built / "oci"), "--store", str(s)).stdout
    assert "oci:v2" in out and "oci:v3" in out
    pyunion("image", "import", str(built / "img3.tar"), "--store", str(s))
    return Store(str(s))


def test_import_shares_layers_and_matches_umoci(built: Path, store: Store, tmp_path: Path) -> None:
    assert len(os.listdir(Path(store.root) / "layers")) == 3  # v2's two are v3's lower two
    v3 = resolve_layers("oci:v3", store.root)
    assert resolve_layers("oci:v2", store.root) == v3[1:]
    assert resolve_layers("test/img3", store.root) == v3  # the docker archive: same layers
    expected = tree_view(built / "bundle3/rootfs")
    assert b"gone" not in expected and b"etc/hello-sym" not in expected
    with overlay(v3, tmp_path / "mnt") as mnt:
        assert tree_view(mnt) == expected
    cfg = resolve_config("test/img3", store.root)["config"]
    assert "FOO=bar" in cfg["Env"] and cfg["WorkingDir"] == "/work" and cfg["User"] == "1000"
    assert cfg["Cmd"] == ["/bin/busybox", "sh"]
    hist = pyunion("history", "oci:v3", "--store", store.root).stdout.splitlines()
    assert len(hist) == 4 and hist[0].split()[:2] == ["IMAGE", "CREATED"]


def test_import_skopeo_dir_layouts(built: Path, store: Store, tmp_path: Path) -> None:
    """skopeo's `dir:` (also `podman save --format docker-dir`), docker and OCI manifests,
    compressed or not: the same layers as the OCI layout's (before: "manifest.json:
    Expected `array`, got `object`", read as a docker archive)."""
    v3 = resolve_layers("oci:v3", store.root)
    s = str(tmp_path / "store")
    for name, flags in (("docker", ["--format", "v2s2"]), ("oci", ["--format", "oci"])):
        d = tmp_path / name
        sh("skopeo", "copy", "-q", *flags, f"oci:{built / 'oci'}:v3", f"dir:{d}")
        out = pyunion("image", "import", str(d), "--tag", f"dir/{name}", "--store", s).stdout
        assert f"dir/{name}:latest" in out
        # The same DiffIDs, top first: the layers' directory names in the store.
        assert [Path(p).parent.name for p in resolve_layers(f"dir/{name}", s)] == [
            Path(p).parent.name for p in v3
        ]
    # An index (skopeo copy --all): its images' manifests are HEX.manifest.json.
    d = tmp_path / "oci"
    man = (d / "manifest.json").read_bytes()
    digest = hashlib.sha256(man).hexdigest()
    (d / f"{digest}.manifest.json").write_bytes(man)
    entry = {"mediaType": "application/vnd.oci.image.manifest.v1+json", "size": len(man)}
    entry |= {"digest": f"sha256:{digest}", "platform": {"os": "linux", "architecture": "s390x"}}
    index = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json"}
    (d / "manifest.json").write_text(json.dumps(index | {"manifests": [entry]}))
    args = ("image", "import", str(d), "--tag", "dir/index", "--store", s)
    pyunion(*args, "--platform", "linux/s390x")
    assert [Path(p).parent.name for p in resolve_layers("dir/index", s)] == [
        Path(p).parent.name for p in v3
    ]
    r = pyunion(*args, "--platform", "linux/riscv64", check=False)
    assert r.returncode != 0 and "riscv64" in r.stderr
    # A blob that is not what its digest says is refused.
    d = tmp_path / "docker"
    man = json.loads((d / "manifest.json").read_text())
    blob = d / man["config"]["digest"].split(":")[1]
    blob.write_bytes(blob.read_bytes().replace(b"FOO=bar", b"FOO=baz"))
    r = pyunion("image", "import", str(d), "--store", str(tmp_path / "s2"), check=False)
    assert r.returncode != 0 and "does not match its digest" in r.stderr


@pytest.mark.skipif(fuse_skip_reason() is not None, reason=fuse_skip_reason() or "")
def test_pyunion_mounts_an_image_by_name(built: Path, store: Store, tmp_path: Path) -> None:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    pyunion("mount", "--store", store.root, "oci:v3", str(mnt))
    try:
        assert tree_view(mnt) == tree_view(built / "bundle3/rootfs")
    finally:
        if pyunion("umount", str(mnt), check=False).returncode != 0:
            force_unmount(mnt)


def test_commit_roundtrips_through_skopeo_and_umoci(
    built: Path, store: Store, tmp_path: Path
) -> None:
    upper = tmp_path / "upper"
    with overlay(resolve_layers("test/img3", store.root), tmp_path / "mnt", upper) as mnt:
        os.unlink(mnt / "etc/hostname")  # whiteout
        shutil.rmtree(mnt / "usr")  # a lower directory replaced:
        (mnt / "usr").mkdir()  # opaque in the upper
        (mnt / "usr/fresh").write_text("fresh\n")
        os.rmdir(mnt / "work")
        os.chown(mnt / "etc/hello", 7, 8)  # copy-up keeps the data
        os.chmod(mnt / "data/new", 0o640)
        (mnt / "data/made").write_text("made\n")
        os.link(mnt / "data/made", mnt / "data/made-link")
        os.symlink("../etc/hello", mnt / "data/sym")
        os.mkfifo(mnt / "data/pipe")
        os.setxattr(mnt / "data/made", "user.note", b"kept")
        expected = tree_view(mnt)
    assert os.getxattr(upper / "usr", "trusted.overlay.opaque") == b"y"
    s = ["--store", store.root]
    new_id = pyunion(
        "commit",
        str(upper),
        "--image",
        "test/img3",
        "--tag",
        "test/commit:1",
        "-m",
        "pyunion test",
        *s,
    ).stdout.strip()
    assert new_id.startswith("sha256:")
    hist = pyunion("history", "test/commit:1", *s).stdout.splitlines()
    assert "pyunion test" in hist[1] and len(hist) == 5

    # OCI layout -> umoci; docker archive -> skopeo -> OCI layout -> umoci.
    pyunion("image", "export", "test/commit:1", str(tmp_path / "out"), *s)
    pyunion("image", "export", "test/commit:1", str(tmp_path / "out.tar"), "--format", "docker", *s)
    info = json.loads(sh("skopeo", "inspect", f"oci:{tmp_path / 'out'}:1"))
    assert len(info["Layers"]) == 4
    sh(
        "skopeo",
        "copy",
        "-q",
        f"docker-archive:{tmp_path / 'out.tar'}",
        f"oci:{tmp_path / 'out2'}:x",
    )
    for layout, ref in ((tmp_path / "out", "1"), (tmp_path / "out2", "x")):
        bundle = tmp_path / f"bundle-{ref}"
        sh("umoci", "unpack", "--image", f"{layout}:{ref}", bundle)
        rootfs = bundle / "rootfs"
        assert tree_view(rootfs) == expected, ref
        assert os.stat(rootfs / "data/made").st_ino == os.stat(rootfs / "data/made-link").st_ino
        assert os.getxattr(rootfs / "data/made", "user.note") == b"kept"
        assert not (rootfs / "usr/keep").exists() and not (rootfs / "etc/hostname").exists()
    # The committed image also merges correctly from the store itself.
    with overlay(resolve_layers("test/commit:1", store.root), tmp_path / "mnt2") as mnt:
        assert tree_view(mnt) == expected


@pytest.mark.skipif(fuse_skip_reason() is not None, reason=fuse_skip_reason() or "")
def test_run_image_defaults_then_commit_kept_upper(store: Store, tmp_path: Path) -> None:
    s = ["--store", store.root]
    r = pyunion(
        "run",
        *s,
        "test/img3",
        "--",
        "/bin/busybox",
        "sh",
        "-c",
        'echo "$FOO"; pwd; /bin/busybox id -u',
        timeout=120,
    )
    assert r.stdout.split() == ["bar", "/work", "1000"]
    upper = tmp_path / "kept"
    r = pyunion(
        "run",
        *s,
        "--upper",
        str(upper),
        "-u",
        "0",
        "test/img3",
        "--",
        "/bin/busybox",
        "sh",
        "-c",
        "/bin/busybox rm /etc/hello-link; echo ran > /data/ran",
        timeout=120,
    )
    pyunion("commit", str(upper), "--image", "test/img3", "--tag", "test/ran", *s)
    r = pyunion(
        "run",
        *s,
        "test/ran",
        "--",
        "/bin/busybox",
        "sh",
        "-c",
        "/bin/busybox cat /data/ran; /bin/busybox ls /etc",
        timeout=120,
    )
    assert r.stdout.splitlines()[0] == "ran" and "hello-link" not in r.stdout
