"""`pyunion run` as a container boundary, with podman as the reference.

Each escape found in the security review is tried by a hostile program in an
image (`helpers/hostile.c`, built with gcc -static into a test layer) or by
the shell, and must fail; where it is safe, the same attack is shown to work
once the confinement is turned off, so that each test can fail. Capabilities,
seccomp results, masked paths and fds are compared with what podman (Debian's,
with runc) gives on the same root filesystem.
"""

from __future__ import annotations

import ctypes
import json
import os
import pty
import re
import resource
import shlex
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from support import host_listeners, needs_busybox, needs_fuse, run_child
from test_run import Env, _read_until, needs_pids

from unionfs import cgroups, seccomp

pytestmark = [needs_fuse, needs_busybox, pytest.mark.timeout(120)]

HELPER = Path(__file__).parent / "helpers" / "hostile.c"
STATUS = "grep -E '^(Cap|NoNewPrivs|Seccomp:)' /proc/self/status"
EPERM, ENOSYS = 1, 38
CLONE_NEWIPC = 0x08000000


@pytest.fixture(scope="module")
def rootfs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The sample image's base layer plus the hostile programs, as one directory."""
    from unionfs.sample import build_sample

    layers = build_sample(tmp_path_factory.mktemp("img"))
    root = tmp_path_factory.mktemp("rootfs") / "root"
    shutil.copytree(layers[-1], root, symlinks=True)
    bindir = root / "usr/local/bin"
    bindir.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        ["gcc", "-static", "-O1", "-o", str(bindir / "hostile"), str(HELPER)],
        check=True,
        timeout=120,
    )
    shutil.copy2(bindir / "hostile", bindir / "suid-status")
    os.chmod(bindir / "suid-status", 0o4755)
    # A group root and alice are members of (supplementary groups), and a directory
    # with content of its own where a --tmpfs goes (podman copies it up).
    with open(root / "etc/group", "a") as f:
        f.write("wheel:x:10:root,alice\n")
    (root / "srv/data").mkdir(parents=True)
    (root / "srv/data/f").write_text("data\n")
    os.symlink("f", root / "srv/data/link")
    os.chown(root / "srv/data/f", 1000, 1000)
    os.chmod(root / "srv/data", 0o750)
    return root


@pytest.fixture
def env(rootfs: Path, tmp_path: Path) -> Iterator[Env]:
    tmp = tmp_path / "tmpdir"
    tmp.mkdir()
    e = Env([str(rootfs)], tmp)
    yield e
    try:
        e.wait_clean()
    finally:
        for item in e.leftovers():
            kind, _, what = item.partition(" ")
            if kind == "process":
                subprocess.run(["kill", "-9", what], capture_output=True, check=False)
            elif kind == "mount":
                subprocess.run(["umount", "-l", what], capture_output=True, check=False)


