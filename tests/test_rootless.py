"""pyunion as an ordinary user (rootless), compared with what root gets.

The users are real: `pyunion-user`, which scripts/setup.sh makes with a
subordinate ID range (as useradd does for every regular user on Debian 12),
and a throw-away system user without one. Each command runs through
`setpriv` with the user's own IDs and no capability, in a home of its own
under /var/tmp, with the system's python3 (the venv's interpreter may live
under root's 0700 home, which the user namespace cannot enter).

What is compared with root: the tree `pyunion run` shows (names, types,
modes, owners, sizes, link targets) of the sample and of an image buildah
made with files of several owners and a setuid program; the IDs `run -u`
gives; the layer `commit` makes (the same DiffID). Then what only the
rootless side has: the mapping of `pyunion unshare`, the store's owners on
disk, the single-ID mapping, the one-line failures, and that a root-only
file of the host stays out of reach.
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import re
import secrets
import shutil
import signal
import site
import stat
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from support import (
    PYUNION,
    force_unmount,
    fuse_skip_reason,
    host_listeners,
    is_mounted,
    pyunion,
    wait_gone,
)
from test_image import make_layout

from unionfs import cgroups, userns
from unionfs.tree import rmtree

REPO = Path(__file__).resolve().parent.parent
SETUP_USER = "pyunion-user"  # scripts/setup.sh
BUSYBOX = "/bin/busybox"
SYSTEM_PYTHON = "/usr/bin/python3"

pytestmark = [
    pytest.mark.skipif(fuse_skip_reason() is not None, reason=fuse_skip_reason() or ""),
    pytest.mark.timeout(180),
]

SHOW_IDS_C = r"""
#include <stdio.h>
#include <unistd.h>
int main(void) {
    printf("%d %d %d %d\n", (int)getuid(), (int)geteuid(), (int)getgid(), (int)getegid());
    return 0;
}
"""
# Every entry of the container's own tree (not /proc, /sys, /dev), one line each.
LISTING = "find / -xdev -mindepth 1 -exec stat -c '%n|%F|%a|%u|%g|%s|%N' {} + | sort"
NOT_THE_IMAGE = ("/proc", "/sys", "/dev")


# -- users ----------------------------------------------------------------------------------
@dataclass
class User:
    name: str
    uid: int
    gid: int

    def run(
        self,
        home: Path,
        *argv: str,
        timeout: float = 120,
        input: str | None = None,
        cgroup: Path | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """ARGV as this user: own IDs, supplementary groups from /etc/group, no capability;
        started in `cgroup` if given (moved there by root, as a login manager would)."""
        env = {
            "PATH": "/usr/local/bin:/usr/bin:/bin",
            "HOME": str(home),
            "LANG": "C.UTF-8",
            "XDG_DATA_HOME": str(home / "data"),
            "TMPDIR": str(home / "tmp"),
            "PYTHONPATH": ":".join([str(REPO), *site.getsitepackages()]),
            "PYTHONDONTWRITEBYTECODE": "1",
        }
        enter = ["sh", "-c", 'echo $$ > "$0/cgroup.procs" && exec "$@"', str(cgroup)]
        return subprocess.run(
            [
                *(enter if cgroup is not None else []),
                "setpriv",
                f"--reuid={self.uid}",
                f"--regid={self.gid}",
                "--init-groups",
                "--inh-caps=-all",
                *argv,
            ],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=env,
            cwd=str(home),
            input=input,
            stdin=None if input is not None else subprocess.DEVNULL,
            check=False,
        )

    def pyunion(
        self,
        home: Path,
        *args: str,
        check: bool = True,
        timeout: float = 120,
        cgroup: Path | None = None,
    ) -> subprocess.CompletedProcess[str]:
        r = self.run(home, SYSTEM_PYTHON, "-m", "unionfs", *args, timeout=timeout, cgroup=cgroup)
        if check and r.returncode != 0:
            raise AssertionError(
                f"pyunion {' '.join(args)} as {self.name} failed ({r.returncode}): {r.stderr}"
            )
        return r


def _user(name: str) -> User:
    pw = pwd.getpwnam(name)
    return User(name, pw.pw_uid, pw.pw_gid)


@pytest.fixture(scope="session")
def user() -> User:
    """The setup user, with a subordinate range for its uids and its gids."""
    same = f"import sys; sys.exit(sys.version_info[:2] != {tuple(sys.version_info[:2])})"
    if (
        not os.path.exists(SYSTEM_PYTHON)
        or subprocess.run([SYSTEM_PYTHON, "-c", same], check=False).returncode
    ):
        pytest.fail(
            f"{SYSTEM_PYTHON} must be Python {sys.version_info[0]}.{sys.version_info[1]} "
            "(the one the venv's packages are built for)"
        )
    try:
        u = _user(SETUP_USER)
    except KeyError:
        pytest.fail(f"no user {SETUP_USER}: run scripts/setup.sh")
    m = userns.rootless_mapping(u.uid, u.gid)
    assert not m.single, f"{SETUP_USER} has no subordinate range: run scripts/setup.sh"
    return u


@pytest.fixture(scope="session")
def single_user() -> Iterator[User]:
    """A throw-away system user: no subordinate IDs (useradd gives none to system users)."""
    name = f"pyu-single-{os.getpid()}"
    subprocess.run(
        ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", name],
        check=True,
        capture_output=True,
        timeout=60,
    )
    try:
        u = _user(name)
        assert userns.rootless_mapping(u.uid, u.gid).single
        yield u
    finally:
        subprocess.run(["userdel", name], capture_output=True, timeout=60, check=False)


def _processes_of(uid: int, marker: str) -> list[int]:
    """Processes of host uid `uid` (or its subordinate IDs) started with `marker` in them."""
    out = []
    for p in os.listdir("/proc"):
        if not p.isdigit() or int(p) == os.getpid():
            continue
        try:
            with open(f"/proc/{p}/status") as f:
                uids = next(line for line in f if line.startswith("Uid:")).split()[1:]
            blob = Path(f"/proc/{p}/cmdline").read_bytes() + Path(f"/proc/{p}/environ").read_bytes()
        except (OSError, StopIteration):
            continue
        if marker.encode() in blob and (int(uids[0]) == uid or int(uids[0]) >= 100000):
            out.append(int(p))
    return out


@contextlib.contextmanager
def _home(u: User) -> Iterator[Path]:
    """A private home for `u`; removed afterwards with whatever is left running in it."""
    home = Path(tempfile.mkdtemp(prefix="pyunion-rootless-", dir="/var/tmp"))
    (home / "tmp").mkdir()
    (home / "data").mkdir()  # XDG_DATA_HOME, which pyunion takes only when it is the user's
    for d in (home, home / "tmp", home / "data"):
        os.chown(d, u.uid, u.gid)
        os.chmod(d, 0o700)
    try:
        yield home
    finally:
        left = _processes_of(u.uid, str(home))
        for pid in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        rmtree(str(home))
        assert not left, f"processes left behind by {u.name}: {left}"


@pytest.fixture
def home(user: User) -> Iterator[Path]:
    with _home(user) as h:
        yield h


@pytest.fixture
def single_home(single_user: User) -> Iterator[Path]:
    with _home(single_user) as h:
        yield h


def root_pyunion(
    store: Path, *args: str, check: bool = True, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYUNION_STORE": str(store)}
    r = pyunion(*args, check=False, timeout=timeout, env=env, stdin=subprocess.DEVNULL)
    if check and r.returncode != 0:
        raise AssertionError(
            f"pyunion {' '.join(args)} as root failed ({r.returncode}): {r.stderr}"
        )
    return r


def one_line(r: subprocess.CompletedProcess[str], code: int | None = None) -> str:
    """The one error line of a failed command (a notice line about the mapping aside)."""
    lines = [x for x in r.stderr.splitlines() if not x.startswith("pyunion: warning:")]
    assert r.returncode != 0 and (code is None or r.returncode == code), r
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    return lines[0]


def listing(out: str) -> list[str]:
    return [
        line for line in out.splitlines() if not line.split("|", 1)[0].startswith(NOT_THE_IMAGE)
    ]


# -- images -------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A directory both root and the users read: images to import, the static helper."""
    # Its path is also an image reference (podman's `oci:DIR`): hex only, as mkdtemp's
    # letters may put an underscore next to a dash, which a reference may not have.
    d = Path("/var/tmp") / f"pyunion-rootless-shared-{secrets.token_hex(6)}"
    d.mkdir(mode=0o755)  # a new directory, never one already there
    os.chmod(d, 0o755)
    try:
        src = d / "show-ids.c"
        src.write_text(SHOW_IDS_C)
        subprocess.run(
            ["gcc", "-static", "-O1", "-o", str(d / "show-ids"), str(src)], check=True, timeout=120
        )
        yield d
    finally:
        rmtree(str(d))


