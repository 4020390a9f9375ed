"""The implementations: how each one mounts the layers, unmounts, and names its daemon.

Every measurement gets an instance of its own: a fresh upper (and work dir) and a
mount point under the run's scratch directory, or for "native" a fresh copy of
the merged tree (hard links, plus real copies of the files the workload writes
in place). Every instance is registered until it is torn down, so `cleanup_all`
can unmount whatever is left after an error or ^C.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from . import procs
from .image import rmtree

MOUNT_TIMEOUT = 60.0
UMOUNT_TIMEOUT = 60.0
REPO = Path(__file__).resolve().parents[2]
STATE_DIR = "/run/pyunion"  # root's pyunion state directory: a daemon's pid per mount
FORKSERVER_START_S = 30.0


def _version_line(text: str, name: str) -> str:
    """ "NAME X.Y, FUSE library A.B" from a --version output."""
    own = re.search(re.escape(name) + r"[^\n]*?version:?\s*([0-9][0-9.]*[0-9])", text)
    lib = re.search(r"FUSE library version:?\s*([0-9][0-9.]*[0-9])", text)
    return f"{name} {own.group(1) if own else '?'}" + (
        f", FUSE library {lib.group(1)}" if lib else ""
    )


class Layers(Protocol):
    kernel_layers: list[Path]
    unionfs_layers: list[Path]


class NotApplicable(Exception):
    pass


@dataclass
class Instance:
    impl: Impl
    base: Path
    root: Path  # where the workloads run
    mounted: bool = False
    pid: int | None = None  # the FUSE daemon
    stats: dict[str, float] = field(default_factory=dict)

    def find_daemon(self) -> None:
        if self.impl.daemon_names and self.pid is None:
            self.pid = self.impl.daemon_pid(self.root)

    def sample(self) -> dict[str, float]:
        """The daemon's peak RSS (MiB) and CPU time (s) so far."""
        self.find_daemon()
        if self.pid is None:
            return {}
        st = procs.read_stat(self.pid)
        hwm = procs.read_hwm_kib(self.pid)
        if st is None or hwm is None:
            return {}
        self.stats = {"rss_peak_mib": hwm / 1024, "cpu_s": st.cpu_s}
        pss = procs.read_pss_kib(self.pid)
        if pss is not None:  # pages shared with other processes (a fork server) count in part
            self.stats["pss_mib"] = pss / 1024
        return self.stats

    def teardown(self) -> None:
        try:
            if self.mounted or (self.impl.name != "native" and procs.is_mounted(self.root)):
                self.mounted = True
                self.sample()
                self.impl.unmount(self)
        finally:
            ACTIVE.discard(self)
        rmtree(self.base)

    __hash__ = object.__hash__


ACTIVE: set[Instance] = set()


def cleanup_all() -> None:
    """Unmount everything this run still has mounted (last resort: lazily)."""
    for inst in list(ACTIVE):
        try:
            inst.teardown()
        except Exception as e:  # noqa: BLE001  (go on with the others, then force it)
            print(f"bench: cleanup of {inst.root}: {e}", file=sys.stderr)
            if procs.is_mounted(inst.root):
                subprocess.run(
                    ["umount", "-l", str(inst.root)],
                    timeout=30,
                    stderr=subprocess.DEVNULL,
                    check=False,
                )
            if inst.pid is not None:
                procs.stop(inst.pid)