class Podman:
    """podman run --rootfs on a copy of the same tree, with its own storage (vfs, no mounts
    left behind) and runc (Debian's crun refuses hybrid cgroups)."""

    def __init__(self, root: Path, state: Path) -> None:
        self.root, self.state = root, state

    def cmd(self, *opts: str, command: tuple[str, ...], root: Path | None = None) -> list[str]:
        """The podman command line (`root`: another tree than the image's)."""
        return [
            "podman",
            "--root",
            str(self.state / "root"),
            "--runroot",
            str(self.state / "run"),
            "--storage-driver",
            "vfs",
            "--runtime",
            "runc",
            "--cgroup-manager",
            "cgroupfs",
            "--events-backend",
            "none",
            "run",
            "--rm",
            *(() if "--network" in opts else ("--network", "host")),
            "--ulimit",
            "nofile=1024:1024",
            "--ulimit",
            "nproc=1000:1000",
            *opts,
            "--rootfs",
            str(root or self.root),
            *command,
        ]

    def run(
        self, *opts: str, command: tuple[str, ...], fds: str = "", ok: bool = True
    ) -> subprocess.CompletedProcess[str]:
        """podman's run; with `ok` it must have started the command."""
        r = subprocess.run(
            [*_with_fds(fds), *self.cmd(*opts, command=command)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
            stdin=subprocess.DEVNULL,
            cwd=self.state,  # conmon writes an "oom" file in its working directory
        )
        assert not ok or "Error:" not in r.stderr, r.stderr
        return r

    def sh(self, script: str, *opts: str) -> subprocess.CompletedProcess[str]:
        return self.run(*opts, command=("sh", "-c", script))

    def podman(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """podman ARGS on the same storage, its output as text."""
        base = self.cmd(command=())
        return subprocess.run(
            [*base[: base.index("run")], *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            stdin=subprocess.DEVNULL,
        )

    def run_image(
        self, image: str, *opts: str, command: tuple[str, ...] = ()
    ) -> subprocess.CompletedProcess[str]:
        """podman run of an image it loaded (not --rootfs), with this class' options."""
        argv = self.cmd(*opts, command=command)
        i = argv.index("--rootfs")
        return self.podman(*argv[argv.index("run") : i], image, *argv[i + 2 :])


@pytest.fixture(scope="module")
def podman(rootfs: Path, tmp_path_factory: pytest.TempPathFactory) -> Podman:
    assert shutil.which("podman") and shutil.which("runc"), (
        "podman and runc are the reference here: bash scripts/setup.sh installs them"
    )
    base = tmp_path_factory.mktemp("podman")
    root = base / "root"
    subprocess.run(["cp", "-a", str(rootfs), str(root)], check=True, timeout=60)  # owners too
    (base / "state").mkdir()
    return Podman(root, base / "state")


def _with_fds(redirections: str) -> list[str]:
    """A prefix that runs a command with extra fds opened by bash (`7</`, `3>FILE`), so that
    the test process's own fds stay as they are."""
    return ["bash", "-c", f'exec {redirections}; exec "$@"', "bash"] if redirections else []


def _syscalls(out: str) -> dict[str, int]:
    return {name: int(err) for name, err in (line.split() for line in out.splitlines())}


# -- capabilities ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "opts",
    [
        (),
        ("-u", "1000"),
        ("--cap-add", "SYS_ADMIN"),
        ("--cap-add", "all"),
        ("--cap-drop", "ALL"),
        ("--cap-drop", "ALL", "--cap-add", "chown,CAP_KILL"),
        ("--cap-drop", "setuid", "-u", "1000:100"),
        ("--privileged",),
        ("--security-opt", "no-new-privileges"),
        ("--security-opt", "seccomp=unconfined"),
    ],
)
def test_capabilities_as_podman(env: Env, podman: Podman, opts: tuple[str, ...]) -> None:
    """CapInh/Prm/Eff/Bnd/Amb, NoNewPrivs and the seccomp mode equal podman's."""
    ours = env.sh(STATUS, *opts)
    assert ours.returncode == 0, ours.stderr
    assert ours.stdout == podman.sh(STATUS, *opts).stdout
    assert "CapEff" in ours.stdout


def test_default_capabilities_are_containers_conf(env: Env) -> None:
    """The bounding set is containers.conf's default_capabilities, read from the file."""
    from unionfs import caps

    with open("/usr/share/containers/containers.conf", "rb") as f:
        names = tomllib.load(f)["containers"]["default_capabilities"]
    want = caps.mask({caps.NUMBERS[n.removeprefix("CAP_")] for n in names})
    assert caps.mask(caps.DEFAULT) == want
    r = env.sh(STATUS)
    fields = dict(line.split(":\t") for line in r.stdout.splitlines())
    assert int(fields["CapBnd"], 16) == int(fields["CapEff"], 16) == want
    assert int(fields["CapInh"], 16) == int(fields["CapAmb"], 16) == 0


@pytest.mark.parametrize("opts", [(), ("--security-opt", "no-new-privileges")])
def test_setuid_program_as_podman(env: Env, podman: Podman, opts: tuple[str, ...]) -> None:
    """A setuid-root program run by a user gets root and the bounding set, as in podman;
    no-new-privileges turns that off."""
    ours = env.run("suid-status", opts=("-u", "1000", *opts))
    assert ours.returncode == 0, ours.stderr
    assert ours.stdout == podman.run("-u", "1000", *opts, command=("suid-status",)).stdout
    assert ours.stdout.startswith("euid=1000" if opts else "euid=0\nCapEff:\t00000000800405fb")


@pytest.mark.parametrize("opts", [(), ("--cap-add", "SYS_PTRACE"), ("-u", "1000")])
def test_init_has_no_more_than_the_command(env: Env, opts: tuple[str, ...]) -> None:
    """pid 1 (catatonit, which stays to reap and forward signals) has the command's user,
    capabilities, seccomp filter and environment: taking it over (ptrace) would gain
    nothing, and nothing of the host's environment is in it."""
    fields = "^(Uid|Gid|CapEff|CapPrm|CapBnd|NoNewPrivs|Seccomp):"
    r = env.sh(
        f"grep -E '{fields}' /proc/self/status > /tmp/self; "
        f"grep -E '{fields}' /proc/1/status | diff - /tmp/self && "
        "tr '\\0' '\\n' < /proc/1/environ | cut -d= -f1 | sort",
        *opts,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.split() == ["HOME", "HOSTNAME", "PATH", "TERM"]


def test_pid1_is_not_the_hosts_file(env: Env) -> None:
    """pid 1 is dumpable and as privileged as the command, so root in the container can
    open /proc/1/exe. Were it the host's catatonit, a chmod through it would make a
    setuid-root binary on the host; it is a sealed in-memory copy, which nothing can
    write. (Only looked at, never changed: a regression must not touch the host.)"""
    from unionfs.sandbox import find_init

    init = find_init()
    assert init is not None
    host = os.stat(init)
    r = env.sh(
        "readlink /proc/1/exe; stat -L -c '%d:%i' /proc/1/exe; "
        "if echo x >> /proc/1/exe; then echo written; fi"
    )
    link, ident = r.stdout.splitlines()[:2]
    assert link.startswith("/memfd:catatonit"), r.stdout
    assert ident != f"{host.st_dev}:{host.st_ino}", r.stdout
    assert "written" not in r.stdout


def test_pid1_without_executable_memfds(env: Env) -> None:
    """vm.memfd_noexec=2 (a hardened host) forbids executable memfds: pid 1 is then an
    unnamed, unlinkable copy in pyunion's private directory, still no host file and
    still not writable. The sysctl is set in a pid namespace of the test's own."""
    from unionfs.sandbox import find_init

    init = find_init()
    assert init is not None
    host = os.stat(init)
    script = (
        "readlink /proc/1/exe; stat -L -c '%d:%i' /proc/1/exe; "
        "if echo x >> /proc/1/exe; then echo written; fi"
    )
    inner = " ".join(shlex.quote(a) for a in env.cmd(command=("sh", "-c", script)))
    r = subprocess.run(
        [
            "unshare",
            "-p",
            "-f",
            "--mount-proc",
            "sh",
            "-c",
            f"echo 2 > /proc/sys/vm/memfd_noexec && exec {inner}",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        stdin=subprocess.DEVNULL,
        env=env.env,
    )
    assert r.returncode == 0, r.stderr
    link, ident = r.stdout.splitlines()[:2]
    assert "memfd" not in link and link.endswith("(deleted)"), r.stdout
    assert ident != f"{host.st_dev}:{host.st_ino}", r.stdout
    assert "written" not in r.stdout


def test_nothing_of_pyunion_in_init_memory(env: Env) -> None:
    """With CAP_SYS_PTRACE (common for strace and gdb) the command can read pid 1's memory
    (/proc/1/mem). pid 1 was a fork of pyunion: pyunion's command line (here a layer's
    host path) was always in it, and the caller's environment (its tokens) in about one
    run in four, freed but not erased. pid 1 is now catatonit, exec'd with the command's
    environment. Needles reach the script in halves (-e), so that the command line
    pid 1 keeps does not hold them; the script's own text shows the search works."""
    secret, path = "tok-9f8e7d6c5b4a", env.layers[0]
    script = (
        'hostile memgrep 1 "$S1$S2"; hostile memgrep 1 "$P1$P2"; '
        'hostile memgrep 1 "hostile memgrep"'
    )
    halves = [f"S1={secret[:8]}", f"S2={secret[8:]}", f"P1={path[:8]}", f"P2={path[8:]}"]
    caller = {
        **env.env,
        "PYUNION_TEST_SHORT": secret,
        **{f"PYUNION_TEST_{i}": "x" * (40 * i) + secret for i in range(1, 30)},
    }
    opts = [a for h in halves for a in ("-e", h)]
    r = subprocess.run(
        env.cmd("--cap-add", "SYS_PTRACE", *opts, command=("sh", "-c", script)),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        stdin=subprocess.DEVNULL,
        env=caller,
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[:2] == ["hits 0", "hits 0"], r.stdout
    assert r.stdout.splitlines()[2] != "hits 0", r.stdout


# -- seccomp ---------------------------------------------------------------------------------------
def test_escape_open_by_handle_at(env: Env, tmp_path: Path) -> None:
    """The shocker attack: a handle of a root-only host directory on the filesystem of
    /etc/hostname's bind opens that directory from inside. Refused; without seccomp and
    with CAP_DAC_READ_SEARCH it works (as it did by default before)."""
    secret = tmp_path / "secret"
    secret.mkdir(mode=0o700)
    (secret / "key").write_text("TOPSECRET\n")
    helper = os.path.join(env.layers[0], "usr/local/bin/hostile")
    handle = subprocess.run(
        [helper, "gethandle", str(secret)], capture_output=True, text=True, check=True, timeout=10
    ).stdout.split()
    attack = ("hostile", "openhandle", "/etc/hostname", *handle, "key")
    r = env.run(*attack)
    assert r.returncode == 1 and "TOPSECRET" not in r.stdout
    assert "open_by_handle_at: 1 Operation not permitted" in r.stdout
    r = env.run(
        *attack, opts=("--security-opt", "seccomp=unconfined", "--cap-add", "DAC_READ_SEARCH")
    )
    assert r.stdout == "TOPSECRET\n", r.stdout + r.stderr


def test_syscalls_refused(env: Env) -> None:
    """Every syscall that reaches past the container fails with EPERM (personality flags and
    clone3 with ENOSYS, as in podman's profile); with seccomp off, those that need no
    capability work, so the filter is what stops them."""
    r = env.run("hostile", "syscalls")
    assert r.returncode == 0, r.stderr
    got = _syscalls(r.stdout)
    assert got.pop("personality") == ENOSYS and got.pop("clone3") == ENOSYS
    assert got.pop("ptrace") == 0  # allowed by the profile: it only reaches the container
    assert got == dict.fromkeys(got, EPERM)
    assert len(got) == 35
    r = env.run("hostile", "syscalls", opts=("--security-opt", "seccomp=unconfined"))
    loose = _syscalls(r.stdout)
    assert {k: loose[k] for k in ("unshare", "clone", "add_key", "personality")} == {
        "unshare": 0,
        "clone": 0,
        "add_key": 0,
        "personality": 0,
    }


def test_seccomp_at_least_as_strict_as_podman(env: Env, podman: Podman) -> None:
    """Whatever podman's profile refuses with EPERM ours refuses too; with containers-common's
    profile file given to pyunion, the results are podman's exactly."""
    ref = _syscalls(podman.run(command=("hostile", "syscalls")).stdout)
    ours = _syscalls(env.run("hostile", "syscalls").stdout)
    assert ref.keys() == ours.keys()
    assert ours.pop("clone3") == ENOSYS  # podman lets it through; its flags are unseen
    for name, err in ref.items():
        assert ours.get(name, err) in (err, EPERM), name
        if err == EPERM:
            assert ours[name] == EPERM, name
    stricter = {n for n in ours if ours[n] != ref[n]}
    assert {"unshare", "clone", "setns", "keyctl", "add_key", "open_tree"} <= stricter
    same = env.run(
        "hostile", "syscalls", opts=("--security-opt", "seccomp=/usr/share/containers/seccomp.json")
    )
    assert _syscalls(same.stdout) == ref


def test_seccomp_follows_capabilities(env: Env) -> None:
    """Rules conditional on a capability follow --cap-add, as in podman."""
    got = _syscalls(env.run("hostile", "syscalls", opts=("--cap-add", "SYS_ADMIN")).stdout)
    assert got["unshare"] == got["add_key"] == got["sethostname"] == got["mount"] == 0
    assert got["kexec_load"] == got["init_module"] == EPERM  # other capabilities' rules


def _loaded_filter(load: Callable[[], None]) -> bytes:
    """The BPF a child holds after `load()`, read back from the kernel (ptrace)."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    ptrace_attach, ptrace_seccomp_get_filter = 16, 0x420C
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            load()
            os.kill(os.getpid(), signal.SIGSTOP)
            code = 0
        finally:
            os._exit(code)
    try:
        _, status = os.waitpid(pid, os.WUNTRACED)
        assert os.WIFSTOPPED(status), status
        assert libc.ptrace(ptrace_attach, pid, 0, 0) == 0, ctypes.get_errno()
        os.waitpid(pid, os.WUNTRACED)
        n = libc.ptrace(ptrace_seccomp_get_filter, pid, 0, None)
        assert n > 0, ctypes.get_errno()
        buf = ctypes.create_string_buffer(n * 8)
        assert libc.ptrace(ptrace_seccomp_get_filter, pid, 0, buf) == n
        return buf.raw
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)


@pytest.mark.parametrize("caps_", ["default", "all"])
def test_filter_is_the_one_libseccomp_loads(caps_: str) -> None:
    """init and the command load the program libseccomp generated once in init
    (`seccomp.compile`, `seccomp_export_bpf`); read back from the kernel, it is the one
    libseccomp's own `seccomp_load` installs for the same profile."""
    from unionfs import caps, seccomp

    capset = caps.DEFAULT if caps_ == "default" else frozenset(range(len(caps.NAMES)))
    f = seccomp.load_profile(None, capset)
    theirs = _loaded_filter(lambda: seccomp._build(f).load())
    ours = _loaded_filter(lambda: seccomp.install(seccomp.compile(f)))
    assert len(ours) > 1000 * 8 and ours == theirs


def test_program_is_kept_and_checked(env: Env, tmp_path: Path) -> None:
    """The program libseccomp made is kept in the state directory for the next container
    (which loads it as it is); a kept file that is not a whole program is made again."""
    state = tmp_path / "state"
    env.env["PYUNION_STATE_DIR"] = str(state)
    want = _syscalls(env.run("hostile", "syscalls").stdout)
    assert want["unshare"] == EPERM
    (kept,) = state.glob("seccomp-*.bpf")
    good, mtime = kept.read_bytes(), kept.stat().st_mtime_ns
    assert _syscalls(env.run("hostile", "syscalls").stdout) == want
    assert kept.stat().st_mtime_ns == mtime  # loaded, not made again
    kept.write_bytes(good[:-4])  # not whole: made again, never loaded
    r = env.run("hostile", "syscalls")
    assert r.returncode == 0 and _syscalls(r.stdout) == want, r.stderr
    assert kept.read_bytes() == good
    assert (
        _syscalls(env.run("hostile", "syscalls", opts=("--cap-add", "SYS_ADMIN")).stdout)["unshare"]
        == 0
    )
    assert len(list(state.glob("seccomp-*.bpf"))) == 2  # one per filter


def test_kept_programs_are_bounded(tmp_path: Path) -> None:
    """A new program pushes the oldest kept ones out (never itself, nothing else), and a
    temporary file a killed writer left goes once it is a minute old."""
    for i in range(seccomp.KEEP_PROGRAMS + 4):
        p = tmp_path / f"seccomp-x86_64-{i:032x}.bpf"
        p.write_bytes(b"x")
        os.utime(p, ns=(i * 10**9, i * 10**9))
    (tmp_path / "other.pid").write_text("1 /mnt\n")
    stale, fresh = (tmp_path / f".seccomp-x86_64-{'e' * 32}.bpf.{n}.ab12" for n in (7, 8))
    stale.write_bytes(b"half")  # a writer killed before its rename, long ago
    os.utime(stale, ns=(0, 0))
    fresh.write_bytes(b"half")  # one still being written
    newest = f"seccomp-x86_64-{'f' * 32}.bpf"
    (tmp_path / newest).write_bytes(b"x")
    os.utime(tmp_path / newest, ns=(0, 0))  # the oldest mtime: kept all the same
    dfd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        seccomp._prune(dfd, newest)
    finally:
        os.close(dfd)
    left = sorted(p.name for p in tmp_path.iterdir())
    assert "other.pid" in left and newest in left
    assert fresh.name in left and stale.name not in left
    programs = [n for n in left if n.endswith(".bpf")]
    assert len(programs) == seccomp.KEEP_PROGRAMS
    assert f"seccomp-x86_64-{seccomp.KEEP_PROGRAMS + 3:032x}.bpf" in programs
    assert f"seccomp-x86_64-{0:032x}.bpf" not in programs


def test_profile_file(env: Env, tmp_path: Path) -> None:
    """--security-opt seccomp=FILE in the OCI format; a bad profile is one line, exit 125."""
    prof = tmp_path / "p.json"
    prof.write_text(
        json.dumps(
            {
                "defaultAction": "SCMP_ACT_ALLOW",
                "architectures": ["SCMP_ARCH_X86_64"],
                "syscalls": [
                    {"names": ["mkdir", "mkdirat"], "action": "SCMP_ACT_ERRNO", "errnoRet": 13}
                ],
            }
        )
    )
    r = env.sh("touch /ok && mkdir /no", "--security-opt", f"seccomp={prof}")
    assert r.returncode == 1 and "Permission denied" in r.stderr, r.stderr
    bad_arg = {
        "defaultAction": "SCMP_ACT_ALLOW",
        "syscalls": [
            {
                "names": ["read"],
                "action": "SCMP_ACT_ERRNO",
                "args": [{"index": 9, "op": "SCMP_CMP_EQ"}],
            }
        ],
    }
    # A minKernel past int()'s 4300 digits was a ValueError traceback; one in Arabic-Indic
    # digits (re's \d takes them) was read as 1.0. The first is a kernel still to come.
    mkdir_from = {
        "defaultAction": "SCMP_ACT_ALLOW",
        "syscalls": [
            {
                "names": ["mkdir", "mkdirat"],
                "action": "SCMP_ACT_ERRNO",
                "includes": {"minKernel": "9" * 5000 + ".0"},
            }
        ],
    }
    prof.write_text(json.dumps(mkdir_from))
    r = env.sh("mkdir /yes", "--security-opt", f"seccomp={prof}")
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    mkdir_from["syscalls"][0]["includes"] = {"minKernel": "\u0661.0"}
    for bad, why in [
        ("{", "not valid JSON"),
        ('{"defaultAction": "SCMP_ACT_NOPE"}', "unknown action"),
        (json.dumps(bad_arg), "bad argument comparison"),
        (json.dumps(mkdir_from), "bad minKernel"),
    ]:
        prof.write_text(bad)
        r = env.sh("true", "--security-opt", f"seccomp={prof}")
        assert r.returncode == 125 and why in r.stderr and r.stderr.count("\n") == 1, r.stderr
    r = env.sh("true", "--security-opt", "seccomp=/dev/zero")
    assert r.returncode == 125 and "not a regular file" in r.stderr


@pytest.mark.parametrize(
    "opts,why",
    [
        (("--cap-add", "NOPE"), "unknown capability"),
        (("--cap-add", "CHOWN", "--cap-drop", "chown"), "both added and dropped"),
        (("--security-opt", "apparmor=myprofile"), "unsupported --security-opt"),
        (("--security-opt", "mask=relative"), "not an absolute path"),
        (("--preserve-fds", "3"), "file descriptor 3 is not open"),
        # Abbreviated as argparse allows: still checked before pyunion opens an fd.
        (("--preserve-fd", "1"), "file descriptor 3 is not open"),
        (("--preserve=1",), "file descriptor 3 is not open"),
    ],
)
def test_bad_options(env: Env, opts: tuple[str, ...], why: str) -> None:
    r = env.sh("true", *opts)
    assert r.returncode == 125 and why in r.stderr and r.stderr.count("\n") == 1, r.stderr


# -- read-only root, /proc and /sys ----------------------------------------------------------------
def test_read_only_cannot_be_undone(env: Env) -> None:
    """--read-only holds: no remount from inside (no CAP_SYS_ADMIN, and seccomp). With every
    capability and no filter the remount works, which is what happened before."""
    r = env.sh("mount -o remount,rw / ; touch /x", "--read-only")
    assert r.returncode == 1 and "Read-only file system" in r.stderr, r.stderr
    r = env.sh("mount -o remount,rw / && touch /x && echo writable", "--read-only", "--privileged")
    assert r.stdout == "writable\n", r.stderr


def test_proc_sys_read_only(env: Env) -> None:
    """/proc/sys/kernel/core_pattern (the host's: it is not namespaced) cannot be written;
    written back with its own value so that the test changes nothing if it fails."""
    r = env.sh(
        "cat /proc/sys/kernel/core_pattern > /tmp/v && cat /tmp/v > /proc/sys/kernel/core_pattern"
    )
    assert r.returncode != 0 and "Read-only file system" in r.stderr, r.stderr
    r = env.sh("grep ' /proc/sys ' /proc/self/mountinfo", "--privileged")
    assert r.stdout == ""  # nothing over /proc/sys: writable, as in podman --privileged


def _special_mounts(out: str) -> set[tuple[str, str, str]]:
    """(mount point, fs type, ro/rw) of the mounts podman and pyunion add in /proc, /sys and
    over masked paths (cgroups left out: pyunion mounts none)."""
    found = set()
    for line in out.splitlines():
        left, _, right = line.partition(" - ")
        fields = left.split()
        point, flags, fstype = fields[4], fields[5].split(","), right.split()[0]
        if re.match(r"/(proc|sys)/|/etc/motd$|/srv$", point) and not point.startswith(
            "/sys/fs/cgroup"
        ):
            found.add((point, fstype, flags[0]))
    return found


@pytest.mark.parametrize(
    "opts",
    [
        (),
        ("--privileged",),
        ("--security-opt", "unmask=ALL"),
        ("--security-opt", "unmask=/proc/*"),
        ("--security-opt", "unmask=/proc/sys:/sys/firmware"),
        ("--security-opt", "mask=/etc/motd:/srv"),
    ],
)
def test_masked_paths_as_podman(env: Env, podman: Podman, opts: tuple[str, ...]) -> None:
    """The masked and read-only paths are podman's, with the same mask=/unmask= options."""
    script = "cat /proc/self/mountinfo"
    ours = _special_mounts(env.sh(script, *opts).stdout)
    assert ours == _special_mounts(podman.sh(script, *opts).stdout)
    if not opts:
        assert ("/proc/sys", "proc", "ro") in ours and ("/sys/firmware", "tmpfs", "ro") in ours
        r = env.sh(
            "cat /proc/keys /proc/timer_list | wc -c; ls -A /sys/firmware | wc -l; "
            "touch /sys/firmware/x"
        )
        assert r.stdout.split() == ["0", "0"] and "Read-only file system" in r.stderr


def _symlinked_kernel_fs(top: Path, fs: str) -> None:
    """/FS -> /dev/link -> /real in the image: FS was mounted at /real, then /dev's tmpfs
    hid the link, so that /FS/... (each masked and read-only path) led nowhere."""
    (top / "dev").mkdir(parents=True, exist_ok=True)
    (top / "real").mkdir()
    os.symlink("/real", top / "dev/link")
    os.symlink("/dev/link", top / fs)


@pytest.mark.parametrize("fs", ["proc", "sys"])
def test_a_symlinked_proc_or_sys_is_refused(
    env: Env, podman: Podman, tmp_path: Path, fs: str
) -> None:
    """An image whose /proc (or /sys) is a symlink is refused in one line, exit 125, as runc
    refuses it. Before, every mask missed: /real/sys/kernel/core_pattern (the host's) was
    writable by the container's root (probed with test -w, nothing written), and
    /real/firmware had no empty tmpfs over it."""
    top = tmp_path / "top"
    _symlinked_kernel_fs(top, fs)
    env.layers = [str(top), *env.layers]
    if fs == "proc":
        probe = "test -w /real/sys/kernel/core_pattern && echo unmasked"
    else:
        probe = "grep -q ' /real/firmware ' /proc/self/mountinfo || echo unmasked"
    r = env.sh(f"{probe}; echo ran")
    assert (r.returncode, r.stdout) == (125, ""), r.stdout + r.stderr
    said = f"pyunion: the image's /{fs} is a symlink: it must be an ordinary directory\n"
    assert r.stderr == said
    env.wait_clean()
    root = tmp_path / "podman-root"  # podman refuses it too
    shutil.copytree(podman.root, root, symlinks=True)
    shutil.rmtree(root / fs)
    _symlinked_kernel_fs(root, fs)
    ref = subprocess.run(
        podman.cmd(command=("true",), root=root),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        stdin=subprocess.DEVNULL,
    )
    assert ref.returncode != 0 and "must be mounted on ordinary directory" in ref.stderr


# `python -c _REFUSING NAME MASK ARGV...` runs ARGV with the syscall NAME refused (EPERM)
# by a seccomp filter, when its first argument has the bits of MASK (0: always), as a
# caller's systemd SystemCallFilter= or a runtime's profile may refuse it.
_REFUSING = (
    "import errno, os, sys, pyseccomp as s\n"
    "name, mask = sys.argv[1], int(sys.argv[2])\n"
    "f = s.SyscallFilter(defaction=s.ALLOW)\n"
    "f.add_rule(s.ERRNO(errno.EPERM), name, *([s.Arg(0, s.MASKED_EQ, mask, mask)] * bool(mask)))\n"
    "f.load()\n"
    "os.execvp(sys.argv[3], sys.argv[3:])\n"
)


def _refusing(
    syscall: str, mask: int, cmd: list[str], env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", _REFUSING, syscall, str(mask), *cmd],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        stdin=subprocess.DEVNULL,
        check=False,
    )


def test_no_chroot_when_pivot_root_is_refused(env: Env, podman: Podman, tmp_path: Path) -> None:
    """Where pivot_root is refused, the run fails in one line (exit 125), as podman's runc
    does. Before, init fell back to a chroot with the host's tree still in its mount
    namespace, and the container's root (CAP_SYS_CHROOT, podman's default) walked out
    of it: `hostile chroot-escape` saw a file of the host's."""
    marker = tmp_path / "host-only"
    marker.write_text("")
    r = _refusing(
        "pivot_root", 0, env.cmd(command=("hostile", "chroot-escape", str(marker))), env.env
    )
    assert (r.returncode, r.stdout) == (125, ""), r.stdout + r.stderr
    assert r.stderr.startswith("pyunion: cannot enter the container's root: ") and (
        r.stderr.count("\n") == 1
    ), r.stderr
    env.wait_clean()
    assert env.sh(f"hostile chroot-escape {marker}").stdout == "contained\n"  # pivot_root'ed
    ref = _refusing("pivot_root", 0, podman.cmd(command=("true",)))
    assert ref.returncode != 0 and "pivot_root" in ref.stderr, ref.stderr


def test_no_container_in_the_hosts_ipc_namespace(env: Env, podman: Podman) -> None:
    """Where a new ipc namespace is refused, the run fails in one line (exit 125), as
    podman's does. Before, it went on in the host's with a warning, and the container's
    root (uid 0) attached the host root's SysV shared memory, mode 0600."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.shmat.restype = ctypes.c_void_p
    shmid = libc.shmget(0, 4096, 0o1600)  # IPC_PRIVATE, IPC_CREAT, 0600
    assert shmid >= 0, os.strerror(ctypes.get_errno())
    try:
        addr = libc.shmat(shmid, None, 0)
        ctypes.memmove(addr, b"host-root-secret\0", 17)
        libc.shmdt(ctypes.c_void_p(addr))
        assert "shm host-root-secret" not in env.run("hostile", "shm", str(shmid)).stdout
        r = _refusing(
            "unshare", CLONE_NEWIPC, env.cmd(command=("hostile", "shm", str(shmid))), env.env
        )
        assert (r.returncode, r.stdout) == (125, ""), r.stdout + r.stderr
        assert r.stderr.startswith("pyunion: cannot create the container's namespaces: ") and (
            r.stderr.count("\n") == 1
        ), r.stderr
        env.wait_clean()
        ref = _refusing("unshare", CLONE_NEWIPC, podman.cmd(command=("true",)))
        assert ref.returncode != 0, ref.stderr
    finally:
        libc.shmctl(shmid, 0, None)  # IPC_RMID


# -- file descriptors ------------------------------------------------------------------------------
def test_inherited_fd_does_not_reach_the_command(env: Env, podman: Podman) -> None:
    """`exec 7</` before pyunion run: the command cannot walk the host through fd 7."""
    r = subprocess.run(
        _with_fds("7</")
        + env.cmd("-u", "1000", command=("sh", "-c", "ls /proc/self/fd; ls /proc/self/fd/7/")),
        capture_output=True,
        text=True,
        timeout=60,
        env=env.env,
        stdin=subprocess.DEVNULL,
        check=False,
    )
    ref = podman.run("-u", "1000", command=("ls", "/proc/self/fd"), fds="7</")
    assert r.stdout.split() == ["0", "1", "2", "3"] == ref.stdout.split()
    assert "No such file" in r.stderr


def test_preserve_fds(env: Env, podman: Podman, tmp_path: Path) -> None:
    """--preserve-fds N passes 3..N+2 and nothing else (fd 5 here), as podman."""
    three, four = tmp_path / "three", tmp_path / "four"
    fds = f"3>>{three} 4>>{four} 5</"
    script = "echo three >&3; echo four >&4; ls /proc/self/fd"
    r = subprocess.run(
        _with_fds(fds) + env.cmd("--preserve-fds", "2", command=("sh", "-c", script)),
        capture_output=True,
        text=True,
        timeout=60,
        env=env.env,
        stdin=subprocess.DEVNULL,
        check=False,
    )
    ref = podman.run("--preserve-fds", "2", command=("sh", "-c", script), fds=fds)
    assert r.stdout.split() == ["0", "1", "2", "3", "4", "5"] == ref.stdout.split(), r.stderr
    assert three.read_text() == "three\nthree\n" and four.read_text() == "four\nfour\n"


# -- the caller's terminal -------------------------------------------------------------------------
# Run in a terminal of its own: runs pyunion there, then counts what waits in the
# terminal's input queue for the shell that started pyunion (it would run it, as root).
_TERMINAL_CALLER = """
import fcntl, struct, subprocess, sys, termios
r = subprocess.run(sys.argv[1:])
pending = struct.unpack("i", fcntl.ioctl(0, termios.FIONREAD, bytes(4)))[0]
print("exit", r.returncode, "pending", pending)
"""


@pytest.mark.parametrize("opts,where", [((), "/dev/tty"), ((), "1"), (("-i",), "0")])
def test_no_typing_into_the_callers_terminal(env: Env, opts: tuple[str, ...], where: str) -> None:
    """Without -t the command writes to pyunion's own terminal; TIOCSTI through /dev/tty or an
    inherited terminal fd pushed a line into the input of the shell that ran pyunion, which
    then ran it as root. The container has its own session, as in runc (/dev/tty is
    ENXIO), and the terminal reaches it only through pipes of pyunion's, as podman's
    conmon does (TIOCSTI on fd 0 or 1: ENOTTY)."""
    pid, fd = pty.fork()
    if pid == 0:  # pragma: no cover - the child execs at once
        os.environ.update(env.env)
        os.execv(
            sys.executable,
            [
                sys.executable,
                "-c",
                _TERMINAL_CALLER,
                *env.cmd(*opts, command=("hostile", "tiocsti", where, "touch /tmp/pwned\n")),
            ],
        )
    try:
        out = _read_until(fd, b"\xff", timeout=30)  # until EOF
        _, status = os.waitpid(pid, 0)
        pid = 0
    finally:
        if pid:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
        os.close(fd)
    assert os.waitstatus_to_exitcode(status) == 0, out
    assert b"exit 1 pending 0" in out, out
    assert (b"open 6" if where == "/dev/tty" else b"TIOCSTI 25") in out, out


# -- the caller's session keyring ------------------------------------------------------------
# Joins a session keyring of its own, puts a secret in it (as pam_keyinit and a login
# tool leave a login's keys there), then runs pyunion.
_KEYRING_CALLER = """
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
keyctl, add_key = 250, 248  # x86_64
assert libc.syscall(keyctl, 1, b"pyunion-test-session") > 0  # KEYCTL_JOIN_SESSION_KEYRING
assert libc.syscall(add_key, b"user", b"pyunion-secret", b"s3cret", 6, -3) > 0  # into @s
os.execv(sys.argv[1], sys.argv[1:])
"""


@pytest.mark.skipif(os.uname().machine != "x86_64", reason="syscall numbers of x86_64")
@pytest.mark.parametrize(
    "opts",
    [
        ("--security-opt", "seccomp=unconfined"),
        ("--cap-add", "SYS_ADMIN"),
        ("--privileged",),
        ("--security-opt", "seccomp=unconfined", "-u", "1000"),
    ],
)
def test_the_callers_session_keyring_is_not_the_containers(env: Env, opts: tuple[str, ...]) -> None:
    """The container got the session keyring of the process that ran pyunion: with the
    keyring calls allowed (`seccomp=unconfined`, `--cap-add SYS_ADMIN`, `--privileged`)
    it read the caller's keys (`keyctl print`), and could add, link or clear them. runc
    gives each container a fresh session keyring; so does pyunion now."""
    command = ("hostile", "sessionkey", "pyunion-secret")
    r = subprocess.run(
        [sys.executable, "-c", _KEYRING_CALLER, *env.cmd(*opts, command=command)],
        capture_output=True,
        text=True,
        timeout=60,
        env=env.env,
        stdin=subprocess.DEVNULL,
        check=False,
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "errno 126", r.stdout  # ENOKEY: not there


def test_stdio_files_are_not_the_containers(env: Env, tmp_path: Path) -> None:
    """`pyunion run -i ... < in > out 2> err` with host files: the container gets pipes,
    so its root can neither chmod nor chown those files through /proc/self/fd, nor
    reopen the read-only stdin for writing; the data still flows both ways."""
    files = {name: tmp_path / name for name in ("in", "out", "err")}
    files["in"].write_text("input\n")
    files["out"].write_text("")
    files["err"].write_text("")
    script = (
        "cat; echo to-err >&2; ls -l /proc/self/fd/0 /proc/self/fd/1 /proc/self/fd/2; "
        "for fd in 0 1 2; do chmod 4777 /proc/self/fd/$fd; chown 1000:1000 /proc/self/fd/$fd; "
        "done; echo PWNED > /proc/self/fd/0; true"
    )
    before = {name: f.stat() for name, f in files.items()}
    with (
        files["in"].open("rb") as i,
        files["out"].open("wb") as o,
        files["err"].open("wb") as e,
    ):
        r = env.run_with("sh", "-c", script, opts=("-i",), stdin=i, stdout=o, stderr=e)
    assert r.returncode == 0, files["err"].read_text()
    out = files["out"].read_text()
    assert out.startswith("input\n") and out.count("pipe:") == 3, out
    assert files["err"].read_text().startswith("to-err\n")
    assert files["in"].read_text() == "input\n"
    for name, f in files.items():
        st = f.stat()
        assert (st.st_mode, st.st_uid, st.st_gid) == (
            before[name].st_mode,
            before[name].st_uid,
            before[name].st_gid,
        ), name


def test_stdio_named_fifo_is_not_the_containers(env: Env, tmp_path: Path) -> None:
    """A named FIFO is a host file too: relayed as well."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo, 0o600)
    reader = subprocess.Popen(["cat", str(fifo)], stdout=subprocess.PIPE)
    try:
        with fifo.open("wb") as w:
            script = (
                "echo via-fifo; chmod 4777 /proc/self/fd/1; chown 1000:1000 /proc/self/fd/1; true"
            )
            r = env.run_with("sh", "-c", script, stdout=w)
        out, _ = reader.communicate(timeout=30)
    finally:
        reader.kill()
        reader.wait()
    assert r.returncode == 0, r.stderr
    assert out == b"via-fifo\n"
    st = fifo.stat()
    assert (stat.S_IMODE(st.st_mode), st.st_uid) == (0o600, 0)


def test_the_callers_pipes_and_sockets_keep_their_flags(env: Env) -> None:
    """The command sets O_NONBLOCK on fds 0-2 and shuts down those that are sockets. The
    caller's own open files (the test keeps each one it passes) stay as they were:
    before, an anonymous pipe or a socket was passed as is, one open file with the
    caller's, and the caller's next write to a full pipe failed with EAGAIN (podman's
    conmon passes pipes of its own), a socket could no longer be written at all."""
    in_r, in_w = os.pipe()
    out_r, out_w = os.pipe()
    sock, peer = socket.socketpair()
    try:
        os.close(in_w)  # stdin: at its end
        r = env.run_with(
            "hostile", "stdio", opts=("-i",), stdin=in_r, stdout=out_w, stderr=sock.fileno()
        )
        assert r.returncode == 0
        os.close(out_w)
        out_w = -1
        assert os.read(out_r, 100) == b"done\n"
        assert os.get_blocking(in_r), "the caller's stdin pipe was made non-blocking"
        assert sock.getblocking() and os.get_blocking(sock.fileno())
        sock.sendall(b"still open\n")
        assert peer.recv(100) == b"still open\n"
    finally:
        for fd in (in_r, out_r, out_w):
            if fd >= 0:
                os.close(fd)
        sock.close()
        peer.close()


def test_a_pipe_shared_with_the_caller_stays_blocking(env: Env) -> None:
    """The same for stdout, seen by the caller: its own write end of the pipe (a shell's
    `{ pyunion run ...; cat big; } | slow`) is still blocking afterwards."""
    out_r, out_w = os.pipe()
    try:
        r = env.run_with("hostile", "stdio", stdout=out_w)
        assert r.returncode == 0, r.stderr
        assert os.read(out_r, 100) == b"done\n"
        assert os.get_blocking(out_w), "the caller's stdout pipe was made non-blocking"
    finally:
        os.close(out_r)
        os.close(out_w)


def test_the_callers_stdout_pipe_cannot_be_read_in_the_container(env: Env) -> None:
    """An anonymous pipe is an inode of its own too, its creator's (0600): given the
    caller's pipe (even opened anew), root in the container opened /proc/self/fd/1 for
    reading and took what another writer of the caller's had put there (a CI job's
    parallel steps, `{ pyunion run ... & secret; } | log`) before the caller's reader
    saw it. It gets a pipe of pyunion's, which holds only its own output."""
    out_r, out_w = os.pipe()
    try:
        os.write(out_w, b"SECRET\n")  # another writer's, not yet read by the caller
        script = (
            "dd bs=64 count=1 </proc/self/fd/1 >&2 2>/dev/null & p=$!; "
            "sleep 1; kill $p 2>/dev/null; wait $p; echo done"
        )
        r = env.run_with("sh", "-c", script, stdout=out_w)
        os.close(out_w)
        out_w = -1
        assert r.returncode == 0, r.stderr
        assert "SECRET" not in r.stderr
        assert os.read(out_r, 100) == b"SECRET\ndone\n"
    finally:
        for fd in (out_r, out_w):
            if fd >= 0:
                os.close(fd)


def test_stdout_and_stderr_to_one_file_keep_their_order(env: Env, tmp_path: Path) -> None:
    """`> log 2>&1`: one pipe for both (they are one file), so the lines stay in order."""
    log = tmp_path / "log"
    script = "i=0; while [ $i -lt 300 ]; do echo out$i; echo err$i >&2; i=$((i+1)); done"
    with log.open("wb") as f:
        r = env.run_with("sh", "-c", script, stdout=f, stderr=subprocess.STDOUT)
    assert r.returncode == 0
    want = [f"{kind}{i}" for i in range(300) for kind in ("out", "err")]
    assert log.read_text().split() == want


# -- volumes ---------------------------------------------------------------------------------------
@pytest.fixture
def volume(tmp_path: Path) -> Iterator[Path]:
    """A host directory with a tmpfs mounted below it (a submount)."""
    vol = tmp_path / "vol"
    (vol / "sub").mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(vol / "sub")], check=True, timeout=10)
    try:
        (vol / "sub" / "marker").write_text("in the submount\n")
        yield vol
    finally:
        subprocess.run(["umount", "-l", str(vol / "sub")], check=False, timeout=10)


def test_volume_read_only_is_recursive(env: Env, volume: Path) -> None:
    """`:ro` covers the mounts below the source too (it did not: a submount stayed writable)."""
    r = env.sh("touch /data/x; touch /data/sub/x; cat /data/sub/marker", "-v", f"{volume}:/data:ro")
    assert r.stderr.count("Read-only file system") == 2, r.stderr
    assert r.stdout == "in the submount\n"
    assert not (volume / "sub/x").exists() and not (volume / "x").exists()
    r = env.sh("touch /data/sub/x", "-v", f"{volume}:/data")
    assert r.returncode == 0 and (volume / "sub/x").exists()  # the submount is reached rw


def test_volume_options(env: Env, volume: Path) -> None:
    """podman's volume options: bind (no submounts), nosuid, nodev, noexec, z/Z ignored."""
    r = env.sh(
        "ls /data/sub; grep ' /data ' /proc/self/mountinfo",
        "-v",
        f"{volume}:/data:bind,nosuid,nodev,noexec,Z",
    )
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert "marker" not in lines
    assert lines[-1].split()[5].split(",")[:4] == ["rw", "nosuid", "nodev", "noexec"]


@pytest.mark.parametrize(
    "spec,why",
    [
        ("{vol}", "expected HOST:CONTAINER[:OPTIONS]"),
        ("{vol}:/data:ro:x", "expected HOST:CONTAINER[:OPTIONS]"),
        ("{vol}:/data:ro,rw", "with its opposite"),
        ("{vol}:/data:O", "unknown option 'O'"),
        ("{vol}:data", "must be absolute"),
        ("{vol}:/", "must be absolute and not /"),
        ("named:/data", "named volumes are not supported"),
        ("/no/such/dir:/data", "does not exist"),
    ],
)
def test_bad_volumes(env: Env, tmp_path: Path, spec: str, why: str) -> None:
    r = env.sh("true", "-v", spec.format(vol=tmp_path))
    assert r.returncode == 125 and why in r.stderr and r.stderr.count("\n") == 1, r.stderr


def _remount_each_in_private_ns(target: str, sub: str) -> None:
    from unionfs import syscalls, volumes

    syscalls.unshare(syscalls.CLONE_NEWNS)
    syscalls.make_private("/")
    fd = os.open(target, os.O_PATH | os.O_DIRECTORY)
    volumes.remount_each(fd, syscalls.MOUNT_ATTR_RDONLY | syscalls.MOUNT_ATTR_NOSUID)
    for path in (target, sub):
        flags = os.statvfs(path).f_flag
        assert flags & os.ST_RDONLY and flags & os.ST_NOSUID, path


def test_volume_read_only_fallback_for_old_kernels(volume: Path) -> None:
    """Without mount_setattr (kernels before 5.12), each submount is remounted one by one."""
    assert run_child(_remount_each_in_private_ns, str(volume / "sub"), str(volume / "sub")) == 0
    bind = volume.parent / "bind"
    bind.mkdir()
    subprocess.run(["mount", "--rbind", str(volume), str(bind)], check=True, timeout=10)
    try:
        assert run_child(_remount_each_in_private_ns, str(bind), str(bind / "sub")) == 0
        assert not os.statvfs(volume / "sub").f_flag & os.ST_RDONLY  # our namespace: untouched
    finally:
        subprocess.run(["umount", "-R", "-l", str(bind)], check=False, timeout=10)


def _bind_ro_with_the_race_won(root: str, secret: str) -> None:
    """In a private mount namespace: `sandbox._bind` of SECRET at /data/secret `:ro` in the
    tree ROOT, with the move of a user who owns /data (an outer volume's source) made the
    moment the bind is attached: the fresh mount point renamed to /data/moved and a
    symlink to /proc (a mount root) left in its place. The bind must be read-only all
    the same."""
    from unionfs import sandbox, syscalls
    from unionfs.volumes import Volume

    host_ns = os.open("/proc/self/ns/mnt", os.O_RDONLY)  # where the user acts
    syscalls.unshare(syscalls.CLONE_NEWNS)
    syscalls.make_private("/")
    syscalls.mount("tmpfs", f"{root}/proc", "tmpfs", 0)
    data = f"{root}/data"

    def swap() -> None:
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                syscalls.setns(host_ns, syscalls.CLONE_NEWNS)
                os.rename(f"{data}/secret", f"{data}/moved")
                os.symlink("/proc", f"{data}/secret")
                code = 0
            finally:
                os._exit(code)
        assert os.waitpid(pid, 0)[1] == 0, "the swap failed"

    real_mount, real_move = sandbox.mount, sandbox.move_mount

    def mount(*args: Any) -> None:
        real_mount(*args)
        swap()

    def move_mount(*args: Any) -> None:
        real_move(*args)
        swap()

    sandbox.mount, sandbox.move_mount = mount, move_mount  # type: ignore[assignment]
    rootfd = os.open(root, os.O_PATH | os.O_DIRECTORY)
    sandbox._bind(rootfd, Volume(secret, "/data/secret", read_only=True))
    assert os.statvfs(f"{data}/moved").f_flag & os.ST_RDONLY, "the :ro volume is writable"
    assert not os.statvfs(f"{root}/proc").f_flag & os.ST_RDONLY


def test_a_ro_volume_stays_read_only_when_its_mount_point_is_swapped(tmp_path: Path) -> None:
    """`-v /home/u/share:/data -v /srv/secret:/data/secret:ro`: the user who owns the share
    moves the new mount point away and leaves a symlink to /proc between the bind and its
    `:ro` (before: the mount was looked up again by its path, so /proc became read-only
    and the secret stayed writable at /data/moved; a racing user won about one run in 50,
    see the commit). The attributes are now set before the bind is attached."""
    root, secret = tmp_path / "root", tmp_path / "secret"
    (root / "data" / "secret").mkdir(parents=True)
    (root / "proc").mkdir()
    secret.mkdir()
    (secret / "file").write_text("orig\n")
    assert run_child(_bind_ro_with_the_race_won, str(root), str(secret)) == 0
    assert (secret / "file").read_text() == "orig\n"


# -- teardown and the image's files ----------------------------------------------------------------
def test_teardown_ignores_symlinks_planted_by_the_container(env: Env, tmp_path: Path) -> None:
    """The container moves a volume's placeholder parent away and puts a symlink to the host
    in its place: removing the placeholders of a kept upper must not follow it (it removed
    the host's VICTIM/vol)."""
    victim, vol, upper = tmp_path / "victim", tmp_path / "vol", tmp_path / "upper"
    (victim / "vol").mkdir(parents=True)
    vol.mkdir()
    r = env.sh(
        f"mv /mnt/deep /mnt/moved && ln -s {victim} /mnt/deep",
        "--upper",
        str(upper),
        "-v",
        f"{vol}:/mnt/deep/vol",
    )
    assert r.returncode == 0, r.stderr
    assert (victim / "vol").is_dir()
    assert os.readlink(upper / "mnt/deep") == str(victim)


def test_deep_tree_is_removed(env: Env) -> None:
    """A command that builds a tree 1100 directories deep: its exit status comes through and
    nothing is left under TMPDIR (shutil.rmtree hit the recursion limit)."""
    r = env.sh("i=0; while [ $i -lt 1100 ]; do mkdir d && cd d || exit 9; i=$((i+1)); done; exit 3")
    assert r.returncode == 3, r.stderr
    assert r.stderr == ""
    env.wait_clean()


@pytest.mark.parametrize("kind", ["dev-zero", "fifo", "huge", "directory", "kmsg"])
def test_hostile_passwd(env: Env, tmp_path: Path, kind: str) -> None:
    """The image's /etc/passwd is a symlink to /dev/zero, a FIFO, 5 MiB, a directory or
    /proc/kmsg (a "regular file" of the container's /proc, which root's run read with
    CAP_SYSLOG: it hung until the kernel logged something, and took the host's kernel
    messages from whoever else reads them): one line and exit 125, at once (it grew the
    run's memory or hung it)."""
    top = tmp_path / "top"
    (top / "etc").mkdir(parents=True)
    passwd = top / "etc/passwd"
    if kind == "dev-zero":
        os.symlink("/dev/zero", passwd)
    elif kind == "kmsg":
        os.symlink("/proc/kmsg", passwd)
    elif kind == "fifo":
        os.mkfifo(passwd)
    elif kind == "huge":
        passwd.write_bytes(b"x" * (5 << 20))
    else:
        passwd.mkdir()
    env.layers = [str(top), *env.layers]
    r = env.run("true", opts=("-u", "alice"), timeout=30)
    assert r.returncode == 125 and r.stderr.count("\n") == 1, r.stderr
    assert "/etc/passwd" in r.stderr


def test_passwd_entries_with_absurd_ids_are_skipped(env: Env, tmp_path: Path) -> None:
    """An entry whose uid has more digits than int() takes made every run of the image
    fail ("container init failed: ValueError(...)"), whoever it ran as; nss skips it."""
    top = tmp_path / "top"
    (top / "etc").mkdir(parents=True)
    (top / "etc/passwd").write_text(
        f"root:x:0:0::/root:/bin/sh\nbob:x:{'9' * 5000}:0::/:/bin/sh\n"
        "alice:x:1000:1000::/home/alice:/bin/sh\n"
    )
    env.layers = [str(top), *env.layers]
    for user, out in (("alice", "1000"), ("0", "0")):
        r = env.run("id", "-u", opts=("-u", user), timeout=30)
        assert (r.returncode, r.stdout.strip()) == (0, out), r.stderr
    r = env.run("true", opts=("-u", "bob"), timeout=30)
    assert r.returncode == 126 and "unable to find user 'bob'" in r.stderr, r.stderr


def test_passwd_symlink_resolves_inside_the_image(env: Env, tmp_path: Path) -> None:
    """An absolute symlink in the image is resolved in the image's root, not the host's."""
    top = tmp_path / "top"
    (top / "etc").mkdir(parents=True)
    (top / "srv").mkdir()
    (top / "srv/users").write_text("mallory:x:4242:4242::/srv:/bin/sh\n")
    os.symlink("/srv/users", top / "etc/passwd")
    env.layers = [str(top), *env.layers]
    r = env.sh("id -u; echo $HOME", "-u", "mallory")
    assert r.stdout.split() == ["4242", "/srv"], r.stderr


def test_device_nodes_of_the_image_do_not_open(env: Env, tmp_path: Path) -> None:
    """A device node shipped in an image (here /dev/null's numbers) cannot be opened: the
    root is nodev, as podman's devices cgroup would refuse it."""
    top = tmp_path / "top"
    top.mkdir()
    os.mknod(top / "disk", 0o666 | 0o020000, os.makedev(1, 3))
    env.layers = [str(top), *env.layers]
    r = env.sh("echo x > /disk")
    assert r.returncode != 0 and "Permission denied" in r.stderr, r.stderr


def test_device_nodes_made_in_the_container_do_not_open(env: Env, tmp_path: Path) -> None:
    """With --cap-add MKNOD the container made device nodes of the host in /dev (a tmpfs) or
    in a volume and opened them: it wrote the host's /dev/kmsg and read its console
    (/dev/vcs). podman's devices cgroup refuses them; here /dev and the volumes are nodev
    while the usual nodes still work. --privileged lifts it, as in podman."""
    vol = tmp_path / "vol"
    vol.mkdir()
    script = (
        "mknod /dev/z c 1 5 && head -c 1 /dev/z | od -An -tx1; "
        "mknod /vol/z c 1 5 && head -c 1 /vol/z | od -An -tx1; "
        "echo x > /dev/null && head -c 1 /dev/zero | od -An -tx1"
    )
    r = env.sh(script, "--cap-add", "MKNOD", "-v", f"{vol}:/vol")
    assert r.stderr.count("Permission denied") == 2, r.stderr
    assert r.stdout.split() == ["00"]
    (vol / "z").unlink()
    r = env.sh(script, "--privileged", "-v", f"{vol}:/vol")
    assert r.stdout.split() == ["00", "00", "00"], r.stderr


# -- the network -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("opts", "reached"),
    [
        ((), False),  # the default: a network namespace of the container's own
        (("--network", "none"), False),
        (("--net=none",), False),
        (("--network", "host"), True),
        (("--net", "host", "--privileged"), True),
    ],
)
def test_host_services_out_of_reach(
    env: Env, request: pytest.FixtureRequest, opts: tuple[str, ...], reached: bool
) -> None:
    """A TCP listener on the host's localhost and an abstract Unix socket (D-Bus, X11 and
    systemd's private sockets are such) are out of the container's reach, as in podman; a
    root container shared the host's network before, and reached both as the host's uid 0.
    With --network host it reaches them: the test fails on the old code. podman's
    `--network none` gives the same lines."""
    with host_listeners() as (tcp, unix, name):
        port = tcp.getsockname()[1]
        script = f"grep -c @{name} /proc/net/unix; hostile connect {port}; hostile connect @{name}"
        r = env.sh(script, *opts)
        want = "1\nconnected\nconnected\n" if reached else "0\nerrno 111\nerrno 111\n"
        assert r.stdout == want, r.stderr
        if opts == ("--network", "none"):
            podman: Podman = request.getfixturevalue("podman")
            assert podman.sh(script, *opts).stdout == want
        if reached:  # the host's sockets did get what the container sent
            for listener in (tcp, unix):
                listener.settimeout(10)
                conn, _ = listener.accept()
                with conn:
                    conn.settimeout(10)
                    assert conn.recv(16) == b"hostile"


NET_PROBE = "ls /sys/class/net; cat /sys/class/net/lo/flags; tail -n +3 /proc/net/dev | cut -d: -f1"


def test_network_none_is_podmans(env: Env, podman: Podman) -> None:
    """--network none: only the loopback, up, seen in /sys and /proc/net alike (a fresh
    sysfs of the container's namespace), as podman gives it."""
    ours = env.sh(NET_PROBE)
    assert ours.stdout == "lo\n0x9\n    lo\n", ours.stderr
    assert ours.stdout == podman.sh(NET_PROBE, "--network", "none").stdout
    r = env.sh("ls /sys/class/net", "--network", "host")
    assert r.stdout.split() == sorted(os.listdir("/sys/class/net")), r.stderr


def test_loopback_works_inside(env: Env) -> None:
    """A server and a client in the container talk over its own loopback, and the
    container's name is on it (/etc/hosts, as podman writes it)."""
    script = (
        "nc -l -p 4711 -e sh -c 'cat > /tmp/got' & "  # -e: not nc's stdin, at EOF already
        "for i in $(seq 100); do echo inside | nc 127.0.0.1 4711 2>/dev/null && break; "
        "usleep 50000; done; wait; cat /tmp/got; grep -w box /etc/hosts"
    )
    r = env.sh(script, "--hostname", "box")
    assert r.stdout == "inside\n127.0.0.1\tbox\n", r.stderr


# -- what the command finds around it, as in podman --------------------------------------
# The environment (but the host name: below), podman's mark of a container, the umask, the
# process' status and podman's mounts in /dev. Not compared: the rlimits (the caller's:
# README, Running a process), the mode
# of .containerenv (podman's is 0755 with --read-only, 0644 otherwise; ours always 0644).
VIEW = (
    "env | grep -E '^(PATH|TERM|HOME|container)=' | sort; stat -c '%n %s' /run/.containerenv; "
    "umask; cat /proc/self/oom_score_adj; grep -E '^(NoNewPrivs|Seccomp):' /proc/self/status; "
    'awk \'$5 == "/dev/pts" || $5 == "/dev/mqueue" {print $5, $6, $(NF-2), $NF}\' '
    "/proc/self/mountinfo | sort"
)


@pytest.mark.parametrize("opts", [(), ("--network", "none"), ("-u", "1000"), ("-w", "/etc")])
def test_container_view_as_podman(env: Env, podman: Podman, opts: tuple[str, ...]) -> None:
    """TERM=xterm (containers.conf's default env, without -t too), an empty
    /run/.containerenv, /dev/mqueue of the container's ipc namespace and /dev/pts with
    gid=5 (terminals of the tty group), as podman gives them."""
    ours = env.sh(VIEW, *opts)
    assert ours.returncode == 0, ours.stderr
    assert ours.stdout == podman.sh(VIEW, *opts).stdout
    assert "TERM=xterm\n/run/.containerenv 0\n" in ours.stdout
    assert "/dev/pts rw,nosuid,noexec,relatime devpts rw,gid=5," in ours.stdout
    r = env.sh("echo $TERM", "-e", "TERM=vt100")
    assert r.stdout == "vt100\n", r.stderr


def test_read_only_as_podman(env: Env, podman: Podman) -> None:
    """--read-only: tmpfs on /tmp and /var/tmp (1777) and /run (0755, root's: it was
    1777, where any user of the container made files), as podman; /run/.containerenv
    is there too (podman 4.3's tmpfs hides its own)."""
    script = "stat -c '%n %a' /tmp /var/tmp /run; touch /x"
    ours = env.sh(script, "--read-only")
    assert ours.stdout == podman.sh(script, "--read-only").stdout
    assert ours.stdout == "/tmp 1777\n/var/tmp 1777\n/run 755\n", ours.stderr
    assert "Read-only file system" in ours.stderr
    r = env.sh("cat /run/.containerenv && touch /run/x", "--read-only", "-u", "1000")
    assert r.stdout == "" and "Permission denied" in r.stderr, r.stderr


HOST_NAMES = (  # podman's /etc/hostname has no newline
    "hostname; echo $HOSTNAME; echo $(cat /etc/hostname); grep -v -e localhost -e runsc /etc/hosts"
)


def test_host_name_as_podman(env: Env, podman: Podman) -> None:
    """With a network namespace of its own, the container's name is 12 hex digits, as
    podman names it after the container's ID (the host's name is not given away), and
    it is on the loopback in /etc/hosts; with the host's network it is the host's."""
    for r in (env.sh(HOST_NAMES), podman.sh(HOST_NAMES, "--network", "none")):
        name = r.stdout.split()[0]
        assert re.fullmatch("[0-9a-f]{12}", name), r.stdout + r.stderr
        assert f"{name}\n{name}\n{name}\n" in r.stdout, r.stdout
        assert re.search(f"^127.0.0.1\t{name}\\b", r.stdout, re.M), r.stdout
        assert socket.gethostname() not in r.stdout.splitlines()[:3]
    host = socket.gethostname()
    for r in (env.sh(HOST_NAMES, "--network", "host"), podman.sh(HOST_NAMES)):
        assert r.stdout.splitlines()[:2] == [host, host], r.stdout + r.stderr
    assert env.sh("cat /etc/hostname", "--network", "host").stdout == f"{host}\n"


def test_unknown_network_mode_is_one_line(env: Env) -> None:
    r = env.sh("true", "--network", "bridge")
    assert r.returncode == 125 and r.stderr.count("\n") == 1, r.stderr
    assert "unsupported network mode 'bridge'" in r.stderr


def test_network_ns_path(env: Env) -> None:
    """--network ns:PATH joins that namespace (podman's spelling), as it is: its loopback
    stays down, pyunion brings up only the one of a namespace it made. A path that is
    no network namespace is one line."""
    holder = subprocess.Popen(["unshare", "--net", "sleep", "60"])
    try:
        path = f"/proc/{holder.pid}/ns/net"
        for _ in range(100):  # until unshare has exec'd sleep in the new namespace
            if os.readlink(path) != os.readlink("/proc/self/ns/net"):
                break
            time.sleep(0.02)
        r = env.sh(
            "readlink /proc/self/ns/net; ls /sys/class/net; cat /sys/class/net/lo/flags",
            "--network",
            f"ns:{path}",
        )
        assert r.stdout == f"{os.readlink(path)}\nlo\n0x8\n", r.stderr
    finally:
        holder.kill()
        holder.wait(timeout=10)
    r = env.sh("true", "--network", "ns:/etc/passwd")
    assert r.returncode == 125 and r.stderr.count("\n") == 1, r.stderr
    assert "not a network namespace" in r.stderr


@needs_pids
def test_container_cannot_lift_its_pids_limit(env: Env) -> None:
    """seccomp=unconfined lifts the filter, not the pids limit. Without the filter the
    container's root makes a user and a cgroup namespace, mounts the pids hierarchy
    there, whose root is then its own group, and writes "max" to that group's
    pids.max (the host's root owns it, and is the container's: cgroup v1 has no
    nsdelegate). The limit is on the group above, which it cannot name. The groups
    it made below its own go with it (the leftover check)."""
    found = cgroups.hierarchy("pids")
    assert found is not None
    fork = "i=0; while [ $i -lt 40 ]; do sleep 5 & i=$((i+1)); done; echo survived"
    opts = ("--pids-limit", "12", "--security-opt", "seccomp=unconfined")
    r = env.sh(f"hostile unlimit {'V2' if found[1] else 'V1'}; {fork}", *opts)
    assert "unlimited" in r.stdout or "write errno" in r.stdout, r.stdout  # it got that far
    assert "survived" not in r.stdout, (r.stdout, r.stderr)
    assert "fork" in r.stderr, r.stderr


@pytest.mark.skipif(cgroups.hierarchy("memory") is None, reason="no memory cgroup controller")
def test_memory_limit_as_podman(env: Env, podman: Podman) -> None:
    """--memory 32m: past it the command is killed, 137, under it it runs, as podman's;
    the limit podman's container reads in its cgroup is the one pyunion's group has
    (memory plus swap too: podman's default, twice the memory)."""
    grow = "awk 'BEGIN {{ s = \"x\"; while (length(s) < {}) s = s s; print length(s) }}'"
    for size, status in ((128 << 20, 137), (4 << 20, 0)):
        ours = env.sh(grow.format(size), "--memory", "32m")
        theirs = podman.sh(grow.format(size), "--memory", "32m")
        assert (ours.returncode, ours.stdout) == (theirs.returncode, theirs.stdout), ours.stderr
        assert ours.returncode == status, ours.stderr
    point, v2 = cgroups.hierarchy("memory")  # type: ignore[misc]
    files = ("memory.max", "memory.swap.max") if v2 else ("memory.limit_in_bytes",)
    if not v2 and os.path.exists(os.path.join(point, "memory.memsw.limit_in_bytes")):
        files += ("memory.memsw.limit_in_bytes",)
    inside = "/sys/fs/cgroup/" if v2 else "/sys/fs/cgroup/memory/"
    theirs = podman.sh(f"cd {inside} && cat {' '.join(files)}", "--memory", "32m")
    assert theirs.returncode == 0, theirs.stderr
    script = "grep -E '" + ("^0::" if v2 else "^[0-9]+:memory:") + "' /proc/self/cgroup; sleep 30"
    p = subprocess.Popen(
        env.cmd("--memory", "32m", command=("sh", "-c", script)),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env.env,
    )
    try:
        assert p.stdout is not None
        rel = p.stdout.readline().strip().split(":", 2)[2].lstrip("/")
        group = Path(point, rel).parent  # above `cgroups.INNER`
        ours_files = "".join((group / f).read_text() for f in files)
        assert ours_files == theirs.stdout
    finally:
        p.kill()
        p.communicate(timeout=20)


# -- podman's options and their results ----------------------------------------------------
GROUPS = "grep -E '^(Uid|Gid|Groups):' /proc/self/status"


@pytest.mark.parametrize(
    "opts",
    [
        (),
        ("-u", "0"),
        ("-u", "alice"),
        ("-u", "root:users"),
        ("--group-add", "users"),
        ("--group-add", "10", "-u", "alice"),
        ("-u", "1000:100", "--group-add", "users", "--group-add", "4242"),
        ("-u", "4242", "--group-add", "wheel"),
    ],
)
def test_groups_as_podman(env: Env, podman: Podman, opts: tuple[str, ...]) -> None:
    """Supplementary groups: the user's memberships in the image's /etc/group, its
    primary group only when a user is named (podman leaves it out for the default
    user), and --group-add's by name or number."""
    ours = env.sh(GROUPS, *opts)
    assert ours.returncode == 0, ours.stderr
    assert ours.stdout == podman.sh(GROUPS, *opts).stdout


@pytest.mark.parametrize(
    "opts",
    [
        ("-u", "nosuch"),
        ("-u", "alice:nosuch"),
        ("--group-add", "nosuch"),
        ("-w", "/etc/passwd"),
    ],
)
def test_what_cannot_be_invoked_is_126_as_podman(
    env: Env, podman: Podman, opts: tuple[str, ...]
) -> None:
    """A user, a group or a working directory the image cannot give: the command cannot
    be invoked, 126 as in podman (not 125, pyunion's own failures), in one line."""
    ours = env.sh("echo ran", *opts)
    assert (ours.returncode, ours.stdout) == (126, ""), ours.stderr
    assert ours.stderr.count("\n") == 1 and ours.stderr.startswith("pyunion: "), ours.stderr
    r = podman.run(*opts, command=("sh", "-c", "echo ran"), ok=False)
    assert (r.returncode, r.stdout) == (126, ""), r.stderr


def test_podmans_run_options_are_taken(env: Env, podman: Podman) -> None:
    """--rm (what pyunion always does), --init (catatonit is always pid 1) and --name
    (on the container's line of /etc/hosts, after its host name, as podman writes it)."""
    script = "grep -w box /etc/hosts; cat /proc/1/comm"
    opts = ("--rm", "--init", "--name", "web.1", "--hostname", "box")
    ours = env.sh(script, *opts)
    assert ours.stdout.startswith("127.0.0.1\tbox web.1\n"), ours.stderr
    assert ours.stdout.endswith("catatonit\n"), ours.stdout
    theirs = podman.sh(script, *opts, "--network", "none")
    assert ours.stdout.splitlines()[0] == theirs.stdout.splitlines()[0]
    r = env.sh("true", "--rm", "--keep")
    assert r.returncode == 125 and r.stderr.count("\n") == 1, r.stderr
    r = env.sh("true", "--name", "a/b")
    assert r.returncode == 125 and "--name" in r.stderr and r.stderr.count("\n") == 1, r.stderr


def test_an_unknown_option_is_125(env: Env) -> None:
    """As podman: a usage error of run exits 125 (argparse's own is 2)."""
    r = subprocess.run(
        env.cmd("--no-such-option", command=("true",)),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env=env.env,
        stdin=subprocess.DEVNULL,
    )
    assert r.returncode == 125, r.stderr
    assert "--no-such-option" in r.stderr


def test_tty_term_and_empty_home_as_podman(env: Env, podman: Podman) -> None:
    """-t gives TERM=xterm whatever the caller's TERM (podman's containers.conf default),
    and an empty HOME is the user's home (runc fills it in)."""
    script = "echo $TERM $HOME"
    opts = ("-t", "-u", "alice", "-e", "HOME=")
    ours = subprocess.run(
        env.cmd(*opts, command=("sh", "-c", script)),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**env.env, "TERM": "vt100"},
        stdin=subprocess.DEVNULL,
    )
    assert ours.stdout.replace("\r", "") == "xterm /home/alice\n", ours.stderr
    theirs = podman.sh(script, *opts)
    assert ours.stdout == theirs.stdout


TMPFS = (
    "awk '$5 ~ \"^/srv\" {print $5, $6, $9, $NF}' /proc/self/mountinfo; "
    "stat -c '%n %a %u:%g' /srv/data /srv/data/f /srv/data/link; "
    "cat /srv/data/f; readlink /srv/data/link; echo x > /srv/data/new && echo written"
)


@pytest.mark.parametrize(
    "spec",
    [
        "/srv/data",
        "/srv/data:ro",
        "/srv/data:size=1m,mode=700,noexec",
        "/srv/data:notmpcopyup,mode=1770",
        "/srv/new:exec,nosuid",
    ],
)
def test_tmpfs_as_podman(env: Env, podman: Podman, spec: str) -> None:
    """--tmpfs: podman's options (nosuid and nodev by default, not noexec), and the
    image's content at that place copied up into it (tmpcopyup, the default)."""
    ours = env.sh(TMPFS, "--tmpfs", spec)
    theirs = podman.sh(TMPFS, "--tmpfs", spec)
    assert ours.stdout == theirs.stdout, ours.stderr
    assert " tmpfs " in ours.stdout


@pytest.mark.parametrize(
    "opts,script",
    [
        (("--ulimit", "nofile=512:800"), "ulimit -Sn; ulimit -Hn"),
        (("--ulimit", "nofile=300"), "ulimit -Sn; ulimit -Hn"),
        (
            ("--ulimit", "core=0:0", "--ulimit", "nproc=50:60", "--ulimit", "memlock=1024:4096"),
            "ulimit -Sc; ulimit -Hc; ulimit -Su; ulimit -Hu; ulimit -Sl; ulimit -Hl",
        ),
    ],
)
def test_ulimit_as_podman(env: Env, podman: Podman, opts: tuple[str, ...], script: str) -> None:
    """--ulimit NAME=SOFT[:HARD] (-1: unlimited), as podman sets them on the command."""
    ours = env.sh(script, *opts)
    assert ours.returncode == 0, ours.stderr
    assert ours.stdout == podman.sh(script, *opts).stdout
    r = env.sh("true", "--ulimit", "nofiles=1")
    assert r.returncode == 125 and r.stderr.count("\n") == 1, r.stderr


def test_ulimit_above_the_callers_hard_limit(env: Env, podman: Podman) -> None:
    """Raising a hard limit needs CAP_SYS_RESOURCE, where the caller has it: without it
    one line and 126, as podman's (runc's) "error setting rlimit"."""
    hard = resource.getrlimit(resource.RLIMIT_NPROC)[1]
    if hard == resource.RLIM_INFINITY:
        pytest.skip("the caller's hard process limit is unlimited already")
    opts = ("--ulimit", f"nproc={hard + 1}")
    r = podman.run(*opts, command=("true",), ok=False)
    ours = env.sh("ulimit -Hu", *opts)
    if r.returncode == 0:  # the caller may raise it
        assert ours.stdout == f"{hard + 1}\n", ours.stderr
    else:
        assert (ours.returncode, r.returncode) == (126, 126), ours.stderr
        assert ours.stderr.count("\n") == 1 and "--ulimit" in ours.stderr, ours.stderr


# -- an image, run by name -------------------------------------------------------------------
@pytest.fixture(scope="module")
def images(
    rootfs: Path, podman: Podman, tmp_path_factory: pytest.TempPathFactory
) -> tuple[str, Callable[..., subprocess.CompletedProcess[str]]]:
    """The rootfs as images in a store of pyunion's and, loaded from pyunion's own
    `docker save` export, in podman's: t/base (the sample's config: User alice,
    WorkingDir /home/alice), t/ep (Entrypoint, Cmd, a WorkingDir the tree lacks).
    Returns the store and a `pyunion run --store STORE` runner."""
    from unionfs.sample import build_sample_oci

    base = tmp_path_factory.mktemp("images")
    store = str(base / "store")

    def pyunion(*args: str, **kw: Any) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "unionfs", *args],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
            stdin=subprocess.DEVNULL,
            env={**os.environ, "TMPDIR": str(tmp_path_factory.mktemp("tmpdir"))},
            **kw,
        )

    oci = build_sample_oci(base, [str(rootfs)])
    r = pyunion("image", "import", "-q", "--store", store, "--tag", "t/base", oci)
    assert r.returncode == 0, r.stderr
    (base / "empty").mkdir()
    config = ("--entrypoint", '["echo", "E"]', "--cmd", '["c1", "c2"]', "-w", "/wd")
    r = pyunion(
        "commit",
        str(base / "empty"),
        "--image",
        "t/base",
        "--tag",
        "t/ep",
        "--store",
        store,
        *config,
    )
    assert r.returncode == 0, r.stderr
    for name in ("t/base", "t/ep"):
        archive = base / (name.replace("/", "-") + ".tar")
        r = pyunion("image", "export", "--format", "docker", "--store", store, name, str(archive))
        assert r.returncode == 0, r.stderr
        r = podman.podman("load", "-q", "-i", str(archive), timeout=120)
        assert r.returncode == 0, r.stderr

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return pyunion("run", "--store", store, *args)

    return store, run


