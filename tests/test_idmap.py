"""fuse-overlayfs' owner options (`uidmapping=`, `gidmapping=`, `squash_to_*`, `static_nlink`).

First the rules alone (the example of fuse-overlayfs' manual, overflow IDs,
precedence, ACL entries), then real mounts: pyunion-overlayfs and
fuse-overlayfs over the same layers with the same options must show the same
owners, and write the same owners to the upper for chown, create, mkdir,
symlink, mknod and a copy-up, as root and as a mapped caller. POSIX ACLs:
fuse-overlayfs 1.10 passes their IDs through unshifted, so there the oracle
is its rule for owners (an ACL entry for an ID is stored and shown as a file
of that owner would be). Last, squashing in an unprivileged daemon: a
copy-up of another owner's file is no error with squash_to_root, and the
same EPERM as fuse-overlayfs' without it.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import site
import struct
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from support import escape, fuse_skip_reason, is_mounted, tree_view, wait_gone

from unionfs.errors import UserError
from unionfs.idmap import IdMap, parse_extents

REPO = Path(__file__).resolve().parent.parent
PYUNION_OVERLAYFS = Path(
    os.environ.get("PYUNION_MOUNT_PROGRAM") or Path(sys.executable).parent / "pyunion-overlayfs"
)
FUSE_OVERLAYFS = shutil.which("fuse-overlayfs")
SETUP_USER = "pyunion-user"  # scripts/setup.sh
MAP = "0:1000:1:1:110000:65536"  # fuse-overlayfs' manual's example
OPTION_SETS = {
    "mapping": f"uidmapping={MAP},gidmapping={MAP}",
    "mapping+squash_to_uid": f"uidmapping={MAP},gidmapping={MAP},squash_to_uid=4242",
    "squash_to_root": "squash_to_root",
    "squash_to_ids": "squash_to_uid=1234,squash_to_gid=4321",
    "static_nlink": "static_nlink",
}
# Lower layer objects and their owners on disk (70000 is outside MAP).
OWNED = {
    "root": (0, 0),
    "one": (1, 1),
    "mixed": (1000, 2),
    "far": (70000, 70001),
    "d": (5, 7),
    "d/f": (2, 3),
    "d/e": (1, 1),
    "sym": (1, 2),
}


def _real_mount_skip_reason() -> str | None:
    reason = fuse_skip_reason()
    if reason:
        return reason
    if FUSE_OVERLAYFS is None:
        return "needs fuse-overlayfs to compare with (scripts/setup.sh installs it)"
    if shutil.which("setfacl") is None:
        return "needs setfacl/getfacl (package acl; scripts/setup.sh installs it)"
    return None


needs_both = pytest.mark.skipif(
    _real_mount_skip_reason() is not None, reason=_real_mount_skip_reason() or ""
)


def test_the_manuals_example() -> None:
    # uidmapping=0:1000:1:1:110000:65536 run outside the namespace: the layer's 0 and 1
    # are shown as 1000 and 110000, which the namespace sees as 0 and 1.
    m = IdMap.make(
        parse_extents("0:1000:1:1:110000:65536", "uidmapping"),
        parse_extents("0:1000:1:1:110000:65536", "gidmapping"),
    )
    assert m is not None
    assert [m.shown_uid(i) for i in (0, 1, 2, 65536)] == [1000, 110000, 110001, 175535]
    assert [m.disk_uid(i) for i in (1000, 110000, 175535)] == [0, 1, 65536]
    assert m.shown_uid(65537) == m.overflow_uid == 65534  # outside every triple
    assert m.disk_gid(5) == m.overflow_gid


def test_empty_fields_and_bad_values() -> None:
    assert parse_extents(":0:0:1:1:1:65536", "gidmapping") == ((0, 0, 1), (1, 1, 65536))
    for bad in ("0:1", "a:b:c", "0:0:0", "0:4294967295:2", "-1:0:1", ""):
        with pytest.raises(UserError, match="malformed uidmapping"):
            parse_extents(bad, "uidmapping")


def test_squash_precedence() -> None:
    m = IdMap.make(squash_root=True)
    assert m is not None and (m.shown_uid(1234), m.shown_gid(99)) == (0, 0)
    m = IdMap.make(squash_root=True, squash_uid=1000)
    assert m is not None and (m.shown_uid(5), m.shown_gid(5)) == (1000, 0)
    m = IdMap.make(parse_extents("0:100:10", "u"), parse_extents("0:200:10", "g"), squash_uid=7)
    assert m is not None and (m.shown_uid(3), m.shown_gid(3)) == (7, 203)
    assert (m.disk_uid(103), m.disk_gid(203)) == (3, 3)  # requests are still shifted
    assert IdMap.make() is None  # nothing to do: the adaptor keeps its plain path


def test_later_triples_win_where_they_overlap() -> None:
    m = IdMap.make(parse_extents("0:100:10:5:500:10", "u"))
    assert m is not None and (m.shown_uid(4), m.shown_uid(5)) == (104, 500)


def test_acl_ids_are_shifted() -> None:
    def acl(*entries: tuple[int, int, int]) -> bytes:
        return struct.pack("<I", 2) + b"".join(struct.pack("<HHI", *e) for e in entries)

    m = IdMap.make(parse_extents("0:100000:65536", "u"), parse_extents("0:200000:65536", "g"))
    assert m is not None
    disk = acl((0x01, 7, 0xFFFFFFFF), (0x02, 6, 1000), (0x08, 4, 33), (0x20, 4, 0xFFFFFFFF))
    shown = acl((0x01, 7, 0xFFFFFFFF), (0x02, 6, 101000), (0x08, 4, 200033), (0x20, 4, 0xFFFFFFFF))
    assert m.acl(disk, True) == shown and m.acl(shown, False) == disk
    assert m.acl(b"not an acl", True) == b"not an acl"


# -- real mounts --------------------------------------------------------------------------------
def _daemon(mnt: Path) -> int | None:
    """The mount program serving `mnt` (both keep the mount point as their last argument)."""
    want = os.fsencode(str(mnt))
    for p in os.listdir("/proc"):
        if p.isdigit() and int(p) != os.getpid():
            with contextlib.suppress(OSError):
                cmd = Path(f"/proc/{p}/cmdline").read_bytes().rstrip(b"\0").split(b"\0")
                if cmd[-1] == want and any(b"overlayfs" in a for a in cmd[:3]):
                    return int(p)
    return None


@contextlib.contextmanager
def _mount(
    argv0: list[str], lower: Path, base: Path, opts: str, user: tuple[int, int] | None = None
) -> Iterator[Path]:
    """`argv0 -o lowerdir=...,upperdir=...,workdir=...,OPTS MNT` (as `user`, its dirs theirs,
    when given); unmounted and its daemon gone afterwards, whatever happens."""
    upper, work, mnt = base / "upper", base / "work", base / "mnt"
    for d in (upper, work, mnt):
        d.mkdir(parents=True, exist_ok=True)
        if user is not None:
            os.chown(d, *user)
    run = _as(*user) if user is not None else []
    o = f"lowerdir={escape(lower)},upperdir={escape(upper)},workdir={escape(work)},{opts}"
    r = subprocess.run(
        [*run, *argv0, "-o", o, str(mnt)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    pid = _daemon(mnt)
    try:
        assert r.returncode == 0 and is_mounted(mnt), f"{argv0} failed: {r.stderr}"
        yield mnt
    finally:
        if is_mounted(mnt):
            subprocess.run(["umount", "-l", str(mnt)], capture_output=True, timeout=30, check=False)
        if pid is not None and not wait_gone(pid, 20):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


@contextlib.contextmanager
def _both(lower: Path, base: Path, opts: str) -> Iterator[tuple[Path, Path]]:
    """The same layer mounted by pyunion-overlayfs and by fuse-overlayfs, `allow_other`."""
    assert FUSE_OVERLAYFS is not None
    with (
        _mount([str(PYUNION_OVERLAYFS)], lower, base / "pyunion", f"allow_other,{opts}") as ours,
        _mount([FUSE_OVERLAYFS], lower, base / "fuse-overlayfs", f"allow_other,{opts}") as theirs,
    ):
        yield ours, theirs


@pytest.fixture
def open_dir() -> Iterator[Path]:
    """A directory every user may enter (pytest's tmp_path is root's alone), removed after."""
    d = Path(tempfile.mkdtemp(prefix="pyunion-idmap-", dir="/var/tmp"))
    os.chmod(d, 0o755)
    try:
        yield d
    finally:
        for mnt in d.glob("*/mnt"):
            if is_mounted(mnt):
                subprocess.run(["umount", "-l", str(mnt)], capture_output=True, timeout=30)
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def lower(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A layer with objects of several owners, one with an ACL naming other IDs."""
    lo = tmp_path_factory.mktemp("idmap") / "lower"
    (lo / "d/e").mkdir(parents=True)
    for name in ("root", "one", "mixed", "far", "d/f"):
        (lo / name).write_text(name + "\n")
    os.symlink("one", lo / "sym")
    (lo / "tmp").mkdir(mode=0o1777)
    os.chmod(lo / "tmp", 0o1777)
    for name, (uid, gid) in OWNED.items():
        os.chown(lo / name, uid, gid, follow_symlinks=False)
    (lo / "acl").write_text("acl\n")
    subprocess.run(["setfacl", "-m", "u:1:r,g:2:r", str(lo / "acl")], check=True, timeout=30)
    return lo


