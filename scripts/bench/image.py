"""The benchmark image: built once, cached, read-only afterwards.

Cache layout (under --cache, default /var/tmp/pyunion-bench):

    rootfs/            debootstrap --variant=minbase bookworm + python3, apt's .debs removed;
                       or a generated tree of the same shape (rootfs.json says which)
    data/              real random data (never sparse), one file per role and size
    images/NAME/       one image (NAME = rootfs source + sizes); image.json, written last,
                       marks it complete
        kernel/l0..l2  the layers, top first, in the kernel's format: a whiteout is a
                       char device 0/0, an opaque directory has trusted.overlay.opaque=y.
                       Read by kernel overlayfs, fuse-overlayfs and pyunion.
        unionfs/l0..l2 the same layers in unionfs-fuse's format: a whiteout of P is an
                       empty file .unionfs-fuse/P_HIDDEN~ in the same layer; an opaque
                       directory D is D plus .unionfs-fuse/D_HIDDEN~ (unionfs-fuse looks for
                       a path in a branch before it looks for the hide file, so the hide
                       file only hides the branches below).
        merged/        the merged tree, for "native"
        w8.tar         the W8 tarball
    stacks/N/          the mount-time stack of N files, kernel/ and unionfs/ as above

Every non-directory in every layer is a hard link to a file in rootfs/ or data/:
layers are only ever lowers, so nothing writes to them, and the cache costs the
root filesystem and the data once. (The one file a workload writes in place,
W4's, is copied for "native" before it runs.)

The split into layers imitates a container image:
- l2, the base: the root filesystem without python3, plus the data files
  (srv/bench) and W7's directory (var/lib/bench-w7);
- l1, "apt-get install python3": the files of the python packages (their dpkg
  lists and usr/lib/python3*), a newer var/lib/dpkg/status, whiteouts of every
  other usr/share/doc/PACKAGE directory, etc/alternatives rewritten as an opaque
  directory;
- l0, the application: opt/app, a new etc/hostname, etc/apt rewritten as an
  opaque directory, whiteouts of every 25th file under usr/share.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import stat
import subprocess
import tarfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from .sizes import MiB, Sizes

OPAQUE_XATTR = "trusted.overlay.opaque"
UNIONFS_META = ".unionfs-fuse"  # Debian's unionfs-fuse 1.0 (upstream's later ones: .unionfs)
UNIONFS_HIDETAG = "_HIDDEN~"
N_LAYERS = 3
FORMAT = 2  # bump when the layout of a cached image or stack changes


def log(msg: str) -> None:
    print(f"bench: {msg}", flush=True)


# -- small file-tree helpers -----------------------------------------------------
def is_whiteout(st: os.stat_result) -> bool:
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == 0


def is_opaque(path: str | Path) -> bool:
    try:
        return os.getxattr(path, OPAQUE_XATTR, follow_symlinks=False) == b"y"
    except OSError:
        return False


def make_whiteout(path: Path) -> None:
    os.mknod(path, stat.S_IFCHR | 0o600, os.makedev(0, 0))


def mkdir_like(path: Path, st: os.stat_result | None) -> None:
    """Create `path` (if missing) with the mode and owner of `st`."""
    if not path.is_dir():
        os.mkdir(path)
    if st is not None:
        os.chown(path, st.st_uid, st.st_gid)
        os.chmod(path, stat.S_IMODE(st.st_mode))


def ensure_parents(src_root: Path, dst_root: Path, rel: str) -> None:
    """Create the parents of `rel` under `dst_root`, with the metadata of `src_root`'s."""
    parts = rel.split("/")[:-1]
    for i in range(1, len(parts) + 1):
        sub = "/".join(parts[:i])
        d = dst_root / sub
        if not d.is_dir():
            try:
                st = os.lstat(src_root / sub)
            except FileNotFoundError:
                st = None
            mkdir_like(d, st)


def link(src: Path, dst: Path) -> None:
    os.link(src, dst, follow_symlinks=False)


def walk(root: Path) -> list[tuple[str, os.stat_result]]:
    """Every entry below `root` as (relative path, lstat), parents before children, sorted."""
    out: list[tuple[str, os.stat_result]] = []

    def rec(d: Path, prefix: str) -> None:
        for name in sorted(os.listdir(d)):
            rel = prefix + name
            st = os.lstat(d / name)
            out.append((rel, st))
            if stat.S_ISDIR(st.st_mode):
                rec(d / name, rel + "/")

    rec(root, "")
    return out