IMAGE_CASES = [
    ("t/ep", (), ()),
    ("t/ep", (), ("x", "y")),
    ("t/ep", ("--entrypoint", ""), ("echo", "hi")),
    ("t/ep", ("--entrypoint", "echo"), ()),
    ("t/ep", ("--entrypoint", '["echo", "J"]'), ("q",)),
    ("t/ep", ("--entrypoint", "echo K"), ("q",)),
    ("t/ep", ("--entrypoint", "sh", "-u", "0"), ("-c", "pwd; id; ls -ld /wd")),
    ("t/ep", ("--entrypoint", "sh"), ("-c", "pwd; id; ls -ld /wd")),
    ("t/ep", ("--entrypoint", "sh", "-w", "/no/such"), ("-c", "pwd")),
    ("t/ep", ("--entrypoint", "sh", "--read-only"), ("-c", "pwd; ls -ld /wd")),
    ("t/base", (), ("sh", "-c", "pwd; id; env | grep -v ^HOSTNAME= | sort")),
    ("t/base", ("-e", "container=other"), ("sh", "-c", "echo $container")),
    ("t/base", ("-w", "/etc"), ("pwd",)),
]


@pytest.mark.parametrize("image,opts,command", IMAGE_CASES)
def test_image_run_as_podman(
    images: tuple[str, Callable[..., subprocess.CompletedProcess[str]]],
    podman: Podman,
    image: str,
    opts: tuple[str, ...],
    command: tuple[str, ...],
) -> None:
    """An image run by name: its Entrypoint and Cmd with --entrypoint (a JSON array
    too) and a command, its User and WorkingDir (made when the tree lacks it; a
    missing -w is 126), its Env with podman's `container=podman`, as podman runs it."""
    _, run = images
    ours = run("--network", "host", *opts, image, "--", *command)
    theirs = podman.run_image("localhost/" + image, *opts, command=command)
    assert (ours.returncode, ours.stdout) == (theirs.returncode, theirs.stdout), (
        ours.stderr,
        theirs.stderr,
    )


