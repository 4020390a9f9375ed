"""The fast tier: the core (`Union`) and the adaptor's replies, without FUSE and without root.

Layers are directories under tmp_path in the OCI format (`.wh.NAME`,
`.wh..wh..opq`, `user.overlay.opaque`), which any user can write; the core is
driven directly, and `FuseOps` methods are awaited as coroutines, which they
are, with no mount behind them. Runs in a few seconds as any user:
`pytest -m "not mount"`.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import struct
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pyfuse3
import pytest

from unionfs import copyup, fuseinit
from unionfs.fuseops import TIMEOUT, FuseOps
from unionfs.inodes import ROOT_ID, Node
from unionfs.layers import LayerStack
from unionfs.mount import prepare_workdir
from unionfs.resolve import Entry
from unionfs.syscalls import RENAME_EXCHANGE, renameat2
from unionfs.union import Ctx, Union
from unionfs.whiteout import WhiteoutWriter


@pytest.fixture
def made(tmp_path: Path) -> Iterator[list[Union]]:
    """Unions made by `make` in this test, closed (every layer fd) after it."""
    unions: list[Union] = []
    yield unions
    for u in unions:
        u.close()


def make(
    tmp_path: Path, made: list[Union], lowers: list[Path], upper: bool = True, oci: bool = False
) -> Union:
    """A Union over `lowers` (top first), with an upper and work dir under tmp_path.

    `oci`: write OCI markers even where the kernel's form would be allowed (root).
    """
    up, work = tmp_path / "upper", tmp_path / "work"
    up.mkdir(exist_ok=True)
    work.mkdir(exist_ok=True)
    stack = LayerStack([str(p) for p in lowers], str(up) if upper else None)
    wfd = -1
    if upper:
        lock_fd, wfd = prepare_workdir(str(work))
        os.close(lock_fd)
    u = Union(stack, wfd)
    if oci:
        u.whiteouts = WhiteoutWriter(kernel=False)
    made.append(u)
    return u


def walk(u: Union, path: bytes) -> Node:
    d = u.root
    for part in filter(None, path.split(b"/")):
        n = u.lookup(d, part)
        assert n is not None, part
        d = n
    return d


def names(u: Union, path: bytes = b"") -> set[bytes]:
    fh = u.opendir(walk(u, path))
    try:
        got = {name for name, node, _, _, counted in u.readdir(fh, 0)}
    finally:
        u.releasedir(fh)
    return got - {b".", b".."}


def tree(root: Path, spec: dict[str, object]) -> None:
    """Make files (str: content), directories (dict) under root; `xattr:NAME` sets NAME=y."""
    root.mkdir(parents=True, exist_ok=True)
    for name, value in spec.items():
        if name.startswith("xattr:"):
            os.setxattr(root, name[6:], b"y")
        elif isinstance(value, dict):
            tree(root / name, value)
        else:
            (root / name).write_text(str(value))


def upper_marker(upper: Path, name: str) -> bool:
    """A whiteout of `name` in the upper dir, in either form."""
    try:
        st = os.lstat(upper / name)
        return stat.S_ISCHR(st.st_mode) and st.st_rdev == 0
    except FileNotFoundError:
        return (upper / f".wh.{name}").is_file()


def opaque(d: Path) -> bool:
    for attr in ("trusted.overlay.opaque", "user.overlay.opaque"):
        try:
            if os.getxattr(d, attr) == b"y":
                return True
        except OSError:
            pass
    return (d / ".wh..wh..opq").exists()


def test_the_core_never_imports_fuse_or_trio() -> None:
    """Data flows one way: the adaptor imports the core, never the reverse."""
    core = (
        "union",
        "identity",
        "rename",
        "copyup",
        "resolve",
        "handles",
        "whiteout",
        "inodes",
        "layers",
        "tree",
        "syscalls",
        "errors",
    )
    code = (
        "import sys\n"
        + "".join(f"import unionfs.{m}\n" for m in core)
        + "print(sorted(m for m in sys.modules if m.split('.')[0] in ('pyfuse3', 'trio')))"
    )
    r = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert r.stdout.strip() == "[]"


# -- the merge rule ------------------------------------------------------------------------
def test_lookup_and_listing_agree_on_every_name(tmp_path: Path, made: list[Union]) -> None:
    """One rule for one name across layers, whether it is looked up or listed."""
    l1, l2, l3 = (tmp_path / n for n in ("l1", "l2", "l3"))
    tree(
        l1,
        {
            "file_over_dir": "top",
            "d": {"p": "1"},
            "d2": {"p": "1"},
            "d3": {"xattr:user.overlay.opaque": "", "p": "1"},
            ".wh.w": "",
            ".wh.e": "",
            "x": {"top": "1"},
            ".wh.x": "",
            "m": {"a": "1"},
            ".wh..wh.plnk": "",
            "only1": "1",
        },
    )
    tree(
        l2,
        {
            "file_over_dir": {"below": "2"},
            "d": {"q": "2"},
            "d2": {".wh..wh..opq": "", "q": "2"},
            "d3": {"q": "2"},
            "w": "2",
            "s": "same layer",
            ".wh.s": "",
            "e": {"z": "2"},
            "x": {"mid": "2"},
            "m": "a file ends the merge",
        },
    )
    tree(l3, {"d": {"r": "3"}, "d2": {"r": "3"}, "s": "hidden", "x": {"low": "3"}, "m": {"b": "3"}})
    u = make(tmp_path, made, [l1, l2, l3], upper=False)
    root = u.root
    every = {os.fsencode(n) for layer in (l1, l2, l3) for n in os.listdir(layer)}
    listing = dict(u.resolver.listing(root))
    for name in sorted(every):
        root.listing = None
        if name.startswith(b".wh."):
            assert name not in listing
            continue
        looked: Entry | None = u.resolver.resolve(root, name)
        assert looked == listing.get(name), name
    assert set(listing) == {b"file_over_dir", b"d", b"d2", b"d3", b"x", b"m", b"only1", b"s"}
    assert listing[b"file_over_dir"].layer == 1 and listing[b"file_over_dir"].chain == ()
    assert listing[b"d"].chain == (1, 2, 3)
    assert listing[b"m"].chain == (1,)
    assert listing[b"x"].chain == (1,)  # the OCI whiteout beside it hides the layers below
    assert listing[b"s"].layer == 2  # a marker acts on the layers below its own only
    assert names(u, b"d") == {b"p", b"q", b"r"}
    assert names(u, b"d2") == {b"p", b"q"}
    assert names(u, b"d3") == {b"p"}
    for bad in (b".wh.w", b".wh..wh..opq", b"x" * 256):
        with pytest.raises(OSError) as e:
            u.lookup(root, bad)
        assert e.value.errno in (errno.EINVAL, errno.ENAMETOOLONG)


def test_readdir_counts_lookups_and_gives_back_the_one_not_taken(
    tmp_path: Path, made: list[Union]
) -> None:
    l1 = tmp_path / "l1"
    tree(l1, {f"f{i}": "x" for i in range(5)})
    u = make(tmp_path, made, [l1], upper=False)
    before = len(u.table.nodes)
    fh = u.opendir(u.root)
    entries = list(u.readdir(fh, 0))
    assert [(n, off, counted) for n, _, _, off, counted in entries[:2]] == [
        (b".", 1, False),
        (b"..", 2, False),
    ]
    offs = [off for _, _, _, off, _ in entries]
    assert offs == sorted(set(offs)) and offs[2] > 2  # each entry's own place, in order
    assert all(node.nlookup == 1 for _, node, _, _, counted in entries if counted)
    assert len(u.table.nodes) == before + 5
    for _, node, _, _, counted in entries:
        if counted:
            u.unlookup(node)
    assert len(u.table.nodes) == before
    resumed = [n for n, _, _, _, _ in u.readdir(fh, offs[3])]  # an offset the kernel passed back
    assert resumed == [n for n, _, _, _, _ in entries[4:]]
    u.releasedir(fh)


def test_readdir_leaves_the_files_the_kernel_holds_uncounted(
    tmp_path: Path, made: list[Union]
) -> None:
    """A listing read again (`held`): a lower file the kernel holds under that very name
    comes uncounted, its lookup count untouched; a directory, a file the kernel does not
    hold and another name of a held hard link are counted as before."""
    l1 = tmp_path / "l1"
    tree(l1, {"a": "1", "b": "2", "d": {}})
    os.link(l1 / "a", l1 / "a2")
    u = make(tmp_path, made, [l1])
    for name in (b"a", b"d"):
        assert u.lookup(u.root, name) is not None
    fh = u.opendir(u.root)
    try:
        entries = {n: (node, counted) for n, node, _, _, counted in u.readdir(fh, 0, held=True)}
    finally:
        u.releasedir(fh)
    a = entries[b"a"][0]
    assert entries[b"a"] == (a, False)
    assert entries[b"a2"] == (a, True)  # another name: linked, counted
    assert a.nlookup == 2  # the lookup's and a2's
    assert entries[b"d"][1] and entries[b"d"][0].nlookup == 2
    assert entries[b"b"][1] and entries[b"b"][0].nlookup == 1
    # A file copied up since it was listed: the lower entry is not the node's any more.
    u.copy_up(a)
    fh = u.opendir(u.root)
    try:
        again = {n: counted for n, _, _, _, counted in u.readdir(fh, 0, held=True)}
    finally:
        u.releasedir(fh)
    assert again[b"a"] is True


def test_a_missing_name_costs_one_stat_per_layer(
    tmp_path: Path, made: list[Union], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The usual miss (a create, a probe of a search path) stats each layer once: an OCI
    whiteout `.wh.NAME` is looked for only once the name is met below it, where it still
    hides it."""
    l1, l2, l3 = (tmp_path / n for n in ("l1", "l2", "l3"))
    tree(l1, {"d": {".wh.gone": ""}})
    tree(l2, {"d": {}})
    tree(l3, {"d": {"gone": "3", "kept": "3"}})
    u = make(tmp_path, made, [l1, l2, l3])
    d = walk(u, b"d")
    u.copyup.upper_dirfd(d)  # four layers: the upper and three lowers
    assert len(d.chain) == 4
    real_stat = os.stat
    stats: list[bytes] = []

    def counting_stat(path: bytes, *args: object, **kw: object) -> os.stat_result:
        stats.append(path)
        return real_stat(path, *args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "stat", counting_stat)
    assert u.lookup(d, b"nowhere") is None
    assert stats == [b"nowhere"] * 4
    stats.clear()
    assert u.lookup(d, b"gone") is None  # hidden by l1's marker all the same
    kept = u.lookup(d, b"kept")
    assert kept is not None and kept.layer == 3