class Impl:
    name = ""
    daemon_names: tuple[str, ...] = ()
    fuse = False

    def missing(self) -> str | None:
        """Why this implementation cannot run here, or None."""
        return None

    def daemon_pid(self, root: Path) -> int | None:
        """The FUSE daemon of the mount at `root`."""
        return procs.find_daemon(root, self.daemon_names)

    def version(self) -> str:
        return ""

    def mount(self, layers: Layers, base: Path, private: tuple[str, ...] = ()) -> Instance:
        base.mkdir(parents=True)
        inst = Instance(self, base, base / "mnt")
        inst.root.mkdir()
        ACTIVE.add(inst)
        try:
            self._mount(layers, inst, private)
            inst.mounted = True
            if not procs.wait_until(lambda: procs.is_mounted(inst.root), 10, 0.002):
                raise procs.CommandFailed(f"{self.name}: {inst.root} did not appear mounted")
        except BaseException:
            inst.teardown()
            raise
        return inst

    def _mount(self, layers: Layers, inst: Instance, private: tuple[str, ...]) -> None:
        raise NotImplementedError

    # Measured in the mount workload only (not W1..W10, not the session).
    mount_only = False

    def ready(self, layers: Layers, base: Path) -> None:
        """Before a measured mount (untimed): whatever the implementation keeps running."""

    def check(self, inst: Instance) -> None:
        """After a measured mount (untimed): raise CommandFailed if it was not what it
        stands for."""

    def close(self) -> None:
        """At the end of the run: stop whatever it kept running."""

    def _dirs(self, inst: Instance) -> tuple[Path, Path]:
        upper, work = inst.base / "upper", inst.base / "work"
        upper.mkdir()
        work.mkdir()
        return upper, work

    def _overlay_opts(self, layers: Layers, inst: Instance) -> str:
        upper, work = self._dirs(inst)
        lower = ":".join(str(p) for p in layers.kernel_layers)
        return f"lowerdir={lower},upperdir={upper},workdir={work}"

    def unmount(self, inst: Instance) -> None:
        """Unmount; if that fails, detach lazily and stop the daemon."""
        try:
            self._unmount(inst)
        except Exception:
            if procs.is_mounted(inst.root):
                subprocess.run(
                    ["umount", "-l", str(inst.root)],
                    timeout=30,
                    stderr=subprocess.DEVNULL,
                    check=False,
                )
            if inst.pid is not None:
                procs.stop(inst.pid)
            raise
        finally:
            inst.mounted = procs.is_mounted(inst.root)
        pid = inst.pid
        if pid is not None and not procs.wait_until(lambda: not procs.alive(pid), 30, 0.02):
            procs.stop(pid)

    def _unmount(self, inst: Instance) -> None:
        procs.run(["umount", str(inst.root)], UMOUNT_TIMEOUT, f"umount ({self.name})")


class Native(Impl):
    """A plain merged copy on the host filesystem: the floor."""

    name = "native"

    def mount(self, layers: Layers, base: Path, private: tuple[str, ...] = ()) -> Instance:
        merged = getattr(layers, "merged", None)
        if merged is None:
            raise NotApplicable("native has no mount")
        base.mkdir(parents=True)
        inst = Instance(self, base, base / "root")
        ACTIVE.add(inst)
        try:
            procs.run(["cp", "-al", str(merged), str(inst.root)], 600, "cp -al")
            for rel in private:
                p = inst.root / rel
                tmp = p.with_name(p.name + ".bench-copy")
                shutil.copy2(merged / rel, tmp)
                os.rename(tmp, p)
        except BaseException:
            inst.teardown()
            raise
        return inst

    def unmount(self, inst: Instance) -> None:
        pass


class Kernel(Impl):
    name = "kernel"

    def missing(self) -> str | None:
        with open("/proc/filesystems") as f:
            if "overlay" not in f.read():
                subprocess.run(
                    ["modprobe", "overlay"], timeout=30, stderr=subprocess.DEVNULL, check=False
                )
        with open("/proc/filesystems") as f:
            return None if "overlay" in f.read() else "no overlay filesystem in this kernel"

    def version(self) -> str:
        params = Path("/sys/module/overlay/parameters")
        opts = []
        for p in ("redirect_dir", "index", "metacopy", "xino_auto"):
            with contextlib.suppress(OSError):
                opts.append(f"{p}={(params / p).read_text().strip()}")
        return f"Linux {os.uname().release} ({', '.join(opts)})"

    def _mount(self, layers: Layers, inst: Instance, private: tuple[str, ...]) -> None:
        procs.run(
            [
                "mount",
                "-t",
                "overlay",
                "overlay",
                "-o",
                self._overlay_opts(layers, inst),
                str(inst.root),
            ],
            MOUNT_TIMEOUT,
            "mount -t overlay",
        )


