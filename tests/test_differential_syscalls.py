"""Single syscalls and their edge cases against kernel overlayfs, scenario by scenario.

The hypothesis tests (test_differential_write.py) cover random sequences of the
common operations. This module covers what they do not: renameat2 flags,
O_TMPFILE, utimensat's UTIME_OMIT/UTIME_NOW, xattr namespaces, POSIX ACLs,
SEEK_DATA/SEEK_HOLE, copy_file_range/sendfile, mmap, directory nlink, readdir
positions, statfs, syncs, access() as a user, sticky directories, open flags,
long names and odd bytes in names.

Each scenario runs twice, on kernel overlayfs and on pyunion, each over the
same lower layers (made once per scenario; they never change) with an upper
of its own. A scenario records observations through a `Probe`: results or
errno names, stat fields (times as "recent" unless fixed by the test, st_ino
and st_dev as classes in order of first appearance, so that "the same object
as before" compares across the two), names, data. After it, the merged views
and the uppers' on-disk form (whiteouts, trusted.overlay.opaque, copied-up
metadata; trusted.overlay.origin and impure, which pyunion does not write, left
out: docs/semantics.md) are compared too.

Where pyunion differs on purpose or cannot do what the kernel does over FUSE
(docs/semantics.md), the scenario names the observation in `DOCUMENTED` with
both values: the test then checks that each side still does what is written.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import fcntl
import hashlib
import mmap
import os
import socket
import stat
import struct
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import oracle as o
import pytest
from support import (
    as_user,
    force_unmount,
    kernel_overlay,
    kernel_overlay_skip_reason,
    pyunion_mount,
)

pytestmark = pytest.mark.skipif(
    kernel_overlay_skip_reason() is not None, reason=kernel_overlay_skip_reason() or ""
)

T0 = o.BASE_TIME_NS
T1 = o.BASE_TIME_NS + 3 * 86_400 * 10**9 + 7
_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)


_check = o._check


# -- syscalls Python does not wrap -------------------------------------------------------------
RENAME_NOREPLACE, RENAME_EXCHANGE, RENAME_WHITEOUT = (
    o.RENAME_NOREPLACE,
    o.RENAME_EXCHANGE,
    o.RENAME_WHITEOUT,
)
AT_FDCWD, AT_SYMLINK_NOFOLLOW, AT_EACCESS = o.AT_FDCWD, o.AT_SYMLINK_NOFOLLOW, o.AT_EACCESS
AT_EMPTY_PATH = 0x1000
SEEK_DATA, SEEK_HOLE = 3, 4
O_TMPFILE = getattr(os, "O_TMPFILE", 0o20200000)


utimensat = o.utimensat
faccessat = o.faccessat


def renameat2(a: Path, b: Path, flags: int) -> None:
    o.renameat2(a, b, flags)


# -- the probe ---------------------------------------------------------------------------------
class Probe:
    """What a scenario saw, in order: (label, value)."""

    def __init__(self, root: Path, devs: bool = True) -> None:
        self.r = root
        self.devs = devs  # st_dev compared (not with layers on two filesystems)
        self.log: list[tuple[str, Any]] = []
        self._inos: dict[int, int] = {}
        self._devs: dict[int, int] = {}

    def note(self, label: str, value: Any) -> None:
        assert all(label != k for k, _ in self.log), f"label {label!r} twice (harness)"
        self.log.append((label, value))

    def do(self, label: str, fn: Callable[[], Any]) -> Any:
        """Run FN; note its result, or the errno's name. Returns the result (None on error)."""
        try:
            v = fn()
        except OSError as e:
            self.note(label, o.errno_name(e.errno))
            return None
        self.note(label, "ok" if v is None else v)
        return v

    def ino_class(self, ino: int) -> int:
        return self._inos.setdefault(ino, len(self._inos))

    def dev_class(self, dev: int) -> int:
        return self._devs.setdefault(dev, len(self._devs))

    def stat(self, label: str, rel: str | bytes, follow: bool = False, ctime: bool = False) -> None:
        """Note the fields overlayfs defines of REL; times exact only where tests fix them."""
        path = os.path.join(os.fsencode(self.r), os.fsencode(rel))
        try:
            s = os.stat(path, follow_symlinks=follow)
        except OSError as e:
            self.note(label, o.errno_name(e.errno))
            return
        self.note(label, self.fields(s, ctime))

    def fields(self, s: os.stat_result, ctime: bool = False) -> dict[str, Any]:
        def t(ns: int) -> int | str:
            return ns if ns < o.RECENT_NS else "recent"

        out = {
            "mode": oct(s.st_mode),
            "nlink": s.st_nlink,
            "uid": s.st_uid,
            "gid": s.st_gid,
            "size": s.st_size if not stat.S_ISDIR(s.st_mode) else None,
            "atime": t(s.st_atime_ns),
            "mtime": t(s.st_mtime_ns),
            "ino": self.ino_class(s.st_ino),
        }
        if self.devs:
            out["dev"] = self.dev_class(s.st_dev)
        if stat.S_ISCHR(s.st_mode) or stat.S_ISBLK(s.st_mode):
            out["rdev"] = (os.major(s.st_rdev), os.minor(s.st_rdev))
        if ctime:
            out["ctime"] = t(s.st_ctime_ns)
        return out

    def read(self, label: str, rel: str) -> None:
        self.do(label, lambda: (self.r / rel).read_bytes())

    def names(self, label: str, rel: str = ".") -> None:
        """readdir's names and d_type, sorted (the order is the filesystem's)."""

        def ls() -> list[tuple[bytes, str]]:
            with os.scandir(os.fsencode(self.r / rel)) as it:
                return sorted((e.name, _dtype(e)) for e in it)

        self.do(label, ls)

    def xattrs(self, label: str, rel: str, follow: bool = False) -> None:
        def get() -> list[tuple[str, bytes]]:
            p = self.r / rel
            return sorted(
                (k, os.getxattr(p, k, follow_symlinks=follow))
                for k in os.listxattr(p, follow_symlinks=follow)
            )

        self.do(label, get)

    def move_dir(self, a: Path, b: Path) -> str:
        """rename(2), and mv's copy and delete where it says EXDEV."""
        try:
            os.rename(a, b)
        except OSError as e:
            if e.errno != errno.EXDEV:
                raise
            subprocess.run(["mv", "-T", str(a), str(b)], check=True, timeout=60)
            return "EXDEV, mv copied"
        return "ok"


def _dtype(e: os.DirEntry[bytes]) -> str:
    if e.is_symlink():
        return "lnk"
    if e.is_dir(follow_symlinks=False):
        return "dir"
    if e.is_file(follow_symlinks=False):
        return "reg"
    return "other"


# -- lower layers ------------------------------------------------------------------------------
def _times(root: Path) -> None:
    for dirpath, dirnames, filenames in os.walk(root):
        for n in dirnames + filenames:
            os.utime(os.path.join(dirpath, n), ns=(T0, T0), follow_symlinks=False)
    os.utime(root, ns=(T0, T0))


def own_base_layers(td: Path, impl: str) -> list[Path]:
    """`base_layers` in two fresh directories of `impl`'s own under `td`, top first."""
    lowers = [td / f"{impl}-L0", td / f"{impl}-L1"]
    for lo in lowers:
        lo.mkdir()
    base_layers(*lowers)
    return lowers


def base_layers(top: Path, bottom: Path) -> None:
    """The common stack. bottom: files, a directory with xattrs, a symlink, a sparse file,
    a sticky directory; top: a merged directory, a whiteout, a directory of its own."""
    (bottom / "f").write_bytes(b"lower data\n")
    os.setxattr(bottom / "f", "user.x", b"lx")
    os.setxattr(bottom / "f", "trusted.t", b"tt")
    (bottom / "g").write_bytes(b"other lower\n")
    (bottom / "ro").write_bytes(b"read only\n")
    os.chmod(bottom / "ro", 0o444)
    os.symlink("f", bottom / "sym")
    (bottom / "d" / "sub").mkdir(parents=True)
    (bottom / "d" / "f").write_bytes(b"in d\n")
    (bottom / "d" / "sub" / "deep").write_bytes(b"deep\n")
    for n in ("f", "sub/deep"):  # an overlay's own xattr, escaped (nested overlays)
        os.setxattr(bottom / "d" / n, "trusted.overlay.overlay.esc", b"e")
    os.chmod(bottom / "d", 0o750)
    os.chown(bottom / "d", 1000, 1234)
    os.setxattr(bottom / "d", "user.d", b"dir xattr")
    (bottom / "m").mkdir()
    (bottom / "m" / "low").write_bytes(b"low\n")
    (bottom / "m" / "sdir").mkdir()
    (bottom / "gone").write_bytes(b"whited out\n")
    with open(bottom / "sparse", "wb") as f:
        f.write(b"head" * 1024)
        f.seek(1 << 20)
        f.write(b"tail" * 1024)
        f.truncate(3 << 20)
    (bottom / "tmp").mkdir()
    os.chmod(bottom / "tmp", 0o1777)
    for owner, n in ((1000, "u1000"), (1001, "u1001"), (0, "root")):
        (bottom / "tmp" / n).write_bytes(n.encode())
        os.chown(bottom / "tmp" / n, owner, owner)
    os.mkfifo(bottom / "fifo", 0o640)
    os.mknod(bottom / "null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    os.symlink("zz", bottom / "dangling")
    os.symlink("d/sub", bottom / "dirlink")
    (bottom / "sgid").mkdir()
    os.chown(bottom / "sgid", 0, 1234)
    os.chmod(bottom / "sgid", 0o2777)
    (bottom / "own").write_bytes(b"owned by 1000\n")
    os.chown(bottom / "own", 1000, 1000)
    os.chmod(bottom / "own", 0o640)
    (top / "m").mkdir()
    (top / "m" / "high").write_bytes(b"high\n")
    (top / "m" / "tdir").mkdir()
    os.mknod(top / "gone", stat.S_IFCHR | 0o600, os.makedev(0, 0))
    (top / "t").mkdir()
    (top / "t" / "tf").write_bytes(b"top only\n")
    # Hard links: four names of one lower file, one of them whited out above; two names
    # of a file of the top layer.
    (bottom / "hl").mkdir()
    (bottom / "hl" / "a").write_bytes(b"linked\n")
    for n in ("hl/b", "hl/c", "hla"):
        os.link(bottom / "hl" / "a", bottom / n)
    (top / "hl").mkdir()
    os.mknod(top / "hl" / "c", stat.S_IFCHR | 0o600, os.makedev(0, 0))
    (top / "hl" / "t1").write_bytes(b"top linked\n")
    os.link(top / "hl" / "t1", top / "hl" / "t2")
    for layer in (top, bottom):
        _times(layer)


# -- running a scenario on both ----------------------------------------------------------------
Scenario = Callable[[Probe], None]
SCENARIOS: dict[str, Scenario] = {}
UPPER_ON_TMPFS: set[str] = set()  # scenarios whose upper is on another filesystem
# scenario -> label -> (the kernel's value, pyunion's value): see the module docstring.
# "skip" leaves an observation out; "~view PATH" / "~upper PATH" leave a path of the
# merged view / the upper out, "~upper" the whole upper; ANY as the kernel's value
# checks pyunion's alone (where the kernel's depends on its version or the filesystem).
DOCUMENTED: dict[str, dict[str, Any]] = {}
ANY = object()


def scenario(fn: Scenario) -> Scenario:
    SCENARIOS[fn.__name__] = fn
    return fn


def _upper_form(upper: Path) -> dict[str, Any]:
    """The upper as stored: type, mode, owner, data, rdev, xattrs (the overlay's own
    markers included, but origin and impure), fixed mtimes."""
    out: dict[str, Any] = {}
    for dirpath, dirnames, filenames in os.walk(os.fsencode(upper)):
        for n in sorted(dirnames + filenames):
            p = os.path.join(dirpath, n)
            s = os.lstat(p)
            rel = os.path.relpath(p, os.fsencode(upper))
            kind = o._KINDS[stat.S_IFMT(s.st_mode)]
            e: dict[str, Any] = {
                "kind": kind,
                "mode": oct(stat.S_IMODE(s.st_mode)),
                "owner": (s.st_uid, s.st_gid),
                "mtime": s.st_mtime_ns if s.st_mtime_ns < o.RECENT_NS else "recent",
            }
            if kind == "file":
                with open(p, "rb") as f:
                    e["data"] = hashlib.sha256(f.read()).hexdigest()[:12]
                e["nlink"] = s.st_nlink
            if kind in ("chr", "blk"):
                e["rdev"] = (os.major(s.st_rdev), os.minor(s.st_rdev))
            e["xattrs"] = sorted(
                (k, os.getxattr(p, k, follow_symlinks=False))
                for k in os.listxattr(p, follow_symlinks=False)
                if k not in ("trusted.overlay.origin", "trusted.overlay.impure")
            )
            out[os.fsdecode(rel)] = e
    return out


def _run_on(impl: str, lowers: list[Path], td: Path, fn: Scenario) -> tuple[Probe, Any, Any]:
    base = td / f"{impl}-fs"
    base.mkdir()
    with contextlib.ExitStack() as stack:
        if fn.__name__ in UPPER_ON_TMPFS:
            subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(base)], check=True, timeout=30)
            stack.callback(force_unmount, base)
        up, work, mnt = base / "u", base / "w", td / f"{impl}-m"
        up.mkdir()
        work.mkdir()
        mount = kernel_overlay if impl == "kernel" else pyunion_mount
        with mount(lowers, mnt, up, work) as m:
            p = Probe(m, devs=fn.__name__ not in UPPER_ON_TMPFS)
            old = os.umask(0o022)
            try:
                fn(p)
            finally:
                os.umask(old)
            view = o.snapshot(m)
        return p, view, _upper_form(up)


def run_scenario(name: str) -> None:
    fn = SCENARIOS[name]
    with tempfile.TemporaryDirectory(prefix="pyunion-dsys-") as t:
        td = Path(t)
        os.chmod(td, 0o755)  # scenarios run as users too
        try:
            # Layers of their own for each: a read through the kernel's mount changes
            # the atime of a lower file.
            runs = []
            for impl in ("kernel", "pyunion"):
                lowers = own_base_layers(td, impl)
                runs.append(_run_on(impl, lowers, td, fn))
            (kp, kview, kupper), (pp, pview, pupper) = runs
        finally:
            o.rmtree(td)
    documented = DOCUMENTED.get(name, {})
    diffs = []
    plog = dict(pp.log)
    assert [k for k, _ in kp.log] == [k for k, _ in pp.log], "labels differ (harness)"
    for label, kv in kp.log:
        pv = plog[label]
        if documented.get(label) == "skip":
            continue
        if label in documented:
            dk, dp = documented[label]
            if pv != dp or (dk is not ANY and kv != dk):
                diffs.append(
                    f"{label}: documented kernel {dk!r} / pyunion {dp!r}, "
                    f"got kernel {kv!r} / pyunion {pv!r}"
                )
        elif kv != pv:
            diffs.append(f"{label}: kernel {kv!r}, pyunion {pv!r}")
    # With two filesystems the kernel's st_ino collide (identity_across_filesystems).
    sharing = name not in UPPER_ON_TMPFS
    for d in o.diff(kview, pview, sharing=sharing):
        skip = [k[len("~view ") :] for k in documented if k.startswith("~view ")]
        if not any(d.startswith(f"{k}:") for k in skip):
            diffs.append(f"view: {d}")
    if "~upper" not in documented:
        for rel in sorted(set(kupper) | set(pupper)):
            if f"~upper {rel}" not in documented and kupper.get(rel) != pupper.get(rel):
                diffs.append(f"upper {rel}: kernel {kupper.get(rel)}, pyunion {pupper.get(rel)}")
    assert not diffs, f"{name}: {len(diffs)} difference(s)\n  " + "\n  ".join(diffs[:40])


