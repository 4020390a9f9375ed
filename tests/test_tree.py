"""tree.rmtree_at / walk_at: deep trees, symlinks, read-only dirs; no recursion, no escape."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest

from unionfs.tree import rmtree, rmtree_at, walk_at


def _deep(root: str, depth: int) -> None:
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    for i in range(depth):
        os.mkdir("d", dir_fd=fd)
        with open(os.open("f", os.O_CREAT | os.O_WRONLY, 0o644, dir_fd=fd), "w") as f:
            f.write(str(i))
        nfd = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
        os.close(fd)
        fd = nfd
    os.close(fd)


def test_rmtree_deeper_than_recursion_and_fd_limits(tmp_path) -> None:  # type: ignore[no-untyped-def]
    top = tmp_path / "top"
    top.mkdir()
    _deep(str(top), 3000)
    assert len(list(walk_at(os.open(str(top), os.O_RDONLY | os.O_DIRECTORY)))) == 6000
    rmtree(str(top))
    assert not top.exists()


def test_rmtree_never_follows_symlinks(tmp_path) -> None:  # type: ignore[no-untyped-def]
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "precious").write_text("x")
    top = tmp_path / "top"
    (top / "a").mkdir(parents=True)
    (top / "a" / "link").symlink_to(outside)
    (top / "link").symlink_to(outside / "precious")
    fd = os.open(str(tmp_path), os.O_RDONLY | os.O_DIRECTORY)
    try:
        rmtree_at(fd, "top")
    finally:
        os.close(fd)
    assert not top.exists() and (outside / "precious").read_text() == "x"


def test_rmtree_of_a_symlink_removes_only_the_link(tmp_path) -> None:  # type: ignore[no-untyped-def]
    outside = tmp_path / "outside"
    (outside / "sub").mkdir(parents=True)
    (tmp_path / "top").symlink_to(outside)
    rmtree(str(tmp_path / "top"))
    assert not os.path.lexists(tmp_path / "top") and (outside / "sub").is_dir()


def test_rmtree_read_only_dirs(tmp_path) -> None:  # type: ignore[no-untyped-def]
    top = tmp_path / "top"
    (top / "a" / "b").mkdir(parents=True)
    (top / "a" / "b" / "f").write_text("x")
    os.chmod(top / "a" / "b", 0o555)
    os.chmod(top / "a", 0o555)
    rmtree(str(top))
    assert not top.exists()


def test_rmtree_missing(tmp_path) -> None:  # type: ignore[no-untyped-def]
    rmtree(str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError):
        rmtree(str(tmp_path / "nope"), missing_ok=False)


REPO = Path(__file__).resolve().parent.parent


# -- open_trusted: the path root acts on ------------------------------------------------------
_IN_USERNS = """
import os, sys
sys.path.insert(0, sys.argv[2])
from unionfs.tree import open_trusted
fd = open_trusted(sys.argv[1], os.O_PATH)
print(os.readlink(f"/proc/self/fd/{fd}"))
"""


# As root: a user namespace mapping 0..65535 onto 100000.. (as LXC or --userns=auto do).
_MAPPED_USERNS = """
import os, sys
r, w = os.pipe()
pid = os.fork()
if pid == 0:
    os.close(w)
    sys.path.insert(0, sys.argv[2])
    from unionfs import syscalls
    syscalls.unshare(syscalls.CLONE_NEWUSER)
    os.read(r, 1)  # the maps are written
    os.setresgid(0, 0, 0); os.setresuid(0, 0, 0)
    os.execv("/usr/bin/python3", ["python3", "-c", '''
import os, sys
sys.path.insert(0, sys.argv[2])
from unionfs.tree import open_trusted
fd = open_trusted(sys.argv[1], os.O_PATH)
print(os.readlink(f"/proc/self/fd/{fd}"))
''', sys.argv[1], sys.argv[2]])
os.close(r)
import time
for _ in range(500):  # until the child has unshared
    if os.readlink(f"/proc/{pid}/ns/user") != os.readlink("/proc/self/ns/user"):
        break
    time.sleep(0.01)
