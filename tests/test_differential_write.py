"""Writes against kernel overlayfs: random operation sequences, then programs as users run them.

A generated sequence of operations runs on three trees in lockstep:
- K, kernel overlayfs over the lower layers (kernel format) with its own upper;
- P, pyunion over the same lower layers with its own upper;
- D, a plain directory copy of the merged view: the oracle where pyunion
  deliberately does better than the kernel (renaming a directory that has
  lower content, where the kernel says EXDEV).
Every operation's result (ok or errno) on P must match K's, or D's where K
said EXDEV; after that K no longer follows (it refused what the others did)
and D is the oracle. After every step P's view must equal the oracle's.
After the sequence the upper P wrote must obey docs/formats.md (no whiteout in an
opaque dir, none for a name no lower has) and must show the same view when
mounted again by pyunion and by kernel overlayfs over the same lowers.

PYUNION_EXAMPLES=N runs N sequences per test instead of the default.
"""

from __future__ import annotations

import contextlib
import hashlib
import mmap
import os
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import oracle as o
import pytest
from hypothesis import example, given
from hypothesis import strategies as st
from support import as_user, getdents, kernel_overlay, kernel_overlay_skip_reason, pyunion_mount

pytestmark = pytest.mark.skipif(
    kernel_overlay_skip_reason() is not None, reason=kernel_overlay_skip_reason() or ""
)

# --------------------------------------------------------------------------------------------
# Operations. Each is a tuple (name, args...) so that a failing sequence prints readably.

Op = tuple

_NB = os.O_NONBLOCK  # a fifo must never block a test: O_WRONLY on one gives ENXIO


def _create(r: Path, p: str, mode: int, how: str) -> None:
    flags = (
        os.O_CREAT | os.O_WRONLY | _NB | {"excl": os.O_EXCL, "trunc": os.O_TRUNC, "plain": 0}[how]
    )
    os.close(os.open(r / p, flags, mode))


def _write(r: Path, p: str, off: int, data: bytes) -> None:
    fd = os.open(r / p, os.O_WRONLY | _NB)
    try:
        assert os.pwrite(fd, data, off) == len(data)
    finally:
        os.close(fd)


def _append(r: Path, p: str, data: bytes) -> None:
    fd = os.open(r / p, os.O_WRONLY | os.O_APPEND | _NB)
    try:
        # Not into a FIFO (open while a held handle reads it): the write changes its
        # mtime in the plain copy, not through kernel overlayfs, which shows its layer's
        # inode's (special_files_copy_up compares that with the kernel).
        if not stat.S_ISFIFO(os.fstat(fd).st_mode):
            os.write(fd, data)
    finally:
        os.close(fd)


def _otrunc(r: Path, p: str) -> None:
    os.close(os.open(r / p, os.O_WRONLY | os.O_TRUNC | _NB))


class _Stale(Exception):
    """A handle opened before a write (and so before a copy-up) read old data."""


def _readwrite_same_handle(r: Path, p: str, data: bytes) -> None:
    """Open for reading, then write through another handle: the first must see it."""
    rfd = os.open(r / p, os.O_RDONLY | _NB)
    try:
        before = os.pread(rfd, 1 << 16, 0)
        _write(r, p, 0, data)
        after = os.pread(rfd, 1 << 16, 0)
        expect = data + before[len(data) :]
        if after != expect:
            raise _Stale()
    finally:
        os.close(rfd)


def _copy_range(r: Path, src: str, dst: str, count: int, off_out: int) -> None:
    """copy_file_range from the start of SRC into DST at OFF_OUT (the FUSE kernel copies
    through the page cache; the kernel's overlay hands it to the layers' files)."""
    sfd = os.open(r / src, os.O_RDONLY | _NB)
    try:
        dfd = os.open(r / dst, os.O_WRONLY | _NB)
        try:
            os.copy_file_range(sfd, dfd, count, 0, off_out)
        finally:
            os.close(dfd)
    finally:
        os.close(sfd)