# -- copy-up: decided once, in the core ------------------------------------------------------
def test_copy_up_plans(tmp_path: Path, made: list[Union]) -> None:
    l1 = tmp_path / "l1"
    tree(l1, {"f": "data", "d": {"g": "x"}})
    os.setxattr(l1 / "f", "user.k", b"v")
    u = make(tmp_path, made, [l1])
    f = walk(u, b"f")
    d = walk(u, b"d")
    assert list(u.copyups_for_open(f, os.O_RDONLY)) == []
    assert list(u.copyups_for_open(f, os.O_WRONLY)) == [(f, True)]
    assert list(u.copyups_for_open(f, os.O_RDWR | os.O_TRUNC)) == [(f, False)]
    assert list(u.copyups_for_open(d, os.O_RDONLY)) == []
    # setattr: a truncate to zero and nothing else needs no data; anything more does.
    plan = u.copyups_for_setattr
    assert list(plan(f, size=0, mode=None, uid=None, gid=None)) == [(f, False)]
    assert list(plan(f, size=0, mode=0o600, uid=None, gid=None)) == [(f, True)]
    assert list(plan(f, size=10, mode=None, uid=None, gid=None)) == [(f, True)]
    assert list(plan(d, size=None, mode=0o700, uid=None, gid=None)) == [(d, True)]
    assert list(u.copyups_for_link(f)) == [(f, True)]
    assert list(u.copyups_for_link(d)) == []
    assert list(u.copyups_for_xattr(f, b"user.k", remove=False)) == [(f, True)]
    assert list(u.copyups_for_xattr(f, b"user.overlay.opaque", remove=False)) == []  # refused
    # The kernel's own namespace is stored escaped (trusted.overlay.overlay.*): a change.
    assert list(u.copyups_for_xattr(f, b"trusted.overlay.opaque", remove=False)) == [(f, True)]
    with pytest.raises(OSError) as e:  # removing a missing xattr: ENODATA before any copy-up
        u.copyups_for_xattr(f, b"user.missing", remove=True)
    assert e.value.errno == errno.ENODATA
    with pytest.raises(OSError) as e:
        u.copyups_for_rename(u.root, b"f", 4)  # RENAME_WHITEOUT: EINVAL before any copy-up
    assert e.value.errno == errno.EINVAL
    assert os.listdir(tmp_path / "upper") == []
    # The operation runs its own plan: a truncating open copies no data.
    fh = u.open(f, os.O_WRONLY | os.O_TRUNC)
    u.release(fh)
    assert (tmp_path / "upper" / "f").read_bytes() == b""
    assert os.getxattr(tmp_path / "upper" / "f", "user.k") == b"v"
    assert list(u.copyups_for_open(f, os.O_WRONLY)) == []  # in the upper now
    assert list(u.copyups_for_setattr(f, size=0, mode=None, uid=None, gid=None)) == []