def rmtree(path: Path) -> None:
    """Remove a tree that holds no mount (checked: never delete through a mount)."""
    if not path.exists():
        return
    real = os.path.realpath(path)
    with open("/proc/self/mountinfo") as f:
        for line in f:
            mp = line.split()[4].replace("\\040", " ")
            if mp == real or mp.startswith(real + "/"):
                raise RuntimeError(f"refusing to delete {path}: {mp} is still mounted")
    shutil.rmtree(path)


def write_random(path: Path, size: int, chunk: int = 8 * MiB) -> None:
    """Write `size` bytes of real random data (never sparse) to `path`, atomically."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        left = size
        while left > 0:
            n = min(chunk, left)
            f.write(os.urandom(n))
            left -= n
        f.flush()
        os.fsync(f.fileno())
    os.rename(tmp, path)


# -- the root filesystem -----------------------------------------------------------
def apt_mirror() -> str:
    """The Debian mirror apt uses here (sources.list or deb822 .sources)."""
    files = [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*"))]
    for p in files:
        try:
            text = p.read_text()
        except OSError:
            continue
        for line in text.splitlines():
            line = line.strip()
            if line.startswith("URIs:"):
                for uri in line.split()[1:]:
                    if "debian" in uri and "security" not in uri:
                        return uri
            elif line.startswith("deb ") and "security" not in line:
                for word in line.split()[1:]:
                    if word.startswith(("http://", "https://")) and "debian" in word:
                        return word
    return "http://deb.debian.org/debian"


def debootstrap(dest: Path, timeout: float = 1800.0) -> bool:
    """minbase bookworm with python3 into `dest`; False if debootstrap is missing or fails."""
    exe = shutil.which("debootstrap") or (
        "/usr/sbin/debootstrap" if os.path.exists("/usr/sbin/debootstrap") else None
    )
    if exe is None:
        log("debootstrap is not installed (apt-get install debootstrap); generating a tree")
        return False
    tmp = dest.with_name(dest.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    mirror = apt_mirror()
    log(
        f"debootstrap --variant=minbase --include=python3 bookworm {tmp} {mirror} "
        f"(a few minutes, once)"
    )
    logf = dest.with_name("debootstrap.log")
    with open(logf, "w") as out:
        try:
            r = subprocess.run(
                [exe, "--variant=minbase", "--include=python3", "bookworm", str(tmp), mirror],
                stdout=out,
                stderr=subprocess.STDOUT,
                timeout=timeout,
                check=False,
            )
        except subprocess.TimeoutExpired:
            log(f"debootstrap timed out; see {logf}; generating a tree")
            return False
    if r.returncode != 0 or not (tmp / "usr/bin/python3").exists():
        log(f"debootstrap failed (exit {r.returncode}); see {logf}; generating a tree")
        return False
    finish_debootstrap(tmp)
    os.rename(tmp, dest)
    return True


def finish_debootstrap(root: Path) -> None:
    """What a container image's build leaves out: apt's downloaded packages."""
    for deb in (root / "var/cache/apt/archives").glob("*.deb"):
        deb.unlink()


# Shape of the generated tree: (directory, share of the files, size range in bytes).
_GEN_SHAPE = [
    ("etc", 0.03, (50, 4_000)),
    ("usr/bin", 0.06, (10_000, 300_000)),
    ("usr/sbin", 0.02, (10_000, 100_000)),
    ("usr/lib/x86_64-linux-gnu", 0.10, (20_000, 1_500_000)),
    ("usr/lib/python3.11", 0.30, (500, 60_000)),
    ("usr/share/doc", 0.18, (200, 20_000)),
    ("usr/share/zoneinfo", 0.20, (100, 3_000)),
    ("usr/share/locale", 0.06, (1_000, 40_000)),
    ("var/lib/dpkg/info", 0.05, (50, 10_000)),
]


def generate_rootfs(dest: Path, n_files: int, seed: int = 0) -> None:
    """A tree of the shape of minbase + python3: merged /usr, many small files, a python
    package whose files are listed in var/lib/dpkg/info, doc dirs, etc/alternatives, etc/apt.
    If busybox-static is installed, its busybox becomes usr/bin/true (so W6 can run)."""
    rng = random.Random(seed)
    tmp = dest.with_name(dest.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    for d in (
        "usr/bin",
        "usr/sbin",
        "usr/lib",
        "usr/lib64",
        "etc/alternatives",
        "etc/apt/apt.conf.d",
        "var/lib/dpkg/info",
        "var/tmp",
        "tmp",
        "srv",
        "opt",
        "root",
        "dev",
        "proc",
    ):
        (tmp / d).mkdir(parents=True, exist_ok=True)
    for name, target in (
        ("bin", "usr/bin"),
        ("sbin", "usr/sbin"),
        ("lib", "usr/lib"),
        ("lib64", "usr/lib64"),
    ):
        os.symlink(target, tmp / name)
    python_files: list[str] = []
    k = 0
    for top, share, (lo, hi) in _GEN_SHAPE:
        count = max(2, int(n_files * share))
        for i in range(count):
            if top == "usr/share/doc":
                rel = f"{top}/pkg{i // 3:04d}/{('copyright', 'changelog.Debian.gz', 'NEWS')[i % 3]}"
            elif top == "usr/lib/python3.11":
                mod = f"mod{i // 40:03d}"
                rel = (
                    f"{top}/{mod}/__pycache__/f{i:05d}.cpython-311.pyc"
                    if i % 2
                    else f"{top}/{mod}/f{i:05d}.py"
                )
            elif top in ("usr/share/zoneinfo", "usr/share/locale"):
                rel = f"{top}/d{i // 50:03d}/f{i:05d}"
            else:
                rel = f"{top}/f{i:05d}"
            p = tmp / rel
            p.parent.mkdir(parents=True, exist_ok=True)
            size = int(lo * (hi / lo) ** (rng.random() ** 2))  # mostly small, a few large
            p.write_bytes(rng.randbytes(size))
            if top.startswith("usr/bin") and i % 10 == 0:
                os.chmod(p, 0o755)
            if top == "usr/lib/python3.11":
                python_files.append("/" + rel)
            k += 1
    for i in range(20):
        os.symlink(f"/usr/bin/f{i:05d}", tmp / f"etc/alternatives/alt{i:02d}")
    (tmp / "etc/apt/sources.list").write_text("deb http://deb.debian.org/debian bookworm main\n")
    (tmp / "etc/apt/apt.conf.d/70debconf").write_text("// generated\n")
    (tmp / "etc/hostname").write_text("generated\n")
    (tmp / "var/lib/dpkg/status").write_text("Package: base-files\nStatus: install ok installed\n")
    (tmp / "var/lib/dpkg/info/python3.11.list").write_text("\n".join(python_files) + "\n")
    busybox = Path("/bin/busybox")
    if busybox.exists() and Path("/usr/share/doc/busybox-static").exists():
        shutil.copy2(busybox, tmp / "usr/bin/busybox")
        os.symlink("busybox", tmp / "usr/bin/true")
    os.rename(tmp, dest)


def ensure_rootfs(cache: Path, source: str, n_generated: int) -> tuple[Path, str]:
    """The cached root filesystem for `source` ("auto", "debootstrap" or "generated"):
    (its path, its name). "auto" uses debootstrap when it works, else generates."""
    cache.mkdir(parents=True, exist_ok=True)
    if source in ("auto", "debootstrap"):
        root = cache / "rootfs"
        if (cache / "rootfs.json").exists():
            return root, "debootstrap"
        if root.exists():
            shutil.rmtree(root)
        if debootstrap(root):
            (cache / "rootfs.json").write_text(
                json.dumps(
                    {
                        "source": "debootstrap",
                        "suite": "bookworm",
                        "variant": "minbase",
                        "include": ["python3"],
                        "mirror": apt_mirror(),
                        "built": time.time(),
                    }
                )
            )
            return root, "debootstrap"
        if source == "debootstrap":
            raise SystemExit("bench: debootstrap failed and --source debootstrap was asked for")
    name = f"generated-{n_generated}"
    root = cache / "rootfs-generated" / str(n_generated)
    if not root.exists():
        log(f"generating a root filesystem of {n_generated} files in {root}")
        root.parent.mkdir(parents=True, exist_ok=True)
        generate_rootfs(root, n_generated)
    return root, name


# -- data files ----------------------------------------------------------------------
def data_file(cache: Path, role: str, size: int) -> Path:
    d = cache / "data"
    d.mkdir(parents=True, exist_ok=True)
    p = d / f"{role}-{size}.bin"
    if not p.exists() or p.stat().st_size != size:
        log(
            f"writing {size // MiB or size} {'MiB' if size >= MiB else 'bytes'} "
            f"of random data to {p} (once)"
        )
        write_random(p, size)
    return p


# -- the image -------------------------------------------------------------------------
@dataclass
class Image:
    """A built image; every path in `files` is relative to the mount's root."""

    root: Path
    source: str
    kernel_layers: list[Path]  # top first
    unionfs_layers: list[Path]  # top first
    merged: Path
    tarball: Path
    files: dict[str, str] = field(default_factory=dict)
    w7_count: int = 0
    has_true: bool = False
    has_python: bool = False
    counts: list[dict[str, int]] = field(default_factory=list)

    @classmethod
    def load(cls, root: Path) -> Image:
        meta = json.loads((root / "image.json").read_text())
        return cls(
            root=root,
            source=meta["source"],
            kernel_layers=[root / "kernel" / f"l{i}" for i in range(N_LAYERS)],
            unionfs_layers=[root / "unionfs" / f"l{i}" for i in range(N_LAYERS)],
            merged=root / "merged",
            tarball=root / "w8.tar",
            files=meta["files"],
            w7_count=meta["w7_count"],
            has_true=meta["has_true"],
            has_python=meta["has_python"],
            counts=meta["counts"],
        )


