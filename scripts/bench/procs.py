"""Processes and the kernel: commands with time limits, the page cache, the mount
table, and the daemon behind a FUSE mount (found by its command line, which holds
the mount point: every instance has a mount point of its own)."""

from __future__ import annotations

import contextlib
import os
import select
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

CLK_TCK = os.sysconf("SC_CLK_TCK")


class CommandFailed(RuntimeError):
    pass


def run(
    cmd: list[str],
    timeout: float,
    what: str = "",
    log: Path | None = None,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run `cmd` in a session of its own; on a timeout or an interrupt, kill that session
    (only processes this run started). A daemon that `cmd` forks keeps its output in `log`
    (never a pipe, which would keep `cmd` from seeming to finish)."""
    with contextlib.ExitStack() as stack:
        out = stack.enter_context(open(log, "a")) if log else None
        p = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=out or subprocess.PIPE,
            stderr=out or subprocess.PIPE,
            text=True,
            start_new_session=True,
            env=env,
        )
        try:
            if out is None:
                stdout, stderr = p.communicate(timeout=timeout)
            else:
                stdout, stderr = None, None
                _wait(p, timeout)
        except BaseException:
            _kill_session(p)
            raise
    if p.returncode != 0:
        detail = (stderr or "").strip()
        if log and not detail:
            with contextlib.suppress(OSError):
                detail = log.read_text().strip()[-2000:]
        raise CommandFailed(f"{what or cmd[0]}: exit {p.returncode}: {detail[-2000:]}")
    return subprocess.CompletedProcess(cmd, p.returncode, stdout, stderr)


def _wait(p: subprocess.Popen[str], timeout: float) -> None:
    """Wait for `p` to exit, woken by its exit (a pidfd). `Popen.wait(timeout)` polls in
    sleeps that double up to 50 ms: a mount that took 33 ms was measured as 63 ms."""
    fd = os.pidfd_open(p.pid)
    try:
        if not select.select([fd], [], [], timeout)[0]:
            raise subprocess.TimeoutExpired(p.args, timeout)
    finally:
        os.close(fd)
    p.wait()


def _kill_session(p: subprocess.Popen[str]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(p.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired, OSError, ValueError):
        p.communicate(timeout=10)


def drop_caches(level: int = 3) -> None:
    """Write back, then drop the page cache (level 1), or it and the dentries and
    inodes (3: cold runs)."""
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write(f"{level}\n")


def mountpoints() -> set[str]:
    out = set()
    with open("/proc/self/mountinfo") as f:
        for line in f:
            mp = line.split()[4]
            out.add(mp.replace("\\040", " ").replace("\\011", "\t").replace("\\134", "\\"))
    return out


def is_mounted(path: Path) -> bool:
    return os.path.realpath(path) in mountpoints()


def wait_until(pred: Callable[[], bool], timeout: float, step: float = 0.01) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(step)
    return pred()


# -- the daemon of a FUSE mount ------------------------------------------------------
def holding(path: str) -> set[int]:
    """The processes that hold `path` open."""
    out = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"/proc/{entry}/fd"):
                with contextlib.suppress(OSError):
                    if os.readlink(f"/proc/{entry}/fd/{fd}") == path:
                        out.add(int(entry))
                        break
    return out


def forkservers(state: Path) -> set[int]:
    """The pyunion fork servers of the state dir `state`: interpreters booting
    `server_main` and holding that directory open."""
    out = set()
    for pid in holding(str(state)):
        with contextlib.suppress(OSError), open(f"/proc/{pid}/cmdline", "rb") as f:
            if b"forkserver import server_main" in f.read():
                out.add(pid)
    return out


def parent(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None


def find_daemon(mountpoint: Path, names: tuple[str, ...]) -> int | None:
    """The newest live process whose command line holds `mountpoint` as an argument and
    one of `names` (the program's name) in its first arguments."""
    mp = os.fsencode(os.path.realpath(mountpoint))
    best: tuple[float, int] | None = None
    me = os.getpid()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me:
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
            st = read_stat(int(entry))
        except OSError:
            continue
        if st is None or st.state == "Z":
            continue
        if not any(a == mp or a.endswith(b"/" + mp.lstrip(b"/")) for a in argv):
            continue
        head = b" ".join(argv[:3]).decode(errors="replace")
        if not any(n in head for n in names):
            continue
        key = (st.starttime, int(entry))
        if best is None or key > best:
            best = key
    return best[1] if best else None


@dataclass
class ProcStat:
    state: str
    cpu_s: float  # utime + stime of the whole process (all its threads)
    starttime: float


def read_stat(pid: int) -> ProcStat | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    # fields[0] is field 3 (state); utime and stime are fields 14 and 15; starttime 22
    return ProcStat(
        fields[0], (int(fields[11]) + int(fields[12])) / CLK_TCK, int(fields[19]) / CLK_TCK
    )


def read_hwm_kib(pid: int) -> int | None:
    """Peak resident set size (VmHWM) in KiB."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def read_pss_kib(pid: int) -> int | None:
    """Proportional set size (each shared page divided among its sharers) in KiB."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def alive(pid: int) -> bool:
    st = read_stat(pid)
    return st is not None and st.state != "Z"


def stop(pid: int, timeout: float = 10.0) -> None:
    """SIGTERM, then SIGKILL, a daemon this run started (found for its own mount point)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return
        if wait_until(lambda: not alive(pid), timeout, 0.05):
            return