def _mmap_write(r: Path, p: str, off: int, data: bytes) -> None:
    """A shared writable map of the file, DATA stored at OFF (or at the end of a file
    too short for it, nothing into an empty one), flushed, unmapped: then read back."""
    fd = os.open(r / p, os.O_RDWR | _NB)
    try:
        size = os.fstat(fd).st_size
        if size:
            m = mmap.mmap(fd, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
            try:
                data = data[:size]
                off = min(off, size - len(data))
                m[off : off + len(data)] = data
                m.flush()
            finally:
                m.close()
    finally:
        os.close(fd)


OPS: dict[str, Callable[..., object]] = {
    "create": _create,
    "write": _write,
    "append": _append,
    "otrunc": _otrunc,
    "coherent": _readwrite_same_handle,
    "truncate": lambda r, p, n: os.truncate(r / p, n),
    "chmod": lambda r, p, m: os.chmod(r / p, m),
    "chown": lambda r, p, u, g, f: os.chown(r / p, u, g, follow_symlinks=f),
    "utime": lambda r, p, t, f: os.utime(r / p, ns=(t, t), follow_symlinks=f),
    "utime_now": lambda r, p: os.utime(r / p),
    "utimens": lambda r, p, a, m, f: o.utimensat(r / p, a, m, 0 if f else o.AT_SYMLINK_NOFOLLOW),
    "access": lambda r, p, m: o.faccessat(r / p, m, o.AT_EACCESS),
    "copy_range": _copy_range,
    "mmap_write": _mmap_write,
    "mknod_sock": lambda r, p: os.mknod(r / p, 0o140640),
    "setxattr": lambda r, p, k, v, f: os.setxattr(r / p, k, v, follow_symlinks=f),
    "removexattr": lambda r, p, k: os.removexattr(r / p, k),
    "mkdir": lambda r, p, m: os.mkdir(r / p, m),
    "rmdir": lambda r, p: os.rmdir(r / p),
    "unlink": lambda r, p: os.unlink(r / p),
    "rename": lambda r, a, b, fl: o.renameat2(r / a, r / b, fl),
    "link": lambda r, a, b: os.link(r / a, r / b, follow_symlinks=False),
    "symlink": lambda r, t, p: os.symlink(t, r / p),
    "mkfifo": lambda r, p, m: os.mkfifo(r / p, m),
    "mknod_null": lambda r, p: os.mknod(r / p, 0o20666, os.makedev(1, 3)),
    "umask": lambda r, m: None,  # these two change the process, see Run.step
    "user": lambda r, u: None,
    "hold": lambda r, p: None,  # these two use handles kept open, see Run.apply
    "readheld": lambda r: None,
    "peek": lambda r: None,  # see Run.peeking
}


def apply(root: Path, op: Op) -> str:
    """Run OP on the tree at ROOT: "ok" or the errno's name."""
    try:
        OPS[op[0]](root, *op[1:])
    except OSError as e:
        return o.errno_name(e.errno)
    except _Stale:
        return "STALE-READ"
    return "ok"


# --------------------------------------------------------------------------------------------
# Strategies.

NAMES = o.NAMES
NEW_NAMES = ("n1", *NAMES, "n2")
# Paths are mostly references, resolved against the plain copy just before each step (it
# always shows what the view must be), so that most operations find something to act on:
# ("E", k) is the k-th existing name (sorted, modulo their number), ("F", k) the k-th
# non-directory, ("D", k) the k-th directory, ("N", k, name) NAME in the k-th directory
# or the root. Plain strings are used as they are.
_k = st.integers(0, 40)
any_st = st.tuples(st.just("E"), _k)
file_st = st.tuples(st.just("F"), _k)
dir_st = st.tuples(st.just("D"), _k)
new_st = st.tuples(st.just("N"), _k, st.sampled_from(NEW_NAMES))
literal_st = (
    st.integers(1, 3).flatmap(lambda n: st.tuples(*[st.sampled_from(NAMES)] * n)).map("/".join)
)
data_path_st = st.one_of(file_st, file_st, file_st, any_st, literal_st)
meta_path_st = st.one_of(any_st, any_st, file_st, dir_st, st.just("."), literal_st)
target_st = st.one_of(new_st, new_st, new_st, any_st)
follow_st = st.sampled_from((True, True, False))
DATAS = (b"W", b"written", b"\x00" * 10, b"Q" * 3000)
_utime_spec = st.sampled_from(("now", "omit", o.BASE_TIME_NS + 11 * 86_400 * 10**9 + 3))
_offsets = st.sampled_from((0, 3, 4096))
T1 = o.BASE_TIME_NS + 7 * 86_400 * 10**9 + 5


def _listing(root: Path) -> dict[str, list[str]]:
    """Names under ROOT by reference kind, sorted; symlinks are not followed."""
    files, dirs = [], []

    def walk(d: Path, rel: str) -> None:
        for e in sorted(os.scandir(d), key=lambda e: e.name):
            r = e.name if rel == "." else f"{rel}/{e.name}"
            if e.is_dir(follow_symlinks=False):
                dirs.append(r)
                walk(Path(e.path), r)
            else:
                files.append(r)

    walk(root, ".")
    return {"E": sorted(files + dirs), "F": files, "D": dirs, "N": [".", *dirs]}


def resolve(op: Op, root: Path) -> Op:
    """OP with its path references replaced by the paths they stand for now."""
    found = _listing(root)
    out: list[object] = [op[0]]
    for a in op[1:]:
        if isinstance(a, tuple) and a and a[0] in found:
            cands = found[a[0]]
            if a[0] == "N":
                d = cands[a[1] % len(cands)]
                a = a[2] if d == "." else f"{d}/{a[2]}"
            else:
                a = cands[a[1] % len(cands)] if cands else "a"
        out.append(a)
    return tuple(out)


def _op(name: str, *args: st.SearchStrategy) -> st.SearchStrategy[Op]:
    return st.tuples(st.just(name), *args)


_structural = (
    _op(
        "rename",
        st.one_of(file_st, dir_st, dir_st, any_st, literal_st),
        st.one_of(new_st, new_st, file_st, dir_st, literal_st),
        st.sampled_from((0, 0, 0, o.RENAME_NOREPLACE, o.RENAME_EXCHANGE)),
    ),
    _op("rmdir", st.one_of(dir_st, dir_st, dir_st, any_st)),
    _op("unlink", st.one_of(file_st, file_st, file_st, any_st)),
    _op("mkdir", target_st, st.sampled_from((0o755, 0o700, 0o2775, 0o1777, 0o555))),
    _op("link", st.one_of(file_st, file_st, any_st), target_st),
)
op_st = st.one_of(
    *_structural,
    *_structural,
    *_structural,  # weighted: where the hard cases are
    _op(
        "create",
        target_st,
        st.sampled_from((0o644, 0o777, 0o600, 0o4755)),
        st.sampled_from(("excl", "trunc", "plain")),
    ),
    _op("write", data_path_st, st.sampled_from((0, 1, 4, 4096, 70000)), st.sampled_from(DATAS)),
    _op("append", data_path_st, st.sampled_from(DATAS)),
    _op("otrunc", data_path_st),
    _op("coherent", data_path_st, st.sampled_from(DATAS)),
    _op("truncate", data_path_st, st.sampled_from((0, 2, 10000))),
    _op(
        "chmod", meta_path_st, st.sampled_from((0o644, 0o4755, 0o2755, 0o1777, 0o000, 0o700, 0o555))
    ),
    _op(
        "chown",
        meta_path_st,
        st.sampled_from((0, 1000, 65534, -1)),
        st.sampled_from((0, 1000, 1234, -1)),
        follow_st,
    ),
    _op("utime", meta_path_st, st.sampled_from((T1, o.BASE_TIME_NS, 0)), follow_st),
    _op("utime_now", meta_path_st),
    _op("utimens", meta_path_st, _utime_spec, _utime_spec, follow_st),
    _op("access", meta_path_st, st.sampled_from((os.R_OK, os.W_OK, os.X_OK, os.W_OK | os.X_OK))),
    _op("copy_range", data_path_st, data_path_st, st.sampled_from((1, 7, 5000)), _offsets),
    _op("mmap_write", data_path_st, _offsets, st.sampled_from(DATAS)),
    _op("mknod_sock", target_st),
    _op(
        "setxattr",
        meta_path_st,
        st.sampled_from(("user.one", "user.new", "trusted.three", "trusted.new")),
        st.sampled_from((b"1", b"", b"22" * 50)),
        follow_st,
    ),
    _op("removexattr", meta_path_st, st.sampled_from(("user.one", "user.two", "trusted.three"))),
    _op("symlink", st.sampled_from(o.SYMLINK_TARGETS), target_st),
    _op("mkfifo", target_st, st.sampled_from((0o644, 0o600))),
    _op("mknod_null", target_st),
    _op("umask", st.sampled_from((0o022, 0o000, 0o077))),
    _op("user", st.sampled_from((1000, 0))),
    _op("user", st.sampled_from((1000, 0))),
    _op("hold", data_path_st),
    _op("readheld"),
    _op("readheld"),
    _op("peek"),
    _op("peek"),
)
ops_st = st.lists(op_st, min_size=3, max_size=25)


def lowers_st(formats: bool) -> st.SearchStrategy[list[o.Dir]]:
    # No hard links below: the kernel (without index) breaks them on copy-up and pyunion
    # deliberately does not, so they get their own test against the plain-copy oracle.
    # No devices: the operations open what they find.
    return o.stack_st(
        min_layers=1, max_layers=3, max_depth=2, hardlinks=False, formats=formats, devices=False
    )


# --------------------------------------------------------------------------------------------
# The run.


@contextlib.contextmanager
def _as_user(uid: int) -> Iterator[None]:
    """Run the block with effective uid and gid UID (no supplementary groups) unless 0:
    the kernel checks permissions, and clears set-id bits on an unprivileged write."""
    if uid == 0:
        yield
        return
    with as_user(uid):
        yield


@contextlib.contextmanager
def _umask(mask: int) -> Iterator[None]:
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


IN_PLACE = {
    "write",
    "append",
    "otrunc",
    "coherent",
    "truncate",
    "chmod",
    "chown",
    "utime",
    "utime_now",
    "utimens",
    "mmap_write",
    "setxattr",
    "removexattr",
}


def _ino(root: Path, op: Op) -> int | None:
    """st_ino of what an in-place operation changes (None for other operations)."""
    if op[0] not in IN_PLACE:
        return None
    follow = op[-1] if op[0] in ("chown", "utime", "utimens", "setxattr") else True
    try:
        return os.stat(root / op[1], follow_symlinks=follow).st_ino
    except OSError:
        return None


class Run:
    """One sequence on K, P and D; `history` says what happened, for failure messages."""

    def __init__(self, td: Path) -> None:
        self.td = td
        self.history: list[str] = []
        self.synced = True  # K still follows (it never refused what the others did)
        self.uid = 0  # who runs the operations
        self.held: dict[Path, list[int]] = {}  # handles kept open, by tree
        # After ("peek",): the next two operations run with the start of every listing
        # read after each, and no compare between them (a compare reads listings whole).
        self.peeking = 0

    def fail(self, msg: str) -> None:
        hist = "\n    ".join(self.history) or "(none)"
        raise AssertionError(f"{msg}\n  operations so far (result on pyunion):\n    {hist}")

    ignore: tuple[str, ...] = ()

    def apply(self, root: Path, op: Op) -> str:
        """apply(), plus the operations on handles kept open across steps: what is read
        through a handle opened before a copy-up, a rename or an unlink."""
        if op[0] == "hold":
            try:
                fd = os.open(root / op[1], os.O_RDONLY | _NB)
            except OSError as e:
                return o.errno_name(e.errno)
            self.held.setdefault(root, []).append(fd)
            return "ok"
        if op[0] == "readheld":
            out = []
            for fd in self.held.get(root, []):
                try:
                    data = os.pread(fd, 1 << 20, 0)
                    out.append(f"{len(data)}:{hashlib.sha256(data).hexdigest()[:8]}")
                except OSError as e:
                    out.append(o.errno_name(e.errno))
            return "ok " + ",".join(out)
        return apply(root, op)

    def close_held(self) -> None:
        for fds in self.held.values():
            for fd in fds:
                os.close(fd)
        self.held.clear()

    def compare(self, k: Path | None, p: Path, d: Path, when: str) -> o.Snapshot:
        sp = o.snapshot(p)
        if sp.ghosts:
            self.fail(f"{when}: pyunion's readdir lists names lstat cannot find: {sp.ghosts}")
        bad = o.dino_mismatches(sp)
        if bad:
            self.fail(f"{when}: pyunion's readdir d_ino != st_ino: {bad}")
        if self.synced and k is not None:
            ref, name = o.snapshot(k), "kernel"
        else:
            ref, name = o.snapshot(d), "plain copy"
        diffs = o.diff(ref, sp, self.ignore + (() if name == "kernel" else o.PLAIN_IGNORE))
        if diffs:
            self.fail(
                f"{when}: pyunion differs from the {name} (expected = {name}, "
                "got = pyunion):\n    " + "\n    ".join(diffs[:30])
            )
        return sp

    def step(self, i: int, op: Op, k: Path | None, p: Path, d: Path) -> None:
        op = resolve(op, d)
        if op[0] == "peek":
            self.peeking = 2
            self.history.append(f"{i}: {op}")
            return
        if op[0] in ("umask", "user"):
            if op[0] == "umask":
                os.umask(op[1])
            else:
                self.uid = op[1]
            self.history.append(f"{i}: {op}")
            return
        with _as_user(self.uid):
            rd = self.apply(d, op)
            rk = self.apply(k, op) if self.synced and k is not None else None
        ino_before = _ino(p, op)
        with _as_user(self.uid):
            rp = self.apply(p, op)
        self.history.append(f"{i}: {op} -> {rp}")
        if rp == "ok" and ino_before is not None and _ino(p, op) != ino_before:
            self.fail(
                f"step {i} {op}: st_ino changed from {ino_before} to {_ino(p, op)} "
                "(copy-up must keep it)"
            )
        if rk == "EXDEV" and op[0] == "rename":
            expected, by = rd, "the plain copy (the kernel said EXDEV)"
            if rd == "ok":
                self.synced = False
        elif rk is not None:
            expected, by = rk, "the kernel"
            if rd != rk:
                self.fail(
                    f"step {i} {op}: the oracles disagree: kernel {rk}, plain copy {rd} "
                    "(a harness problem, not pyunion's)"
                )
        else:
            expected, by = rd, "the plain copy"
        if rp != expected:
            self.fail(
                f"step {i} {op}: pyunion gave {rp}, expected {expected} from {by} "
                f"(kernel: {rk}, plain copy: {rd})"
            )
        if self.peeking:
            self.peek(k, p, d)
            self.peeking -= 1
            if self.peeking:
                return
        self.compare(k, p, d, f"after step {i} {op}")

    def peek(self, k: Path | None, p: Path, d: Path) -> None:
        """Read the start of every directory's listing (a few names, as a program that
        stops early): the kernel keeps that part of each listing when the next
        operation changes the directory, and the compare after it reads them whole."""
        # The kernel's tree only while it follows (after an EXDEV it lacks what D has).
        for root in (k if self.synced else None, p):
            for rel in _listing(d)["N"]:
                if root is not None:
                    fd = os.open(root / rel, os.O_RDONLY | os.O_DIRECTORY)
                    try:
                        getdents(fd, 64)
                    finally:
                        os.close(fd)


def run_sequence(
    lowers: list[o.Dir], ops: list[Op], td: Path, uid: int = 0, kernel: bool = True
) -> None:
    """OPS on K, P and D (kernel=False: on P and D only, D copied from P's view)."""
    raw = o.build_stack(td / "raw", lowers, kernel=False)
    conv = o.build_stack(td / "conv", lowers, kernel=True)
    for n in ("ku", "kw", "pu", "pw", "kw2"):
        (td / n).mkdir()
    run = Run(td)
    run.uid = uid
    with contextlib.ExitStack() as stack:
        stack.enter_context(_umask(0o022))
        k = (
            stack.enter_context(kernel_overlay(conv, td / "mk", td / "ku", td / "kw"))
            if kernel
            else None
        )
        p = stack.enter_context(pyunion_mount(raw, td / "mp", td / "pu", td / "pw"))
        d = td / "plain"
        o.copy_tree(k or p, d)
        if k is None:
            run.synced = False
            # The plain copy counts only the names it shows; a lower file also counts
            # names that a layer above hides, as in the kernel.
            run.ignore = ("nlink",)
        else:
            o.assert_same(
                o.snapshot(k),
                o.snapshot(d),
                "harness: the plain copy of the kernel",
                o.PLAIN_IGNORE,
            )
        run.compare(k, p, d, "before any operation")
        try:
            for i, op in enumerate(ops):
                run.step(i, op, k, p, d)
        finally:
            run.close_held()
        final = run.compare(k, p, d, "after the sequence")
        if run.synced and k is not None:
            o.assert_same(
                o.snapshot(k),
                o.snapshot(d),
                "harness: kernel vs plain copy at the end",
                o.PLAIN_IGNORE,
            )
    problems = o.upper_problems(td / "pu", conv)
    if problems:
        run.fail("the upper pyunion left breaks the format rules:\n    " + "\n    ".join(problems))
    with pyunion_mount(raw, td / "mp2", td / "pu", td / "pw") as p2:
        again = o.snapshot(p2)
    d1 = o.diff(final, again)
    if d1:
        run.fail(
            "pyunion mounted again over its own upper shows another view:\n    "
            + "\n    ".join(d1[:30])
        )
    with kernel_overlay(conv, td / "mk2", td / "pu", td / "kw2") as k2:
        kview = o.snapshot(k2)
    d2 = o.diff(kview, final)
    if d2:
        run.fail(
            "kernel overlayfs over pyunion's upper shows another view (expected = kernel, "
            "got = pyunion before unmount):\n    " + "\n    ".join(d2[:30])
        )


@contextlib.contextmanager
def _tempdir(prefix: str) -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix=prefix) as t:
        os.chmod(t, 0o755)  # operations run as a user too
        try:
            yield Path(t)
        finally:
            o.rmtree(Path(t))


