"""Kernel overlayfs as the oracle: layer stacks from specs, mounts that always go away, snapshots.

The differential tests (test_differential_read.py, test_differential_write.py)
describe a stack of layers as immutable spec objects, write it to disk twice
(once as generated, with every marker format docs/formats.md lists, and once converted
to the kernel's format, which is all kernel overlayfs reads), mount it with
kernel overlayfs and with pyunion, and compare *snapshots* of the merged trees.

A snapshot records, for every name: type, mode, owner, size, contents,
symlink target, xattrs (less trusted.overlay.*, which the kernel hides and
pyunion must hide too), rdev of devices, nlink of non-directories and an
mtime normalised so that fixed, old timestamps (set by the generator or by a
utime operation) compare exactly while timestamps of "now" compare as
"recent". It also records st_ino and readdir's d_ino, from which inode
sharing (which names are one object) is compared.

Conversion of the OCI format follows the OCI rule that a `.wh.NAME` or a
`.wh..wh..opq` hides only what lies in the layers *below* its own: a `.wh.NAME`
next to a NAME of the same layer becomes nothing when NAME is not a directory
(it hides everything below anyway) and an opaque NAME when it is one.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import hashlib
import os
import shutil
import stat
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from support import force_unmount

# --------------------------------------------------------------------------------------------
# Environment and mounts are in support.py (kernel_overlay with its pinned options,
# pyunion_mount, kernel_overlay_skip_reason).


def settings_for(default_examples: int) -> settings:
    """Deterministic hypothesis settings; PYUNION_EXAMPLES=N runs N examples instead.

    The examples are the same every run; PYUNION_RANDOM=1 draws new ones, from
    pytest's `--hypothesis-seed=N` when given (so that a failure found can be run
    again). Shrinking a failure costs minutes (every step mounts); CI (CI=true) or
    PYUNION_SHRINK=0 reports the first failing example as found.
    """
    n = int(os.environ.get("PYUNION_EXAMPLES", default_examples))
    fixed = os.environ.get("PYUNION_RANDOM", "0") == "0"
    shrink = os.environ.get("PYUNION_SHRINK", "0" if os.environ.get("CI") else "1") != "0"
    phases = [Phase.explicit, Phase.reuse, Phase.generate] + ([Phase.shrink] if shrink else [])
    return settings(
        max_examples=n,
        phases=phases,
        derandomize=fixed,
        deadline=None,
        database=None,
        print_blob=False,
        suppress_health_check=[
            HealthCheck.too_slow,
            HealthCheck.data_too_large,
            HealthCheck.function_scoped_fixture,
        ],
    )


# --------------------------------------------------------------------------------------------
# Layer specs.

BASE_TIME_NS = 978_307_200_123_456_789  # 2001-01-01, with nanoseconds to test precision
RECENT_NS = 1_500_000_000 * 10**9  # anything after 2017 is "now" for the comparison

Xattrs = tuple[tuple[str, bytes], ...]


@dataclass(frozen=True)
class Meta:
    mode: int
    uid: int = 0
    gid: int = 0
    xattrs: Xattrs = ()
    mtime_ns: int = BASE_TIME_NS


@dataclass(frozen=True)
class File:
    data: bytes
    meta: Meta


@dataclass(frozen=True)
class Symlink:
    target: str
    uid: int = 0
    gid: int = 0


@dataclass(frozen=True)
class Special:
    """A fifo, socket, or character or block device (never 0/0: that is a whiteout)."""

    kind: str  # "fifo" | "sock" | "chr" | "blk"
    meta: Meta
    rdev: tuple[int, int] = (0, 0)


@dataclass(frozen=True)
class HardLink:
    """Another name for an earlier File of the same layer (path from the layer root)."""

    target: tuple[str, ...]


@dataclass(frozen=True)
class Whiteout:
    """A whiteout as a node: "kernel" (char 0/0) or "xattr" (a zero-size file with
    trusted.overlay.whiteout in a directory marked trusted.overlay.opaque=x)."""

    style: str = "kernel"


@dataclass(frozen=True)
class Dir:
    children: tuple[tuple[str, Node], ...]
    meta: Meta
    # None, or how the directory is marked opaque: "kernel" (trusted.overlay.opaque=y),
    # "oci" (.wh..wh..opq), "user" (user.overlay.opaque=y), "fuseoverlayfs"
    # (user.fuseoverlayfs.opaque=y), "whopq" (char 0/0 named .wh..opq).
    opaque: str | None = None
    # Names with an OCI whiteout file `.wh.NAME` here; NAME may also be a child.
    oci_whiteouts: tuple[str, ...] = ()
    # AUFS metadata (.wh..wh.aufs, .wh..wh.plnk/) that must never show.
    aufs: bool = False


Node = File | Symlink | Special | HardLink | Whiteout | Dir

OPAQUE_XATTR = {
    "kernel": "trusted.overlay.opaque",
    "user": "user.overlay.opaque",
    "fuseoverlayfs": "user.fuseoverlayfs.opaque",
}


def _set_times(path: Path, mtime_ns: int) -> None:
    os.utime(path, ns=(mtime_ns, mtime_ns), follow_symlinks=False)


def _apply_meta(path: Path, meta: Meta, extra_xattrs: Xattrs = ()) -> None:
    os.chown(path, meta.uid, meta.gid, follow_symlinks=False)
    os.chmod(path, meta.mode)  # after chown, which clears set-id bits
    for k, v in (*meta.xattrs, *extra_xattrs):
        os.setxattr(path, k, v, follow_symlinks=False)
    _set_times(path, meta.mtime_ns)


def _kernel_whiteout(path: Path) -> None:
    os.mknod(path, stat.S_IFCHR | 0o600, os.makedev(0, 0))


def build_layer(root: Path, spec: Dir, kernel: bool) -> None:
    """Write one layer. kernel=True converts every marker to the kernel format."""
    root.mkdir(parents=True, exist_ok=True)
    _build_dir(root, root, spec, kernel, is_root=True, force_opaque=False)


def _build_dir(
    layer: Path, path: Path, spec: Dir, kernel: bool, is_root: bool, force_opaque: bool
) -> None:
    names = {n for n, _ in spec.children}
    extra: list[tuple[str, bytes]] = []
    has_xwhiteout = any(isinstance(c, Whiteout) and c.style == "xattr" for _, c in spec.children)
    for name, child in spec.children:
        p = path / name
        if isinstance(child, Dir):
            p.mkdir()
            opq = kernel and name in spec.oci_whiteouts  # OCI: .wh.NAME next to a dir NAME
            _build_dir(layer, p, child, kernel, is_root=False, force_opaque=opq)
        elif isinstance(child, File):
            p.write_bytes(child.data)
            _apply_meta(p, child.meta)
        elif isinstance(child, Symlink):
            os.symlink(child.target, p)
            os.chown(p, child.uid, child.gid, follow_symlinks=False)
            _set_times(p, BASE_TIME_NS)
        elif isinstance(child, Special):
            fmt = {
                "fifo": stat.S_IFIFO,
                "sock": stat.S_IFSOCK,
                "chr": stat.S_IFCHR,
                "blk": stat.S_IFBLK,
            }[child.kind]
            os.mknod(p, fmt | 0o600, os.makedev(*child.rdev))
            _apply_meta(p, child.meta)
        elif isinstance(child, HardLink):
            os.link(layer.joinpath(*child.target), p, follow_symlinks=False)
        elif isinstance(child, Whiteout):
            # An xattr whiteout is one only in a directory marked "x", which an opaque
            # ("y") directory cannot be: there it is written in the kernel format.
            if child.style == "xattr" and not kernel and spec.opaque != "kernel":
                p.write_bytes(b"")
                os.setxattr(p, "trusted.overlay.whiteout", b"")
                _set_times(p, BASE_TIME_NS)
            else:
                _kernel_whiteout(p)
        else:
            raise TypeError(child)
    for name in spec.oci_whiteouts:
        if not kernel:
            (path / f".wh.{name}").write_bytes(b"")
        elif name not in names:
            _kernel_whiteout(path / name)
        # else: a NAME of this layer hides the layers below by itself (a directory was
        # made opaque above).
    if spec.aufs and not kernel:
        (path / ".wh..wh.aufs").write_bytes(b"")
        (path / ".wh..wh.plnk").mkdir()
        (path / ".wh..wh.plnk" / "1234.5678").write_bytes(b"x")
    if has_xwhiteout and not kernel and spec.opaque != "kernel":
        extra.append(("trusted.overlay.opaque", b"x"))
    opaque = spec.opaque
    if kernel and (opaque is not None or force_opaque):
        extra.append(("trusted.overlay.opaque", b"y"))
    elif opaque in OPAQUE_XATTR:
        extra.append((OPAQUE_XATTR[opaque], b"y"))
    elif opaque == "oci":
        (path / ".wh..wh..opq").write_bytes(b"")
    elif opaque == "whopq":
        _kernel_whiteout(path / ".wh..opq")
    _apply_meta(path, spec.meta, tuple(extra))


def build_stack(base: Path, layers: Sequence[Dir], kernel: bool) -> list[Path]:
    """Write LAYERS (top first) under BASE as L0 (top), L1, ...; return their paths."""
    return build_batch(base, [layers], kernel)


def build_batch(base: Path, stacks: Sequence[Sequence[Dir]], kernel: bool) -> list[Path]:
    """Several independent stacks in one set of layers, so that one mount tests them all.

    The first stack owns the layer roots; stack i > 0 lives in directory `s{i}` of each
    layer it has. Layers are aligned at the top: layer j of every stack is in Lj.
    """
    depth = max(len(s) for s in stacks)
    paths = []
    for j in range(depth):
        p = base / f"L{j}"
        if j < len(stacks[0]):
            build_layer(p, stacks[0][j], kernel)
        else:
            p.mkdir(parents=True)
        for i, stack in enumerate(stacks[1:], 1):
            if j < len(stack):
                build_layer(p / f"s{i}", stack[j], kernel)
        paths.append(p)
    for j, p in enumerate(paths):  # making s{i} moved the root's mtime
        _set_times(p, stacks[0][j].meta.mtime_ns if j < len(stacks[0]) else BASE_TIME_NS)
    return paths


# --------------------------------------------------------------------------------------------
# Hypothesis strategies for layers.

NAMES = ("a", "b", "c")
FILE_MODES = (0o644, 0o600, 0o755, 0o444, 0o4755, 0o2751, 0o1644, 0o000)
DIR_MODES = (0o755, 0o700, 0o555, 0o1777, 0o2775, 0o000)
OWNERS = ((0, 0), (1000, 1000), (0, 1234), (65534, 65534))
XATTR_NAMES = ("user.one", "user.two", "trusted.three")
XATTR_VALUES = (b"", b"v", b"\x00bin\xff", b"long" * 40)
DATAS = (b"", b"x", b"hello\n", b"\x00" * 100 + b"end", b"z" * 5000)
SYMLINK_TARGETS = ("a", "b/c", "zz", "c/a/b", ".")  # relative and downward: never escape
TIMES = (BASE_TIME_NS, BASE_TIME_NS + 86_400 * 10**9 + 1, 1_000_000_000 * 10**9)


def _weighted(*pairs: tuple[int, object]) -> st.SearchStrategy:
    return st.sampled_from([v for n, v in pairs for _ in range(n)])


def meta_st(modes: Sequence[int], xattrs_ok: bool = True) -> st.SearchStrategy[Meta]:
    owner = st.sampled_from(OWNERS)
    xattrs = st.dictionaries(
        st.sampled_from(XATTR_NAMES), st.sampled_from(XATTR_VALUES), max_size=2 if xattrs_ok else 0
    ).map(lambda d: tuple(sorted(d.items())))
    return st.builds(
        lambda m, o, x, t: Meta(m, o[0], o[1], x, t),
        st.sampled_from(modes),
        owner,
        xattrs,
        st.sampled_from(TIMES),
    )


@st.composite
def layer_st(
    draw: st.DrawFn,
    max_depth: int = 3,
    hardlinks: bool = True,
    formats: bool = True,
    devices: bool = True,
) -> Dir:
    """One layer. formats=False keeps to the kernel format (no OCI, no exotic markers);
    devices=False leaves out device nodes (for tests that open what they find)."""
    files: list[tuple[str, ...]] = []

    def node(path: tuple[str, ...]) -> Node:
        kinds: list[tuple[int, str]] = [
            (4, "file"),
            (2, "whiteout"),
            (1, "symlink"),
            (1, "special"),
        ]
        if len(path) < max_depth:
            kinds.append((4, "dir"))
        if hardlinks and files:
            kinds.append((2, "link"))
        kind = draw(_weighted(*kinds))
        if kind == "file":
            files.append(path)
            return File(
                draw(st.sampled_from(DATAS) | st.binary(max_size=20)), draw(meta_st(FILE_MODES))
            )
        if kind == "dir":
            return directory(path)
        if kind == "symlink":
            o = draw(st.sampled_from(OWNERS))
            return Symlink(draw(st.sampled_from(SYMLINK_TARGETS)), o[0], o[1])
        if kind == "special":
            k = draw(
                st.sampled_from(
                    ("fifo", "fifo", "sock", "chr", "blk") if devices else ("fifo", "sock")
                )
            )
            rdev = {"chr": (1, 3), "blk": (7, 0)}.get(k, (0, 0))
            return Special(k, draw(meta_st((0o644, 0o600, 0o666), xattrs_ok=False)), rdev)
        if kind == "link":
            return HardLink(draw(st.sampled_from(files)))
        style = draw(_weighted((1, "kernel"), (1, "xattr"))) if formats else "kernel"
        return Whiteout(style)

    def directory(path: tuple[str, ...]) -> Dir:
        children = []
        for name in NAMES:
            if draw(st.booleans()):
                children.append((name, node((*path, name))))
        meta = draw(meta_st(DIR_MODES))
        opaque = None
        oci: tuple[str, ...] = ()
        aufs = False
        if formats:
            oci = tuple(n for n in NAMES if draw(_weighted((4, False), (1, True))))
            if path:  # an opaque layer root means nothing to the kernel
                opaque = draw(
                    _weighted(
                        (6, None),
                        (2, "kernel"),
                        (2, "oci"),
                        (1, "user"),
                        (1, "fuseoverlayfs"),
                        (1, "whopq"),
                    )
                )
            else:
                aufs = draw(_weighted((5, False), (1, True)))
        elif path:
            opaque = draw(_weighted((3, None), (1, "kernel")))
        return Dir(tuple(children), meta, opaque, oci, aufs)

    return directory(())


def stack_st(min_layers: int = 1, max_layers: int = 4, **kw: bool | int) -> st.SearchStrategy:
    """A stack of layers, top first."""
    return st.lists(layer_st(**kw), min_size=min_layers, max_size=max_layers)


# --------------------------------------------------------------------------------------------
# Snapshots.

BIG = 4096


@dataclass(frozen=True)
class Entry:
    kind: str
    mode: int
    uid: int
    gid: int
    size: int | None = None
    nlink: int | None = None
    data: bytes | str | None = None  # contents, or a sha256 for big files
    target: str | None = None
    rdev: tuple[int, int] | None = None
    xattrs: Xattrs = ()
    mtime: int | str | None = None
    # A directory's st_nlink: 1 where it is merged, its layer's own elsewhere (the
    # kernel's rule); a plain copy cannot show that (PLAIN_IGNORE).
    dirlinks: int | None = None


# What a plain directory copy of a merged view cannot reproduce.
PLAIN_IGNORE = ("dirlinks",)


@dataclass
class Snapshot:
    entries: dict[str, Entry] = field(default_factory=dict)
    inos: dict[str, int] = field(default_factory=dict)
    dinos: dict[str, int] = field(default_factory=dict)
    # Names readdir listed but lstat could not find. Kernel overlayfs lists the whiteouts
    # of a directory that is not merged (it reads such a directory straight from its
    # layer); its lookup then fails. pyunion must never do that.
    ghosts: list[str] = field(default_factory=list)

    def sharing(self) -> frozenset[frozenset[str]]:
        """Groups of names (two or more) that are one object."""
        by: dict[int, set[str]] = {}
        for p, ino in self.inos.items():
            by.setdefault(ino, set()).add(p)
        return frozenset(frozenset(s) for s in by.values() if len(s) > 1)


_KINDS = {
    stat.S_IFDIR: "dir",
    stat.S_IFREG: "file",
    stat.S_IFLNK: "symlink",
    stat.S_IFIFO: "fifo",
    stat.S_IFSOCK: "sock",
    stat.S_IFCHR: "chr",
    stat.S_IFBLK: "blk",
}


def _xattrs(path: str) -> Xattrs:
    out = []
    for k in os.listxattr(path, follow_symlinks=False):
        if k.startswith("trusted.overlay."):
            continue
        out.append((k, os.getxattr(path, k, follow_symlinks=False)))
    return tuple(sorted(out))


def entry_of(path: str, st_: os.stat_result | None = None, times: bool = True) -> Entry:
    s = st_ or os.lstat(path)
    kind = _KINDS[stat.S_IFMT(s.st_mode)]
    data: bytes | str | None = None
    target = None
    rdev = None
    if kind == "file":
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        try:
            chunks = []
            while chunk := os.read(fd, 1 << 20):
                chunks.append(chunk)
        finally:
            os.close(fd)
        raw = b"".join(chunks)
        data = raw if len(raw) <= BIG else "sha256:" + hashlib.sha256(raw).hexdigest()
    elif kind == "symlink":
        target = os.readlink(path)
    elif kind in ("chr", "blk"):
        rdev = (os.major(s.st_rdev), os.minor(s.st_rdev))
    mtime: int | str | None = None
    if times:
        mtime = s.st_mtime_ns if s.st_mtime_ns < RECENT_NS else "recent"
    return Entry(
        kind=kind,
        mode=stat.S_IMODE(s.st_mode),
        uid=s.st_uid,
        gid=s.st_gid,
        size=None if kind == "dir" else s.st_size,
        nlink=None if kind == "dir" else s.st_nlink,
        data=data,
        target=target,
        rdev=rdev,
        xattrs=_xattrs(path),
        mtime=mtime,
        dirlinks=s.st_nlink if kind == "dir" else None,
    )


def snapshot(root: Path, times: bool = True, skip: Sequence[str] = ()) -> Snapshot:
    """Everything comparable about the tree under ROOT (paths relative, root is ".")."""
    snap = Snapshot()
    snap.entries["."] = entry_of(str(root), times=times)
    snap.inos["."] = os.lstat(root).st_ino

    def walk(d: str, rel: str) -> None:
        with os.scandir(d) as it:
            ents = sorted(it, key=lambda e: e.name)
        for e in ents:
            r = e.name if rel == "." else f"{rel}/{e.name}"
            if r in skip:
                continue
            try:
                s = os.lstat(e.path)
            except FileNotFoundError:
                snap.ghosts.append(r)
                continue
            snap.entries[r] = entry_of(e.path, s, times=times)
            snap.inos[r] = s.st_ino
            snap.dinos[r] = e.inode()
            if stat.S_ISDIR(s.st_mode):
                walk(e.path, r)

    walk(str(root), ".")
    return snap


def diff(
    expected: Snapshot, actual: Snapshot, ignore: Sequence[str] = (), sharing: bool = True
) -> list[str]:
    """Human-readable differences; ignore names Entry fields not to compare."""
    out = []
    for p in sorted(set(expected.entries) | set(actual.entries)):
        e, a = expected.entries.get(p), actual.entries.get(p)
        if e is None:
            out.append(f"{p}: unexpected {a}")
        elif a is None:
            out.append(f"{p}: missing, expected {e}")
        else:
            for f in Entry.__dataclass_fields__:
                if f in ignore:
                    continue
                ev, av = getattr(e, f), getattr(a, f)
                if ev != av:
                    if f == "mode":
                        ev, av = oct(ev), oct(av)
                    out.append(f"{p}: {f} expected {ev!r}, got {av!r}")
    if sharing:
        es, as_ = expected.sharing(), actual.sharing()
        common = set(expected.entries) & set(actual.entries)
        es = frozenset(g & common for g in es if len(g & common) > 1)
        as_ = frozenset(g & common for g in as_ if len(g & common) > 1)
        if es != as_:
            out.append(
                f"inode sharing: expected {sorted(map(sorted, es))}, got {sorted(map(sorted, as_))}"
            )
    return out


def assert_same(
    expected: Snapshot,
    actual: Snapshot,
    what: str,
    ignore: Sequence[str] = (),
    sharing: bool = True,
) -> None:
    d = diff(expected, actual, ignore, sharing)
    if d:
        shown = "\n  ".join(d[:40]) + ("\n  ..." if len(d) > 40 else "")
        raise AssertionError(f"{what}: {len(d)} difference(s)\n  {shown}")


def dino_mismatches(snap: Snapshot) -> list[str]:
    """Names whose readdir d_ino differs from their lstat st_ino."""
    return [
        f"{p}: d_ino {snap.dinos[p]} != st_ino {snap.inos[p]}"
        for p in snap.dinos
        if snap.dinos[p] != snap.inos[p]
    ]


def copy_tree(src: Path, dst: Path) -> None:
    """A plain-directory copy of a merged view: the third oracle, for what pyunion does
    better than the kernel. Copies type, data, owner, mode, xattrs, mtime and hard links."""
    seen: dict[int, Path] = {}

    def meta(s: os.stat_result, sp: str, dp: Path) -> None:
        os.chown(dp, s.st_uid, s.st_gid, follow_symlinks=False)
        if not stat.S_ISLNK(s.st_mode):
            os.chmod(dp, stat.S_IMODE(s.st_mode))
        for k, v in _xattrs(sp):
            os.setxattr(dp, k, v, follow_symlinks=False)
        os.utime(dp, ns=(s.st_atime_ns, s.st_mtime_ns), follow_symlinks=False)

    def one(sp: str, dp: Path) -> None:
        s = os.lstat(sp)
        m = s.st_mode
        if stat.S_ISDIR(m):
            dp.mkdir()
            with os.scandir(sp) as it:
                names = sorted(e.name for e in it)
            for n in names:
                # FileNotFoundError: a whiteout the kernel listed (see Snapshot.ghosts).
                with contextlib.suppress(FileNotFoundError):
                    one(os.path.join(sp, n), dp / n)
            meta(s, sp, dp)
            return
        if s.st_nlink > 1 and s.st_ino in seen:
            os.link(seen[s.st_ino], dp, follow_symlinks=False)
            return
        seen[s.st_ino] = dp
        if stat.S_ISREG(m):
            with open(sp, "rb") as f, open(dp, "wb") as g:
                shutil.copyfileobj(f, g)
        elif stat.S_ISLNK(m):
            os.symlink(os.readlink(sp), dp)
        else:
            os.mknod(dp, stat.S_IFMT(m) | 0o600, s.st_rdev)
        meta(s, sp, dp)

    one(str(src), dst)


# --------------------------------------------------------------------------------------------
# Raw upper checks and small syscall helpers.

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
AT_FDCWD = -100
AT_SYMLINK_NOFOLLOW = 0x100
AT_EACCESS = 0x200
RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
RENAME_WHITEOUT = 4
UTIME_NOW = (1 << 30) - 1
UTIME_OMIT = (1 << 30) - 2


def _check(r: int, what: str = "") -> int:
    if r < 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e), what)
    return r


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


def utimensat(path: str | Path, atime: int | str, mtime: int | str, flags: int = 0) -> None:
    """Times as ns, or "now"/"omit" (UTIME_NOW, UTIME_OMIT)."""

    def ts(t: int | str) -> _Timespec:
        if t == "now":
            return _Timespec(0, UTIME_NOW)
        if t == "omit":
            return _Timespec(0, UTIME_OMIT)
        assert isinstance(t, int)
        return _Timespec(t // 10**9, t % 10**9)

    arr = (_Timespec * 2)(ts(atime), ts(mtime))
    _check(_libc.utimensat(AT_FDCWD, os.fsencode(path), arr, flags), str(path))


def faccessat(path: str | Path, mode: int, flags: int) -> None:
    _check(_libc.faccessat(AT_FDCWD, os.fsencode(path), mode, flags), str(path))


def renameat2(src: str | Path, dst: str | Path, flags: int = 0) -> None:
    r = _libc.renameat2(
        AT_FDCWD, os.fsencode(src), AT_FDCWD, os.fsencode(dst), ctypes.c_uint(flags)
    )
    if r != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e), str(src))


def is_kernel_whiteout(path: str | Path) -> bool:
    try:
        s = os.lstat(path)
    except FileNotFoundError:
        return False
    return stat.S_ISCHR(s.st_mode) and s.st_rdev == 0


def upper_problems(upper: Path, lowers: Sequence[Path]) -> list[str]:
    """What docs/formats.md forbids in an upper: whiteouts inside opaque directories,
    whiteouts of names no lower layer has, OCI markers (as root the kernel format must be
    written)."""
    out = []
    for dirpath, dirnames, filenames in os.walk(upper):
        rel = os.path.relpath(dirpath, upper)
        try:
            opaque = os.getxattr(dirpath, "trusted.overlay.opaque") == b"y"
        except OSError:
            opaque = False
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            r = name if rel == "." else f"{rel}/{name}"
            if name.startswith(".wh."):
                out.append(f"{r}: OCI marker written by a root mount")
            if not is_kernel_whiteout(p):
                continue
            if opaque:
                out.append(f"{r}: whiteout inside an opaque directory")
            if not any(os.path.lexists(lo / r) and not is_kernel_whiteout(lo / r) for lo in lowers):
                out.append(f"{r}: whiteout of a name no lower layer has")
    return out


def errno_name(e: int) -> str:
    return errno.errorcode.get(e, str(e))


def rmtree(path: Path) -> None:
    """Remove a test tree even where modes (0o000 dirs) or mounts would stop shutil."""
    if not path.exists():
        return
    for dirpath, _, _ in os.walk(path):
        force_unmount(dirpath)
    shutil.rmtree(path, ignore_errors=True)