with open(f"/proc/{pid}/uid_map", "w") as f:
    f.write("0 100000 65536")
with open(f"/proc/{pid}/setgroups", "w") as f:
    f.write("deny")
with open(f"/proc/{pid}/gid_map", "w") as f:
    f.write("0 100000 65536")
os.write(w, b"x")
_, status = os.waitpid(pid, 0)
sys.exit(os.waitstatus_to_exitcode(status))
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root (chown of a symlink)")
def test_open_trusted_follows_only_roots_and_the_callers_symlinks(tmp_path: Path) -> None:
    """Root's and the caller's symlinks are followed (as mount(8) follows /var/run), another
    user's is EACCES wherever it is on the path, unless she cannot reach it (below a 0700
    directory of root's: containers/storage's `mapped/` of an ID-mapped container); a file
    is opened as well as a directory. In a user namespace the host's root and users are
    unmapped (the overflow ID) and their symlinks are followed: there the caller has no
    right they could borrow; a mapped user's are not."""
    from unionfs.tree import UntrustedSymlink, open_trusted

    reachable = Path(tempfile.mkdtemp(prefix="pyunion-trusted-"))
    try:
        os.chmod(reachable, 0o755)
        for top in (tmp_path, reachable):  # pytest's base temp is root's 0700
            (top / "real").mkdir()
            (top / "real/file").write_text("x")
            (top / "mine").symlink_to(top / "real")
            (top / "theirs").symlink_to(top / "real")
            os.chown(top / "theirs", 65534, 65534, follow_symlinks=False)
        for path, want in (
            ("mine", "real"),
            ("mine/file", "real/file"),
            ("real/../mine/./file", "real/file"),
            ("theirs/file", "real/file"),
        ):
            fd = open_trusted(str(tmp_path / path), os.O_PATH)
            try:
                assert os.readlink(f"/proc/self/fd/{fd}") == str(tmp_path / want)
            finally:
                os.close(fd)
        for path in ("theirs", "theirs/file", "real/../theirs"):
            with pytest.raises(UntrustedSymlink) as e:
                open_trusted(str(reachable / path))
            assert e.value.errno == errno.EACCES
        # Out of reach, then back up by `..` into the reachable directory: refused there.
        (tmp_path / "up").symlink_to(reachable)
        with pytest.raises(UntrustedSymlink):
            open_trusted(str(tmp_path / "up/theirs"))
        os.chmod(reachable, 0o700)  # now root's 0700 directory: out of her reach
        os.close(open_trusted(str(reachable / "theirs")))
    finally:
        rmtree(str(reachable))
    with pytest.raises(NotADirectoryError):
        open_trusted(str(tmp_path / "real/file"))  # O_DIRECTORY by default
    # A user's namespace: root's /lib -> usr/lib (merged /usr) is unmapped there.
    r = subprocess.run(
        [
            *("setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--inh-caps=-all"),
            *("env", "unshare", "-Ur", "/usr/bin/python3", "-c", _IN_USERNS, "/lib"),
            str(Path(__file__).parent.parent),
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
        cwd="/",
    )
    assert r.returncode == 0 and r.stdout.strip() == os.path.realpath("/lib"), r.stderr
    # A namespace that maps many IDs has users of its own: its root does not follow the
    # symlink of its uid 1000 (host 101000); root's (unmapped there) it does. In a
    # directory the namespace's root can reach (pytest's base temp is 0700).
    base = Path(tempfile.mkdtemp(prefix="pyunion-trusted-"))
    try:
        os.chmod(base, 0o755)
        (base / "real").mkdir()
        (base / "mine").symlink_to(base / "real")
        (base / "theirs").symlink_to(base / "real")
        os.chown(base / "theirs", 101000, 101000, follow_symlinks=False)
        for name, ok in (("theirs", False), ("mine", True)):
            r = subprocess.run(
                [sys.executable, "-c", _MAPPED_USERNS, str(base / name), str(REPO)],
                capture_output=True,
                text=True,
                timeout=30,
                check=False,
                cwd="/",
            )
            if ok:
                assert r.returncode == 0 and r.stdout.strip() == str(base / "real"), r.stderr
            else:
                assert r.returncode != 0 and "UntrustedSymlink" in r.stderr, (r.stdout, r.stderr)
    finally:
        rmtree(str(base))


# A user swaps her own symlink (to /etc) with root's (to a directory of hers) in a loop.
_SWAPPER = """
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
d = os.open(sys.argv[1], os.O_PATH | os.O_DIRECTORY)
os.write(1, b"go\\n")
while True:
    libc.renameat2(d, b"mnt", d, b"evil", 2)  # RENAME_EXCHANGE
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root and the test user")
def test_open_trusted_is_not_raced_by_a_symlink_exchange() -> None:
    """The owner checked is the owner of the link whose target is read: with the target
    read by name again, an exchange in between sent root to /etc (1 in 12 tries)."""
    import pwd

    from unionfs.tree import UntrustedSymlink, open_trusted

    user = pwd.getpwnam("pyunion-user")
    base = Path(tempfile.mkdtemp(prefix="pyunion-race-"))
    proc = None
    try:
        os.chmod(base, 0o755)
        home = base / "home"
        home.mkdir()
        (base / "target").mkdir()
        (home / "mnt").symlink_to(base / "target")  # root's
        (home / "evil").symlink_to("/etc")
        os.chown(home / "evil", user.pw_uid, user.pw_gid, follow_symlinks=False)
        os.chown(home, user.pw_uid, user.pw_gid)
        proc = subprocess.Popen(
            [
                *("setpriv", f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}"),
                *("--clear-groups", "/usr/bin/python3", "-c", _SWAPPER, str(home)),
            ],
            stdout=subprocess.PIPE,
        )
        assert proc.stdout is not None and proc.stdout.readline() == b"go\n"
        seen = set()
        for _ in range(5000):
            try:
                fd = open_trusted(str(home / "mnt"))
            except (UntrustedSymlink, FileNotFoundError):
                seen.add("refused")
                continue
            try:
                seen.add(os.readlink(f"/proc/self/fd/{fd}"))
            finally:
                os.close(fd)
        assert seen <= {"refused", str(base / "target")}, seen
    finally:
        if proc is not None:
            proc.kill()
            proc.wait(10)
        rmtree(str(base))


# In a mount namespace of its own: the working directory, then a tmpfs over its name.
_UNDER_A_MOUNT = """
import os, subprocess, sys
sys.path.insert(0, sys.argv[2])
from unionfs.tree import open_trusted
os.chdir(sys.argv[1])
subprocess.run(["mount", "-t", "tmpfs", "none", sys.argv[1]], check=True)
fd = open_trusted("link/f", os.O_PATH)
print(os.readlink(f"/proc/self/fd/{fd}"))
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root (a mount namespace)")
def test_open_trusted_walks_a_relative_path_from_the_working_directory_itself(
    tmp_path: Path,
) -> None:
    """A relative path crossing a symlink is walked one component at a time; the walk
    started at the working directory's name (getcwd), the fast path at the directory:
    under a mount made over that name since, the two named different trees (here the
    walk found nothing). Both start at the directory itself now."""
    d = tmp_path / "d"
    (d / "real").mkdir(parents=True)
    (d / "real/f").write_text("x")
    (d / "link").symlink_to("real")  # root's: followed, by the walk
    r = subprocess.run(
        [
            *("unshare", "-m", "--propagation", "private", sys.executable, "-c"),
            *(_UNDER_A_MOUNT, str(d), str(REPO)),
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert r.returncode == 0 and r.stdout.strip() == str(d / "real/f"), r.stderr


_PRIVATE_DIR = """
import os, sys
sys.path.insert(0, sys.argv[2])
from unionfs.tree import open_private_dir
try:
    os.close(open_private_dir(sys.argv[1]))
    print("ok")
except OSError as e:
    print(e.strerror)
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root (useradd)")
def test_private_dir_may_be_writable_by_the_users_own_group_alone() -> None:
    """Under umask 002 (Fedora's shells, for a user-private group) her ~/.local and ~/tmp
    are group-writable: her store and her TMPDIR were refused ("which others can write"),
    so every rootless command; that group is hers alone. Another group's write bit (a
    group her UPG shares with a second user, a team's group) is still refused."""
    import grp
    import pwd

    name = f"pyu-g{os.getpid()}-{os.urandom(2).hex()}"
    subprocess.run(["useradd", "-M", "-U", name], check=True, capture_output=True, timeout=60)
    base = Path(tempfile.mkdtemp(prefix="pyunion-upg-"))
    try:
        pw, team = pwd.getpwnam(name), grp.getgrnam("users")
        os.chmod(base, 0o755)
        for sub, gid in (("own", pw.pw_gid), ("team", team.gr_gid)):
            (base / sub / "d").mkdir(parents=True)
            for d in (base / sub, base / sub / "d"):
                os.chown(d, pw.pw_uid, gid)
                os.chmod(d, 0o2775)
        she = ["setpriv", f"--reuid={pw.pw_uid}", f"--regid={pw.pw_gid}", "--init-groups"]

        def check(path: Path) -> str:
            r = subprocess.run(
                [*she, sys.executable, "-c", _PRIVATE_DIR, str(path), str(REPO)],
                capture_output=True,
                text=True,
                timeout=30,
                check=False,
                cwd="/",
            )
            assert r.returncode == 0, r.stderr
            return r.stdout.strip()

        assert check(base / "own/d") == "ok"
        assert check(base / "team/d") == f"crosses {base}/team, which others can write"
        subprocess.run(
            ["gpasswd", "-a", "nobody", name], check=True, capture_output=True, timeout=60
        )
        assert check(base / "own/d") == f"crosses {base}/own, which others can write"
    finally:
        rmtree(str(base))
        subprocess.run(["userdel", name], capture_output=True, timeout=60, check=False)
        subprocess.run(["groupdel", name], capture_output=True, timeout=60, check=False)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root (a pipe made as another user)")
def test_read_named_takes_a_pipe_handed_over_by_another_user(tmp_path: Path) -> None:
    """`printf 'A=1' | sudo pyunion run --env-file /dev/stdin`: her shell made that pipe,
    so it is hers, and was refused as her FIFO; a pipe with no name reaches root only as
    an fd root was handed. Her FIFO named by path is still refused (it could hang root)."""
    from unionfs.tree import NotRegularFile, read_named

    os.setegid(65534)
    os.seteuid(65534)
    try:
        r, w = os.pipe()
    finally:
        os.seteuid(0)
        os.setegid(0)
    try:
        assert os.fstat(r).st_uid == 65534
        os.write(w, b"A=1\n")
        os.close(w)
        w = -1
        assert read_named(f"/dev/fd/{r}", 100) == b"A=1\n"
        os.mkfifo(tmp_path / "fifo")
        os.chown(tmp_path / "fifo", 65534, 65534)
        with pytest.raises(NotRegularFile):
            read_named(str(tmp_path / "fifo"), 100)
    finally:
        os.close(r)
        if w >= 0:
            os.close(w)


def test_walk_stops_at_the_first_path_longer_than_asked(tmp_path: Path) -> None:
    """The paths a walk holds grow with the square of the depth: a caller walking a tree
    someone else built bounds them, and the walk stops there, not at the bottom."""
    top = tmp_path / "top"
    top.mkdir()
    _deep(str(top), 3000)
    fd = os.open(str(top), os.O_RDONLY | os.O_DIRECTORY)
    try:
        assert len(list(walk_at(fd, 6000))) == 6000
        with pytest.raises(OSError) as e:
            list(walk_at(fd, 4095))
        assert e.value.errno == errno.ENAMETOOLONG
        assert 4095 < len(e.value.filename) <= 4097  # "d/d/...": odd lengths
    finally:
        os.close(fd)
        rmtree(str(top))


def test_walk_holds_one_directory_not_the_tree(tmp_path: Path) -> None:
    """The walk returned every entry's path and stat result at once (930 bytes an entry:
    a million files a container made were 930 MB in a build step's two walks); it now
    yields them as it goes and holds the directory it is in."""
    import tracemalloc

    top = tmp_path / "top"
    top.mkdir()
    fd = os.open(str(top), os.O_RDONLY | os.O_DIRECTORY)
    try:
        for i in range(300):
            os.mkdir(f"d{i}", dir_fd=fd)
            dfd = os.open(f"d{i}", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            for j in range(100):
                os.close(os.open(f"f{j}", os.O_CREAT | os.O_WRONLY, 0o644, dir_fd=dfd))
            os.close(dfd)
        tracemalloc.start()
        try:
            count = sum(1 for _ in walk_at(fd))
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert count == 30_300
        assert peak < 4 << 20, peak
    finally:
        os.close(fd)
        rmtree(str(top))


def test_rmtree_of_a_wide_directory_is_linear(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Removal read a directory from its start again for each subdirectory, and ext4
    reads past every slot emptied before: a container's 80,000 empty directories took
    186 s to tear down (20,000: 19 s). Each read now gives a batch of names: the wide
    directory is read a few times, not once per subdirectory."""
    top = tmp_path / "top"
    top.mkdir()
    fd = os.open(str(top), os.O_RDONLY | os.O_DIRECTORY)
    try:
        for i in range(10_000):
            os.mkdir(f"d{i:05d}", dir_fd=fd)
        os.mkdir("d00000/x", dir_fd=fd)
        os.symlink("/", "d00001/link", dir_fd=fd)
    finally:
        os.close(fd)
    wide = top.stat().st_ino
    reads = []
    scandir = os.scandir

    def counting(path: Any) -> Any:
        if isinstance(path, int) and os.fstat(path).st_ino == wide:
            reads.append(path)
        return scandir(path)

    monkeypatch.setattr(os, "scandir", counting)
    rmtree(str(top))
    monkeypatch.undo()
    assert not top.exists()
    assert len(reads) <= 6, len(reads)  # batches of 4096, then one that finds it empty


# -- mountinfo read once per device a call meets (`tree.Mounters`) ---------------------------
_COUNT_MOUNTINFO = """
import os, sys
sys.path.insert(0, sys.argv[1])
from unionfs import tree
reads = []
sys.addaudithook(lambda ev, args: reads.append(args[0]) if ev == "open" and
                 str(args[0]).endswith("/mountinfo") else None)
os.close(tree.open_private_dir(sys.argv[2]))
os.close(tree.open_trusted(sys.argv[3], os.O_PATH))
print(len(reads))
"""


def test_mountinfo_read_once_per_device_in_a_call() -> None:
    """On a device with major 0 (a tmpfs: whose FUSE mount is it?) /proc/self/mountinfo
    was read for every directory `open_private_dir` checked and every level
    `open_trusted` walked up to judge a symlink: now once per device per call."""
    base = Path(tempfile.mkdtemp(dir="/dev/shm"))  # a tmpfs (major 0)
    try:
        deep = base.joinpath(*"abcdefghij")
        deep.mkdir(parents=True)
        (deep / "to-deep").symlink_to(deep)
        devs = {
            os.stat(p).st_dev for p in [deep, *deep.parents] if os.major(os.stat(p).st_dev) == 0
        }
        r = subprocess.run(
            [sys.executable, "-c", _COUNT_MOUNTINFO, str(REPO), str(deep), str(deep / "to-deep")],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        assert 0 < int(r.stdout) <= 2 * len(devs), (r.stdout, devs)
    finally:
        rmtree(str(base))