# -- scenarios ---------------------------------------------------------------------------------
@scenario
def rename_noreplace(p: Probe) -> None:
    r = p.r
    (r / "new").write_bytes(b"upper\n")
    p.do("lower onto lower", lambda: renameat2(r / "f", r / "g", RENAME_NOREPLACE))
    p.do("lower onto upper", lambda: renameat2(r / "f", r / "new", RENAME_NOREPLACE))
    p.do("lower onto whiteout", lambda: renameat2(r / "g", r / "gone", RENAME_NOREPLACE))
    p.do("upper onto lower", lambda: renameat2(r / "new", r / "ro", RENAME_NOREPLACE))
    p.do("upper onto merged dir", lambda: renameat2(r / "new", r / "m", RENAME_NOREPLACE))
    p.do(
        "merged child to a new name", lambda: renameat2(r / "m/low", r / "m/low2", RENAME_NOREPLACE)
    )
    p.do("to a missing dir", lambda: renameat2(r / "f", r / "nodir/x", RENAME_NOREPLACE))
    p.stat("gone", "gone")
    p.stat("g", "g")
    p.stat("m/low2", "m/low2")
    p.names("m", "m")


@scenario
def rename_exchange(p: Probe) -> None:
    r = p.r
    (r / "new").write_bytes(b"upper\n")
    p.stat("f before", "f")
    p.stat("g before", "g")
    p.do("lower with lower", lambda: renameat2(r / "f", r / "g", RENAME_EXCHANGE))
    p.stat("f after", "f")
    p.stat("g after", "g")
    p.do("upper with lower", lambda: renameat2(r / "new", r / "ro", RENAME_EXCHANGE))
    p.do("with a whiteout", lambda: renameat2(r / "new", r / "gone", RENAME_EXCHANGE))
    p.do("with a missing name", lambda: renameat2(r / "new", r / "nothing", RENAME_EXCHANGE))
    os.mkdir(r / "updir")
    p.do("file with upper dir", lambda: renameat2(r / "new", r / "updir", RENAME_EXCHANGE))
    p.do("across dirs", lambda: renameat2(r / "m/high", r / "t/tf", RENAME_EXCHANGE))
    for n in ("f", "g", "new", "ro", "updir", "m/high", "t/tf"):
        p.stat(n, n)
        p.do(f"read {n}", lambda n=n: (r / n).read_bytes() if (r / n).is_file() else "dir")


@scenario
def rename_whiteout_flag(p: Probe) -> None:
    r = p.r
    (r / "new").write_bytes(b"upper\n")
    p.do("RENAME_WHITEOUT upper", lambda: renameat2(r / "new", r / "new2", RENAME_WHITEOUT))
    p.do("RENAME_WHITEOUT lower", lambda: renameat2(r / "f", r / "f2", RENAME_WHITEOUT))
    p.do("all flags", lambda: renameat2(r / "g", r / "g2", 7))
    p.do("unknown flag", lambda: renameat2(r / "g", r / "g2", 8))


@scenario
def rename_directories(p: Probe) -> None:
    r = p.r
    os.mkdir(r / "updir")
    (r / "updir" / "x").write_bytes(b"x")
    p.do("upper-only dir", lambda: os.rename(r / "updir", r / "updir2"))
    p.do("top-layer-only dir, as mv does", lambda: p.move_dir(r / "t", r / "t2"))
    p.do("new dir over a whiteout (opaque)", lambda: os.mkdir(r / "gone"))
    p.do("opaque dir", lambda: os.rename(r / "gone", r / "gone2"))
    p.do("onto an empty merged dir", lambda: os.rename(r / "gone2", r / "m/sdir"))
    p.do("non-empty onto a dir", lambda: os.rename(r / "updir2", r / "m/tdir"))
    p.do("lower dir, as mv does", lambda: p.move_dir(r / "d", r / "d2"))
    p.do("merged dir, as mv does", lambda: p.move_dir(r / "m", r / "m2"))
    p.names("root", ".")
    p.names("m2", "m2")
    p.stat("d2", "d2")
    p.stat("d2/f", "d2/f")


DOCUMENTED["rename_directories"] = {
    # redirect_dir=off: the kernel says EXDEV and mv copies; pyunion copies itself.
    "lower dir, as mv does": ("EXDEV, mv copied", "ok"),
    "top-layer-only dir, as mv does": ("EXDEV, mv copied", "ok"),
    "merged dir, as mv does": ("EXDEV, mv copied", "ok"),
    # pyunion's copy keeps the files' st_ino for the mount; mv's copy makes new ones
    # (the classes are counted in order of appearance, so both differ the same way).
    "d2": "skip",
    "d2/f": "skip",
    # pyunion's moved directory is opaque, mv's is a new upper directory.
    "~upper": "skip",
}


@scenario
def tmpfile(p: Probe) -> None:
    r = p.r
    for where in (".", "m", "t", "d"):
        p.do(f"O_TMPFILE in {where}", lambda w=where: _tmpfile_linked(r / w, "linked"))
        p.stat(f"linked {where}", f"{where}/linked")
    p.do("O_TMPFILE O_RDONLY", lambda: os.open(r, O_TMPFILE | os.O_RDONLY, 0o600))


def _tmpfile_linked(d: Path, name: str) -> dict[str, Any]:
    """An O_TMPFILE file written, then given NAME in D: linkat(AT_EMPTY_PATH) works,
    the /proc/self/fd way gives EXDEV in the kernel (the fd's file is the upper's)."""
    fd = os.open(d, O_TMPFILE | os.O_RDWR, 0o640)
    try:
        os.write(fd, b"tmp data")
        s = os.fstat(fd)
        out: dict[str, Any] = {"before link": (oct(s.st_mode), s.st_nlink, s.st_size)}
        try:
            os.link(f"/proc/self/fd/{fd}", d / name)
            out["proc link"] = "ok"
        except OSError as e:
            out["proc link"] = o.errno_name(e.errno)
        _check(_libc.linkat(fd, b"", AT_FDCWD, os.fsencode(d / name), AT_EMPTY_PATH))
        s = os.fstat(fd)
        out["after link"] = (oct(s.st_mode), s.st_nlink, s.st_size)
        return out
    finally:
        os.close(fd)


@scenario
def link_lower_file(p: Probe) -> None:
    r = p.r
    p.stat("f before", "f")
    p.do("link f", lambda: os.link(r / "f", r / "m/f-link"))
    p.stat("f after", "f")
    p.stat("link", "m/f-link")
    p.do("link a symlink", lambda: os.link(r / "sym", r / "sym-link", follow_symlinks=False))
    p.stat("sym-link", "sym-link")
    p.do("link a lower dir", lambda: os.link(r / "d", r / "d-link"))
    p.do("link onto existing", lambda: os.link(r / "g", r / "ro"))
    p.do("link onto whiteout", lambda: os.link(r / "g", r / "gone"))
    p.stat("g", "g")
    p.do("unlink f", lambda: os.unlink(r / "f"))
    p.stat("link after unlink", "m/f-link")


@scenario
def read_fd_across_copy_up(p: Probe) -> None:
    r = p.r
    rfd = os.open(r / "g", os.O_RDONLY)
    try:
        p.do("read before", lambda: os.pread(rfd, 100, 0))
        p.note("fstat before", p.fields(os.fstat(rfd)))
        wfd = os.open(r / "g", os.O_WRONLY)
        os.pwrite(wfd, b"NEW", 0)
        os.close(wfd)
        p.do("read after", lambda: os.pread(rfd, 100, 0))
        p.note("fstat after", p.fields(os.fstat(rfd)))
        m = mmap.mmap(rfd, 0, prot=mmap.PROT_READ)
        p.note("mmap after", bytes(m[:20]))
        m.close()
        os.truncate(r / "g", 5)
        os.chmod(r / "g", 0o600)
        p.do("read after truncate", lambda: os.pread(rfd, 100, 0))
        p.note("fstat after chmod", p.fields(os.fstat(rfd)))
        os.unlink(r / "g")
        p.do("read after unlink", lambda: os.pread(rfd, 100, 0))
        p.note("fstat after unlink", p.fields(os.fstat(rfd)))
    finally:
        os.close(rfd)


@scenario
def truncate_lower(p: Probe) -> None:
    r = p.r
    p.do("truncate longer", lambda: os.truncate(r / "f", 100))
    p.stat("f", "f")
    p.read("f data", "f")
    p.do("truncate shorter", lambda: os.truncate(r / "g", 3))
    p.read("g data", "g")
    p.do("truncate dir", lambda: os.truncate(r / "d", 0))
    p.do("truncate negative", lambda: os.truncate(r / "ro", -1))
    fd = os.open(r / "m/low", os.O_RDWR)
    try:
        p.do("ftruncate rw", lambda: os.ftruncate(fd, 1))
    finally:
        os.close(fd)
    fd = os.open(r / "d/f", os.O_RDONLY)
    try:
        p.do("ftruncate rdonly", lambda: os.ftruncate(fd, 1))
    finally:
        os.close(fd)
    p.stat("d/f", "d/f")
    with as_user(1000):
        p.do("truncate ro by user", lambda: os.truncate(r / "ro", 0))
        p.do("truncate own by user", lambda: os.truncate(r / "own", 2))
    p.stat("own", "own")
    p.do("truncate sparse", lambda: os.truncate(r / "sparse", 5 << 20))
    p.stat("sparse", "sparse")


@scenario
def utimensat_flags(p: Probe) -> None:
    r = p.r
    p.do("omit atime", lambda: utimensat(r / "f", "omit", T1))
    p.stat("f", "f")
    p.do("omit both", lambda: utimensat(r / "g", "omit", "omit"))
    p.stat("g", "g")
    p.do("now mtime", lambda: utimensat(r / "ro", T1, "now"))
    p.stat("ro", "ro")
    p.do("symlink nofollow", lambda: utimensat(r / "sym", T1, T1, AT_SYMLINK_NOFOLLOW))
    p.stat("sym", "sym")
    p.stat("sym target", "sym", follow=True)
    p.do("lower dir", lambda: utimensat(r / "d/sub", "omit", T1))
    p.stat("d/sub", "d/sub")
    p.stat("d", "d")
    with as_user(1000):
        p.do("now by non-owner, no write", lambda: utimensat(r / "ro", "now", "now"))
        p.do("set by non-owner", lambda: utimensat(r / "g", T1, T1))
        p.do("now by owner", lambda: utimensat(r / "own", "now", "now"))
        p.do("omit by non-owner", lambda: utimensat(r / "g", "omit", "omit"))
    with as_user(1001):
        p.do("now on a sticky lower dir, not owner", lambda: utimensat(r / "tmp", "now", "now"))
        p.do("omit/now on it", lambda: utimensat(r / "tmp", "omit", "now"))
        p.do("set on it", lambda: utimensat(r / "tmp", T1, T1))
    p.do(
        "now/omit on a symlink",
        lambda: utimensat(r / "dangling", "now", "omit", AT_SYMLINK_NOFOLLOW),
    )
    p.do("omit both on a merged dir", lambda: utimensat(r / "m", "omit", "omit"))
    p.do("a FIFO's", lambda: utimensat(r / "fifo", T1, "omit"))
    p.stat("own", "own")
    for n in ("tmp", "dangling", "m", "fifo"):
        p.stat(f"{n} at last", n)


@scenario
def chmod_chown_lower_dir(p: Probe) -> None:
    r = p.r
    p.do("chmod d", lambda: os.chmod(r / "d", 0o700))
    p.stat("d", "d")
    p.xattrs("d xattrs", "d")
    p.do("chown d/sub", lambda: os.chown(r / "d/sub", 1000, -1))
    p.stat("d/sub", "d/sub")
    p.do("chown m", lambda: os.chown(r / "m", -1, 1234))
    p.stat("m", "m")
    p.do(
        "chmod sym",
        lambda: _check(
            _libc.fchmodat(AT_FDCWD, os.fsencode(r / "sym"), 0o600, AT_SYMLINK_NOFOLLOW)
        ),
    )
    p.do("lchown sym", lambda: os.chown(r / "sym", 1000, 1000, follow_symlinks=False))
    p.stat("sym", "sym")
    p.stat("f", "f")
    with as_user(1000):
        p.do("chmod not owned", lambda: os.chmod(r / "m", 0o777))
        p.do("chown own to other", lambda: os.chown(r / "own", 1001, -1))
        p.do("chgrp own to non-member", lambda: os.chown(r / "own", -1, 5))


@scenario
def mknod_kinds(p: Probe) -> None:
    r = p.r
    p.do("fifo", lambda: os.mkfifo(r / "m/fifo", 0o640))
    p.do("fifo over whiteout", lambda: os.mkfifo(r / "gone"))
    p.do("chr", lambda: os.mknod(r / "m/null", stat.S_IFCHR | 0o666, os.makedev(1, 3)))
    p.do("blk", lambda: os.mknod(r / "d/loop", stat.S_IFBLK | 0o600, os.makedev(7, 0)))
    p.do("chr 0/0", lambda: os.mknod(r / "t/wo", stat.S_IFCHR | 0o600, os.makedev(0, 0)))
    p.do("regular", lambda: os.mknod(r / "t/reg", stat.S_IFREG | 0o600))
    p.do("exists", lambda: os.mknod(r / "f", stat.S_IFREG | 0o600))
    s = socket.socket(socket.AF_UNIX)
    try:
        p.do("socket bind", lambda: s.bind(os.fsdecode(r / "m/sock")))
    finally:
        s.close()
    with as_user(1000):
        p.do("chr by user", lambda: os.mknod(r / "tmp/n", stat.S_IFCHR | 0o600, os.makedev(1, 3)))
        p.do("fifo by user", lambda: os.mkfifo(r / "tmp/fifo"))
    for n in ("m/fifo", "gone", "m/null", "d/loop", "t/wo", "t/reg", "m/sock", "tmp/fifo"):
        p.stat(n, n)
    p.names("m", "m")
    p.names("t", "t")