def test_read_only_stack_plans_nothing_and_refuses(tmp_path: Path, made: list[Union]) -> None:
    l1 = tmp_path / "l1"
    tree(l1, {"f": "data", "d": {}})
    u = make(tmp_path, made, [l1], upper=False)
    f = walk(u, b"f")
    assert list(u.copyups_for_setattr(f, size=0, mode=None, uid=None, gid=None)) == []
    assert list(u.copyups_for_rename(u.root, b"f", 0)) == []
    for call in (
        lambda: u.copyups_for_open(f, os.O_WRONLY),
        lambda: u.open(f, os.O_RDWR),
        lambda: u.setattr(f, mode=0o600),
        lambda: u.unlink(u.root, b"f"),
        lambda: u.mkdir(u.root, b"n", 0o755, Ctx()),
        lambda: u.rename(u.root, b"f", u.root, b"g"),
    ):
        with pytest.raises(OSError) as e:
            call()
        assert e.value.errno == errno.EROFS
    fh = u.open(f, os.O_RDONLY)
    buf = bytearray(100)  # as the adaptor reads (`FuseOps.read`)
    n = u.read_into(fh, 0, memoryview(buf))
    assert bytes(buf[:n]) == b"data"
    u.release(fh)


def test_rename_plan_is_the_materializing_walk(tmp_path: Path, made: list[Union]) -> None:
    """The adaptor's copy-ups before a merged directory's rename, then the rename copies nothing."""
    l1, l2 = tmp_path / "l1", tmp_path / "l2"
    tree(l1, {"d": {"e": "top", "sub": {"c": "top c"}}})
    tree(
        l2,
        {"d": {"a": "low", "sub": {"b": "low b", "deeper": {"z": "zz"}}, "gone": "x"}, "keep": "k"},
    )
    (l1 / "d" / ".wh.gone").touch()
    u = make(tmp_path, made, [l1, l2], oci=True)
    plan = u.copyups_for_rename(u.root, b"d", 0)
    copied = []
    for node, with_data in plan:
        assert with_data
        copied.append(node.name)
        u.copy_up(node, with_data)
    assert sorted(copied) == [b"a", b"b", b"c", b"e", b"z"]
    upper = tmp_path / "upper"
    inos = {p: os.lstat(upper / "d" / p).st_ino for p in ("a", "e", "sub/b", "sub/deeper/z")}
    u.rename(u.root, b"d", u.root, b"moved")
    assert names(u) == {b"moved", b"keep"}
    assert names(u, b"moved") == {b"a", b"e", b"sub"}
    assert names(u, b"moved/sub") == {b"b", b"c", b"deeper"}
    for p, ino in inos.items():  # the rename moved the copies: no second copy
        assert os.lstat(upper / "moved" / p).st_ino == ino
    assert upper_marker(upper, "d") and opaque(upper / "moved")
    assert opaque(upper / "moved" / "sub")
    assert not (upper / "moved" / ".wh.gone").exists()  # no whiteout in an opaque dir
    assert os.listdir(tmp_path / "work" / "work") == []