def test_env_file_as_podman(env: Env, podman: Podman, tmp_path: Path) -> None:
    """--env-file as podman reads it: leading blanks dropped, the rest of the line kept
    (trailing blanks, quotes, `=` in the value), CRLF line ends, a bare name taking the
    caller's value (and none when unset), `#` comments; then -e NAME from the caller."""
    envfile = tmp_path / "envfile"
    envfile.write_bytes(
        b'  A=1\nC="q"\nD\nE=\nF=a=b\n# c\n\nG=tab\tx \r\nH=crlf\r\nNOPE\nI=\x0bv\x1cw\n'
    )
    script = "env | grep -E '^[A-IW]' | grep -v -e ^HOSTNAME= -e ^HOME= | sort"
    opts = ("--env-file", str(envfile), "-e", "W", "-e", "B= sp")
    host = {**os.environ, "D": "fromD", "W": "fromW"}
    host.pop("NOPE", None)
    ours = subprocess.run(
        env.cmd(*opts, command=("sh", "-c", script)),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**env.env, **host},
        stdin=subprocess.DEVNULL,
    )
    theirs = subprocess.run(
        podman.cmd(*opts, command=("sh", "-c", script)),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env=host,
        stdin=subprocess.DEVNULL,
    )
    assert ours.stdout == theirs.stdout, (ours.stderr, theirs.stderr)
    assert "G=tab\tx \n" in ours.stdout and "D=fromD\n" in ours.stdout


