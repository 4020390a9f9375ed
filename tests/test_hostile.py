"""Hostile and odd input: names, path lengths, depth, special files, markers, symlinks, permissions.

Also the lifecycle beyond tests/test_mount_basic.py: SIGINT and SIGHUP
unmount cleanly, SIGTERM of a busy mount and during a copy-up, `umount
--lazy`, refusing a layer under the mount point and a mount point inside a
layer instead of hanging.

Where the layers use only kernel formats, kernel overlayfs over the same
layers is the oracle. The daemon must stay alive through all of it.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from support import (
    alive,
    daemon_of,
    force_unmount,
    is_mounted,
    join_children,
    kernel_overlay,
    mounted,
    needs_fuse,
    pyunion,
    start_children,
    tree_view,
    wait_gone,
)

pytestmark = [needs_fuse, pytest.mark.timeout(120)]

NOBODY = 65534


def _read(path: str) -> str:
    with open(path) as f:
        return f.read()


def _write(path: str, mode: str, text: str) -> None:
    with open(path, mode) as f:
        f.write(text)


def _errno_of(fn, *args) -> int:  # type: ignore[no-untyped-def]
    try:
        fn(*args)
    except OSError as e:
        return e.errno or 0
    return 0


# -- names ----------------------------------------------------------------------------------
ODD_NAMES = [
    b"new\nline",
    b"tab\there",
    b"\xff\xfe non-utf8 \x80",
    b"x" * 255,
    b" lead space",
    b"trail space ",
    b"-dash",
    b"back\\slash",
    b"quote\"'",
    b"\x01\x02\x1b[31m",
    "ünïcødé ✓".encode(),
    b"a:b",
    b"*?[]",
    b"%s%n%d",
]


def test_odd_names_everywhere(layers: tuple, tmp_path: Path) -> None:
    lows, upper, work, mnt = layers
    lo = os.fsencode(str(lows[1]))
    for n in ODD_NAMES:
        with open(lo + b"/" + n, "wb") as f:
            f.write(b"lower " + n)
        os.mkdir(lo + b"/d" + n[:250])
    tried = 0
    with mounted(lows, mnt, upper, work):
        m = os.fsencode(str(mnt))
        listed = set(os.listdir(m))
        for n in ODD_NAMES:
            assert n in listed and b"d" + n[:250] in listed
            with open(m + b"/" + n, "rb") as f:
                assert f.read() == b"lower " + n
            with open(m + b"/" + n, "ab") as f:  # copy-up
                f.write(b"+")
            os.rename(m + b"/" + n, m + b"/r" + n[:254])
            with open(m + b"/d" + n[:250] + b"/" + n, "wb") as f:  # copy-up of the parent
                f.write(b"new")
            os.symlink(n, m + b"/s" + n[:254])
            assert os.readlink(m + b"/s" + n[:254]) == n
            os.setxattr(m + b"/d" + n[:250], b"user.name", n)
            tried += 5
        # 256 bytes is one too many, whatever the operation.
        long = b"y" * 256
        assert _errno_of(os.stat, m + b"/" + long) == errno.ENAMETOOLONG
        assert _errno_of(os.open, m + b"/" + long, os.O_CREAT | os.O_WRONLY) == errno.ENAMETOOLONG
        assert _errno_of(os.mkdir, m + b"/" + long) == errno.ENAMETOOLONG
        assert _errno_of(os.rename, m + b"/r" + ODD_NAMES[0], m + b"/" + long) == errno.ENAMETOOLONG
        assert _errno_of(os.symlink, b"t", m + b"/" + long) == errno.ENAMETOOLONG
        # Names that start with .wh. are the formats' own.
        assert _errno_of(os.open, m + b"/.wh.x", os.O_CREAT | os.O_WRONLY) == errno.EINVAL
        assert _errno_of(os.mkdir, m + b"/.wh..wh..opq") == errno.EINVAL
        tried += 7
        view = tree_view(mnt)
    with kernel_overlay(lows, tmp_path / "k", upper=upper, work=tmp_path / "kw") as k:
        assert tree_view(k) == view
    print(f"{tried} operations on {len(ODD_NAMES)} odd names")


# -- long paths and deep trees ----------------------------------------------------------------
def _make_chain(top: int, names: list[bytes]) -> int:
    """mkdir a chain of names below the dir fd `top`; returns an fd of the last one."""
    fd = os.dup(top)
    for n in names:
        os.mkdir(n, dir_fd=fd)
        nfd = os.open(n, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
        os.close(fd)
        fd = nfd
    return fd


def _deep_child(mnt: str, names: list[bytes], leaf: bytes, extra: int) -> None:
    os.chdir(mnt)
    for n in names:
        os.chdir(n)
    with open(leaf, "rb") as f:
        assert f.read() == b"deep"
    with open(leaf, "ab") as f:  # copy-up of the file and every parent, by relative path
        f.write(b"er")
    for _i in range(extra):  # new dirs further down, one level at a time
        os.mkdir(b"n" * 200)
        os.chdir(b"n" * 200)
    with open(b"made", "wb") as f:
        f.write(b"here")
    assert os.listdir(b".") == [b"made"]
    os.chdir(b"..")
    assert os.listdir(b".") == [b"n" * 200]


@pytest.mark.parametrize("shape", ["near_path_max", "deep"])
def test_long_paths_and_deep_trees(layers: tuple, tmp_path: Path, shape: str) -> None:
    lows, upper, work, mnt = layers
    if shape == "near_path_max":
        names = [b"%03d" % i + b"p" * 252 for i in range(18)]  # 18 * 256 > PATH_MAX
        extra = 4
    else:
        names = [b"d"] * 600
        extra = 50
    top = os.open(lows[1], os.O_RDONLY | os.O_DIRECTORY)
    fd = _make_chain(top, names)
    os.close(top)
    leaf = b"L" * 255
    lfd = os.open(leaf, os.O_CREAT | os.O_WRONLY, 0o644, dir_fd=fd)
    os.write(lfd, b"deep")
    os.close(lfd)
    os.close(fd)
    with mounted(lows, mnt, upper, work):
        pid = daemon_of(mnt)
        codes = join_children(
            start_children([(_deep_child, (str(mnt), names, leaf, extra))]), timeout=90, mnt=mnt
        )
        assert codes == [0]
        assert alive(pid)
    # The upper holds the copied-up chain; read it back by dir fds.
    fd = os.open(upper, os.O_RDONLY | os.O_DIRECTORY)
    for n in names:
        nfd = os.open(n, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
        os.close(fd)
        fd = nfd
    lfd = os.open(leaf, os.O_RDONLY, dir_fd=fd)
    assert os.read(lfd, 100) == b"deeper"
    os.close(lfd)
    os.close(fd)


# -- odd lower layers ------------------------------------------------------------------------
def test_special_files_and_markers_in_lowers(layers: tuple, tmp_path: Path) -> None:
    lows, upper, work, mnt = layers
    top, bottom = lows
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(bottom / "sock"))
    s.close()
    os.mkfifo(bottom / "fifo")
    os.mknod(bottom / "null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    os.mknod(bottom / "blk", stat.S_IFBLK | 0o600, os.makedev(7, 200))
    # Whiteouts in the top layer with nothing below them (kernel and OCI forms).
    os.mknod(top / "ghost", stat.S_IFCHR, os.makedev(0, 0))
    (top / ".wh.ghost2").touch()
    # `.wh.` names that are directories, with things inside.
    (top / ".wh.dirlike").mkdir()
    (top / ".wh.dirlike" / "inside").write_text("x")
    (bottom / "dirlike").write_text("hidden by a directory-shaped marker?")
    (bottom / "d").mkdir()
    (bottom / "d" / ".wh..wh..opq").mkdir()  # an opaque marker that is a directory
    (bottom / "d" / "f").write_text("f")
    # Symlink loops and symlinks out of the tree.
    os.symlink("loop2", bottom / "loop1")
    os.symlink("loop1", bottom / "loop2")
    os.symlink("self", bottom / "self")
    os.symlink(".", bottom / "dot")
    os.symlink("/etc", bottom / "etc")
    os.symlink("/nonexistent-pyunion-test/target", bottom / "dangling")
    with mounted(lows, mnt, upper, work, extra=("-o", "nodev")):
        pid = daemon_of(mnt)
        names = set(os.listdir(mnt))
        assert {"sock", "fifo", "null", "blk", "loop1", "self", "etc", "d"} <= names
        assert not {"ghost", "ghost2", ".wh.ghost2", ".wh.dirlike"} & names
        assert stat.S_ISSOCK(os.lstat(mnt / "sock").st_mode)
        assert stat.S_ISFIFO(os.lstat(mnt / "fifo").st_mode)
        assert os.lstat(mnt / "null").st_rdev == os.makedev(1, 3)
        assert os.lstat(mnt / "blk").st_rdev == os.makedev(7, 200)
        # Mounted nodev: devices do not open.
        assert _errno_of(open, mnt / "null", "wb") == errno.EACCES
        for loop in ("loop1", "self"):
            assert _errno_of(os.stat, mnt / loop) == errno.ELOOP
        assert os.readlink(mnt / "loop1") == "loop2"
        assert os.path.samefile(mnt / "dot", mnt)
        # An absolute symlink: the kernel follows it in the caller's namespace (expected).
        assert os.readlink(mnt / "etc") == "/etc"
        assert _errno_of(os.stat, mnt / "dangling") == errno.ENOENT
        # Copy-up of each odd thing (chown -h / chmod), and a fresh name over a lone whiteout.
        for n in ("sock", "fifo", "null", "loop1", "etc", "dangling"):
            os.chown(mnt / n, 1, 1, follow_symlinks=False)
        os.chmod(mnt / "fifo", 0o600)
        (mnt / "ghost").write_text("alive")
        os.unlink(mnt / "ghost")  # nothing below: no whiteout needed
        assert _errno_of(os.lstat, mnt / ".wh.ghost2") == errno.EINVAL
        assert _errno_of(os.lstat, mnt / ".wh.dirlike") == errno.EINVAL
        assert sorted(os.listdir(mnt / "d")) == ["f"]
        assert alive(pid)
    assert not (upper / "ghost").exists() and not os.path.lexists(upper / "ghost"), (
        "a whiteout was left where nothing below has the name"
    )
    assert os.readlink(upper / "etc") == "/etc" and os.lstat(upper / "etc").st_uid == 1
    assert stat.S_ISSOCK(os.lstat(upper / "sock").st_mode)


def test_swapped_directory_component_does_not_leak(layers: tuple, tmp_path: Path) -> None:
    """A lower directory replaced by a symlink to a host directory while mounted: the daemon
    must not follow it (it resolves by dir fds, O_NOFOLLOW)."""
    lows, upper, work, mnt = layers
    host = tmp_path / "host"
    host.mkdir()
    (host / "secret").write_text("HOST-SECRET")
    (host / "sub").mkdir()
    (host / "sub" / "secret").write_text("HOST-SECRET")
    for k in ("a", "b", "c"):
        (lows[1] / k / "d").mkdir(parents=True)
        (lows[1] / k / "d" / "own").write_text("own")
        (lows[0] / k).mkdir()
    with mounted(lows, mnt, upper, work):
        pid = daemon_of(mnt)
        # The kernel knows a/d, b/d and c/d as directories; the daemon has not opened them.
        for k in ("a", "b", "c"):
            assert stat.S_ISDIR(os.stat(mnt / k / "d").st_mode)
        assert os.listdir(mnt / "c" / "d") == ["own"]  # c/d: the daemon holds an fd
        for k in ("a", "b", "c"):
            os.rename(lows[1] / k / "d", lows[1] / k / "moved")
            os.symlink(str(host) if k != "b" else "../../host", lows[1] / k / "d")
        leaked = []
        for k in ("a", "b", "c"):
            for rel in ("secret", "sub/secret"):
                try:
                    data = (mnt / k / "d" / rel).read_text()
                except OSError:
                    continue
                if "HOST" in data:
                    leaked.append(f"{k}/d/{rel}")
            try:
                listing = os.listdir(mnt / k / "d")
            except OSError:
                listing = []
            if "secret" in listing:
                leaked.append(f"listdir {k}/d")
            with contextlib.suppress(OSError):  # a copy-up through the swapped component
                (mnt / k / "d" / "new").write_text("x")
        assert not leaked, f"the daemon followed a layer's symlink to the host: {leaked}"
        assert not (host / "new").exists(), "the daemon wrote through a layer's symlink"
        assert (host / "secret").read_text() == "HOST-SECRET"
        assert alive(pid)


@pytest.fixture
def open_mnt() -> Iterator[Path]:
    """A mount point that every user can reach (tmp_path's ancestors are 0700)."""
    base = Path(tempfile.mkdtemp(prefix="pyunion-hostile-", dir="/tmp"))
    os.chmod(base, 0o755)
    (base / "mnt").mkdir()
    yield base / "mnt"
    force_unmount(base / "mnt")
    if not is_mounted(base / "mnt"):
        shutil.rmtree(base)


def test_unprivileged_user_on_allow_other_mount(
    layers: tuple, tmp_path: Path, open_mnt: Path
) -> None:
    lows, upper, work, _ = layers
    mnt = open_mnt
    lo = lows[1]
    (lo / "private").write_text("root only")
    os.chmod(lo / "private", 0o600)
    (lo / "public").write_text("everyone")
    os.chmod(lo / "public", 0o644)
    (lo / "closed").mkdir(mode=0o700)
    (lo / "closed" / "f").write_text("in closed")
    (lo / "search").mkdir(mode=0o711)
    (lo / "search" / "known").write_text("by name")
    os.chmod(lo / "search" / "known", 0o644)
    (lo / "sticky").mkdir()
    os.chmod(lo / "sticky", 0o1777)
    (lo / "sticky" / "roots").write_text("mine")
    (lo / "suidw").write_text("w")
    os.chmod(lo / "suidw", 0o4777)
    shutil.copy("/usr/bin/id", lo / "suid-id")
    os.chmod(lo / "suid-id", 0o4755)

    def as_nobody(m: str, out: str) -> None:
        os.setgroups([])
        os.setgid(NOBODY)
        os.setuid(NOBODY)
        res = {}
        res["read private"] = _errno_of(_read, f"{m}/private")
        res["read public"] = _errno_of(_read, f"{m}/public")
        res["write public"] = _errno_of(_write, f"{m}/public", "a", "x")
        res["create in root dir"] = _errno_of(_write, f"{m}/mine", "w", "")
        res["list closed"] = _errno_of(os.listdir, f"{m}/closed")
        res["read closed/f"] = _errno_of(_read, f"{m}/closed/f")
        res["list search"] = _errno_of(os.listdir, f"{m}/search")
        res["read search/known"] = _errno_of(_read, f"{m}/search/known")
        res["unlink public"] = _errno_of(os.unlink, f"{m}/public")
        res["chmod public"] = _errno_of(os.chmod, f"{m}/public", 0o666)
        res["create in sticky"] = _errno_of(_write, f"{m}/sticky/nobodys", "w", "n")
        res["unlink roots in sticky"] = _errno_of(os.unlink, f"{m}/sticky/roots")
        res["rename roots in sticky"] = _errno_of(os.rename, f"{m}/sticky/roots", f"{m}/sticky/x")
        res["setxattr trusted"] = _errno_of(os.setxattr, f"{m}/sticky/nobodys", "trusted.x", b"1")
        res["write suidw"] = _errno_of(_write, f"{m}/suidw", "a", "more")
        r = subprocess.run([f"{m}/suid-id", "-u"], capture_output=True, text=True, timeout=20)
        res["suid-id euid"] = int(r.stdout.strip() or -1)
        with open(out, "w") as f:
            f.write(repr(res))

    out = mnt.parent / "result"  # where nobody can write
    out.touch()
    os.chmod(out, 0o666)
    with mounted(lows, mnt, upper, work, extra=("-o", "nosuid")):
        opts = next(
            line for line in _read("/proc/self/mountinfo").splitlines() if f" {mnt} " in line
        )
        assert "nosuid" in opts.split()[5], "the mount should be nosuid"
        codes = join_children(start_children([(as_nobody, (str(mnt), str(out)))]), 60, mnt)
        assert codes == [0]
        res = eval(out.read_text())
        assert os.stat(mnt / "suid-id").st_mode & stat.S_ISUID, "the suid bit shows"
        suidw_mode = os.stat(mnt / "suidw").st_mode
        assert (mnt / "private").read_text() == "root only"
    want = {
        "read private": errno.EACCES,
        "read public": 0,
        "write public": errno.EACCES,
        "create in root dir": errno.EACCES,
        "list closed": errno.EACCES,
        "read closed/f": errno.EACCES,
        "list search": errno.EACCES,
        "read search/known": 0,
        "unlink public": errno.EACCES,
        "chmod public": errno.EPERM,
        "create in sticky": 0,
        "unlink roots in sticky": errno.EPERM,
        "rename roots in sticky": errno.EPERM,
        "setxattr trusted": errno.EPERM,
        "write suidw": 0,
        "suid-id euid": NOBODY,
    }
    assert res == want, {k: (res.get(k), v) for k, v in want.items() if res.get(k) != v}
    # What nobody was refused left the upper alone.
    assert not (upper / "public").exists() and not (upper / "private").exists()
    assert (upper / "sticky" / "roots").exists() is False
    # A write by an unprivileged user clears the setuid bit, as the kernel does.
    assert not suidw_mode & stat.S_ISUID, oct(suidw_mode)
    assert (upper / "sticky" / "nobodys").stat().st_uid == NOBODY


def test_truncating_open_clears_set_id_bits_as_the_kernel_does(
    layers: tuple, open_mnt: Path
) -> None:
    """open(O_TRUNC) by a user who may write a setuid-root file must clear its set-user-ID
    bit (and set-group-ID: with group execute, or without it for a user outside the
    file's group, as the kernel's setattr_should_drop_sgid does), as a truncate does;
    root (CAP_FSETID) keeps them. The kernel's FUSE client leaves an O_TRUNC open's
    truncation to the daemon (atomic_o_trunc) and sends no mode, and the daemon
    truncated as root: the file stayed
    setuid root (`: > file` by nobody; kernel overlayfs clears it). Checked through the
    mount (the kernel's cached mode must not show the old bits) and in the upper."""
    lows, upper, work, _ = layers
    mnt = open_mnt
    modes = {"suid": 0o4777, "sgid": 0o2777, "sgid-nx": 0o2767, "root-suid": 0o4777}
    for name, mode in modes.items():
        for where in (lows[0], upper):  # copied up by the open, and upper already
            (where / f"{where.name}-{name}").write_text("data")
            os.chmod(where / f"{where.name}-{name}", mode)

    def as_nobody(m: str) -> None:
        os.setgroups([])
        os.setgid(NOBODY)
        os.setuid(NOBODY)
        for where in (lows[0], upper):
            for name in ("suid", "sgid", "sgid-nx"):
                os.close(os.open(f"{m}/{where.name}-{name}", os.O_WRONLY | os.O_TRUNC))

    want = {"suid": 0o777, "sgid": 0o777, "sgid-nx": 0o767, "root-suid": 0o4777}
    with mounted(lows, mnt, upper, work):
        for where in (lows[0], upper):
            for name in modes:
                os.stat(mnt / f"{where.name}-{name}")  # the kernel caches the mode
        codes = join_children(start_children([(as_nobody, (str(mnt),))]), 60, mnt)
        assert codes == [0]
        for where in (lows[0], upper):
            os.close(os.open(mnt / f"{where.name}-root-suid", os.O_WRONLY | os.O_TRUNC))
        shown = {
            (where.name, name): stat.S_IMODE(os.stat(mnt / f"{where.name}-{name}").st_mode)
            for where in (lows[0], upper)
            for name in modes
        }
    on_disk = {
        (where.name, name): stat.S_IMODE(os.stat(upper / f"{where.name}-{name}").st_mode)
        for where in (lows[0], upper)
        for name in modes
    }
    expected = {(where.name, name): want[name] for where in (lows[0], upper) for name in modes}
    assert shown == expected, {k: oct(v) for k, v in shown.items() if v != expected[k]}
    assert on_disk == expected, {k: oct(v) for k, v in on_disk.items() if v != expected[k]}


# -- lifecycle ------------------------------------------------------------------------------
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGHUP])
def test_other_signals_unmount_cleanly(layers: tuple, sig: int) -> None:
    lows, upper, work, mnt = layers
    (lows[0] / "f").write_text("x")
    pyunion("mount", "-o", f"lowerdir={lows[0]},upperdir={upper},workdir={work}", str(mnt))
    try:
        pid = daemon_of(mnt)
        (mnt / "f").write_text("y")
        os.kill(pid, sig)
        assert wait_gone(pid), "the daemon did not exit"
        assert not is_mounted(mnt)
    finally:
        force_unmount(mnt)
    assert (upper / "f").read_text() == "y"