def _ids(mnt: Path) -> dict[str, tuple[int, int, int]]:
    """Owners (and links) by lookup: lstat of known names, before any listing."""
    out = {}
    for name in (*OWNED, "acl", "tmp"):
        st = os.lstat(mnt / name)
        out[name] = (st.st_uid, st.st_gid, st.st_nlink)
    return out


def _ls(mnt: Path, links: bool) -> list[tuple[str, ...]]:
    """`ls -lnR`: type and mode, owner, group, name (and the link count when `links`)."""
    out = subprocess.run(
        ["ls", "-lnR", "--time-style=+", str(mnt)],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout
    rows = []
    for line in out.splitlines():
        f = line.split()
        if len(f) >= 6 and f[0][0] in "-dlcpbs":
            rows.append((f[0], f[2], f[3], f[-1] if f[0][0] != "l" else f[-3], *f[1:2] * links))
    return rows


@needs_both
@pytest.mark.parametrize("opts", OPTION_SETS.values(), ids=OPTION_SETS.keys())
def test_shown_owners_match_fuse_overlayfs(lower: Path, tmp_path: Path, opts: str) -> None:
    static = "static_nlink" in opts
    with _both(lower, tmp_path, opts) as (ours, theirs):
        mine, ref = _ids(ours), _ids(theirs)
        if not static:  # directory link counts differ without it (not an owner matter)
            mine = {k: v[:2] for k, v in mine.items()}
            ref = {k: v[:2] for k, v in ref.items()}
        assert mine == ref
        assert _ls(ours, static) == _ls(theirs, static)
        assert tree_view(ours) == tree_view(theirs)  # readdir(plus), then lstat
        if static:
            assert {mine[d][2] for d in ("d", "d/e", "tmp")} == {1}
        if opts == OPTION_SETS["mapping"]:
            assert mine["one"][:2] == (110000, 110000) and mine["far"][:2] == (65534, 65534)
        elif opts == OPTION_SETS["mapping+squash_to_uid"]:
            assert mine["one"][:2] == (4242, 110000) and mine["far"][:2] == (4242, 65534)


def _as(uid: int, gid: int) -> list[str]:
    return ["setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups"]


def _write(mnt: Path, caller: tuple[int, int], chown_to: tuple[int, int]) -> None:
    """create, mkdir, symlink, mknod (fifo and char device), chown and copy-ups, as root;
    create and mkdir as `caller` in the sticky world-writable dir."""
    (mnt / "new").write_text("new\n")
    (mnt / "newdir").mkdir()
    os.symlink("new", mnt / "newsym")
    os.mkfifo(mnt / "fifo")
    os.mknod(mnt / "null", 0o20644, os.makedev(1, 3))
    os.chown(mnt / "new", *chown_to)
    os.chown(mnt / "d/f", *chown_to)  # a copy-up, then a chown
    with open(mnt / "one", "a") as f:  # a copy-up that keeps the owner
        f.write("more\n")
    os.chmod(mnt / "far", 0o600)
    for argv in (["sh", "-c", f": > {mnt}/tmp/file"], ["mkdir", str(mnt / "tmp/dir")]):
        subprocess.run([*_as(*caller), *argv], check=True, timeout=30)


@needs_both
@pytest.mark.parametrize("opts", OPTION_SETS.values(), ids=OPTION_SETS.keys())
def test_written_owners_match_fuse_overlayfs(lower: Path, open_dir: Path, opts: str) -> None:
    tmp_path = open_dir
    mapping = opts.startswith("uidmapping")
    caller = (110005, 110006) if mapping else (3000, 3001)
    chown_to = (110010, 110011) if mapping else (2000, 2001)
    with _both(lower, tmp_path, opts) as (ours, theirs):
        for mnt in (ours, theirs):
            _write(mnt, caller, chown_to)
        assert tree_view(ours) == tree_view(theirs)
    mine, ref = (
        {k: v for k, v in tree_view(tmp_path / f"{name}/upper").items() if b".wh." not in k}
        for name in ("pyunion", "fuse-overlayfs")
    )
    assert mine == ref  # fuse-overlayfs' opaque markers in new directories left out
    if mapping:  # shown 110000+i is 1+i on disk; a root caller (shown 0) is outside the map
        assert mine[b"tmp/file"][2:4] == (6, 7) and mine[b"d/f"][2:4] == (11, 12)
        assert mine[b"new"][2:4] == (11, 12) and mine[b"newdir"][2:4] == (65534, 65534)
    assert mine[b"one"][2:4] == (1, 1)


def _acl(path: Path) -> list[str]:
    out = subprocess.run(
        ["getfacl", "-n", "--omit-header", str(path)],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout
    return [x for x in out.splitlines() if x.startswith(("user:", "group:")) and x.split(":")[1]]


@needs_both
def test_acl_ids_follow_the_owner_rule(lower: Path, tmp_path: Path) -> None:
    opts = OPTION_SETS["mapping"]
    with _both(lower, tmp_path, opts) as (ours, theirs):
        for mnt in (ours, theirs):
            (mnt / "new").write_text("x\n")
            subprocess.run(
                ["setfacl", "-m", "u:110005:rw,g:110006:r", str(mnt / "new")],
                check=True,
                timeout=30,
            )
            (mnt / "owner").write_text("o\n")
            os.chown(mnt / "owner", 110005, 110006)
        # Set through the mount: both show what was set.
        assert _acl(ours / "new") == _acl(theirs / "new") == ["user:110005:rw-", "group:110006:r--"]
        # From the layer: the IDs a file owned by 1 (user) and 2 (group) shows.
        one_uid = os.lstat(theirs / "one").st_uid
        two_gid = os.lstat(theirs / "mixed").st_gid
        assert _acl(ours / "acl") == [f"user:{one_uid}:r--", f"group:{two_gid}:r--"]
    # On disk: stored as fuse-overlayfs stores a chown to the same IDs.
    st = os.lstat(tmp_path / "fuse-overlayfs/upper/owner")
    assert _acl(tmp_path / "pyunion/upper/new") == [
        f"user:{st.st_uid}:rw-",
        f"group:{st.st_gid}:r--",
    ]
    # What was stored reads back the same after a remount (past the kernel's ACL cache).
    shutil.rmtree(tmp_path / "pyunion/work")
    with _mount([str(PYUNION_OVERLAYFS)], lower, tmp_path / "pyunion", opts) as again:
        assert _acl(again / "new") == ["user:110005:rw-", "group:110006:r--"]


@pytest.fixture
def user_dir(open_dir: Path) -> tuple[int, int, Path]:
    """The setup user's IDs and a directory of theirs."""
    try:
        pw = pwd.getpwnam(SETUP_USER)
    except KeyError:
        pytest.fail(f"no user {SETUP_USER}: run scripts/setup.sh")
    os.chown(open_dir, pw.pw_uid, pw.pw_gid)
    return pw.pw_uid, pw.pw_gid, open_dir


@needs_both
@pytest.mark.parametrize("squash", [True, False])
def test_unprivileged_copy_up_of_a_root_file(user_dir: tuple[int, int, Path], squash: bool) -> None:
    """As fuse-overlayfs: with squashing, the copy-up keeps the daemon's own owner; without,
    the chown it cannot make fails the write (EPERM)."""
    uid, gid, home = user_dir
    lo = home / "lower"
    lo.mkdir()
    (lo / "rootfile").write_text("r\n")  # root's, world-readable
    os.chmod(lo / "rootfile", 0o666)
    opts = "squash_to_root" if squash else "fsync=0"
    python = [
        "env",
        "PYTHONPATH=" + ":".join([str(REPO), *site.getsitepackages()]),
        "/usr/bin/python3",
        "-c",
        "import sys; from unionfs.cli import overlayfs_main; sys.exit(overlayfs_main())",
    ]
    results = []
    assert FUSE_OVERLAYFS is not None
    for name, argv0 in (("pyunion", python), ("fuse-overlayfs", [FUSE_OVERLAYFS])):
        base = home / name
        with _mount(argv0, lo, base, opts, user=(uid, gid)) as mnt:
            # As the user: without allow_other, only the mount's owner may enter it.
            f = mnt / "rootfile"
            r = subprocess.run(
                [*_as(uid, gid), "sh", "-c", f"stat -c %u {f} >&2; echo more >> {f}"],
                capture_output=True,
                text=True,
                timeout=30,
                check=False,
            )
            shown, _, err = r.stderr.partition("\n")
            results.append((r.returncode, shown, err.rpartition(":")[2].strip()))
        up = base / "upper/rootfile"
        results.append(os.lstat(up).st_uid if up.exists() else None)
    assert results[:2] == results[2:], results
    if squash:
        assert results[:2] == [(0, "0", ""), uid]
    else:
        assert results[0][2] == "Operation not permitted" and results[1] is None