def test_privileged_dev_as_podman(env: Env, podman: Podman) -> None:
    """--privileged: the host's device nodes, below /dev's directories too, with their
    numbers, modes and owners, as podman gives them (not the console, nor the host's
    ptmx: the container's pts has its own)."""
    script = "find /dev \\( -type c -o -type b \\) -exec stat -c '%n %F %t:%T %a %u:%g' {} + | sort"
    ours = env.sh(script, "--privileged")
    theirs = podman.sh(script, "--privileged")
    assert ours.stdout == theirs.stdout, ours.stderr
    assert "/dev/fuse character special file a:e5 666" in ours.stdout
    assert "/dev/fuse" not in env.sh(script).stdout  # not without it


@pytest.mark.parametrize(
    "name",
    [
        "ref:1",
        "library/ref:1",
        "docker.io/ref:1",
        "docker.io/library/ref:1",
        "index.docker.io/library/ref:1",
        "index.docker.io/ref:1",
        "ref",
        "quay.io/library/ref:1",
        "localhost/ref:1",
    ],
)
def test_image_names_as_podman(
    images: tuple[str, Callable[..., subprocess.CompletedProcess[str]]],
    podman: Podman,
    tmp_path: Path,
    name: str,
) -> None:
    """docker.io/library/ref:1 is found by the names podman finds it by (docker's
    normalisation: `docker.io/ref`, `index.docker.io/...`, the short name), and only by
    those."""
    store, _ = images
    pyunion = [sys.executable, "-m", "unionfs"]
    tag = "docker.io/library/ref:1"
    subprocess.run([*pyunion, "tag", "--store", store, "t/base", tag], check=True, timeout=60)
    archive = tmp_path / "ref.tar"
    export = ["image", "export", "--format", "docker", "--store", store, tag, str(archive)]
    subprocess.run([*pyunion, *export], check=True, timeout=120, capture_output=True)
    assert podman.podman("load", "-q", "-i", str(archive), timeout=120).returncode == 0
    theirs = podman.podman("image", "inspect", name)
    ours = subprocess.run(
        [*pyunion, "inspect", "--store", store, name], capture_output=True, text=True, timeout=60
    )
    assert (ours.returncode == 0) == (theirs.returncode == 0), (ours.stderr, theirs.stderr)