def test_sigterm_of_a_busy_mount(layers: tuple) -> None:
    lows, upper, work, mnt = layers
    (lows[0] / "d").mkdir()
    pyunion("mount", "-o", f"lowerdir={lows[0]},upperdir={upper},workdir={work}", str(mnt))
    holder = subprocess.Popen(["sleep", "60"], cwd=mnt / "d")
    try:
        pid = daemon_of(mnt)
        os.kill(pid, signal.SIGTERM)
        assert wait_gone(pid), "the daemon did not exit while the mount was busy"
        assert not is_mounted(mnt), "a busy mount stayed after SIGTERM"
    finally:
        holder.kill()
        holder.wait()
        force_unmount(mnt)


def test_lazy_umount_of_a_busy_mount(layers: tuple) -> None:
    lows, upper, work, mnt = layers
    (lows[0] / "d").mkdir()
    pyunion("mount", "-o", f"lowerdir={lows[0]},upperdir={upper},workdir={work}", str(mnt))
    holder = subprocess.Popen(["sleep", "60"], cwd=mnt / "d")
    try:
        pid = daemon_of(mnt)
        r = pyunion("umount", str(mnt), check=False)
        assert r.returncode != 0 and "busy" in r.stderr and f"pid {holder.pid}" in r.stderr
        pyunion("umount", "--lazy", str(mnt), timeout=30, check=False)
        assert not is_mounted(mnt)
        holder.kill()
        holder.wait()
        assert wait_gone(pid), "the daemon of a detached mount did not exit once unused"
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()
        force_unmount(mnt)


