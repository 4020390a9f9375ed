"""`pyunion run` end to end: real FUSE mounts, namespaces and pivot_root into the sample image.

Every test checks afterwards that nothing is left behind: no mount under the
test's temp dir (pyunion's TMPDIR points there), no temporary upper, and no
process still carrying the test's unique layer path on its command line (the
daemon and init are forks of pyunion and keep its argv, the supervisor names it;
the janitor, a shell, holds pyunion's stderr until it is done).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import pty
import re
import resource
import select
import shutil
import signal
import stat
import struct
import subprocess
import sys
import termios
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import pytest
from support import PYUNION, fuse_skip_reason

from unionfs import cgroups

pytestmark = [
    pytest.mark.skipif(fuse_skip_reason() is not None, reason=fuse_skip_reason() or ""),
    pytest.mark.skipif(
        not os.path.exists("/bin/busybox"),
        reason="needs /bin/busybox (busybox-static; bash scripts/setup.sh)",
    ),
    pytest.mark.timeout(60),
]


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    from unionfs.sample import build_sample

    return build_sample(tmp_path_factory.mktemp("img"))


def _container_cgroups() -> set[Path]:
    """The containers' cgroups there are now (`unionfs.cgroups`), in each hierarchy."""
    out: set[Path] = set()
    for controller in ("pids", "memory", "cpu"):
        found = cgroups.hierarchy(controller)
        parent = Path(found[0]) / cgroups.PARENT if found else None
        if parent and parent.is_dir():
            out |= {p for p in parent.iterdir() if p.is_dir()}
    return out


class Env:
    """The sample image, a private TMPDIR for pyunion, and the leftover checks."""

    def __init__(self, layers: list[str], tmp: Path) -> None:
        self.layers = layers
        self.tmp = tmp
        self.env = dict(os.environ, TMPDIR=str(tmp))
        self.cgroups = _container_cgroups()
        self.started: subprocess.Popen[str] | None = None  # ended by the test (`_end`)

    def cmd(self, *opts: str, command: tuple[str, ...] = ()) -> list[str]:
        return [*PYUNION, "run", *opts, *self.layers, "--", *command]

    def run(
        self,
        *command: str,
        opts: tuple[str, ...] = (),
        input: str | None = None,
        timeout: float = 30,
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            self.cmd(*opts, command=command),
            capture_output=True,
            check=False,
            text=True,
            input=input,
            timeout=timeout,
            env=self.env,
            stdin=None if input is not None else subprocess.DEVNULL,
        )

    def run_with(
        self,
        *command: str,
        opts: tuple[str, ...] = (),
        stdin: int | IO[Any] | None = subprocess.DEVNULL,
        stdout: int | IO[Any] | None = None,
        stderr: int | IO[Any] | None = subprocess.PIPE,
    ) -> subprocess.CompletedProcess[str]:
        """`pyunion run` with the given stdio (files, FIFOs: what pyunion relays), text
        stderr when piped."""
        return subprocess.run(
            self.cmd(*opts, command=command),
            stdin=stdin,
            stdout=stdout,
            stderr=stderr,
            timeout=60,
            check=False,
            env=self.env,
            text=True,
        )

    def sh(self, script: str, *opts: str, **kw: object) -> subprocess.CompletedProcess[str]:
        return self.run("sh", "-c", script, opts=opts, **kw)  # type: ignore[arg-type]

    def popen(self, *command: str) -> subprocess.Popen[str]:
        return subprocess.Popen(
            self.cmd(command=command),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=self.env,
        )

    def leftovers(self) -> list[str]:
        out = []
        real = os.path.realpath(self.tmp)
        with open("/proc/self/mountinfo") as f:
            out += [f"mount {line.split()[4]}" for line in f if real in line.split()[4]]
        out += [f"temp {p}" for p in self.tmp.iterdir()]
        marker = self.layers[0].encode()
        for pid in os.listdir("/proc"):
            if pid.isdigit() and int(pid) != os.getpid():
                try:
                    with open(f"/proc/{pid}/cmdline", "rb") as f:
                        if marker in f.read():
                            out.append(f"process {pid}")
                except OSError:
                    pass
        # Last: the cleanup below removes them once the processes are gone.
        out += [f"cgroup {p}" for p in sorted(_container_cgroups() - self.cgroups)]
        return out

    def wait_clean(self, timeout: float = 15) -> None:
        deadline = time.monotonic() + timeout
        while self.leftovers() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert self.leftovers() == []


@pytest.fixture
def env(image: list[str], tmp_path: Path) -> Iterator[Env]:
    tmp = tmp_path / "tmpdir"
    tmp.mkdir()
    e = Env(image, tmp)
    yield e
    try:
        e.wait_clean()
    finally:  # never leave a process of ours behind, whatever the assertion said
        for item in e.leftovers():
            kind, _, what = item.partition(" ")
            if kind == "process":
                subprocess.run(["kill", "-9", what], capture_output=True, check=False)
            elif kind == "mount":
                subprocess.run(["umount", "-l", what], capture_output=True, check=False)
            elif kind == "cgroup":
                with contextlib.suppress(OSError):
                    os.rmdir(what)