def test_mount_option_as_podman(env: Env, podman: Podman, tmp_path: Path) -> None:
    """--mount type=bind|tmpfs, podman's long form of -v and --tmpfs, with their keys
    (src/source, dst/target/destination, readonly, tmpfs-size, tmpfs-mode)."""
    vol = tmp_path / "vol"
    (vol / "sub").mkdir(parents=True)
    (vol / "f").write_text("v\n")
    opts = (
        *("--mount", f"type=bind,source={vol},target=/srv/v,readonly"),
        *("--mount", f"type=bind,src={vol},dst=/srv/w,readonly=false"),
        *("--mount", "type=tmpfs,destination=/srv/data,tmpfs-size=1m,tmpfs-mode=0700"),
    )
    script = (
        "awk '$5 ~ \"^/srv\" {print $5, $6, $9, $NF}' /proc/self/mountinfo | sort; "
        "cat /srv/v/f /srv/data/f; touch /srv/w/new && touch /srv/v/new"
    )
    ours = env.sh(script, *opts)
    theirs = podman.sh(script, *opts)
    # pyunion's binds are nodev (Security): that aside, the mounts are podman's.
    assert "/srv/v ro,nodev,relatime " in ours.stdout
    assert re.sub(r"(/srv/[vw] r[ow]),nodev", r"\1", ours.stdout) == theirs.stdout, ours.stderr
    assert "Read-only file system" in ours.stderr
    for bad in ("type=volume,target=/x", "type=bind,target=/x", f"type=bind,src={vol},dst=/x,nope"):
        r = env.sh("true", "--mount", bad)
        assert r.returncode == 125 and r.stderr.count("\n") == 1, r.stderr


