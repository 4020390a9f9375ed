"""The fork server (forkserver.py): daemons forked from it serve real mounts, in the
caller's mount namespace; one daemon's death touches no other mount; the server is
found only in the caller's private state dir, and mounts work without it."""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import signal
import socket
import struct
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from support import (
    PYUNION,
    force_unmount,
    is_mounted,
    mounted,
    needs_fuse,
    pyunion,
    wait_gone,
    wait_until,
)

from unionfs import forkserver
from unionfs.mount import daemon_pid, process_alive

pytestmark = [needs_fuse, pytest.mark.timeout(120)]


def _cmdline(pid: int) -> bytes:
    return Path(f"/proc/{pid}/cmdline").read_bytes()


def _server_pid(state: Path) -> int | None:
    """The pid of the server listening in `state`, if one does."""
    for sock in state.glob("forkserver-*.sock"):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            s.connect(str(sock))
            creds = s.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
            return int(struct.unpack("3i", creds)[0])
        except OSError:
            continue
        finally:
            s.close()
    return None


@pytest.fixture
def state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A state dir of this test's own; the server it gets is stopped (its socket removed)."""
    d = tmp_path / "state"
    d.mkdir(mode=0o700)
    monkeypatch.setenv("PYUNION_STATE_DIR", str(d))
    monkeypatch.setenv("PYUNION_FORKSERVER", "1")
    yield d
    pid = _server_pid(d)
    for sock in d.glob("forkserver-*.sock"):
        sock.unlink()  # the server sees its socket gone and exits within a second
    if pid is not None:
        assert wait_gone(pid, 10), "the fork server did not exit when its socket went"


def _layers(tmp_path: Path) -> tuple[Path, Path, Path]:
    low, up, work = tmp_path / "low", tmp_path / "up", tmp_path / "work"
    for d in (low, up, work):
        d.mkdir(parents=True)
    (low / "f").write_text("lower\n")
    return low, up, work


@pytest.mark.mount
def test_second_mount_is_forked_by_the_server_and_crashes_stay_apart(
    tmp_path: Path, state: Path
) -> None:
    a, b, c = (_layers(tmp_path / n) for n in ("a", "b", "c"))
    with mounted([a[0]], tmp_path / "ma", a[1], a[2]) as ma:
        direct = daemon_pid(str(ma))
        assert direct is not None and b"mount" in _cmdline(direct)  # no server yet: forked here
        wait_until(lambda: _server_pid(state) is not None, 30, "the fork server to start")
        server = _server_pid(state)
        assert server is not None
        with (
            mounted([b[0]], tmp_path / "mb", b[1], b[2]) as mb,
            mounted([c[0]], tmp_path / "mc", c[1], c[2]) as mc,
        ):
            pb, pc = daemon_pid(str(mb)), daemon_pid(str(mc))
            assert pb is not None and pc is not None
            for pid in (pb, pc):
                assert b"server_main" in _cmdline(pid)  # forked by the server
                assert os.readlink(f"/proc/{pid}/cwd") == "/"
                # in the caller's mount namespace and cgroups, as a directly forked one
                assert os.readlink(f"/proc/{pid}/ns/mnt") == os.readlink("/proc/self/ns/mnt")
                assert (
                    Path(f"/proc/{pid}/cgroup").read_text() == Path("/proc/self/cgroup").read_text()
                )
            (mb / "new").write_text("b\n")
            assert (b[1] / "new").read_text() == "b\n"
            assert (mc / "f").read_text() == "lower\n"
            # One daemon dies: its mount breaks, no other one, nor the server.
            os.kill(pb, signal.SIGKILL)
            assert wait_gone(pb, 10)
            with pytest.raises(OSError):
                (mb / "f").read_text()
            assert (mc / "f").read_text() == "lower\n"
            assert (ma / "f").read_text() == "lower\n"
            assert _server_pid(state) == server
            force_unmount(mb)
        # The server's socket is the user's own, in the private state dir.
        sock = next(state.glob("forkserver-*.sock"))
        st = sock.lstat()
        assert st.st_uid == os.geteuid() and not st.st_mode & 0o077


def _v1_hierarchy(controller: str) -> tuple[Path, str] | None:
    """(mount of the cgroup v1 hierarchy `controller`, this process's cgroup in it)."""
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        base = Path("/sys/fs/cgroup") / controller
        if controller in controllers.split(",") and (base / "cgroup.procs").exists():
            return base, path
    return None