def _child_of(ppid: int, timeout: float = 10) -> int:
    """The first child of `ppid` (polls /proc: the process may not exist yet)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for pid in os.listdir("/proc"):
            if not pid.isdigit():
                continue
            try:
                with open(f"/proc/{pid}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == ppid:
                return int(pid)
        time.sleep(0.02)
    raise AssertionError(f"no child of {ppid}")


# -- exit status ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    "command,code",
    [
        (("true",), 0),
        (("sh", "-c", "exit 7"), 7),
        (("/etc/passwd",), 126),  # not executable
        (("/no/such/program",), 127),
        (("sh", "-c", "kill -9 $$"), 137),
    ],
)
def test_exit_codes(env: Env, command: tuple[str, ...], code: int) -> None:
    r = env.run(*command)
    assert r.returncode == code, r.stderr


def test_pid1_is_catatonit_not_an_interpreter(env: Env) -> None:
    """pid 1 stays for the container's life: catatonit, a static binary (under 1 MiB where
    a Python pid 1 kept ~9 MiB per container), whose only program is the command."""
    r = env.sh("cat /proc/1/maps; tr '\\0' ' ' < /proc/1/cmdline")
    assert r.returncode == 0, r.stderr
    assert "catatonit -- sh -c" in r.stdout
    assert "python" not in r.stdout and ".so" not in r.stdout, r.stdout


@pytest.mark.parametrize(
    "content,inner,code,error",
    [
        (b"#!/bin/sh\necho ran\n", b"", 0, ""),
        (b"#!/x/inner\n", b"#!/bin/sh\necho ran\n", 0, ""),
        (b"#!/no/such/shell\necho ran\n", b"", 127, "No such file or directory"),
        (b"#!/x/inner\n", b"#!/no/such/shell\n", 127, "No such file or directory"),
        (b"#!/tmp\necho ran\n", b"", 126, "Permission denied"),  # a directory
        (b"echo ran\n", b"", 126, "Exec format error"),  # no #!: not run by /bin/sh
        (b"#!/x/inner\n", b"echo ran\n", 126, "Exec format error"),
        (b"\x7fELFgarbage", b"", 126, "Exec format error"),
    ],
)
def test_exit_codes_of_files(
    env: Env, tmp_path: Path, content: bytes, inner: bytes, code: int, error: str
) -> None:
    """A file that execve cannot run, directly or through its #! interpreters, is one line
    of pyunion's and 126/127, as before pid 1 was catatonit (whose glibc execvpe would
    run it with /bin/sh, or say "failed to exec pid1" and exit 1)."""
    for name, data in (("prog", content), ("inner", inner)):
        (tmp_path / name).write_bytes(data)
        (tmp_path / name).chmod(0o755)
    r = env.run("/x/prog", opts=("-v", f"{tmp_path}:/x"))
    assert r.returncode == code, r.stderr
    if error:
        assert r.stderr == f"pyunion: /x/prog: {error}\n" and r.stdout == ""
    else:
        assert r.stdout == "ran\n", r.stderr


def test_tool_errors_are_125(env: Env) -> None:
    r = subprocess.run(
        [*PYUNION, "run", "/no/such/layer", "--", "true"],
        capture_output=True,
        check=False,
        text=True,
        timeout=30,
        env=env.env,
    )
    assert r.returncode == 125 and "pyunion:" in r.stderr
    assert env.run().returncode == 125  # no command


def test_quick_containers_print_nothing(env: Env) -> None:
    """Nothing of pyunion's on stderr when all goes well, teardown included: signals
    (the daemon's SIGCHLD) may arrive at any point of it."""
    for _ in range(25):
        r = env.run("true")
        assert (r.returncode, r.stderr) == (0, "")


def test_closed_stdio(env: Env) -> None:
    """A caller that closed stdin (or stdin and stdout) gets its container all the same:
    pyunion's own pipes and sockets never land on fds 0-2."""
    for redirect in ("<&-", "<&- >&-"):
        r = subprocess.run(
            ["sh", "-c", f'"$@" {redirect}; echo "exit $?" >&2', "sh", *env.cmd(command=("true",))],
            capture_output=True,
            text=True,
            timeout=30,
            env=env.env,
            check=False,
        )
        assert r.stderr == "exit 0\n", r.stderr


def test_upper_that_cannot_be_made(env: Env, tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")  # in the test's 0700 directory: out of others' reach
    r = env.run("true", opts=("--upper", str(tmp_path / "file" / "upper")))
    assert r.returncode == 125 and r.stderr.startswith("pyunion: cannot create the upper")
    assert r.stderr.count("\n") == 1, r.stderr


# -- the writable layer -----------------------------------------------------------------------
def test_writes_vanish(env: Env) -> None:
    r = env.sh("echo data > /root/new; rm /etc/motd; ls /root /etc")
    assert r.returncode == 0, r.stderr
    assert "new" in r.stdout and "motd" not in r.stdout
    r = env.sh("ls /root /etc")
    assert "new" not in r.stdout and "motd" in r.stdout


def test_keep(env: Env) -> None:
    r = env.sh("echo data > /root/new", "--keep")
    assert r.returncode == 0, r.stderr
    m = re.search(r"kept in (\S+)", r.stderr)
    assert m, r.stderr
    upper = Path(m.group(1))
    try:
        assert (upper / "root/new").read_text() == "data\n"
    finally:
        import shutil

        shutil.rmtree(upper.parent)


def test_explicit_upper(env: Env, tmp_path: Path) -> None:
    upper = tmp_path / "upper"
    assert env.sh("echo 1 > /f", "--upper", str(upper)).returncode == 0
    assert (upper / "f").read_text() == "1\n"
    assert env.sh("cat /f", "--upper", str(upper)).stdout == "1\n"


def test_read_only(env: Env) -> None:
    r = env.sh(
        "echo x > /tmp/ok && cat /tmp/ok && echo x > /dev/shm/ok && test -d /srv && echo x > /f",
        "--read-only",
        "-w",
        "/srv",
    )
    assert r.stdout == "x\n" and r.returncode != 0 and "Read-only" in r.stderr, r.stderr
    assert r.stderr.count("\n") == 1  # no other complaint


# -- isolation ------------------------------------------------------------------------------------
def test_proc_shows_only_the_container(env: Env) -> None:
    r = env.sh("ls -d /proc/[0-9]*")
    pids = {int(p.rsplit("/", 1)[1]) for p in r.stdout.split()}
    assert 1 in pids and len(pids) <= 4 and max(pids) < 50, r.stdout


def test_ps_mount_hostname(env: Env) -> None:
    r = env.sh("ps; mount; hostname; cat /etc/hostname", "--hostname", "box")
    assert r.returncode == 0, r.stderr
    assert "PID" in r.stdout and "ps" in r.stdout
    assert "proc on /proc type proc" in r.stdout
    assert "on / type fuse.pyunion" in r.stdout
    assert "/dev/pts type devpts" in r.stdout and "sysfs on /sys type sysfs (ro" in r.stdout
    assert r.stdout.split("\n")[-3:-1] == ["box", "box"]


def test_dev_and_etc(env: Env) -> None:
    r = env.sh(
        "echo x > /dev/null && head -c 4 /dev/zero | wc -c && ls /dev && cat /etc/resolv.conf",
        "--network",
        "host",
    )
    assert r.returncode == 0, r.stderr
    for name in ("null", "zero", "full", "random", "urandom", "tty", "pts", "shm"):
        assert name in r.stdout.split()
    with open(os.path.realpath("/etc/resolv.conf")) as f:
        assert f.read() in r.stdout
    # --network none (the default): no name server to reach, the image's own file (podman)
    r = env.sh("grep -c ' /etc/' /proc/self/mountinfo")
    assert r.stdout == "2\n", r.stderr  # hosts and hostname


# -- options ---------------------------------------------------------------------------------------
def test_user_from_image(env: Env) -> None:
    r = env.sh("id -u; id -g; id -G; echo $HOME; touch /root/x", "-u", "alice")
    lines = r.stdout.split("\n")
    assert lines[:2] == ["1000", "1000"] and "100" in lines[2].split(), r.stdout
    assert lines[3] == "/home/alice"
    assert r.returncode != 0 and "Permission denied" in r.stderr
    r = env.sh("id -u; id -g", "-u", "alice:users")
    assert r.stdout.split() == ["1000", "100"]
    r = env.sh("id -u; id -g", "-u", "4321")
    assert r.stdout.split() == ["4321", "0"]


def test_user_in_too_many_groups_is_one_line(image: list[str], tmp_path: Path) -> None:
    """An image whose /etc/group puts the user in more groups than setgroups(2) takes
    was "container init failed: ValueError('too many groups')"."""
    top = tmp_path / "top"
    (top / "etc").mkdir(parents=True)
    lines = [f"g{i}:x:{10000 + i}:alice\n" for i in range(70000)]
    (top / "etc/group").write_text("users:x:100:alice\n" + "".join(lines))
    (tmp_path / "tmp").mkdir()
    env = Env([str(top), *image], tmp_path / "tmp")
    r = env.run("true", opts=("-u", "alice"))
    assert r.returncode == 125
    assert r.stderr == (
        "pyunion: user 'alice' is in 70002 groups of the image's /etc/group, "
        "more than the kernel's limit of 65536\n"
    )
    assert env.run("true", opts=("-u", "alice:users")).returncode == 0


def test_env_and_workdir(env: Env, tmp_path: Path) -> None:
    envfile = tmp_path / "envfile"
    envfile.write_text("# comment\nFROMFILE=yes\nA=file\n")
    r = env.sh(
        'echo "$A $FROMFILE $PATH"; pwd',
        "-e",
        "A=cli",
        "--env-file",
        str(envfile),
        "-w",
        "/srv",
    )
    assert r.stdout.split("\n")[:2] == [
        "cli yes /usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "/srv",
    ]
    # A -w the tree lacks is not made, as in podman (the image's WorkingDir is).
    r = env.sh("pwd", "-w", "/srv/new")
    assert (r.returncode, r.stdout) == (126, ""), r.stderr
    assert r.stderr == "pyunion: the working directory '/srv/new' does not exist\n"


@pytest.mark.parametrize(
    "data,said",
    [
        (b"A=\xff\xfe\n", "is not UTF-8 text"),
        (b"A=b\x00c\n", "'A' holds a NUL character"),
    ],
)
def test_a_bad_env_file_is_one_line(env: Env, tmp_path: Path, data: bytes, said: str) -> None:
    """Bytes that are no UTF-8 gave a UnicodeDecodeError traceback; a NUL, which execve
    cannot pass, "container init failed: ValueError('embedded null byte')"."""
    envfile = tmp_path / "envfile"
    envfile.write_bytes(data)
    r = env.run("true", opts=("--env-file", str(envfile)))
    assert r.returncode == 125 and r.stderr.count("\n") == 1 and said in r.stderr, r.stderr
    assert "Traceback" not in r.stderr


def _run_under_limit(
    env: Env, which: int, soft: int, hard: int, *command: str, opts: tuple[str, ...] = ()
) -> subprocess.CompletedProcess[str]:
    """`pyunion run [OPTS] IMAGE -- COMMAND` under the resource limit `which` (soft, hard)."""

    def limit() -> None:
        resource.setrlimit(which, (soft, hard))

    return subprocess.run(
        env.cmd(*opts, command=command),
        capture_output=True,
        text=True,
        timeout=60,
        env=env.env,
        stdin=subprocess.DEVNULL,
        preexec_fn=limit,
        check=False,
    )


def test_an_endless_env_file_is_one_line(env: Env) -> None:
    """`--env-file /dev/zero` (or a symlink to it in a project's directory) was read to
    its end: the run grew until the machine ran out of memory. Bounded here by an
    address-space limit, it was a MemoryError traceback."""
    r = _run_under_limit(
        env, resource.RLIMIT_AS, 3 << 30, 3 << 30, "true", opts=("--env-file", "/dev/zero")
    )
    assert r.returncode == 125 and r.stderr.count("\n") == 1, r.stderr[-2000:]
    assert "larger than 4 MiB" in r.stderr


def test_a_low_soft_fd_limit_is_raised_and_given_back(env: Env) -> None:
    """Under `ulimit -Sn 12` a start failed half-way with a traceback (EMFILE on one of
    its pipes or namespace fds); pyunion takes what the hard limit allows, and the
    command gets the caller's limit (the supervisor's too, past its re-exec)."""
    for script in ("ulimit -n; ulimit -Hn", "ulimit -n; ulimit -Hn; sleep 0.4"):
        r = _run_under_limit(env, resource.RLIMIT_NOFILE, 12, 4096, "sh", "-c", script)
        assert (r.returncode, r.stdout, r.stderr) == (0, "12\n4096\n", "")


def test_a_hard_fd_limit_too_low_is_one_line(env: Env) -> None:
    """`ulimit -n 12` (soft and hard): a traceback, or with a few more fds a container
    whose mount's daemon had failed; now one line before anything is set up."""
    r = _run_under_limit(env, resource.RLIMIT_NOFILE, 12, 12, "true")
    assert r.returncode == 125 and r.stderr.count("\n") == 1, r.stderr[-2000:]
    assert "open-file limit is 12" in r.stderr


def test_a_host_name_too_long_is_refused(env: Env) -> None:
    """sethostname(2) refused a name over 64 bytes, and the container silently kept the
    host's, while its /etc/hostname said the name asked for."""
    r = env.run("hostname", opts=("--hostname", "h" * 65))
    assert r.returncode == 125 and r.stderr.count("\n") == 1, r.stderr
    assert "longer than 64 bytes" in r.stderr
    r = env.run("hostname", opts=("--hostname", "h" * 64))
    assert (r.returncode, r.stdout) == (0, "h" * 64 + "\n"), r.stderr


@pytest.mark.parametrize("name", ["h\udcff", "h\n10.0.0.1 registry", "h\tx", "h x"])
def test_a_host_name_that_is_no_name_is_refused(env: Env, name: str) -> None:
    """A name of bytes that are no UTF-8 gave a UnicodeEncodeError traceback (writing
    /etc/hostname); a newline, tab or space put lines and names of the caller's text into
    the container's /etc/hosts ("127.0.1.1 h" then "10.0.0.1 registry")."""
    r = env.run("cat", "/etc/hosts", opts=("--hostname", name))
    assert r.returncode == 125 and r.stderr.count("\n") == 1, r.stderr
    assert "--hostname" in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_volume(env: Env, tmp_path: Path) -> None:
    vol = tmp_path / "vol"
    vol.mkdir()
    (vol / "in").write_text("host\n")
    r = env.sh("cat /data/in; echo container > /data/out", "-v", f"{vol}:/data")
    assert r.returncode == 0 and r.stdout == "host\n", r.stderr
    assert (vol / "out").read_text() == "container\n"
    r = env.sh("echo x > /data/ro", "-v", f"{vol}:/data:ro")
    assert r.returncode != 0 and not (vol / "ro").exists()


def test_stdin(env: Env) -> None:
    r = env.run("sh", "-c", "tr a-z A-Z", opts=("-i",), input="piped through\n")
    assert r.stdout == "PIPED THROUGH\n"
    r = env.run("cat", input="not without -i\n")
    assert r.stdout == ""


# -- signals and teardown ---------------------------------------------------------------------
def test_orphans_reaped_and_killed(env: Env) -> None:
    """pid 1 reaps orphans; children left behind die with the container, and fast."""
    r = env.sh("(sleep 0.2 &); sleep 0.8; ps -o stat,comm | grep -c '^Z' || true")
    assert r.stdout.strip() == "0", r.stdout
    start = time.monotonic()
    r = env.sh("sleep 100 & echo started")
    assert r.returncode == 0 and r.stdout == "started\n"
    assert time.monotonic() - start < 10


def test_sigterm_to_pyunion(env: Env) -> None:
    p = env.popen("sh", "-c", "echo ready; sleep 30")
    try:
        assert p.stdout is not None and p.stdout.readline() == "ready\n"
        p.send_signal(signal.SIGTERM)
        assert p.wait(timeout=15) == 128 + signal.SIGTERM
    finally:
        p.kill()
        p.communicate(timeout=15)


def test_sigterm_while_starting_ends_at_once(env: Env) -> None:
    """SIGTERM to pyunion during start-up, also between the mount and init's "go": it
    closes the detached mount it still holds, so the daemon exits at once (it waited
    5 s, then was stopped, when that fd stayed open)."""
    for delay in [0.05 + 0.01 * i for i in range(20)]:
        p = env.popen("sleep", "5")
        try:
            time.sleep(delay)
            t = time.monotonic()
            p.send_signal(signal.SIGTERM)
            p.wait(timeout=30)
            p.communicate(timeout=15)
            assert time.monotonic() - t < 2.5, f"SIGTERM after {delay:.2f} s"
        finally:
            p.kill()
        env.wait_clean()


def test_sigterm_while_nobody_reads_the_terminal(env: Env) -> None:
    """pyunion on a terminal nobody reads, the command filling it: SIGTERM still ends the
    run at once (the output it cannot write is dropped, not waited for)."""
    pid, fd = pty.fork()
    if pid == 0:
        os.environ.update(env.env)
        os.execv(PYUNION[0], [*PYUNION, "run", *env.layers, "--", "sh", "-c", "yes"])
    try:
        time.sleep(3)  # the terminal's buffer fills; we do not read it
        t = time.monotonic()
        os.kill(pid, signal.SIGTERM)
        deadline = t + 10
        status = None
        while status is None and time.monotonic() < deadline:
            done, st = os.waitpid(pid, os.WNOHANG)
            if done:
                status = st
            time.sleep(0.05)
        assert status is not None, "pyunion still runs 10 s after SIGTERM"
        assert os.waitstatus_to_exitcode(status) == 143
        pid = 0
    finally:
        if pid:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        os.close(fd)
    env.wait_clean()


def test_sigterm_while_nobody_reads_the_pipe(env: Env) -> None:
    """The same with stdout a pipe nobody reads (relayed by splice, which never blocks
    pyunion): SIGTERM ends the run at once; and all of a pipe that is read gets there."""
    r, w = os.pipe()
    try:
        p = subprocess.Popen(
            env.cmd(command=("yes",)), stdin=subprocess.DEVNULL, stdout=w, env=env.env
        )
        try:
            time.sleep(2)  # the pipe fills; we do not read it
            p.send_signal(signal.SIGTERM)
            assert p.wait(timeout=10) == 143
        finally:
            p.kill()
            p.wait()
    finally:
        os.close(r)
        os.close(w)
    script = "i=0; while [ $i -lt 20000 ]; do echo $i; i=$((i+1)); done"
    out = subprocess.run(
        env.cmd(command=("sh", "-c", script)),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        env=env.env,
        timeout=60,
        check=True,
    ).stdout
    assert out.split() == [str(i).encode() for i in range(20000)]
    env.wait_clean()


def test_output_that_cannot_be_written_is_not_swallowed(env: Env, tmp_path: Path) -> None:
    """stdout relayed by pyunion whose destination fails: the
    command's writes fail too (a reader gone: SIGPIPE, 141, at once) and a full device
    is said in one line, rather than the command running on with its output dropped."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    reader = subprocess.Popen(["sh", "-c", 'head -c 3 < "$0" > /dev/null', str(fifo)])
    try:
        with open(fifo, "wb") as w:
            t = time.monotonic()
            r = env.run_with("yes", stdout=w)
        assert r.returncode == 141 and time.monotonic() - t < 10, r.stderr
    finally:
        reader.kill()
        reader.wait()
    with open("/dev/full", "wb") as full:
        r = env.run_with("sh", "-c", "echo hi", stdout=full)
    assert "pyunion: cannot write the container's output: No space left on device" in r.stderr


def test_signals_forwarded(env: Env) -> None:
    p = env.popen(
        "sh", "-c", "trap 'echo got USR1; exit 3' USR1; echo ready; while :; do sleep 0.1; done"
    )
    try:
        assert p.stdout is not None and p.stdout.readline() == "ready\n"
        p.send_signal(signal.SIGUSR1)
        out, _ = p.communicate(timeout=15)
        assert out == "got USR1\n" and p.returncode == 3
    finally:
        p.kill()
        p.communicate(timeout=15)


def test_command_killed_from_the_host(env: Env) -> None:
    p = env.popen("sh", "-c", "echo ready; sleep 30 & wait")
    try:
        assert p.stdout is not None and p.stdout.readline() == "ready\n"
        init = _child_of_cmd(p.pid)
        command = _child_of(init)
        os.kill(command, signal.SIGKILL)
        assert p.wait(timeout=15) == 137
    finally:
        p.kill()
        p.communicate(timeout=15)


# -- the pids limit -------------------------------------------------------------------------
needs_pids = pytest.mark.skipif(
    cgroups.hierarchy("pids") is None, reason="no pids cgroup controller on this host"
)


def _print_cgroup_then_sleep() -> tuple[str, ...]:
    """A command printing its line of /proc/self/cgroup for the pids hierarchy."""
    found = cgroups.hierarchy("pids")
    assert found is not None
    pattern = "^0::" if found[1] else "^[0-9]+:pids:"
    return ("sh", "-c", f"grep -E '{pattern}' /proc/self/cgroup; sleep 30")


def _cgroup_of(line: str) -> Path:
    """The host path of the container's cgroup, the one with its limit, from its
    /proc/self/cgroup line (its processes are in a group below: `cgroups.INNER`)."""
    found = cgroups.hierarchy("pids")
    assert found is not None
    inner = Path(found[0]) / line.strip().split(":", 2)[2].lstrip("/")
    assert inner.name == cgroups.INNER, inner
    return inner.parent


@needs_pids
def test_pids_limited_by_default_like_podman(env: Env) -> None:
    """The container is in a cgroup of its own whose pids.max is podman's 2048 (before,
    a fork bomb in it filled the host's pid space); the group goes with the container."""
    p = env.popen(*_print_cgroup_then_sleep())
    try:
        assert p.stdout is not None
        group = _cgroup_of(p.stdout.readline())
        assert group.parent.name == cgroups.PARENT, group
        assert (group / "pids.max").read_text().strip() == str(cgroups.DEFAULT_PIDS_LIMIT)
        p.terminate()  # forwarded: the command ends, pyunion tears down
        assert p.wait(timeout=20) == 128 + signal.SIGTERM
    finally:
        p.kill()
        p.communicate(timeout=20)
    env.wait_clean()
    assert not group.exists()


@needs_pids
@pytest.mark.parametrize("limit,survives", [("12", False), ("-1", True)])
def test_fork_bomb_bounded(env: Env, limit: str, survives: bool) -> None:
    """--pids-limit N: the container's N+1st process is refused (busybox sh stops at its
    failed fork); -1 lifts the limit."""
    script = "i=0; while [ $i -lt 40 ]; do sleep 5 & i=$((i+1)); done; echo survived"
    r = env.run("sh", "-c", script, opts=("--pids-limit", limit))
    assert ("survived" in r.stdout) == survives, (r.stdout, r.stderr)
    if not survives:
        assert r.returncode != 0 and "fork" in r.stderr, r.stderr


def test_pids_limit_bad_value(env: Env) -> None:
    """A --pids-limit that is no number is one line, nothing started."""
    r = env.run("true", opts=("--pids-limit", "many"))
    assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr


@needs_pids
def test_pyunion_killed_removes_the_cgroup(env: Env) -> None:
    """SIGKILL to pyunion: the janitor removes the container's cgroup too."""
    p = env.popen(*_print_cgroup_then_sleep())
    try:
        assert p.stdout is not None
        group = _cgroup_of(p.stdout.readline())
        assert group.is_dir()
        _kill_and_wait_for_janitor(p)
    finally:
        p.kill()
    env.wait_clean()
    assert not group.exists()


# -- memory and CPU limits -------------------------------------------------------------------
needs_memory = pytest.mark.skipif(
    cgroups.hierarchy("memory") is None, reason="no memory cgroup controller on this host"
)
needs_cpu = pytest.mark.skipif(
    cgroups.hierarchy("cpu") is None, reason="no cpu cgroup controller on this host"
)
# busybox awk doubles a string to SIZE bytes (each step holds the old and the new one)
GROW = "awk 'BEGIN {{ s = \"x\"; while (length(s) < {size}) s = s s; print length(s) }}'"


def _group_of(controller: str, opts: tuple[str, ...], env: Env) -> tuple[Path, bool]:
    """Start a container with `opts` and the host path of its group in the hierarchy of
    `controller` (the one with the limits, above `cgroups.INNER`) while it sleeps; it is
    ended by the caller (`_end`)."""
    found = cgroups.hierarchy(controller)
    assert found is not None
    point, v2 = found
    pattern = "^0::" if v2 else f"^[0-9]+:([a-z_,]*,)?{controller}(,[a-z_,]*)?:"
    script = f"grep -E '{pattern}' /proc/self/cgroup; sleep 30"
    p = subprocess.Popen(
        env.cmd(*opts, command=("sh", "-c", script)),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env.env,
    )
    env.started = p
    assert p.stdout is not None
    line = p.stdout.readline()
    assert line, p.communicate(timeout=20)
    inner = Path(point) / line.strip().split(":", 2)[2].lstrip("/")
    assert inner.name == cgroups.INNER, inner
    return inner.parent, v2


def _end(env: Env) -> None:
    p = env.started
    if p is not None:
        p.kill()
        p.communicate(timeout=20)


@needs_memory
@pytest.mark.parametrize("size,killed", [(128 << 20, True), (4 << 20, False)])
def test_memory_limit_kills_past_it(env: Env, size: int, killed: bool) -> None:
    """--memory 32m: a command allocating past it is killed by the kernel (137, as
    podman's), one well under it runs to its end; the group goes with the container."""
    r = env.sh(GROW.format(size=size), "--memory", "32m")
    if killed:
        assert r.returncode == 137 and r.stdout == "", (r.returncode, r.stdout, r.stderr)
    else:
        assert r.returncode == 0 and r.stdout == f"{size}\n", (r.returncode, r.stderr)
    r = env.sh(GROW.format(size=size))  # no limit: the same runs
    assert r.returncode == 0 and r.stdout == f"{size}\n", (r.returncode, r.stderr)


@needs_memory
def test_memory_limits_written_as_podman(env: Env) -> None:
    """--memory, --memory-swap (memory plus swap; v2: swap alone), --memory-reservation:
    the group's files say them while the container runs, and the group goes after."""
    opts = ("--memory", "32m", "--memory-swap", "96m", "--memory-reservation", "16m")
    try:
        group, v2 = _group_of("memory", opts, env)
        if v2:
            files = {"memory.max": 32 << 20, "memory.swap.max": 64 << 20, "memory.low": 16 << 20}
        else:
            files = {
                "memory.limit_in_bytes": 32 << 20,
                "memory.memsw.limit_in_bytes": 96 << 20,
                "memory.soft_limit_in_bytes": 16 << 20,
            }
        for name, value in files.items():
            if name.startswith("memory.memsw") and not (group / name).exists():
                continue  # the kernel accounts no swap (then --memory-swap is refused)
            assert int((group / name).read_text()) == value, name
    finally:
        _end(env)
    env.wait_clean()
    assert not group.exists()


@needs_cpu
def test_cpus_written_as_podman(env: Env) -> None:
    """--cpus 0.5: a quota of 50000 us per period of 100000 (v2's cpu.max "50000 100000");
    --cpu-shares: cpu.shares (v2: crun's weight)."""
    try:
        group, v2 = _group_of("cpu", ("--cpus", "0.5", "--cpu-shares", "512"), env)
        if v2:
            assert (group / "cpu.max").read_text() == "50000 100000\n"
            assert (group / "cpu.weight").read_text() == "20\n"
        else:
            quota = (group / "cpu.cfs_quota_us").read_text()
            period = (group / "cpu.cfs_period_us").read_text()
            assert (quota, period) == ("50000\n", "100000\n")
            assert (group / "cpu.shares").read_text() == "512\n"
    finally:
        _end(env)
    env.wait_clean()
    assert not group.exists()


@needs_memory
@needs_cpu
def test_pyunion_killed_removes_every_limits_group(env: Env) -> None:
    """SIGKILL to pyunion with memory and CPU limits: the janitor removes the container's
    group in each hierarchy (v1: one a controller)."""
    opts = ("--memory", "32m", "--cpus", "0.5")
    try:
        group, _ = _group_of("memory", opts, env)
        assert env.started is not None
        cpu = Path(cgroups.hierarchy("cpu")[0]) / cgroups.PARENT / group.name  # type: ignore[index]
        assert cpu.is_dir() or cpu == group
        _kill_and_wait_for_janitor(env.started)
    finally:
        _end(env)
    env.wait_clean()
    assert not group.exists() and not cpu.exists()


@pytest.mark.parametrize(
    "opts,says",
    [
        (("--memory", "lots"), "--memory: 'lots' is no size"),
        (("--memory", "1m"), "--memory: the minimum memory limit allowed is 6MB"),
        (("--memory-swap", "64m"), "--memory-swap: needs --memory"),
        (("--memory", "64m", "--memory-swap", "32m"), "--memory-swap: must be -1 or at least"),
        (("--memory", "32m", "--memory-reservation", "64m"), "--memory-reservation: must not"),
        (("--cpus", "half"), "--cpus: 'half' is no number"),
        (("--cpus", "-1"), "--cpus: must be a number of CPUs"),
        (("--cpus", "nan"), "--cpus: must be a number of CPUs"),
        (("--cpu-shares", "1"), "--cpu-shares: must be from 2 to 262144"),
    ],
)
def test_resource_limit_bad_values(env: Env, opts: tuple[str, ...], says: str) -> None:
    """A bad memory or CPU limit is one line and 125 (podman's), nothing started."""
    r = env.run("echo", "ran", opts=opts)
    assert r.returncode == 125 and r.stdout == "", (r.returncode, r.stdout)
    assert r.stderr.count("\n") == 1 and says in r.stderr, r.stderr


def _kill_and_wait_for_janitor(p: subprocess.Popen[str]) -> None:
    """SIGKILL to pyunion; back once its janitor is done (it holds stderr until then)."""
    p.kill()
    p.wait(timeout=15)
    p.communicate(timeout=20)


def test_pyunion_killed(env: Env) -> None:
    """SIGKILL to pyunion: the janitor still unmounts, stops the daemon, removes the upper."""
    p = env.popen("sh", "-c", "echo ready; sleep 30")
    try:
        assert p.stdout is not None and p.stdout.readline() == "ready\n"
        _kill_and_wait_for_janitor(p)
    finally:
        p.kill()
    env.wait_clean()


def test_pyunion_killed_while_starting(env: Env) -> None:
    """SIGKILL to pyunion at any moment of its start-up leaves nothing behind either: the
    janitor is forked before the temporary tree is made, and told where it is."""
    for delay in [0.03 + 0.01 * i for i in range(15)] + [0.25, 0.4]:  # every phase
        p = env.popen("sleep", "5")
        try:
            time.sleep(delay)
            _kill_and_wait_for_janitor(p)
        finally:
            p.kill()
        env.wait_clean()


def _killed_when_ready(env: Env, argv: list[str], cwd: Path | None = None) -> str:
    """Start `argv` (a pyunion run whose command prints "ready"), SIGKILL pyunion once
    the container runs, wait until everything is cleaned up; pyunion's stderr."""
    p = subprocess.Popen(
        argv,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env.env,
        cwd=cwd,
    )
    try:
        assert p.stdout is not None and p.stdout.readline() == "ready\n"
        p.kill()
        p.wait(timeout=15)
        _, err = p.communicate(timeout=20)
    finally:
        p.kill()
    env.wait_clean()
    return err


def test_pyunion_killed_keeps_an_explicit_upper(env: Env, tmp_path: Path) -> None:
    """SIGKILL to pyunion run with --upper: the janitor removes the temporary tree but
    keeps the upper, with what the container wrote, and says so."""
    upper = tmp_path / "upper"
    err = _killed_when_ready(
        env,
        env.cmd("--upper", str(upper), command=("sh", "-c", "echo 1 > /f; echo ready; sleep 30")),
    )
    assert (upper / "f").read_text() == "1\n"
    assert f"the writable layer is kept in {upper}" in err


def test_janitor_imports_nothing_from_the_working_directory(env: Env, tmp_path: Path) -> None:
    """pyunion run started in a directory others can write (root in /tmp) and then
    killed: the janitor's Python, which cleans up as root, never imports a module
    planted there (a `select.py` beside the caller)."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    marker = tmp_path / "planted-ran"
    for mod in ("select", "contextlib", "socket", "termios", "tty", "argparse"):
        (cwd / f"{mod}.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    # The installed command, as users run it (`python -m` would itself import from cwd).
    command = [
        str(Path(sys.executable).parent / "pyunion"),
        *env.cmd(command=("sh", "-c", "echo ready; sleep 30"))[len(PYUNION) :],
    ]
    _killed_when_ready(env, command, cwd)
    assert not marker.exists()


def _private_kib(pid: int) -> int:
    with open(f"/proc/{pid}/smaps_rollup") as f:
        return sum(
            int(x.split()[1]) for x in f if x.startswith(("Private_Clean:", "Private_Dirty:"))
        )


def test_janitor_is_small(env: Env) -> None:
    """The janitor, which waits beside pyunion for the container's whole life, is a shell
    (under 1 MiB of its own), not a fork of pyunion's interpreter (~2.6 MiB)."""
    p = env.popen("sh", "-c", "echo ready; sleep 30")
    try:
        assert p.stdout is not None and p.stdout.readline() == "ready\n"
        init = _child_of_cmd(p.pid)
        with open(f"/proc/{p.pid}/task/{p.pid}/children") as f:
            children = {int(x) for x in f.read().split()} - {init}
        shells = [
            c for c in children if os.readlink(f"/proc/{c}/exe") == os.path.realpath("/bin/sh")
        ]
        assert len(shells) == 1, children
        assert _private_kib(shells[0]) < 1024
    finally:
        p.terminate()
        p.communicate(timeout=20)
    env.wait_clean()


def test_supervisor_decodes_paths_as_the_run_did(env: Env, tmp_path: Path) -> None:
    """The supervisor's fresh interpreter runs with -I, which ignores PYTHONUTF8: a caller
    with it in a non-UTF-8 locale had the run decode TMPDIR as UTF-8 and the supervisor
    encode it back as latin-1, and teardown silently missed the temporary tree (with the
    container's writes), the janitor told it was done."""
    if shutil.which("localedef") is None or not os.path.exists("/usr/share/i18n/locales/en_US"):
        pytest.skip("needs localedef and the locale sources (package locales)")
    locales = tmp_path / "locales"
    locales.mkdir()
    subprocess.run(
        ["localedef", "-i", "en_US", "-f", "ISO-8859-1", str(locales / "en_US.ISO-8859-1")],
        capture_output=True,
        timeout=120,
        check=False,  # a warning is exit 1 too
    )
    if not (locales / "en_US.ISO-8859-1").is_dir():
        pytest.skip("localedef made no latin-1 locale here")
    tmpdir = env.tmp / "\u00e9"  # UTF-8 c3 a9, latin-1 e9
    tmpdir.mkdir()
    try:
        r = subprocess.run(
            env.cmd(command=("sh", "-c", "echo x > /written; sleep 1; echo done")),
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
            stdin=subprocess.DEVNULL,
            env=dict(
                env.env,
                TMPDIR=str(tmpdir),
                LOCPATH=str(locales),
                LC_ALL="en_US.ISO-8859-1",
                PYTHONUTF8="1",
            ),
        )
        assert (r.returncode, r.stdout, r.stderr) == (0, "done\n", "")
        deadline = time.monotonic() + 15
        while list(tmpdir.iterdir()) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert list(tmpdir.iterdir()) == []
    finally:
        shutil.rmtree(tmpdir)
    env.wait_clean()


def test_supervisor_is_a_lean_interpreter(env: Env, tmp_path: Path) -> None:
    """Once the container runs, `pyunion run` re-executes itself into a fresh `python -I
    -S` that imports only the supervisor (`supervise.py`): ~3 MiB of its own, where the
    run process held ~9 MiB (every module of its set-up) for the container's whole life.
    Same pid (init and the janitor stay its children), in / and importing nothing from
    the caller's directory, no fd beyond supervision's (not the state's memfd); the
    signals and the exit code are the command's as before."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    marker = tmp_path / "planted-ran"
    for mod in ("select", "stat", "errno", "fcntl", "termios", "unionfs"):
        (cwd / f"{mod}.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    script = "trap 'echo term; exit 7' TERM; echo ready; while :; do sleep 0.1; done"
    p = subprocess.Popen(
        [
            str(Path(sys.executable).parent / "pyunion"),
            *env.cmd(command=("sh", "-c", script))[len(PYUNION) :],
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env.env,
        cwd=cwd,
    )
    try:
        assert p.stdout is not None and p.stdout.readline() == "ready\n"
        # The exec, then its comm back to "pyunion" once it has taken the state.
        deadline = time.monotonic() + 10
        while b"unionfs.supervise" not in Path(f"/proc/{p.pid}/cmdline").read_bytes() or (
            Path(f"/proc/{p.pid}/comm").read_text() != "pyunion\n"
        ):
            assert time.monotonic() < deadline, "the run process never became the supervisor"
            time.sleep(0.02)
        maps = Path(f"/proc/{p.pid}/maps").read_text()
        assert "_ctypes" not in maps and "libffi" not in maps  # syscalls.py: not imported
        assert _private_kib(p.pid) < 4096
        assert os.readlink(f"/proc/{p.pid}/cwd") == "/"
        fds = [os.readlink(f"/proc/{p.pid}/fd/{fd}") for fd in os.listdir(f"/proc/{p.pid}/fd")]
        assert not [fd for fd in fds if fd.startswith("/memfd:")], fds
        assert _child_of_cmd(p.pid)  # init is still its child
        p.send_signal(signal.SIGTERM)  # forwarded to the command, which traps it
        out, err = p.communicate(timeout=20)
    finally:
        p.kill()
        p.wait(timeout=20)
    assert (p.returncode, out, err) == (7, "term\n", "")
    assert not marker.exists()
    env.wait_clean()


def test_supervisor_that_cannot_import_is_one_line(env: Env, tmp_path: Path) -> None:
    """pyunion removed (or upgraded) while a container runs: the supervisor's fresh
    interpreter could not import it and printed a traceback. Now one line and 125, and
    the container and its mount still go (a copy of the package, whose exec comes after
    2 s here, is moved away once the command runs)."""
    pkg = tmp_path / "pkg"
    src = Path(__file__).resolve().parent.parent / "unionfs"
    shutil.copytree(src, pkg / "unionfs", ignore=shutil.ignore_patterns("__pycache__"))
    run_py = pkg / "unionfs" / "run.py"
    text = run_py.read_text()
    assert "\nSUPERVISOR_AFTER = 0.2\n" in text
    run_py.write_text(text.replace("\nSUPERVISOR_AFTER = 0.2\n", "\nSUPERVISOR_AFTER = 2.0\n"))
    p = subprocess.Popen(
        env.cmd(command=("sh", "-c", "echo ready; sleep 6; echo finished")),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=dict(env.env, PYTHONPATH=str(pkg)),
        cwd=tmp_path,  # not the checkout, whose unionfs `-m` would find first
    )
    try:
        assert p.stdout is not None and p.stdout.readline() == "ready\n"
        pkg.rename(tmp_path / "gone")
        out, err = p.communicate(timeout=30)
    finally:
        p.kill()
        p.wait(timeout=20)
    assert p.returncode == 125 and err.count("\n") == 1, err[-2000:]
    assert "cannot go on supervising the container" in err and out == ""
    env.wait_clean()


def test_run_process_keeps_no_image_modules(env: Env, tmp_path: Path) -> None:
    """An image run by name: the image is read in a short-lived child, so the run
    process, which lives as long as the container, never maps msgspec (nor holds the
    image modules' ~2.4 MiB); what the image says still applies."""
    from unionfs.sample import build_sample_oci

    oci = build_sample_oci(tmp_path / "sample", env.layers)
    store = str(tmp_path / "store")
    r = subprocess.run(
        [*PYUNION, "image", "import", oci, "--tag", "sample", "--store", store, "-q"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert r.returncode == 0, r.stderr
    p = subprocess.Popen(
        [*PYUNION, "run", "--store", store, "sample", "--", "sh", "-c", "echo ready; sleep 30"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env.env,
    )
    try:
        assert p.stdout is not None and p.stdout.readline() == "ready\n"
        with open(f"/proc/{p.pid}/maps") as f:
            maps = f.read()
            assert "msgspec" not in maps, [x for x in maps.splitlines() if "msgspec" in x]
    finally:
        p.terminate()
        p.communicate(timeout=20)
    r = subprocess.run(
        [*PYUNION, "run", "--store", store, "no-such-image", "--", "true"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env=env.env,
    )
    assert r.returncode == 125 and "is neither a directory nor an image" in r.stderr, r.stderr
    env.wait_clean()


def _child_of_cmd(pid: int) -> int:
    """pyunion's container init: its child that is neither the daemon nor the janitor."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        for child in os.listdir("/proc"):
            if not child.isdigit():
                continue
            try:
                with open(f"/proc/{child}/status") as f:
                    status = f.read()
            except OSError:
                continue
            if re.search(rf"^PPid:\s+{pid}$", status, re.MULTILINE) and re.search(
                r"^NSpid:\s+\d+\s+1$", status, re.MULTILINE
            ):
                return int(child)
        time.sleep(0.02)
    raise AssertionError("no container init")


# -- a terminal ---------------------------------------------------------------------------------
def _read_until(fd: int, needle: bytes, timeout: float = 15) -> bytes:
    out = b""
    deadline = time.monotonic() + timeout
    while needle not in out and time.monotonic() < deadline:
        r, _, _ = select.select([fd], [], [], 0.2)
        if r:
            try:
                data = os.read(fd, 4096)
            except OSError:
                break
            if not data:
                break
            out += data
    return out


def test_tty_session(env: Env) -> None:
    pid, fd = pty.fork()
    if pid == 0:
        os.environ.update(env.env)
        os.execv(PYUNION[0], [*PYUNION, "run", "-it", *env.layers, "--", "sh"])
    try:
        fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))
        assert b"# " in _read_until(fd, b"# ")
        os.write(fd, b"tty; echo $((6*7)); stty size; exit 3\n")
        out = _read_until(fd, b"\xff", timeout=10)  # until EOF
        assert b"/dev/pts/0" in out and b"42" in out and b"24 80" in out, out
        _, status = os.waitpid(pid, 0)
        pid = 0
        assert os.waitstatus_to_exitcode(status) == 3
    finally:
        if pid:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        os.close(fd)


# -- an image with a config ------------------------------------------------------------------------
def test_image_config(env: Env, tmp_path: Path) -> None:
    """Env, WorkingDir, User and Cmd come from the image; -u/-w/-e and a command override them."""
    from unionfs.sample import build_sample_oci

    oci = build_sample_oci(tmp_path, env.layers)
    store = tmp_path / "store"
    r = subprocess.run(
        [*PYUNION, "image", "import", "-q", "--store", str(store), "--tag", "pyunion-sample", oci],
        capture_output=True,
        check=False,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    base = [*PYUNION, "run", "--store", str(store)]
    r = subprocess.run(
        [*base, "-i", "pyunion-sample"],
        input="echo $SAMPLE; id -un; pwd\n",
        capture_output=True,
        check=False,
        text=True,
        timeout=30,
        env=env.env,
    )
    assert r.stdout.split() == ["pyunion", "alice", "/home/alice"], r.stderr
    r = subprocess.run(
        [
            *base,
            "-u",
            "root",
            "-w",
            "/srv",
            "-e",
            "SAMPLE=cli",
            "pyunion-sample",
            "--",
            "sh",
            "-c",
            "echo $SAMPLE; id -un; pwd; ls",
        ],
        capture_output=True,
        check=False,
        text=True,
        timeout=30,
        env=env.env,
        stdin=subprocess.DEVNULL,
    )
    assert r.stdout.split() == ["cli", "root", "/srv", "index.html"], r.stderr


@pytest.mark.parametrize("opts", [(), ("-it",)])
@pytest.mark.parametrize("key,code,after", [(b"\x03", 130, False), (b"\x1a", 0, True)])
def test_terminal_keys(env: Env, opts: tuple[str, ...], key: bytes, code: int, after: bool) -> None:
    """On pyunion's own terminal (or, with -t, the container's) the command is the
    foreground job: ^C reaches it once and only it; ^Z cannot leave the run hanging
    (there is no shell to resume it)."""
    pid, fd = pty.fork()
    if pid == 0:
        os.environ.update(env.env)
        command = ["sh", "-c", "echo ready; sleep 1; echo after"]
        os.execv(PYUNION[0], [*PYUNION, "run", *opts, *env.layers, "--", *command])
    try:
        out = _read_until(fd, b"ready")
        time.sleep(0.2)  # let sleep start
        os.write(fd, key)
        out += _read_until(fd, b"\xff", timeout=10)
        _, status = os.waitpid(pid, 0)
        pid = 0
        assert os.waitstatus_to_exitcode(status) == code
        assert (b"after" in out) == after, out
    finally:
        if pid:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        os.close(fd)


def test_real_debian_rootfs(env: Env, tmp_path: Path, debian_rootfs: str) -> None:
    """A real distribution under two extra layers: apt-get and python3 run, nothing remains."""
    top, mid = tmp_path / "top", tmp_path / "mid"
    (top / "etc").mkdir(parents=True)
    os.mknod(top / "etc/issue", 0o600 | stat.S_IFCHR, os.makedev(0, 0))
    (mid / "etc").mkdir(parents=True)
    (mid / "etc/.wh.issue.net").write_text("")
    env.layers = [str(top), str(mid), debian_rootfs]
    r = env.run(
        "/bin/bash",
        "-c",
        'apt-get --version && python3 -c "print(1)" && '
        "test ! -e /etc/issue && test ! -e /etc/issue.net && echo clean",
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("apt ") and r.stdout.endswith("1\nclean\n")


@pytest.mark.parametrize("opts", [(), ("-it",)])
def test_terminal_hangup(env: Env, opts: tuple[str, ...]) -> None:
    """The terminal pyunion runs on goes away: SIGHUP ends the command and the run cleans up."""
    pid, fd = pty.fork()
    if pid == 0:
        os.environ.update(env.env)
        os.execv(
            PYUNION[0],
            [*PYUNION, "run", *opts, *env.layers, "--", "sh", "-c", "echo ready; sleep 30"],
        )
    try:
        assert b"ready" in _read_until(fd, b"ready")
        os.close(fd)
        fd = -1
        _, status = os.waitpid(pid, 0)
        pid = 0
        assert os.waitstatus_to_exitcode(status) == 128 + signal.SIGHUP
    finally:
        if pid:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        if fd >= 0:
            os.close(fd)


def test_kept_upper_has_no_mount_point_placeholders(env: Env, tmp_path: Path) -> None:
    """Mount points the image lacks are created for the run, then dropped from a kept upper."""
    upper = tmp_path / "upper"
    vol = tmp_path / "vol"
    vol.mkdir()
    r = env.sh(
        "ls -d /mnt/deep/vol /etc/hosts && echo x > /root/kept",
        "--upper",
        str(upper),
        "-v",
        f"{vol}:/mnt/deep/vol",
    )
    assert r.returncode == 0, r.stderr
    assert (upper / "root/kept").exists()
    assert not (upper / "mnt").exists() and not (upper / "etc/hosts").exists()


def test_image_symlinks_never_lead_out(env: Env, tmp_path: Path) -> None:
    """Mount points behind absolute or `..` symlinks in the image resolve inside the tree."""
    victim = tmp_path / "victim"
    victim.mkdir()
    top = tmp_path / "evil"
    (top / "etc").mkdir(parents=True)
    os.symlink(str(victim / "hosts"), top / "etc/hosts")
    os.symlink("../../../../../.." + str(victim / "resolv"), top / "etc/resolv.conf")
    os.symlink(str(victim), top / "mnt")
    vol = tmp_path / "vol"
    vol.mkdir()
    env.layers = [str(top), *env.layers]
    r = env.sh("cat /etc/hosts >/dev/null && ls /mnt/v", "-v", f"{vol}:/mnt/v", "--network", "host")
    assert r.returncode == 0, r.stderr
    assert os.listdir(victim) == []


def test_janitor_told_a_path_with_a_newline(env: Env, tmp_path: Path) -> None:
    """An --upper whose name holds a newline and what looks like a line of the janitor's
    protocol ("I PID") is one path to the janitor, never a pid for it to SIGKILL as root
    once pyunion is killed; the upper is kept and the temporary tree removed as usual."""
    bystander = subprocess.Popen(["sleep", "60"])
    try:
        upper = tmp_path / f"up\nI {bystander.pid}\nD {bystander.pid}\nx\xe9"
        _killed_when_ready(
            env,
            env.cmd(
                "--upper", str(upper), command=("sh", "-c", "echo 1 > /f; echo ready; sleep 30")
            ),
        )
        assert bystander.poll() is None
        assert (upper / "f").read_text() == "1\n"
    finally:
        bystander.kill()
        bystander.wait(timeout=15)


def test_readahead_window_widened(env: Env) -> None:
    """A container's detached mount gets the daemon's readahead window too (mount.py:
    `widen_readahead`): found through its /dev/fuse, as it has no mount point on the host."""
    from unionfs.mount import READAHEAD_KB

    p = env.popen("sh", "-c", "stat -c %d /; exec sleep 20")
    try:
        assert p.stdout is not None
        dev = int(p.stdout.readline())
        bdi = Path(f"/sys/class/bdi/{os.major(dev)}:{os.minor(dev)}/read_ahead_kb")
        deadline = time.monotonic() + 5
        while int(bdi.read_text()) != READAHEAD_KB and time.monotonic() < deadline:
            time.sleep(0.02)
        assert int(bdi.read_text()) == READAHEAD_KB
    finally:
        p.kill()
        p.communicate(timeout=30)
    env.wait_clean()


# Runs as pid 1 of a pid namespace of its own, where it chooses the next pid
# (ns_last_pid): argv[1] the pyunion run command, which prints "ready".
_PID_REUSE = r"""
import os, signal, subprocess, sys, time

def parent_of(pid):
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[1])

def nested(pid):  # init: pid 1 of a pid namespace below ours
    with open(f"/proc/{pid}/status") as f:
        return any(l.startswith("NSpid:") and len(l.split()) > 2 for l in f)

p = subprocess.Popen(sys.argv[1:], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE)
assert p.stdout.readline() == b"ready\n"
kids = [int(q) for q in os.listdir("/proc") if q.isdigit() and parent_of(int(q)) == p.pid]
janitor = next(k for k in kids if open(f"/proc/{k}/cmdline", "rb").read().startswith(b"sh\0"))
init = next(k for k in kids if nested(k))
daemon = next(k for k in kids if k not in (janitor, init))
os.kill(janitor, signal.SIGSTOP)  # it acts once the container's pids are another's
p.kill()
p.wait()
os.kill(init, signal.SIGKILL)
gone, deadline = set(), time.monotonic() + 20
while gone != {init, daemon} and time.monotonic() < deadline:
    pid, _ = os.waitpid(-1, os.WNOHANG)  # orphans are ours to reap
    gone.add(pid) if pid else time.sleep(0.02)
assert gone == {init, daemon}, gone
victims = []
for pid in (init, daemon):
    with open("/proc/sys/kernel/ns_last_pid", "w") as f:
        f.write(str(pid - 1))
    victims.append(subprocess.Popen(["sleep", "60"]))
assert [v.pid for v in victims] == [init, daemon], [v.pid for v in victims]
os.kill(janitor, signal.SIGCONT)
os.waitpid(janitor, 0)
print(" ".join("alive" if v.poll() is None else "killed" for v in victims))
"""


def test_janitor_kills_no_reused_pid(env: Env) -> None:
    """SIGKILL to pyunion, then the container's init and the daemon exit and their pids go
    to other processes before the janitor acts: it signals the processes it was told of
    (pidfds of those very ones), never whatever holds their pids now (it SIGKILLed the one
    at init's pid and SIGTERMed the one at the daemon's, as root)."""
    unshare = ["unshare", "--pid", "--fork", "--mount-proc", sys.executable, "-c", _PID_REUSE]
    r = subprocess.run(
        [*unshare, *env.cmd(command=("sh", "-c", "echo ready; sleep 30"))],
        capture_output=True,
        text=True,
        env=env.env,
        timeout=50,
        check=False,
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["alive", "alive"], r.stderr
    env.wait_clean()


def test_container_root_without_cap_fsetid_loses_setuid_on_o_trunc(env: Env) -> None:
    """Root in the container keeps set-ID bits on a truncation only with CAP_FSETID, as
    under podman and kernel overlayfs: uid 0 alone must not keep them (the daemon
    truncates for `open(O_TRUNC)` itself, as root)."""
    script = (
        "for n in t a; do echo hi > /$n; chmod 4777 /$n; done; "
        ": > /t; echo x >> /a; stat -c '%n %a' /t /a"
    )
    kept = env.sh(script)
    assert kept.returncode == 0, kept.stderr
    assert kept.stdout.split() == ["/t", "4777", "/a", "4777"]
    dropped = env.sh(script, "--cap-drop", "fsetid")
    assert dropped.returncode == 0, dropped.stderr
    assert dropped.stdout.split() == ["/t", "777", "/a", "777"]