def _python_paths(rootfs: Path, entries: list[tuple[str, os.stat_result]]) -> set[str]:
    """Non-directories that belong to the python packages: their dpkg file lists, plus
    everything under usr/lib/python3* (the .pyc files the postinst compiled)."""
    out: set[str] = set()
    info = rootfs / "var/lib/dpkg/info"
    for lst in info.glob("*.list"):
        if "python" in lst.name:
            for line in lst.read_text(errors="replace").splitlines():
                out.add(line.strip().lstrip("/"))
    nondirs = {rel for rel, st in entries if not stat.S_ISDIR(st.st_mode)}
    for rel in nondirs:
        if rel.startswith("usr/lib/python3"):
            out.add(rel)
    return out & nondirs


def _count(layer: Path) -> dict[str, int]:
    c = {"files": 0, "dirs": 0, "whiteouts": 0, "opaque": 0, "bytes": 0}
    for rel, st in walk(layer):
        if stat.S_ISDIR(st.st_mode):
            c["dirs"] += 1
            c["opaque"] += is_opaque(layer / rel)
        elif is_whiteout(st):
            c["whiteouts"] += 1
        else:
            c["files"] += 1
            if stat.S_ISREG(st.st_mode):
                c["bytes"] += st.st_size
    return c


def build_layers(rootfs: Path, out: Path, cache: Path, sizes: Sizes) -> dict[str, object]:
    """Split `rootfs` into kernel-format layers out/l0 (top) .. out/l2 (bottom)."""
    entries = walk(rootfs)
    by_rel = dict(entries)
    python = _python_paths(rootfs, entries)
    l0, l1, l2 = (out / f"l{i}" for i in range(N_LAYERS))
    for d in (l0, l1, l2):
        d.mkdir(parents=True)
        mkdir_like(d, os.lstat(rootfs))

    # l2: everything but python
    for rel, st in entries:
        if stat.S_ISDIR(st.st_mode):
            mkdir_like(l2 / rel, st)
        elif rel not in python:
            link(rootfs / rel, l2 / rel)
    # l2 extras: the data files and W7's directory
    files: dict[str, str] = {"big": "srv/bench/big.bin", "mid": "srv/bench/mid.bin"}
    (l2 / "srv/bench").mkdir(parents=True, exist_ok=True)
    link(data_file(cache, "big", sizes.big), l2 / files["big"])
    link(data_file(cache, "mid", sizes.mid), l2 / files["mid"])
    for i in range(sizes.n_small):
        link(data_file(cache, f"small{i}", sizes.small), l2 / f"srv/bench/small{i}.bin")
    w7 = l2 / "var/lib/bench-w7"
    w7.mkdir(parents=True)
    rng = random.Random(7)
    for i in range(2 * sizes.w7_files):
        (w7 / f"f{i:05d}").write_bytes(rng.randbytes(rng.randint(1024, 4096)))
    files["w7_dir"] = "var/lib/bench-w7"

    # l1: python, a newer dpkg status, doc whiteouts, an opaque etc/alternatives
    for rel in sorted(python):
        ensure_parents(rootfs, l1, rel)
        link(rootfs / rel, l1 / rel)
    if "var/lib/dpkg/status" in by_rel:
        ensure_parents(rootfs, l1, "var/lib/dpkg/status")
        link(rootfs / "var/lib/dpkg/status", l1 / "var/lib/dpkg/status")
    doc = rootfs / "usr/share/doc"
    whited_dirs: list[str] = []
    if doc.is_dir():
        pkgs = sorted(
            n
            for n in os.listdir(doc)
            if (doc / n).is_dir() and not (doc / n).is_symlink() and "python" not in n
        )
        for n in pkgs[::2]:
            rel = f"usr/share/doc/{n}"
            if os.path.lexists(l1 / rel):
                continue
            ensure_parents(rootfs, l1, rel)
            make_whiteout(l1 / rel)
            whited_dirs.append(rel + "/")
    for opaque_dir, layer in (("etc/alternatives", l1), ("etc/apt", l0)):
        if opaque_dir not in by_rel:
            continue
        ensure_parents(rootfs, layer, opaque_dir + "/x")
        os.setxattr(layer / opaque_dir, OPAQUE_XATTR, b"y")
        prefix = opaque_dir + "/"
        for rel, st in entries:
            if rel.startswith(prefix):
                if stat.S_ISDIR(st.st_mode):
                    mkdir_like(layer / rel, st)
                elif not os.path.lexists(layer / rel):
                    link(rootfs / rel, layer / rel)

    # l0: the application, a new hostname, whiteouts spread over usr/share
    rng = random.Random(0)
    for i in range(300):
        p = l0 / f"opt/app/pkg{i // 30:02d}/mod{i:03d}.py"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"# generated\n" + rng.randbytes(rng.randint(200, 8000)).hex().encode())
    (l0 / "etc").mkdir(exist_ok=True)
    (l0 / "etc/hostname").write_text("bench\n")
    shared = [
        rel
        for rel, st in entries
        if rel.startswith("usr/share/")
        and stat.S_ISREG(st.st_mode)
        and rel not in python
        and not any(rel.startswith(w) for w in whited_dirs)
    ]
    for rel in shared[::25]:
        ensure_parents(rootfs, l0, rel)
        make_whiteout(l0 / rel)
    return {"files": files, "w7_count": sizes.w7_files}