_ABC = o.Dir(tuple((n, o.File(n.encode(), o.Meta(0o644))) for n in o.NAMES), o.Meta(0o755))


@o.settings_for(90)
@given(lowers=lowers_st(formats=False), ops=ops_st, uid=st.sampled_from((0, 1000)))
# The start of a merged directory's listing kept after a change, then a copy-up in it
# (which reorders the merged listing, unseen by the kernel): readdir offsets that were
# indexes of one listing made the next full listing lose the copied-up name.
@example(
    lowers=[o.Dir((("d", _ABC),), o.Meta(0o755))],
    ops=[
        ("create", "d/n1", 0o644, "excl"),
        ("peek",),
        ("unlink", "d/n1"),
        ("append", "d/c", b"x"),
    ],
    uid=0,
)
def test_operations_match_kernel(lowers: list[o.Dir], ops: list[Op], uid: int) -> None:
    """Lower layers in the kernel format; the main write-side test. UID runs the
    operations until a ("user", N) operation says otherwise."""
    with _tempdir("pyunion-dwrite-") as td:
        run_sequence(lowers, ops, td, uid)


@o.settings_for(35)
@given(lowers=lowers_st(formats=True), ops=ops_st, uid=st.sampled_from((0, 1000)))
def test_operations_over_every_marker_format(lowers: list[o.Dir], ops: list[Op], uid: int) -> None:
    """Lower layers in every format docs/formats.md lists (the kernel mounts them converted)."""
    with _tempdir("pyunion-dwritef-") as td:
        run_sequence(lowers, ops, td, uid)