class FuseOverlayfs(Impl):
    name = "fuse-overlayfs"
    daemon_names = ("fuse-overlayfs",)
    fuse = True

    def missing(self) -> str | None:
        return None if shutil.which("fuse-overlayfs") else "fuse-overlayfs is not installed"

    def version(self) -> str:
        try:
            out = subprocess.run(
                ["fuse-overlayfs", "--version"],
                capture_output=True,
                text=True,
                timeout=10,
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired):
            return "?"
        return _version_line(out.stdout + out.stderr, "fuse-overlayfs")

    def _mount(self, layers: Layers, inst: Instance, private: tuple[str, ...]) -> None:
        procs.run(
            ["fuse-overlayfs", "-o", self._overlay_opts(layers, inst), str(inst.root)],
            MOUNT_TIMEOUT,
            "fuse-overlayfs",
            log=inst.base / "daemon.log",
        )


class UnionfsFuse(Impl):
    """unionfs-fuse with copy-on-write; it reads its own whiteouts (the unionfs/ layers)."""

    name = "unionfs-fuse"
    daemon_names = ("unionfs",)
    fuse = True

    def missing(self) -> str | None:
        return None if shutil.which("unionfs") else "unionfs-fuse is not installed"

    def version(self) -> str:
        try:
            out = subprocess.run(
                ["unionfs", "--version"], capture_output=True, text=True, timeout=10, check=False
            )
        except (OSError, subprocess.TimeoutExpired):
            return "?"
        return _version_line(out.stdout + out.stderr, "unionfs")

    def _mount(self, layers: Layers, inst: Instance, private: tuple[str, ...]) -> None:
        upper = inst.base / "upper"
        upper.mkdir()
        branches = ":".join([f"{upper}=RW"] + [f"{p}=RO" for p in layers.unionfs_layers])
        procs.run(
            ["unionfs", "-o", "cow,hide_meta_files", branches, str(inst.root)],
            MOUNT_TIMEOUT,
            "unionfs",
            log=inst.base / "daemon.log",
        )


class Pyunion(Impl):
    name = "pyunion"
    daemon_names = ("pyunion", "unionfs")
    fuse = True

    def __init__(self, command: list[str] | None = None) -> None:
        self.given = command is not None
        if command is None:
            venv = REPO / ".venv/bin/pyunion"
            found = shutil.which("pyunion")
            command = (
                [str(venv)]
                if venv.exists()
                else [found]
                if found
                else [sys.executable, "-m", "unionfs"]
            )
        self.command = command

    def missing(self) -> str | None:
        try:
            r = subprocess.run(
                [*self.command, "--help"],
                capture_output=True,
                text=True,
                timeout=30,
                cwd=REPO,
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired) as e:
            return f"pyunion does not run: {e}"
        if r.returncode != 0 or "mount" not in r.stdout:
            return "pyunion has no 'mount' command yet"
        return None

    def checkout(self) -> Path:
        """The checkout whose venv runs this pyunion (`--pyunion` may name another), else
        this one."""
        exe = Path(self.command[0]).absolute()
        return exe.parents[2] if exe.parent.parent.name == ".venv" else REPO

    def version(self) -> str:
        try:
            rev = subprocess.run(
                ["git", "-C", str(self.checkout()), "describe", "--always", "--dirty"],
                capture_output=True,
                text=True,
                timeout=10,
                check=False,
            ).stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            rev = "?"
        return f"pyunion {rev} ({' '.join(self.command)})"

    def daemon_pid(self, root: Path) -> int | None:
        """From the daemon's pid record (a daemon forked by the fork server has the
        server's command line), else by its command line."""
        real = os.path.realpath(root)
        with contextlib.suppress(OSError):
            for rec in self.state_dir().glob("*.pid"):
                with contextlib.suppress(OSError, ValueError):
                    pid, _, mp = rec.read_text().rstrip("\n").partition(" ")
                    if mp == real and procs.alive(int(pid)):
                        return int(pid)
        return super().daemon_pid(root)

    extra_opts = ""

    def state_dir(self) -> Path:
        return Path(STATE_DIR)

    def env(self) -> dict[str, str] | None:
        """The environment of its commands (None: the bench's own)."""
        return None

    def _mount(self, layers: Layers, inst: Instance, private: tuple[str, ...]) -> None:
        opts = self._overlay_opts(layers, inst) + self.extra_opts
        procs.run(
            [*self.command, "mount", "-o", opts, str(inst.root)],
            MOUNT_TIMEOUT,
            "pyunion mount",
            log=inst.base / "daemon.log",
            env=self.env(),
        )

    def _unmount(self, inst: Instance) -> None:
        procs.run(
            [*self.command, "umount", str(inst.root)],
            UMOUNT_TIMEOUT,
            "pyunion umount",
            env=self.env(),
        )


