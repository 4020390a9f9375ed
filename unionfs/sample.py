"""The built-in sample image: three busybox layers that exercise every whiteout format.

Built on the spot from Debian's busybox-static (`/bin/busybox`), so the demo and
the tests need no network and no registry. Layers, bottom to top:

- `0-base`: busybox, one symlink per applet, /etc/passwd and /etc/group with
  root, alice (1000) and nobody, the usual empty directories, and a few files
  the layers above delete or hide.
- `1-kernel`: kernel overlayfs format: deletes /etc/doomed.txt with a char 0/0
  whiteout (mknod), makes /opt/old opaque with `trusted.overlay.opaque=y`
  and adds /etc/motd.
- `2-oci`: OCI format: deletes /usr/share/junk.txt with `.wh.junk.txt`, makes
  /srv opaque with `.wh..wh..opq` (its own new file stays visible), and adds
  /home/alice/hello.txt owned by alice.

An ordinary user builds it in the rootless user namespace (`userns.py`), as
root there: alice's files then belong to the ID the namespace maps 1000 to, the
char 0/0 whiteout is made all the same (Linux 5.8+ lets anyone make one), and
/opt/old gets `user.overlay.opaque=y` instead (the kernel's format for an
overlay mounted in a user namespace, `-o userxattr`; trusted xattrs need the
host's root). The merged view is the same.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import gzip
import hashlib
import io
import json
import os
import platform
import shutil
import stat
import subprocess
import sys
import tarfile
from pathlib import Path

from . import userns
from .errors import UserError
from .tree import open_trusted, private_dir, rmtree

BUSYBOX = "/bin/busybox"
LAYER_NAMES = ("2-oci", "1-kernel", "0-base")  # top first

PASSWD = """\
root:x:0:0:root:/root:/bin/sh
alice:x:1000:1000:Alice:/home/alice:/bin/sh
nobody:x:65534:65534:nobody:/nonexistent:/bin/false
"""
GROUP = """\
root:x:0:
users:x:100:alice
alice:x:1000:
nogroup:x:65534:
"""


def _write(path: Path, text: str, mode: int = 0o644, owner: tuple[int, int] = (0, 0)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    os.chmod(path, mode)
    os.lchown(path, *owner)


def _mkdirs(root: Path, names: list[str], mode: int = 0o755) -> None:
    for name in names:
        d = root / name
        d.mkdir(parents=True, exist_ok=True)
        os.chmod(d, mode)


def _applets() -> list[str]:
    """Every applet's path relative to / (e.g. `usr/bin/wget`), from busybox itself."""
    out = subprocess.run([BUSYBOX, "--list-full"], capture_output=True, text=True, check=True)
    return [line.strip() for line in out.stdout.splitlines() if line.strip()]


def _base(root: Path) -> None:
    _mkdirs(
        root,
        [
            "bin",
            "sbin",
            "usr/bin",
            "usr/sbin",
            "usr/share",
            "etc",
            "proc",
            "sys",
            "dev",
            "run",
            "var/log",
            "opt/old",
            "srv",
            "home",
        ],
    )
    _mkdirs(root, ["root"], 0o700)
    _mkdirs(root, ["tmp", "var/tmp"], 0o1777)
    shutil.copyfile(BUSYBOX, root / "bin/busybox")
    os.chmod(root / "bin/busybox", 0o755)
    for applet in _applets():
        link = root / applet
        if "/" not in applet or applet == "bin/busybox" or link.exists() or link.is_symlink():
            continue
        link.parent.mkdir(parents=True, exist_ok=True)
        os.symlink("/bin/busybox", link)
    _write(root / "etc/passwd", PASSWD)
    _write(root / "etc/group", GROUP)
    _write(root / "etc/os-release", 'NAME="pyunion sample"\nID=pyunion-sample\n')
    _write(root / "etc/doomed.txt", "deleted by a kernel whiteout in 1-kernel\n")
    _write(root / "usr/share/junk.txt", "deleted by an OCI whiteout in 2-oci\n")
    _write(root / "opt/old/hidden.txt", "hidden: 1-kernel makes /opt/old opaque\n")
    _write(root / "srv/hidden.txt", "hidden: 2-oci makes /srv opaque\n")
    home = root / "home/alice"
    home.mkdir()
    os.chown(home, 1000, 1000)