# -- whiteouts written -----------------------------------------------------------------------
def test_oci_whiteouts_and_opaque_dirs_written(tmp_path: Path, made: list[Union]) -> None:
    """Where the kernel's forms are refused: `.wh.NAME` mode 0, `.wh..wh..opq` + user xattr."""
    l1 = tmp_path / "l1"
    tree(l1, {"f": "x", "d": {"old": "x"}})
    u = make(tmp_path, made, [l1], oci=True)
    upper = tmp_path / "upper"
    u.unlink(u.root, b"f")
    st = os.lstat(upper / ".wh.f")
    assert stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) == 0 and st.st_size == 0
    u.unlink(walk(u, b"d"), b"old")
    u.rmdir(u.root, b"d")
    assert (upper / ".wh.d").is_file() and not (upper / "d").exists()
    assert names(u) == set()
    u.mkdir(u.root, b"d", 0o755, Ctx(os.getuid(), os.getgid()))
    assert not (upper / ".wh.d").exists()
    assert (upper / "d" / ".wh..wh..opq").is_file()
    assert os.getxattr(upper / "d", "user.overlay.opaque") == b"y"
    assert names(u, b"d") == set()
    fh, _, _ = u.create(u.root, b"f", 0o640, os.O_WRONLY, Ctx(os.getuid(), os.getgid()))
    u.release(fh)
    assert not (upper / ".wh.f").exists() and (upper / "f").is_file()


def test_create_returns_the_attributes_on_disk(tmp_path: Path, made: list[Union]) -> None:
    """The attributes `create` hands the reply (taken from the fd it made, not stat'ed
    again) are those of the object in place: after a set-ID chmod, a chown to the
    caller, and a rename over a whiteout (which changes the ctime)."""
    l1 = tmp_path / "l1"
    tree(l1, {"gone": "x"})
    u = make(tmp_path, made, [l1])
    u.unlink(u.root, b"gone")  # a whiteout (the kernel's form as root) to create over
    root = os.geteuid() == 0
    other = Ctx(1234, 5678) if root else Ctx(os.getuid(), os.getgid())
    mine = Ctx(os.getuid(), os.getgid())
    for name, mode, ctx in [
        (b"plain", 0o640, mine),
        (b"setid", 0o6755, mine),  # made 0o6700 under the umask below: chmod'ed after
        (b"theirs", 0o644, other),
        (b"gone", 0o600, mine),
    ]:
        old_umask = os.umask(0o077)
        try:
            fh, node, (st, nlink) = u.create(u.root, name, mode, os.O_WRONLY, ctx)
        finally:
            os.umask(old_umask)
        u.release(fh)
        disk = os.lstat(tmp_path / "upper" / os.fsdecode(name))
        fields = ("st_ino", "st_mode", "st_uid", "st_gid", "st_size", "st_nlink")
        assert [getattr(st, f) for f in fields] == [getattr(disk, f) for f in fields], name
        assert (st.st_mtime_ns, st.st_ctime_ns) == (disk.st_mtime_ns, disk.st_ctime_ns), name
        assert nlink == disk.st_nlink == 1 and u.stat(node) == (disk, 1)