@pytest.fixture(scope="session")
def sample_oci(shared: Path) -> Path:
    """The sample image as an OCI layout, built by root."""
    out = shared / "sample"
    subprocess.run(
        [*PYUNION, "sample", "--oci", str(out)], check=True, capture_output=True, timeout=120
    )
    for dirpath, _dirnames, filenames in os.walk(out / "oci"):
        os.chmod(dirpath, 0o755)
        for f in filenames:
            os.chmod(os.path.join(dirpath, f), 0o644)
    os.chmod(out, 0o755)
    return out / "oci"


@pytest.fixture(scope="session")
def buildah_image(shared: Path) -> Path:
    """An image made by buildah: files of several owners, private homes, a setuid-root and a
    setgid program, a hard link, a symlink and a FIFO, as an OCI archive."""
    if shutil.which("buildah") is None:
        pytest.fail("needs buildah (scripts/setup.sh installs it)")
    base = Path(tempfile.mkdtemp(prefix="buildah-", dir=shared))
    b = [
        "buildah",
        "--root",
        str(base / "root"),
        "--runroot",
        str(base / "run"),
        "--storage-driver",
        "vfs",
    ]

    def bah(*args: str) -> str:
        r = subprocess.run(
            [*b, *args],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
            env={**os.environ, "TMPDIR": str(base)},
        )
        assert r.returncode == 0, r.stderr
        return r.stdout.strip()

    try:
        ctr = bah("from", "scratch")
        mnt = Path(bah("mount", ctr))
        for d in ("bin", "etc", "tmp", "root", "home", "srv", "usr/local/bin", "opt"):
            (mnt / d).mkdir(parents=True, exist_ok=True)
        shutil.copy2(BUSYBOX, mnt / "bin/busybox")
        for applet in (
            "sh",
            "ls",
            "cat",
            "id",
            "find",
            "stat",
            "sort",
            "echo",
            "touch",
            "chown",
            "chmod",
            "mkdir",
            "rm",
            "cp",
            "ln",
            "mkfifo",
        ):
            os.symlink("busybox", mnt / "bin" / applet)
        os.chmod(mnt / "tmp", 0o1777)
        os.chmod(mnt / "root", 0o700)
        (mnt / "etc/passwd").write_text(
            "root:x:0:0:root:/root:/bin/sh\nwww-data:x:33:33::/srv/www:/bin/sh\n"
            "alice:x:1000:1000::/home/alice:/bin/sh\nbob:x:2000:2001::/opt/bob:/bin/sh\n"
            "nobody:x:65534:65534::/nonexistent:/bin/sh\n"
        )
        (mnt / "etc/group").write_text(
            "root:x:0:\nwww-data:x:33:\nusers:x:100:alice\n"
            "alice:x:1000:\nbobs:x:2001:\nnogroup:x:65534:\n"
        )
        files = [
            ("home/alice", None, 0o700, 1000, 1000),
            ("home/alice/secret", "alice's\n", 0o600, 1000, 1000),
            ("srv/www", None, 0o750, 33, 33),
            ("srv/www/index.html", "<p>hi</p>\n", 0o640, 33, 33),
            ("opt/bob", None, 0o755, 2000, 2001),
            ("opt/bob/notes", "bob\n", 0o664, 2000, 2001),
            ("opt/nobody", "n\n", 0o644, 65534, 65534),
        ]
        for name, text, mode, uid, gid in files:
            p = mnt / name
            if text is None:
                p.mkdir()
            else:
                p.write_text(text)
            os.chown(p, uid, gid)
            os.chmod(p, mode)
        for name, mode, uid, gid in (
            ("show-ids-suid", 0o4755, 0, 0),
            ("show-ids-sgid", 0o2755, 2000, 2001),
        ):
            shutil.copy2(shared / "show-ids", mnt / "usr/local/bin" / name)
            os.chown(mnt / "usr/local/bin" / name, uid, gid)
            os.chmod(mnt / "usr/local/bin" / name, mode)
        os.link(mnt / "opt/bob/notes", mnt / "opt/bob/notes-link")
        os.lchown(mnt / "opt/bob/notes-link", 2000, 2001)
        os.symlink("../home/alice/secret", mnt / "opt/to-secret")
        os.mkfifo(mnt / "opt/bob/fifo")
        os.chown(mnt / "opt/bob/fifo", 2000, 2001)
        os.chmod(mnt / "opt/bob/fifo", 0o620)
        bah("umount", ctr)
        archive = shared / "owners.tar"
        bah("commit", "-q", "--format", "oci", ctr, f"oci-archive:{archive}:owners:latest")
        os.chmod(archive, 0o644)
        bah("rm", "--all")
        bah("rmi", "--all", "--force")
        return archive
    finally:
        rmtree(str(base))


@pytest.fixture(scope="module")
def root_store(
    tmp_path_factory: pytest.TempPathFactory, sample_oci: Path, buildah_image: Path
) -> Path:
    """Root's store with the same two images."""
    store = tmp_path_factory.mktemp("root-store") / "store"
    root_pyunion(store, "image", "import", "-q", str(sample_oci), "--tag", "sample")
    root_pyunion(store, "image", "import", "-q", str(buildah_image), "--tag", "owners")
    return store


def _import_both(user: User, home: Path, sample_oci: Path, buildah_image: Path) -> Path:
    user.pyunion(home, "image", "import", "-q", str(sample_oci), "--tag", "sample")
    user.pyunion(home, "image", "import", "-q", str(buildah_image), "--tag", "owners")
    return home / "data/pyunion/store"


@pytest.fixture(scope="module")
def user_store(user: User, sample_oci: Path, buildah_image: Path) -> Iterator[Path]:
    """The user's store with both images, shared by the tests that only add to it; its home
    is `user_store.parents[2]`."""
    with _home(user) as h:
        yield _import_both(user, h, sample_oci, buildah_image)