@pytest.mark.mount
def test_a_daemon_from_the_server_joins_the_callers_cgroups_where_they_differ(
    tmp_path: Path, state: Path
) -> None:
    """A caller in another cgroup of one hierarchy: its daemon is moved there, and stays
    where it is in the hierarchies the caller shares with the server (those are not
    written: a move costs an RCU grace period even into the cgroup one is in)."""
    found = _v1_hierarchy("pids")
    if found is None:
        pytest.skip("no cgroup v1 pids hierarchy here")
    base, mine = found
    cg = base / mine.lstrip("/") / f"pyunion-test-{os.getpid()}"
    a, b = _layers(tmp_path / "a"), _layers(tmp_path / "b")
    cg.mkdir()
    try:
        with mounted([a[0]], tmp_path / "ma", a[1], a[2]):
            wait_until(lambda: _server_pid(state) is not None, 30, "the fork server to start")
            mb = tmp_path / "mb"
            mb.mkdir()
            # The caller moves itself into `cg`, then runs `pyunion mount`.
            r = subprocess.run(
                [
                    "sh",
                    "-c",
                    'echo 0 > "$0" && exec "$@"',
                    str(cg / "cgroup.procs"),
                    *PYUNION,
                    "mount",
                    "-o",
                    f"lowerdir={b[0]},upperdir={b[1]},workdir={b[2]}",
                    str(mb),
                ],
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
            )
            try:
                assert r.returncode == 0, r.stderr
                pid = daemon_pid(str(mb))
                assert pid is not None and b"server_main" in _cmdline(pid)
                want = []
                for line in Path("/proc/self/cgroup").read_text().splitlines():
                    num, controllers, path = line.split(":", 2)
                    if "pids" in controllers.split(","):
                        path = f"/{cg.relative_to(base)}"
                    want.append(f"{num}:{controllers}:{path}")
                assert Path(f"/proc/{pid}/cgroup").read_text().splitlines() == want
                assert (mb / "f").read_text() == "lower\n"
            finally:
                pyunion("umount", str(mb), check=False)
                force_unmount(mb)
    finally:
        wait_until(lambda: not (cg / "cgroup.procs").read_text().strip(), 20, "the daemon to go")
        cg.rmdir()


@pytest.mark.mount
def test_the_caller_of_a_mount_the_server_forks_loads_no_module_it_does_not_use(
    tmp_path: Path, state: Path
) -> None:
    """Its process parses, checks and sends the request: `typing`, `socket` (over
    `_socket`) and `shutil` (argparse's, for the terminal's width) were ~5 ms of each
    such mount's ~45 (README: Start-up)."""
    low, up, work = _layers(tmp_path)
    with mounted([low], tmp_path / "first", up, work):  # starts the server
        wait_until(lambda: _server_pid(state) is not None, 30, "the fork server to start")
    mnt = tmp_path / "m"
    mnt.mkdir()
    code = (
        "import sys, types; from unionfs import cli; "
        f"code = cli.main(['mount', '--upper', '{up}', '--work', '{work}', '{low}', '{mnt}']); "
        "loaded = [m for m in ('typing', 'socket', 'shutil', 'logging', 'inspect') "
        "if type(sys.modules.get(m)) is types.ModuleType]; "
        "print(code, ' '.join(loaded))"
    )
    try:
        r = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
        )
        assert r.stdout.split() == ["0"], r.stderr
        pid = daemon_pid(str(mnt))
        assert pid is not None and b"server_main" in _cmdline(pid)  # the server's
        assert (mnt / "f").read_text() == "lower\n"
        pyunion("umount", str(mnt))
    finally:
        force_unmount(mnt)


@pytest.mark.mount
def test_mounts_work_with_the_server_turned_off(tmp_path: Path, state: Path) -> None:
    """Off by default (opt-in), and with PYUNION_FORKSERVER=0."""
    low, up, work = _layers(tmp_path)
    env = {k: v for k, v in os.environ.items() if k != "PYUNION_FORKSERVER"}
    for n in range(4):
        if n == 2:
            env["PYUNION_FORKSERVER"] = "0"
        with mounted([low], tmp_path / f"m{n}", up, work, env=env) as m:
            pid = daemon_pid(str(m))
            assert pid is not None and b"mount" in _cmdline(pid)
            assert (m / "f").read_text() == "lower\n"
    assert not list(state.glob("forkserver-*"))


