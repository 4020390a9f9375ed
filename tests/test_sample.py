"""The sample image: its layers on disk use each whiteout format, and pyunion merges them."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from support import mounted, needs_busybox, needs_fuse, needs_root, pyunion

pytestmark = [needs_root, needs_busybox, pytest.mark.timeout(60)]


@pytest.fixture(scope="module")
def sample(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    from unionfs.sample import build_sample

    return [Path(p) for p in build_sample(tmp_path_factory.mktemp("sample"))]


def test_three_layers_top_first(sample: list[Path]) -> None:
    assert [p.name for p in sample] == ["2-oci", "1-kernel", "0-base"]


def test_base_is_busybox(sample: list[Path]) -> None:
    base = sample[2]
    assert os.access(base / "bin/busybox", os.X_OK)
    assert os.readlink(base / "bin/sh") == "/bin/busybox"
    assert "alice:x:1000:1000" in (base / "etc/passwd").read_text()
    assert stat.S_IMODE((base / "tmp").stat().st_mode) == 0o1777


def test_kernel_layer_formats(sample: list[Path]) -> None:
    st = os.lstat(sample[1] / "etc/doomed.txt")
    assert stat.S_ISCHR(st.st_mode) and st.st_rdev == os.makedev(0, 0)
    assert os.getxattr(sample[1] / "opt/old", "trusted.overlay.opaque") == b"y"


def test_oci_layer_formats(sample: list[Path]) -> None:
    top = sample[0]
    assert (top / "usr/share/.wh.junk.txt").stat().st_size == 0
    assert (top / "srv/.wh..wh..opq").is_file()
    assert (top / "home/alice/hello.txt").stat().st_uid == 1000


def test_cli_prints_layers_and_refuses_to_overwrite(tmp_path: Path) -> None:
    out = pyunion("sample", str(tmp_path)).stdout.split()
    assert out == [str(tmp_path / "layers" / n) for n in ("2-oci", "1-kernel", "0-base")]
    r = pyunion("sample", str(tmp_path), check=False)
    assert r.returncode != 0 and "--force" in r.stderr
    assert pyunion("sample", "--force", str(tmp_path)).stdout.split() == out


@needs_fuse
def test_merged_view(sample: list[Path], tmp_path: Path) -> None:
    with mounted(sample, tmp_path / "mnt") as m:
        assert not (m / "etc/doomed.txt").exists()  # kernel whiteout
        assert not (m / "usr/share/junk.txt").exists()  # OCI whiteout
        assert sorted(os.listdir(m / "opt/old")) == ["new.txt"]  # trusted.overlay.opaque
        assert sorted(os.listdir(m / "srv")) == ["index.html"]  # .wh..wh..opq, own file kept
        assert (m / "etc/motd").is_file() and (m / "bin/busybox").is_file()
        assert (m / "home/alice/hello.txt").stat().st_uid == 1000


def test_oci_layout(sample: list[Path], tmp_path: Path) -> None:
    """`--oci`: kernel whiteouts and opaque xattrs become `.wh.` markers, the marker first."""
    import gzip
    import io
    import json
    import tarfile

    from unionfs.sample import build_sample_oci

    oci = Path(build_sample_oci(tmp_path, [str(p) for p in sample]))
    index = json.loads((oci / "index.json").read_text())
    blob = oci / "blobs/sha256"
    manifest = json.loads((blob / index["manifests"][0]["digest"][7:]).read_text())
    config = json.loads((blob / manifest["config"]["digest"][7:]).read_text())
    assert config["config"]["User"] == "alice" and len(config["rootfs"]["diff_ids"]) == 3
    kernel = manifest["layers"][1]["digest"][7:]
    with tarfile.open(fileobj=io.BytesIO(gzip.decompress((blob / kernel).read_bytes()))) as t:
        names = t.getnames()
    assert "etc/.wh.doomed.txt" in names and "etc/doomed.txt" not in names
    assert names.index("opt/old/.wh..wh..opq") < names.index("opt/old/new.txt")