def test_sigterm_during_a_big_copy_up(layers: tuple) -> None:
    lows, upper, work, mnt = layers
    data = os.urandom(1 << 20) * 48
    (lows[0] / "big").write_bytes(data)
    pyunion("mount", "-o", f"lowerdir={lows[0]},upperdir={upper},workdir={work}", str(mnt))
    try:
        pid = daemon_of(mnt)

        def writer(m: str) -> None:
            with open(f"{m}/big", "r+b") as f:
                f.write(b"HEAD")

        child = start_children([(writer, (str(mnt),))])
        time.sleep(0.05)
        os.kill(pid, signal.SIGTERM)
        assert wait_gone(pid, 30), "the daemon hung on SIGTERM during a copy-up"
        join_children(child, timeout=30)
        assert not is_mounted(mnt)
    finally:
        force_unmount(mnt)
    with mounted(lows, mnt, upper, work):
        got = (mnt / "big").read_bytes()
        assert got in (data, b"HEAD" + data[4:])
        assert os.listdir(work / "work") == []


def test_layer_under_mount_point_or_mount_point_in_layer_is_refused(
    layers: tuple, tmp_path: Path
) -> None:
    lows, _upper, work, mnt = layers
    (lows[0] / "inner").mkdir()
    (mnt / "sub").mkdir()
    os.symlink(mnt, tmp_path / "alias")
    cases = [
        ["-o", f"lowerdir={lows[0]}", str(lows[0] / "inner")],  # mount point in a layer
        ["-o", f"lowerdir={mnt / 'sub'}", str(mnt)],  # layer under the mount point
        ["-o", f"lowerdir={tmp_path / 'alias' / 'sub'}", str(mnt)],  # the same through a symlink
        ["-o", f"lowerdir={lows[0]},upperdir={mnt / 'sub'},workdir={work}", str(mnt)],
        ["-o", f"lowerdir={lows[0]}", str(tmp_path / "alias")],  # fine: a plain mount
    ]
    for args in cases[:-1]:
        r = pyunion("mount", *args, check=False, timeout=20)
        assert r.returncode != 0 and r.stderr.count("\n") == 1, (args, r.stderr)
        assert not is_mounted(args[-1])
    r = pyunion("mount", *cases[-1], check=False, timeout=20)
    try:
        assert r.returncode == 0, r.stderr
    finally:
        pyunion("umount", str(mnt), check=False)
        force_unmount(mnt)