# -- the namespace ---------------------------------------------------------------------------
def test_unshare_maps_the_user_and_its_ranges_as_podman(user: User, home: Path) -> None:
    ranges = {
        k: userns.subordinate_ranges(f"/etc/sub{k}", user.name, user.uid) for k in ("uid", "gid")
    }
    own = {"uid": user.uid, "gid": user.gid}
    want = {k: [[0, own[k], 1], [1, ranges[k][0][0], ranges[k][0][1]]] for k in own}
    script = (
        "cat /proc/self/uid_map; echo; cat /proc/self/gid_map; echo; id -u; "
        "echo $PYUNION_STORE; exit 7"
    )
    for _ in range(2):  # the same mapping every time: owners on disk keep their meaning
        r = user.pyunion(home, "unshare", "sh", "-c", script, check=False)
        assert r.returncode == 7, r.stderr
        uid_map, gid_map, rest = r.stdout.split("\n\n")
        got = {
            k: [[int(x) for x in line.split()] for line in text.splitlines()]
            for k, text in (("uid", uid_map), ("gid", gid_map))
        }
        assert got == want
        assert rest.split() == ["0", str(home / "data/pyunion/store")]
        assert r.stderr == ""
    r = user.pyunion(home, "unshare", "no-such-command", check=False)
    assert one_line(r, 127) == "pyunion: no-such-command: No such file or directory"
    r = root_pyunion(home, "unshare", "true", check=False)
    assert "for ordinary users" in one_line(r, 1)


def test_a_root_only_file_stays_out_of_reach(user: User, home: Path, shared: Path) -> None:
    """Root in the namespace is the user on the host: the host's root-only files stay closed,
    through a volume, as a layer, and in pyunion unshare, with every capability there."""
    secret = Path(tempfile.mkdtemp(prefix="secret-", dir="/var/tmp"))
    try:
        os.chmod(secret, 0o755)
        (secret / "bin").mkdir()
        shutil.copy2(BUSYBOX, secret / "bin/busybox")
        (secret / "root-only").write_text("TOP SECRET\n")
        os.chmod(secret / "root-only", 0o600)
        cmd = "/bin/busybox cat /v/root-only /root-only; /bin/busybox ls /v"
        r = user.pyunion(
            home,
            "run",
            "--privileged",
            "-v",
            f"{secret}:/v",
            str(secret),
            "--",
            "/bin/busybox",
            "sh",
            "-c",
            cmd,
            check=False,
        )
        assert r.returncode == 0, r.stderr  # ls worked: the volume and the layer are there
        assert "TOP SECRET" not in r.stdout + r.stderr
        assert r.stderr.count("Permission denied") == 2, r.stderr
        r = user.pyunion(
            home,
            "unshare",
            "sh",
            "-c",
            f"cat {secret}/root-only; cat /etc/shadow; chown 0 {secret}/root-only",
            check=False,
        )
        assert "TOP SECRET" not in r.stdout and r.returncode != 0
        assert r.stderr.count("Permission denied") == 2 and "Operation not permitted" in r.stderr
        # Root, by contrast, reads it through the same run (the test can fail).
        r = root_pyunion(
            home,
            "run",
            "-v",
            f"{secret}:/v",
            str(secret),
            "--",
            "/bin/busybox",
            "cat",
            "/v/root-only",
        )
        assert r.stdout == "TOP SECRET\n"
    finally:
        rmtree(str(secret))


# -- the same as root ---------------------------------------------------------------------------
def test_sample_demo(user: User, home: Path, root_store: Path, shared: Path) -> None:
    """`pyunion sample` then `pyunion run` of its layers, as in the README, as the user."""
    r = user.pyunion(home, "sample", str(home / "s"))
    layers = r.stdout.split()
    assert [Path(x).name for x in layers] == ["2-oci", "1-kernel", "0-base"]
    base = Path(layers[2])
    st = os.stat(base / "home/alice")  # alice's home: the ID the namespace maps 1000 to
    assert st.st_uid == userns.rootless_mapping(user.uid, user.gid).uids[1][1] + 999
    assert os.getxattr(Path(layers[1]) / "opt/old", "user.overlay.opaque") == b"y"
    assert stat.S_ISCHR(os.lstat(Path(layers[1]) / "etc/doomed.txt").st_mode)
    mine = user.pyunion(home, "run", *layers, "--", "sh", "-c", LISTING).stdout
    theirs = root_pyunion(
        home,
        "run",
        *[str(shared / "sample/layers" / Path(x).name) for x in layers],
        "--",
        "sh",
        "-c",
        LISTING,
    ).stdout
    assert listing(mine) == listing(theirs)
    assert "/home/alice/hello.txt|regular file|644|1000|1000|17|/home/alice/hello.txt" in mine
    assert "/etc/doomed.txt" not in mine and "/opt/old/hidden.txt" not in mine


def test_imported_images_show_the_same_tree_as_roots(
    user: User, root_store: Path, user_store: Path
) -> None:
    home = user_store.parents[2]
    for image in ("owners", "sample"):
        mine = user.pyunion(home, "run", "-u", "root", image, "--", "sh", "-c", LISTING).stdout
        theirs = root_pyunion(
            root_store, "run", "-u", "root", image, "--", "sh", "-c", LISTING
        ).stdout
        assert listing(mine) == listing(theirs), image
    owners = listing(
        user.pyunion(home, "run", "-u", "root", "owners", "--", "sh", "-c", LISTING).stdout
    )
    for line in (
        "/usr/local/bin/show-ids-suid|regular file|4755|0|0|",
        "/usr/local/bin/show-ids-sgid|regular file|2755|2000|2001|",
        "/home/alice/secret|regular file|600|1000|1000|8|",
        "/srv/www|directory|750|33|33|",
        "/opt/bob/fifo|fifo|620|2000|2001|0|",
        "/opt/nobody|regular file|644|65534|65534|2|",
    ):
        assert any(x.startswith(line) for x in owners), line


def test_store_holds_the_mapped_owners(
    user: User, home: Path, sample_oci: Path, buildah_image: Path
) -> None:
    """On disk the layers carry the host IDs the namespace maps the image's IDs to."""
    user_store = _import_both(user, home, sample_oci, buildah_image)
    m = userns.rootless_mapping(user.uid, user.gid)
    sub_uid, sub_gid = m.uids[1][1], m.gids[1][1]
    info = json.loads(user.pyunion(home, "inspect", "owners").stdout)[0]
    [layer] = info["Layers"]
    assert layer["Whiteouts"] in ("kernel", "userxattr")
    diff = Path(layer["Path"])
    expect = {
        "home/alice/secret": (sub_uid + 999, sub_gid + 999),
        "srv/www": (sub_uid + 32, sub_gid + 32),
        "opt/bob/notes": (sub_uid + 1999, sub_gid + 2000),
        "usr/local/bin/show-ids-suid": (user.uid, user.gid),
        "opt/nobody": (sub_uid + 65533, sub_gid + 65533),
    }
    for name, owner in expect.items():
        st = os.lstat(diff / name)
        assert (st.st_uid, st.st_gid) == owner, name
    assert stat.S_IMODE(os.stat(diff / "usr/local/bin/show-ids-suid").st_mode) == 0o4755
    assert os.stat(diff / "opt/bob/notes").st_ino == os.stat(diff / "opt/bob/notes-link").st_ino
    # Outside the namespace the user cannot even list alice's home; rmi goes in and removes all.
    r = user.run(home, "ls", str(diff / "home/alice"))
    assert r.returncode != 0 and "Permission denied" in r.stderr
    user.pyunion(home, "rmi", "owners", "sample")
    assert os.listdir(user_store / "layers") == []
    assert user.pyunion(home, "images", "-q").stdout == ""