# --------------------------------------------------------------------------------------------
# Hard links of a lower file: pyunion keeps the names one inode (the kernel without index
# does not), so the oracle is the plain copy.


@o.settings_for(30)
@given(
    lowers=o.stack_st(
        min_layers=1, max_layers=3, max_depth=2, hardlinks=True, formats=False, devices=False
    ),
    ops=ops_st,
)
def test_operations_over_lower_hard_links(lowers: list[o.Dir], ops: list[Op]) -> None:
    """Lower layers with hard links; pyunion against the plain copy only. Every name is
    looked up after every step, so pyunion must keep all names of a file one inode."""
    with _tempdir("pyunion-dwritel-") as td:
        run_sequence(lowers, ops, td, kernel=False)


def test_lower_hard_links_stay_linked_after_copy_up(tmp_path: Path) -> None:
    lower = tmp_path / "l"
    (lower / "d").mkdir(parents=True)
    (lower / "f").write_bytes(b"one")
    os.link(lower / "f", lower / "g")
    os.link(lower / "f", lower / "d" / "h")
    for n in ("u", "w"):
        (tmp_path / n).mkdir()
    ops: list[Op] = [
        ("write", "f", 0, b"TWO"),
        ("chmod", "g", 0o600),
        ("link", "d/h", "d/i"),
        ("unlink", "g"),
        ("append", "d/i", b"!"),
    ]
    with pyunion_mount([lower], tmp_path / "m", tmp_path / "u", tmp_path / "w") as p:
        d = tmp_path / "plain"
        o.copy_tree(p, d)
        o.assert_same(o.snapshot(d), o.snapshot(p), "before any operation", o.PLAIN_IGNORE)
        for op in ops:
            assert apply(p, op) == apply(d, op), op
            o.assert_same(o.snapshot(d), o.snapshot(p), f"after {op}", o.PLAIN_IGNORE)