def test_names_taken_in_an_upper_only_dir(tmp_path: Path, made: list[Union]) -> None:
    """In an upper-only directory a new name is not looked up first: making the object
    says EEXIST, for each kind, and leaves what is there as it was."""
    l1 = tmp_path / "l1"
    tree(l1, {"f": "x"})
    u = make(tmp_path, made, [l1])
    me = Ctx(os.getuid(), os.getgid())
    d = u.mkdir(u.root, b"d", 0o755, me)
    assert d.chain == (0,)
    fh, _, _ = u.create(d, b"f", 0o644, os.O_WRONLY, me)
    u.write(fh, 0, b"data")
    u.release(fh)
    u.mkdir(d, b"sub", 0o755, me)
    lower_f = walk(u, b"f")
    attempts = [
        lambda n: u.create(d, n, 0o644, os.O_WRONLY, me),
        lambda n: u.mkdir(d, n, 0o755, me),
        lambda n: u.mknod(d, n, stat.S_IFIFO | 0o644, 0, me),
        lambda n: u.symlink(d, n, b"target", me),
        lambda n: u.link(lower_f, d, n),
    ]
    for attempt in attempts:
        for name in (b"f", b"sub"):
            assert d.listing is None
            with pytest.raises(OSError) as e:
                attempt(name)
            assert e.value.errno == errno.EEXIST
    assert (tmp_path / "upper" / "d" / "f").read_bytes() == b"data"
    assert (tmp_path / "upper" / "d" / "sub").is_dir()
    assert sorted(os.listdir(tmp_path / "upper" / "d")) == ["f", "sub"]


@pytest.mark.parametrize("listed", [False, True])
def test_a_removed_file_shows_its_last_attributes(
    tmp_path: Path, made: list[Union], listed: bool
) -> None:
    """A file removed while nobody has it open shows the attributes it had when removed,
    whether its name was resolved by a stat then or from a listing cached before it
    was written to (a listing keeps the stat it was made with)."""
    l1 = tmp_path / "l1"
    tree(l1, {"low": "x"})
    u = make(tmp_path, made, [l1])
    me = Ctx(os.getuid(), os.getgid())
    fh, node, _ = u.create(u.root, b"f", 0o644, os.O_WRONLY, me)
    u.release(fh)
    if listed:
        u.resolver.listing(u.root)
        assert u.root.listing is not None
    fh = u.open(node, os.O_WRONLY)
    u.write(fh, 0, b"grown")
    u.release(fh)
    disk = os.lstat(tmp_path / "upper" / "f")
    u.unlink(u.root, b"f")
    st, nlink = u.stat(node)
    assert (st.st_size, st.st_mtime_ns, st.st_ino, nlink) == (5, disk.st_mtime_ns, disk.st_ino, 0)


def test_setting_one_time_leaves_the_other(tmp_path: Path, made: list[Union]) -> None:
    """A setattr with one time (utimensat's UTIME_OMIT for the other, as tar sends) sets
    that one and leaves the other as it is, on a file, a symlink and a directory, open or
    not (`syscalls.utimens`: futimens on an fd, utimensat through the object's path)."""
    l1 = tmp_path / "l1"
    tree(l1, {"f": "x", "d": {}})
    os.symlink("f", l1 / "s")
    for p in ("f", "s", "d"):
        os.utime(l1 / p, ns=(10**9, 2 * 10**9), follow_symlinks=False)
    u = make(tmp_path, made, [l1])
    upper = tmp_path / "upper"
    for name in (b"f", b"s", b"d"):
        node = walk(u, name)
        u.setattr(node, mtime_ns=5 * 10**9 + 7)
        st = os.lstat(upper / os.fsdecode(name))
        assert (st.st_atime_ns, st.st_mtime_ns) == (10**9, 5 * 10**9 + 7), name
        u.setattr(node, atime_ns=3 * 10**9)
        st = os.lstat(upper / os.fsdecode(name))
        assert (st.st_atime_ns, st.st_mtime_ns) == (3 * 10**9, 5 * 10**9 + 7), name
    fh = u.open(walk(u, b"f"), os.O_RDWR)
    u.setattr(walk(u, b"f"), mtime_ns=-(10**9) - 1, fh=fh)  # before 1970: divmod's floor
    u.release(fh)
    st = os.lstat(upper / "f")
    assert (st.st_atime_ns, st.st_mtime_ns) == (3 * 10**9, -(10**9) - 1)