@pytest.mark.parametrize("who", ["alice", "bob", "www-data", "1000:33", "nobody"])
def test_run_as_user(user: User, root_store: Path, user_store: Path, who: str) -> None:
    """-u: the IDs, groups, what the user may read, and the setuid/setgid programs."""
    home = user_store.parents[2]
    script = (
        "id; show-ids-suid; show-ids-sgid; cat /home/alice/secret 2>&1; "
        "cat /srv/www/index.html 2>&1; touch /opt/bob/x 2>&1; echo $HOME"
    )
    mine = user.pyunion(home, "run", "-u", who, "owners", "--", "sh", "-c", script)
    theirs = root_pyunion(root_store, "run", "-u", who, "owners", "--", "sh", "-c", script)
    assert mine.stdout == theirs.stdout
    if who == "alice":
        assert mine.stdout.splitlines()[1:4] == [
            "1000 0 1000 1000",
            "1000 1000 1000 2001",
            "alice's",
        ]


def test_an_upper_or_tmpdir_below_another_users_directory_is_refused(
    user: User, single_user: User, user_store: Path
) -> None:
    """In her user namespace another user's directory shows as `nobody`'s, as the host's
    root's do, and passed for one no other user can change: her `--upper` (or $TMPDIR)
    in a directory of hers inside his, which he can rename away and replace with a tree
    of his that her container then uses. Checked as the host sees it, before she enters
    the namespace: one line, exit 125, nothing made, as for root."""
    home = user_store.parents[2]
    theirs = Path(tempfile.mkdtemp(prefix="pyunion-theirs-", dir="/var/tmp"))
    try:
        os.chmod(theirs, 0o755)
        os.chown(theirs, single_user.uid, single_user.gid)
        mine = theirs / "mine"
        mine.mkdir(mode=0o700)
        os.chown(mine, user.uid, user.gid)
        r = user.pyunion(
            home, "run", "--upper", str(mine / "up"), "sample", "--", "true", check=False
        )
        assert r.returncode == 125 and f"owned by uid {single_user.uid}" in r.stderr, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1 and not (mine / "up").exists()
        cmd = ["env", f"TMPDIR={mine}", SYSTEM_PYTHON, "-m", "unionfs", "run", "sample", "true"]
        r = user.run(home, *cmd)
        assert r.returncode == 125 and f"owned by uid {single_user.uid}" in r.stderr, r.stderr
        assert os.listdir(mine) == []
    finally:
        rmtree(str(theirs))


def test_commit_makes_the_same_layer_as_root(
    user: User, root_store: Path, user_store: Path
) -> None:
    """Owners, a setuid bit, whiteouts and an opaque directory, committed reproducibly: the
    layer is byte for byte root's (same DiffID)."""
    home = user_store.parents[2]
    script = (
        "echo x > /x; chown alice:users /x; cp /bin/busybox /usr/local/bin/suid; "
        "chown 0:33 /usr/local/bin/suid; chmod 4750 /usr/local/bin/suid; "
        "rm /home/alice/secret; rm -r /srv/www; mkdir /srv/www; echo new > /srv/www/new; "
        "chown -R 33:33 /srv/www; mkdir -p /opt/bob/d/e; chown -R bob /opt/bob/d; "
        "ln /x /x2; mkfifo /opt/p"
    )
    ids = {}
    for who, store in (("user", user_store), ("root", root_store)):
        # root's upper in a directory only root can change (`run --upper` refuses hers)
        up = home / "up-user" if who == "user" else root_store.parent / "up-root"
        if who == "user":
            user.run(home, "mkdir", str(up))
            user.pyunion(
                home, "run", "-u", "root", "--upper", str(up), "owners", "--", "sh", "-c", script
            )
            out = user.pyunion(
                home, "commit", str(up), "--image", "owners", "--tag", "owners2", "--timestamp", "0"
            ).stdout
            info = json.loads(user.pyunion(home, "inspect", "owners2").stdout)[0]
        else:
            up.mkdir()
            root_pyunion(
                store, "run", "-u", "root", "--upper", str(up), "owners", "--", "sh", "-c", script
            )
            out = root_pyunion(
                store,
                "commit",
                str(up),
                "--image",
                "owners",
                "--tag",
                "owners2",
                "--timestamp",
                "0",
            ).stdout
            info = json.loads(root_pyunion(store, "inspect", "owners2").stdout)[0]
        assert out.strip() == info["Id"]
        ids[who] = info["RootFS"]["diff_ids"][-1]
        layer_blob = store / "blobs/sha256" / info["Manifest"]["layers"][-1]["digest"][7:]
        with tarfile.open(layer_blob) as t:
            members = {m.name: (m.type, m.mode, m.uid, m.gid) for m in t.getmembers()}
        assert members["x"][1:] == (0o644, 1000, 100)
        assert members["usr/local/bin/suid"][1:] == (0o4750, 0, 33)
        assert "home/alice/.wh.secret" in members and "srv/www/.wh..wh..opq" in members
        assert members["x2"][0] == tarfile.LNKTYPE
    assert ids["user"] == ids["root"]


# -- what only the rootless side has ---------------------------------------------------------------
def test_mount_an_image_inside_unshare(user: User, user_store: Path) -> None:
    home = user_store.parents[2]
    mnt = home / "mnt"
    user.run(home, "mkdir", str(mnt))
    r = user.pyunion(home, "mount", "owners", str(mnt), check=False)
    assert "inside 'pyunion unshare'" in one_line(r)
    py = f"{SYSTEM_PYTHON} -m unionfs"
    r = user.pyunion(
        home,
        "unshare",
        "sh",
        "-c",
        f"{py} mount owners {mnt} && stat -c '%u:%g %a' {mnt}/home/alice/secret "
        f"{mnt}/usr/local/bin/show-ids-suid && cat {mnt}/home/alice/secret",
    )
    assert r.stdout == "1000:1000 600\n0:0 4755\nalice's\n"
    # Left mounted when the shell ended: unmounted, its daemon gone (the home fixture checks).
    assert r.stderr == f"pyunion: unmounted {mnt} (still mounted when the command ended)\n"


def test_kernel_overlayfs_reads_the_rootless_store(user: User, user_store: Path) -> None:
    """The sample's layers in the user's store are char 0/0 whiteouts and user.overlay.opaque:
    kernel overlayfs mounted by the user with -o userxattr shows what pyunion shows."""
    home = user_store.parents[2]
    info = json.loads(user.pyunion(home, "inspect", "sample").stdout)[0]
    lowers = ":".join(x["Path"] for x in reversed(info["Layers"]))
    assert [x["Whiteouts"] for x in info["Layers"]] == ["kernel", "userxattr", "userxattr"]
    k, p = home / "k", home / "p"
    user.run(home, "mkdir", str(k), str(p))
    walk = "(cd {0} && find . -exec stat -c '%n|%F|%a|%u|%g|%s' {{}} + | sort)"
    r = user.pyunion(
        home,
        "unshare",
        "sh",
        "-c",
        f"mount -t overlay -o userxattr,lowerdir={lowers} none {k} && "
        f"{SYSTEM_PYTHON} -m unionfs mount -o lowerdir={lowers} {p} && "
        f"{walk.format(k)} > {home}/k.txt && {walk.format(p)} > {home}/p.txt && "
        f"umount {k} && {SYSTEM_PYTHON} -m unionfs umount {p}",
    )
    assert r.returncode == 0, r.stderr
    kernel, ours = (home / "k.txt").read_text(), (home / "p.txt").read_text()
    # The merged directories' sizes differ by design (the kernel's are its upper's or a lower's).
    strip = [
        line.rsplit("|", 1)[0] if "|directory|" in line else line for line in kernel.splitlines()
    ]
    assert strip == [
        line.rsplit("|", 1)[0] if "|directory|" in line else line for line in ours.splitlines()
    ]
    assert "./etc/motd|" in kernel and "./etc/doomed.txt" not in kernel
    assert "./opt/old/new.txt|" in kernel and "./opt/old/hidden.txt" not in kernel