# --------------------------------------------------------------------------------------------
# Programs as users run them. Each script runs with its working directory in the mount,
# first on kernel overlayfs, then on pyunion, both mounted at the same path (programs
# write that path into files: venv's pyvenv.cfg), over the same lower layers. The two
# views must be equal, and the upper pyunion leaves must mount under the kernel with the
# same view.

Populate = Callable[[list[Path]], None]


def _base_lowers(ls: list[Path]) -> None:
    top, bottom = ls
    (bottom / "etc").mkdir()
    (bottom / "etc" / "conf").write_text("name=old\nkeep=1\n")
    (bottom / "etc" / "ro").write_text("read-only\n")
    os.chmod(bottom / "etc" / "ro", 0o444)
    (bottom / "srv" / "data" / "deep").mkdir(parents=True)
    (bottom / "srv" / "data" / "deep" / "f").write_bytes(b"deep\n" * 100)
    (bottom / "srv" / "data" / "x").write_bytes(b"x")
    os.setxattr(bottom / "srv" / "data" / "x", "user.tag", b"lower")
    os.symlink("deep/f", bottom / "srv" / "data" / "link")
    (top / "srv" / "data").mkdir(parents=True)
    (top / "srv" / "data" / "top").write_text("from the top layer\n")
    os.mknod(top / "srv" / "data" / "x", 0o20000, os.makedev(0, 0))  # whiteout
    (top / "home" / "user" / "proj").mkdir(parents=True)
    (top / "home" / "user" / "proj" / "readme").write_text("hello\n")
    (top / "home" / "user" / "proj" / "locked").write_text("locked\n")
    os.chmod(top / "home" / "user" / "proj" / "locked", 0o444)
    (top / "home" / "user" / "proj" / "rootfile").write_text("root's\n")
    os.chmod(top / "home" / "user" / "proj" / "rootfile", 0o644)
    for p in (
        top / "home" / "user",
        top / "home" / "user" / "proj",
        top / "home" / "user" / "proj" / "readme",
        top / "home" / "user" / "proj" / "locked",
    ):
        os.chown(p, 1000, 1000)
    for layer in ls:
        for dirpath, dirnames, filenames in os.walk(layer):
            for n in dirnames + filenames:
                os.utime(
                    os.path.join(dirpath, n),
                    ns=(o.BASE_TIME_NS, o.BASE_TIME_NS),
                    follow_symlinks=False,
                )
        os.utime(layer, ns=(o.BASE_TIME_NS, o.BASE_TIME_NS))