def test_rename_of_a_very_deep_merged_dir(layers: tuple) -> None:
    """Renaming a merged dir copies its subtree up; depth must not matter (1200 levels)."""
    lows, upper, work, mnt = layers
    (lows[0] / "top").mkdir()
    top = os.open(lows[1], os.O_RDONLY | os.O_DIRECTORY)
    fd = _make_chain(top, [b"top"] + [b"d"] * 1200)
    os.close(top)
    os.close(os.open(b"leaf", os.O_CREAT | os.O_WRONLY, 0o644, dir_fd=fd))
    os.close(fd)

    def mover(m: str) -> None:
        os.rename(f"{m}/top", f"{m}/moved")
        os.chdir(f"{m}/moved")
        for _ in range(1200):
            os.chdir("d")
        assert os.listdir(".") == ["leaf"]

    try:
        with mounted(lows, mnt, upper, work):
            codes = join_children(start_children([(mover, (str(mnt),))]), timeout=90, mnt=mnt)
            assert codes == [0], (
                "rename of a 1200-level merged dir failed (see the traceback above)"
            )
    finally:
        # Deeper than shutil.rmtree (pytest's cleanup of old tmp dirs) can go: rm -rf.
        force_unmount(mnt)
        for p in (lows[1], upper, work):
            subprocess.run(["rm", "-rf", "--one-file-system", str(p)], timeout=60)


@needs_fuse
def test_root_mount_allows_devices_and_setuid_like_the_kernel(layers: tuple) -> None:
    """A root mount is dev,suid like a kernel overlay mount (libfuse's default is not)."""
    lows, upper, work, mnt = layers
    os.mknod(lows[0] / "null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    with mounted(lows, mnt, upper, work):
        opts = next(
            line for line in _read("/proc/self/mountinfo").splitlines() if f" {mnt} " in line
        ).split()[5]
        assert "nosuid" not in opts and "nodev" not in opts
        with open(mnt / "null", "wb") as f:
            f.write(b"discarded")