def test_single_mapping(
    single_user: User, single_home: Path, sample_oci: Path, shared: Path
) -> None:
    """Without subordinate IDs: one ID, a one-line notice; what needs more IDs fails in one
    line that says what to do; a root-only image still runs."""
    u, home = single_user, single_home
    r = u.pyunion(home, "unshare", "sh", "-c", "cat /proc/self/uid_map /proc/self/setgroups")
    assert r.stdout.split() == ["0", str(u.uid), "1", "deny"]
    notice = r.stderr.splitlines()
    assert len(notice) == 1 and notice[0].startswith(
        f"pyunion: warning: no subordinate IDs for {u.name} in /etc/subuid and /etc/subgid"
    )
    assert "usermod --add-subuids" in notice[0]
    r = u.pyunion(home, "image", "import", str(sample_oci), "--tag", "sample", check=False)
    err = one_line(r)
    assert "its owner 1000:1000 is outside the IDs of the user namespace (0-0)" in err
    assert "usermod --add-subuids" in err and u.name in err
    assert u.pyunion(home, "images", "-q").stdout == ""
    r = u.pyunion(home, "sample", str(home / "s"), check=False)
    assert "alice (1000) is outside the IDs of the user namespace" in one_line(r)
    layer = home / "layer"
    u.run(home, "mkdir", "-p", str(layer / "bin"), str(layer / "etc"))
    u.run(home, "cp", BUSYBOX, str(layer / "bin/busybox"))
    u.run(home, "cp", str(shared / "show-ids"), str(layer / "bin/show-ids"))
    r = u.pyunion(home, "run", str(layer), "--", "/bin/show-ids")
    assert r.stdout == "0 0 0 0\n"
    # gid 5 (podman's gid=5 for /dev/pts) is not mapped: devpts without it, and no warning
    script = "grep -E ' /dev/(pts|mqueue) ' /proc/self/mountinfo | awk '{print $5, $(NF-2), $NF}'"
    r = u.pyunion(home, "run", str(layer), "--", "/bin/busybox", "sh", "-c", script)
    assert r.stdout.splitlines() == [
        "/dev/pts devpts rw,mode=620,ptmxmode=666",
        "/dev/mqueue mqueue rw",
    ]
    assert "warning" not in r.stderr.replace(notice[0], ""), r.stderr
    r = u.pyunion(home, "run", "-u", "1000", str(layer), "--", "/bin/show-ids", check=False)
    assert "user '1000' (1000:0) is outside the IDs of the user namespace" in one_line(r, 125)


def test_device_nodes_need_root(user: User, home: Path, shared: Path, tmp_path: Path) -> None:
    buf = tmp_path / "layer.tar"
    with tarfile.open(buf, "w", format=tarfile.PAX_FORMAT) as t:
        for name, kind in (("dev", tarfile.DIRTYPE), ("dev/null", tarfile.CHRTYPE)):
            ti = tarfile.TarInfo(name)
            ti.type, ti.mode, ti.devmajor, ti.devminor = kind, 0o666, 1, 3
            t.addfile(ti)
    lay = make_layout(shared / f"dev-{os.getpid()}", [buf.read_bytes()])
    for dirpath, _, filenames in os.walk(lay):
        os.chmod(dirpath, 0o755)
        for f in filenames:
            os.chmod(os.path.join(dirpath, f), 0o644)
    r = user.pyunion(home, "image", "import", str(lay), check=False)
    assert "refusing device node 'dev/null' (1:3): only the host's root" in one_line(r)
    assert user.pyunion(home, "images", "-q").stdout == ""
    assert os.listdir(home / "data/pyunion/store/layers") == []
    root_pyunion(tmp_path / "store", "image", "import", "-q", str(lay))  # root can


# -- rootless buildah with pyunion-overlayfs as its mount program --------------------------------
BUILD_DRIVER = """
import pickle, sys
from pathlib import Path
import test_buildah as tb
base, program, out = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
src = base / "src"
tb._data_tree(src)
with tb.store(base / "store", program) as s:
    result = tb.build(s, src)
with open(out, "wb") as f:
    pickle.dump(result, f)
"""


@pytest.mark.timeout(600)
def test_rootless_buildah_builds_the_same_layers_as_with_fuse_overlayfs(
    user: User, home: Path
) -> None:
    """test_buildah's three-stage build, run by the user inside `buildah unshare` (where
    buildah's own user namespace maps the user's ranges), once with pyunion-overlayfs and once
    with fuse-overlayfs as the mount program: the same output, trees and committed layers."""
    import pickle

    from test_buildah import assert_same_build

    fuse_overlayfs = shutil.which("fuse-overlayfs")
    assert fuse_overlayfs, "needs fuse-overlayfs (scripts/setup.sh installs it)"
    program = home / "pyunion-overlayfs"  # the console script's python may be out of reach
    program.write_text(
        "#!/bin/sh\nexec " + SYSTEM_PYTHON + " -c 'import sys; from unionfs.cli "
        'import overlayfs_main; sys.exit(overlayfs_main())\' "$@"\n'
    )
    os.chmod(program, 0o755)
    results = {}
    for name, prog in (("pyunion", str(program)), ("fuse-overlayfs", fuse_overlayfs)):
        base, out = home / f"build-{name}", home / f"{name}.pickle"
        user.run(home, "mkdir", str(base))
        path = ":".join([str(REPO / "tests"), str(REPO), *site.getsitepackages()])
        r = user.run(
            home,
            "env",
            f"PYTHONPATH={path}",
            "buildah",
            "unshare",
            SYSTEM_PYTHON,
            "-c",
            BUILD_DRIVER,
            str(base),
            prog,
            str(out),
            timeout=500,
        )
        assert r.returncode == 0, f"{name}:\n{r.stdout}\n{r.stderr}"
        with open(out, "rb") as f:
            results[name] = pickle.load(f)  # written by this test just now
    ours, theirs = results["pyunion"], results["fuse-overlayfs"]
    assert_same_build(ours, theirs)
    owned = [m for m in ours["layers"][1] if m[0] == "data/owned"]
    assert owned and owned[0][3:5] == (2000, 2001)  # chown in stage 2, as in the root build


