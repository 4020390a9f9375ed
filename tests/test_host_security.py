"""A local user or a hostile caller must not turn root's mount against root or its data.

Kernel overlayfs is the oracle where it has an answer: whiteouts cannot be
made through the merged view; overlapping layer, upper and work paths are
refused before anything is touched. Beyond that: the daemon's state files
cannot be redirected by a user, the daemon pins no filesystem it does not
serve (cwd `/`, no inherited fds), and `pyunion umount` returning means every
layer is released.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from support import (
    KERNEL_OPTIONS,
    PYUNION,
    force_unmount,
    is_mounted,
    kernel_overlay,
    mounted,
    needs_fuse,
    pyunion,
    run_child,
    throwaway_user,
    wait_until,
)

from unionfs.syscalls import RENAME_WHITEOUT, renameat2

pytestmark = [needs_fuse, pytest.mark.timeout(120)]

NOBODY = 65534


@pytest.fixture
def open_tree() -> Iterator[Path]:
    """A tree under /tmp every user can reach (tmp_path's ancestors are 0700)."""
    base = Path(tempfile.mkdtemp(prefix="pyunion-sec-", dir="/tmp"))
    os.chmod(base, 0o755)
    try:
        yield base
    finally:
        for m in base.glob("*mnt"):
            force_unmount(m)
        if not any(is_mounted(m) for m in base.glob("*mnt")):
            shutil.rmtree(base)


def _errno_as(uid: int, fn: Callable[[], object]) -> int:
    """errno of fn() run in a child as `uid` (0 if it worked)."""
    r, w = os.pipe()

    def child() -> None:
        os.close(r)
        if uid:
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
        try:
            fn()
            code = 0
        except OSError as e:
            code = e.errno or -1
        os.write(w, str(code).encode())

    try:
        assert run_child(child) == 0
        os.close(w)
        w = -1
        with os.fdopen(r, "rb") as f:
            r = -1
            return int(f.read())
    finally:
        for fd in (r, w):
            if fd >= 0:
                os.close(fd)


# -- whiteouts cannot be made through the merged view --------------------------------------
def test_no_whiteout_through_the_merged_view(open_tree: Path) -> None:
    """mknod c 0 0 and RENAME_WHITEOUT: kernel overlayfs refuses both, for root and a user."""
    t = open_tree
    lows, upper, work, mnt = [t / "l1", t / "l2"], t / "upper", t / "work", t / "mnt"
    for d in (*lows, upper, work, t / "kup"):
        d.mkdir()
    for d in (lows[0] / "merged", lows[1] / "merged"):
        d.mkdir()
        d.chmod(0o777)
    (lows[0] / "merged" / "f").write_text("f")
    lows[0].chmod(0o777)

    def attempts(m: Path) -> dict[str, int]:
        def mknod(p: Path) -> Callable[[], None]:
            return lambda: os.mknod(p, stat.S_IFCHR | 0o644, os.makedev(0, 0))

        def rename_wh(a: Path, b: Path) -> Callable[[], None]:
            def go() -> None:
                fd = os.open(m, os.O_RDONLY | os.O_DIRECTORY)
                try:
                    renameat2(
                        fd,
                        os.fsencode(a.relative_to(m)),
                        fd,
                        os.fsencode(b.relative_to(m)),
                        RENAME_WHITEOUT,
                    )
                finally:
                    os.close(fd)

            return go

        out = {}
        for who, uid in (("root", 0), ("user", NOBODY)):
            out[f"mknod top {who}"] = _errno_as(uid, mknod(m / f"wh-{who}"))
            out[f"mknod merged {who}"] = _errno_as(uid, mknod(m / "merged" / f"wh-{who}"))
        out["rename_whiteout root"] = _errno_as(
            0, rename_wh(m / "merged" / "f", m / "merged" / "g")
        )
        out["rename_whiteout user"] = _errno_as(
            NOBODY, rename_wh(m / "merged" / "f", m / "merged" / "g")
        )
        out["listing"] = len(os.listdir(m / "merged"))
        return out

    with kernel_overlay(lows, t / "kmnt", upper=t / "kup", work=t / "kwork") as k:
        want = attempts(k)
    assert want["mknod merged root"] == errno.EPERM and want["mknod merged user"] == errno.EPERM
    with mounted(lows, mnt, upper, work) as m:
        got = attempts(m)
    assert got == want
    assert not any(stat.S_ISCHR(os.lstat(p).st_mode) for p in upper.rglob("wh-*"))


# -- overlapping layer, upper and work paths -----------------------------------------------
# (lowerdir, upperdir, workdir) relative to the test tree, and whether kernel overlayfs
# (6.x) mounts it. Every one is refused by pyunion: where the kernel accepts (an upper or
# a work dir inside a lower layer), the lower would change under the mount, which the
# kernel leaves undefined and pyunion does not allow.
OVERLAPS = [
    ("l1:l2", "u", "l1", False),  # work dir = a lower layer (it used to empty l1/work)
    ("l1:l2", "u", "l1/sub", True),  # work dir inside a lower layer
    ("w/x:l2", "u", "w", False),  # a lower layer inside the work dir
    ("l1:l2", "l1", "w", False),  # upper = a lower layer (whiteouts written into it)
    ("l1:l2", "l1/sub", "w", True),  # upper inside a lower layer
    ("u/inner:l2", "u", "w", False),  # a lower layer inside the upper
    ("l1:l1", None, None, False),  # the same lower layer twice
    ("l2:l1:link", "u", "w", False),  # ... once through a symlink
    ("l1/sub:l1", None, None, False),  # a lower layer inside another
    ("l1:l1/sub", None, None, False),
    ("l1", "u", "u", False),  # upper = work
    ("l1", "u", "u/inner", False),  # work inside the upper
    ("l1", "w/x", "w", False),  # upper inside the work dir
    ("l1:bind", None, None, False),  # a bind mount of a lower layer, as another
    ("bsub:l1", None, None, False),  # a bind mount of a lower's subdirectory
    ("l1:l2", "u", "w", True),  # fine: separate trees
]


@pytest.fixture
def overlap_tree(open_tree: Path) -> Iterator[Path]:
    t = open_tree
    for d in ("l1/sub", "l1/work", "l2", "u/inner", "w/x", "bind", "bsub", "mnt", "kmnt"):
        (t / d).mkdir(parents=True)
    (t / "l1" / "work" / "keep").write_text("lower data")
    (t / "l1" / "sub" / "keep").write_text("lower data")
    (t / "link").symlink_to("l1")
    for src, dst in (("l1", "bind"), ("l1/sub", "bsub")):
        subprocess.run(["mount", "--bind", str(t / src), str(t / dst)], check=True, timeout=30)
    try:
        yield t
    finally:
        for d in ("bind", "bsub"):
            subprocess.run(["umount", str(t / d)], capture_output=True, timeout=30, check=False)


def _snapshot(t: Path) -> dict[str, tuple[int, int, bytes]]:
    """Every object of the tree: its mode, size and, for files, content."""
    out = {}
    for p in sorted(t.rglob("*")):
        if p.parent.name in ("mnt", "kmnt", "bind", "bsub") or p.name in ("bind", "bsub"):
            continue
        st = os.lstat(p)
        data = p.read_bytes() if stat.S_ISREG(st.st_mode) else b""
        out[str(p.relative_to(t))] = (st.st_mode, st.st_size, data)
    return out


@pytest.mark.parametrize("lower,upper,work,kernel_mounts", OVERLAPS)
def test_overlapping_paths_are_refused_before_anything_is_touched(
    overlap_tree: Path, lower: str, upper: str | None, work: str | None, kernel_mounts: bool
) -> None:
    t = overlap_tree
    opts = "lowerdir=" + ":".join(str(t / p) for p in lower.split(":"))
    if upper is not None:
        opts += f",upperdir={t / upper},workdir={t / work}"
    fine = (lower, upper, work) == OVERLAPS[-1][:3]
    before = _snapshot(t)
    r = pyunion("mount", "-o", opts, str(t / "mnt"), check=False)
    if r.returncode == 0:
        pyunion("umount", str(t / "mnt"))
    after = _snapshot(t)
    # The oracle last: refusing or not, the kernel may already have made (or emptied!)
    # WORK/work, even inside a lower layer.
    kopts = f"{opts},{KERNEL_OPTIONS}"
    k = subprocess.run(
        ["mount", "-t", "overlay", "overlay", "-o", kopts, str(t / "kmnt")],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    if k.returncode == 0:
        subprocess.run(["umount", str(t / "kmnt")], check=True, timeout=30)
    assert (k.returncode == 0) == kernel_mounts, f"the kernel changed its mind: {k.stderr}"
    if fine:
        assert r.returncode == 0, r.stderr
        return
    assert r.returncode != 0 and not is_mounted(t / "mnt"), "pyunion mounted overlapping paths"
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert after == before, "a refused mount touched the tree"


# -- state files ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def user() -> Iterator[tuple[int, int]]:
    """A throw-away unprivileged user (uid, gid), removed afterwards."""
    with throwaway_user(f"pyu-sec-{os.getpid()}") as ids:
        yield ids


def _as(
    who: tuple[int, int], *cmd: str, env: dict[str, str] | None = None, check: bool = True
) -> subprocess.CompletedProcess[str]:
    """Run a command as user `who` (environment given whole, not through env(1))."""
    uid, gid = who
    r = subprocess.run(
        ["setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups", *cmd],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        check=False,
        cwd=str(Path(__file__).parent.parent),
    )
    if check:
        assert r.returncode == 0, r.stderr
    return r


def test_a_user_cannot_make_roots_mount_write_through_a_planted_pid_file(
    open_tree: Path, user: tuple[int, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    """An older pyunion left its state dir 0777: a user plants HASH.pid -> a root file."""
    from unionfs.mount import daemon_pid

    t = open_tree
    for d in ("l", "mnt", "run"):
        (t / d).mkdir()
    state = t / "run" / "pyunion"
    state.mkdir()
    state.chmod(0o777)
    victim = t / "victim"  # stands for /etc/shadow
    victim.write_text("root:precious\n")
    victim.chmod(0o600)
    # The pid file's name is public knowledge: a hash of the mount point.
    name = hashlib.sha256(os.fsencode(os.path.realpath(t / "mnt"))).hexdigest()[:24] + ".pid"
    _as(user, "ln", "-s", str(victim), str(state / name))
    _as(user, "ln", "-s", str(victim), str(state / "other.pid"))
    monkeypatch.setenv("PYUNION_STATE_DIR", str(state))
    with mounted([t / "l"], t / "mnt"):
        assert victim.read_text() == "root:precious\n", "root's mount wrote through the symlink"
        st = os.stat(state, follow_symlinks=False)
        assert stat.S_ISDIR(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o700 and st.st_uid == 0
        pid_file = os.lstat(state / name)
        assert stat.S_ISREG(pid_file.st_mode) and pid_file.st_uid == 0
        pid = daemon_pid(str(t / "mnt"))
        assert pid is not None and (state / name).read_text().split()[0] == str(pid)
        r = _as(user, "touch", str(state / "again"), check=False)
        assert r.returncode != 0, "the state directory is still open to other users"
    assert not (state / name).exists() and victim.read_text() == "root:precious\n"


def test_an_unsafe_state_directory_is_refused(
    open_tree: Path, user: tuple[int, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    t = open_tree
    for d in ("l", "mnt", "elsewhere", "users"):
        (t / d).mkdir()
    os.chown(t / "users", *user)
    (t / "link").symlink_to("elsewhere")
    for state, why in ((t / "link", "symlink"), (t / "users", "belongs to uid")):
        env = {**os.environ, "PYUNION_STATE_DIR": str(state)}
        r = pyunion("mount", str(t / "l"), str(t / "mnt"), check=False, env=env)
        assert r.returncode != 0 and not is_mounted(t / "mnt")
        assert len(r.stderr.strip().splitlines()) == 1 and why in r.stderr, r.stderr
    assert os.listdir(t / "elsewhere") == [] and os.listdir(t / "users") == []


def test_roots_default_state_directory_is_private(layers: tuple) -> None:
    lows, _, _, mnt = layers
    with mounted(lows, mnt):
        st = os.stat("/run/pyunion", follow_symlinks=False)
    assert stat.S_ISDIR(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o700 and st.st_uid == 0


PROBE = (
    "import sys; from unionfs.errors import UserError; from unionfs.mount import "
    "state_dir, open_state_dir\n"
    "try:\n    open_state_dir()\nexcept UserError as e:\n    sys.exit(str(e))\n"
    "print(state_dir())"
)


def test_a_users_state_directory_is_private(open_tree: Path, user: tuple[int, int]) -> None:
    """Non-root: $XDG_RUNTIME_DIR/pyunion when it is theirs, else a private dir in $TMPDIR,
    or in their home when another user took that name."""
    t = open_tree
    python = str(Path(sys.executable).parent / "python")
    runtime, tmp = t / "runtime", t / "tmp"
    runtime.mkdir(mode=0o700)
    os.chown(runtime, *user)
    tmp.mkdir()
    tmp.chmod(0o1777)
    base = {
        k: v for k, v in os.environ.items() if k not in ("PYUNION_STATE_DIR", "XDG_RUNTIME_DIR")
    }
    r = _as(user, python, "-c", PROBE, env={**base, "XDG_RUNTIME_DIR": str(runtime)})
    assert r.stdout.strip() == str(runtime / "pyunion")
    st = os.stat(runtime / "pyunion")
    assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (user[0], 0o700)
    # No runtime dir of theirs (root's here): a private one in $TMPDIR...
    home = t / "home"
    home.mkdir(mode=0o700)
    os.chown(home, *user)
    env = {**base, "XDG_RUNTIME_DIR": str(t), "TMPDIR": str(tmp), "HOME": str(home)}
    private = tmp / f"pyunion-run-{user[0]}"
    # ... which another user cannot plant for them (a symlink, or a directory of their
    # own): never used, nor can she stop them with it (before, every mount failed): a
    # directory in their home instead, as podman's ~/rundir.
    _as((NOBODY, NOBODY), "ln", "-s", str(t / "runtime"), str(private))
    r = _as(user, python, "-c", PROBE, env=env)
    assert r.stdout.strip() == str(home / ".pyunion-run")
    assert os.listdir(runtime) == ["pyunion"]  # what XDG_RUNTIME_DIR made, nothing more
    private.unlink()
    _as((NOBODY, NOBODY), "mkdir", "-m", "777", str(private))
    r = _as(user, python, "-c", PROBE, env=env)
    assert r.stdout.strip() == str(home / ".pyunion-run") and os.listdir(private) == []
    st = os.stat(home / ".pyunion-run")
    assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (user[0], 0o700)
    # She lets the name go: the home's stays theirs (before, $TMPDIR's was made and used,
    # and umount found none of the daemons recorded in the home, nor waited for them).
    private.rmdir()
    r = _as(user, python, "-c", PROBE, env=env)
    assert r.stdout.strip() == str(home / ".pyunion-run") and not private.exists()
    (home / ".pyunion-run").rmdir()
    r = _as(user, python, "-c", PROBE, env=env)
    st = os.stat(private, follow_symlinks=False)
    assert r.stdout.strip() == str(private)
    assert stat.S_ISDIR(st.st_mode) and (st.st_uid, stat.S_IMODE(st.st_mode)) == (user[0], 0o700)


# -- what the daemon holds -----------------------------------------------------------------
@contextlib.contextmanager
def tmpfs(path: Path) -> Iterator[Path]:
    """A tmpfs at `path` for the block; unmounted (lazily, as a last resort) after it."""
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(path)], check=True, timeout=30
    )
    try:
        yield path
    finally:
        if is_mounted(path):
            subprocess.run(
                ["umount", "-l", str(path)], capture_output=True, timeout=30, check=False
            )


def test_the_daemon_pins_no_filesystem_of_its_caller(tmp_path: Path) -> None:
    """Its cwd is / (as libfuse's daemonize) and it keeps none of the caller's fds."""
    t = tmp_path
    for d in ("l", "mnt"):
        (t / d).mkdir()
    (t / "l" / "f").write_text("layer")
    with tmpfs(t / "cwdfs") as cwdfs, tmpfs(t / "fdfs") as fdfs:
        (fdfs / "held").write_text("x")
        fd = os.open(fdfs / "held", os.O_RDONLY)
        try:
            # Relative paths, from a cwd on its own filesystem, with an fd on another.
            r = subprocess.run(
                [*PYUNION, "mount", "../l", "../mnt"],
                cwd=cwdfs,
                pass_fds=(fd,),
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
            )
        finally:
            os.close(fd)
        assert r.returncode == 0, r.stderr
        try:
            for fs in (cwdfs, fdfs):
                u = subprocess.run(
                    ["umount", str(fs)], capture_output=True, text=True, timeout=30, check=False
                )
                assert u.returncode == 0, f"the daemon pins {fs}: {u.stderr}"
            assert (t / "mnt" / "f").read_text() == "layer"
        finally:
            pyunion("umount", str(t / "mnt"), check=False)
            force_unmount(t / "mnt")


def test_after_umount_the_layers_filesystem_unmounts_at_once(tmp_path: Path) -> None:
    """`pyunion umount` returns: every layer is released, whatever the mount did (N times)."""
    from unionfs.syscalls import umount2

    mnt = tmp_path / "mnt"
    mnt.mkdir()
    for i in range(5):
        with tmpfs(tmp_path / "fs") as fs:
            for d in ("l1/top/a/b/c", "l2/top/a/b/c", "l2/other/x", "u", "w"):
                (fs / d).mkdir(parents=True)
            for d in ("top", "top/a", "top/a/b", "top/a/b/c"):
                (fs / "l2" / d / "f").write_text(d)
            (fs / "l2" / "top" / "a" / "big").write_bytes(os.urandom(2 << 20))  # copied in a thread
            with mounted([fs / "l1", fs / "l2"], mnt, fs / "u", fs / "w") as m:
                os.rename(m / "top", m / "moved")  # merged dirs: their subtree is copied up
                os.rename(m / "moved" / "a" / "b", m / "moved" / "b2")
                os.rename(m / "other", m / "other2")
                with open(m / "moved" / "a" / "f", "a") as f:
                    f.write("more")
                assert sorted(os.listdir(m / "moved" / "b2" / "c")) == ["f"]
            umount2(str(fs))  # no retry: EBUSY fails the test
            assert not is_mounted(fs), f"round {i}"


def test_closing_the_core_releases_every_layer_fd(tmp_path: Path) -> None:
    """After directory renames, released directory nodes had reopened fds nobody closed."""
    import trio

    from unionfs.fuseops import FuseOps
    from unionfs.inodes import ROOT_ID
    from unionfs.layers import LayerStack
    from unionfs.mount import prepare_workdir
    from unionfs.union import Union

    for d in ("l1/top/a/b/c", "l2/top/a/b/c", "up", "work"):
        (tmp_path / d).mkdir(parents=True)
    for d in ("top", "top/a", "top/a/b", "top/a/b/c"):
        (tmp_path / "l2" / d / "f").write_text(d)
    stack = LayerStack([str(tmp_path / "l1"), str(tmp_path / "l2")], str(tmp_path / "up"))
    lock_fd, work_fd = prepare_workdir(str(tmp_path / "work"))
    core = Union(stack, work_fd)
    ops = FuseOps(core)

    async def requests() -> None:
        await ops.lookup(ROOT_ID, b"top")
        await ops.rename(ROOT_ID, b"top", ROOT_ID, b"moved", 0)

    trio.run(requests)
    core.close()
    os.close(lock_fd)
    held = []
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            target = os.readlink(f"/proc/self/fd/{fd}")
            if target.startswith(str(tmp_path)):
                held.append(target)
    assert not held, f"fds left open after close: {held}"


def test_wait_gone_waits_for_every_thread(tmp_path: Path) -> None:
    """A zombie leader whose threads still run still holds its files: it is not gone."""
    from unionfs.mount import process_alive, wait_gone

    flag = tmp_path / "release"
    code = (
        "import ctypes, os, threading, time\n"
        f"def hold():\n    while not os.path.exists({str(flag)!r}):\n        time.sleep(0.01)\n"
        "threading.Thread(target=hold).start()\n"
        "ctypes.CDLL(None).pthread_exit(None)  # the main thread only\n"
    )
    p = subprocess.Popen([sys.executable, "-c", code])
    try:
        deadline = time.monotonic() + 20
        while _state(p.pid) != "Z":  # the leader has exited, its thread runs on
            assert time.monotonic() < deadline and p.poll() is None
            time.sleep(0.01)
        assert process_alive(p.pid)
        assert not wait_gone(p.pid, 0.2)
        flag.touch()
        assert wait_gone(p.pid, 20)
    finally:
        flag.touch()
        p.wait(timeout=20)


def _state(pid: int) -> str:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0]


# -- no recursion over directory depth -----------------------------------------------------
def test_a_deep_released_chain_resolves_without_recursion(tmp_path: Path) -> None:
    """A file open 1100 levels down whose directories were all forgotten: it still works."""
    from unionfs.layers import LayerStack
    from unionfs.mount import prepare_workdir
    from unionfs.tree import rmtree
    from unionfs.union import Union

    depth = 1100  # deeper than Python's recursion limit (1000)
    for d in ("l1", "up", "work"):
        (tmp_path / d).mkdir()
    fd = os.open(tmp_path / "l1", os.O_RDONLY | os.O_DIRECTORY)
    for _ in range(depth):
        os.mkdir(b"d", dir_fd=fd)
        nfd = os.open(b"d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
        os.close(fd)
        fd = nfd
    leaf_fd = os.open(b"leaf", os.O_CREAT | os.O_WRONLY, 0o644, dir_fd=fd)
    os.write(leaf_fd, b"deep data")
    os.close(leaf_fd)
    os.close(fd)
    stack = LayerStack([str(tmp_path / "l1")], str(tmp_path / "up"))
    lock_fd, work_fd = prepare_workdir(str(tmp_path / "work"))
    core = Union(stack, work_fd)
    try:
        dirs, d = [], core.root
        for _ in range(depth):
            d = core.lookup(d, b"d")
            dirs.append(d.ino)
        leaf = core.lookup(d, b"leaf")
        fh = core.open(leaf, os.O_RDONLY)
        del d
        for ino in dirs:  # the kernel forgets the directories: their fds are closed
            core.forget(ino, 1)
        assert core.listxattr(leaf) == []
        core.copy_up(leaf)  # parents first, from the top
        buf = bytearray(100)  # as the adaptor reads (`FuseOps.read`)
        n = core.read_into(fh, 0, memoryview(buf))
        assert bytes(buf[:n]) == b"deep data"
    finally:
        core.close()
        os.close(lock_fd)
        for d in ("l1", "up", "work"):
            rmtree(str(tmp_path / d))


# -- the daemon acts on what it opened, never on a name a user can swap ---------------------
# Run as the user who owns the upper: chmod her own file through the mount, while a
# thread swaps it in the upper (RENAME_EXCHANGE) with a symlink to root's file.
_CHMOD_RACE = """
import ctypes, os, stat, sys, threading, time
upper, mnt, victim, budget = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
libc = ctypes.CDLL(None, use_errno=True)
ufd = os.open(upper, os.O_RDONLY | os.O_DIRECTORY)
start, rounds, tries = time.monotonic(), 0, 0
while time.monotonic() - start < budget:
    f, s = b"f%d" % rounds, b"s%d" % rounds  # a fresh name each round: an inode whose
    open(os.path.join(mnt, f.decode()), "w").close()  # type changed under FUSE goes bad
    os.symlink(victim, s, dir_fd=ufd)
    stop = []
    def swap():
        while not stop:
            libc.renameat2(ufd, f, ufd, s, 2)
    t = threading.Thread(target=swap)
    t.start()
    try:
        for i in range(100):
            tries += 1
            try:
                os.chmod(os.path.join(mnt, f.decode()), 0o666 if i % 2 else 0o644)
            except OSError:
                pass
            if stat.S_IMODE(os.stat(victim).st_mode) != 0o600:
                sys.exit(f"root chmod'ed the victim after {tries} tries")
    finally:
        stop.append(1)
        t.join()
    rounds += 1
print(f"{tries} tries in {rounds} rounds")
"""


def test_a_user_owning_the_upper_cannot_make_the_daemon_chmod_another_file(
    open_tree: Path, user: tuple[int, int]
) -> None:
    """Root mounts a union whose upper and work dir a user owns (a writable view given to
    her). She chmods her file through the mount while swapping it, in the upper, with a
    symlink to a root-only file: the daemon checked the name, then chmod'ed it by path and
    followed the symlink (0600 became 0666 within 2 s). Kernel overlayfs acts on the dentry
    it holds; the daemon now chmods the object it opened, never through a symlink."""
    t = open_tree
    for d in ("l", "u", "w", "mnt"):
        (t / d).mkdir()
    os.chown(t / "u", *user)
    os.chown(t / "w", *user)
    victim = t / "victim"  # stands for /etc/shadow
    victim.write_text("root:precious\n")
    victim.chmod(0o600)
    with mounted([t / "l"], t / "mnt", upper=t / "u", work=t / "w"):
        r = _as(
            user,
            sys.executable,
            "-c",
            _CHMOD_RACE,
            str(t / "u"),
            str(t / "mnt"),
            str(victim),
            "4",
            check=False,
        )
    assert stat.S_IMODE(victim.stat().st_mode) == 0o600, r.stderr
    assert r.returncode == 0 and " tries in " in r.stdout, r.stderr


def test_a_user_owning_the_upper_cannot_have_root_chown_her_file_by_its_name(
    open_tree: Path, user: tuple[int, int]
) -> None:
    """Root mounts a union whose upper a user owns, makes a file through it, then
    `chown 0:0` and `chmod 4755` it (an install step). Between the two she renames her
    own program onto that name in the upper: the daemon changed by name whatever was
    there, so her file became a set-user-ID program of root's. Kernel overlayfs acts on
    the dentry it holds; the daemon now acts on the object it checked is the node's
    own, and the name is ENOENT for root once hers is there. Her xattr likewise."""
    t = open_tree
    for d in ("l", "u", "w", "mnt"):
        (t / d).mkdir()
    os.chown(t / "u", *user)
    os.chown(t / "w", *user)
    evil = t / "u" / "evil"
    _as(user, "sh", "-c", f"echo hers > {evil}; chmod 755 {evil}")
    with mounted([t / "l"], t / "mnt", upper=t / "u", work=t / "w") as mnt:
        (mnt / "tool").write_text("root's\n")
        os.stat(mnt / "tool")  # the kernel holds the name: no lookup again
        _as(user, "mv", str(evil), str(t / "u" / "tool"))
        _make_it_roots(mnt / "tool", t / "u" / "tool", user)


def _make_it_roots(merged: Path, in_upper: Path, user: tuple[int, int]) -> None:
    """Root's chown 0:0, chmod 4755 and xattrs through the mount at `merged`, each allowed
    to fail: her program at `in_upper` must come out of it as it was, hers."""
    for change in (
        lambda: os.chown(merged, 0, 0),
        lambda: os.chmod(merged, 0o4755),
        lambda: os.setxattr(merged, "security.capability", b"\x01" * 20),
        lambda: os.setxattr(merged, "user.root", b"1"),
    ):
        with contextlib.suppress(OSError):
            change()
    st = in_upper.lstat()
    assert in_upper.read_text() == "hers\n"
    assert st.st_uid == user[0] and not st.st_mode & stat.S_ISUID, st
    assert os.listxattr(in_upper) == []


@contextlib.contextmanager
def ext4(path: Path) -> Iterator[Path]:
    """A small ext4 with a journal, on a loop device, mounted at `path` (made 0755) for the
    block: it gives a freed inode number to the next file made (the root filesystem here
    has no journal, and such an ext4 waits a minute before it does)."""
    image = path.with_name(path.name + ".img")
    with open(image, "wb") as f:
        f.truncate(32 << 20)
    path.mkdir()
    try:
        r = subprocess.run(["mkfs.ext4", "-q", "-F", str(image)], capture_output=True, timeout=60)
        if r.returncode != 0:
            pytest.skip(f"mkfs.ext4: {r.stderr.decode(errors='replace').strip()}")
        r = subprocess.run(["mount", "-o", "loop", str(image), str(path)], capture_output=True)
        if r.returncode != 0:
            pytest.skip(f"no loop mount: {r.stderr.decode(errors='replace').strip()}")
        try:
            path.chmod(0o755)
            yield path
        finally:
            force_unmount(path)
    finally:
        if not is_mounted(path):
            image.unlink()
            path.rmdir()


def test_a_user_owning_the_upper_cannot_pass_her_file_off_with_a_reused_inode_number(
    open_tree: Path, user: tuple[int, int]
) -> None:
    """As the test above, but she deletes root's file from the upper and makes her program
    at once, which gets its inode number, before the rename onto its name: the daemon
    told the node's own object by device and inode number only, so that `chown 0:0` and
    `chmod 4755` through the mount made her program a set-user-ID one of root's. The
    object's file handle (with its generation) tells them apart."""
    with ext4(open_tree / "fs") as fs:
        for d in ("l", "u", "w", "mnt"):
            (fs / d).mkdir()
        os.chown(fs / "u", *user)
        os.chown(fs / "w", *user)
        tool, new = fs / "u" / "tool", fs / "u" / "new"
        with mounted([fs / "l"], fs / "mnt", upper=fs / "u", work=fs / "w") as mnt:
            (mnt / "tool").write_text("root's\n")
            os.chmod(mnt / "tool", 0o700)  # the kernel holds the name: no lookup again
            assert stat.S_IMODE(tool.stat().st_mode) == 0o700  # its own object: changed
            old = tool.stat().st_ino
            _as(user, "sh", "-c", f"rm {tool}; echo hers > {new}; chmod 755 {new}")
            assert new.stat().st_ino == old  # ext4 gave her the number of root's file
            _as(user, "mv", str(new), str(tool))
            _make_it_roots(mnt / "tool", tool, user)


def test_a_work_dir_a_user_made_is_not_the_daemons_scratch_dir(
    open_tree: Path, user: tuple[int, int]
) -> None:
    """Root mounts a union whose work dir a user owns. She made `WORK/work` herself before
    the mount: the daemon kept it (it only emptied it) and made its copy-ups there by name,
    where she could swap each for a symlink while root worked on it (a chmod through one
    gave a root-only file 0666). Like the kernel, the daemon now makes WORK/work afresh,
    its own and 0700, so that nothing in it is hers; what she left there is gone."""
    t = open_tree
    for d in ("l", "u", "w", "mnt"):
        (t / d).mkdir()
    os.mkfifo(t / "l" / "fifo")
    os.chmod(t / "l" / "fifo", 0o666)
    os.chown(t / "u", *user)
    os.chown(t / "w", *user)
    _as(user, "mkdir", "-m", "777", str(t / "w" / "work"))
    _as(user, "ln", "-s", "/etc/shadow", str(t / "w" / "work" / "planted"))
    with mounted([t / "l"], t / "mnt", upper=t / "u", work=t / "w") as mnt:
        st = (t / "w" / "work").stat()
        assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (0, 0o700)
        assert os.listdir(t / "w" / "work") == []
        # She can no longer make anything there, and copy-ups still work.
        r = _as(user, "ln", "-s", "x", str(t / "w" / "work" / "again"), check=False)
        assert r.returncode != 0
        _as(user, "touch", str(mnt / "fifo"))
        assert stat.S_ISFIFO((t / "u" / "fifo").lstat().st_mode)


def test_a_user_cannot_redirect_roots_umount_to_another_mount(
    open_tree: Path, user: tuple[int, int]
) -> None:
    """Root mounted a view in a user's directory. Before root's `pyunion umount`, she moves
    the directory away and puts a symlink to another mount's parent in its place: root's
    umount followed it and unmounted that filesystem (here a tmpfs standing for any), and
    left the pyunion mount. Only a pyunion mount is unmounted, and only the one found by
    the name in the parent directory held open."""
    t = open_tree
    home, other = t / "home", t / "other"
    for d in (t / "l", home / "view/mnt", other / "mnt"):
        d.mkdir(parents=True)
    os.chown(home, *user)
    os.chown(home / "view", *user)
    with tmpfs(other / "mnt"):
        (other / "mnt/data").write_text("still here\n")
        pyunion("mount", str(t / "l"), str(home / "view/mnt"))
        try:
            _as(user, "mv", str(home / "view"), str(home / "moved"))
            _as(user, "ln", "-s", str(other), str(home / "view"))
            r = pyunion("umount", str(home / "view/mnt"), check=False)
            assert r.returncode != 0 and "is not a pyunion mount" in r.stderr, r.stderr
            assert (other / "mnt/data").read_text() == "still here\n"
            r = pyunion("umount", str(other / "mnt"), check=False)
            assert r.returncode != 0 and "is not a pyunion mount" in r.stderr, r.stderr
            assert is_mounted(other / "mnt")
            pyunion("umount", str(home / "moved/mnt"))
            assert not is_mounted(home / "moved/mnt")
        finally:
            for mnt in (home / "moved/mnt", home / "view/mnt"):
                if mnt.is_dir() and not mnt.is_symlink() and is_mounted(mnt):
                    pyunion("umount", str(mnt), check=False)
                    force_unmount(mnt)


# -- mount points and volume sources named by a path a user controls ------------------------
_SWAP_RACE = r"""
import os, sys, time
from unionfs.syscalls import RENAME_EXCHANGE, renameat2
home, seconds = sys.argv[1], float(sys.argv[2])
a, b = (os.fsencode(n) for n in sys.argv[3:5]) if len(sys.argv) > 4 else (b"mnt", b"swap")
fd = os.open(home, os.O_RDONLY | os.O_DIRECTORY)
end = time.monotonic() + seconds
n = 0
while time.monotonic() < end:
    try:
        renameat2(fd, a, fd, b, RENAME_EXCHANGE)
        n += 1
    except OSError:  # EBUSY: one of them is a mount point now
        pass
print(n)
"""


def test_a_user_cannot_make_root_mount_over_another_directory(
    open_tree: Path, user: tuple[int, int]
) -> None:
    """Root mounts on a directory in a user's home. She puts a symlink to another
    directory (standing for /etc) in its place, or in place of a parent: root's
    mount followed it and covered that directory. Now a symlink that neither root
    nor the caller owns is refused, as the kernel's protected_symlinks would, and
    the mount is made on the directory resolved once (an fd), so a swap between
    the checks and the mount changes nothing. Root's own symlinks are followed."""
    t = open_tree
    home, victim = t / "home", t / "etc"
    for d in (t / "l", home, victim, t / "real"):
        d.mkdir()
    (t / "l/marker").write_text("layer\n")
    (victim / "passwd").write_text("root:x:0:0\n")
    os.chown(home, *user)
    _as(user, "ln", "-s", str(victim), str(home / "mnt"))
    _as(user, "ln", "-s", str(t), str(home / "up"))
    for mp in (home / "mnt", home / "up/etc"):
        r = pyunion("mount", str(t / "l"), str(mp), check=False)
        assert r.returncode != 0 and not is_mounted(victim), r.stderr
        assert "symlink owned by uid" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    (t / "rootlink").symlink_to(t / "real")  # root's own symlink: followed, as mount(8)
    pyunion("mount", str(t / "l"), str(t / "rootlink"))
    try:
        assert is_mounted(t / "real") and (t / "real/marker").read_text() == "layer\n"
    finally:
        pyunion("umount", str(t / "real"))
    # The race: `mnt` and `swap` (a symlink to the victim) exchanged all the time.
    os.unlink(home / "mnt")
    _as(user, "mkdir", str(home / "mnt"))
    _as(user, "ln", "-s", str(victim), str(home / "swap"))
    racer = subprocess.Popen(
        [
            "setpriv",
            f"--reuid={user[0]}",
            f"--regid={user[1]}",
            "--clear-groups",
            sys.executable,
            "-c",
            _SWAP_RACE,
            str(home),
            "4",
        ],
        cwd=str(Path(__file__).parent.parent),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    landed = 0
    try:
        for _ in range(8):
            r = pyunion("mount", str(t / "l"), str(home / "mnt"), check=False)
            if r.returncode == 0:
                assert not is_mounted(victim), "root's mount landed on the victim"
                landed += 1
                # Wherever the swapping put it: a mount point cannot move, so this holds still.
                name = "mnt" if is_mounted(home / "mnt") else "swap"
                pyunion("umount", str(home / name))
    finally:
        out, err = racer.communicate(timeout=60)
        force_unmount(victim)
        for name in ("mnt", "swap"):
            force_unmount(home / name)
    assert not is_mounted(victim) and (victim / "passwd").read_text() == "root:x:0:0\n"
    assert racer.returncode == 0 and int(out) > 0, err


def _racer(
    user: tuple[int, int], home: Path, seconds: float, a: str, b: str
) -> subprocess.Popen[str]:
    """`_SWAP_RACE` as `user`: exchanges home/a and home/b for `seconds`, prints how often."""
    uid, gid = user
    return subprocess.Popen(
        [
            *("setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups", sys.executable),
            *("-c", _SWAP_RACE, str(home), str(seconds), a, b),
        ],
        cwd=str(Path(__file__).parent.parent),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_a_user_cannot_point_roots_layers_at_another_tree(
    open_tree: Path, user: tuple[int, int], tmp_path: Path
) -> None:
    """Root mounts (or runs a container over) layers in a user's directory. A symlink she
    puts in place of the upper, a lower, the work dir or a parent of them (to a root-only
    directory standing for /etc) was followed: the container's writes landed in that
    tree, the work dir was made beside it or emptied in it, `run --upper` made its
    directories through it. Now layers are resolved as the mount point is
    (`tree.open_trusted`: refused, one line, nothing made or written there), each once
    into the fd the daemon keeps, so a swap between the checks and the use changes
    nothing. Root's own symlinks are still followed."""
    from unionfs.sample import build_sample

    t = open_tree
    home, victim, low, mnt = t / "home", t / "etc", t / "l", t / "mnt"
    for d in (home, victim, low, mnt, t / "real", t / "rootwork"):
        d.mkdir()
    victim.chmod(0o700)
    (victim / "passwd").write_text("root:x:0:0\n")
    (low / "marker").write_text("layer\n")
    os.chown(home, *user)
    _as(user, "ln", "-s", str(victim), str(home / "up"))
    _as(user, "ln", "-s", str(t), str(home / "via"))
    _as(user, "mkdir", str(home / "mine"))
    before = sorted(os.listdir(t))
    for opts in (
        f"lowerdir={low},upperdir={home / 'up'}",
        f"lowerdir={low},upperdir={home / 'via/etc'}",
        f"lowerdir={home / 'up'}:{low}",
        f"lowerdir={low},upperdir={home / 'mine'},workdir={home / 'via/etc'}",
    ):
        r = pyunion("mount", "-o", opts, str(mnt), check=False)
        if r.returncode == 0:
            pyunion("umount", str(mnt))
        assert r.returncode != 0, opts
        assert "symlink owned by uid" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    image = build_sample(tmp_path / "img")
    for upper in (home / "up", home / "via/etc/new"):
        r = subprocess.run(
            [*PYUNION, "run", "--upper", str(upper), *image, "--", "sh", "-c", "echo x >/landed"],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
            env=dict(os.environ, TMPDIR=str(tmp_path)),
        )
        assert r.returncode != 0 and "symlink owned by uid" in r.stderr, r.stderr
    assert sorted(os.listdir(victim)) == ["passwd"] and sorted(os.listdir(t)) == before
    (t / "rootlink").symlink_to(t / "real")  # root's own: followed, as mount(8)
    with mounted([low], mnt, upper=t / "rootlink", work=t / "rootwork"):
        (mnt / "new").write_text("root's\n")
    assert (t / "real/new").read_text() == "root's\n"
    # The race: the upper (hers, a directory) and `swap` (a symlink to the victim)
    # exchanged all the time while root mounts it and writes through the mount.
    os.unlink(home / "up")
    _as(user, "mkdir", str(home / "up"))
    _as(user, "ln", "-s", str(victim), str(home / "swap"))
    racer = _racer(user, home, 6, "up", "swap")
    mounts = 0
    try:
        for i in range(12):
            r = pyunion(
                "mount", "-o", f"lowerdir={low},upperdir={home / 'up'}", str(mnt), check=False
            )
            if r.returncode != 0:
                assert "symlink owned by uid" in r.stderr or "does not exist" in r.stderr, r.stderr
                continue
            mounts += 1
            try:
                (mnt / f"landed{i}").write_text("x\n")
            finally:
                pyunion("umount", str(mnt))
    finally:
        out, err = racer.communicate(timeout=60)
        force_unmount(mnt)
    assert sorted(os.listdir(victim)) == ["passwd"], "root's mount wrote into the victim"
    assert (victim / "passwd").read_text() == "root:x:0:0\n"
    assert racer.returncode == 0 and int(out) > 0, err


def test_the_upper_in_use_check_follows_no_swap(
    open_tree: Path, user: tuple[int, int], tmp_path: Path
) -> None:
    """With an overlay mount on the host, `mount` looks for the upper among their
    `upperdir=`: it named the upper by `os.path.realpath`, which follows her symlinks and,
    when she swaps one for a directory between its lstat and its readlink, raises
    EINVAL: a traceback (seen under load, when other tests had overlay mounts). The
    upper is named as it was resolved (`tree.open_trusted`): one line or a mount."""
    t = open_tree
    home, victim, low, mnt = t / "home", t / "etc", t / "l", t / "mnt"
    for d in (home, victim, low, mnt, t / "work"):
        d.mkdir()
    victim.chmod(0o700)
    os.chown(home, *user)
    _as(user, "mkdir", str(home / "up"))
    _as(user, "ln", "-s", str(victim), str(home / "swap"))
    with contextlib.ExitStack() as overlays:
        for i in range(8):  # the old check resolved the upper again for each of them
            kl, ku, kw = tmp_path / f"kl{i}", tmp_path / f"ku{i}", tmp_path / f"kw{i}"
            for d in (kl, ku):
                d.mkdir()
            overlays.enter_context(kernel_overlay([kl], tmp_path / f"kmnt{i}", ku, kw))
        racer = _racer(user, home, 5, "up", "swap")
        outcomes: dict[str, int] = {}
        try:
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline:
                opts = f"lowerdir={low},upperdir={home / 'up'},workdir={t / 'work'}"
                r = pyunion("mount", "-o", opts, str(mnt), check=False)
                if r.returncode == 0:
                    pyunion("umount", str(mnt))
                    outcomes["mounted"] = outcomes.get("mounted", 0) + 1
                    continue
                assert "Traceback" not in r.stderr, r.stderr
                assert len(r.stderr.strip().splitlines()) == 1, r.stderr
                key = "refused" if "symlink owned by uid" in r.stderr else r.stderr.strip()
                outcomes[key] = outcomes.get(key, 0) + 1
        finally:
            out, err = racer.communicate(timeout=60)
            force_unmount(mnt)
    assert racer.returncode == 0 and int(out) > 0, err
    assert set(outcomes) <= {"mounted", "refused"}, outcomes
    assert sorted(os.listdir(victim)) == []


_STEAL_TMP = r"""
import os, sys, time
home, victim, seconds = sys.argv[1], sys.argv[2], float(sys.argv[3])
end, n = time.monotonic() + seconds, 0
while time.monotonic() < end:
    for name in os.listdir(home):
        path = os.path.join(home, name)
        if name.startswith("pyunion-run-") and os.stat(path).st_uid == 0:
            try:  # root's tree moved away, hers in its place: etc -> the victim
                os.rename(path, os.path.join(home, f"stolen-{n}"))
                os.mkdir(path)
                os.symlink(victim, os.path.join(path, "etc"))
                n += 1
            except OSError:
                pass
    time.sleep(0.0005)
print(n)
"""


def test_a_user_owning_roots_run_upper_gets_no_set_user_id_program_of_roots(
    open_tree: Path, user: tuple[int, int], tmp_path: Path
) -> None:
    """Root runs a container with `--upper` in a user's directory. The container makes
    /tool, then `chown 0:0 /tool; chmod 4755 /tool` (an install step); meanwhile she
    renames her own program onto `tool` in the upper. The daemon, asked by name, made
    her file root's and set-user-ID: a root shell for her on the host, no race to win.
    Now an upper another user can change (or under a directory she can change) is one
    line before anything runs; a directory only root can change still works."""
    from unionfs.sample import build_sample

    t = open_tree
    home, sync, rootup = t / "home", t / "sync", t / "private" / "rootup"
    for d in (home, sync):
        d.mkdir()
    (t / "private").mkdir(mode=0o700)  # out of other users' reach (see the test below)
    os.chown(home, *user)
    up, evil = home / "up", home / "evil"
    _as(user, "mkdir", str(up))
    _as(user, "sh", "-c", f"echo hers > {evil}; chmod 755 {evil}")
    image = build_sample(tmp_path / "img")
    script = (
        "echo root > /tool; while [ ! -e /sync/go ]; do sleep 0.05; done; "
        "chown 0:0 /tool; chmod 4755 /tool"
    )

    def run(upper: Path) -> subprocess.Popen[str]:
        argv = [*PYUNION, "run", "--upper", str(upper), "-v", f"{sync}:/sync", *image]
        return subprocess.Popen(
            [*argv, "--", "sh", "-c", script],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=dict(os.environ, TMPDIR=str(tmp_path)),
        )

    p = run(up)
    try:
        wait_until(lambda: (up / "tool").exists() or p.poll() is not None, 30, "/tool")
        if (up / "tool").exists():
            _as(user, "mv", str(evil), str(up / "tool"))
        (sync / "go").touch()
        _, err = p.communicate(timeout=60)
    finally:
        p.kill()
        p.communicate(timeout=30)
    if (up / "tool").exists():
        st = (up / "tool").lstat()
        hers = (up / "tool").read_text() == "hers\n"
        assert not (hers and st.st_uid == 0 and st.st_mode & stat.S_ISUID), "her setuid root"
    assert p.returncode == 125 and "another user could" in err, err
    assert len(err.strip().splitlines()) == 1 and os.listdir(up) == [], err
    # Root's own upper inside her directory: she could swap it for hers.
    (home / "rootup").mkdir()
    r = subprocess.run(
        [*PYUNION, "run", "--upper", str(home / "rootup"), *image, "--", "true"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env=dict(os.environ, TMPDIR=str(tmp_path)),
    )
    assert r.returncode == 125 and f"owned by uid {user[0]}" in r.stderr, r.stderr
    (sync / "go").unlink()
    p = run(rootup)  # made (in root's 0700 directory): only root can change or reach it
    try:
        wait_until(lambda: (rootup / "tool").exists() or p.poll() is not None, 30, "/tool")
        (sync / "go").touch()
        _, err = p.communicate(timeout=60)
    finally:
        p.kill()
        p.communicate(timeout=30)
    assert p.returncode == 0, err
    assert stat.S_IMODE((rootup / "tool").stat().st_mode) == 0o4755


def test_roots_run_upper_is_out_of_other_users_reach(
    open_tree: Path, user: tuple[int, int], tmp_path: Path
) -> None:
    """Root runs an image with `--upper` in a directory only root can change but everyone
    can pass (/srv/up, ./up in a 0755 home). The image's root does `chmod 4755` on a
    program (here a copy of id(1)): in the upper, on the host, it is a set-user-ID program
    of root's that every local user could run (`euid=0(root)`), while the container runs
    and after. Podman keeps a container's upper below its 0700 storage; such an upper is
    now one line, exit 125, nothing made; below a directory only root enters it works."""
    from unionfs.sample import build_sample

    top = tmp_path / "top"
    top.mkdir()
    shutil.copy("/usr/bin/id", top / "tool")
    image = [str(top), *build_sample(tmp_path / "img")]
    t = open_tree
    (t / "private").mkdir(mode=0o700)
    for up in (t / "up", t / "private" / "up"):
        r = subprocess.run(
            [*PYUNION, "run", "--upper", str(up), *image, "--", "chmod", "4755", "/tool"],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
            env=dict(os.environ, TMPDIR=str(tmp_path)),
        )
        tool = up / "tool"
        # (through her shell: setpriv's own exec still passes root's 0700 directory)
        ran = _as(user, "sh", "-c", f"exec {tool}", check=False) if tool.exists() else None
        assert ran is None or "euid=0" not in ran.stdout, ran.stdout
        if up.parent == t:
            assert r.returncode == 125 and "reached by every user" in r.stderr, r.stderr
            assert len(r.stderr.strip().splitlines()) == 1 and not up.exists(), r.stderr
        else:
            assert r.returncode == 0 and tool.stat().st_mode & stat.S_ISUID, r.stderr


def test_roots_cert_dir_is_not_one_a_user_can_change(
    open_tree: Path, user: tuple[int, int], tmp_path: Path
) -> None:
    """`pull --cert-dir DIR` says whom root trusts for a registry. In a user's directory
    she chose it: her CA (her registry in the real one's place), her FIFO named ca.crt
    (root's pull hung in open(2) for good), or, under a directory of hers, root's own
    directory renamed away and hers put in its place; a file of hers in root's directory
    she can rewrite. Now each is one line before any connection; a FIFO of root's is
    refused too (not a regular file)."""
    t = open_tree
    home, rootdir = t / "home", t / "rootcerts"
    for d in (home, rootdir):
        d.mkdir()
    os.chown(home, *user)
    _as(user, "mkdir", str(home / "certs"))
    _as(user, "mkfifo", str(home / "certs" / "ca.crt"))
    (home / "rootcerts").mkdir()
    (rootdir / "ca.crt").write_text("hers\n")
    os.chown(rootdir / "ca.crt", *user)
    (t / "fifo").mkdir()
    os.mkfifo(t / "fifo" / "ca.crt")
    for d, why in (
        (home / "certs", f"crosses {home}, owned by uid {user[0]}"),
        (home / "rootcerts", f"crosses {home}, owned by uid {user[0]}"),
        (rootdir, f"ca.crt is owned by uid {user[0]}"),
        (t / "fifo", "not a regular file"),
    ):
        store = str(tmp_path / "store")
        r = subprocess.run(
            [*PYUNION, "pull", "--cert-dir", str(d), "--store", store, "127.0.0.1:1/x:latest"],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        assert r.returncode != 0 and why in r.stderr, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr


# A FUSE filesystem mounted as if by user UID (libfuse writes user_id=getuid(): her
# mount, which root reaches where /etc/fuse.conf has user_allow_other), whose daemon says
# that root owns its one symlink `link` (to TARGET) and its root directory.
_HER_FUSE = """
import os, stat, sys
import pyfuse3, trio

mnt, uid, target = sys.argv[1], int(sys.argv[2]), os.fsencode(sys.argv[3])
LINK = pyfuse3.ROOT_INODE + 1


class Ops(pyfuse3.Operations):
    def _attr(self, inode):
        a = pyfuse3.EntryAttributes()
        a.st_ino = inode
        if inode == LINK:
            a.st_mode, a.st_size = stat.S_IFLNK | 0o777, len(target)
        else:
            a.st_mode, a.st_nlink = stat.S_IFDIR | 0o755, 2
        a.st_uid = a.st_gid = 0
        return a

    async def getattr(self, inode, ctx=None):
        if inode not in (pyfuse3.ROOT_INODE, LINK):
            raise pyfuse3.FUSEError(2)
        return self._attr(inode)

    async def lookup(self, parent, name, ctx=None):
        if parent == pyfuse3.ROOT_INODE and name == b"link":
            return self._attr(LINK)
        raise pyfuse3.FUSEError(2)

    async def readlink(self, inode, ctx):
        return target


os.setresuid(uid, 0, 0)  # mount(2) as root; her uid is the mount's user_id
pyfuse3.init(Ops(), mnt, ["fsname=hers", "allow_other"])
os.setresuid(uid, uid, uid)
print("mounted", flush=True)
try:
    trio.run(pyfuse3.main)
finally:
    pyfuse3.close(unmount=False)
"""


def test_a_users_fuse_mount_cannot_pass_her_symlink_off_as_roots(
    open_tree: Path, user: tuple[int, int], tmp_path: Path
) -> None:
    """A user's FUSE mount (reachable by root with user_allow_other) says what it likes
    about owners: her `link` to a root-only file, said to be root's, was followed as
    root's own, and root's `run --env-file` put that file into the container. What a FUSE
    mount of another user holds is now hers, whatever it says: one line."""
    from unionfs.sample import build_sample

    t = open_tree
    secret, mnt = t / "secret", t / "mnt"
    for d in (secret, mnt):
        d.mkdir()
    secret.chmod(0o700)
    (secret / "env").write_text("SECRET=root-only\n")
    image = build_sample(tmp_path / "img")
    server = subprocess.Popen(
        [sys.executable, "-c", _HER_FUSE, str(mnt), str(user[0]), str(secret / "env")],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert server.stdout is not None and server.stdout.readline() == "mounted\n"
        assert os.lstat(mnt / "link").st_uid == 0  # what she says
        argv = [*PYUNION, "run", "--env-file", str(mnt / "link"), *image]
        r = subprocess.run(
            [*argv, "--", "sh", "-c", "echo $SECRET"],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
            env=dict(os.environ, TMPDIR=str(tmp_path)),
        )
    finally:
        force_unmount(mnt)
        server.kill()
        server.communicate(timeout=30)
    assert "root-only" not in r.stdout
    assert r.returncode == 125 and f"uid {user[0]} (whose FUSE mount" in r.stderr, r.stderr


# Her FUSE mount as `_HER_FUSE`, which detaches itself (`fusermount3 -u -z`, as she may)
# while it answers the second lookup of `link` (the first is openat2's, which stops at any
# symlink): the symlink then stands on a mount that /proc/self/mountinfo no longer lists.
_HER_VANISHING_FUSE = _HER_FUSE.replace(
    """    async def lookup(self, parent, name, ctx=None):
        if parent == pyfuse3.ROOT_INODE and name == b"link":
            return self._attr(LINK)""",
    """    lookups = 0

    async def lookup(self, parent, name, ctx=None):
        if parent == pyfuse3.ROOT_INODE and name == b"link":
            Ops.lookups += 1
            if Ops.lookups == 2:
                import subprocess
                await trio.to_thread.run_sync(
                    lambda: subprocess.run(["fusermount3", "-u", "-z", mnt], check=True)
                )
            a = self._attr(LINK)
            a.entry_timeout = a.attr_timeout = 0
            return a""",
)
assert _HER_VANISHING_FUSE != _HER_FUSE


def test_a_users_fuse_mount_detached_while_root_walks_it_is_still_hers(
    open_tree: Path, user: tuple[int, int]
) -> None:
    """Her daemon answers root's lookup of her `link` only after detaching her mount
    (`fusermount3 -u -z`): root's walk holds the mount by its fds, but mountinfo no
    longer lists it, and its mounter was read as "no FUSE mount": her symlink, said to
    be root's, was followed as root's, and `read_named` (`run --env-file`) read the
    root-only file it names. A FUSE filesystem whose mounter cannot be read is now no
    trusted user's: one error."""
    from unionfs.tree import UntrustedSymlink, read_named

    t = open_tree
    secret, mnt = t / "secret", t / "mnt"
    for d in (secret, mnt):
        d.mkdir()
    secret.chmod(0o700)
    (secret / "env").write_text("SECRET=root-only\n")
    server = subprocess.Popen(
        [sys.executable, "-c", _HER_VANISHING_FUSE, str(mnt), str(user[0]), str(secret / "env")],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert server.stdout is not None and server.stdout.readline() == "mounted\n"
        got = b""
        with pytest.raises(UntrustedSymlink) as e:
            got = read_named(str(mnt / "link"), 100)
        assert got == b"" and "FUSE" in str(e.value.strerror), e.value
        assert not is_mounted(mnt)  # she did detach it, while root walked it
    finally:
        force_unmount(mnt)
        server.kill()
        server.communicate(timeout=30)


def test_roots_temporary_tree_is_not_kept_where_a_user_can_move_it(
    open_tree: Path, user: tuple[int, int], tmp_path: Path
) -> None:
    """`pyunion run` keeps its temporary tree (upper, work, the /etc files it binds) in
    $TMPDIR by name; root with a user's TMPDIR (`su` keeps it) made it in her directory,
    where she renamed it away and put hers in its place: root then wrote its hosts file
    through her symlink into a root-only directory (and could have run the container on
    her upper). Now a TMPDIR another user can change (hers, or shared without the sticky
    bit) is one line; /tmp's kind (sticky) is fine."""
    from unionfs.sample import build_sample

    t = open_tree
    home, victim, shared, sticky = t / "home", t / "victim", t / "shared", t / "sticky"
    for d in (home, victim, shared, sticky):
        d.mkdir()
    victim.chmod(0o700)
    shared.chmod(0o777)
    sticky.chmod(0o1777)
    (victim / "hosts").write_text("root's\n")
    os.chown(home, *user)
    image = build_sample(tmp_path / "img")
    she = ["setpriv", f"--reuid={user[0]}", f"--regid={user[1]}", "--clear-groups"]
    racer = subprocess.Popen(
        [*she, sys.executable, "-c", _STEAL_TMP, str(home), str(victim), "20"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        for tmpdir, why in ((home, f"owned by uid {user[0]}"), (shared, "which others can write")):
            for _ in range(3):
                r = subprocess.run(
                    [*PYUNION, "run", *image, "--", "true"],
                    capture_output=True,
                    text=True,
                    timeout=60,
                    check=False,
                    env=dict(os.environ, TMPDIR=str(tmpdir)),
                )
                assert r.returncode == 125 and why in r.stderr, r.stderr
                assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    finally:
        racer.kill()
        racer.communicate(timeout=30)
    assert (victim / "hosts").read_text() == "root's\n" and os.listdir(victim) == ["hosts"]
    assert os.listdir(home) == [] and os.listdir(shared) == []
    r = subprocess.run(
        [*PYUNION, "run", *image, "--", "echo", "ok"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env=dict(os.environ, TMPDIR=str(sticky)),
    )
    assert r.returncode == 0 and r.stdout == "ok\n", r.stderr
    assert os.listdir(sticky) == []


def test_a_users_fifo_or_symlink_as_the_log_neither_hangs_nor_redirects_root(
    open_tree: Path, user: tuple[int, int], tmp_path: Path
) -> None:
    """Root sets PYUNION_LOG=/tmp/pyunion.log, and a user was there first: her FIFO hung
    the daemon in open(2), and root's `pyunion mount` (or `run`) waiting for it, for
    good; her symlink had the daemon append its log to a root-only file. Now either is
    one line before anything is mounted; a new log file still works."""
    from unionfs.sample import build_sample

    low, mnt, victim, t = (
        open_tree / "l",
        open_tree / "mnt",
        open_tree / "victim",
        open_tree / "tmp",
    )
    for d in (low, mnt, victim, t):
        d.mkdir()
    victim.chmod(0o700)
    t.chmod(0o1777)  # as /tmp
    (victim / "shadow").write_text("root's\n")
    _as(user, "mkfifo", str(t / "fifo.log"))
    _as(user, "ln", "-s", str(victim / "shadow"), str(t / "link.log"))
    image = build_sample(tmp_path / "img")
    try:
        for log, why in (("fifo.log", "FIFO"), ("link.log", "symlink owned by uid")):
            env = dict(os.environ, PYUNION_LOG=str(t / log), TMPDIR=str(tmp_path))
            for cmd in (["mount", str(low), str(mnt)], ["run", *image, "--", "true"]):
                try:
                    r = pyunion(*cmd, check=False, env=env, timeout=20)
                except subprocess.TimeoutExpired:
                    pytest.fail(f"pyunion {cmd[0]} hung on PYUNION_LOG={log}")
                assert r.returncode != 0 and why in r.stderr, r.stderr
                assert len(r.stderr.strip().splitlines()) == 1 and not is_mounted(mnt)
    finally:  # an open(2) still waiting for a reader (the old way) is let go
        with contextlib.suppress(OSError):
            os.close(os.open(t / "fifo.log", os.O_RDONLY | os.O_NONBLOCK))
    assert (victim / "shadow").read_text() == "root's\n"
    env = dict(os.environ, PYUNION_LOG=str(t / "new.log"))
    pyunion("mount", str(low), str(mnt), env=env)
    pyunion("umount", str(mnt))
    st = os.stat(t / "new.log")
    assert stat.S_ISREG(st.st_mode) and st.st_uid == 0 and stat.S_IMODE(st.st_mode) == 0o644


def test_a_users_file_or_hard_link_as_the_log_gets_no_line_of_roots(
    open_tree: Path, user: tuple[int, int]
) -> None:
    """PYUNION_LOG=/tmp/pyunion.log where a user was first with a plain file: the open
    creates nothing, so the kernel's protected_regular never applied, and root's daemon
    appended its log to her file; her hard link there to a root-only file (which
    protected_hardlinks=0 lets her make; root makes it here) had the log appended to
    that file. Both are refused now, before anything is written; root's own log is fine."""
    from unionfs.mount import open_log

    t, victim = open_tree / "tmp", open_tree / "victim"
    t.mkdir()
    t.chmod(0o1777)  # as /tmp
    victim.mkdir(mode=0o700)
    (victim / "shadow").write_text("root's\n")
    _as(user, "touch", str(t / "hers.log"))
    os.link(victim / "shadow", t / "link.log")
    for log, why in (("hers.log", f"belongs to uid {user[0]}"), ("link.log", "hard links")):
        with pytest.raises(OSError) as e:
            os.close(open_log(str(t / log)))
        assert why in str(e.value.strerror)
    assert (victim / "shadow").read_text() == "root's\n"
    assert (t / "hers.log").read_text() == ""
    os.close(open_log(str(t / "root.log")))
    os.close(open_log(str(t / "root.log")))  # made by the first, opened by the second


def test_a_users_env_file_reads_no_root_file_and_never_hangs(
    open_tree: Path, user: tuple[int, int], tmp_path: Path
) -> None:
    """`pyunion run --env-file /home/u/app.env` as root: her symlink there to a root-only
    K=V file (standing for an app's secrets) put its lines into the container's
    environment, which her code in the container reads; her FIFO there hung the run for
    good. Now the file is reached through no symlink of hers and must be a regular file
    or a pipe of root's (`--env-file <(...)` still works); else one line."""
    from unionfs.sample import build_sample

    home, victim = open_tree / "home", open_tree / "victim"
    for d in (home, victim):
        d.mkdir()
    victim.chmod(0o700)
    (victim / "secret.env").write_text("DB_PASSWORD=SECRET\n")
    os.chown(home, *user)
    _as(user, "ln", "-s", str(victim / "secret.env"), str(home / "app.env"))
    _as(user, "mkfifo", str(home / "fifo.env"))
    image = build_sample(tmp_path / "img")
    env = dict(os.environ, TMPDIR=str(tmp_path))
    for name, why in (("app.env", "symlink owned by uid"), ("fifo.env", "device of this user's")):
        try:
            r = pyunion(
                "run", "--env-file", str(home / name), *image, "--", "env",
                check=False, env=env, timeout=20,
            )  # fmt: skip
        except subprocess.TimeoutExpired:
            pytest.fail(f"pyunion run hung on --env-file {name}")
        finally:  # an open(2) still waiting for a writer (the old way) is let go
            with contextlib.suppress(OSError):
                os.close(os.open(home / "fifo.env", os.O_WRONLY | os.O_NONBLOCK))
        assert r.returncode == 125 and why in r.stderr and "SECRET" not in r.stdout, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    rfd, wfd = os.pipe()
    os.write(wfd, b"FROM_PIPE=yes\n")
    os.close(wfd)
    try:
        r = pyunion(
            "run", "--env-file", f"/dev/fd/{rfd}", *image, "--", "env",
            env=env, pass_fds=(rfd,),
        )  # fmt: skip
    finally:
        os.close(rfd)
    assert "FROM_PIPE=yes" in r.stdout.splitlines(), r.stdout


def test_a_users_symlink_or_fifo_as_the_iidfile_writes_no_root_file(
    open_tree: Path, user: tuple[int, int], tmp_path: Path
) -> None:
    """`pyunion build --iidfile /home/u/proj/iid /home/u/proj` as root: her symlink
    there to a root-only file had root truncate it and write the image ID into it (a
    plain open(2)); her FIFO hung the build for good. The ID file follows the log's
    rule now (`tree.open_named_output`): one line, the root file as it was; a new file,
    and root's own one written again, still take the ID."""
    home, victim = open_tree / "home", open_tree / "victim"
    for d in (home, victim):
        d.mkdir()
    victim.chmod(0o700)
    (victim / "shadow").write_text("root's\n")
    os.chown(home, *user)
    _as(user, "sh", "-c", f"printf 'FROM scratch\\nLABEL a=b\\n' > {home}/Containerfile")
    _as(user, "ln", "-s", str(victim / "shadow"), str(home / "link.iid"))
    _as(user, "mkfifo", str(home / "fifo.iid"))
    store = str(tmp_path / "store")
    env = dict(os.environ, TMPDIR=str(tmp_path))
    for name, why in (("link.iid", "symlink owned by uid"), ("fifo.iid", "FIFO")):
        try:
            r = pyunion(
                "build", "--store", store, "--iidfile", str(home / name), str(home),
                check=False, env=env, timeout=60,
            )  # fmt: skip
        except subprocess.TimeoutExpired:
            pytest.fail(f"pyunion build hung on --iidfile {name}")
        finally:  # an open(2) still waiting for a reader (the old way) is let go
            with contextlib.suppress(OSError):
                os.close(os.open(home / "fifo.iid", os.O_RDONLY | os.O_NONBLOCK))
        assert r.returncode == 125 and why in r.stderr, r.stderr
        assert r.stderr.strip().splitlines()[-1].startswith("pyunion: --iidfile"), r.stderr
    assert (victim / "shadow").read_text() == "root's\n"
    for _ in range(2):  # made, then written again (shorter or not: truncated)
        r = pyunion("build", "--store", store, "--iidfile", str(home / "new.iid"), str(home))
        last = r.stdout.strip().splitlines()[-1]  # the bare ID, as buildah prints it
        assert (home / "new.iid").read_text() == "sha256:" + last


def test_a_users_symlink_to_a_laxer_seccomp_profile_is_refused(
    open_tree: Path, user: tuple[int, int], tmp_path: Path
) -> None:
    """`--security-opt seccomp=/home/u/proj/profile.json` as root: her symlink there to
    another profile of root's (a laxer one, here one that allows all) confined her code in
    the container by that one. A profile is now reached through no symlink of hers."""
    import json

    from unionfs.sample import build_sample

    home, root_dir = open_tree / "home", open_tree / "profiles"
    for d in (home, root_dir):
        d.mkdir()
    (root_dir / "lax.json").write_text(json.dumps({"defaultAction": "SCMP_ACT_ALLOW"}))
    os.chown(home, *user)
    _as(user, "ln", "-s", str(root_dir / "lax.json"), str(home / "profile.json"))
    image = build_sample(tmp_path / "img")
    r = pyunion(
        "run", "--security-opt", f"seccomp={home / 'profile.json'}", *image, "--", "true",
        check=False, env=dict(os.environ, TMPDIR=str(tmp_path)),
    )  # fmt: skip
    assert r.returncode == 125 and "symlink owned by uid" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_a_user_cannot_swap_a_volume_source_for_a_symlink(
    open_tree: Path, user: tuple[int, int], tmp_path: Path
) -> None:
    """`pyunion run -v /home/u/data:/data`: a symlink she put there (to a root-only
    directory) is refused, not bound into the container."""
    from unionfs.sample import build_sample

    t = open_tree
    home, victim = t / "home", t / "secret"
    home.mkdir()
    victim.mkdir(mode=0o700)
    (victim / "shadow").write_text("root:precious\n")
    os.chown(home, *user)
    _as(user, "ln", "-s", str(victim), str(home / "data"))
    image = build_sample(tmp_path / "img")
    r = subprocess.run(
        [*PYUNION, "run", "-v", f"{home / 'data'}:/data", *image, "--", "cat", "/data/shadow"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env=dict(os.environ, TMPDIR=str(tmp_path)),
    )
    assert r.returncode != 0 and "precious" not in r.stdout, r.stdout
    assert "symlink owned by uid" in r.stderr and len(r.stderr.strip().splitlines()) == 1


# -- special files swapped into a layer a user owns --------------------------------------------
_TRY_OPEN = r"""
import errno, os, sys
path, how = sys.argv[1], sys.argv[2]
try:
    if how == "truncate":
        os.truncate(path, 0)
    else:
        os.close(os.open(path, {"r": os.O_RDONLY, "w": os.O_WRONLY, "rw": os.O_RDWR}[how]))
    print(0)
except OSError as e:
    print(e.errno)
"""


def _errno_in_child(path: Path, how: str) -> int | str:
    """errno of opening `path` (mode `how`) in a child; "hang" if it does not answer in 5 s."""
    p = subprocess.Popen(
        [sys.executable, "-c", _TRY_OPEN, str(path), how], stdout=subprocess.PIPE, text=True
    )
    try:
        out, _ = p.communicate(timeout=5)
    except subprocess.TimeoutExpired:
        p.kill()  # a FUSE request is killable
        p.communicate(timeout=30)
        return "hang"
    return int(out)


def test_a_fifo_swapped_into_a_users_layer_does_not_stall_the_daemon(
    open_tree: Path, user: tuple[int, int]
) -> None:
    """Root mounts layers a user owns. Once a file was looked up, she replaces it in the
    upper (or a lower) by a FIFO: the daemon opened it as the file it had looked up, and
    the open waited for a writer forever, every request of the mount with it. Now the
    daemon's open never blocks and refuses what is no longer a regular file with ESTALE
    (as kernel overlayfs for a layer changed under it): the kernel looks the name up
    again and the caller meets the FIFO as a FIFO (its open waits for a peer, in the
    caller), while the mount keeps serving everyone else."""
    t = open_tree
    for d in ("l", "u", "w", "mnt"):
        (t / d).mkdir()
        os.chown(t / d, *user)
    cases = {"low-r": "r", "low-w": "w", "up-r": "r", "up-t": "truncate"}
    for name in cases:
        (t / ("l" if name.startswith("low") else "u") / name).write_text("data\n")
    with mounted([t / "l"], t / "mnt", upper=t / "u", work=t / "w") as m:
        for name in cases:
            os.stat(m / name)  # looked up: the kernel holds the regular file's node
        for name in cases:
            layer = t / ("l" if name.startswith("low") else "u")
            _as(user, "rm", str(layer / name))
            _as(user, "mkfifo", str(layer / name))
        for name, how in cases.items():
            got = _errno_in_child(m / name, how)
            # ESTALE, or (looked up again) the caller waits on the FIFO as on overlayfs;
            # a truncate of the node's own object, gone from its name: ENOENT (EINVAL if
            # the node's inode number was taken for hers: `Union.setattr`).
            want = {errno.ESTALE, errno.EINVAL if how == "truncate" else "hang"}
            if how == "truncate":
                want.add(errno.ENOENT)
            assert got in want, (name, got)
            assert _errno_in_child(m / "up-new", "r") == errno.ENOENT, "the daemon stalled"
        (m / "new").write_text("still serving\n")
        assert (m / "new").read_text() == "still serving\n"
        assert sorted(os.listdir(m)) == sorted([*cases, "new"])
    assert stat.S_ISFIFO(os.lstat(t / "l/low-w").st_mode)  # nothing copied from it


# -- a deep tree does not exhaust the daemon's fds -------------------------------------------
def _fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def test_a_deep_lower_tree_copied_up_does_not_exhaust_the_daemons_fds(tmp_path: Path) -> None:
    """An image ships a tree 2000 levels deep, and the container creates a file at its
    bottom: one request copies all 2000 levels up. The daemon (fd limit 1024 here, the
    usual default) kept every level's upper and lower fd during that request (EMFILE,
    where kernel overlayfs just works), and the lower fds the copy-ups moved within
    each node's chain were never closed again: each retry left more open, until the
    mount could not open 5 files at once. Now a deep copy-up lets each level's fds go
    once the next is made, and the daemon stays within its budget."""
    from unionfs.mount import daemon_pid
    from unionfs.tree import rmtree

    depth = 2000
    for d in ("l", "u", "w"):
        (tmp_path / d).mkdir()
    fd = os.open(tmp_path / "l", os.O_RDONLY | os.O_DIRECTORY)
    for _ in range(depth):
        os.mkdir("d", dir_fd=fd)
        nfd = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
        os.close(fd)
        fd = nfd
    os.close(os.open("leaf", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd))
    os.close(fd)

    def bottom(top: Path) -> int:
        fd = os.open(top, os.O_RDONLY | os.O_DIRECTORY)
        for _ in range(depth):
            nfd = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = nfd
        return fd

    m = tmp_path / "mnt"
    m.mkdir()
    opts = f"lowerdir={tmp_path / 'l'},upperdir={tmp_path / 'u'},workdir={tmp_path / 'w'}"
    with contextlib.ExitStack() as cleanup:
        # pytest's own clean-up recurses: the deep trees are removed here, through fds.
        cleanup.callback(rmtree, str(tmp_path / "l"))
        cleanup.callback(rmtree, str(tmp_path / "u"))
        cleanup.callback(force_unmount, m)
        cleanup.callback(pyunion, "umount", str(m), check=False)
        # The daemon's fd limit: the usual default (it raises its soft limit to the hard).
        r = subprocess.run(
            ["prlimit", "--nofile=1024:1024", *PYUNION, "mount", "-o", opts, str(m)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert r.returncode == 0, r.stderr
        pid = daemon_pid(str(m))
        assert pid is not None
        fd = bottom(m)
        try:
            for name in ("new", "leaf"):  # a new file, then the lower one written
                wfd = os.open(name, os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd)
                os.write(wfd, b"deep\n")
                os.close(wfd)
            assert sorted(os.listdir(fd)) == ["leaf", "new"]
        finally:
            os.close(fd)
        assert _fd_count(pid) < 512 + 64
        files = [os.open(m / f"f{i}", os.O_RDWR | os.O_CREAT, 0o644) for i in range(64)]
        for f in files:
            os.close(f)
        fd = bottom(tmp_path / "u")
        try:
            rfd = os.open("leaf", os.O_RDONLY, dir_fd=fd)
            assert os.read(rfd, 100) == b"deep\n"
            os.close(rfd)
        finally:
            os.close(fd)


def test_a_deep_tree_does_not_exhaust_the_daemons_fds(tmp_path: Path) -> None:
    """A container builds a tree 6000 levels deep and keeps its deepest directory open, so
    the kernel holds every level. The daemon kept one fd per level (EMFILE at about
    20000, for every request of the mount): now it keeps at most `DIR_FDS` between
    requests, opens the others again by name, and every operation keeps working."""
    from unionfs.mount import daemon_pid
    from unionfs.resolve import DIR_FDS
    from unionfs.tree import rmtree

    depth = DIR_FDS + 2000
    for d in ("l", "u", "w"):
        (tmp_path / d).mkdir()
    (tmp_path / "l/lower-file").write_text("lower\n")
    # pytest's own clean-up recurses: the deep upper is removed here, through fds.
    cleanup = contextlib.ExitStack()
    cleanup.callback(rmtree, str(tmp_path / "u"))
    with (
        cleanup,
        mounted([tmp_path / "l"], tmp_path / "mnt", upper=tmp_path / "u", work=tmp_path / "w") as m,
    ):
        pid = daemon_pid(str(m))
        assert pid is not None
        before = _fd_count(pid)
        fd = os.open(m, os.O_RDONLY | os.O_DIRECTORY)
        try:
            for _ in range(depth):
                os.mkdir("d", dir_fd=fd)
                nfd = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
                os.close(fd)
                fd = nfd
            assert _fd_count(pid) < before + DIR_FDS + 64, "one fd per level"
            # Work at the bottom, which needs the levels the daemon let go of.
            wfd = os.open("f", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644, dir_fd=fd)
            os.write(wfd, b"deep\n")
            os.close(wfd)
            os.rename("f", "g", src_dir_fd=fd, dst_dir_fd=fd)
            rfd = os.open("g", os.O_RDONLY, dir_fd=fd)
            assert os.read(rfd, 100) == b"deep\n"
            os.close(rfd)
            assert os.listdir(fd) == ["g"]
            # ...and at the top, for anyone else.
            assert (m / "lower-file").read_text() == "lower\n"
            (m / "top").write_text("top\n")
            assert sorted(os.listdir(m)) == ["d", "lower-file", "top"]
            assert _fd_count(pid) < before + DIR_FDS + 64
        finally:
            os.close(fd)