@scenario
def xattr_namespaces(p: Probe) -> None:
    r = p.r
    p.xattrs("f", "f")
    p.do("list f", lambda: sorted(os.listxattr(r / "f")))
    p.do("set user", lambda: os.setxattr(r / "g", "user.new", b"1"))
    p.do("set trusted", lambda: os.setxattr(r / "g", "trusted.new", b"2"))
    p.do("set security", lambda: os.setxattr(r / "g", "security.new", b"3"))
    p.do("set bogus ns", lambda: os.setxattr(r / "g", "bogus.new", b"3"))
    p.do("set overlay private", lambda: os.setxattr(r / "g", "trusted.overlay.opaque", b"y"))
    p.do("set overlay other", lambda: os.setxattr(r / "g", "trusted.overlay.foo", b"y"))
    p.do("set user.overlay", lambda: os.setxattr(r / "ro", "user.overlay.x", b"y"))
    # Escaped: stored as trusted.overlay.overlay.*, never a marker of this mount.
    p.do(
        "opaque xattr on a merged dir", lambda: os.setxattr(r / "m", "trusted.overlay.opaque", b"y")
    )
    p.names("m stays merged", "m")
    p.do("get it back", lambda: os.getxattr(r / "m", "trusted.overlay.opaque"))
    p.do("escaped twice", lambda: os.setxattr(r / "t", "trusted.overlay.overlay.x", b"2"))
    p.do(
        "whiteout xattr on a file",
        lambda: os.setxattr(r / "m/low", "trusted.overlay.whiteout", b""),
    )
    p.stat("m/low stays", "m/low")
    p.xattrs("escaped in a lower layer", "d/f")
    p.do("remove escaped lower", lambda: os.removexattr(r / "d/f", "trusted.overlay.esc"))
    p.do("remove escaped missing", lambda: os.removexattr(r / "d/f", "trusted.overlay.esc"))
    p.do("chmod keeps escaped", lambda: os.chmod(r / "d/sub/deep", 0o600))
    p.xattrs("escaped after copy-up", "d/sub/deep")
    p.do("get overlay private", lambda: os.getxattr(r / "t", "trusted.overlay.opaque"))
    p.do("create existing", lambda: os.setxattr(r / "f", "user.x", b"2", os.XATTR_CREATE))
    p.do("replace missing", lambda: os.setxattr(r / "ro", "user.nope", b"2", os.XATTR_REPLACE))
    p.do("remove missing", lambda: os.removexattr(r / "d/f", "user.nope"))
    p.do("remove lower", lambda: os.removexattr(r / "f", "user.x"))
    p.do("remove trusted lower", lambda: os.removexattr(r / "f", "trusted.t"))
    p.do("user on symlink", lambda: os.setxattr(r / "sym", "user.s", b"1", follow_symlinks=False))
    p.do(
        "trusted on symlink",
        lambda: os.setxattr(r / "sym", "trusted.s", b"1", follow_symlinks=False),
    )
    p.do("user on fifo", lambda: (os.mkfifo(r / "fifo"), os.setxattr(r / "fifo", "user.s", b"1")))
    p.do("big value", lambda: os.setxattr(r / "m/low", "user.big", b"v" * 65536))
    p.do("long name", lambda: os.setxattr(r / "m/low", "user." + "n" * 251, b"v"))
    p.do("too long name", lambda: os.setxattr(r / "m/low", "user." + "n" * 252, b"v"))
    with as_user(1000):
        p.do("user sets trusted", lambda: os.setxattr(r / "own", "trusted.u", b"1"))
        p.do("user lists trusted", lambda: sorted(os.listxattr(r / "f")))
        p.do("user sets user on own", lambda: os.setxattr(r / "own", "user.u", b"1"))
        p.do("user sets user on other's", lambda: os.setxattr(r / "g", "user.u", b"1"))
    for n in ("f", "g", "sym", "d", "m", "t", "own", "m/low"):
        p.xattrs(f"xattrs {n}", n)
    p.do("list dir", lambda: sorted(os.listxattr(r / "m")))
    p.do("list opaque", lambda: (os.mkdir(r / "gone"), sorted(os.listxattr(r / "gone")))[1])


def _facl(*args: str) -> str:
    r = subprocess.run(["setfacl", *args], capture_output=True, text=True, timeout=30, check=False)
    if r.returncode != 0:
        raise OSError(errno.EPERM, r.stderr.strip())
    return "ok"


def _getfacl(path: Path) -> str:
    return subprocess.run(
        ["getfacl", "-cpn", str(path)], capture_output=True, text=True, timeout=30, check=True
    ).stdout


@scenario
def posix_acls(p: Probe) -> None:
    r = p.r
    p.do("setfacl lower file", lambda: _facl("-m", "u:1001:rw", str(r / "g")))
    p.do("getfacl g", lambda: _getfacl(r / "g"))
    p.stat("g", "g")
    p.do("default acl on lower dir", lambda: _facl("-d", "-m", "u:1001:rwx,m::rwx", str(r / "m")))
    p.do("create inherits", lambda: os.close(os.open(r / "m/new", os.O_CREAT | os.O_WRONLY, 0o640)))
    p.do("mkdir inherits", lambda: os.mkdir(r / "m/newdir", 0o750))
    p.do("getfacl m/new", lambda: _getfacl(r / "m/new"))
    p.do("getfacl m/newdir", lambda: _getfacl(r / "m/newdir"))
    p.stat("m/new", "m/new")
    p.stat("m/newdir", "m/newdir")
    p.do("acl on lower dir copies up", lambda: _facl("-m", "g:1234:rx", str(r / "d/sub")))
    p.do("getfacl d/sub", lambda: _getfacl(r / "d/sub"))
    p.do("chmod updates mask", lambda: os.chmod(r / "g", 0o600))
    p.do("getfacl g after chmod", lambda: _getfacl(r / "g"))
    with as_user(1001):
        p.do("1001 writes g (mask ---)", lambda: os.close(os.open(r / "g", os.O_WRONLY)))
        p.do(
            "1001 creates in m", lambda: os.close(os.open(r / "m/by1001", os.O_CREAT | os.O_WRONLY))
        )
    p.do("remove acl", lambda: _facl("-b", str(r / "g")))
    p.xattrs("g xattrs", "g")


def _seek_map(fd: int, size: int) -> list[tuple[str, int | str]]:
    out: list[tuple[str, int | str]] = []
    for off in (0, 4096, 8192, (1 << 20) - 1, 1 << 20, (1 << 20) + 8192, size - 1, size):
        for whence, n in ((SEEK_DATA, "data"), (SEEK_HOLE, "hole")):
            try:
                out.append((f"{n}@{off}", os.lseek(fd, off, whence)))
            except OSError as e:
                out.append((f"{n}@{off}", o.errno_name(e.errno)))
    return out


def _holes_seen(seek_map: list[tuple[str, int | str]], size: int) -> bool:
    """Whether SEEK_HOLE found a hole before the end of the file."""
    return any(k.startswith("hole") and isinstance(v, int) and v < size for k, v in seek_map)


@scenario
def seek_data_hole(p: Probe) -> None:
    r = p.r
    fd = os.open(r / "sparse", os.O_RDONLY)
    try:
        lower = _seek_map(fd, 3 << 20)
        p.note("lower map", lower)
        p.note("lower holes seen", _holes_seen(lower, 3 << 20))
    finally:
        os.close(fd)
    fd = os.open(r / "sparse", os.O_RDWR)
    try:
        os.pwrite(fd, b"mid", 2 << 20)
        up = _seek_map(fd, 3 << 20)
        p.note("after copy-up", up)
        p.note("holes seen after copy-up", _holes_seen(up, 3 << 20))
        p.note("blocks small", os.fstat(fd).st_blocks * 512 < (1 << 20))
    finally:
        os.close(fd)
    fd = os.open(r / "f", os.O_RDONLY)
    try:
        p.note("dense file", _seek_map(fd, os.fstat(fd).st_size))
    finally:
        os.close(fd)


@scenario
def copy_range_and_sendfile(p: Probe) -> None:
    r = p.r
    src = os.open(r / "f", os.O_RDONLY)
    try:
        dst = os.open(r / "m/copy", os.O_CREAT | os.O_WRONLY, 0o644)
        try:
            p.do("copy_file_range", lambda: os.copy_file_range(src, dst, 100, 0, 0))
            p.do("sendfile", lambda: os.sendfile(dst, src, 2, 5))
            p.do("cfr from offset past end", lambda: os.copy_file_range(src, dst, 10, 1000, 0))
        finally:
            os.close(dst)
        dst = os.open(r / "g", os.O_WRONLY | os.O_APPEND)
        try:
            p.do("cfr into O_APPEND", lambda: os.copy_file_range(src, dst, 5, 0))
            p.do("sendfile into O_APPEND lower", lambda: os.sendfile(dst, src, 0, 5))
        finally:
            os.close(dst)
        dst = os.open(r / "ro", os.O_RDONLY)
        try:
            p.do("cfr into read-only fd", lambda: os.copy_file_range(src, dst, 5, 0, 0))
        finally:
            os.close(dst)
        dst = os.open(r / "m", os.O_RDONLY)
        try:
            p.do("cfr into dir", lambda: os.copy_file_range(src, dst, 5, 0, 0))
        finally:
            os.close(dst)
        p.do("same file overlap", lambda: _cfr_same(r / "m/low"))
    finally:
        os.close(src)
    for n in ("m/copy", "g", "m/low"):
        p.read(n, n)
        p.stat(f"stat {n}", n)


def _cfr_same(path: Path) -> int:
    fd = os.open(path, os.O_RDWR)
    try:
        return os.copy_file_range(fd, fd, 2, 0, 1)
    finally:
        os.close(fd)


