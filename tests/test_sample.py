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


_STEAL_LAYERS = r"""
import os, sys, time
home, victim, seconds = sys.argv[1], sys.argv[2], float(sys.argv[3])
layers, base = os.path.join(home, "layers"), os.path.join(home, "layers", "0-base")
end, stage = time.monotonic() + seconds, 0
while time.monotonic() < end and stage < 2:
    try:  # root's `layers` moved away, hers in its place; then root's 0-base: etc -> victim
        if stage == 0 and os.stat(layers).st_uid == 0:
            os.rename(layers, os.path.join(home, "stolen"))
            os.mkdir(layers)
            stage = 1
        elif stage == 1 and os.stat(base).st_uid == 0:
            os.rename(base, os.path.join(layers, "stolen"))
            os.mkdir(base)
            os.symlink(victim, os.path.join(base, "etc"))
            stage = 2
    except OSError:
        pass
    time.sleep(0.0002)
print(stage)
"""


def test_a_sample_directory_a_user_can_change_is_refused(
    local_user: tuple[tuple[int, int], Path],
) -> None:
    """The README's `pyunion sample /tmp/sample`, where a user made /tmp/sample first: she
    moved root's `layers` away and put hers in its place, whose 0-base/etc was a symlink
    to a root-only directory (standing for /etc): root made it 0755 and wrote the
    sample's passwd into it. The sample is written by name, so DIR must now be one no
    other user can change (`tree.open_private_dir`), reached through no symlink of hers;
    one line. A fresh DIR in a sticky directory (/tmp's kind) is fine."""
    import subprocess
    import sys

    who, home = local_user
    t = home.parent
    victim, sticky = t / "victim", t / "sticky"
    victim.mkdir(mode=0o700)
    sticky.mkdir(mode=0o1777)
    sticky.chmod(0o1777)
    (victim / "passwd").write_text("orig\n")
    she = ["setpriv", f"--reuid={who[0]}", f"--regid={who[1]}", "--clear-groups"]
    racer = subprocess.Popen(
        [*she, sys.executable, "-c", _STEAL_LAYERS, str(home), str(victim), "20"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        r = pyunion("sample", str(home), check=False)
    finally:
        racer.kill()
        racer.communicate(timeout=30)
    assert r.returncode != 0 and f"owned by uid {who[0]}" in r.stderr, r.stderr
    subprocess.run([*she, "ln", "-s", str(victim), str(home / "link")], check=True, timeout=30)
    r2 = pyunion("sample", str(home / "link"), check=False)
    assert r2.returncode != 0 and "symlink owned by uid" in r2.stderr, r2.stderr
    for out in (r, r2):
        assert len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert stat.S_IMODE(victim.stat().st_mode) == 0o700 and os.listdir(victim) == ["passwd"]
    assert (victim / "passwd").read_text() == "orig\n"
    layers = pyunion("sample", str(sticky / "s")).stdout.split()
    assert [Path(p).name for p in layers] == ["2-oci", "1-kernel", "0-base"]


_SWAP_ROOTS_LINK = r"""
import os, sys, time
home, victim, seconds = sys.argv[1], sys.argv[2], float(sys.argv[3])
data, mine = os.path.join(home, "data"), os.path.join(home, "mine")
base = os.path.join(mine, "s", "layers", "0-base")
os.makedirs(os.path.join(mine, "s", "layers"))
end, stage = time.monotonic() + seconds, 0
while time.monotonic() < end and stage < 2:
    try:  # root's symlink on the way moved away, hers in its place; then 0-base: etc -> victim
        if stage == 0 and os.path.isdir(os.path.join(data, "s", "layers")):
            os.rename(data, os.path.join(home, "data.root"))
            os.symlink(mine, data)
            stage = 1
        elif stage == 1 and os.stat(base).st_uid == 0:
            os.rename(base, os.path.join(mine, "stolen"))
            os.mkdir(base)
            os.symlink(victim, os.path.join(base, "etc"))
            stage = 2
    except OSError:
        pass
    time.sleep(0.0002)
print(stage)
"""


def test_a_sample_reached_through_roots_symlink_in_her_directory_is_written_as_checked(
    local_user: tuple[tuple[int, int], Path],
) -> None:
    """Root's own symlink in a user's directory (`/home/u/data -> /srv/data`) on the way
    to DIR: the directory it resolves to passed the check, but the sample was written by
    the path given. She renamed root's symlink away once root had begun, put hers in its
    place, then swapped root's 0-base there for hers, whose etc -> a root-only directory
    (standing for /etc): root wrote the sample's passwd into it. The sample is now
    written by the path as checked (`tree.private_dir`)."""
    import subprocess
    import sys

    who, home = local_user
    srv, victim = home.parent / "srv", home.parent / "victim"
    srv.mkdir(mode=0o755)
    victim.mkdir(mode=0o700)
    (victim / "passwd").write_text("orig\n")
    (home / "data").symlink_to(srv)  # root's
    she = ["setpriv", f"--reuid={who[0]}", f"--regid={who[1]}", "--clear-groups"]
    racer = subprocess.Popen(
        [*she, sys.executable, "-c", _SWAP_ROOTS_LINK, str(home), str(victim), "20"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        r = pyunion("sample", str(home / "data/s"), check=False)
    finally:
        racer.kill()
        racer.communicate(timeout=30)
    assert (victim / "passwd").read_text() == "orig\n" and os.listdir(victim) == ["passwd"]
    assert r.returncode == 0, r.stderr
    assert [os.path.dirname(p) for p in r.stdout.split()] == [str(srv / "s/layers")] * 3
