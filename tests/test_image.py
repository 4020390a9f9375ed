"""The image store without outside tools: import of layouts made here, whiteout
conversion, layer sharing, hostile archives, commit and export, the CLI."""

from __future__ import annotations

import contextlib
import gzip
import io
import json
import os
import stat
import subprocess
import tarfile
from pathlib import Path
from typing import Any

import pytest
import zstandard
from ocilayout import Layout, sha
from support import PYUNION, mounted, needs_fuse, pyunion

from unionfs.errors import UserError
from unionfs.image import (
    Changes,
    Store,
    commit,
    export_image,
    import_image,
    resolve_config,
    resolve_layers,
)
from unionfs.image.oci import find_images, open_source
from unionfs.image.store import remove_tree
from unionfs.image.unpack import Unpacker, unpack

ROOT = os.geteuid() == 0
needs_root = pytest.mark.skipif(not ROOT, reason="needs root (mknod 0/0, trusted xattrs, chown)")


# --- building layers and layouts by hand -------------------------------------------
def tar_bytes(entries: list[tuple[str, Any]]) -> bytes:
    """A tar from (name, spec) pairs: bytes = file, "dir", ("sym", target), ("lnk", target)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for name, spec in entries:
            ti = tarfile.TarInfo(name)
            ti.mtime = 1_600_000_000
            if spec == "dir":
                ti.type, ti.mode = tarfile.DIRTYPE, 0o755
                tf.addfile(ti)
            elif isinstance(spec, tuple) and spec[0] == "sym":
                ti.type, ti.linkname = tarfile.SYMTYPE, spec[1]
                tf.addfile(ti)
            elif isinstance(spec, tuple) and spec[0] == "lnk":
                ti.type, ti.linkname = tarfile.LNKTYPE, spec[1]
                tf.addfile(ti)
            elif isinstance(spec, tuple) and spec[0] == "file":
                data, mode, uid, xattrs = spec[1:]
                ti.size, ti.mode, ti.uid, ti.gid = len(data), mode, uid, uid
                ti.pax_headers = {f"SCHILY.xattr.{k}": v for k, v in xattrs.items()}
                tf.addfile(ti, io.BytesIO(data))
            else:
                ti.size, ti.mode = len(spec), 0o644
                tf.addfile(ti, io.BytesIO(spec))
    return buf.getvalue()


def compress(data: bytes, how: str) -> tuple[bytes, str]:
    if how == "gzip":
        return gzip.compress(data), "application/vnd.oci.image.layer.v1.tar+gzip"
    if how == "zstd":
        return zstandard.ZstdCompressor().compress(
            data
        ), "application/vnd.oci.image.layer.v1.tar+zstd"
    return data, "application/vnd.oci.image.layer.v1.tar"


def make_layout(
    path: Path,
    layers: list[bytes],
    how: str = "gzip",
    ref: str = "latest",
    config_extra: dict | None = None,
    bad_blob: bool = False,
) -> Path:
    """An OCI image layout of the given layer tars (bottom first)."""
    lay = Layout(path)
    descs = []
    for t in layers:
        blob, mt = compress(t, how)
        desc = lay.put(blob, mt)
        if bad_blob:
            (lay.blobs / desc["digest"][7:]).write_bytes(blob[:-1] + bytes([blob[-1] ^ 1]))
        descs.append(desc)
    config = {
        "architecture": "amd64",
        "os": "linux",
        "config": {"Env": ["PATH=/bin"], "Cmd": ["/bin/sh"], "WorkingDir": "/w"},
        "history": [{"created_by": f"step {i}"} for i in range(len(layers))],
    }
    config.update(config_extra or {})
    lay.tag(lay.image(descs, [sha(t) for t in layers], config), ref)
    return path


BASE = [
    ("bin", "dir"),
    ("bin/tool", ("file", b"#!tool\n", 0o4755, 0, {"user.note": "hi"})),
    ("etc", "dir"),
    ("etc/a", b"a\n"),
    ("etc/b", b"b\n"),
    ("etc/link", ("lnk", "etc/a")),
    ("etc/sym", ("sym", "../bin/tool")),
    ("opq", "dir"),
    ("opq/old", b"old\n"),
]
TOP = [
    ("etc", "dir"),
    ("etc/.wh.b", b""),
    ("opq", "dir"),
    ("opq/.wh..wh..opq", b""),
    ("opq/new", b"new\n"),
    ("etc/.wh.sym", b""),
    ("etc/sym", b"now a file\n"),
]


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store(str(tmp_path / "store"))


def store_state(store: Store) -> tuple[list[str], list[str], list[str]]:
    """(layers, blobs, tmp leftovers): what a failed import must not change."""
    root = Path(store.root)
    return (
        sorted(os.listdir(root / "layers")),
        sorted(os.listdir(root / "blobs" / "sha256")),
        sorted(os.listdir(root / "tmp")),
    )


# --- import ----------------------------------------------------------------------
@pytest.mark.parametrize("how", ["none", "gzip", "zstd"])
def test_import_layout_and_whiteout_format(tmp_path: Path, store: Store, how: str) -> None:
    lay = make_layout(tmp_path / "lay", [tar_bytes(BASE), tar_bytes(TOP)], how)
    [(_digest, tags)] = import_image(str(lay), store)
    assert tags == ["lay:latest"]
    top, base = resolve_layers("lay", store.root)
    assert (Path(base) / "etc/a").read_bytes() == b"a\n"
    st = os.stat(Path(base) / "bin/tool")
    assert stat.S_IMODE(st.st_mode) == 0o4755 and st.st_mtime == 1_600_000_000
    assert os.getxattr(Path(base) / "bin/tool", "user.note") == b"hi"
    assert os.stat(Path(base) / "etc/link").st_ino == os.stat(Path(base) / "etc/a").st_ino
    assert os.readlink(Path(base) / "etc/sym") == "../bin/tool"
    # .wh.sym next to the layer's own sym: the file stays, no marker is needed.
    assert (Path(top) / "etc/sym").read_bytes() == b"now a file\n"
    info = store.layer_info(sha(tar_bytes(TOP)))
    if ROOT:
        assert info["whiteouts"] == "kernel"
        st = os.lstat(Path(top) / "etc/b")
        assert stat.S_ISCHR(st.st_mode) and st.st_rdev == 0
        assert os.getxattr(Path(top) / "opq", "trusted.overlay.opaque") == b"y"
        assert not (Path(top) / "opq/.wh..wh..opq").exists()
    else:
        assert info["whiteouts"] == "oci"
        assert (Path(top) / "etc/.wh.b").is_file()
        assert (Path(top) / "opq/.wh..wh..opq").is_file()
    cfg = resolve_config("lay:latest", store.root)
    assert cfg["config"]["Cmd"] == ["/bin/sh"] and cfg["rootfs"]["diff_ids"][0] == sha(
        tar_bytes(BASE)
    )


def test_layers_shared_and_not_unpacked_again(tmp_path: Path, store: Store) -> None:
    base = tar_bytes(BASE)
    import_image(str(make_layout(tmp_path / "one", [base])), store)
    ino = os.stat(Path(resolve_layers("one", store.root)[0]) / "etc/a").st_ino
    # The same layer again, compressed differently, under another image.
    import_image(str(make_layout(tmp_path / "two", [base, tar_bytes(TOP)], "zstd")), store)
    layers = resolve_layers("two", store.root)
    assert layers[1] == resolve_layers("one", store.root)[0]
    assert os.stat(Path(layers[1]) / "etc/a").st_ino == ino
    assert len(os.listdir(Path(store.root) / "layers")) == 2
    # rmi removes only what no other image uses.
    untagged, deleted = store.remove("two")
    assert untagged == ["two:latest"] and sha(tar_bytes(TOP)) in deleted
    assert sha(base) not in deleted and Path(layers[1]).is_dir()
    store.remove("one")
    assert store_state(store) == ([], [], [])


def test_import_tar_of_layout_and_platform_index(tmp_path: Path, store: Store) -> None:
    lay = make_layout(tmp_path / "lay", [tar_bytes(BASE)])
    # Wrap the manifest in a multi-platform index with a decoy for another platform.
    idx = json.loads((lay / "index.json").read_text())
    man = idx["manifests"][0]
    sub = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [
            dict(
                man, platform={"os": "linux", "architecture": "s390x"}, digest="sha256:" + "0" * 64
            ),
            dict(man, platform={"os": "linux", "architecture": "amd64"}),
            dict(man, platform={"os": "linux", "architecture": "arm64"}),
        ],
    }
    sb = json.dumps(sub).encode()
    (lay / "blobs/sha256" / sha(sb)[7:]).write_bytes(sb)
    idx["manifests"] = [
        {
            "mediaType": "application/vnd.oci.image.index.v1+json",
            "digest": sha(sb),
            "size": len(sb),
            "annotations": {"org.opencontainers.image.ref.name": "multi"},
        }
    ]
    (lay / "index.json").write_text(json.dumps(idx))
    tarball = tmp_path / "lay.tar"
    with tarfile.open(tarball, "w") as tf:
        tf.add(lay, arcname=".")
    [(digest, tags)] = import_image(
        str(tarball), store, platform={"os": "linux", "architecture": "arm64"}
    )
    assert tags == ["lay:multi"] and digest == man["digest"]
    with pytest.raises(UserError, match="no image for platform linux/mips"):
        import_image(str(tarball), store, platform={"os": "linux", "architecture": "mips"})


def test_old_docker_archive_with_symlinked_layer(tmp_path: Path, store: Store) -> None:
    layer = tar_bytes(BASE)
    config = {
        "architecture": "amd64",
        "os": "linux",
        "config": {"Cmd": ["sh"]},
        "rootfs": {"type": "layers", "diff_ids": [sha(layer)]},
    }
    cb = json.dumps(config).encode()
    arch = tmp_path / "saved.tar"
    with tarfile.open(arch, "w") as tf:
        for name, data in (
            (f"{sha(layer)[7:]}.tar", layer),
            (f"{sha(cb)[7:]}.json", cb),
            (
                "manifest.json",
                json.dumps(
                    [
                        {
                            "Config": f"{sha(cb)[7:]}.json",
                            "RepoTags": ["foo/bar:1.0"],
                            "Layers": ["abc/layer.tar"],
                        }
                    ]
                ).encode(),
            ),
        ):
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))
        ti = tarfile.TarInfo("abc/layer.tar")
        ti.type, ti.linkname = tarfile.SYMTYPE, f"../{sha(layer)[7:]}.tar"
        tf.addfile(ti)
    [(_, tags)] = import_image(str(arch), store)
    assert tags == ["foo/bar:1.0"]
    img = store.lookup("foo/bar:1.0")
    assert img.id == sha(cb) and img.manifest["layers"][0]["digest"] == sha(layer)
    assert store.lookup("bar:1.0") is not None  # short names match the last component


def test_digest_mismatch_refused(tmp_path: Path, store: Store) -> None:
    lay = make_layout(tmp_path / "lay", [tar_bytes(BASE)], bad_blob=True)
    with pytest.raises(UserError, match=r"corrupt|does not match"):
        import_image(str(lay), store)
    assert store_state(store) == ([], [], [])
    assert store.images() == []


# --- hostile archives ---------------------------------------------------------------
HOSTILE = {
    "dotdot": ([("../escaped", b"x")], "'..'"),
    "dotdot-inner": ([("a", "dir"), ("a/../../escaped", b"x")], "'..'"),
    "absolute": ([("/tmp/escaped", b"x")], "absolute path"),
    "symlink-parent": ([("d", ("sym", "/tmp")), ("d/escaped", b"x")], "symlink"),
    "symlink-parent-rel": ([("d", ("sym", "..")), ("d/escaped", b"x")], "symlink"),
    "hardlink-out": ([("pw", ("lnk", "../../../../etc/passwd"))], "'..'"),
    "hardlink-abs": ([("pw", ("lnk", "/etc/passwd"))], "absolute path"),
    "hardlink-via-symlink": ([("d", ("sym", "/etc")), ("pw", ("lnk", "d/passwd"))], "symlink"),
    "hardlink-missing": ([("pw", ("lnk", "nothere"))], "not in the layer"),
    "whiteout-dotdot": ([(".wh...", b"")], "names no entry"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_layers_refused(tmp_path: Path, store: Store, case: str) -> None:
    entries, msg = HOSTILE[case]
    lay = make_layout(tmp_path / "lay", [tar_bytes(BASE), tar_bytes(entries)])
    with pytest.raises(UserError, match=msg) as ei:
        import_image(str(lay), store)
    assert "\n" not in str(ei.value)
    assert store_state(store) == ([], [], [])
    assert store.images() == []
    assert not (tmp_path / "escaped").exists() and not Path("/tmp/escaped").exists()
    # The same through the CLI: one line, non-zero exit, no traceback.
    r = pyunion("image", "import", str(lay), "--store", store.root, check=False)
    assert r.returncode != 0 and r.stderr.count("\n") == 1 and r.stderr.startswith("pyunion: ")


@pytest.mark.parametrize("how", ["gzip", "zstd", "none"])
def test_truncated_layer_refused(tmp_path: Path, store: Store, how: str) -> None:
    big = tar_bytes([("f", os.urandom(200_000))])
    lay = make_layout(tmp_path / "lay", [big], how)
    blob = next(p for p in (lay / "blobs/sha256").iterdir() if p.stat().st_size > 1000)
    blob.write_bytes(blob.read_bytes()[: blob.stat().st_size // 2])
    r = pyunion("image", "import", str(lay), "--store", store.root, check=False)
    assert r.returncode != 0 and r.stderr.count("\n") == 1, r.stderr
    assert (
        "truncated" in r.stderr or "does not match" in r.stderr or "descriptor declares" in r.stderr
    )
    assert store_state(store) == ([], [], [])


def test_archive_paths_cannot_escape(tmp_path: Path, store: Store) -> None:
    arch = tmp_path / "evil.tar"
    with tarfile.open(arch, "w") as tf:
        data = json.dumps([{"Config": "../../etc/passwd", "Layers": []}]).encode()
        ti = tarfile.TarInfo("manifest.json")
        ti.size = len(data)
        tf.addfile(ti, io.BytesIO(data))
    with pytest.raises(UserError, match=r"'\.\.'"):
        find_images(open_source(str(arch)))


# --- commit and export ------------------------------------------------------------------
@needs_root
def test_commit_converts_overlay_formats(tmp_path: Path, store: Store) -> None:
    import_image(str(make_layout(tmp_path / "lay", [tar_bytes(BASE)])), store)
    up = tmp_path / "upper"
    (up / "etc").mkdir(parents=True)
    os.mknod(up / "etc/b", stat.S_IFCHR, os.makedev(0, 0))  # deleted
    (up / "opq").mkdir()
    os.setxattr(up / "opq", "trusted.overlay.opaque", b"y")  # replaced directory
    (up / "opq/z").write_bytes(b"z")
    (up / "opq/a").write_bytes(b"a")
    os.setxattr(up / "opq/a", "trusted.overlay.origin", b"junk")  # internal: dropped
    os.setxattr(up / "opq/a", "user.keep", b"\xff\x00bin")
    (up / "h1").write_bytes(b"h")
    os.link(up / "h1", up / "h2")
    os.mkfifo(up / "fifo")
    digest, _ = commit(
        store,
        str(up),
        "lay",
        "new:1",
        Changes(message="made by test"),
        compression="zstd",
        timestamp=1_700_000_000,
    )
    img = store.lookup("new:1")
    assert img.digest == digest and len(img.diff_ids) == 2
    assert img.config["history"][-1]["created_by"] == "made by test"
    blob = store.read_blob(img.manifest["layers"][-1]["digest"])
    raw = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(blob)).read()
    with tarfile.open(fileobj=io.BytesIO(raw)) as tf:
        members = tf.getmembers()
    names = [m.name for m in members]
    assert names == [
        "etc",
        "etc/.wh.b",
        "fifo",
        "h1",
        "h2",
        "opq",
        "opq/.wh..wh..opq",
        "opq/a",
        "opq/z",
    ]
    by = {m.name: m for m in members}
    assert by["h2"].islnk() and by["h2"].linkname == "h1"
    assert by["fifo"].isfifo()
    assert all(m.mtime <= 1_700_000_000 for m in members)
    assert by["opq/a"].pax_headers["SCHILY.xattr.user.keep"] == "\udcff\x00bin"
    assert not any("overlay" in k for k in by["opq/a"].pax_headers)
    # Reproducible: the same upper and timestamp give the same layer.
    _d2, _ = commit(
        store,
        str(up),
        "lay",
        "new:2",
        Changes(message="made by test"),
        compression="zstd",
        timestamp=1_700_000_000,
    )
    assert store.lookup("new:2").diff_ids == img.diff_ids
    # Stored unpacked in kernel format, like an imported layer.
    top = Path(resolve_layers("new:1", store.root)[0])
    assert stat.S_ISCHR(os.lstat(top / "etc/b").st_mode)
    assert os.getxattr(top / "opq", "trusted.overlay.opaque") == b"y"
    assert "trusted.overlay.origin" not in os.listxattr(top / "opq/a")


def test_commit_refuses_redirects(tmp_path: Path, store: Store) -> None:
    if not ROOT:
        pytest.skip("needs root (trusted xattrs)")
    import_image(str(make_layout(tmp_path / "lay", [tar_bytes(BASE)])), store)
    up = tmp_path / "upper"
    (up / "moved").mkdir(parents=True)
    os.setxattr(up / "moved", "trusted.overlay.redirect", b"/etc")
    with pytest.raises(UserError, match="redirect"):
        commit(store, str(up), "lay")


def test_export_roundtrip(tmp_path: Path, store: Store) -> None:
    import_image(
        str(make_layout(tmp_path / "lay", [tar_bytes(BASE), tar_bytes(TOP)], "zstd")),
        store,
        tag="x/y:2",
    )
    img = store.lookup("x/y:2")
    export_image(store, "x/y:2", str(tmp_path / "out"), "oci")
    export_image(store, "x/y:2", str(tmp_path / "out.tar"), "oci")
    export_image(store, "x/y:2", str(tmp_path / "docker.tar"), "docker")
    with pytest.raises(UserError, match="already exists"):
        export_image(store, "x/y:2", str(tmp_path / "out"), "oci")
    other = Store(str(tmp_path / "other"))
    for src in ("out", "out.tar", "docker.tar"):
        [(d, tags)] = import_image(str(tmp_path / src), other)
        assert tags == ["x/y:2"]
        assert other.lookup(d).diff_ids == img.diff_ids
        if src != "docker.tar":
            assert d == img.digest  # the OCI export kept the digests
    # The docker archive's layers are plain tars that hash to their DiffIDs.
    with tarfile.open(tmp_path / "docker.tar") as tf:
        man = json.load(tf.extractfile("manifest.json"))  # type: ignore[arg-type]
        for path, diff in zip(man[0]["Layers"], img.diff_ids, strict=True):
            assert sha(tf.extractfile(path).read()) == diff  # type: ignore[union-attr]


def test_export_labels_with_the_name_asked_for(tmp_path: Path, store: Store) -> None:
    """An image with several names is exported under the one asked for, spelled short.

    `export b` of an image also named a:latest wrote RepoTags ["a:latest"]: the short
    name was looked for among the full tags, so `podman load` named it a."""
    lay = make_layout(tmp_path / "lay", [tar_bytes(BASE)])
    import_image(str(lay), store, tag="a")
    import_image(str(lay), store, tag="b")
    assert store.lookup("a").tags == ["a:latest", "b:latest"]
    export_image(store, "b", str(tmp_path / "docker.tar"), "docker")
    export_image(store, "localhost/b", str(tmp_path / "oci.tar"), "oci")
    with tarfile.open(tmp_path / "docker.tar") as tf:
        man = json.load(tf.extractfile("manifest.json"))  # type: ignore[arg-type]
        assert man[0]["RepoTags"] == ["b:latest"]
    with tarfile.open(tmp_path / "oci.tar") as tf:
        index = json.load(tf.extractfile("index.json"))  # type: ignore[arg-type]
        assert index["manifests"][0]["annotations"]["io.containerd.image.name"] == "b:latest"


# --- the CLI ------------------------------------------------------------------------
def test_cli(tmp_path: Path) -> None:
    st = str(tmp_path / "store")
    lay = make_layout(tmp_path / "lay", [tar_bytes(BASE), tar_bytes(TOP)])
    r = pyunion("image", "import", str(lay), "--tag", "demo", "--store", st)
    assert "demo:latest" in r.stdout
    env = dict(os.environ, PYUNION_STORE=st)
    out = pyunion("images", env=env).stdout.splitlines()
    assert out[0].split() == ["REPOSITORY", "TAG", "IMAGE", "ID", "CREATED", "SIZE"]
    assert out[1].split()[:2] == ["demo", "latest"]
    hist = pyunion("history", "demo", env=env).stdout.splitlines()
    assert "step 1" in hist[1] and "step 0" in hist[2]
    data = json.loads(pyunion("inspect", "demo", env=env).stdout)[0]
    assert data["Config"]["WorkingDir"] == "/w" and len(data["Layers"]) == 2
    pyunion("tag", "demo", "again:5", env=env)
    assert pyunion("rmi", "demo", env=env).stdout.strip() == "Untagged: demo:latest"
    r = pyunion("rmi", "again:5", env=env)
    assert "Untagged: again:5" in r.stdout and r.stdout.count("Deleted:") == 6
    r = pyunion("inspect", "nothere", env=env, check=False)
    assert r.returncode == 1 and r.stderr.startswith("pyunion: no image 'nothere'")
    r = pyunion("mount", "nothere", str(tmp_path / "mnt"), env=env, check=False)
    assert r.returncode != 0 and "nothere" in r.stderr and r.stderr.count("\n") == 1


def test_oci_format_when_asked_and_devices_only_as_root(tmp_path: Path) -> None:
    """Without root the markers stay OCI files and device nodes are skipped."""
    buf = io.BytesIO(tar_bytes(TOP))
    dest = tmp_path / "d"
    dest.mkdir()
    with tarfile.open(fileobj=buf) as tf:
        assert unpack(tf, str(dest), kernel_format=False) == "oci"
    assert (dest / "etc/.wh.b").is_file() and (dest / "opq/.wh..wh..opq").is_file()
    assert not (dest / "etc/.wh.sym").exists()  # its own etc/sym already hides the lower one
    dev = io.BytesIO()
    with tarfile.open(fileobj=dev, mode="w") as tf:
        ti = tarfile.TarInfo("null")
        ti.type, ti.devmajor, ti.devminor = tarfile.CHRTYPE, 1, 3
        tf.addfile(ti)
    dev.seek(0)
    d2 = tmp_path / "d2"
    d2.mkdir()
    fd = os.open(d2, os.O_RDONLY | os.O_DIRECTORY)
    u = Unpacker(fd, kernel_format=False)
    u.as_root = False
    with tarfile.open(fileobj=dev) as tf:
        u.extract(tf)
    u.close()
    os.close(fd)
    assert os.listdir(d2) == []


def test_interrupted_import_debris_is_ignored_and_cleaned(tmp_path: Path, store: Store) -> None:
    top = tar_bytes(TOP)
    (Path(store.root) / "tmp" / "dead-import").mkdir()
    ((Path(store.root) / "tmp" / "dead-import") / "half").write_bytes(b"x")
    half = Path(store.layer_dir(sha(top)))
    (half / "diff").mkdir(parents=True)  # a layer dir without layer.json: not trusted
    import_image(str(make_layout(tmp_path / "lay", [tar_bytes(BASE), top])), store)
    assert store.has_layer(sha(top)) and (half / "diff/opq/new").exists()
    assert os.listdir(Path(store.root) / "tmp") == []


def test_rmi_by_short_name_untags_only_that_name(tmp_path: Path, store: Store) -> None:
    import_image(str(make_layout(tmp_path / "lay", [tar_bytes(BASE)])), store, tag="reg/app:1")
    img = store.lookup("app:1")
    store.add_image(img.digest, len(store.read_blob(img.digest)), "other:2")
    assert store.remove("app:1") == (["reg/app:1"], [])
    assert store.lookup("other:2").digest == img.digest


@pytest.mark.timeout(120)
def test_an_rmi_waiting_for_a_commit_does_not_collect_the_new_image(
    tmp_path: Path, store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`commit` (and `pull`) published the new layer and blobs under the store's shared
    lock, then let it go and only then named the image in the index: an `rmi` of anything
    that was waiting for the lock ran its collection in between, found the new layer
    unnamed and deleted it (the commit then failed, or named an image whose layer was
    gone). `rmi other` is started here right at that point, as a separate command, and
    given 2 s: it must wait for the image to be named, then leave it whole."""
    import_image(str(make_layout(tmp_path / "lay", [tar_bytes(BASE)])), store, tag="base")
    img = store.lookup("base")
    store.add_image(img.digest, len(store.read_blob(img.digest)), "other")
    up = tmp_path / "upper"
    up.mkdir()
    (up / "new-file").write_bytes(b"new\n")
    real_add = Store.add_image
    rmi: list[subprocess.Popen[str]] = []

    def add_image_after_an_rmi(self: Store, *args: Any, **kw: Any) -> None:
        p = subprocess.Popen(
            [*PYUNION, "rmi", "other", "--store", store.root],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        rmi.append(p)
        with contextlib.suppress(subprocess.TimeoutExpired):
            p.wait(timeout=2)
        real_add(self, *args, **kw)

    monkeypatch.setattr(Store, "add_image", add_image_after_an_rmi)
    try:
        digest, _ = commit(store, str(up), "base", "new", compression="none")
    finally:
        for p in rmi:
            out, err = p.communicate(timeout=60)
    assert p.returncode == 0 and "Untagged: other:latest" in out, err
    monkeypatch.undo()
    new = store.lookup("new")
    assert new.digest == digest
    for diff_id in new.diff_ids:
        assert store.has_layer(diff_id), f"rmi collected {diff_id} of the new image"
    for d in [new.config_digest] + [d["digest"] for d in new.manifest["layers"]]:
        assert store.has_blob(d), f"rmi collected the blob {d}"
    lowers = resolve_layers("new", store.root)
    assert (Path(lowers[0]) / "new-file").read_bytes() == b"new\n"


@needs_fuse
@pytest.mark.timeout(120)
def test_rmi_keeps_the_layers_a_mount_is_using(tmp_path: Path, store: Store) -> None:
    """`rmi` of the image a container runs deleted its layers under it: the container's
    /bin emptied mid-run ("sh: ls: not found"); podman refuses to remove an image in use.
    A mount now holds each lower layer (a shared flock on its directory) and the store's
    collection keeps a layer it cannot lock, with a warning; the next rmi after the
    unmount removes it."""
    import_image(str(make_layout(tmp_path / "lay", [tar_bytes(BASE)])), store, tag="base")
    import_image(str(make_layout(tmp_path / "lay2", [tar_bytes(TOP)])), store, tag="other")
    lowers = [Path(p) for p in resolve_layers("base", store.root)]
    with mounted(lowers, tmp_path / "mnt") as mnt:
        r = pyunion("rmi", "base", "--store", store.root)
        assert "in use by a mount" in r.stderr, r
        assert (mnt / "etc" / "a").read_bytes() == b"a\n"
        assert all(p.is_dir() for p in lowers)
        with pytest.raises(UserError):
            store.lookup("base")
    r = pyunion("rmi", "other", "--store", store.root)
    assert "in use" not in r.stderr and not any(p.exists() for p in lowers), r
    assert os.listdir(Path(store.root) / "layers") == []


def test_a_layer_whose_tree_was_deleted_is_unpacked_again(tmp_path: Path, store: Store) -> None:
    """A layer's `diff/` removed by hand (its layer.json left): the image failed to run,
    and importing it again said "Loaded" but skipped the layer, whose layer.json said it
    was there, so nothing but rmi could repair it. It now counts as missing: the next
    import unpacks it again in place of the remains."""
    lay = make_layout(tmp_path / "lay", [tar_bytes(BASE)])
    import_image(str(lay), store, tag="base")
    (diff,) = resolve_layers("base", store.root)
    remove_tree(diff)
    with pytest.raises(UserError, match="missing"):
        resolve_layers("base", store.root)
    import_image(str(lay), store, tag="base")
    assert resolve_layers("base", store.root) == [diff]
    assert (Path(diff) / "etc" / "a").read_bytes() == b"a\n"
    assert os.listdir(Path(store.root) / "tmp") == []