def to_unionfs(src: Path, dst: Path) -> None:
    """Copy a kernel-format layer into unionfs-fuse's format (hard links for files)."""
    mkdir_like(dst, os.lstat(src))

    def hide(rel: str) -> None:
        p = dst / UNIONFS_META / (rel + UNIONFS_HIDETAG)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.touch()

    for rel, st in walk(src):
        if stat.S_ISDIR(st.st_mode):
            mkdir_like(dst / rel, st)
            if is_opaque(src / rel):
                hide(rel)
        elif is_whiteout(st):
            hide(rel)
        else:
            link(src / rel, dst / rel)


def merge_layers(layers: list[Path], dest: Path) -> None:
    """The merged view of kernel-format `layers` (top first) as a tree of hard links."""

    def rec(dirs: list[Path], out: Path) -> None:
        seen: dict[str, tuple[int, os.stat_result]] = {}
        for i, d in enumerate(dirs):
            for name in os.listdir(d):
                if name not in seen:
                    seen[name] = (i, os.lstat(d / name))
            if is_opaque(d):
                break
        for name, (i, st) in sorted(seen.items()):
            if is_whiteout(st):
                continue
            if stat.S_ISDIR(st.st_mode):
                below = [dirs[i] / name]
                if not is_opaque(dirs[i] / name):
                    for d in dirs[i + 1 :]:
                        try:
                            lst = os.lstat(d / name)
                        except FileNotFoundError:
                            continue
                        if not stat.S_ISDIR(lst.st_mode):
                            break
                        below.append(d / name)
                        if is_opaque(d / name):
                            break
                mkdir_like(out / name, st)
                rec(below, out / name)
            else:
                link(dirs[i] / name, out / name)

    mkdir_like(dest, os.lstat(layers[0]))
    rec(list(layers), dest)