def _source_tree(src: Path) -> None:
    (src / "sub" / "deeper").mkdir(parents=True)
    (src / "a.txt").write_text("new a\n")
    (src / "conf").write_text("name=new\n")
    (src / "sub" / "b.bin").write_bytes(bytes(range(256)) * 64)
    (src / "sub" / "deeper" / "c").write_text("c\n")
    os.symlink("../a.txt", src / "sub" / "to-a")
    os.link(src / "a.txt", src / "sub" / "a-again")
    os.mkfifo(src / "sub" / "fifo")
    os.chmod(src / "sub" / "b.bin", 0o600)
    os.chown(src / "sub" / "deeper", 1000, 1234)
    os.setxattr(src / "sub" / "deeper" / "c", "user.note", b"tarred")
    for dirpath, dirnames, filenames in os.walk(src, topdown=False):
        for n in dirnames + filenames:
            os.utime(
                os.path.join(dirpath, n), ns=(o.BASE_TIME_NS, o.BASE_TIME_NS), follow_symlinks=False
            )


def _run_both(
    script: str,
    user: int | None = None,
    skip: tuple[str, ...] = (),
    populate: Populate = _base_lowers,
    env: dict[str, str] | None = None,
    timeout: float = 300,
) -> o.Snapshot:
    # Not pytest's tmp_path: its parents are private to root, and some scripts run as a user.
    with _tempdir("pyunion-dprog-") as tmp_path:
        os.chmod(tmp_path, 0o755)
        return _run_both_in(tmp_path, script, user, skip, populate, env, timeout)


def _run_both_in(
    tmp_path: Path,
    script: str,
    user: int | None,
    skip: tuple[str, ...],
    populate: Populate,
    env: dict[str, str] | None,
    timeout: float,
) -> o.Snapshot:
    lowers = [tmp_path / "L0", tmp_path / "L1"]
    for p in lowers:
        p.mkdir()
    populate(lowers)
    src = tmp_path / "src"
    src.mkdir()
    _source_tree(src)
    subprocess.run(
        ["tar", "--xattrs", "-cf", str(tmp_path / "src.tar"), "-C", str(src), "."], check=True
    )
    home = tmp_path / "home"
    home.mkdir()
    full_env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(home),
        "SRC": str(src),
        "TARBALL": str(tmp_path / "src.tar"),
        "LC_ALL": "C",
        "PYTHON": sys.executable,
        "SOURCE_DATE_EPOCH": "1000000000",
        "PIP_NO_CACHE_DIR": "1",
        "PIP_DISABLE_PIP_VERSION_CHECK": "1",
        **(env or {}),
    }
    cmd = ["sh", "-ec", script]
    if user is not None:
        cmd = ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups", *cmd]
    mnt = tmp_path / "mnt"
    views: dict[str, o.Snapshot] = {}
    outputs: dict[str, str] = {}
    for impl in ("kernel", "pyunion"):
        upper, work = tmp_path / f"{impl}-upper", tmp_path / f"{impl}-work"
        upper.mkdir()
        work.mkdir()
        os.chmod(upper, 0o755)
        mount = kernel_overlay if impl == "kernel" else pyunion_mount
        with mount(lowers, mnt, upper, work):
            r = subprocess.run(
                cmd,
                cwd=mnt,
                env=full_env,
                capture_output=True,
                text=True,
                timeout=timeout,
                check=False,
            )
            outputs[impl] = r.stdout
            assert r.returncode == 0, f"{impl}: the script failed ({r.returncode}):\n{r.stderr}"
            views[impl] = o.snapshot(mnt, skip=skip)
    assert outputs["kernel"] == outputs["pyunion"], outputs
    o.assert_same(views["kernel"], views["pyunion"], "kernel vs pyunion after the script")
    problems = o.upper_problems(tmp_path / "pyunion-upper", lowers)
    assert not problems, problems
    (tmp_path / "kw2").mkdir()
    with kernel_overlay(
        lowers, tmp_path / "mk2", tmp_path / "pyunion-upper", tmp_path / "kw2"
    ) as k2:
        o.assert_same(
            o.snapshot(k2, skip=skip), views["pyunion"], "kernel over pyunion's upper vs pyunion"
        )
    return views["pyunion"]