# -- pyunion build -------------------------------------------------------------------------------
def test_build_gives_the_user_roots_image(user: User, root_store: Path, user_store: Path) -> None:
    """test_build's multi-stage Containerfile (RUN as root and as alice, chown, COPY --chown
    and --from, ADD of a tar with its own owners) built by the user and by root: the same
    tree, owners and history."""
    home = user_store.parents[2]
    from test_build import _busybox_context

    ctx = home / "ctx"
    _busybox_context(ctx)
    for dirpath, dirnames, filenames in os.walk(ctx):
        for name in [dirpath, *(os.path.join(dirpath, f) for f in dirnames + filenames)]:
            os.lchown(name, user.uid, user.gid)
    args = (
        "--build-arg",
        "BASE=sample",
        "--build-arg",
        "GREETING=bonjour",
        "-q",
        "-t",
        "app",
        str(ctx),
    )
    mine = user.pyunion(home, "build", *args, timeout=600).stdout.split()[-1]
    theirs = root_pyunion(root_store, "build", *args, timeout=600).stdout.split()[-1]
    views = []
    for who in ("user", "root"):
        argv = ("run", "--entrypoint", "", "app", "--", "sh", "-c", LISTING)
        out = (
            user.pyunion(home, *argv).stdout
            if who == "user"
            else root_pyunion(root_store, *argv).stdout
        )
        views.append(listing(out))
    assert views[0] == views[1]
    assert any(x.startswith("/srv/app/src/main.py|regular file|755|1000|100|") for x in views[0])
    assert any(x.startswith("/opt/bundle/top/a.txt|regular file|644|123|456|") for x in views[0])
    assert any(
        x.startswith("/home/alice/made-by-alice|regular empty file|644|1000|1000|")
        for x in views[0]
    )
    configs = [
        json.loads(out)[0]
        for out in (
            user.pyunion(home, "inspect", mine).stdout,
            root_pyunion(root_store, "inspect", theirs).stdout,
        )
    ]
    # A COPY's source digest covers the context's owners, which are the user's own files,
    # shown to root as the user's uid and in the namespace as 0: only those digests differ.
    history = [
        [
            re.sub(r"(dir|file|multi):[0-9a-f]{64}", r"\1:", str(h.get("created_by")))
            for h in c["History"]
        ]
        for c in configs
    ]
    assert history[0] == history[1]
    assert configs[0]["Config"] == configs[1]["Config"]


def test_a_users_archive_root_owned_by_an_unmapped_id_is_named_not_corrupt(
    user: User, home: Path
) -> None:
    """ADD of an archive whose `./` member (the destination itself) is owned by an ID
    outside her namespace's ranges: chown fails (EINVAL), which came out as "corrupt or
    truncated archive" (the archive is fine); now it names the member, as for any other."""
    ctx = home / "ctx"
    ctx.mkdir()
    with tarfile.open(ctx / "a.tar", "w") as t:
        ti = tarfile.TarInfo("./")
        ti.type, ti.mode, ti.uid, ti.gid = tarfile.DIRTYPE, 0o755, 300000, 300000
        t.addfile(ti)
    (ctx / "Containerfile").write_text("FROM scratch\nADD a.tar /dest/\n")
    for p in (ctx, ctx / "a.tar", ctx / "Containerfile"):
        os.chown(p, user.uid, user.gid)
    r = user.pyunion(home, "build", "-q", str(ctx), check=False, timeout=300)
    assert r.returncode == 125, r.stderr
    assert "cannot unpack '.': Invalid argument" in r.stderr and "corrupt" not in r.stderr


PROBES = (
    "grep -E '^(Cap|NoNewPrivs|Seccomp:)' /proc/self/status; "
    "wc -c < /proc/kcore; ls -A /sys/firmware | wc -l; "
    "touch /proc/sys/kernel/core_pattern 2>&1; "
    "unshare -U true 2>&1; mount -t tmpfs none /mnt 2>&1; "
    "echo ok"
)


@pytest.mark.parametrize(
    "opts",
    [
        ("-u", "root"),
        ("-u", "alice"),
        ("-u", "root", "--cap-drop", "ALL"),
        ("-u", "root", "--cap-add", "SYS_ADMIN"),
    ],
)
def test_confinement_is_roots(
    user: User, root_store: Path, user_store: Path, opts: tuple[str, ...]
) -> None:
    """Capabilities, seccomp, masked and read-only paths: the same lines in both runs."""
    home = user_store.parents[2]
    mine = user.pyunion(home, "run", *opts, "sample", "--", "sh", "-c", PROBES).stdout
    theirs = root_pyunion(root_store, "run", *opts, "sample", "--", "sh", "-c", PROBES).stdout
    assert mine == theirs
    assert mine.endswith("ok\n") and "Seccomp:\t2" in mine
    assert "Read-only file system" in mine  # /proc/sys
    if opts == ("-u", "root"):
        assert "CapEff:\t00000000800405fb" in mine and "Operation not permitted" in mine


# -- the network -----------------------------------------------------------------------------------
def test_rootless_network(user: User, user_store: Path) -> None:
    """--network none (the default) in a user namespace: only the loopback, up and working,
    a fresh sysfs of the container's namespace (the kernel refuses one for the host's
    network, where the host's /sys is bound), and neither the host's localhost nor its
    abstract Unix sockets in reach; --network host reaches both."""
    home = user_store.parents[2]
    with host_listeners() as (tcp, _unix, name):
        port = tcp.getsockname()[1]
        script = (
            "ls /sys/class/net | tr '\\n' ' '; echo; stat -c %d /sys; "
            f"grep -c @{name} /proc/net/unix; "
            f"nc 127.0.0.1 {port} -e true 2>/dev/null && echo reached; "
            "nc -l -p 4711 -e sh -c 'cat > /tmp/got' & "  # -e: not nc's stdin, at EOF already
            "for i in $(seq 100); do echo inside | nc 127.0.0.1 4711 2>/dev/null && break; "
            "usleep 50000; done; wait; cat /tmp/got"
        )
        host_sys = os.stat("/sys").st_dev
        host_links = " ".join(sorted(os.listdir("/sys/class/net")))
        for opts, want in (
            ((), ["lo ", "fresh", "0", "inside"]),
            (("--network", "host"), [f"{host_links} ", str(host_sys), "1", "reached", "inside"]),
        ):
            r = user.pyunion(home, "run", *opts, "sample", "--", "sh", "-c", script)
            lines = r.stdout.splitlines()
            if not opts:
                assert lines[1] != str(host_sys), r.stdout
                lines[1] = "fresh"
            assert lines == want, r.stderr


# -- the host's mounts ----------------------------------------------------------------------------
def test_rootless_run_pins_no_host_mount(user: User, home: Path, tmp_path: Path) -> None:
    """A host tmpfs mounted before a rootless container starts, unmounted while it runs, is
    gone from every namespace: neither pyunion (its FUSE mount is made from a short-lived
    namespace of its own) nor the container (which detaches the host's tree) holds a copy."""
    import threading

    from test_run_pinning import run_processes, sources_anywhere

    layer = home / "layer"
    (layer / "bin").mkdir(parents=True)
    shutil.copy2(BUSYBOX, layer / "bin/busybox")
    os.symlink("busybox", layer / "bin/sh")
    sync = home / "sync"
    sync.mkdir()
    for p in (layer, layer / "bin", sync):
        os.chown(p, user.uid, user.gid)
    target = tmp_path / "t"
    target.mkdir()
    source = "pyunion-pin-" + os.urandom(6).hex()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", source, str(target)], check=True)
    result: list[subprocess.CompletedProcess[str]] = []
    script = "echo > /sync/up; while [ ! -e /sync/go ]; do sleep 0.05; done"
    t = threading.Thread(
        target=lambda: result.append(
            user.pyunion(
                home,
                "run",
                "-v",
                f"{sync}:/sync",
                str(layer),
                "--",
                "sh",
                "-c",
                script,
                check=False,
                timeout=60,
            )
        )
    )
    t.start()
    try:
        deadline = 100 * 30
        while not (sync / "up").exists() and t.is_alive() and deadline:
            t.join(0.01)
            deadline -= 1
        assert (sync / "up").exists(), result[0].stderr if result else "no container"
        subprocess.run(["umount", str(target)], check=True, timeout=30)
        pids = run_processes(str(layer))
        assert len(pids) >= 5, pids  # pyunion, daemon, janitor, init, command
        holders = sources_anywhere(source, pids)
        assert holders == [], f"the unmounted tmpfs is still mounted in pids {holders}"
    finally:
        (sync / "go").touch()
        t.join(60)
        subprocess.run(["umount", "-l", str(target)], capture_output=True, check=False)
    assert result and result[0].returncode == 0, result[0].stderr if result else "hung"


