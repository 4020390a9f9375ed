"""pyunion as podman's mount program (containers/storage `overlay.mount_program`).

podman runs a container on the FUSE mount pyunion-overlayfs makes (runc
mounts /proc, /dev and the rest over it), `podman diff` and `podman commit`
read the container's upper through a second mount, and `podman rm` unmounts.
The same container is run with fuse-overlayfs as the mount program: both must
report the same changes, and the committed image must read back as the
container left its tree. Everything lives in a private --root/--runroot under
the test's temp dir and is removed afterwards, failures included.
"""

from __future__ import annotations

import contextlib
import os
import resource
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from support import (
    fuse_skip_reason,
    mounts_below,
    stop_storage_leftovers,
    storage_daemons,
    storage_tool,
)

from unionfs.procfs import mounts

PYUNION_OVERLAYFS = Path(
    os.environ.get("PYUNION_MOUNT_PROGRAM") or Path(sys.executable).parent / "pyunion-overlayfs"
)
FUSE_OVERLAYFS = shutil.which("fuse-overlayfs")
REPO = Path(__file__).resolve().parent.parent


def _skip_reason() -> str | None:
    if reason := fuse_skip_reason():
        return reason
    if shutil.which("podman") is None:
        return "needs podman (scripts/setup.sh installs it)"
    if not PYUNION_OVERLAYFS.exists():
        return f"needs the pyunion-overlayfs console script in {PYUNION_OVERLAYFS.parent}"
    return None


pytestmark = pytest.mark.skipif(_skip_reason() is not None, reason=_skip_reason() or "")

# Changes of every kind to the lower layer: new, appended, deleted file and directory,
# a directory replaced (opaque), renames, a hard link to a lower file, a mode change.
SHARED_CHANGES = """
echo new > /data/new
echo more >> /data/a
rm /data/gone-file
rm -r /data/gone-dir
mv /data/mv-file /data/mv-file2
mv /data/mv-dir /data/mv-dir2
ln /data/hl /data/hl2
chmod 600 /data/ro
cat /data/a /data/mv-dir2/f
"""
SHARED_AFTER = """
cd /data
ls -A . mv-dir2
cat a hl2
stat -c '%a %h' ro hl
test ! -e gone-file && test ! -e gone-dir && test ! -e mv-file
"""
# A directory deleted and made again (opaque): podman with fuse-overlayfs 1.10 commits a
# layer that loses it (replaced/old comes back), so it is checked with pyunion alone.
CHANGES = (
    SHARED_CHANGES
    + """
rm -r /data/replaced; mkdir /data/replaced; echo n > /data/replaced/n
cat /data/replaced/n
"""
)
AFTER = (
    SHARED_AFTER
    + """
ls -A replaced
test ! -e replaced/old
"""
)


class Podman:
    """podman on a private root, runroot and configuration, with one mount program."""

    def __init__(self, base: Path, program: str) -> None:
        self.base = base
        self.root = base / "root"
        self.runroot = Path(tempfile.mkdtemp(prefix="pu-podman-"))  # podman: < 50 characters
        (base / "tmp").mkdir(parents=True, exist_ok=True)
        self.program = program
        conf = base / "containers.conf"
        conf.write_text('[engine]\nevents_logger = "file"\ncgroup_manager = "cgroupfs"\n')
        self.state = base / "state"
        self.env = {
            **os.environ,
            "CONTAINERS_CONF": str(conf),
            "TMPDIR": str(base / "tmp"),
            "PYUNION_STATE_DIR": str(self.state),
            "PYUNION_LOG": str(base / "daemon.log"),
        }

    def __call__(self, *args: str, check: bool = True) -> str:
        argv = [
            *("podman", "--root", str(self.root), "--runroot", str(self.runroot)),
            # On the command line: podman given --root reads no storage.conf options.
            *("--storage-driver", "overlay"),
            *("--storage-opt", f"overlay.mount_program={self.program}"),
            *args,
        ]
        log = self.base / "daemon.log"
        return storage_tool(argv, f"podman {' '.join(args)}", self.env, log, check)

    def run(self, *args: str) -> str:
        """`podman run` with modest limits: podman's defaults (nofile 1048576, nproc
        4194304) exceed this machine's, and runc then fails to set them."""
        limits = []
        for name, res, want in (
            ("nofile", resource.RLIMIT_NOFILE, 1024),
            ("nproc", resource.RLIMIT_NPROC, 4096),
        ):
            n = min(want, resource.getrlimit(res)[0])
            limits += ["--ulimit", f"{name}={n}:{n}"]
        return self("run", "--network", "none", *limits, *args)

    def mounts(self) -> list[str]:
        return mounts_below(self.base, self.runroot)

    def daemons(self) -> list[int]:
        return storage_daemons(self.state, self.root)

    def cleanup(self) -> None:
        """Remove containers and images, then whatever a failure left mounted or running."""
        if self.root.exists():
            self("rm", "--all", "--force", check=False)
            self("rmi", "--all", "--force", check=False)
        stop_storage_leftovers([self.base, self.runroot], self.state, self.root)