@pytest.mark.mount
def test_a_stale_socket_is_replaced(tmp_path: Path, state: Path) -> None:
    """A socket nobody listens on (a server killed): the mount forks directly, a new
    server takes the name, and the next mount goes through it."""
    name = forkserver._names()[0]
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    s.bind(str(state / name))
    s.close()  # bound, never listening: connect() is refused
    low, up, work = _layers(tmp_path)
    with mounted([low], tmp_path / "m0", up, work) as m:
        assert (m / "f").read_text() == "lower\n"
    wait_until(lambda: _server_pid(state) is not None, 30, "the fork server to start")
    with mounted([low], tmp_path / "m1", up, work) as m:
        pid = daemon_pid(str(m))
        assert pid is not None and b"server_main" in _cmdline(pid)
    with contextlib.suppress(OSError):
        assert not is_mounted(tmp_path / "m1")
    r = pyunion("--version")
    assert r.returncode == 0


@pytest.mark.mount
def test_a_server_started_by_run_lives_outside_its_private_namespace(
    tmp_path: Path, state: Path, debian_rootfs: str
) -> None:
    """`run` mounts in a private copy of the mount namespace; a server started there
    would pin every mount of that copy (another mount's FUSE connection among them)."""
    r = pyunion("run", debian_rootfs, "--", "true", timeout=120)
    assert r.returncode == 0
    wait_until(lambda: _server_pid(state) is not None, 30, "the fork server to start")
    server = _server_pid(state)
    assert server is not None
    assert os.readlink(f"/proc/{server}/ns/mnt") == os.readlink("/proc/self/ns/mnt")
    # and the next run's daemon comes from it, in that run's private namespace
    low, up, work = _layers(tmp_path)
    with mounted([low], tmp_path / "m", up, work) as m:
        pid = daemon_pid(str(m))
        assert pid is not None and b"server_main" in _cmdline(pid)