def test_cp_a_into_the_mount() -> None:
    _run_both('cp -a "$SRC"/. srv/data/ && cp -a srv srv.copy && cp -a "$SRC" etc/')


def test_tar_x_into_the_mount() -> None:
    view = _run_both(
        'tar --xattrs -xpf "$TARBALL" -C srv/data && '
        'mkdir new && tar --xattrs -xpf "$TARBALL" -C new && '
        'tar --xattrs -xpf "$TARBALL" -C etc --overwrite'
    )
    assert view.entries["srv/data/sub/deeper/c"].xattrs == (("user.note", b"tarred"),)


def test_sed_i_on_a_lower_file() -> None:
    view = _run_both(
        "sed -i s/old/new/ etc/conf && sed -i 's/deep/DEEP/' srv/data/link && cat etc/conf"
    )
    assert view.entries["etc/conf"].data == b"name=new\nkeep=1\n"


def test_mkdir_mode_0555() -> None:
    view = _run_both(
        "mkdir -m 0555 ro-new && mkdir -m 0555 srv/data/ro-sub && "
        "mkdir -p -m 0555 etc/a/b && touch ro-new/inside-as-root && "
        "ls -la ro-new | wc -l"
    )
    assert view.entries["ro-new"].mode == 0o555


def test_replace_read_only_lower_file_as_user() -> None:
    _run_both(
        "cd home/user/proj && echo new > locked.tmp && mv -f locked.tmp locked "
        "&& rm -f rootfile && echo again > rootfile && cp readme readme.bak && "
        "chmod 0444 readme && ! (echo x >> readme) 2>/dev/null && ls -l | wc -l",
        user=1000,
    )


def test_mv_of_lower_directories() -> None:
    _run_both(
        "mv srv/data srv/renamed && mv etc srv/renamed/etc && "
        "mkdir home/user/empty && mv home/user/proj home/user/empty/ && "
        "mv srv moved-srv && ls -R | wc -l"
    )


@pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")
def test_git_init_and_commit() -> None:
    env = {
        "GIT_AUTHOR_NAME": "T",
        "GIT_AUTHOR_EMAIL": "t@example.org",
        "GIT_COMMITTER_NAME": "T",
        "GIT_COMMITTER_EMAIL": "t@example.org",
        "GIT_AUTHOR_DATE": "2001-01-01T00:00:00Z",
        "GIT_COMMITTER_DATE": "2001-01-01T00:00:00Z",
        "GIT_CONFIG_NOSYSTEM": "1",
    }
    # The index holds st_dev/st_ino/ctime, which differ between any two filesystems.
    _run_both(
        "cd srv/data && git -c init.defaultBranch=main init -q && git add -A && "
        "git commit -qm first && echo more >> top && sed -i s/deep/DEEP/ deep/f && "
        "git commit -qam second && git fsck --strict && git log --format=%H:%s && "
        "git status --porcelain",
        skip=("srv/data/.git/index",),
        env=env,
    )


@pytest.mark.skipif(shutil.which("sqlite3") is None, reason="sqlite3 is not installed")
def test_sqlite3_and_locks() -> None:
    """sqlite in WAL mode (a shared map of its -shm file, fcntl locks) and in rollback
    mode, flock(1) on lower files."""
    _run_both(
        "sqlite3 etc/db 'pragma journal_mode=wal; create table t(x); "
        "insert into t values(1),(2);' && "
        "sqlite3 etc/db 'select sum(x) from t; pragma integrity_check;' && "
        "sqlite3 srv/data/db 'pragma journal_mode=delete; create table t(x); "
        "insert into t values(3);' && "
        "flock etc/conf -c 'echo locked' && flock -n etc/ro true && "
        "sqlite3 etc/db 'pragma wal_checkpoint(truncate);'"
    )


def test_tar_c_of_the_mount() -> None:
    """tar of lower and copied-up files, hard links and xattrs (the archive must be
    byte for byte the kernel's)."""
    _run_both(
        'mkdir x && tar --xattrs -xpf "$TARBALL" -C x && echo more >> etc/conf && '
        "tar --sort=name --numeric-owner --mtime=@0 --xattrs "
        "--pax-option=delete=atime,delete=ctime -cf - srv etc home x | sha256sum"
    )


def test_dpkg_like_replacement() -> None:
    """dpkg's way to replace a file (NAME.dpkg-new written and synced, the old one kept
    as a hard link NAME.dpkg-tmp until the new one is renamed over it) and to remove a
    directory."""
    _run_both(
        "for f in etc/conf etc/ro srv/data/deep/f; do "
        "cp $f $f.dpkg-new && sync $f.dpkg-new && ln $f $f.dpkg-tmp && "
        "mv -f $f.dpkg-new $f && rm $f.dpkg-tmp; done && "
        "mv srv/data/deep srv/data/deep.dpkg-remove && rm -r srv/data/deep.dpkg-remove"
    )