def test_etc_files_read_only_as_podman(env: Env, podman: Podman) -> None:
    """With --read-only, /etc/hosts and /etc/hostname are read-only too (nosuid, nodev,
    noexec), as podman binds them; without it they are writable, as in podman."""
    script = (
        'awk \'$5 == "/etc/hosts" || $5 == "/etc/hostname" {print $5, $6}\' '
        "/proc/self/mountinfo | sort; echo >> /etc/hosts && echo written"
    )
    for opts in (("--read-only",), ()):
        ours = env.sh(script, *opts)
        assert ours.stdout == podman.sh(script, *opts).stdout, ours.stderr
    assert "written" not in env.sh(script, "--read-only").stdout


def test_dev_mount_options_as_podman(env: Env, podman: Podman) -> None:
    """/dev is a tmpfs with strictatime (no relatime shown), as runc mounts it; its
    nodev is pyunion's (Security). The masks bound from /dev/null carry the same."""
    script = (
        'awk \'$5 == "/dev" || $5 == "/proc/keys" {print $5, $6, $9, $NF}\' '
        "/proc/self/mountinfo | sort"
    )
    ours = env.sh(script)
    assert ours.stdout.replace("nosuid,nodev,", "nosuid,") == podman.sh(script).stdout
    assert ours.stdout.startswith("/dev rw,nosuid,nodev,noexec tmpfs"), ours.stdout