@pytest.mark.mount
def test_a_more_confined_caller_gets_its_daemon_forked_directly(
    tmp_path: Path, state: Path
) -> None:
    """Root with fewer capabilities or no_new_privs must not get a daemon from a server
    that holds more: its daemon is forked directly and keeps the caller's bounds."""
    a, b = _layers(tmp_path / "a"), _layers(tmp_path / "b")
    with mounted([a[0]], tmp_path / "ma", a[1], a[2]):
        wait_until(lambda: _server_pid(state) is not None, 30, "the fork server to start")
        d = tmp_path / "mb"
        d.mkdir()
        opts = f"lowerdir={b[0]},upperdir={b[1]},workdir={b[2]}"
        confined = ["setpriv", "--no-new-privs", "--bounding-set", "-sys_ptrace"]
        r = subprocess.run(
            [*confined, *PYUNION, "mount", "-o", opts, str(d)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        try:
            assert r.returncode == 0, r.stderr
            pid = daemon_pid(str(d))
            assert pid is not None and b"server_main" not in _cmdline(pid)
            status = Path(f"/proc/{pid}/status").read_text()
            assert "NoNewPrivs:\t1" in status
            assert (d / "f").read_text() == "lower\n"
        finally:
            pyunion("umount", str(d), check=False)
            force_unmount(d)


# A client of the server's own making, as an attacker writes it: `spawn` with a mount
# request, printing the reply (the daemon's pid, or None) and what the daemon reported.
_CLIENT = """
import os, sys
from unionfs import forkserver
from unionfs.options import MountConfig
low, up, work, mp, state = sys.argv[1:6]
cfg = MountConfig(lowers=[low], mountpoint=mp, upper=up, work=work)
r, w = os.pipe()
sfd = os.open(state, os.O_RDONLY | os.O_DIRECTORY)
mfd = os.open(mp, os.O_RDONLY | os.O_DIRECTORY)
pid = forkserver.spawn(cfg, w, sfd, mfd)
os.close(w)
print(pid, os.read(r, 4096).decode(errors="replace") if pid else "")
"""


@pytest.mark.mount
def test_a_root_of_another_user_namespace_gets_no_daemon_from_the_server(
    tmp_path: Path, state: Path
) -> None:
    """Root of a user namespace that maps 0 onto 0 (systemd's `PrivateUsers=`, `unshare
    -Ur`) shows every capability in its status, but holds none on the host: it cannot
    mount there. The server compared only the status, so it forked such a caller a
    daemon with the host's capabilities, which mounted in the host's namespace."""
    a, b = _layers(tmp_path / "a"), _layers(tmp_path / "b")
    d = tmp_path / "mb"
    d.mkdir()
    with mounted([a[0]], tmp_path / "ma", a[1], a[2]):
        wait_until(lambda: _server_pid(state) is not None, 30, "the fork server to start")
        try:
            r = subprocess.run(
                [
                    *("unshare", "--user", "--map-root-user", sys.executable, "-c", _CLIENT),
                    *(str(p) for p in (*b, d, state)),
                ],
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
            )
            assert r.returncode == 0, r.stderr
            assert r.stdout.split()[0] == "None", f"the server forked a daemon: {r.stdout}"
            assert not is_mounted(d)
        finally:
            force_unmount(d)


def _send_request(state: Path, payload: bytes, fds: list[int]) -> None:
    """Send the fork server of `state` a request of our own making with `fds` (closed
    afterwards, whatever happens), and wait for its answer, if any."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        s.settimeout(30)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 21)  # a 300 KB request too
        s.connect(str(state / forkserver._names()[0]))
        socket.send_fds(s, [payload], fds)
        with contextlib.suppress(OSError):
            s.recv(64)
    finally:
        s.close()
        for fd in fds:
            os.close(fd)


class _Run:
    """What a request must never be: a callable the server calls while decoding it."""

    def __init__(self, argv: list[str]) -> None:
        self.argv = argv

    def __reduce__(self) -> tuple[object, tuple[list[str]]]:
        return subprocess.call, (self.argv,)


@pytest.mark.mount
def test_a_request_is_a_mount_never_code_the_server_runs(tmp_path: Path, state: Path) -> None:
    """The server cannot see every bound of a caller (a Landlock domain): with the
    request decoded by `pickle.loads`, a caller that passed the checks ran code of its
    choice in the unconfined server. Now the request is refused and the server goes on."""
    a, b = _layers(tmp_path / "a"), _layers(tmp_path / "b")
    mark = tmp_path / "ran-in-the-server"
    with mounted([a[0]], tmp_path / "ma", a[1], a[2]):
        wait_until(lambda: _server_pid(state) is not None, 30, "the fork server to start")
        server = _server_pid(state)
        fds = [os.open("/proc/self/ns/mnt", os.O_RDONLY), *os.pipe(), os.open(state, os.O_RDONLY)]
        _send_request(state, pickle.dumps((_Run(["touch", str(mark)]), {})), fds)
        assert not mark.exists(), "the request ran code in the fork server"
        assert _server_pid(state) == server
        with mounted([b[0]], tmp_path / "mb", b[1], b[2]) as mb:  # and it still serves
            pid = daemon_pid(str(mb))
            assert pid is not None and b"server_main" in _cmdline(pid)


# A dict whose key is a tuple nested 300,000 deep: 300 KB of opcodes (TUPLE1 each) that
# the restricted decoder takes, and whose hash recurses in C without a bound.
_NESTED_KEY = b"\x80\x04}N" + b"\x85" * 300_000 + b"Ns."


@pytest.mark.mount
def test_a_request_that_crashes_its_decoder_leaves_the_server_alive(
    tmp_path: Path, state: Path
) -> None:
    """The server decoded each request itself: a caller that passed its checks sent 300 KB
    of pickle opcodes (a deeply nested tuple as a dict key) and the server died of SIGSEGV
    while decoding it, for every later caller. Now the process forked for the request
    decodes it, and only that process can die of it."""
    a, b = _layers(tmp_path / "a"), _layers(tmp_path / "b")
    (tmp_path / "mp").mkdir()
    with mounted([a[0]], tmp_path / "ma", a[1], a[2]):
        wait_until(lambda: _server_pid(state) is not None, 30, "the fork server to start")
        server = _server_pid(state)
        ready_r, ready_w = os.pipe()
        fds = [
            os.open("/proc/self/ns/mnt", os.O_RDONLY),
            ready_w,
            os.open(state, os.O_RDONLY),
            os.open(tmp_path / "mp", os.O_RDONLY),
        ]
        _send_request(state, _NESTED_KEY, fds)
        try:  # whoever decoded it is gone: the pipe's last writer
            os.set_blocking(ready_r, False)
            wait_until(lambda: _drained(ready_r), 30, "the decoder to end")
        finally:
            os.close(ready_r)
        # The server takes one request at a time: the next mount's is served after it.
        with mounted([b[0]], tmp_path / "mb", b[1], b[2]) as mb:
            pid = daemon_pid(str(mb))
            assert pid is not None and b"server_main" in _cmdline(pid), "not the server's"
            assert (mb / "f").read_text() == "lower\n"
        assert _server_pid(state) == server and process_alive(server)


def _drained(fd: int) -> bool:
    """Whether the pipe `fd` reads from is at its end (every writer gone)."""
    try:
        while os.read(fd, 4096):
            pass
    except BlockingIOError:
        return False
    return True


@pytest.mark.mount
def test_the_first_callers_working_directory_is_not_on_the_servers_path(
    tmp_path: Path, state: Path
) -> None:
    """`python -m unionfs` puts its working directory first on sys.path; the server
    took the sys.path of the mount that started it, and forks every later caller's
    daemon with it: a module a daemon imports late, planted there (/tmp), would run in
    the daemons of callers who never went there."""
    a = _layers(tmp_path / "a")
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    mnt = tmp_path / "ma"
    mnt.mkdir()
    opts = f"lowerdir={a[0]},upperdir={a[1]},workdir={a[2]}"
    r = subprocess.run(
        [*PYUNION, "mount", "-o", opts, str(mnt)],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    try:
        assert r.returncode == 0, r.stderr
        wait_until(lambda: _server_pid(state) is not None, 30, "the fork server to start")
        server = _server_pid(state)
        assert server is not None
        argv = _cmdline(server).split(b"\0")
        path = json.loads(argv[argv.index(b"-c") + 2])
        assert str(cwd) not in path, path
        assert os.path.dirname(os.path.dirname(forkserver.__file__)) == path[0]
    finally:
        pyunion("umount", str(mnt), check=False)
        force_unmount(mnt)


# A server of an attacker's making: root of a user namespace mapping 0 onto 0 (no
# capability on the host), listening under the server's name, writing down the fds a
# client hands it and saying the mount is live.
_FAKE_SERVER = """
import os, socket, struct, sys
path, mark = sys.argv[1:3]
if os.path.lexists(path):
    os.unlink(path)
s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
s.bind(path)
s.listen(1)
print("listening", flush=True)
c, _ = s.accept()
c.settimeout(20)
try:
    msg, fds, _, _ = socket.recv_fds(c, 1 << 20, 8)
except OSError:
    fds = []
if fds:
    with open(mark, "w") as f:
        f.write(" ".join(os.readlink(f"/proc/self/fd/{fd}") for fd in fds))
    os.write(fds[1], b"OK")
    c.sendall(struct.pack("=i", os.getpid()))
"""


@pytest.mark.mount
def test_a_client_hands_nothing_to_a_server_bound_more_tightly_than_itself(
    tmp_path: Path, state: Path
) -> None:
    """The client checked only the server's uid: root of a user namespace (or any root
    with fewer capabilities) that bound the server's name in the root-owned state dir got
    the caller's mount point, mount namespace and state dir fds (for `run`: /dev/fuse of
    the container's root, which it could then serve), and made `pyunion mount` say the
    mount was live with nothing mounted."""
    low, up, work = _layers(tmp_path)
    mark = tmp_path / "handed-over"
    sock = state / forkserver._names()[0]
    fake = subprocess.Popen(
        ["unshare", "--user", "--map-root-user", sys.executable, "-c", _FAKE_SERVER, sock, mark],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert fake.stdout is not None and fake.stdout.readline() == "listening\n"
        with mounted([low], tmp_path / "m", up, work) as m:
            assert (m / "f").read_text() == "lower\n"
            pid = daemon_pid(str(m))
            assert pid is not None and pid != fake.pid
        assert not mark.exists(), f"handed to the fake server: {mark.read_text()}"
    finally:
        fake.kill()
        fake.wait(10)