def _kernel(root: Path) -> None:
    _mkdirs(root, ["etc", "opt/old"])
    os.mknod(root / "etc/doomed.txt", 0o600 | 0o020000, os.makedev(0, 0))  # S_IFCHR 0/0
    try:
        os.setxattr(root / "opt/old", "trusted.overlay.opaque", b"y")
    except PermissionError:  # root of a user namespace only: the userxattr format
        os.setxattr(root / "opt/old", "user.overlay.opaque", b"y")
    _write(root / "opt/old/new.txt", "from 1-kernel, in an opaque directory\n")
    _write(root / "etc/motd", "Welcome to the pyunion sample image (busybox).\n")


def _oci(root: Path) -> None:
    _mkdirs(root, ["usr/share", "srv", "home/alice"])
    os.chown(root / "home/alice", 1000, 1000)
    _write(root / "usr/share/.wh.junk.txt", "")
    _write(root / "srv/.wh..wh..opq", "")
    _write(root / "srv/index.html", "<p>from 2-oci, in an opaque directory</p>\n")
    _write(root / "home/alice/hello.txt", "hello from alice\n", owner=(1000, 1000))


def build_sample(dest: str | os.PathLike[str], force: bool = False) -> list[str]:
    """Build the sample layers under DEST/layers; return their paths, top first."""
    if not os.path.isfile(BUSYBOX):
        raise UserError(f"{BUSYBOX} is missing: run 'bash scripts/setup.sh' (busybox-static)")
    # Everything below is made and chmod'ed by name: no other user may be able to change
    # a name on the way (`pyunion sample /tmp/sample` into her directory: she moved
    # root's `layers` away and put hers, whose etc -> /etc got the sample's passwd).
    try:
        os.close(open_trusted(os.path.abspath(dest), mkdir=0o755))
        dest = private_dir(os.path.abspath(dest))  # used by name: as checked (`private_dir`)
    except OSError as e:
        raise UserError(f"cannot build the sample in {str(dest)!r}: it {e.strerror}") from None
    layers_dir = Path(dest) / "layers"
    if layers_dir.exists():
        if not force and any(layers_dir.iterdir()):
            raise UserError(f"{layers_dir} already exists (use --force to rebuild it)")
        rmtree(str(layers_dir))
    layers_dir.mkdir(parents=True)
    old_umask = os.umask(0o022)
    try:
        builders = {"0-base": _base, "1-kernel": _kernel, "2-oci": _oci}
        for name in reversed(LAYER_NAMES):
            root = layers_dir / name
            root.mkdir()
            builders[name](root)
    except OSError as e:
        if e.errno == errno.EINVAL and userns.unmapped([1000]):
            raise UserError(
                f"cannot build the sample image: its user alice (1000) is {userns.outside_hint()}"
            ) from None
        raise UserError(f"cannot build the sample image: {e}") from e
    finally:
        os.umask(old_umask)
    return [str((layers_dir / name).resolve()) for name in LAYER_NAMES]


# -- the same image as an OCI layout (for `pyunion image import`) -------------------------
SAMPLE_CONFIG = {
    "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "SAMPLE=pyunion"],
    "Cmd": ["/bin/sh"],
    "WorkingDir": "/home/alice",
    "User": "alice",
}
GOARCH = {
    "x86_64": "amd64",
    "aarch64": "arm64",
    "armv7l": "arm",
    "ppc64le": "ppc64le",
    "s390x": "s390x",
    "riscv64": "riscv64",
    "i686": "386",
}