def _shadow_lowers(ls: list[Path]) -> None:
    top, bottom = ls
    (bottom / "etc").mkdir()
    for n in ("passwd", "group", "shadow", "gshadow", "login.defs"):
        shutil.copy2(f"/etc/{n}", bottom / "etc" / n)
    (bottom / "home").mkdir()
    (top / "etc").mkdir()
    shutil.copy2("/etc/passwd", top / "etc" / "passwd")


@pytest.mark.skipif(shutil.which("useradd") is None, reason="shadow's tools are not installed")
def test_useradd_and_friends() -> None:
    """shadow's tools lock /etc/passwd and the rest by a hard link whose st_nlink they
    check, write NAME+ and rename it over NAME, keep NAME- as a backup."""
    _run_both(
        'useradd --prefix "$PWD" -m -u 4242 newuser && '
        'groupadd --prefix "$PWD" -g 4343 newgroup && '
        'usermod --prefix "$PWD" -aG newgroup newuser && '
        'userdel --prefix "$PWD" -r newuser && useradd --prefix "$PWD" -u 4244 other && '
        "grep -c other etc/passwd etc/shadow etc/group",
        populate=_shadow_lowers,
    )


@pytest.mark.skipif(shutil.which("rsync") is None, reason="rsync is not installed")
def test_rsync_into_the_mount() -> None:
    _run_both(
        'rsync -aHAX "$SRC"/ srv/data/ && rsync -aHAX --delete "$SRC"/ etc/ && '
        'rsync -aHAX --inplace "$SRC"/ home/ && rsync -aHAX srv/ srv2/ && '
        'rsync -aHAXc --dry-run -i "$SRC"/ srv/data/ | sort'
    )


def test_python_venv() -> None:
    try:
        import ensurepip  # noqa: F401

        pip = ""
    except ImportError:
        pip = "--without-pip"
    _run_both(
        f'"$PYTHON" -m venv {pip} srv/venv && '
        'srv/venv/bin/python -c "import sys; print(sys.prefix != sys.base_prefix)"',
        timeout=600,
    )


def _special_lowers(ls: list[Path]) -> None:
    _base_lowers(ls)
    top = ls[0]
    (top / "bin").mkdir()
    shutil.copy2("/usr/bin/id", top / "bin" / "id-suid")
    os.chmod(top / "bin" / "id-suid", 0o4755)
    (top / "dev").mkdir()
    os.mknod(top / "dev" / "null", 0o20666, os.makedev(1, 3))


def test_device_nodes_open_like_the_kernel() -> None:
    """A kernel overlay mount is not nodev: a chroot into it can use its /dev/null."""
    _run_both(
        "echo x > dev/null && mknod dev/null2 c 1 3 && echo y > dev/null2 && "
        "head -c 4 dev/null | wc -c",
        populate=_special_lowers,
    )


def test_setuid_executables_like_the_kernel() -> None:
    """A kernel overlay mount is not nosuid: a set-user-ID program in the image works."""
    _run_both(
        "bin/id-suid -u && cp -p bin/id-suid bin/id-copy && chmod 4755 bin/id-copy && "
        "setpriv --reuid=1000 --regid=1000 --clear-groups bin/id-copy -u",
        populate=_special_lowers,
    )


def test_copy_up_keeps_sparse_files_sparse(tmp_path: Path) -> None:
    """A 256 MiB lower file with 8 KiB of data: the copy in the upper stays about as
    small as the kernel's (and the data is the same)."""
    lower = tmp_path / "l"
    lower.mkdir()
    with open(lower / "sparse", "wb") as f:
        f.write(b"head" * 1024)
        f.seek(256 << 20)
        f.write(b"tail" * 1024)
    blocks = {}
    for impl in ("kernel", "pyunion"):
        up, work = tmp_path / f"{impl}-u", tmp_path / f"{impl}-w"
        up.mkdir()
        work.mkdir()
        mount = kernel_overlay if impl == "kernel" else pyunion_mount
        with mount([lower], tmp_path / f"{impl}-m", up, work) as m:
            _write(m, "sparse", 100 << 20, b"middle")
            blocks[impl] = os.stat(up / "sparse").st_blocks * 512
            assert o.entry_of(str(m / "sparse")).data == o.entry_of(str(up / "sparse")).data
    assert blocks["pyunion"] <= max(2 * blocks["kernel"], 1 << 20), blocks


def test_names_starting_wh_are_refused(tmp_path: Path) -> None:
    """docs/formats.md: creating or looking up a `.wh.` name gives EINVAL (the kernel allows them;
    pyunion cannot, since they are its markers in every layer)."""
    lower = tmp_path / "l"
    lower.mkdir()
    (lower / "f").write_text("x")
    for n in ("u", "w"):
        (tmp_path / n).mkdir()
    with pyunion_mount([lower], tmp_path / "m", tmp_path / "u", tmp_path / "w") as p:
        for op in [
            ("create", ".wh.x", 0o644, "excl"),
            ("mkdir", ".wh.d", 0o755),
            ("mkdir", ".wh..wh..opq", 0o755),
            ("symlink", "f", ".wh.s"),
            ("link", "f", ".wh.l"),
            ("rename", "f", ".wh.f", 0),
            ("mkfifo", ".wh..opq", 0o644),
            ("unlink", ".wh.f"),
        ]:
            assert apply(p, op) == "EINVAL", op
        assert sorted(os.listdir(p)) == ["f"]
    assert sorted(os.listdir(tmp_path / "u")) == []