@scenario
def mmap_shared_write(p: Probe) -> None:
    r = p.r
    p.stat("before", "f")
    fd = os.open(r / "f", os.O_RDWR)
    try:
        m = mmap.mmap(fd, 0, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        m[0:5] = b"MMAP!"
        m.flush()
        m.close()
    finally:
        os.close(fd)
    p.read("after", "f")
    p.stat("after stat", "f")
    fd = os.open(r / "g", os.O_RDONLY)
    try:
        p.do(
            "shared writable map of O_RDONLY",
            lambda: mmap.mmap(fd, 0, flags=mmap.MAP_SHARED, prot=mmap.PROT_WRITE).close(),
        )
        m = mmap.mmap(fd, 0, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        m[0:1] = b"P"
        p.note("private map", bytes(m[:5]))
        m.close()
    finally:
        os.close(fd)
    p.read("g unchanged", "g")


@scenario
def directory_nlink(p: Probe) -> None:
    r = p.r
    for d in (".", "m", "d", "t", "tmp", "m/sdir"):
        p.stat(f"{d} first", d)
    p.do("mkdir in merged", lambda: os.mkdir(r / "m/new"))
    p.do("mkdir in lower-only", lambda: os.mkdir(r / "d/new"))
    p.do("mkdir in top-only", lambda: os.mkdir(r / "t/new"))
    p.do("mkdir in root", lambda: os.mkdir(r / "newroot"))
    for d in (".", "m", "d", "t", "newroot"):
        p.stat(f"{d} after mkdir", d)
    p.do("rmdir lower subdir", lambda: os.rmdir(r / "m/sdir"))
    p.do("rmdir new in d", lambda: os.rmdir(r / "d/new"))
    p.do("rmdir new in t", lambda: os.rmdir(r / "t/new"))
    for d in (".", "m", "d", "t"):
        p.stat(f"{d} after rmdir", d)


@scenario
def removed_directories_held_open(p: Probe) -> None:
    """An fd (or a cwd) on a directory removed by rmdir or by a rename over it is the
    removed directory: its stat and what is changed through it are its own, never
    those of a directory made at its name afterwards."""
    r = p.r
    held: dict[str, int] = {}
    for d in ("x", "y", "z"):
        p.do(f"mkdir {d}", lambda d=d: os.mkdir(r / d, 0o755))
    for d in ("x", "y", "t"):
        held[d] = os.open(r / d, os.O_RDONLY | os.O_DIRECTORY)
    try:
        p.do("rm t/tf", lambda: os.unlink(r / "t/tf"))
        p.do("rmdir x", lambda: os.rmdir(r / "x"))
        p.do("rmdir t", lambda: os.rmdir(r / "t"))
        p.do("rename z over y", lambda: os.rename(r / "z", r / "y"))
        p.do("mkdir x again", lambda: os.mkdir(r / "x", 0o755))
        p.do("mkdir t again", lambda: os.mkdir(r / "t", 0o755))
        for d, fd in held.items():
            p.do(f"fstat {d}", lambda fd=fd: p.fields(os.fstat(fd)))
            p.do(f"fchmod {d}", lambda fd=fd: os.fchmod(fd, 0o700))
            p.do(f"fsetxattr {d}", lambda fd=fd: os.setxattr(fd, "user.held", b"h"))
            p.do(f"fstat {d} after", lambda fd=fd: p.fields(os.fstat(fd)))
            p.do(f"list {d}", lambda fd=fd: os.listdir(fd))
        for d in ("x", "y", "t"):
            p.stat(f"{d} now", d)
            p.xattrs(f"{d} xattrs now", d)
    finally:
        for fd in held.values():
            os.close(fd)


@scenario
def rmdir_whiteouts_only(p: Probe) -> None:
    r = p.r
    p.do("rm d/f", lambda: os.unlink(r / "d/f"))
    p.do("rmdir d (sub left)", lambda: os.rmdir(r / "d"))
    p.do("rm d/sub/deep", lambda: os.unlink(r / "d/sub/deep"))
    p.do("rmdir d/sub", lambda: os.rmdir(r / "d/sub"))
    p.names("d empty", "d")
    p.do("rmdir d", lambda: os.rmdir(r / "d"))
    p.do("mkdir d again", lambda: os.mkdir(r / "d"))
    p.names("d again", "d")
    p.xattrs("d again xattrs", "d")
    p.do("rm m/low", lambda: os.unlink(r / "m/low"))
    p.do("rm m/high", lambda: os.unlink(r / "m/high"))
    p.do("rmdir m/sdir", lambda: os.rmdir(r / "m/sdir"))
    p.do("rmdir m/tdir", lambda: os.rmdir(r / "m/tdir"))
    p.do("rmdir m", lambda: os.rmdir(r / "m"))
    p.do("rmdir whiteout name", lambda: os.rmdir(r / "gone"))
    p.do("rmdir t (not empty)", lambda: os.rmdir(r / "t"))
    p.do("rmdir file", lambda: os.rmdir(r / "f"))
    p.do("rmdir .", lambda: os.rmdir(r / "t/."))


class _Dirent(ctypes.Structure):
    _fields_ = [
        ("d_ino", ctypes.c_ulong),
        ("d_off", ctypes.c_long),
        ("d_reclen", ctypes.c_ushort),
        ("d_type", ctypes.c_ubyte),
        ("d_name", ctypes.c_char * 256),
    ]


_libc.opendir.restype = ctypes.c_void_p
_libc.opendir.argtypes = [ctypes.c_char_p]
_libc.readdir.restype = ctypes.POINTER(_Dirent)
_libc.readdir.argtypes = [ctypes.c_void_p]
_libc.telldir.restype = ctypes.c_long
_libc.telldir.argtypes = [ctypes.c_void_p]
_libc.seekdir.argtypes = [ctypes.c_void_p, ctypes.c_long]
_libc.rewinddir.argtypes = [ctypes.c_void_p]
_libc.closedir.argtypes = [ctypes.c_void_p]


class _Dir:
    """libc's DIR stream: telldir/seekdir as programs use them."""

    def __init__(self, path: Path) -> None:
        ctypes.set_errno(0)
        self.d = _libc.opendir(os.fsencode(path))
        if not self.d:
            e = ctypes.get_errno()
            raise OSError(e, os.strerror(e), str(path))

    def next(self) -> bytes | None:
        ctypes.set_errno(0)
        ent = _libc.readdir(self.d)
        if not ent and ctypes.get_errno():
            e = ctypes.get_errno()
            raise OSError(e, os.strerror(e))
        return ent.contents.d_name if ent else None

    def rest(self) -> list[bytes]:
        out = []
        while (n := self.next()) is not None:
            out.append(n)
        return out

    def close(self) -> None:
        _libc.closedir(self.d)


@scenario
def readdir_positions(p: Probe) -> None:
    r = p.r
    for i in range(40):
        (r / "m" / f"u{i:02d}").write_bytes(b"")
    for d in ("m", "d", "t"):
        ds = _Dir(r / d)
        try:
            first = [n for n in (ds.next() for _ in range(2)) if n is not None]
            pos = _libc.telldir(ds.d)
            x = ds.next()
            rest = ds.rest()
            _libc.seekdir(ds.d, pos)
            p.note(f"{d}: seekdir(telldir) gives the same name", ds.next() == x)
            _libc.rewinddir(ds.d)
            again = ds.rest()
            got = [*first, *([x] if x is not None else []), *rest]
            p.note(f"{d}: all names once", sorted(got) == sorted(again))
            p.note(f"{d}: names", sorted(again))
        finally:
            ds.close()
    # Changes during a pass: what a later readdir of the same stream shows is up to the
    # filesystem; what must hold is no name twice and every untouched name once.
    ds = _Dir(r / "m")
    try:
        first = [ds.next() for _ in range(5)]
        os.unlink(r / "m/high")
        (r / "m" / "zz-new").write_bytes(b"")
        os.unlink(r / "m/u39")
        rest = p.do("rest of the pass", ds.rest) or []
        p.log[-1] = ("rest of the pass", "ok" if isinstance(p.log[-1][1], list) else p.log[-1][1])
        seen = [n for n in first + rest if n is not None]
        p.note("no name twice", len(seen) == len(set(seen)))
        stable = set(os.listdir(os.fsencode(r / "m"))) - {b"zz-new"}
        p.note("untouched names seen", stable <= set(seen))
        _libc.rewinddir(ds.d)
        p.do("after rewind", lambda: sorted(ds.rest()))
    finally:
        ds.close()


@scenario
def statfs_fields(p: Probe) -> None:
    r = p.r
    for where in (".", "m", "d/f"):
        sv = os.statvfs(r / where)
        p.note(
            f"statvfs {where}",
            {
                "bsize": sv.f_bsize,
                "frsize": sv.f_frsize,
                "namemax": sv.f_namemax,
                "flag": sv.f_flag,
                "blocks~": round(sv.f_blocks * sv.f_frsize / (1 << 30)),
                "files~": round(sv.f_files / 10000),
            },
        )


@scenario
def syncs(p: Probe) -> None:
    r = p.r
    for d in (".", "m", "d", "t"):
        fd = os.open(r / d, os.O_RDONLY | os.O_DIRECTORY)
        try:
            p.do(f"fsync {d}", lambda fd=fd: os.fsync(fd))
            p.do(f"fdatasync {d}", lambda fd=fd: os.fdatasync(fd))
            p.do(f"syncfs {d}", lambda fd=fd: _check(_libc.syncfs(fd)))
        finally:
            os.close(fd)
    for f in ("f", "sparse"):
        fd = os.open(r / f, os.O_RDONLY)
        try:
            p.do(f"fsync rdonly {f}", lambda fd=fd: os.fsync(fd))
            p.do(f"fdatasync rdonly {f}", lambda fd=fd: os.fdatasync(fd))
        finally:
            os.close(fd)
    fd = os.open(r / "g", os.O_WRONLY)
    try:
        os.write(fd, b"x")
        p.do("fsync written", lambda: os.fsync(fd))
    finally:
        os.close(fd)
    fd = os.open(r / "sym", os.O_PATH | os.O_NOFOLLOW)
    try:
        p.do("fsync O_PATH", lambda: os.fsync(fd))
    finally:
        os.close(fd)


@scenario
def access_as_user(p: Probe) -> None:
    r = p.r
    checks = [
        ("own", os.R_OK | os.W_OK),
        ("own", os.X_OK),
        ("f", os.R_OK),
        ("f", os.W_OK),
        ("ro", os.W_OK),
        ("d", os.R_OK | os.X_OK),
        ("d/f", os.R_OK),
        ("tmp", os.W_OK),
        ("m", os.W_OK),
        ("gone", os.F_OK),
        ("sym", os.R_OK),
    ]
    for uid in (1000, 1234, 0):
        with as_user(uid, 1234 if uid == 1234 else None):
            for n, mode in checks:
                p.do(
                    f"{uid} faccessat EACCESS {n} {mode}",
                    lambda n=n, m=mode: faccessat(r / n, m, AT_EACCESS),
                )
    # access() checks the real IDs (root here), faccessat(AT_EACCESS) the effective ones.
    with as_user(1000):
        p.do("access real root ro W", lambda: faccessat(r / "ro", os.W_OK, 0))
        p.do("access real root f X", lambda: faccessat(r / "f", os.X_OK, 0))
    subprocess_checks = subprocess.run(
        [
            "setpriv",
            "--reuid=1000",
            "--regid=1000",
            "--clear-groups",
            "sh",
            "-c",
            "for f in own f ro d d/f tmp m sym; do "
            "test -r $f && echo r$f; test -w $f && echo w$f; test -x $f && echo x$f; done; "
            "echo data > own 2>/dev/null && echo wrote; cat d/f 2>/dev/null || echo denied",
        ],
        cwd=r,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    p.note("setpriv sh", subprocess_checks.stdout)


@scenario
def sticky_directory(p: Probe) -> None:
    r = p.r
    with as_user(1001):
        p.do("unlink other's", lambda: os.unlink(r / "tmp/u1000"))
        p.do("rename other's away", lambda: os.rename(r / "tmp/u1000", r / "tmp/mine"))
        p.do("rename own onto other's", lambda: os.rename(r / "tmp/u1001", r / "tmp/u1000"))
        p.do("unlink root's", lambda: os.unlink(r / "tmp/root"))
        p.do("create new", lambda: (r / "tmp/new1001").write_bytes(b"n"))
        p.do("unlink own", lambda: os.unlink(r / "tmp/u1001"))
    with as_user(1000):
        p.do("1000 unlinks 1001's new", lambda: os.unlink(r / "tmp/new1001"))
        p.do("1000 unlinks own", lambda: os.unlink(r / "tmp/u1000"))
    p.names("tmp names", "tmp")
    p.stat("tmp", "tmp")


@scenario
def open_flags(p: Probe) -> None:
    r = p.r
    fd = os.open(r / "f", os.O_WRONLY | os.O_APPEND)
    try:
        p.do("append write", lambda: os.write(fd, b"APP"))
        p.do("pwrite with O_APPEND", lambda: os.pwrite(fd, b"PW", 0))
        p.do("lseek end", lambda: os.lseek(fd, 0, os.SEEK_CUR))
    finally:
        os.close(fd)
    p.read("f", "f")
    p.do("O_DIRECT read open", lambda: os.close(os.open(r / "g", os.O_RDONLY | os.O_DIRECT)))
    p.do("O_DIRECT write open", lambda: _direct_write(r / "m/low"))
    p.read("m/low", "m/low")
    p.do(
        "O_DIRECT create",
        lambda: os.close(os.open(r / "t/direct", os.O_CREAT | os.O_RDWR | os.O_DIRECT)),
    )
    p.do("O_NOATIME owner(root)", lambda: os.close(os.open(r / "g", os.O_RDONLY | os.O_NOATIME)))
    with as_user(1001):
        p.do("O_NOATIME non-owner", lambda: os.close(os.open(r / "g", os.O_RDONLY | os.O_NOATIME)))
    with as_user(1000):
        p.do("O_NOATIME owner", lambda: os.close(os.open(r / "own", os.O_RDONLY | os.O_NOATIME)))
    p.do("O_DIRECTORY on file", lambda: os.open(r / "f", os.O_RDONLY | os.O_DIRECTORY))
    p.do("O_NOFOLLOW on symlink", lambda: os.open(r / "sym", os.O_RDONLY | os.O_NOFOLLOW))
    p.do("O_CREAT|O_EXCL on lower", lambda: os.open(r / "g", os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    p.do(
        "O_CREAT|O_EXCL on whiteout",
        lambda: os.close(os.open(r / "gone", os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)),
    )
    p.do("O_WRONLY on dir", lambda: os.open(r / "m", os.O_WRONLY))
    p.do("O_RDWR on lower dir", lambda: os.open(r / "d", os.O_RDWR))
    p.do("O_TRUNC O_RDONLY", lambda: os.close(os.open(r / "ro", os.O_RDONLY | os.O_TRUNC)))
    p.stat("ro", "ro")
    p.do("O_PATH on lower", lambda: os.close(os.open(r / "d/f", os.O_PATH)))
    p.stat("d/f unchanged", "d/f")


def _direct_write(path: Path) -> int:
    fd = os.open(path, os.O_RDWR | os.O_DIRECT)
    try:
        buf = mmap.mmap(-1, 4096)
        buf.write(b"D" * 4096)
        try:
            return os.pwrite(fd, buf, 0)
        finally:
            buf.close()
    finally:
        os.close(fd)


@scenario
def long_names_and_paths(p: Probe) -> None:
    r = p.r
    n255, n256 = "n" * 255, "n" * 256
    p.do("255 in merged", lambda: (r / "m" / n255).write_bytes(b"x"))
    p.do("256 in merged", lambda: (r / "m" / n256).write_bytes(b"x"))
    p.do("255 mkdir in lower dir", lambda: os.mkdir(r / "d" / n255))
    p.do("255 symlink", lambda: os.symlink("t" * 4095, r / "t" / n255))
    p.do("symlink target 4096", lambda: os.symlink("t" * 4096, r / "t" / "s4096"))
    p.do("readlink 4095", lambda: len(os.readlink(r / "t" / n255)))
    p.do("rename to 255", lambda: os.rename(r / "f", r / "m" / ("r" * 255)))
    p.do("lookup 256", lambda: os.lstat(r / "m" / n256))
    p.names("m", "m")
    # A path of 4095 bytes from the mount root, through directories made with dirfds.
    rootfd = os.open(r, os.O_RDONLY | os.O_DIRECTORY)
    try:
        comp = "c" * 240
        rel = ""
        while len(rel) + len(comp) + 1 < 4000:
            rel = f"{rel}/{comp}" if rel else comp
            os.mkdir(rel, dir_fd=rootfd)
        leaf = "l" * (4095 - len(rel) - 1)
        p.do(
            "path of 4095",
            lambda: os.close(
                os.open(f"{rel}/{leaf}", os.O_CREAT | os.O_WRONLY, 0o644, dir_fd=rootfd)
            ),
        )
        p.do(
            "path of 4096",
            lambda: os.open(f"{rel}/{leaf}x", os.O_CREAT | os.O_WRONLY, 0o644, dir_fd=rootfd),
        )
        p.do("stat 4095", lambda: os.stat(f"{rel}/{leaf}", dir_fd=rootfd).st_size)
        os.unlink(f"{rel}/{leaf}", dir_fd=rootfd)
        while rel:  # the snapshots walk full paths: these are too long for them
            os.rmdir(rel, dir_fd=rootfd)
            rel = rel.rpartition("/")[0]
    finally:
        os.close(rootfd)


ODD = [b"new\nline", b"\xff\xfe invalid", b"tab\there", b"\x01ctl", b"sp ace ", b"\xc3(", b"-"]


@scenario
def odd_byte_names(p: Probe) -> None:
    r = os.fsencode(p.r)
    for n in ODD:
        p.do(f"create {n!r}", lambda n=n: open(os.path.join(r, b"m", n), "wb").close())
        p.do(f"mkdir {n!r} in d", lambda n=n: os.mkdir(os.path.join(r, b"d", n)))
        p.do(
            f"rename f to {n!r}",
            lambda n=n: (
                os.rename(os.path.join(r, b"g"), os.path.join(r, b"t", n)) if n == ODD[0] else None
            ),
        )
    p.names("m", "m")
    p.names("d", "d")
    p.names("t", "t")
    p.do("unlink one", lambda: os.unlink(os.path.join(r, b"m", ODD[1])))
    p.names("m after", "m")


@scenario
def copy_up_of_privileges(p: Probe) -> None:
    """A write drops set-ID bits and security.capability, as the kernel does."""
    r = p.r
    p.do(
        "setcap-like xattr",
        lambda: os.setxattr(
            r / "m/low",
            "security.capability",
            bytes.fromhex("01000002000000000000000000000000000000"),
        ),
    )
    p.do("chmod 6755 d/f", lambda: os.chmod(r / "d/f", 0o6755))
    p.xattrs("before write", "m/low")
    fd = os.open(r / "m/low", os.O_WRONLY)
    try:
        os.write(fd, b"w")
    finally:
        os.close(fd)
    p.xattrs("after write", "m/low")
    p.do("chown keeps?", lambda: os.chown(r / "d/f", 1000, -1))
    p.stat("d/f after chown", "d/f")
    p.do("chmod 2755 f", lambda: os.chmod(r / "f", 0o2755))
    p.do("chown f to a user", lambda: os.chown(r / "f", 1000, 1000))
    p.stat("f after chown", "f")


DOCUMENTED["xattr_namespaces"] = {
    # setxattr(XATTR_REPLACE) of a missing name: the kernel copies up, then fails;
    # pyunion fails first (the merged view is the same).
    "~upper ro": "skip",
}
DOCUMENTED["read_fd_across_copy_up"] = {
    # The kernel maps the file it opened (the lower one) while read() follows the copy-up;
    # pyunion has one file behind both (docs/semantics.md).
    "mmap after": (b"other lower\n", b"NEWer lower\n"),
}
DOCUMENTED["seek_data_hole"] = {
    # pyfuse3 3.5 has no lseek handler: the FUSE kernel then answers SEEK_DATA and
    # SEEK_HOLE itself, the whole file as data (the hole at EOF only).
    "lower map": "skip",
    "after copy-up": "skip",
    "lower holes seen": (True, False),
    "holes seen after copy-up": (True, False),
    # Copy-up keeps every hole (the kernel's may fill small ones).
    "blocks small": (ANY, True),
}
_TMPFILE = {
    "before link": ("0o100640", 0, 8),
    "proc link": "EXDEV",
    "after link": ("0o100640", 1, 8),
}
DOCUMENTED["tmpfile"] = {
    # pyfuse3 3.5 has no tmpfile handler: the FUSE kernel says EOPNOTSUPP (glibc, systemd
    # and the like then make a named file and unlink it).
    **{f"O_TMPFILE in {w}": (_TMPFILE, "ENOTSUP") for w in (".", "m", "t", "d")},
    **{f"linked {w}": "skip" for w in (".", "m", "t", "d")},
    "O_TMPFILE O_RDONLY": ("EINVAL", "EINVAL"),
    **{f"~view {w}": "skip" for w in ("linked", "m/linked", "t/linked", "d/linked")},
    **{f"~view {w}": "skip" for w in ("m", "t", "d")},  # mtime: the kernel linked there
    # The kernel copies up the directory it makes the file in.
    **{
        f"~upper {w}": "skip" for w in ("linked", "m", "t", "d", "m/linked", "t/linked", "d/linked")
    },
}
DOCUMENTED["xattr_namespaces"] = {
    **DOCUMENTED["xattr_namespaces"],
    # user.overlay.* is a marker namespace for pyunion (userxattr layers, fuse-overlayfs),
    # an ordinary one for the kernel mounted without userxattr.
    "set user.overlay": ("ok", "EPERM"),
    "~view ro": "skip",
}


@scenario
def atime_on_read(p: Probe) -> None:
    """relatime: the first read of a file whose atime is old sets it to now."""
    r = p.r
    p.stat("f before", "f")
    p.read("read f", "f")
    p.stat("f after read", "f")
    fd = os.open(r / "g", os.O_RDONLY | os.O_NOATIME)
    try:
        os.read(fd, 10)
    finally:
        os.close(fd)
    p.stat("g after O_NOATIME read", "g")
    p.names("ls d", "d")
    p.stat("d after readdir", "d")
    p.read("read t/tf", "t/tf")
    p.stat("t/tf after read", "t/tf")
    (r / "new").write_bytes(b"x")
    os.utime(r / "new", ns=(T0, T1))
    p.read("read new", "new")
    p.stat("new after read", "new")


def _dots(path: Path) -> dict[str, int]:
    ds = _Dir(path)
    try:
        out = {}
        ent = True
        while ent:
            ctypes.set_errno(0)
            e = _libc.readdir(ds.d)
            ent = bool(e)
            if ent and e.contents.d_name in (b".", b".."):
                out[e.contents.d_name.decode()] = e.contents.d_ino
        return out
    finally:
        ds.close()


@scenario
def directory_inode_numbers(p: Probe) -> None:
    """st_ino of directories before and after copy-up, and readdir's d_ino of . and .."""
    r = p.r
    for d in (".", "m", "d", "d/sub", "t", "tmp"):
        p.stat(f"{d} before", d)
    os.chmod(r / "d/sub", 0o700)  # copies up d and d/sub
    (r / "m/new").write_bytes(b"")
    for d in (".", "m", "d", "d/sub", "t", "tmp"):
        p.stat(f"{d} after", d)
        dots = _dots(r / d)
        p.note(f"{d} d_ino .", p.ino_class(dots["."]))
        if d != ".":  # the kernel's is the upper's parent's on its own filesystem
            p.note(f"{d} d_ino ..", p.ino_class(dots[".."]))
    p.stat("f", "f")
    os.chmod(r / "f", 0o600)
    p.stat("f after copy-up", "f")


@scenario
def open_files_unlinked_and_renamed_over(p: Probe) -> None:
    r = p.r
    lower = os.open(r / "f", os.O_RDONLY)
    upper_w = os.open(r / "t/tf", os.O_RDWR)
    try:
        p.do("unlink lower f", lambda: os.unlink(r / "f"))
        p.note("fstat lower after unlink", p.fields(os.fstat(lower)))
        p.do("read lower after unlink", lambda: os.pread(lower, 100, 0))
        p.do("unlink t/tf", lambda: os.unlink(r / "t/tf"))
        p.note("fstat t/tf after unlink", p.fields(os.fstat(upper_w)))
        p.do("write t/tf after unlink", lambda: os.pwrite(upper_w, b"W", 0))
        p.do("fchmod t/tf after unlink", lambda: os.fchmod(upper_w, 0o600))
        p.do("ftruncate t/tf after unlink", lambda: os.ftruncate(upper_w, 3))
        p.note("fstat t/tf at last", p.fields(os.fstat(upper_w)))
        p.do(
            "linkat unlinked",
            lambda: _check(
                _libc.linkat(upper_w, b"", AT_FDCWD, os.fsencode(r / "t/back"), AT_EMPTY_PATH)
            ),
        )
    finally:
        os.close(lower)
        os.close(upper_w)
    g = os.open(r / "g", os.O_RDONLY)
    try:
        p.do("rename over open g", lambda: os.rename(r / "ro", r / "g"))
        p.do("read old g", lambda: os.pread(g, 100, 0))
        p.note("fstat old g", p.fields(os.fstat(g)))
    finally:
        os.close(g)
    p.read("g now", "g")
    p.names("root", ".")


@scenario
def fd_operations_before_copy_up(p: Probe) -> None:
    """f* calls through a read-only fd opened while the file was lower."""
    r = p.r
    fd = os.open(r / "f", os.O_RDONLY)
    try:
        p.do("fchmod", lambda: os.fchmod(fd, 0o600))
        p.note("fstat after fchmod", p.fields(os.fstat(fd)))
        p.do("fchown", lambda: os.fchown(fd, 1000, -1))
        p.do("futimens", lambda: os.utime(fd, ns=(T1, T1)))
        p.do("fsetxattr", lambda: os.setxattr(fd, "user.fd", b"1"))
        p.do("flistxattr", lambda: sorted(os.listxattr(fd)))
        p.do("fremovexattr", lambda: os.removexattr(fd, "user.x"))
        p.do("ftruncate rdonly", lambda: os.ftruncate(fd, 0))
        p.do("read", lambda: os.pread(fd, 100, 0))
        p.note("fstat at last", p.fields(os.fstat(fd)))
    finally:
        os.close(fd)
    fd = os.open(r / "d/f", os.O_PATH)
    try:
        p.do("fchmod O_PATH", lambda: os.fchmod(fd, 0o600))
        p.do("fstat O_PATH", lambda: p.fields(os.fstat(fd)))
        p.do(
            "fchmodat AT_EMPTY_PATH",
            lambda: _check(_libc.fchmodat(fd, b"", 0o640, AT_EMPTY_PATH)),
        )
    finally:
        os.close(fd)
    p.stat("f", "f")
    p.stat("d/f", "d/f")
    p.xattrs("f xattrs", "f")


@scenario
def through_symlinks(p: Probe) -> None:
    r = p.r
    p.do("O_CREAT through a dangling lower symlink", lambda: (r / "dangling").write_bytes(b"made"))
    p.stat("zz", "zz")
    p.do("O_CREAT|O_EXCL on a symlink", lambda: os.open(r / "sym", os.O_CREAT | os.O_EXCL))
    p.do("write through a lower symlink", lambda: (r / "sym").write_bytes(b"via link"))
    p.read("f", "f")
    p.stat("sym", "sym")
    p.do("mkdir through a dir symlink", lambda: os.mkdir(r / "dirlink/new"))
    p.names("d/sub", "d/sub")
    p.do("chmod follows", lambda: os.chmod(r / "dirlink", 0o711))
    p.stat("d/sub after chmod", "d/sub")
    p.stat("dirlink", "dirlink")
    p.do("rename the symlink", lambda: os.rename(r / "dirlink", r / "m/dl"))
    p.do("readlink moved", lambda: os.readlink(r / "m/dl"))
    p.do("unlink with a trailing slash", lambda: os.unlink(os.fsdecode(r / "sym") + "/"))
    p.do("rmdir a dir symlink", lambda: os.rmdir(r / "m/dl"))
    p.do("symlink over whiteout", lambda: os.symlink("target", r / "gone"))
    p.stat("gone", "gone")


@scenario
def special_files_copy_up(p: Probe) -> None:
    r = p.r
    p.stat("fifo first", "fifo")
    p.stat("null first", "null")
    fd = p.do("open lower fifo O_RDWR", lambda: os.open(r / "fifo", os.O_RDWR | os.O_NONBLOCK))
    if fd is not None:
        os.write(fd, b"through the pipe")
        p.note("fifo read", os.read(fd, 100))
        os.close(fd)
    p.do("write lower null", lambda: (r / "null").write_bytes(b"gone"))
    p.do("truncate fifo", lambda: os.truncate(r / "fifo", 0))
    p.do("chmod fifo", lambda: os.chmod(r / "fifo", 0o600))
    p.do("chown null", lambda: os.chown(r / "null", 1000, 1000))
    p.do("utime fifo", lambda: os.utime(r / "fifo", ns=(T1, T1)))
    p.do("setxattr null", lambda: os.setxattr(r / "null", "trusted.n", b"1"))
    p.do("link fifo", lambda: os.link(r / "fifo", r / "m/fifo2"))
    p.do("rename null", lambda: os.rename(r / "null", r / "t/null"))
    for n in ("fifo", "m/fifo2", "t/null"):
        p.stat(n, n)
        p.xattrs(f"{n} xattrs", n)


@scenario
def rename_edge_cases(p: Probe) -> None:
    r = p.r
    p.do("onto itself, lower", lambda: os.rename(r / "f", r / "f"))
    p.stat("f still lower", "f")
    p.do("file into a lower dir", lambda: os.rename(r / "g", r / "d/sub/g"))
    p.do("file onto a dir", lambda: os.rename(r / "ro", r / "m"))
    p.do("dir onto a file", lambda: os.rename(r / "t", r / "f"))
    p.do("dir into itself", lambda: os.rename(r / "t", r / "t/x"))
    p.do("onto a non-empty merged dir", lambda: (os.mkdir(r / "e"), os.rename(r / "e", r / "m"))[1])
    p.do("onto the whiteout name", lambda: os.rename(r / "own", r / "gone"))
    p.do("trailing slash on a file", lambda: os.rename(os.fsdecode(r / "f") + "/", r / "x"))
    p.do("source missing", lambda: os.rename(r / "nothing", r / "x"))
    p.do("source whited out", lambda: os.rename(r / "gone2", r / "x"))
    p.do("lower onto its own hard link name", lambda: os.rename(r / "m/low", r / "m/high"))
    p.do("rename .", lambda: os.rename(os.fsdecode(r) + "/t/.", r / "t2"))
    with as_user(1000):
        p.do("user renames in a root dir", lambda: os.rename(r / "m/high", r / "m/h2"))
        p.do("user renames own out of sticky", lambda: os.rename(r / "tmp/u1000", r / "tmp/x"))
    for n in ("d/sub/g", "gone", "m/high", "tmp/x"):
        p.stat(n, n)
    p.names("m", "m")
    p.names("root", ".")


@scenario
def setgid_directories(p: Probe) -> None:
    """New objects in a set-group-ID lower directory take its group; directories keep
    the bit; a file's set-group-ID bit goes when its creator is not in that group."""
    r = p.r
    p.do("root creates", lambda: (r / "sgid/byroot").write_bytes(b""))
    p.do("root mkdir", lambda: os.mkdir(r / "sgid/dirroot", 0o755))
    with as_user(1000):
        p.do(
            "user creates",
            lambda: os.close(os.open(r / "sgid/byuser", os.O_CREAT | os.O_WRONLY, 0o2775)),
        )
        p.do("user mkdir", lambda: os.mkdir(r / "sgid/diruser", 0o700))
        p.do("user mknod fifo", lambda: os.mkfifo(r / "sgid/fifouser", 0o2660))
        p.do("user symlink", lambda: os.symlink("x", r / "sgid/linkuser"))
        p.do("user mkdir inside", lambda: os.mkdir(r / "sgid/diruser/deeper"))
        p.do(
            "user creates setgid elsewhere",
            lambda: os.close(os.open(r / "tmp/sg", os.O_CREAT | os.O_WRONLY, 0o2755)),
        )
        p.do("chmod g+s, not in group", lambda: os.chmod(r / "tmp/sg", 0o2755))
    for n in (
        "sgid",
        "sgid/byroot",
        "sgid/dirroot",
        "sgid/byuser",
        "sgid/diruser",
        "sgid/fifouser",
        "sgid/linkuser",
        "sgid/diruser/deeper",
        "tmp/sg",
    ):
        p.stat(f"stat {n}", n)


class _StatxTs(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_int64), ("tv_nsec", ctypes.c_uint32), ("_r", ctypes.c_int32)]


class _Statx(ctypes.Structure):
    _fields_ = [
        ("stx_mask", ctypes.c_uint32),
        ("stx_blksize", ctypes.c_uint32),
        ("stx_attributes", ctypes.c_uint64),
        ("stx_nlink", ctypes.c_uint32),
        ("stx_uid", ctypes.c_uint32),
        ("stx_gid", ctypes.c_uint32),
        ("stx_mode", ctypes.c_uint16),
        ("_s0", ctypes.c_uint16),
        ("stx_ino", ctypes.c_uint64),
        ("stx_size", ctypes.c_uint64),
        ("stx_blocks", ctypes.c_uint64),
        ("stx_attributes_mask", ctypes.c_uint64),
        ("stx_atime", _StatxTs),
        ("stx_btime", _StatxTs),
        ("stx_ctime", _StatxTs),
        ("stx_mtime", _StatxTs),
        ("_rest", ctypes.c_uint64 * 32),
    ]


STATX_BASIC_STATS, STATX_BTIME = 0x7FF, 0x800


def _statx(path: Path) -> dict[str, Any]:
    buf = _Statx()
    _check(
        _libc.statx(
            AT_FDCWD,
            os.fsencode(path),
            AT_SYMLINK_NOFOLLOW,
            STATX_BASIC_STATS | STATX_BTIME,
            ctypes.byref(buf),
        ),
        str(path),
    )
    return {
        "basic": buf.stx_mask & STATX_BASIC_STATS == STATX_BASIC_STATS,
        "btime": bool(buf.stx_mask & STATX_BTIME),
        "attributes": hex(buf.stx_attributes),
    }


@scenario
def statx_fields(p: Probe) -> None:
    r = p.r
    for n in ("f", "d", "m", "t/tf", "sym"):
        p.do(f"statx {n}", lambda n=n: _statx(r / n))
    os.chmod(r / "f", 0o600)
    p.do("statx f after copy-up", lambda: _statx(r / "f"))


FS_IOC_GETFLAGS = 0x80086601
FS_IOC_SETFLAGS = 0x40086602
FS_NOATIME_FL = 0x80


def _getflags(path: Path) -> int:
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        return struct.unpack("l", fcntl.ioctl(fd, FS_IOC_GETFLAGS, b"\0" * 8))[0]
    finally:
        os.close(fd)


def _setflags(path: Path, flags: int) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        fcntl.ioctl(fd, FS_IOC_SETFLAGS, struct.pack("l", flags))
    finally:
        os.close(fd)


@scenario
def inode_flags_ioctl(p: Probe) -> None:
    """lsattr/chattr: FS_IOC_GETFLAGS/SETFLAGS (the kernel's overlay copies up to set)."""
    r = p.r
    p.do("getflags lower f", lambda: hex(_getflags(r / "f")))
    p.do("getflags dir", lambda: hex(_getflags(r / "m")))
    p.do(
        "setflags noatime on lower g",
        lambda: _setflags(r / "g", _getflags(r / "g") | FS_NOATIME_FL),
    )
    p.do("getflags g", lambda: hex(_getflags(r / "g")))


def _inotify_events(p: Probe, d: Path, action: Callable[[], None]) -> list[tuple[str, bytes]]:
    fd = _check(_libc.inotify_init1(os.O_NONBLOCK))
    try:
        _check(_libc.inotify_add_watch(fd, os.fsencode(d), 0xFFF))
        action()
        out = []
        try:
            data = os.read(fd, 65536)
        except BlockingIOError:
            data = b""
        off = 0
        while off < len(data):
            _wd, mask, _cookie, ln = struct.unpack_from("iIII", data, off)
            name = data[off + 16 : off + 16 + ln].rstrip(b"\0")
            out.append((hex(mask & ~0x40000000), name))
            off += 16 + ln
        return out
    finally:
        os.close(fd)


@scenario
def inotify_events(p: Probe) -> None:
    r = p.r

    def changes() -> None:
        (r / "m/new").write_bytes(b"x")
        with open(r / "m/low", "ab") as f:
            f.write(b"more")
        os.chmod(r / "m/high", 0o600)
        os.rename(r / "m/new", r / "m/new2")
        os.unlink(r / "m/low")
        os.mkdir(r / "m/sub")
        os.rmdir(r / "m/sdir")
        os.setxattr(r / "m/new2", "user.i", b"1")

    p.do("events in m", lambda: _inotify_events(p, r / "m", changes))
    p.do(
        "events on a lower file",
        lambda: _inotify_events(p, r / "f", lambda: (r / "f").write_bytes(b"w")),
    )


@scenario
def file_handles(p: Probe) -> None:
    """name_to_handle_at: the kernel's overlay encodes handles (for fanotify) even
    without nfs_export; opening them needs nfs_export=on."""
    r = p.r

    class _Fh(ctypes.Structure):
        _fields_ = [("bytes", ctypes.c_uint), ("type", ctypes.c_int), ("f", ctypes.c_ubyte * 128)]

    def encode(n: str) -> str:
        fh = _Fh(128, 0)
        mnt = ctypes.c_int()
        _check(
            _libc.name_to_handle_at(
                AT_FDCWD, os.fsencode(r / n), ctypes.byref(fh), ctypes.byref(mnt), 0
            )
        )
        return "ok"

    for n in ("f", "m", "t/tf"):
        p.do(f"name_to_handle_at {n}", lambda n=n: encode(n))


@scenario
def refused_changes_copy_nothing_up(p: Probe) -> None:
    """A change the kernel refuses (permissions) leaves the upper as it was."""
    r = p.r
    with as_user(1001):
        p.do("create in a root dir", lambda: (r / "m/x").write_bytes(b""))
        p.do("chmod not own", lambda: os.chmod(r / "f", 0o777))
        p.do("chown not own", lambda: os.chown(r / "f", 1001, 1001))
        p.do("setxattr not own", lambda: os.setxattr(r / "f", "user.y", b"1"))
        p.do("removexattr not own", lambda: os.removexattr(r / "f", "user.x"))
        p.do("utime not own", lambda: os.utime(r / "f", ns=(T1, T1)))
        p.do("utime now, no write", lambda: os.utime(r / "f"))
        p.do("truncate no write", lambda: os.truncate(r / "f", 0))
        p.do("open for write", lambda: os.open(r / "d/sub/deep", os.O_WRONLY))
        p.do("unlink in a root dir", lambda: os.unlink(r / "m/low"))
        p.do("rename in a root dir", lambda: os.rename(r / "m/low", r / "m/x"))
        p.do("mkdir in a 0750 dir", lambda: os.mkdir(r / "d/x"))
        p.do("link a file not own", lambda: os.link(r / "f", r / "tmp/hl"))
        p.do("rmdir in a root dir", lambda: os.rmdir(r / "m/sdir"))
        p.do("mknod in a root dir", lambda: os.mkfifo(r / "t/p"))
        p.do("symlink in a root dir", lambda: os.symlink("f", r / "t/s"))
        p.do("set trusted", lambda: os.setxattr(r / "tmp/u1001", "trusted.x", b"1"))
        p.do("set security", lambda: os.setxattr(r / "tmp/u1001", "security.x", b"1"))
    p.do("removexattr missing as root", lambda: os.removexattr(r / "g", "user.none"))
    p.do("chown to the same owner", lambda: os.chown(r / "ro", -1, -1))
    p.names("upper stays empty (root)", ".")


def _listxattr_size(path: Path, size: int) -> int:
    buf = ctypes.create_string_buffer(max(size, 1))
    return _check(_libc.listxattr(os.fsencode(path), buf if size else None, size), str(path))


def _getxattr_size(path: Path, name: str, size: int) -> int:
    buf = ctypes.create_string_buffer(max(size, 1))
    return _check(
        _libc.getxattr(os.fsencode(path), name.encode(), buf if size else None, size), str(path)
    )


@scenario
def xattr_buffer_sizes(p: Probe) -> None:
    r = p.r
    p.do("listxattr size query", lambda: _listxattr_size(r / "f", 0))
    p.do("listxattr too small", lambda: _listxattr_size(r / "f", 3))
    p.do("getxattr size query", lambda: _getxattr_size(r / "f", "user.x", 0))
    p.do("getxattr too small", lambda: _getxattr_size(r / "f", "user.x", 1))
    p.do("getxattr exact", lambda: _getxattr_size(r / "f", "user.x", 2))
    p.do("getxattr missing", lambda: _getxattr_size(r / "f", "user.none", 0))
    p.do("getxattr no namespace", lambda: _getxattr_size(r / "f", "plain", 0))
    p.do("removexattr no namespace", lambda: os.removexattr(r / "f", "plain"))
    p.do("getxattr system", lambda: _getxattr_size(r / "f", "system.foo", 0))
    p.do("getxattr acl", lambda: _getxattr_size(r / "f", "system.posix_acl_access", 0))
    p.do("getxattr empty name", lambda: _getxattr_size(r / "f", "", 0))
    p.do("listxattr of an escaped one", lambda: _listxattr_size(r / "d/f", 0))
    p.do("set 64 KiB + 1", lambda: os.setxattr(r / "g", "user.big", b"v" * 65537))


@scenario
def capabilities_on_chown(p: Probe) -> None:
    r = p.r
    cap = bytes.fromhex("0100000200000000000000000000000000000000")
    p.do("set caps", lambda: os.setxattr(r / "g", "security.capability", cap))
    p.do("set times", lambda: os.utime(r / "g", ns=(T1, T1)))
    p.do("set mtime alone", lambda: utimensat(r / "g", "omit", T0))
    p.xattrs("after times", "g")
    p.do("chown root to root", lambda: os.chown(r / "g", 0, 0))
    p.xattrs("after chown", "g")
    p.do("set caps again", lambda: os.setxattr(r / "g", "security.capability", cap))
    p.do("chmod", lambda: os.chmod(r / "g", 0o755))
    p.xattrs("after chmod", "g")
    p.do("truncate", lambda: os.truncate(r / "g", 1))
    p.xattrs("after truncate", "g")


FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE = 1, 2


def _fallocate(path: Path, mode: int, off: int, length: int) -> None:
    fd = os.open(path, os.O_RDWR)
    try:
        _check(_libc.fallocate(fd, mode, ctypes.c_long(off), ctypes.c_long(length)), str(path))
    finally:
        os.close(fd)


@scenario
def fallocate_and_locks(p: Probe) -> None:
    r = p.r
    p.do("fallocate", lambda: _fallocate(r / "f", 0, 0, 8192))
    p.do("fallocate keep size", lambda: _fallocate(r / "g", FALLOC_FL_KEEP_SIZE, 0, 8192))
    p.do(
        "punch hole",
        lambda: _fallocate(r / "m/low", FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 0, 2),
    )
    fd = os.open(r / "ro", os.O_RDONLY)
    try:
        p.do("posix_fallocate on O_RDONLY", lambda: os.posix_fallocate(fd, 0, 100))
        p.do("flock", lambda: fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB))
        p.do("F_SETLK read lock", lambda: fcntl.lockf(fd, fcntl.LOCK_SH | fcntl.LOCK_NB))
    finally:
        os.close(fd)
    fd = os.open(r / "d/f", os.O_RDWR)
    try:
        p.do("posix_fallocate", lambda: os.posix_fallocate(fd, 0, 10000))
        p.do("F_SETLK write lock", lambda: fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB))
    finally:
        os.close(fd)
    for n in ("f", "g", "m/low", "d/f"):
        p.stat(f"stat {n}", n)


@scenario
def dir_fd_across_copy_up(p: Probe) -> None:
    """A directory opened while it was lower, read after it got an upper."""
    r = p.r
    fds = {d: os.open(r / d, os.O_RDONLY | os.O_DIRECTORY) for d in ("d", "m", "t")}
    try:
        for d in fds:
            (r / d / "new").write_bytes(b"")
        for d, fd in fds.items():
            p.do(f"{d} listed through the old fd", lambda fd=fd: sorted(os.listdir(fd)))
            p.do(f"fchmod {d} through the old fd", lambda fd=fd: os.fchmod(fd, 0o711))
            p.note(f"fstat {d} through the old fd", p.fields(os.fstat(fd)))
    finally:
        for fd in fds.values():
            os.close(fd)


@scenario
def acl_mode_and_setgid(p: Probe) -> None:
    """Setting an access ACL that is only a mode changes the mode and drops the ACL; a
    caller outside the file's group loses its set-group-ID bit (xfstests generic/375)."""
    r = p.r
    os.chown(r / "own", 1000, 1234)
    os.chmod(r / "own", 0o2775)
    with as_user(1000):
        p.do(
            "setfacl by owner, not in group",
            lambda: _facl("-m", "u::rwx,g::r-x,o::---", str(r / "own")),
        )
    p.stat("own", "own")
    p.xattrs("own xattrs", "own")
    p.do("setfacl minimal on lower", lambda: _facl("-m", "u::rw,g::-,o::-", str(r / "g")))
    p.stat("g", "g")
    p.xattrs("g xattrs", "g")
    p.do("default acl on a lower dir", lambda: _facl("-d", "-m", "g:1234:rwx", str(r / "d")))
    old = os.umask(0)  # see default_acl_and_umask
    try:
        _inherit(p, r / "d", "")
    finally:
        os.umask(old)
    p.do("setfacl on a symlink", lambda: _facl("-h", "-m", "u:1:r", str(r / "sym")))
    p.do("remove default acl", lambda: _facl("-k", str(r / "d")))
    p.do("getfacl d", lambda: _getfacl(r / "d"))


def _inherit(p: Probe, d: Path, what: str) -> None:
    for n, make in (
        ("n", lambda: os.mkdir(d / "n", 0o777)),
        ("p", lambda: os.mkfifo(d / "p", 0o666)),
        ("f", lambda: os.close(os.open(d / "f2", os.O_CREAT | os.O_WRONLY, 0o666))),
    ):
        name = "f2" if n == "f" else n
        p.do(f"{what}make {n}", make)
        p.do(f"{what}getfacl {n}", lambda name=name: _getfacl(d / name))
        p.stat(f"{what}stat {n}", str((d / name).relative_to(p.r)))


@scenario
def default_acl_and_umask(p: Probe) -> None:
    """Under a default ACL the umask does not apply (the ACL stands for it)."""
    r = p.r
    _facl("-d", "-m", "g:1234:rwx", str(r / "m"))
    _inherit(p, r / "m", "")


@scenario
def remove_while_reading_a_big_directory(p: Probe) -> None:
    """rm -r's way: unlink each name as readdir returns it, over many getdents batches,
    in a directory of upper and lower names; telldir positions kept across batches."""
    r = p.r
    for i in range(0, 1200, 2):
        (r / "m" / f"n{i:04d}-{'x' * 40}").write_bytes(b"")
    ds = _Dir(r / "m")
    try:
        marks = []
        for i in range(700):
            if i % 100 == 0:
                marks.append((_libc.telldir(ds.d), ds.next()))
            else:
                ds.next()
        ok = True
        for pos, name in marks:
            _libc.seekdir(ds.d, pos)
            ok = ok and ds.next() == name
        p.note("seekdir to marks across batches", ok)
    finally:
        ds.close()
    ds = _Dir(r / "m")
    removed, errors = 0, []
    try:
        while True:
            try:
                n = ds.next()
            except OSError as e:
                errors.append(o.errno_name(e.errno))
                break
            if n is None:
                break
            if n in (b".", b".."):
                continue
            path = os.path.join(os.fsencode(r / "m"), n)
            try:
                if os.path.isdir(path) and not os.path.islink(path):
                    os.rmdir(path)
                else:
                    os.unlink(path)
                removed += 1
            except OSError as e:
                errors.append(f"{n!r}: {o.errno_name(e.errno)}")
    finally:
        ds.close()
    p.note("removed", removed)
    p.note("errors", errors)
    p.do("left", lambda: sorted(os.listdir(r / "m")))
    p.do("rmdir", lambda: os.rmdir(r / "m"))


@scenario
def attribute_details(p: Probe) -> None:
    """Directory sizes, st_blksize, st_blocks of dense files, and changes that change
    nothing (do they copy up?)."""
    r = p.r

    def extra(n: str) -> dict[str, int]:
        st = os.lstat(r / n)
        return {"size": st.st_size, "blksize": st.st_blksize, "blocks": st.st_blocks}

    for n in (".", "d", "m", "t", "f", "sym", "fifo"):
        p.do(f"details {n}", lambda n=n: extra(n))
    p.do("truncate to the same size", lambda: os.truncate(r / "g", os.path.getsize(r / "g")))
    p.do("setxattr the same value", lambda: os.setxattr(r / "f", "user.x", b"lx"))
    p.do("chmod the same mode", lambda: os.chmod(r / "ro", 0o444))
    p.do(
        "O_RDONLY|O_CREAT of a lower file",
        lambda: os.close(os.open(r / "d/f", os.O_RDONLY | os.O_CREAT)),
    )
    p.do("access W_OK as root", lambda: os.access(r / "own", os.W_OK))
    p.do(
        "chmod 000 then write as root",
        lambda: (os.chmod(r / "m/low", 0), (r / "m/low").write_bytes(b"root"))[1],
    )
    p.read("m/low", "m/low")
    os.symlink("l2", r / "t/l1")
    os.symlink("l1", r / "t/l2")
    p.do("symlink loop", lambda: os.close(os.open(r / "t/l1", os.O_RDONLY)))
    p.do(
        "O_CREAT|O_EXCL on a dangling symlink",
        lambda: os.open(r / "dangling", os.O_CREAT | os.O_EXCL | os.O_WRONLY),
    )
    p.do("mkdir under a file", lambda: os.mkdir(r / "f/x"))
    p.do("getxattr on a whiteout name", lambda: os.getxattr(r / "gone", "user.x"))
    p.do("readlink of a file", lambda: os.readlink(r / "f"))
    p.do("readlink of a dir", lambda: os.readlink(r / "d"))
    p.do("zero-byte write to a lower file", lambda: _write0(r / "sparse"))
    for n in ("d", "m", "f"):
        p.do(f"details {n} after", lambda n=n: extra(n))


def _write0(path: Path) -> int:
    fd = os.open(path, os.O_WRONLY)
    try:
        return os.write(fd, b"")
    finally:
        os.close(fd)


@scenario
def mount_root(p: Probe) -> None:
    """The root of the mount: the upper's root directory, merged with the lowers'."""
    r = p.r
    p.stat("root first", ".")
    p.do("chmod root", lambda: os.chmod(r, 0o711))
    p.do("chown root", lambda: os.chown(r, 1000, 1234))
    p.do("utime root", lambda: os.utime(r, ns=(T1, T1)))
    p.do("setxattr root", lambda: os.setxattr(r, "user.root", b"1"))
    p.do("setxattr opaque on root", lambda: os.setxattr(r, "trusted.overlay.opaque", b"y"))
    p.stat("root after", ".")
    p.xattrs("root xattrs", ".")
    p.names("root names", ".")
    p.do("rmdir root", lambda: os.rmdir(r))
    p.do("rename root", lambda: os.rename(r, r.parent / "elsewhere"))
    p.do("rename into root's parent", lambda: os.rename(r / "f", r.parent / "x"))
    p.do("link out of the mount", lambda: os.link(r / "f", r.parent / "x"))


@scenario
def identity_across_filesystems(p: Probe) -> None:
    """Upper on tmpfs, lowers on the test's filesystem (not samefs, xino off): the
    kernel gives non-directories the st_dev of their layer's filesystem (a pseudo
    device per lower) and their real st_ino; directories the overlay's st_dev."""
    r = p.r
    (r / "new").write_bytes(b"upper")
    os.mkdir(r / "newdir")
    os.chmod(r / "g", 0o600)  # copied up: its st_ino is kept
    names = (".", "m", "d", "t", "newdir", "f", "g", "new", "m/low", "m/high", "t/tf", "sym")
    seen: dict[str, tuple[int, int]] = {}
    for n in names:
        st = os.lstat(r / n)
        seen[n] = (st.st_dev, st.st_ino)
    p.note("(st_dev, st_ino) unique", len(set(seen.values())) == len(seen))
    p.note("st_dev classes", {n: p.dev_class(d) for n, (d, _) in seen.items()})
    p.note(
        "d_ino == st_ino", all(e.inode() == os.lstat(e.path).st_ino for e in os.scandir(r / "m"))
    )


UPPER_ON_TMPFS.add("identity_across_filesystems")


@scenario
def special_names(p: Probe) -> None:
    r = os.fsdecode(p.r)
    p.do("mkdir .", lambda: os.mkdir(f"{r}/m/."))
    p.do("mkdir ..", lambda: os.mkdir(f"{r}/m/.."))
    p.do("rename onto ..", lambda: os.rename(f"{r}/f", f"{r}/m/.."))
    p.do("rename ..", lambda: os.rename(f"{r}/m/..", f"{r}/x"))
    p.do("link onto .", lambda: os.link(f"{r}/f", f"{r}/m/."))
    p.do("unlink .", lambda: os.unlink(f"{r}/m/."))
    p.do("rmdir ..", lambda: os.rmdir(f"{r}/m/.."))
    p.do("symlink named ..", lambda: os.symlink("x", f"{r}/m/.."))
    p.do("mkdir a trailing slash", lambda: os.mkdir(f"{r}/m/new/"))
    p.do("mkdir trailing slashes", lambda: os.mkdir(f"{r}/t/new2//"))
    p.do("create a trailing slash", lambda: os.open(f"{r}/m/file/", os.O_CREAT | os.O_WRONLY))
    p.do("rename dir with slashes", lambda: os.rename(f"{r}/m/new/", f"{r}/m/new3/"))
    p.do("stat f/.", lambda: os.stat(f"{r}/f/."))
    p.do("stat d/sub/../f", lambda: os.stat(f"{r}/d/sub/../f").st_size)
    p.do("wh name create", lambda: os.close(os.open(f"{r}/m/.wh.x", os.O_CREAT | os.O_WRONLY)))
    p.do("wh name lookup", lambda: os.stat(f"{r}/m/.wh.low"))
    p.names("m", "m")


_SX = {"basic": True, "btime": True, "attributes": "0x0"}
DOCUMENTED["statx_fields"] = {
    # pyfuse3 3.5 answers getattr, not statx: no birth time (FUSE_STATX is newer).
    **{f"statx {n}": (_SX, {**_SX, "btime": False}) for n in ("f", "d", "m", "t/tf", "sym")},
    "statx f after copy-up": (_SX, {**_SX, "btime": False}),
}
DOCUMENTED["inode_flags_ioctl"] = {
    # pyfuse3 3.5 has no ioctl handler: the FUSE kernel says ENOTTY (lsattr, chattr).
    "getflags lower f": (ANY, "ENOTTY"),
    "getflags dir": (ANY, "ENOTTY"),
    "setflags noatime on lower g": ("ok", "ENOTTY"),
    "getflags g": (ANY, "ENOTTY"),
    "~upper g": "skip",  # the kernel copied it up to set the flag
}
DOCUMENTED["file_handles"] = {
    # The FUSE kernel encodes handles of its own (node id and generation); the kernel's
    # overlay without nfs_export refuses. Opening one fails on both.
    **{f"name_to_handle_at {n}": ("ENOTSUP", "ok") for n in ("f", "m", "t/tf")},
}

DOCUMENTED["xattr_buffer_sizes"] = {
    # The kernel's size query answers the layer's raw size (escaped names are longer);
    # pyunion's is exact. Both are what listxattr(2) allows: enough for the list.
    "listxattr of an escaped one": (28, 20),
}

DOCUMENTED["fallocate_and_locks"] = {
    # pyfuse3 3.5 has no fallocate handler (docs/semantics.md); glibc's
    # posix_fallocate then writes zeros.
    "fallocate": ("ok", "ENOTSUP"),
    "fallocate keep size": ("ok", "ENOTSUP"),
    "punch hole": ("ok", "ENOTSUP"),
    # What the kernel allocated or punched (and copied up to do so).
    **{f"stat {n}": "skip" for n in ("f", "g", "m/low")},
    **{f"~upper {n}": "skip" for n in ("f", "g", "m/low")},
    **{f"~view {n}": "skip" for n in ("f", "g", "m/low")},
}

DOCUMENTED["default_acl_and_umask"] = {
    # The FUSE kernel takes the umask out of the mode before pyunion sees it (pyfuse3 3.5
    # does not ask for FUSE_DONT_MASK), and the bits it took cannot be told from bits
    # never asked for: under a default ACL the umask (022 here) still applies.
    "getfacl n": (
        "user::rwx\ngroup::r-x\ngroup:1234:rwx\nmask::rwx\nother::r-x\n"
        "default:user::rwx\ndefault:group::r-x\ndefault:group:1234:rwx\n"
        "default:mask::rwx\ndefault:other::r-x\n\n",
        "user::rwx\ngroup::r-x\ngroup:1234:rwx\t#effective:r-x\nmask::r-x\nother::r-x\n"
        "default:user::rwx\ndefault:group::r-x\ndefault:group:1234:rwx\n"
        "default:mask::rwx\ndefault:other::r-x\n\n",
    ),
    "getfacl p": "skip",
    "getfacl f": "skip",
    **{f"stat {n}": "skip" for n in "npf"},
    **{f"~view m/{n}": "skip" for n in ("n", "p", "f2")},
    **{f"~upper m/{n}": "skip" for n in ("n", "p", "f2")},
}

DOCUMENTED["attribute_details"] = {
    # The kernel's copies carry trusted.overlay.origin (and a directory's impure), which
    # here take an xattr block of their own; pyunion writes neither (docs/semantics.md).
    "details m after": "skip",
    "details f after": "skip",
}

DOCUMENTED["identity_across_filesystems"] = {
    # The kernel's readdir gives a merged directory's entries the layer's inode number,
    # which differs from st_ino here, and the view compares st_ino alone, which
    # collides across the two filesystems; pyunion's agree and never collide.
    "d_ino == st_ino": (ANY, True),
    "~view inode sharing": "skip",
    # FUSE has one st_dev for the whole mount; pyunion keeps st_ino unique instead,
    # so (st_dev, st_ino) names one object on both.
    "st_dev classes": (
        {
            ".": 0,
            "m": 0,
            "d": 0,
            "t": 0,
            "newdir": 0,
            "f": 1,
            "g": 1,
            "new": 2,
            "m/low": 1,
            "m/high": 1,
            "t/tf": 1,
            "sym": 1,
        },
        dict.fromkeys(
            (".", "m", "d", "t", "newdir", "f", "g", "new", "m/low", "m/high", "t/tf", "sym"), 0
        ),
    ),
}


def _with_upper_on_tmpfs(name: str) -> None:
    """SCENARIOS[name] again, with the upper on tmpfs (whiteouts, xattrs, holes and
    copy-up across two filesystems)."""
    fn = SCENARIOS[name]

    def again(p: Probe) -> None:
        fn(p)

    again.__name__ = f"{name}__upper_on_tmpfs"
    SCENARIOS[again.__name__] = again
    UPPER_ON_TMPFS.add(again.__name__)
    if name in DOCUMENTED:
        DOCUMENTED[again.__name__] = dict(DOCUMENTED[name])


for _name in (
    "rename_noreplace",
    "rename_exchange",
    "rename_whiteout_flag",
    "rmdir_whiteouts_only",
    "xattr_namespaces",
    "posix_acls",
    "truncate_lower",
    "seek_data_hole",
    "link_lower_file",
    "copy_range_and_sendfile",
    "mknod_kinds",
    "open_flags",
    "chmod_chown_lower_dir",
    "fd_operations_before_copy_up",
):
    _with_upper_on_tmpfs(_name)
DOCUMENTED["link_lower_file__upper_on_tmpfs"] = {
    # With two filesystems the kernel shows the new name of a copied-up file the upper's
    # st_ino and the old name the lower's: one file, two numbers. pyunion shows one.
    **dict.fromkeys(("link", "sym-link", "g", "link after unlink"), "skip"),
}
DOCUMENTED["copy_range_and_sendfile__upper_on_tmpfs"] = {
    # The kernel's overlay hands copy_file_range to the layers' files, on two
    # filesystems here: EXDEV (callers fall back to read/write). The FUSE kernel copies
    # through the page cache instead (pyfuse3 3.5 has no copy_file_range handler).
    "copy_file_range": ("EXDEV", 11),
    "m/copy": (b"wer d", b"wer d data\n"),
    "stat m/copy": "skip",
    "~view m/copy": "skip",
    "~upper m/copy": "skip",
}


def _read_only_ops(p: Probe) -> None:
    r = p.r
    sv = os.statvfs(r)
    p.note("statvfs flags", hex(sv.f_flag))
    p.do("access W_OK", lambda: os.access(r / "f", os.W_OK))
    p.do("faccessat W_OK", lambda: faccessat(r / "f", os.W_OK, AT_EACCESS))
    p.do("access X_OK on a dir", lambda: faccessat(r / "d", os.X_OK, 0))
    p.do("utime", lambda: os.utime(r / "f"))
    p.do("utime omit", lambda: utimensat(r / "f", "omit", "omit"))
    p.do("truncate", lambda: os.truncate(r / "f", 0))
    p.do("open O_RDWR", lambda: os.open(r / "f", os.O_RDWR))
    p.do("open O_RDONLY|O_TRUNC", lambda: os.open(r / "f", os.O_RDONLY | os.O_TRUNC))
    p.do("open O_CREAT existing", lambda: os.close(os.open(r / "f", os.O_RDONLY | os.O_CREAT)))
    p.do("open O_CREAT new", lambda: os.open(r / "new", os.O_RDONLY | os.O_CREAT))
    p.do("mkdir existing", lambda: os.mkdir(r / "d"))
    p.do("mkfifo", lambda: os.mkfifo(r / "p"))
    p.do("chown", lambda: os.chown(r / "f", 1, 1))
    p.do("chmod", lambda: os.chmod(r / "f", 0o600))
    p.do("setxattr", lambda: os.setxattr(r / "f", "user.y", b"1"))
    p.do("removexattr missing", lambda: os.removexattr(r / "f", "user.none"))
    p.do("removexattr present", lambda: os.removexattr(r / "f", "user.x"))
    p.do("unlink missing", lambda: os.unlink(r / "none"))
    p.do("unlink", lambda: os.unlink(r / "f"))
    p.do("rmdir", lambda: os.rmdir(r / "m/sdir"))
    p.do("rename", lambda: os.rename(r / "f", r / "g"))
    p.do("link", lambda: os.link(r / "f", r / "h"))
    p.do("symlink", lambda: os.symlink("f", r / "s"))
    p.do("O_TMPFILE", lambda: os.open(r, O_TMPFILE | os.O_RDWR))
    p.do("mmap shared writable of O_RDONLY", lambda: _map_shared(r / "f"))
    p.do("fsync dir", lambda: _fsync_path(r / "m"))
    p.do("read", lambda: (r / "f").read_bytes())
    p.names("m", "m")


def _map_shared(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        mmap.mmap(fd, 0, flags=mmap.MAP_SHARED, prot=mmap.PROT_WRITE).close()
    finally:
        os.close(fd)


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def test_read_only_mount_matches_kernel() -> None:
    """No upper: every change is EROFS, checked by the VFS first, as for the kernel's
    overlay without an upper (its superblock is read-only)."""
    with tempfile.TemporaryDirectory(prefix="pyunion-dsys-") as t:
        td = Path(t)
        try:
            logs = []
            for impl in ("kernel", "pyunion"):
                lowers = own_base_layers(td, impl)
                mount = kernel_overlay if impl == "kernel" else pyunion_mount
                with mount(lowers, td / f"{impl}-m") as m:
                    p = Probe(m)
                    _read_only_ops(p)
                    logs.append(p.log)
        finally:
            o.rmtree(td)
    kernel, mine = logs
    diffs = [
        f"{k}: kernel {kv!r}, pyunion {pv!r}"
        for (k, kv), (_, pv) in zip(kernel, mine, strict=True)
        if kv != pv
    ]
    assert not diffs, "\n  ".join(diffs)


def _full_upper_ops(p: Probe) -> None:
    r = p.r
    p.do("open a big lower file for writing", lambda: os.close(os.open(r / "big", os.O_RDWR)))
    p.do("chmod it", lambda: os.chmod(r / "big", 0o600))
    p.do("append to it", lambda: (r / "big").open("ab").close())
    p.do("write a small one", lambda: (r / "small").write_bytes(b"x"))
    p.do("a new file too big", lambda: (r / "fill").write_bytes(b"z" * (2 << 20)))
    p.do("mkdir", lambda: os.mkdir(r / "nd"))
    p.do("rename a lower dir too big", lambda: os.rename(r / "d", r / "d2"))
    p.do("unlink the new file", lambda: os.unlink(r / "fill"))
    p.do("truncate the big one to 0", lambda: os.truncate(r / "big", 0))
    p.do("O_TRUNC of a copy of it", lambda: os.close(os.open(r / "big2", os.O_WRONLY | os.O_TRUNC)))
    p.stat("big2", "big2")
    p.do("list d", lambda: len(os.listdir(r / "d")))


def test_full_upper_matches_kernel() -> None:
    """An upper with no room for a copy-up (1 MiB of tmpfs, files of 3 MiB): ENOSPC,
    the view as it was, nothing left in the work dir."""
    with tempfile.TemporaryDirectory(prefix="pyunion-dsys-") as t:
        td = Path(t)
        lower = td / "l"
        (lower / "d").mkdir(parents=True)
        for n in ("big", "big2"):
            (lower / n).write_bytes(os.urandom(3 << 20))
        (lower / "small").write_bytes(b"small")
        for i in range(40):
            (lower / "d" / f"f{i}").write_bytes(os.urandom(40000))
        _times(lower)
        results = {}
        try:
            for impl in ("kernel", "pyunion"):
                fs = td / f"{impl}-fs"
                fs.mkdir()
                subprocess.run(
                    ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(fs)],
                    check=True,
                    timeout=30,
                )
                try:
                    up, work = fs / "u", fs / "w"
                    up.mkdir()
                    work.mkdir()
                    mount = kernel_overlay if impl == "kernel" else pyunion_mount
                    with mount([lower], td / f"{impl}-m", up, work) as m:
                        p = Probe(m)
                        _full_upper_ops(p)
                        view = o.snapshot(m)
                    left = os.listdir(work / "work")
                    results[impl] = (dict(p.log), view, left)
                finally:
                    force_unmount(fs)
        finally:
            o.rmtree(td)
    (klog, kview, kleft), (plog, pview, pleft) = results["kernel"], results["pyunion"]
    assert kleft == pleft == [], (kleft, pleft)
    # The kernel copies the data up before a truncate(2), even to 0 (ENOSPC here);
    # pyunion copies none, as for O_TRUNC. A directory rename is the kernel's EXDEV and
    # pyunion's copy, which runs out of room (docs/semantics.md).
    assert (klog.pop("truncate the big one to 0"), plog.pop("truncate the big one to 0")) == (
        "ENOSPC",
        "ok",
    )
    assert (klog.pop("rename a lower dir too big"), plog.pop("rename a lower dir too big")) == (
        "EXDEV",
        "ENOSPC",
    )
    assert klog == plog
    del kview.entries["big"], pview.entries["big"]
    # Files pyunion's rename copied before it ran out of room stay copied (and "d",
    # merged now, shows st_nlink 1), as mv's copies do after the kernel's EXDEV.
    o.assert_same(kview, pview, "the view after ENOSPC", ignore=("dirlinks",))


DOCUMENTED["special_names"] = {
    # `.wh.` names are pyunion's markers in every layer: refused (docs/formats.md).
    "wh name create": ("ok", "EINVAL"),
    "wh name lookup": ("ENOENT", "EINVAL"),
    "m": "skip",
    "~view m/.wh.x": "skip",
    "~upper m/.wh.x": "skip",
}


@scenario
def xattrs_of_dirs_symlinks_and_nodes(p: Probe) -> None:
    """trusted., security. and user. xattrs on lower directories, symlinks, FIFOs and
    devices (user. is for files and directories only, and on a sticky directory for its
    owner only): each copies its object up, as the kernel does."""
    r = p.r
    p.do("trusted on a lower dir", lambda: os.setxattr(r / "d/sub", "trusted.dx", b"1"))
    p.do("user on a merged dir", lambda: os.setxattr(r / "m", "user.mx", b"2"))
    p.do("security on a top-layer dir", lambda: os.setxattr(r / "t", "security.sx", b"3"))
    p.do("remove a lower dir's", lambda: os.removexattr(r / "d", "user.d"))
    p.do("remove it again", lambda: os.removexattr(r / "d", "user.d"))
    p.do(
        "XATTR_CREATE of an existing one",
        lambda: os.setxattr(r / "m", "user.mx", b"x", os.XATTR_CREATE),
    )
    nofollow = {"follow_symlinks": False}
    p.do("trusted on a symlink", lambda: os.setxattr(r / "dirlink", "trusted.s", b"1", **nofollow))
    p.do(
        "security on a symlink", lambda: os.setxattr(r / "dangling", "security.s", b"1", **nofollow)
    )
    p.do("user on a symlink", lambda: os.setxattr(r / "sym", "user.s", b"1", **nofollow))
    p.do("user through a dir symlink", lambda: os.setxattr(r / "dirlink", "user.follow", b"1"))
    p.xattrs("dirlink itself", "dirlink")
    p.xattrs("dirlink followed", "dirlink", follow=True)
    p.do("remove a symlink's", lambda: os.removexattr(r / "dirlink", "trusted.s", **nofollow))
    p.do("trusted on a lower fifo", lambda: os.setxattr(r / "fifo", "trusted.f", b"1"))
    p.do("user on a lower fifo", lambda: os.setxattr(r / "fifo", "user.f", b"1"))
    p.do("user on a lower device", lambda: os.setxattr(r / "null", "user.f", b"1"))
    with as_user(1001):
        p.do("user. on a sticky dir, not owner", lambda: os.setxattr(r / "tmp", "user.t", b"1"))
    with as_user(1000):
        p.do("user. on her lower dir", lambda: os.setxattr(r / "d", "user.o", b"1"))
        p.do("she lists it", lambda: sorted(os.listxattr(r / "d")))
        p.do("she reads trusted.", lambda: os.getxattr(r / "d/sub", "trusted.dx"))
    p.do(
        "on a dir made over a whiteout",
        lambda: (os.mkdir(r / "gone"), os.setxattr(r / "gone", "user.g", b"1"))[1],
    )
    for n in ("d", "d/sub", "m", "t", "dirlink", "dangling", "fifo", "null", "gone", "tmp"):
        p.xattrs(f"xattrs {n}", n)
        p.stat(f"stat {n}", n)


@scenario
def lower_hard_links(p: Probe) -> None:
    """Names of one lower file, one whited out: st_nlink counts the layer's names, the
    hidden one and the removed ones too, until a copy-up (the kernel's rule)."""
    r = p.r
    for n in ("hl/a", "hl/b", "hla", "hl/t1"):
        p.stat(f"{n} first", n)
    p.do("unlink b", lambda: os.unlink(r / "hl/b"))
    p.stat("a after unlink b", "hl/a")
    p.do("unlink t2", lambda: os.unlink(r / "hl/t2"))
    p.stat("t1 after unlink t2", "hl/t1")
    p.do("link c again", lambda: os.link(r / "hl/t1", r / "hl/c"))
    p.do("chmod a", lambda: os.chmod(r / "hl/a", 0o600))
    p.stat("a after copy-up", "hl/a")
    p.stat("hla after copy-up", "hla")
    p.names("hl", "hl")


_HL = {"mode": "0o100644", "uid": 0, "gid": 0, "size": 7, "atime": T0, "mtime": T0, "dev": 0}
DOCUMENTED["lower_hard_links"] = {
    # A copy-up of a lower file of several names: the kernel (index=off) breaks the link,
    # pyunion links into the upper every name of it the mount has seen (docs/semantics.md).
    "a after copy-up": (
        # and gives it its new upper inode's number (a broken link cannot keep the
        # lower's); pyunion keeps the number.
        {**_HL, "mode": "0o100600", "nlink": 1, "ino": 2},
        {**_HL, "mode": "0o100600", "nlink": 2, "ino": 0},
    ),
    "hla after copy-up": (
        {**_HL, "nlink": 4, "ino": 0},
        {**_HL, "mode": "0o100600", "nlink": 2, "ino": 0},
    ),
    "~view hl/a": "skip",
    "~view hla": "skip",
    "~view inode sharing": "skip",
    "~upper hla": "skip",
    "~upper hl/a": "skip",
}


def _d_types(p: Probe, path: Path) -> list[tuple[bytes, int, int]]:
    """readdir's names with their raw d_type (DT_FIFO, DT_SOCK, DT_CHR, ...) and d_ino
    (as a class: see Probe.ino_class), in name order; "." and ".." are
    directory_inode_numbers'."""
    ds = _Dir(path)
    out = []
    try:
        while True:
            ctypes.set_errno(0)
            e = _libc.readdir(ds.d)
            if not e:
                break
            if e.contents.d_name not in (b".", b".."):
                out.append((e.contents.d_name, e.contents.d_type, e.contents.d_ino))
    finally:
        ds.close()
    return [(n, t, p.ino_class(i)) for n, t, i in sorted(out)]


@scenario
def readdir_d_types(p: Probe) -> None:
    r = p.r
    s = socket.socket(socket.AF_UNIX)
    try:
        s.bind(os.fsdecode(r / "m/sock"))
    finally:
        s.close()
    os.mknod(r / "m/blk", stat.S_IFBLK | 0o600, os.makedev(7, 0))
    os.mknod(r / "m/sockn", stat.S_IFSOCK | 0o600)
    os.mkfifo(r / "m/fifo")
    for d in (".", "m", "d", "t", "hl"):
        p.do(f"d_types {d}", lambda d=d: _d_types(p, r / d))


@scenario
def open_o_trunc(p: Probe) -> None:
    """open(O_TRUNC) of lower objects: a file is copied up without its data but with its
    xattrs; FIFOs and devices are opened, not copied up; a user needs write permission."""
    r = p.r
    p.do("O_TRUNC of a lower file", lambda: os.close(os.open(r / "f", os.O_WRONLY | os.O_TRUNC)))
    p.xattrs("f xattrs", "f")
    p.stat("f", "f")
    with as_user(1000):
        p.do("by its owner", lambda: os.close(os.open(r / "own", os.O_RDWR | os.O_TRUNC)))
        p.do("not hers", lambda: os.close(os.open(r / "g", os.O_WRONLY | os.O_TRUNC)))
        p.do(
            "not hers, O_CREAT",
            lambda: os.close(os.open(r / "g", os.O_WRONLY | os.O_TRUNC | os.O_CREAT, 0o666)),
        )
        p.do(
            "a FIFO, O_RDONLY",
            lambda: os.close(os.open(r / "fifo", os.O_RDONLY | os.O_TRUNC | os.O_NONBLOCK)),
        )
    p.do(
        "a FIFO as root",
        lambda: os.close(os.open(r / "fifo", os.O_RDWR | os.O_TRUNC | os.O_NONBLOCK)),
    )
    p.do("a device", lambda: os.close(os.open(r / "null", os.O_WRONLY | os.O_TRUNC)))
    p.do("a directory", lambda: os.open(r / "d", os.O_RDONLY | os.O_TRUNC))
    p.do("a sparse file", lambda: os.close(os.open(r / "sparse", os.O_WRONLY | os.O_TRUNC)))
    for n in ("own", "g", "fifo", "null", "sparse"):
        p.stat(n, n)


@scenario
def access_of_nodes_and_links(p: Probe) -> None:
    """faccessat(AT_EACCESS) on FIFOs, devices, symlinks (followed or not) and a
    set-group-ID directory, as two users; root's X_OK needs an execute bit somewhere."""
    r = p.r
    for uid in (1000, 1001):
        with as_user(uid):
            for n in ("fifo", "null", "sgid", "dangling", "dirlink", "tmp/u1000", "m/low"):
                for mode in (os.R_OK, os.W_OK, os.X_OK):
                    p.do(
                        f"{uid} {n} {mode}",
                        lambda n=n, m=mode: faccessat(r / n, m, AT_EACCESS),
                    )
                p.do(
                    f"{uid} {n} W_OK nofollow",
                    lambda n=n: faccessat(r / n, os.W_OK, AT_EACCESS | AT_SYMLINK_NOFOLLOW),
                )
    os.chmod(r / "f", 0o000)
    p.do("root X_OK of a 000 file", lambda: faccessat(r / "f", os.X_OK, AT_EACCESS))
    p.do("root R_OK of a 000 file", lambda: faccessat(r / "f", os.R_OK, AT_EACCESS))
    os.chmod(r / "g", 0o010)
    p.do("root X_OK of a 010 file", lambda: faccessat(r / "g", os.X_OK, AT_EACCESS))


@scenario
def rename_flags_of_directories(p: Probe) -> None:
    """RENAME_EXCHANGE and RENAME_NOREPLACE of upper and lower directories."""
    r = p.r
    os.mkdir(r / "u1")
    os.mkdir(r / "u2")
    (r / "u2" / "x").write_bytes(b"x")
    p.do("exchange two upper dirs", lambda: renameat2(r / "u1", r / "u2", RENAME_EXCHANGE))
    p.do(
        "exchange an upper dir with a lower one",
        lambda: renameat2(r / "u1", r / "m/tdir", RENAME_EXCHANGE),
    )
    p.do("noreplace of a lower dir", lambda: renameat2(r / "d", r / "d2", RENAME_NOREPLACE))
    p.do("noreplace of an upper dir", lambda: renameat2(r / "u2", r / "m/u2", RENAME_NOREPLACE))
    p.do("upper dir over an empty lower one", lambda: os.rename(r / "m/u2", r / "m/sdir"))
    p.names("m/sdir", "m/sdir")
    p.xattrs("m/sdir xattrs", "m/sdir")
    p.do(
        "mkdir, into a merged dir, rmdir",
        lambda: (os.mkdir(r / "nd"), os.rename(r / "nd", r / "m/nd"), os.rmdir(r / "m/nd"))[2],
    )
    p.names("m", "m")


DOCUMENTED["rename_flags_of_directories"] = {
    # A directory with lower content: the kernel (redirect_dir=off) says EXDEV, pyunion
    # copies it up and renames it (docs/semantics.md).
    "exchange an upper dir with a lower one": ("EXDEV", "ok"),
    "noreplace of a lower dir": ("EXDEV", "ok"),
    "~upper": "skip",
    **{f"~view {n}{sub}": "skip" for n in ("d", "d2") for sub in ("", "/f", "/sub", "/sub/deep")},
    **{f"~view {n}": "skip" for n in ("u1", "u1/x", "m/tdir", "m/tdir/x")},
}


@scenario
def mknod_modes(p: Probe) -> None:
    r = p.r
    p.do("a socket", lambda: os.mknod(r / "m/s", stat.S_IFSOCK | 0o644))
    p.do("no type: a file", lambda: os.mknod(r / "m/f0", 0o644))
    p.do("a directory", lambda: os.mknod(r / "m/dd", stat.S_IFDIR | 0o755))
    p.do("a bad type", lambda: os.mknod(r / "m/bad", 0o170000 | 0o644))
    p.do("a set-user-ID FIFO", lambda: os.mknod(r / "m/su", stat.S_IFIFO | 0o4777))
    with as_user(1000):
        p.do("a socket by a user", lambda: os.mknod(r / "tmp/s", stat.S_IFSOCK | 0o600))
        p.do("a FIFO in a set-group-ID dir", lambda: os.mknod(r / "sgid/s", stat.S_IFIFO | 0o2770))
    for n in ("m/s", "m/f0", "m/su", "tmp/s", "sgid/s"):
        p.stat(n, n)


@scenario
def chmod_chown_of_nodes(p: Probe) -> None:
    """Owner and mode changes of lower symlinks and FIFOs, by users within their rights,
    and the set-ID bits a chown or a write by the owner clears."""
    r = p.r
    p.do("chown a symlink", lambda: os.chown(r / "dangling", 1000, 1000, follow_symlinks=False))
    p.do("chown a FIFO", lambda: os.chown(r / "fifo", 1000, 1234))
    p.do("chmod a FIFO set-user-ID", lambda: os.chmod(r / "fifo", 0o4640))
    with as_user(1000):
        p.do("g+s outside the group", lambda: os.chmod(r / "own", 0o2755))
        p.do("chgrp to her own group", lambda: os.chown(r / "own", -1, 1000))
        p.do("chown -1 -1", lambda: os.chown(r / "own", -1, -1))
        p.do("chmod her lower dir sticky", lambda: os.chmod(r / "d", 0o1750))
    os.chmod(r / "ro", 0o6755)
    p.do("root chowns a 6755 file", lambda: os.chown(r / "ro", 1000, -1))
    p.stat("ro after chown", "ro")
    os.chmod(r / "d/f", 0o2775)
    os.chown(r / "d/f", 1000, 1234)
    with as_user(1000, 1234):
        p.do("her write to her 2775 file", lambda: (r / "d/f").write_bytes(b"w"))
    p.stat("d/f after write", "d/f")
    for n in ("dangling", "fifo", "own", "d"):
        p.stat(n, n)


for _name in (
    "xattrs_of_dirs_symlinks_and_nodes",
    "open_o_trunc",
    "chmod_chown_of_nodes",
    "rename_flags_of_directories",
):
    _with_upper_on_tmpfs(_name)


# After every scenario and DOCUMENTED entry: the parameters are taken here.
@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_scenario_matches_kernel(name: str) -> None:
    run_scenario(name)