@pytest.mark.parametrize(
    "fmt,names",
    [
        ("docker-archive", ("localhost/t/ep",)),
        ("oci-archive", ("localhost/t/ep",)),
        ("oci-dir", ("localhost/t/ep",)),
        ("docker-archive", ("localhost/t/ep", "localhost/t/base")),  # podman save -m
    ],
)
def test_import_what_podman_saves(
    images: tuple[str, Callable[..., subprocess.CompletedProcess[str]]],
    podman: Podman,
    tmp_path: Path,
    fmt: str,
    names: tuple[str, ...],
) -> None:
    """podman save's archives (one image or several) import under podman's names, and
    run as podman runs them."""
    out = tmp_path / "saved"
    multi = ("-m",) if len(names) > 1 else ()
    r = podman.podman("save", "-q", *multi, "--format", fmt, "-o", str(out), *names, timeout=120)
    assert r.returncode == 0, r.stderr
    store = str(tmp_path / "store")
    pyunion = [sys.executable, "-m", "unionfs"]
    r = subprocess.run(
        [*pyunion, "image", "import", "--store", store, str(out)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    listed = subprocess.run(
        [*pyunion, "images", "--store", store], capture_output=True, text=True, timeout=60
    ).stdout
    for name in names:
        assert f"{name} " in listed, listed
    run = [*pyunion, "run", "--store", store, "--network", "host", names[0]]
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    ours = subprocess.run(run, capture_output=True, text=True, timeout=60, env=env)
    assert (ours.returncode, ours.stdout) == (0, "E c1 c2\n"), ours.stderr
    assert podman.run_image(names[0]).stdout == ours.stdout


def test_add_host_as_podman(env: Env, podman: Podman) -> None:
    """--add-host NAME:IP (IPv6 too) puts its lines first in /etc/hosts, as podman; a
    bad one is one line and 125."""
    opts = ("--add-host", "db:10.0.0.5", "--add-host", "web.local:fe80::1")
    script = "head -2 /etc/hosts; ping -c1 -W1 db 2>&1 | head -1"
    ours = env.sh(script, *opts)
    assert ours.stdout.startswith("10.0.0.5\tdb\nfe80::1\tweb.local\n"), ours.stderr
    assert ours.stdout == podman.sh(script, *opts, "--network", "none").stdout
    for bad in ("db", "db:10.0.0.256", "d b:10.0.0.1", ":10.0.0.1"):
        r = env.sh("true", "--add-host", bad)
        assert r.returncode == 125 and r.stderr.count("\n") == 1, r.stderr


def test_relative_volume_source_as_podman(env: Env, podman: Podman, tmp_path: Path) -> None:
    """-v ./DIR:... is the caller's DIR (podman: a source starting with "." is a path,
    made absolute; one without "/" or "." would be a named volume)."""
    (tmp_path / "rel").mkdir()
    (tmp_path / "rel/f").write_text("relative\n")
    opts = ("-v", "./rel:/srv/r:ro")
    ours = subprocess.run(
        env.cmd(*opts, command=("cat", "/srv/r/f")),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env=env.env,
        cwd=tmp_path,
        stdin=subprocess.DEVNULL,
    )
    theirs = subprocess.run(
        podman.cmd(*opts, command=("cat", "/srv/r/f")),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=tmp_path,
        stdin=subprocess.DEVNULL,
    )
    assert (ours.returncode, ours.stdout) == (0, "relative\n"), ours.stderr
    assert ours.stdout == theirs.stdout


def test_tmpfs_dev_keeps_device_nodes_shut(env: Env, tmp_path: Path) -> None:
    """--tmpfs DIR:dev stays nodev (as every mount the container can write, Security):
    a device node the image ships there, copied up, must not open (podman's devices
    cgroup refuses it; there is none here). --privileged lifts it, as for /dev."""
    top = tmp_path / "top"
    (top / "srv/nodes").mkdir(parents=True)
    os.mknod(top / "srv/nodes/zero", 0o666 | stat.S_IFCHR, os.makedev(1, 5))
    env.layers = [str(top), *env.layers]
    script = "head -c1 /srv/nodes/zero | od -An -c; grep ' /srv/nodes ' /proc/self/mountinfo"
    r = env.sh(script, "--tmpfs", "/srv/nodes:dev")
    assert "Permission denied" in r.stderr, r.stderr
    assert r.stdout.split()[5].split(",")[:3] == ["rw", "nosuid", "nodev"], r.stdout
    r = env.sh(script, "--tmpfs", "/srv/nodes:dev", "--privileged")
    assert r.stdout.split()[0] == "\\0", r.stderr


def test_tmpfs_on_etc_as_podman(env: Env, podman: Podman) -> None:
    """--tmpfs /etc: the image's /etc copied in, and /etc/hosts and /etc/hostname bound
    on top of it (podman sorts its mounts outer first)."""
    script = (
        "awk '$5 ~ \"^/etc\" {print $5, $6, $9}' /proc/self/mountinfo | sort; "
        "grep -w box /etc/hosts | cut -f1; echo $(cat /etc/hostname); "
        '[ "$(stat -c %d /etc/hosts)" != "$(stat -c %d /etc)" ] && echo hosts bound on top'
    )
    opts = ("--tmpfs", "/etc", "--hostname", "box")
    ours = env.sh(script, *opts)
    assert ours.stdout == podman.sh(script, *opts, "--network", "none").stdout, ours.stderr
    assert ours.stdout.startswith("/etc rw,nosuid,nodev,relatime tmpfs\n"), ours.stdout
    assert ours.stdout.endswith("box\nhosts bound on top\n"), ours.stdout
    assert env.sh("cat /etc/os-release", *opts).stdout == env.sh("cat /etc/os-release").stdout


def test_tmpfs_copies_nothing_a_symlink_leads_to(env: Env, tmp_path: Path) -> None:
    """An image whose --tmpfs target is a symlink to /proc/sys: the tmpfs goes there (in
    the tree), but nothing of procfs is copied into it, only the image's own files are."""
    top = tmp_path / "top"
    (top / "srv").mkdir(parents=True)
    os.symlink("/proc/sys/kernel", top / "srv/k")
    env.layers = [str(top), *env.layers]
    r = env.sh("ls /proc/sys/kernel | wc -l", "--tmpfs", "/srv/k")
    assert r.stdout == "0\n", r.stderr


@pytest.mark.parametrize(
    "opts",
    [(), ("--http-proxy=false",), ("--env-host", "-e", "FOO_H=cli"), ("--env-host",)],
)
def test_proxy_and_host_env_as_podman(env: Env, podman: Podman, opts: tuple[str, ...]) -> None:
    """The caller's proxy variables reach the command (podman's --http-proxy, on by
    default); --env-host passes the caller's whole environment, under the image's Env
    and -e."""
    # TMPDIR: pyunion's own temporary tree, and podman sets one for itself
    script = "env | grep -v -e ^HOSTNAME= -e ^PWD= -e ^SHLVL= -e ^_= -e ^TMPDIR= | sort"
    host = {
        "LANG": "C.UTF-8",  # else Python coerces the C locale, adding LC_CTYPE (PEP 538)
        "PATH": "/usr/bin:/bin",
        "HOME": "/root",
        "http_proxy": "http://proxy:3128",
        "NO_PROXY": "localhost",
        "FOO_H": "host",
    }

    def run(cmd: list[str], extra: dict[str, str]) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            cmd,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
            env={**host, **extra},
            stdin=subprocess.DEVNULL,
        )

    ours = run(env.cmd(*opts, command=("sh", "-c", script)), {"TMPDIR": str(env.tmp)})
    theirs = run(podman.cmd(*opts, command=("sh", "-c", script)), {})
    assert ours.stdout == theirs.stdout, ours.stderr
    assert ("http_proxy=http://proxy:3128\n" in ours.stdout) == (opts != ("--http-proxy=false",))


def test_device_as_podman(env: Env, podman: Podman) -> None:
    """--device HOST[:CONTAINER[:PERMS]]: the host's node (numbers, mode, owner), under
    /dev or anywhere, and it opens although pyunion's mounts are nodev."""
    opts = (
        *("--device", "/dev/fuse", "--device", "/dev/zero:/dev/myzero"),
        *("--device", "/dev/net/tun:rwm", "--device", "/dev/zero:/srv/z"),
    )
    nodes = "/dev/fuse /dev/myzero /dev/net/tun /srv/z"
    script = f"stat -c '%n %F %t:%T %a %u:%g' {nodes}; head -c1 /srv/z | od -An -c"
    ours = env.sh(script, *opts)
    assert ours.returncode == 0, ours.stderr
    assert ours.stdout == podman.sh(script, *opts).stdout
    assert ours.stdout.endswith("\\0\n"), ours.stdout
    for bad in ("/etc/passwd", "/dev/null:/dev/n:r", "/dev/null:rel", "/no/such"):
        r = env.sh("true", "--device", bad)
        assert r.returncode == 125 and r.stderr.count("\n") == 1, r.stderr


@pytest.mark.parametrize(
    "opts", [(), ("--shm-size", "1g"), ("--shm-size=128m",), ("--shm-size", "100000")]
)
def test_shm_size_as_podman(env: Env, podman: Podman, opts: tuple[str, ...]) -> None:
    """/dev/shm is podman's 64000k by default, --shm-size sets it (docker's units)."""
    script = "awk '$5 == \"/dev/shm\" {print $6, $9, $NF}' /proc/self/mountinfo"
    ours = env.sh(script, *opts)
    assert ours.returncode == 0, ours.stderr
    assert ours.stdout == podman.sh(script, *opts).stdout
    r = env.sh("true", "--shm-size", "lots")
    assert r.returncode == 125 and "--shm-size: 'lots' is no size" in r.stderr, r.stderr