@pytest.mark.parametrize("taken", ["directory", "symlink"])
def test_a_state_dir_name_taken_in_tmp_stops_no_mount(user: User, home: Path, taken: str) -> None:
    """Without XDG_RUNTIME_DIR (su, runuser, cron, ssh without logind) the state directory
    is $TMPDIR/pyunion-run-UID, a name in a directory every user writes: another user who
    made it first (or a symlink there) made every `pyunion mount` and `umount` of this
    user fail ("cannot use the state directory ...: Permission denied"). As podman, a
    directory in the user's home is used instead, and nothing goes into the other's."""
    tmp = Path(tempfile.mkdtemp(prefix="pyunion-shared-tmp-", dir="/var/tmp"))
    os.chmod(tmp, 0o1777)
    mnt = home / "mnt"
    try:
        name = tmp / f"pyunion-run-{user.uid}"
        if taken == "directory":
            name.mkdir(mode=0o700)
            os.chown(name, 65534, 65534)  # nobody's: any other user
        else:
            os.symlink(str(home / "tmp"), name)
        low = home / "low"
        user.run(home, "mkdir", str(low), str(mnt))
        user.run(home, "sh", "-c", f"echo hi > {low}/f")
        py = ("env", f"TMPDIR={tmp}", SYSTEM_PYTHON, "-m", "unionfs")
        r = user.run(home, *py, "mount", str(low), str(mnt))
        assert r.returncode == 0, r.stderr
        assert user.run(home, "cat", f"{mnt}/f").stdout == "hi\n"
        assert any((home / ".pyunion-run").iterdir())  # the daemon's pid file
        r = user.run(home, *py, "umount", str(mnt))
        assert r.returncode == 0, r.stderr
        assert not is_mounted(mnt)
        if taken == "directory":
            assert not any(name.iterdir())
        else:
            assert not any((home / "tmp").iterdir())
    finally:
        force_unmount(mnt)
        rmtree(str(tmp))


def test_subordinate_ranges_read_only_ascii_numbers(tmp_path: Path) -> None:
    """/etc/subuid's numbers follow the one rule for numbers from outside (digits.py):
    `²` passed str.isdigit() and made int() raise, 5000 digits too."""
    sub = tmp_path / "subuid"
    sub.write_text(
        "alice:²:65536\nalice:100000:" + "9" * 5000 + "\nalice:\u0661\u0660\u0660:65536\n"
        "alice:200000:65536\nbob:300000:65536\n1000:400000:10\n"
    )
    assert userns.subordinate_ranges(str(sub), "alice", 1000) == [(200000, 65536), (400000, 10)]


# -- podman ---------------------------------------------------------------------------------------
PODMAN_CHANGES = """
echo n > /srv/n; rm -rf /opt; mkdir /opt; echo o > /opt/o; ln /bin/busybox /root/bb
chmod 700 /srv; cat /vol/h; echo w > /vol/w; rm /vol/h; ls /vol; ls -A /opt /root
"""
PODMAN_AFTER = "ls -A /opt /srv /root; stat -c '%a %n' /srv"


def _rootless_podman(user: User, home: Path, name: str, program: str, image: Path) -> list[str]:
    """A container's life under the user's podman with `program` as its mount program: run
    (with an overlay volume, `-v SRC:DST:O`), diff, commit, run the commit, and the owners
    `--userns=keep-id` shows. The pause process podman leaves is ended afterwards."""
    base = home / name
    for sub in ("", "xdg", "tmp", "vol"):
        (base / sub).mkdir(mode=0o700)
        os.chown(base / sub, user.uid, user.gid)
    (base / "vol/h").write_text("host\n")
    os.chown(base / "vol/h", user.uid, user.gid)
    conf = base / "containers.conf"
    conf.write_text('[engine]\nevents_logger = "file"\ncgroup_manager = "cgroupfs"\n')
    env = [f"XDG_RUNTIME_DIR={base / 'xdg'}", f"CONTAINERS_CONF={conf}", f"TMPDIR={base / 'tmp'}"]
    argv = [*("podman", "--root", str(base / "root"), "--runroot", str(base / "r"))]
    argv += ["--storage-driver", "overlay", "--storage-opt", f"overlay.mount_program={program}"]
    limits = ["--network", "none", "--ulimit", "nofile=1024:1024", "--ulimit", "nproc=4096:4096"]
    limits += ["--user", "0"]  # the sample's config runs alice

    def podman(*args: str) -> str:
        r = user.run(home, "env", *env, *argv, *args)
        assert r.returncode == 0, f"{name}: podman {' '.join(args)}:\n{r.stdout}\n{r.stderr}"
        return r.stdout.strip()

    out = []
    try:
        # With its ref name: podman names an image without one after its path, and parses
        # that path as a reference even with one (`shared` is hex for it).
        podman(
            "tag", podman("pull", "-q", f"oci:{image}:latest").splitlines()[-1], "localhost/sample"
        )
        vol = f"{base / 'vol'}:/vol:O"
        out.append(
            podman(
                "run", *limits, "--name", "ctr", "-v", vol, "sample", "sh", "-ec", PODMAN_CHANGES
            )
        )
        out.append("\n".join(sorted(podman("diff", "ctr").splitlines())))
        podman("commit", "-q", "ctr", "localhost/changed")
        podman("rm", "ctr")
        out.append(podman("run", *limits, "--rm", "localhost/changed", "sh", "-ec", PODMAN_AFTER))
        ids = "stat -c '%u:%g %n' / /root /opt/o; touch /tmp/t; stat -c '%u:%g' /tmp/t"
        out.append(
            podman("run", *limits, "--rm", "--userns=keep-id", "localhost/changed", "sh", "-c", ids)
        )
        out.append(
            podman(
                "run", *limits, "--rm", "localhost/changed", "sh", "-c", "head -1 /proc/self/mounts"
            )
        )
        assert sorted(os.listdir(base / "vol")) == ["h"], "the overlay volume wrote to the host"
        podman("rm", "--all", "--force")
        podman("rmi", "--all", "--force")
    finally:
        pause = base / "tmp/libpod/tmp/pause.pid"
        for p in (pause, base / "xdg/libpod/tmp/pause.pid"):
            with contextlib.suppress(OSError, ValueError):
                pid = int(p.read_text())
                os.kill(pid, signal.SIGKILL)
                # SIGKILL is not death: until it is gone, the home's teardown sees it
                # running and counts it as left behind (a flaky failure of this test).
                wait_gone(pid, 10)
    return out


def test_rootless_podman_with_pyunion_as_with_fuse_overlayfs(
    user: User, home: Path, sample_oci: Path
) -> None:
    """Rootless podman, the mount program's main user: the same container life with
    pyunion-overlayfs as with fuse-overlayfs (an overlay volume failed with pyunion)."""
    fuse_overlayfs = shutil.which("fuse-overlayfs")
    if shutil.which("podman") is None or fuse_overlayfs is None:
        pytest.skip("needs podman and fuse-overlayfs (scripts/setup.sh installs them)")
    program = home / "pyunion-overlayfs"  # the console script's python may be out of reach
    program.write_text(
        "#!/bin/sh\nexec " + SYSTEM_PYTHON + " -c 'import sys; from unionfs.cli "
        'import overlayfs_main; sys.exit(overlayfs_main())\' "$@"\n'
    )
    os.chmod(program, 0o755)
    ours = _rootless_podman(user, home, "pu", str(program), sample_oci)
    theirs = _rootless_podman(user, home, "fo", fuse_overlayfs, sample_oci)
    assert ours[-1].split()[2] == "fuse.pyunion" and theirs[-1].split()[2] == "fuse.fuse-overlayfs"
    assert ours[:-1] == theirs[:-1], f"pyunion: {ours}\nfuse-overlayfs: {theirs}"
    assert ours[0].startswith("host\nw\n") and "A /srv/n" in ours[1] and "D /opt/old" in ours[1]