def _layer_tar(root: Path) -> bytes:
    """An OCI layer tar of ROOT: kernel whiteouts and opaque xattrs become `.wh.` markers."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:

        def add(path: Path, arc: str) -> None:
            st = os.lstat(path)
            if stat.S_ISCHR(st.st_mode) and st.st_rdev == 0:
                info = tarfile.TarInfo(
                    os.path.join(os.path.dirname(arc), ".wh." + os.path.basename(arc))
                )
                info.mtime = int(st.st_mtime)
                tar.addfile(info, io.BytesIO(b""))
                return
            tar.add(path, arcname=arc, recursive=False)
            if stat.S_ISDIR(st.st_mode):
                opaque = False
                for xattr in ("trusted.overlay.opaque", "user.overlay.opaque"):
                    with contextlib.suppress(OSError):
                        opaque |= os.getxattr(path, xattr, follow_symlinks=False) == b"y"
                if opaque:  # the marker comes before the directory's entries
                    info = tarfile.TarInfo(f"{arc}/.wh..wh..opq")
                    info.mtime = int(st.st_mtime)
                    tar.addfile(info, io.BytesIO(b""))
                for name in sorted(os.listdir(path)):
                    add(path / name, f"{arc}/{name}")

        for name in sorted(os.listdir(root)):
            add(root / name, name)
    return buf.getvalue()


def _blob(blobs: Path, data: bytes) -> tuple[str, int]:
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    (blobs / digest.split(":")[1]).write_bytes(data)
    return digest, len(data)


def build_sample_oci(dest: str | os.PathLike[str], layers: list[str]) -> str:
    """Write the sample as an OCI image layout in DEST/oci (gzip layers); return its path."""
    out = Path(dest) / "oci"
    if out.exists():
        rmtree(str(out))
    blobs = out / "blobs/sha256"
    blobs.mkdir(parents=True)
    diff_ids, descs = [], []
    for layer in reversed(layers):  # bottom first, as the manifest lists them
        raw = _layer_tar(Path(layer))
        diff_ids.append("sha256:" + hashlib.sha256(raw).hexdigest())
        digest, size = _blob(blobs, gzip.compress(raw, mtime=0))
        descs.append(
            {
                "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                "digest": digest,
                "size": size,
            }
        )
    config = {
        "architecture": GOARCH.get(platform.machine(), platform.machine()),
        "os": "linux",
        "config": SAMPLE_CONFIG,
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
        "history": [{"created_by": f"pyunion sample: {Path(x).name}"} for x in reversed(layers)],
    }
    cdigest, csize = _blob(blobs, json.dumps(config, indent=1).encode())
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": cdigest,
            "size": csize,
        },
        "layers": descs,
    }
    mdigest, msize = _blob(blobs, json.dumps(manifest, indent=1).encode())
    index = {
        "schemaVersion": 2,
        "manifests": [
            {
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "digest": mdigest,
                "size": msize,
                "annotations": {"org.opencontainers.image.ref.name": "latest"},
            }
        ],
    }
    (out / "index.json").write_text(json.dumps(index, indent=1))
    (out / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    return str(out.resolve())


def _cmd_sample(args: argparse.Namespace) -> int:
    userns.enter_rootless()
    layers = build_sample(args.dir, force=args.force)
    for path in layers:
        print(path)
    if args.oci:
        print(f"pyunion: OCI layout: {build_sample_oci(args.dir, layers)}", file=sys.stderr)
    sys.stdout.flush()
    return 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "sample",
        help="build the sample busybox image (three layers)",
        description="Build the built-in sample image under DIR/layers from /bin/busybox and "
        "print its layer directories, top first, one per line (ready for "
        "'pyunion run $(pyunion sample DIR) -- sh').",
    )
    p.add_argument("dir", metavar="DIR")
    p.add_argument("--force", action="store_true", help="rebuild DIR/layers if it exists")
    p.add_argument(
        "--oci",
        action="store_true",
        help="also write DIR/oci, the same image as an OCI layout (with a config: "
        "Env, Cmd, WorkingDir, User) for 'pyunion image import'",
    )
    p.set_defaults(handler=_cmd_sample)