def test_copy_file_data_whole_or_around_holes(tmp_path: Path) -> None:
    """A file whose allocated blocks cover its size is copied whole (no SEEK_DATA or
    SEEK_HOLE asked); one with holes is copied around them, which stay holes."""
    plain, sparse = tmp_path / "plain", tmp_path / "sparse"
    plain.write_bytes(b"x" * 5000)
    with open(sparse, "wb") as f:
        f.seek(8 << 20)
        f.write(b"middle")
        f.truncate(16 << 20)
    for src in (plain, sparse):
        st = os.stat(src)
        dst = tmp_path / (src.name + ".copy")
        sfd = os.open(src, os.O_RDONLY)
        dfd = os.open(dst, os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            end = copyup.copy_file_data(sfd, dfd, st.st_size, st.st_blocks * 512)
            os.ftruncate(dfd, st.st_size)
        finally:
            os.close(sfd)
            os.close(dfd)
        assert dst.read_bytes() == src.read_bytes()
        assert end == 5000 if src is plain else (8 << 20) + 6 <= end < 16 << 20
    assert os.stat(tmp_path / "sparse.copy").st_blocks * 512 < 1 << 20


def test_rename_leaving_whiteout_falls_back_to_a_marker(tmp_path: Path) -> None:
    d = tmp_path / "d"
    d.mkdir()
    (d / "a").write_text("x")
    fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
    try:
        w = WhiteoutWriter(kernel=False)
        w.rename_leaving_whiteout(fd, b"a", fd, b"b")
        assert (d / "b").read_text() == "x" and (d / ".wh.a").is_file() and w.wrote_oci
        assert w.remove_whiteout(fd, b"a") and not (d / ".wh.a").exists()
        w = WhiteoutWriter()  # the kernel's form where allowed (root), the marker otherwise
        w.rename_leaving_whiteout(fd, b"b", fd, b"c")
        assert upper_marker(d, "b") and (d / "c").read_text() == "x"
        assert w.wrote_oci == (os.geteuid() != 0 or not w.kernel_whiteouts)
    finally:
        os.close(fd)


# -- the adaptor's replies -------------------------------------------------------------------
async def test_adaptor_replies_without_a_mount(tmp_path: Path, made: list[Union]) -> None:
    l1 = tmp_path / "l1"
    tree(l1, {"f": "lower data", "d": {}})
    os.chmod(l1 / "f", 0o640)
    u = make(tmp_path, made, [l1])
    ops = FuseOps(u)
    a = await ops.lookup(ROOT_ID, b"f")
    st = os.lstat(l1 / "f")
    assert (a.st_mode, a.st_size, a.st_nlink, a.entry_timeout, a.attr_timeout) == (
        st.st_mode,
        st.st_size,
        1,
        TIMEOUT,
        TIMEOUT,
    )
    ino = a.st_ino
    assert ino == u.node(ino).ino and ino != ROOT_ID
    g = await ops.getattr(ino)  # built for each reply, kept nowhere (fuseops.BareEntry)
    assert g is not a and (g.st_ino, g.st_mode, g.st_size) == (ino, a.st_mode, a.st_size)
    missing = await ops.lookup(ROOT_ID, b"missing")
    assert missing.st_ino == 0 and missing.entry_timeout == TIMEOUT  # a cached negative entry
    for call, err in (
        (ops.lookup(ROOT_ID, b".wh.f"), errno.EINVAL),
        (ops.getattr(123456789), errno.ENOENT),
        (ops.removexattr(ino, b"user.missing"), errno.ENODATA),
        (ops.rename(ROOT_ID, b"f", ROOT_ID, b"g", 4), errno.EINVAL),
    ):
        with pytest.raises(pyfuse3.FUSEError) as e:
            await call
        assert e.value.errno == err
    assert os.listdir(tmp_path / "upper") == []  # refused requests copied nothing up
    # Opening for writing copies up (the core's plan, run by the adaptor); the
    # attributes are then the upper's, asked for each time, under the same inode.
    fi = await ops.open(ino, os.O_WRONLY, None)
    assert fi.keep_cache
    assert await ops.write(fi.fh, 0, b"UPPER") == 5
    await ops.release(fi.fh)
    after = await ops.getattr(ino)
    assert after is not a and after.st_ino == ino and after.st_size == 10
    assert await ops.getattr(ino) is not after
    fields = SimpleNamespace(
        update_size=True,
        update_mode=True,
        update_uid=False,
        update_gid=False,
        update_atime=False,
        update_mtime=False,
    )
    got = await ops.setattr(ino, SimpleNamespace(st_size=2, st_mode=0o600), fields, None, None)
    assert (stat.S_IMODE(got.st_mode), got.st_size) == (0o600, 2)
    assert (tmp_path / "upper" / "f").read_bytes() == b"UP"
    ctx = SimpleNamespace(uid=os.getuid(), gid=os.getgid(), umask=0o022)
    fi, new = await ops.create(ROOT_ID, b"new", 0o644, os.O_WRONLY, ctx)
    assert new.st_ino not in (0, ino) and stat.S_IMODE(new.st_mode) == 0o644
    await ops.release(fi.fh)
    sv = await ops.statfs(None)
    ref = os.statvfs(tmp_path / "upper")
    assert (sv.f_bsize, sv.f_blocks, sv.f_namemax) == (ref.f_bsize, ref.f_blocks, ref.f_namemax)
    # A lower directory's attributes, then the upper's once a child created in it copied it up.
    d = await ops.lookup(ROOT_ID, b"d")
    assert (await ops.getattr(d.st_ino)).st_mtime_ns == d.st_mtime_ns
    await ops.mkdir(d.st_ino, b"sub", 0o755, ctx)
    up = os.stat(tmp_path / "upper" / "d")
    assert (await ops.getattr(d.st_ino)).st_mtime_ns == up.st_mtime_ns


def test_a_special_file_copy_up_chmods_what_it_made_not_a_symlink_swapped_in(
    tmp_path: Path, made: list[Union]
) -> None:
    """The copy-up of a FIFO (socket, device) makes it in the work dir by name, then sets
    its owner, mode, xattrs and times there by name. Whoever can write the work dir can
    swap a symlink in between: the chmod followed it, and root gave the symlink's target
    the FIFO's mode (a user owning WORK/work made a root-only file 0666 through a root
    mount at the first swap). The swap is made here between `begin` and `finish`."""
    low = tmp_path / "l"
    low.mkdir()
    os.mkfifo(low / "fifo")
    os.chmod(low / "fifo", 0o666)
    victim = tmp_path / "victim"
    victim.write_text("root:precious\n")
    victim.chmod(0o600)
    u = make(tmp_path, made, [low])
    node = walk(u, b"fifo")
    job = u.copyup.begin(node)
    assert job is not None
    os.symlink(victim, b"swap", dir_fd=u.work_fd)
    renameat2(u.work_fd, b"swap", u.work_fd, job.tmp, RENAME_EXCHANGE)
    with contextlib.suppress(OSError):  # refusing is fine too; following the symlink is not
        job.finish()
    assert stat.S_IMODE(victim.stat().st_mode) == 0o600, "the copy-up chmod'ed the victim"


def test_objects_without_xattrs_share_one_empty_name_set(tmp_path: Path, made: list[Union]) -> None:
    """The xattr names kept per object (`has_xattr`, asked before every write) are one
    shared empty set for the many objects that have none (an empty frozenset each was
    ~220 bytes: 2.1 MiB for 10,000 files just written), and still right for the rest."""
    l1 = tmp_path / "l1"
    tree(l1, {"a": "1", "b": "2", "c": "3"})
    os.setxattr(l1 / "c", "user.k", b"v")
    u = make(tmp_path, made, [l1])
    a, b, c = walk(u, b"a"), walk(u, b"b"), walk(u, b"c")
    assert not u.has_xattr(a, b"security.capability")
    assert not u.has_xattr(b, b"security.capability")
    assert a.xnames is not None and a.xnames is b.xnames
    assert u.has_xattr(c, b"user.k") and c.xnames == frozenset({b"user.k"})


async def test_an_id_given_to_another_object_gets_a_new_generation(
    tmp_path: Path, made: list[Union]
) -> None:
    l1 = tmp_path / "l1"
    l1.mkdir()
    u = make(tmp_path, made, [l1])
    up = tmp_path / "upper"
    ops = FuseOps(u)
    ctx = SimpleNamespace(uid=os.getuid(), gid=os.getgid(), umask=0o022)
    # Removed through the mount while the kernel holds it: the new object on its inode
    # number gets an id of its own (the old inode stays good for its holders).
    held = await ops.symlink(ROOT_ID, b"h", b"old", ctx)
    number = os.lstat(up / "h").st_ino
    await ops.unlink(ROOT_ID, b"h")
    again = await ops.symlink(ROOT_ID, b"h", b"new", ctx)
    if os.lstat(up / "h").st_ino != number:
        pytest.skip("the upper's filesystem did not reuse the inode number")
    assert again.st_ino != held.st_ino and again.generation == held.generation == 0
    # Removed under the mount (the daemon still thinks it linked): the same id, which the
    # kernel holds, goes to the new object with a new generation, in every entry reply.
    first = await ops.symlink(ROOT_ID, b"l", b"old", ctx)
    number = os.lstat(up / "l").st_ino
    os.unlink(up / "l")
    new = await ops.symlink(ROOT_ID, b"n", b"new", ctx)
    assert os.lstat(up / "n").st_ino == number
    assert new.st_ino == first.st_ino and (first.generation, new.generation) == (0, 1)
    assert (await ops.lookup(ROOT_ID, b"n")).generation == 1
    # Both inodes' FORGETs come for the one id: the node goes once they add up.
    assert u.node(new.st_ino).nlookup == 3
    await ops.forget([(new.st_ino, 1)])
    assert u.table.generations == {new.st_ino: 1}
    await ops.forget([(new.st_ino, 2)])
    assert new.st_ino not in u.table.nodes and not u.table.generations


def test_the_init_hook_finds_one_connection_or_changes_nothing() -> None:
    conn = struct.pack("<7I", 7, 41, 1 << 17, 1 << 17, 1 << 17, 0x3FFFFF, 0x1B2000 | 1 << 13)
    raw = bytes(100) + conn + bytes(60)
    assert fuseinit.conn_offset(raw) == 100
    for other in (raw + conn, bytes(200), raw.replace(b"\x07\x00\x00\x00", b"\x08\x00\x00\x00")):
        with pytest.raises(fuseinit.NotAsked):
            fuseinit.conn_offset(other)
    # pyfuse3 (this build has its symbol) with no session yet: read safely, nothing written.
    assert fuseinit.want(pyfuse3.__file__ or "", fuseinit.FUSE_CAP_CACHE_SYMLINKS) == (
        "pyfuse3 has no session"
    )
    assert fuseinit.want(os.devnull, fuseinit.FUSE_CAP_CACHE_SYMLINKS) is not None
    assert fuseinit.handle_killpriv(pyfuse3.__file__ or "") == "pyfuse3 has no session"
    assert fuseinit.handle_killpriv(os.devnull) is not None
    # Never answered with the flag here: the kernel clears set-ID bits, none for setattr().
    assert not fuseinit.KillPriv.on and fuseinit.setattr_valid(1) is None


def test_xattr_names_kept_across_a_change_of_times(tmp_path: Path, made: list[Union]) -> None:
    """The names stay known across a setattr of times alone (tar's utimens, then its
    chown, asks for security.capability in between): only a change of mode, owner or size
    can change an object's xattrs, and it makes them read again."""
    l1 = tmp_path / "l1"
    tree(l1, {"f": "1"})
    u = make(tmp_path, made, [l1])
    f = walk(u, b"f")
    u.copy_up(f)
    os.setxattr(tmp_path / "upper" / "f", "user.k", b"v")
    f.xnames = None
    assert u.has_xattr(f, b"user.k")
    names = f.xnames
    u.setattr(f, mtime_ns=10**9)
    u.setattr(f, atime_ns=10**9, mtime_ns=10**9)
    assert f.xnames is names
    for change in ({"mode": 0o600}, {"uid": os.getuid()}, {"size": 0}):
        u.setattr(f, **change)  # type: ignore[arg-type]
        assert f.xnames is None, change
        assert u.has_xattr(f, b"user.k")


def test_a_lower_file_shows_its_stat_with_none_kept(tmp_path: Path, made: list[Union]) -> None:
    """A lower file's node keeps no stat: a lookup's reply takes the entry's (`attrs`), a
    getattr reads it where the file lies, and once its name is removed (a whiteout, a
    rename over it) the node keeps the stat it had, which it shows from then on."""
    l1 = tmp_path / "l1"
    tree(l1, {"a": "12345", "b": "xy", "c": "z"})
    u = make(tmp_path, made, [l1])
    want = {n: os.lstat(l1 / n) for n in ("a", "b", "c")}

    def same(st: object, real: os.stat_result) -> bool:
        fields = ("st_ino", "st_mode", "st_size", "st_nlink", "st_mtime_ns", "st_ctime_ns")
        return all(getattr(st, f) == getattr(real, f) for f in fields)

    found = u.lookup_entry(u.root, b"a")
    assert found is not None
    a, entry = found
    assert a.st is None and same(u.attrs(a, entry)[0], want["a"]) and same(u.stat(a)[0], want["a"])
    b = u.lookup(u.root, b"b")
    c = u.lookup(u.root, b"c")
    assert b is not None and c is not None
    u.unlink(u.root, b"a")
    u.rename(u.root, b"c", u.root, b"b")  # over b
    for node, name in ((a, "a"), (b, "b")):
        assert node.st is not None
        st, nlink = u.stat(node)
        assert same(st, want[name]) and nlink == want[name].st_nlink
    assert u.lookup(u.root, b"a") is None and u.lookup(u.root, b"c") is None