@contextlib.contextmanager
def podman(base: Path, program: str) -> Iterator[Podman]:
    p = Podman(base, program)
    try:
        yield p
    finally:
        p.cleanup()
        shutil.rmtree(base, ignore_errors=True)
        shutil.rmtree(p.runroot, ignore_errors=True)


@pytest.fixture(scope="module")
def base_tar(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The sample image's busybox layer plus a /data tree to change, as one tar."""
    d = tmp_path_factory.mktemp("podman-base")
    out = subprocess.run(
        [sys.executable, "-m", "unionfs", "sample", str(d / "sample")],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
        cwd=REPO,
    ).stdout.split()
    root = Path(out[-1])  # the bottom layer: a whole busybox tree
    data = root / "data"
    for sub in ("gone-dir", "replaced", "mv-dir"):
        (data / sub).mkdir(parents=True)
    for name, text in (
        ("a", "a\n"),
        ("gone-file", "g\n"),
        ("gone-dir/x", "x\n"),
        ("replaced/old", "o\n"),
        ("mv-file", "m\n"),
        ("mv-dir/f", "f\n"),
        ("hl", "h\n"),
        ("ro", "r\n"),
    ):
        (data / name).write_text(text)
    (data / "ro").chmod(0o644)
    tar = d / "base.tar"
    with tarfile.open(tar, "w") as t:
        t.add(root, arcname=".")
    return tar


def _session(p: Podman, tar: Path, changes: str, after: str) -> dict[str, object]:
    """Import, run the changes, diff, commit, read the commit back, remove the container.

    The container's name is not hex: podman 4.3's `diff NAME` takes an image whose ID
    starts with NAME before the container (a random ID began with "c1" now and then)."""
    out: dict[str, object] = {}
    p("import", str(tar), "localhost/base:1")
    out["run"] = p.run("--name", "ctr1", "localhost/base:1", "/bin/sh", "-ec", changes)
    out["diff"] = sorted(p("diff", "ctr1").splitlines())
    p("commit", "-q", "ctr1", "localhost/changed:1")
    p("rm", "ctr1")
    out["after"] = p.run("--rm", "localhost/changed:1", "/bin/sh", "-ec", after)
    return out


def test_podman_run_diff_commit_with_pyunion(base_tar: Path, tmp_path: Path) -> None:
    with podman(tmp_path / "podman", str(PYUNION_OVERLAYFS)) as p:
        out = _session(p, base_tar, CHANGES, AFTER)
        # The container's root was pyunion's FUSE mount, not a kernel overlay.
        assert (
            "fuse.pyunion"
            in p.run("--rm", "localhost/base:1", "/bin/sh", "-c", "cat /proc/self/mounts").split(
                "\n"
            )[0]
        )
        assert p.mounts() == [] and p.daemons() == [], "left mounted or running after rm"
    assert out["run"] == "a\nmore\nf\nn"
    assert out["after"] == (
        ".:\na\nhl\nhl2\nmv-dir2\nmv-file2\nnew\nreplaced\nro\n\nmv-dir2:\nf\n"
        "a\nmore\nh\n600 1\n644 1\n"  # the naive diff commits hl2 as a file of its own
        "n"
    )
    diff = out["diff"]
    assert isinstance(diff, list)
    for change in (
        "A /data/new",
        "C /data/a",
        "D /data/gone-file",
        "D /data/gone-dir",
        "A /data/mv-file2",
        "D /data/mv-file",
        "A /data/mv-dir2",
        "D /data/mv-dir",
        "A /data/hl2",
    ):
        assert change in diff, (change, diff)


@pytest.mark.skipif(FUSE_OVERLAYFS is None, reason="needs fuse-overlayfs to compare with")
def test_podman_sees_the_same_changes_as_with_fuse_overlayfs(
    base_tar: Path, tmp_path: Path
) -> None:
    runs = []
    for name, program in (("pyunion", str(PYUNION_OVERLAYFS)), ("fo", str(FUSE_OVERLAYFS))):
        with podman(tmp_path / name, program) as p:
            runs.append(_session(p, base_tar, SHARED_CHANGES, SHARED_AFTER))
    assert runs[0] == runs[1], f"pyunion: {runs[0]}\nfuse-overlayfs: {runs[1]}"


def _overlay_mounts(p: Podman, tar: Path, base: Path) -> tuple[str, str]:
    """`-v SRC:DST:O` and `--rootfs DIR:O`: containers/common mounts SRC (or DIR) under a
    throw-away upper with the mount program, passing `private`, which pyunion refused
    (the run failed with "exec pyunion-overlayfs: exit status 1")."""
    vol = base / "vol"
    vol.mkdir(parents=True)
    (vol / "h").write_text("host\n")
    rootfs = base / "rootfs"
    rootfs.mkdir()
    subprocess.run(["tar", "-xf", str(tar), "-C", str(rootfs)], check=True, timeout=60)
    p("import", str(tar), "localhost/base:1")
    volume = p.run(
        *("--rm", "-v", f"{vol}:/vol:O", "localhost/base:1"),
        *("/bin/sh", "-ec", "cat /vol/h; echo w > /vol/new; rm /vol/h; ls /vol"),
    )
    root = p.run(
        *("--rm", "--rootfs", f"{rootfs}:O"),
        *("/bin/sh", "-ec", "echo x > /etc/xx; cat /etc/xx; rm /data/a; ls /data"),
    )
    # The host's trees are as they were: the changes went to the throw-away uppers.
    assert sorted(os.listdir(vol)) == ["h"] and (vol / "h").read_text() == "host\n"
    assert not (rootfs / "etc/xx").exists() and (rootfs / "data/a").exists()
    assert p.mounts() == [] and p.daemons() == [], "left mounted or running after --rm"
    return volume, root


def _programs() -> list[tuple[str, str]]:
    """The mount programs compared: pyunion's, and fuse-overlayfs where it is installed."""
    programs = [("pyunion", str(PYUNION_OVERLAYFS))]
    if FUSE_OVERLAYFS is not None:
        programs.append(("fo", FUSE_OVERLAYFS))
    return programs


def test_overlay_volume_and_rootfs(base_tar: Path, tmp_path: Path) -> None:
    runs = []
    for name, program in _programs():
        with podman(tmp_path / name, program) as p:
            runs.append(_overlay_mounts(p, base_tar, tmp_path / f"{name}-host"))
    volume, root = runs[0]
    assert volume == "host\nnew"
    assert root.split("\n")[0] == "x" and "a" not in root.split("\n")[1:]
    assert all(r == runs[0] for r in runs), runs


def _id_mapped_mount(p: Podman, tar: Path) -> list[str]:
    """`podman create --uidmap`, then `podman mount`: what the mount shows of /data.

    containers/storage mounts an ID-mapped container's layers through its `mapped/0/l/`
    symlinks, chowned to the container's root (host uid 100000) in root's 0700
    `mapped/`; pyunion refused them ("crosses a symlink owned by uid 100000"). (Running
    such a container fails in runc with podman 4.3 and fuse-overlayfs alike: storage
    both chowns the layers and passes `uidmapping=`.)"""
    p("import", str(tar), "localhost/base:1")
    ids = ("--uidmap", "0:100000:65536", "--gidmap", "0:100000:65536")
    ctr = p("create", "--network", "none", *ids, "localhost/base:1", "true")
    try:
        mnt = Path(p("mount", ctr))
        try:
            assert _fstype(mnt) == _fstype_of(p.program), _fstype(mnt)
            shown = [
                f"{e.name} {e.stat().st_uid}"
                for e in sorted(os.scandir(mnt / "data"), key=lambda e: e.name)
            ]
            shown.append((mnt / "data/a").read_text())
        finally:
            p("unmount", ctr)
    finally:
        p("rm", ctr)
    assert p.mounts() == [] and p.daemons() == [], "left mounted or running after rm"
    return shown


def _fstype_of(program: str) -> str:
    name = os.path.basename(program)
    return "fuse.pyunion" if "pyunion" in name else f"fuse.{name}"


def _fstype(path: Path) -> str:
    """The filesystem type of the mount at `path`."""
    return next((t for point, t, _ in mounts() if point == str(path)), "")


def test_id_mapped_container_mounts(base_tar: Path, tmp_path: Path) -> None:
    runs = []
    for name, program in _programs():
        with podman(tmp_path / name, program) as p:
            runs.append(_id_mapped_mount(p, base_tar))
    assert runs[0][-1] == "a\n" and "mv-dir" in " ".join(runs[0])
    assert all(r == runs[0] for r in runs), runs