class PyunionNoSpin(Pyunion):
    """pyunion without the poll of /dev/fuse before sleeping (`-o spin=0`): the spin's A/B."""

    name = "pyunion-nospin"
    extra_opts = ",spin=0"


class PyunionBase(Pyunion):
    """Another pyunion in the same run (`--baseline CMD`, say main's venv): a change's
    A/B under the same load and in the same order as the rest. Absent without it."""

    name = "pyunion-base"

    def missing(self) -> str | None:
        if not self.given:
            return "no --baseline command given"
        return super().missing()


class PyunionForkserver(Pyunion):
    """pyunion with its opt-in fork server (`PYUNION_FORKSERVER=1`): a mount's daemon is
    forked by a server that has imported everything (README: Using it). In the mount
    workload only; every measured mount is one the server forked. The state dir is the
    bench's own: removing it (`close`) ends the server."""

    name = "pyunion-forkserver"
    mount_only = True
    _state: Path | None = None

    def state_dir(self) -> Path:
        if self._state is None:
            self._state = Path(tempfile.mkdtemp(prefix="pyunion-bench-state-"))
        return self._state

    def env(self) -> dict[str, str] | None:
        return {**os.environ, "PYUNION_FORKSERVER": "1", "PYUNION_STATE_DIR": str(self.state_dir())}

    def ready(self, layers: Layers, base: Path) -> None:
        """A server running: when there is none (the first mount, or it left after a
        minute without a request), a mount that starts it (its own daemon is forked
        directly), and the wait until it listens."""
        if procs.forkservers(self.state_dir()):
            return
        self.mount(layers, base).teardown()
        if not procs.wait_until(
            lambda: bool(procs.forkservers(self.state_dir())), FORKSERVER_START_S, 0.01
        ):
            raise procs.CommandFailed("the fork server did not start")

    def check(self, inst: Instance) -> None:
        inst.find_daemon()
        servers = procs.forkservers(self.state_dir())
        if inst.pid is None or procs.parent(inst.pid) not in servers:
            raise procs.CommandFailed("the mount's daemon was not forked by the fork server")

    def close(self) -> None:
        if self._state is not None:
            shutil.rmtree(self._state, ignore_errors=True)  # the server sees its socket go
            self._state = None


ALL: dict[str, type[Impl]] = {
    c.name: c
    for c in (
        Native,
        Kernel,
        FuseOverlayfs,
        UnionfsFuse,
        Pyunion,
        PyunionForkserver,
        PyunionNoSpin,
        PyunionBase,
    )
}
ORDER = list(ALL)