# -- the pids limit -------------------------------------------------------------------------
needs_pids = pytest.mark.skipif(
    cgroups.hierarchy("pids") is None, reason="no pids cgroup controller on this host"
)
BOMB = "i=0; while [ $i -lt 40 ]; do sleep 5 & i=$((i+1)); done; echo survived"


def _busybox_layer(u: User, home: Path) -> Path:
    layer = home / "layer"
    (layer / "bin").mkdir(parents=True)
    shutil.copy2(BUSYBOX, layer / "bin/busybox")
    for name in ("sh", "sleep", "grep"):
        os.symlink("busybox", layer / "bin" / name)
    for p in (layer, layer / "bin"):
        os.chown(p, u.uid, u.gid)
    return layer


@pytest.fixture
def user_cgroup(user: User) -> Iterator[Path]:
    """A cgroup delegated to the user, as systemd's `Delegate=yes` or pam_cgfs make one:
    hers, with a group below it she is put in (`0`); removed afterwards."""
    found = cgroups.hierarchy("pids")
    assert found is not None
    point, v2 = found
    top = Path(point) / f"pyunion-test-user-{secrets.token_hex(6)}"
    top.mkdir()
    try:
        if v2:
            cgroups._delegate(point, ("pids",))
        (top / "0").mkdir()
        for d in (top, top / "0"):
            os.chown(d, user.uid, user.gid)
            for f in ("cgroup.procs", "cgroup.subtree_control", "cgroup.threads", "tasks"):
                if (d / f).exists():
                    os.chown(d / f, user.uid, user.gid)
        yield top / "0"
    finally:
        cgroups.remove(str(top), timeout=20)


@needs_pids
def test_rootless_pids_limit_in_the_delegated_cgroup(
    user: User, home: Path, user_cgroup: Path
) -> None:
    """Rootless, the container gets podman's pids limit in the user's delegated cgroup
    (podman asks systemd for a scope there): a group of its own right below it, with
    pids.max, gone afterwards; --pids-limit N bounds a fork bomb as root's does."""
    layer = _busybox_layer(user, home)
    found = cgroups.hierarchy("pids")
    assert found is not None
    point, v2 = found
    parent = user_cgroup.parent if v2 else user_cgroup
    script = "grep -E '" + ("^0::" if v2 else "^[0-9]+:pids:") + "' /proc/self/cgroup"
    r = user.pyunion(home, "run", str(layer), "--", "sh", "-c", script, cgroup=user_cgroup)
    assert "warning" not in r.stderr, r.stderr
    inner = Path(point) / r.stdout.strip().split(":", 2)[2].lstrip("/")
    assert inner.name == cgroups.INNER and inner.parent.parent == parent, inner
    assert inner.parent.name.startswith(cgroups.PARENT + "-pyunion-run-"), inner
    assert not inner.parent.exists()
    r = user.pyunion(
        home, "run", "--pids-limit", "12", str(layer), "--", "sh", "-c", BOMB,
        check=False, cgroup=user_cgroup,
    )  # fmt: skip
    assert "survived" not in r.stdout and "fork" in r.stderr, (r.stdout, r.stderr)
    assert [p.name for p in parent.iterdir() if p.is_dir()] == (["0"] if v2 else [])


def test_rootless_without_a_delegated_cgroup(user: User, home: Path) -> None:
    """No cgroup of hers (a root-owned group, as after `su`): the container runs without a
    limit and pyunion says why in one line, once (not at every run); --pids-limit N is
    an error of one line."""
    layer = _busybox_layer(user, home)
    r = user.pyunion(home, "run", str(layer), "--", "sh", "-c", "echo ran")
    assert r.stdout == "ran\n"
    warned = [x for x in r.stderr.splitlines() if "no limit on the container's processes" in x]
    assert len(warned) == 1 and warned[0].startswith("pyunion: warning:"), r.stderr
    assert "Traceback" not in r.stderr
    r = user.pyunion(home, "run", str(layer), "--", "sh", "-c", "echo ran")
    assert r.stdout == "ran\n" and "no limit" not in r.stderr, r.stderr
    r = user.pyunion(home, "run", "--pids-limit", "12", str(layer), "--", "true", check=False)
    assert "--pids-limit: no cgroup for a rootless container" in one_line(r, 125)
    for opts in (("--memory", "32m"), ("--cpus", "0.5")):  # podman errors, never runs unbound
        r = user.pyunion(home, "run", *opts, str(layer), "--", "echo", "ran", check=False)
        assert f"{opts[0]}: no cgroup for a rootless container" in one_line(r, 125)
        assert "ran" not in r.stdout


def test_a_users_daemon_sets_no_atime_of_her_lower_files(user: User, home: Path) -> None:
    """A user's daemon cannot read her layers through a read-only copy of their mounts (not
    hers to make: `layers.read_only_view`): it opens her lower files and directories with
    O_NOATIME, as kernel overlayfs for files its mounter owns, so reads, listings and
    copy-ups leave their atimes on disk (a `strictatime` tmpfs: every access sets one). A
    symlink's is set when the daemon first reads it (readlink(2) has no O_NOATIME); stat
    on the mount still shows the one it had."""
    top = Path(tempfile.mkdtemp(prefix="pyunion-atime-", dir="/var/tmp"))
    mnt = top / "mnt"
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "strictatime,mode=0700", "tmpfs", str(top)],
        check=True,
        timeout=30,
    )
    try:
        os.chown(top, user.uid, user.gid)
        old = "@1500000000"
        script = (
            f"cd {top} && mkdir -p low/d up work mnt && echo data > low/f && echo c > low/c"
            f" && echo x > low/d/x && ln -s f low/l && touch -a -d {old} low/f low/c low/d"
            f" low/d/x low && touch -h -a -d {old} low/l"
        )
        user.run(home, "sh", "-c", script)
        py = (SYSTEM_PYTHON, "-m", "unionfs")
        opts = f"lowerdir={top}/low,upperdir={top}/up,workdir={top}/work"
        r = user.run(home, *py, "mount", "-o", opts, str(mnt))
        assert r.returncode == 0, r.stderr
        try:
            use = (
                f"cat {mnt}/f >/dev/null && ls {mnt} {mnt}/d >/dev/null && readlink {mnt}/l"
                f" && echo more >> {mnt}/c && echo y >> {mnt}/d/x && stat -c %X {mnt}/l"
            )
            r = user.run(home, "sh", "-c", use)
            assert r.returncode == 0 and r.stdout.split() == ["f", "1500000000"], r
        finally:
            user.run(home, *py, "umount", str(mnt))
            force_unmount(mnt)
        low = top / "low"
        atimes = {
            n: os.stat(low / n, follow_symlinks=False).st_atime
            for n in ("f", "c", "d", "d/x", ".", "l")
        }
        changed = sorted(n for n, t in atimes.items() if t != 1500000000)
        assert changed == ["l"], atimes
    finally:
        subprocess.run(["umount", "-l", str(top)], capture_output=True, timeout=30, check=False)
        os.rmdir(top)