def make_tarball(rootfs: Path, dest: Path, size: int) -> None:
    """A tarball of real files from the root filesystem, about `size` bytes of contents."""
    total = 0
    tmp = dest.with_name(dest.name + ".tmp")
    entries = [(rel, st) for rel, st in walk(rootfs) if rel.startswith("usr/")]
    if not any(stat.S_ISREG(st.st_mode) and st.st_size for _, st in entries):
        raise RuntimeError(f"no files under {rootfs}/usr for the W8 tarball")
    with tarfile.open(tmp, "w") as tar:
        copy = 0
        while total < size:
            for rel, st in entries:
                if stat.S_ISDIR(st.st_mode) or stat.S_ISREG(st.st_mode) or stat.S_ISLNK(st.st_mode):
                    tar.add(rootfs / rel, arcname=f"copy{copy}/{rel}", recursive=False)
                    if stat.S_ISREG(st.st_mode):
                        total += st.st_size
                        if total >= size:
                            break
            copy += 1
    os.rename(tmp, dest)


def ensure_image(cache: Path, sizes: Sizes, source: str = "auto") -> Image:
    """The image for these sizes, built on first use."""
    cache.mkdir(parents=True, exist_ok=True)
    rootfs, src_name = ensure_rootfs(cache, source, sizes.generated_files)
    root = cache / "images" / f"v{FORMAT}-{src_name}-{sizes.key()}"
    if (root / "image.json").exists():
        return Image.load(root)
    log(f"building the image {root.name} (once)")
    t0 = time.monotonic()
    tmp = root.with_name(root.name + f".tmp{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    meta = build_layers(rootfs, tmp / "kernel", cache, sizes)
    kernel = [tmp / "kernel" / f"l{i}" for i in range(N_LAYERS)]
    (tmp / "unionfs").mkdir()
    for i, layer in enumerate(kernel):
        to_unionfs(layer, tmp / "unionfs" / f"l{i}")
    merge_layers(kernel, tmp / "merged")
    make_tarball(rootfs, tmp / "w8.tar", sizes.w8_bytes)
    merged = tmp / "merged"
    meta.update(
        source=src_name,
        has_true=os.path.lexists(merged / "usr/bin/true") or os.path.lexists(merged / "bin/true"),
        has_python=os.path.lexists(merged / "usr/bin/python3"),
        counts=[_count(layer) for layer in kernel],
    )
    (tmp / "image.json").write_text(json.dumps(meta, indent=1))
    if root.exists():
        shutil.rmtree(root)
    os.rename(tmp, root)
    log(f"image built in {time.monotonic() - t0:.1f} s")
    return Image.load(root)


# -- the mount-time stack ------------------------------------------------------------
@dataclass
class Stack:
    kernel_layers: list[Path]
    unionfs_layers: list[Path]
    files: int


def ensure_stack(cache: Path, n_files: int) -> Stack:
    """Three layers holding `n_files` empty files in directories of 1,000, with whiteouts
    in the top layer and an opaque directory in the middle one."""
    root = cache / "stacks" / f"v{FORMAT}-{n_files}"
    kernel = [root / "kernel" / f"l{i}" for i in range(N_LAYERS)]
    unionfs = [root / "unionfs" / f"l{i}" for i in range(N_LAYERS)]
    stack = Stack(kernel, unionfs, n_files)
    if (root / "done").exists():
        return stack
    log(f"building the mount-time stack of {n_files} files (once)")
    if root.exists():
        shutil.rmtree(root)
    bounds = [0, int(n_files * 0.6), int(n_files * 0.85), n_files]  # l2, l1, l0
    for li, layer in zip((2, 1, 0), (kernel[2], kernel[1], kernel[0]), strict=True):
        layer.mkdir(parents=True)
        lo, hi = bounds[2 - li], bounds[3 - li]
        for i in range(lo, hi):
            d = layer / f"d{i // 1000:04d}"
            if i == lo or i % 1000 == 0:
                d.mkdir(exist_ok=True)
            os.close(os.open(d / f"f{i:07d}", os.O_CREAT | os.O_WRONLY, 0o644))
    for i in range(0, bounds[1], 100):
        d = kernel[0] / f"d{i // 1000:04d}"
        d.mkdir(exist_ok=True)
        make_whiteout(d / f"f{i:07d}")
    opq = kernel[1] / "d0000"
    opq.mkdir(exist_ok=True)
    os.setxattr(opq, OPAQUE_XATTR, b"y")
    for k, u in zip(kernel, unionfs, strict=True):
        u.parent.mkdir(parents=True, exist_ok=True)
        to_unionfs(k, u)
    (root / "done").touch()
    return stack
