"""The container side of `pyunion run`: namespaces, /proc, /dev, /sys, binds, pivot_root, exec.

Process tree (the parent side lives in `run.py`):

    pyunion run (the caller's namespaces; makes the FUSE mount as a detached mount fd)
     └─ init: pid 1 of a new pid ns (a fork of pyunion, not dumpable: it holds pyunion's
         │  memory until it execs catatonit); new mount, uts and ipc namespaces, and a
         │  network namespace with only its loopback up (`--network none`, the default),
         │  where it attaches the FUSE mount (the only namespace that ever holds it);
         │  once the container is built it execs catatonit, which stays pid 1
         └─ the command (forked and exec'd by catatonit)

`init` first closes every fd it inherited (only 0-2 and `--preserve-fds` stay),
copies the host's catatonit (a static binary) into a sealed memfd and waits for pyunion's "go" (with
the tree's mount, which it attaches), then builds the container's view on top
of the merged tree: a fresh /proc, a tmpfs /dev with the usual nodes, a new
devpts instance, an mqueue, /sys read-only, resolv.conf/hosts/hostname (copies of the
host's, so the container cannot write them) and /run/.containerenv, the user's `-v`
binds and the masked and read-only paths (`confine.py`), then pivot_root into
the tree and detach the host's root, so nothing of the host stays reachable
(`--read-only` then remounts just the root mount read-only). Mount points the
image lacks are created in the tree, and reported to pyunion so that a kept
upper can drop them again. It then takes the command's confinement
(`confine.enter`: capabilities, filter, the image's user), checks that the
command can be exec'd (127/126 and one line if not) and execs catatonit
(podman's `--init`), which forks the command, forwards the signals pyunion
relays to it, reaps every zombie (orphans are re-parented to pid 1) and exits
with the command's status as an exit code (128+N for signal N). When pid 1
exits the kernel kills whatever the command left behind, and the container's
mount namespace goes with it.

Every path inside the image is resolved with openat2(RESOLVE_IN_ROOT): a
symlink in the image (even an absolute one) can never make us mount over, or
create, something outside the tree.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import gc
import os
import resource
import signal
import socket
import stat
import sys
import termios
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import NoReturn

from . import confine, rlimits, seccomp, syscalls, userns, volumes
from .digits import number
from .errors import printable
from .supervise import FORWARDED as FORWARDED  # re-exported: the supervisor owns them
from .supervise import exit_code as exit_code
from .supervise import flush_stdio as flush_stdio
from .syscalls import (
    CLONE_NEWIPC,
    CLONE_NEWNET,
    CLONE_NEWNS,
    CLONE_NEWUTS,
    MNT_DETACH,
    MS_BIND,
    MS_NODEV,
    MS_NOEXEC,
    MS_NOSUID,
    MS_RDONLY,
    MS_REC,
    MS_REMOUNT,
    fd_str,
    join_new_session_keyring,
    make_private,
    mount,
    move_mount,
    open_in_root,
    pivot_root,
    set_dumpable,
    set_pdeathsig,
    set_process_title,
    umount2,
    unshare,
    wipe_environ,
)
from .tree import NotRegularFile, open_trusted, read_regular
from .volumes import Volume

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

# Where the container's pid 1 is looked for: podman's own first, then Debian's package.
INIT_PATHS = (
    "/usr/libexec/podman/catatonit",
    "/usr/libexec/catatonit/catatonit",
    "/usr/bin/catatonit",
    "/usr/local/libexec/podman/catatonit",
    "/usr/local/bin/catatonit",
)


# -- what to run --------------------------------------------------------------------
@dataclass
class ContainerSpec:
    """Everything init needs, fixed before the fork."""

    root: str  # where init attaches the mount: an empty directory of pyunion's
    init: str  # the catatonit that pid 1 becomes (`find_init`)
    argv: list[str]
    env: dict[str, str]
    workdir: str | None = None
    make_workdir: bool = True  # made when missing (the image's); else 126, as podman's -w
    user: str | None = None  # USER[:GROUP], names or numbers, from the image's files
    hostname: str = "pyunion"
    network: str = "none"  # none: a namespace of its own; host: the host's; ns:PATH: join it
    binds: list[Volume] = field(default_factory=list)
    tmpfs: list[volumes.Tmpfs] = field(default_factory=list)
    devices: list[tuple[str, str]] = field(default_factory=list)  # --device: (host, container)
    shm_size: int | None = None  # /dev/shm in bytes; None: podman's 64000k
    group_add: list[str] = field(default_factory=list)  # --group-add: names or numbers
    # --ulimit: (RLIMIT_*, soft, hard)
    rlimits: list[tuple[int, int, int]] = field(default_factory=list)
    etc_files: dict[str, str] = field(default_factory=dict)  # /etc/x (.containerenv) -> copy
    interactive: bool = False
    tty: bool = False
    read_only: bool = False
    report_fd: int = -1  # where init writes the mount points it created, one per line
    go_fd: int = -1  # a socket: "G" and the tree's detached mount (EOF: no container)
    confinement: confine.Confinement = field(default_factory=confine.Confinement)
    # In a user namespace: why an ID outside it cannot be used (`userns.outside_hint`, from
    # the host's files, which init no longer sees once it has entered the container).
    outside: str = "outside the IDs of the user namespace"


class SetupError(Exception):
    """The container could not be set up: init prints it and exits with `code`, 125, or
    126 where podman says the command cannot be invoked (its user, group or working
    directory is not in the image)."""

    def __init__(self, msg: str, code: int = 125) -> None:
        super().__init__(msg)
        self.code = code


CANNOT_INVOKE = 126


# -- building the container's view ------------------------------------------------------
# Mount points init had to create in the tree (they land in the upper): reported to
# pyunion so that a kept upper does not carry them into a commit.
CREATED: list[str] = []


def _ensure(rootfd: int, path: str, is_dir: bool, plain: bool = False) -> int:
    """An O_PATH fd of PATH in the tree, created (with parents) when missing; with
    `plain`, reached without any symlink (`_plain`)."""
    try:
        return _plain(rootfd, path) if plain else open_in_root(rootfd, path)
    except FileNotFoundError:
        pass
    parent, name = os.path.split(path.rstrip("/"))
    pfd = _ensure(rootfd, parent or "/", True)
    try:
        try:
            st = os.stat(name, dir_fd=pfd, follow_symlinks=False)
            if stat.S_ISLNK(st.st_mode):  # a dangling symlink: replace it
                os.unlink(name, dir_fd=pfd)
        except FileNotFoundError:
            pass
        if is_dir:
            os.mkdir(name, 0o755, dir_fd=pfd)
        else:
            os.close(
                os.open(
                    name,
                    os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                    0o644,
                    dir_fd=pfd,
                )
            )
        CREATED.append("/" + path.strip("/"))
        return _plain(pfd, name) if plain else open_in_root(pfd, name)
    finally:
        os.close(pfd)


def _plain(rootfd: int, path: str) -> int:
    """An O_PATH fd of PATH in the tree, reached without following any symlink: where
    /proc and /sys are mounted, as runc ("must be mounted on ordinary directory").

    Their masked and read-only paths (`confine.mask_paths`) are looked up by path
    again once /dev, the binds and the volumes are mounted. An image with
    `/proc -> /dev/link` and `/dev/link -> /real` had proc mounted at /real, then
    the /dev tmpfs hid the link: every mask then missed (ENOENT, skipped), and
    root in the container wrote /real/sys/kernel/core_pattern, a way to run a
    program as the host's root."""
    rel = path.lstrip("/") or "."
    try:
        return syscalls.openat2(
            rootfd, rel, os.O_PATH, syscalls.RESOLVE_IN_ROOT | syscalls.RESOLVE_NO_SYMLINKS
        )
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise SetupError(
                f"the image's {path} is a symlink: it must be an ordinary directory"
            ) from None
        raise


def _mount_at(
    rootfd: int,
    path: str,
    source: str | None,
    fstype: str | None,
    flags: int,
    data: str | None = None,
    is_dir: bool = True,
    plain: bool = False,
) -> None:
    fd = _ensure(rootfd, path, is_dir, plain)
    try:
        mount(source, fd_str(fd), fstype, flags, data)
    finally:
        os.close(fd)


def _warn(msg: str) -> None:
    print(f"pyunion: warning: {msg}", file=sys.stderr)


DEV_NODES = {
    "null": (1, 3),
    "zero": (1, 5),
    "full": (1, 7),
    "random": (1, 8),
    "urandom": (1, 9),
    "tty": (5, 0),
}
DEV_LINKS = {
    "fd": "/proc/self/fd",
    "stdin": "/proc/self/fd/0",
    "stdout": "/proc/self/fd/1",
    "stderr": "/proc/self/fd/2",
    "ptmx": "pts/ptmx",
}


def _setup_dev(
    rootfd: int,
    privileged: bool,
    devices: Sequence[tuple[str, str]] = (),
    shm_size: int | None = None,
) -> None:
    """A tmpfs /dev with the usual nodes, where no other device node opens.

    podman's devices cgroup lets a container open only those nodes, whatever it
    makes with CAP_MKNOD (`--cap-add MKNOD`). There is no cgroup here, so /dev
    ends up `nodev` (as every other mount the container can write), and each
    usual node is bound onto itself first: a mount of its own, which keeps the
    right to open. `--privileged` lifts it, as podman lifts its devices cgroup.
    """
    # strictatime, as runc mounts it (podman's /dev shows no relatime)
    flags = MS_NOSUID | MS_NOEXEC | syscalls.MS_STRICTATIME
    _mount_at(rootfd, "/dev", "tmpfs", "tmpfs", flags, "mode=755,size=65536k")
    dev = open_in_root(rootfd, "/dev", os.O_RDONLY | os.O_DIRECTORY)
    try:
        for name, (major, minor) in DEV_NODES.items():
            try:
                os.mknod(name, stat.S_IFCHR | 0o666, os.makedev(major, minor), dir_fd=dev)
                os.chmod(name, 0o666, dir_fd=dev)
                source = f"{fd_str(dev)}/{name}"
            except PermissionError:  # no CAP_MKNOD: bind the host's node instead
                os.close(os.open(name, os.O_CREAT | os.O_WRONLY | os.O_CLOEXEC, 0o666, dir_fd=dev))
                source = f"/dev/{name}"
            mount(source, f"{fd_str(dev)}/{name}", None, MS_BIND)
        for host, target in devices:  # bound while /dev can still give them the right
            _add_device(rootfd, dev, host, target)
        if not privileged:
            volumes.set_attrs(
                dev,
                syscalls.MOUNT_ATTR_NOSUID | syscalls.MOUNT_ATTR_NODEV | syscalls.MOUNT_ATTR_NOEXEC,
                recursive=False,
            )
        for name, target in DEV_LINKS.items():
            os.symlink(target, name, dir_fd=dev)
        if privileged:
            _host_devices(dev)
        os.mkdir("pts", 0o755, dir_fd=dev)
        for name in ("shm", "mqueue"):
            os.mkdir(name, 0o1777, dir_fd=dev)
            os.chmod(name, 0o1777, dir_fd=dev)
    finally:
        os.close(dev)
    _mount_devpts(rootfd)
    _mount_at(
        rootfd,
        "/dev/shm",
        "shm",
        "tmpfs",
        MS_NOSUID | MS_NODEV | MS_NOEXEC,
        f"mode=1777,size={shm_size}" if shm_size else "mode=1777,size=64000k",  # podman's
    )
    # POSIX message queues (mq_open(3) looks here), of the container's ipc namespace.
    _mount_at(rootfd, "/dev/mqueue", "mqueue", "mqueue", MS_NOSUID | MS_NODEV | MS_NOEXEC)


# What `--privileged` does not take from the host's /dev, as podman (runc's device
# list): the container's own pts, shm, mqueue and fd, the host's console and ptmx.
HOST_DEV_SKIP = {"pts", "shm", "fd", "mqueue", ".lxc", ".lxd-mounts", ".udev", "console", "ptmx"}


def _host_devices(dev: int) -> None:
    """`--privileged`: every device node of the host's /dev (below it too: /dev/net/tun,
    /dev/cpu/0/msr), made in the container's /dev with the host's type, numbers, mode
    and owner, as podman gives them; bound from the host where mknod is refused (a user
    namespace). Runs before pivot_root, while the host's /dev is in view."""
    pending = [""]
    while pending:
        rel = pending.pop()
        try:
            entries = list(os.scandir(os.path.join("/dev", rel)))
        except OSError:
            continue
        for entry in entries:
            name = os.path.join(rel, entry.name)
            if entry.name in HOST_DEV_SKIP and not rel:
                continue
            try:
                st = entry.stat(follow_symlinks=False)
            except OSError:
                continue
            if stat.S_ISDIR(st.st_mode):
                pending.append(name)
                continue
            if not (stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode)):
                continue
            if os.path.lexists(os.path.join(fd_str(dev), name)):
                continue  # one of the usual nodes, made already
            if rel:
                os.makedirs(os.path.join(fd_str(dev), rel), 0o755, exist_ok=True)
            try:
                os.mknod(name, st.st_mode, st.st_rdev, dir_fd=dev)
                os.chown(name, st.st_uid, st.st_gid, dir_fd=dev)
                os.chmod(name, stat.S_IMODE(st.st_mode), dir_fd=dev)
            except PermissionError:  # no CAP_MKNOD, or the owner unmapped: bind it
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(name, dir_fd=dev)
                os.close(os.open(name, os.O_CREAT | os.O_WRONLY | os.O_CLOEXEC, 0o600, dir_fd=dev))
                with contextlib.suppress(OSError):
                    mount(entry.path, f"{fd_str(dev)}/{name}", None, MS_BIND)


def _add_device(rootfd: int, dev: int, host: str, target: str) -> None:
    """`--device HOST:TARGET`: the host's node (its numbers, mode and owner) at TARGET,
    able to open although /dev and the tree are nodev: made in /dev before it becomes
    nodev, and bound (a mount of its own, which keeps the right) where TARGET is. HOST
    is resolved as root's other paths (`tree.open_trusted`: no symlink of another user's
    followed), once."""
    try:
        src = open_trusted(host, os.O_PATH)
    except OSError as e:
        raise SetupError(f"cannot add the device {host!r}: {e.strerror}") from e
    try:
        _add_device_from(rootfd, dev, src, host, target)
    finally:
        os.close(src)


def _add_device_from(rootfd: int, dev: int, src: int, host: str, target: str) -> None:
    st = os.fstat(src)
    if not (stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode)):
        raise SetupError(f"cannot add the device {host!r}: not a device node")
    staging = f".pyunion-device-{os.urandom(6).hex()}"
    try:
        os.mknod(staging, st.st_mode, st.st_rdev, dir_fd=dev)
        os.chown(staging, st.st_uid, st.st_gid, dir_fd=dev)
        os.chmod(staging, stat.S_IMODE(st.st_mode), dir_fd=dev)
        source = f"{fd_str(dev)}/{staging}"
    except PermissionError:  # no CAP_MKNOD (a user namespace): the host's own node
        with contextlib.suppress(FileNotFoundError):
            os.unlink(staging, dir_fd=dev)
        source = fd_str(src)
    try:
        fd = _ensure(rootfd, target, False)
        try:
            mount(source, fd_str(fd), None, MS_BIND)
        finally:
            os.close(fd)
    except OSError as e:
        raise SetupError(f"cannot add the device {host!r} at {target!r}: {e.strerror}") from e
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(staging, dir_fd=dev)


TTY_GID = 5  # podman's (and the FHS') tty group: `gid=5` on /dev/pts


def _mount_devpts(rootfd: int) -> None:
    """The container's own devpts, with podman's options: terminals opened in it belong
    to group 5 (tty), mode 0620, as on the host (write(1), mesg(1) rely on it). In a
    user namespace where gid 5 is not mapped the kernel refuses `gid=5`: the terminals
    then keep their opener's group."""
    opts = "newinstance,ptmxmode=0666,mode=0620"
    flags = MS_NOSUID | MS_NOEXEC
    try:
        _mount_at(rootfd, "/dev/pts", "devpts", "devpts", flags, f"{opts},gid={TTY_GID}")
    except OSError:
        try:
            _mount_at(rootfd, "/dev/pts", "devpts", "devpts", flags, opts)
        except OSError as e:
            _warn(f"no /dev/pts in the container: {e.strerror}")


def _setup_sys(rootfd: int, writable: bool) -> None:
    """A fresh sysfs, read-only (writable only for --privileged, as podman): its
    /sys/class/net shows the container's network namespace.

    In a user namespace the kernel mounts a sysfs only for a network namespace that
    namespace owns (`--network none`); with the host's network, the host's /sys is
    bound read-only instead, as runc does for rootless podman's `--network host`."""
    flags = (0 if writable else MS_RDONLY) | MS_NOSUID | MS_NODEV | MS_NOEXEC
    try:
        _mount_at(rootfd, "/sys", "sysfs", "sysfs", flags, plain=True)
    except PermissionError:  # sysfs refused (the host's net ns, rootless): bind the host's
        _bind(
            rootfd,
            Volume("/sys", "/sys", read_only=not writable, nosuid=True, nodev=True, noexec=True),
        )


def _bind(rootfd: int, vol: Volume) -> None:
    """Bind vol.source at vol.target in the tree with its attributes (recursively unless
    `bind` was asked for: `:ro` covers the mounts below the source too).

    The source is resolved once (`tree.open_trusted`: a symlink another user
    swapped into a directory of hers on the way is refused), and so is the target
    (in the tree, `_ensure`). The attributes are set on a detached copy of the
    source (`open_tree`), which is then attached on the target's fd: no path is
    looked up again once the bind is there. (Before, the mount was found again
    by its path to make it read-only: a user owning the directory of an outer
    volume could, in between, move the fresh mount point away and leave a
    symlink to /proc in its place, and the `:ro` volume stayed writable.)"""
    src = open_trusted(vol.source, os.O_PATH)
    tree = -1
    try:
        is_dir = stat.S_ISDIR(os.fstat(src).st_mode)
        if vol.attrs:
            tree = _clone_with_attrs(src, vol)
        fd = _ensure(rootfd, vol.target, is_dir)
        try:
            if tree >= 0:
                move_mount(tree, fd)
            else:
                mount(fd_str(src), fd_str(fd), None, MS_BIND | (MS_REC if vol.recursive else 0))
        finally:
            os.close(fd)
    finally:
        os.close(src)
        if tree >= 0:
            os.close(tree)
    if vol.attrs and tree < 0:  # a kernel without open_tree or mount_setattr (before 5.12)
        fd = open_in_root(rootfd, vol.target)  # the new mount, not the directory under it
        try:
            volumes.set_attrs(fd, vol.attrs, vol.recursive)
        finally:
            os.close(fd)


def _mount_tmpfs(rootfd: int, fs: volumes.Tmpfs) -> None:
    """A `--tmpfs`, as runc mounts it for podman: the image's directory there keeps its
    mode on the tmpfs' root, and with `copyup` its content is copied in (owners, modes,
    symlinks, special files; hard links become copies), through fds below the
    directory, which is still reachable under the new mount. Nothing of the image has
    run yet, so the tree holds still; a copy bigger than the tmpfs fails (ENOSPC)."""
    made = len(CREATED)
    under = _ensure(rootfd, fs.target, True)
    existed = len(CREATED) == made
    union = os.fstat(rootfd).st_dev
    try:
        st = os.stat(under)
        old = -1
        # Only the image's own content: not what a symlink of the image there leads to
        # (/proc/sys, a volume), whose files root would read and hand to the container.
        if fs.copyup and stat.S_ISDIR(st.st_mode) and st.st_dev == union:
            old = os.open(fd_str(under), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            mount("tmpfs", fd_str(under), "tmpfs", fs.flags & ~MS_RDONLY, fs.data or None)
            top = open_in_root(rootfd, fs.target, os.O_RDONLY | os.O_DIRECTORY)
            try:
                if old >= 0:
                    _copy_tree(old, top, union)
                if existed and stat.S_ISDIR(st.st_mode):
                    os.chmod(top, stat.S_IMODE(st.st_mode))
                if fs.flags & MS_RDONLY:
                    mount(None, fd_str(top), None, MS_REMOUNT | MS_BIND | MS_RDONLY | fs.flags)
            finally:
                os.close(top)
        finally:
            if old >= 0:
                os.close(old)
    finally:
        os.close(under)


def _copy_tree(src: int, dst: int, dev: int) -> None:
    """Copy the directory `src` into `dst` (fds; never a symlink followed), depth first
    without recursion (an image's tree may be deep); only what is on `dev` (the union),
    as `cp -x`: a mount below (/etc/hosts, a volume) is not the image's."""
    stack = [(os.dup(src), os.dup(dst))]
    try:
        while stack:
            s, d = stack.pop()
            try:
                for entry in os.scandir(s):
                    _copy_entry(s, d, entry.name, stack, dev)
            finally:
                os.close(s)
                os.close(d)
    finally:
        for s, d in stack:
            os.close(s)
            os.close(d)


def _copy_entry(s: int, d: int, name: str, stack: list[tuple[int, int]], dev: int) -> None:
    st = os.stat(name, dir_fd=s, follow_symlinks=False)
    if st.st_dev != dev:
        return
    mode = stat.S_IMODE(st.st_mode)
    if stat.S_ISDIR(st.st_mode):
        os.mkdir(name, 0o700, dir_fd=d)
        flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
        sub_s = os.open(name, flags, dir_fd=s)
        try:
            sub_d = os.open(name, flags, dir_fd=d)
        except BaseException:
            os.close(sub_s)
            raise
        stack.append((sub_s, sub_d))
    elif stat.S_ISREG(st.st_mode):
        flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
        fi = os.open(name, flags, dir_fd=s)
        try:
            fo = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600, dir_fd=d)
            try:
                while os.sendfile(fo, fi, None, 1 << 20):
                    pass
            finally:
                os.close(fo)
        finally:
            os.close(fi)
    elif stat.S_ISLNK(st.st_mode):
        os.symlink(os.readlink(name, dir_fd=s), name, dir_fd=d)
    else:  # a FIFO, a socket's name, a device node (which the tmpfs' nodev keeps shut)
        try:
            os.mknod(name, st.st_mode, st.st_rdev, dir_fd=d)
        except PermissionError:  # no CAP_MKNOD (rootless): as runc, a node it cannot make
            return
    os.chown(name, st.st_uid, st.st_gid, dir_fd=d, follow_symlinks=False)
    if not stat.S_ISLNK(st.st_mode):  # after chown, which clears the set-ID bits
        os.chmod(name, mode, dir_fd=d)


def _clone_with_attrs(src: int, vol: Volume) -> int:
    """A detached bind of `src` with `vol`'s attributes set; -1 if the kernel cannot."""
    try:
        tree = syscalls.open_tree_clone(src, vol.recursive)
    except OSError as e:
        if e.errno == errno.ENOSYS:
            return -1
        raise
    try:
        flags = syscalls.AT_EMPTY_PATH | (syscalls.AT_RECURSIVE if vol.recursive else 0)
        syscalls.mount_setattr(tree, "", flags, vol.attrs)
    except OSError as e:
        os.close(tree)
        if e.errno == errno.ENOSYS:
            return -1
        raise
    return tree


def _make_workdir(path: str, uid: int, gid: int) -> None:
    """Create the working directory and every missing parent for the user, as podman's
    run and buildah's RUN do (a WORKDIR after USER is the user's all the way down)."""
    missing = []
    head = os.path.normpath(path)
    while head != "/" and not os.path.lexists(head):
        missing.append(head)
        head = os.path.dirname(head)
    os.makedirs(path)
    if (uid, gid) != (0, 0):
        for p in missing:
            os.chown(p, uid, gid, follow_symlinks=False)


def _join_netns(path: str) -> None:
    """Enter the network namespace at PATH (`--network ns:PATH`), before the mount
    namespace is made, while the host's tree is in view.

    Its directories are resolved as root's other paths (`tree.open_trusted`: no symlink
    another user swapped in on the way); the last component is opened by the kernel,
    which follows /proc/PID/ns/net, a link that is no path. setns(2) checks it is a
    network namespace that this process may enter (CAP_SYS_ADMIN over its owner)."""
    parent, name = os.path.split(path.rstrip("/"))
    try:
        dfd = open_trusted(parent or "/")
        try:
            fd = os.open(name, os.O_RDONLY | os.O_CLOEXEC, dir_fd=dfd)
        finally:
            os.close(dfd)
        try:
            syscalls.setns(fd, CLONE_NEWNET)
        finally:
            os.close(fd)
    except OSError as e:
        why = "not a network namespace" if e.errno == errno.EINVAL else e.strerror
        raise SetupError(f"cannot join the network namespace {path!r}: {why}") from e


def _attach_root(root: str, mount_fd: int) -> None:
    """Attach the union (a detached mount, `mount_fd`, closed here) at ROOT, in this new
    mount namespace only.

    Resolved here, after the unshare (an fd from pyunion's namespace names a mount
    this one cannot mount on). Its first use waits until the daemon has answered
    the kernel's INIT: the daemon was serving before pyunion said "go".
    """
    try:
        target = open_trusted(root)
        try:
            move_mount(mount_fd, target)
        finally:
            os.close(target)
    finally:
        os.close(mount_fd)


def _pivot_into(root: str) -> None:
    """Make ROOT the root and detach the host's tree; a refused pivot_root is an error.

    There is no chroot fallback, as runc has none (but for its explicit --no-pivot,
    which detaches the host's mounts first): the host's tree would stay in the mount
    namespace under a mere chroot, which root in the container leaves with
    CAP_SYS_CHROOT (podman's default set): `mkdir x; chroot x; cd ../..; chroot .`.
    Where pivot_root was refused (a seccomp filter of pyunion's caller, a root on the
    initial ramfs), the container's root had the whole host's file system."""
    os.chdir(root)
    try:
        pivot_root(".", ".")
    except OSError as e:
        raise SetupError(f"cannot enter the container's root: {e.strerror}") from e
    umount2(".", MNT_DETACH)  # the host's root, stacked on ours by pivot_root(".", ".")
    os.chdir("/")


# Writable even with --read-only, with podman's modes: /run is root's (0755), as on a host.
READ_ONLY_TMPFS = {"/tmp": 0o1777, "/var/tmp": 0o1777, "/run": 0o755}


def setup_root(spec: ContainerSpec) -> None:
    """Build the container's mounts over the merged tree, then enter it."""
    conf = spec.confinement
    rootfd = os.open(spec.root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        _mount_at(rootfd, "/proc", "proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, plain=True)
        _setup_dev(rootfd, conf.privileged, spec.devices, spec.shm_size)
        _setup_sys(rootfd, conf.privileged)
        if spec.read_only:
            for path, mode in READ_ONLY_TMPFS.items():
                _mount_at(rootfd, path, "tmpfs", "tmpfs", MS_NOSUID | MS_NODEV, f"mode={mode:o}")
        ro = spec.read_only  # --read-only: podman binds them read-only, nosuid, nodev, noexec
        etc = [
            Volume(host_copy, target, ro, False, nosuid=ro, nodev=ro, noexec=ro)
            for target, host_copy in spec.etc_files.items()
        ]
        # Outer mounts first, as podman sorts them (stable: pyunion's /etc files before
        # a volume on the same path): a tmpfs or a volume on /etc stays below
        # /etc/hosts, a volume inside a tmpfs on top of it.
        mounts: list[Volume | volumes.Tmpfs] = [*etc, *spec.binds, *spec.tmpfs]
        mounts.sort(key=lambda m: os.path.normpath(m.target).count("/"))
        for b in mounts:
            if isinstance(b, volumes.Tmpfs):
                if not conf.privileged:  # `dev` or not: a node copied up must not open
                    b.flags |= MS_NODEV
                try:
                    _mount_tmpfs(rootfd, b)
                except OSError as e:
                    raise SetupError(f"cannot mount --tmpfs {b.target!r}: {e.strerror}") from e
                continue
            if not any(b is e for e in etc):
                # nodev, as /dev: podman's devices cgroup would refuse a node of the volume
                b.nodev = b.nodev or not conf.privileged
            try:
                _bind(rootfd, b)
            except OSError as e:
                raise SetupError(f"cannot bind {b.source!r} to {b.target!r}: {e.strerror}") from e
        confine.mask_paths(rootfd, conf)
    finally:
        os.close(rootfd)
    _prepare_filter(conf)
    _pivot_into(spec.root)


def _prepare_filter(conf: confine.Confinement) -> None:
    try:
        confine.prepare(conf)  # needs the host's libseccomp: before the host goes away
    except seccomp.SeccompError as e:
        raise SetupError(str(e)) from e


# -- users, from the image's own files ----------------------------------------------------
@dataclass
class Identity:
    uid: int
    gid: int
    groups: list[int]
    home: str


MAX_USER_DB = 4 << 20  # bytes of /etc/passwd or /etc/group read at most
NGROUPS_MAX = 65536  # supplementary groups a process may have (linux/limits.h)


def read_user_db(rootfd: int, path: str) -> list[list[str]]:
    """The entries of the passwd or group file PATH of the container tree `rootfd`.

    The file comes from the image, so it may be anything: it is read by
    `tree.read_regular` as the container sees it (symlinks resolved inside its
    root), and only a regular file of at most 4 MiB (a FIFO would hang the run
    or the build, /dev/zero would eat memory). Missing: no entries. `pyunion run`
    and a build's `COPY --chown` read the image's users through this one rule.
    """
    try:
        data = read_regular(rootfd, path, MAX_USER_DB, resolve="in_root")
    except (FileNotFoundError, NotADirectoryError):
        return []
    except NotRegularFile:
        raise SetupError(f"the image's {path} is not a regular file") from None
    except OSError as e:
        if e.errno == errno.EFBIG:
            raise SetupError(f"the image's {path} is larger than {MAX_USER_DB >> 20} MiB") from e
        raise SetupError(f"cannot read the image's {path}: {e.strerror}") from e
    text = data.decode("utf-8", errors="replace")
    return [
        line.split(":") for line in text.split("\n") if line.strip() and not line.startswith("#")
    ]


def _read_db(path: str) -> list[list[str]]:
    """`read_user_db` of the container we are in (call after pivot_root)."""
    rootfd = os.open("/", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        return read_user_db(rootfd, path)
    finally:
        os.close(rootfd)


def resolve_user(user: str | None, group_add: list[str] | None = None) -> Identity:
    """USER[:GROUP] (names or numbers) from /etc/passwd and /etc/group (call after pivot),
    with podman's supplementary groups: the user's memberships in /etc/group (unless a
    GROUP is given), the primary group only when a user is named (podman leaves it out
    for the default user, root), and `group_add`'s, names or numbers."""
    name, _, group = (user or "0").partition(":")
    for part in (name, group, *(group_add or [])):
        if part.isdigit() and _id(part) is None:
            raise SetupError(f"user or group id {part} is out of range", CANNOT_INVOKE)
    # Entries with ids that are not numbers, or out of range, are ignored like nss does.
    passwd = [e for e in _read_db("/etc/passwd") if len(e) >= 7 and _id(e[2]) is not None]
    groups = [e for e in _read_db("/etc/group") if len(e) >= 3 and _id(e[2]) is not None]
    entry = None
    uid = _id(name)
    if uid is not None:
        entry = next((e for e in passwd if _id(e[2]) == uid), None)
    else:
        entry = next((e for e in passwd if e[0] == name), None)
        if entry is None:
            raise SetupError(
                f"unable to find user {name!r} in the image's /etc/passwd", CANNOT_INVOKE
            )
        uid = int(entry[2])
    gid = (_id(entry[3]) if entry is not None else None) or 0
    if group:
        gid = _group_id(groups, group)
    extra = [gid] if user else []
    if entry is not None and not group:
        for g in groups:
            if len(g) >= 4 and entry[0] in g[3].split(","):
                extra.append(int(g[2]))
    extra += [_group_id(groups, g) for g in group_add or []]
    home = entry[5] if entry is not None and entry[5] else "/"
    ids = sorted(set(extra))
    if len(ids) > NGROUPS_MAX:  # setgroups(2) would say EINVAL: say why instead
        raise SetupError(
            f"user {name!r} is in {len(ids)} groups of the image's /etc/group, "
            f"more than the kernel's limit of {NGROUPS_MAX}"
        )
    return Identity(uid, gid, ids, home)


def _group_id(groups: list[list[str]], group: str) -> int:
    """GROUP's ID: a number as it is, a name from the image's /etc/group."""
    gid = _id(group)
    if gid is not None:
        return gid
    g = next((e for e in groups if e[0] == group), None)
    if g is None:
        raise SetupError(f"unable to find group {group!r} in the image's /etc/group", CANNOT_INVOKE)
    return int(g[2])


def _id(s: str) -> int | None:
    """A user or group ID in the text (ASCII digits, below (uid_t)-1), else None."""
    n = number(s)
    return n if n is not None and n < 0xFFFFFFFF else None


# -- init and the command -------------------------------------------------------------------
def wait_exit_code(pid: int) -> int:
    """Wait for the child `pid` to end, through the signals its caller handles meanwhile;
    its `exit_code`."""
    while True:
        try:
            _, status = os.waitpid(pid, 0)
            break
        except InterruptedError:
            continue
    return exit_code(status)


def find_init() -> str | None:
    """The catatonit binary the container's pid 1 becomes (podman's places first)."""
    for path in INIT_PATHS:
        if os.access(path, os.X_OK):
            return path
    return None


MAX_INIT = 16 << 20  # bytes of the init binary copied at most
MFD_EXEC = 0x0010  # Linux 6.3: an executable memfd even where vm.memfd_noexec says otherwise


def _open_init(path: str, scratch: str) -> int:
    """A sealed in-memory copy of the host's catatonit, the container's pid 1 to be.

    Taken while the host's tree is still in view (a static binary: nothing of the
    image runs in pid 1). Not the host's file itself: pid 1 runs as the command's
    user and is dumpable, so root in the container could open /proc/1/exe and
    chmod or chown the host's file (setuid root: root on the host). A memfd sealed
    against writes is what runc runs for the same reason (CVE-2019-5736); where
    vm.memfd_noexec=2 forbids executable memfds, an unlinkable O_TMPFILE in SCRATCH
    (pyunion's private directory), left with no writer.
    """
    try:
        src = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as e:
        raise SetupError(f"cannot open the container's init {path!r}: {e.strerror}") from e
    try:
        st = os.fstat(src)
        if not stat.S_ISREG(st.st_mode) or st.st_size > MAX_INIT:
            raise SetupError(
                f"the container's init {path!r} is not a regular file of at most 16 MiB"
            )
        flags = os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING
        try:
            fd = os.memfd_create("catatonit", flags | MFD_EXEC)
        except OSError as e:
            if e.errno == errno.EINVAL:  # a kernel before 6.3: memfds are executable
                fd = os.memfd_create("catatonit", flags)
            elif e.errno in (errno.EACCES, errno.EPERM):  # vm.memfd_noexec=2
                return _tmpfile_copy(src, st.st_size, path, scratch)
            else:
                raise
        try:
            _copy(src, fd, st.st_size, path)
            seals = fcntl.F_SEAL_SEAL | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals)
        except BaseException:
            os.close(fd)
            raise
        return fd
    finally:
        os.close(src)


def _tmpfile_copy(src: int, size: int, path: str, scratch: str) -> int:
    """The copy as a file of SCRATCH that never has a name (O_EXCL: it cannot be linked
    in), reopened read-only: the writable fd is closed, so nobody can write it."""
    rw = os.open(scratch, os.O_TMPFILE | os.O_EXCL | os.O_RDWR | os.O_CLOEXEC, 0o555)
    try:
        _copy(src, rw, size, path)
        return os.open(f"/proc/self/fd/{rw}", os.O_RDONLY | os.O_CLOEXEC)
    finally:
        os.close(rw)


def _copy(src: int, dst: int, size: int, path: str) -> None:
    done = 0
    while done < size:
        n = os.sendfile(dst, src, done, size - done)
        if n == 0:
            raise SetupError(f"the container's init {path!r} changed while read")
        done += n


def _exec_error(name: str, env: dict[str, str]) -> OSError | None:
    """Why execvpe(NAME) would fail for this process (as the command's user), as execvpe
    searches PATH; None when it would run. pyunion says it in one line with 127 or 126,
    before catatonit takes over (which would only say "failed to exec pid1", exit 1)."""
    paths = [name] if "/" in name else [os.path.join(d, name) for d in os.get_exec_path(env)]
    first: OSError | None = None
    last: OSError = FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), name)
    for path in paths:
        err = _runnable(path)
        if err is None:
            return _format_error(path)
        last = err
        if first is None and last.errno not in (errno.ENOENT, errno.ENOTDIR):
            first = last
    return first or last


def _runnable(path: str) -> OSError | None:
    """execve's checks of the file itself: there, a regular file, executable for us."""
    try:
        st = os.stat(path)
    except OSError as e:
        return e
    if stat.S_ISREG(st.st_mode) and os.access(path, os.X_OK):
        return None
    return PermissionError(errno.EACCES, os.strerror(errno.EACCES), path)


def _format_error(path: str, depth: int = 0) -> OSError | None:
    """What execve(PATH) of an executable regular file would fail with, by its first
    bytes: ENOEXEC unless an ELF executable or `#!` (glibc's execvpe, in catatonit, would
    run any other file with /bin/sh); for `#!`, the interpreter's own error, ENOENT or
    EACCES (a directory, not executable), down the kernel's four levels."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY)
    except OSError:
        return None  # execute-only (no read permission): the kernel reads it, not us
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None  # swapped meanwhile: execve will say
        head = os.read(fd, 256)
    finally:
        os.close(fd)
    if head.startswith(b"\x7fELF"):  # an ELF header's class, byte order, version, type
        e_type = int.from_bytes(head[16:18], "little" if head[5:6] == b"\x01" else "big")
        # ET_EXEC or ET_DYN, of any machine (binfmt_misc may run another one's)
        header = len(head) >= 52 and head[4] in (1, 2) and head[5] in (1, 2) and head[6] == 1
        if header and e_type in (2, 3):
            return None
    if head.startswith(b"#!") and depth < 4:
        words = head[2:].split(b"\n", 1)[0].split()
        if words:
            interp = os.fsdecode(words[0])
            err = _runnable(interp) or _format_error(interp, depth + 1)
            return None if err is None else OSError(err.errno, err.strerror, path)
    return OSError(errno.ENOEXEC, os.strerror(errno.ENOEXEC), path)


def _take_signals(go: socket.socket | None) -> None:
    """Unblock the forwarded signals for catatonit's exec without losing one.

    Between this unblock and catatonit's own block, a signal to pid 1 would be
    dropped (pid 1 of a pid namespace ignores what it has no handler for). So
    pyunion is asked to hold them from here ("E", answered "K") until it sees
    catatonit block them (`run.Runner`); one that came before has no command to
    reach yet, and all of them end a process that has no handler: the container
    ends now with 128+N, as the command would have.
    """
    if go is not None:
        go.sendall(b"E")
        if go.recv(1) != b"K":
            os._exit(125)  # pyunion is gone
    pending = signal.sigpending() & set(FORWARDED)
    if pending:
        os._exit(128 + min(pending))
    signal.pthread_sigmask(signal.SIG_SETMASK, [])


def _set_rlimits(limits: list[tuple[int, int, int]]) -> None:
    """`--ulimit`, before the capabilities go: raising a hard limit needs
    CAP_SYS_RESOURCE. Refused, the command cannot be invoked (126, as runc's "error
    setting rlimit")."""
    for res, soft, hard in limits:
        try:
            resource.setrlimit(res, (soft, hard))
        except (ValueError, OSError) as e:
            name = next((k for k, v in rlimits.ULIMITS.items() if v == res), str(res))
            print(f"pyunion: cannot set --ulimit {name}: {e}", file=sys.stderr)
            os._exit(CANNOT_INVOKE)


def _exec_init(
    spec: ContainerSpec, ident: Identity, exe: int, go: socket.socket | None, slave: int | None
) -> NoReturn:
    """Become what stays pid 1: catatonit, confined as the command, which it then runs.

    catatonit (podman's `--init`) forwards signals to the command, reaps orphans and
    exits with the command's status (128+N for signal N): a static binary of under
    1 MiB, where a Python pid 1 kept ~9 MiB per container. It is exec'd with the
    command's user, capabilities, filter and environment, so pid 1 holds nothing
    the command does not, and nothing of pyunion or of the host.
    """
    try:
        if slave is not None:  # init leads the session (setsid): the pty is its terminal
            fcntl.ioctl(slave, termios.TIOCSCTTY, 0)
            for fd in (0, 1, 2):
                os.dup2(slave, fd)
            os.close(slave)
        elif not spec.interactive:
            null = os.open("/dev/null", os.O_RDONLY)
            os.dup2(null, 0)
            os.close(null)
        _set_rlimits(spec.rlimits)
        keep = [exe] if go is None else [exe, go.fileno()]
        confine.enter(spec.confinement, ident.uid, ident.gid, ident.groups, keep)
        set_pdeathsig(signal.SIGKILL)  # a new user clears it; kept across execve
        os.umask(0o022)
        if spec.workdir:
            os.chdir(spec.workdir)
    except seccomp.SeccompError as e:
        print(f"pyunion: {e}", file=sys.stderr)
        os._exit(125)
    except OSError as e:
        print(
            f"pyunion: cannot start the command: {e.strerror}"
            + (f" ({printable(e.filename)})" if e.filename else ""),  # the image's WorkingDir
            file=sys.stderr,
        )
        os._exit(125)
    env = dict(spec.env)
    if not env.get("HOME"):  # unset or empty: the user's, as runc fills it in
        env["HOME"] = ident.home
    err = _exec_error(spec.argv[0], env)
    if err is not None:  # argv[0] may be the image's Entrypoint or Cmd: no escapes
        print(f"pyunion: {printable(spec.argv[0])}: {err.strerror}", file=sys.stderr)
        os._exit(127 if err.errno in (errno.ENOENT, errno.ENOTDIR) else 126)
    if not any(res == resource.RLIMIT_NOFILE for res, _, _ in spec.rlimits):
        rlimits.give_back_fd_limit()  # the caller's `ulimit -n`, not the one pyunion took
    for sig in (signal.SIGPIPE, signal.SIGXFSZ):  # Python's SIG_IGN would be inherited
        signal.signal(sig, signal.SIG_DFL)
    # ^Z on the container's terminal: nobody could resume the command (pyunion is no
    # job-control shell); ignored, as when the command is pid 1 in podman.
    stop = signal.SIG_IGN if slave is not None else signal.SIG_DFL
    for sig in (signal.SIGTSTP, signal.SIGTTIN, signal.SIGTTOU):
        signal.signal(sig, stop)
    flush_stdio()
    _take_signals(go)
    try:
        os.execve(exe, ["catatonit", "--", *spec.argv], env)
    except OSError as e:
        print(f"pyunion: cannot start the container's init: {e.strerror}", file=sys.stderr)
    os._exit(125)


def start_init(spec: ContainerSpec, tty_sock: socket.socket | None) -> NoReturn:
    """Become pid 1 (right after the fork into the new pid namespace): `container_init`.

    pid 1 stays for the container's whole life, and a command given CAP_SYS_PTRACE can
    read its memory (/proc/1/mem). A fork of pyunion holds whatever pyunion's heap
    still holds, freed or not: the caller's environment (its tokens), its command line.
    That is safe here because init execs catatonit before any process of the container
    exists (the exec replaces the whole address space), and until then it is not
    dumpable: no core file of that heap in the container's tree, no ptrace without
    CAP_SYS_PTRACE in the host. (Init used to exec a fresh interpreter and import the
    sandbox there: ~0.1 s of CPU per container, when pid 1 was a Python init that stayed.)
    """
    try:
        set_dumpable(False)  # until catatonit's exec, which makes the process dumpable again
        # pyunion's objects are never collected here: one that owned an fd would close
        # the same number, by then init's own (and a collection would copy every page).
        gc.freeze()
        for sig in (*FORWARDED, signal.SIGCHLD, signal.SIGWINCH):
            signal.signal(sig, signal.SIG_DFL)  # pyunion's handlers; blocked until the exec
        for fd in spec.confinement.preserved:
            os.set_inheritable(fd, True)
        for name, fd in (("stdout", 1), ("stderr", 2)):
            if getattr(sys, name) is None:  # pyunion started without it; init has one now
                with contextlib.suppress(OSError):
                    setattr(sys, name, open(fd, "w", closefd=False))  # noqa: SIM115
    except BaseException as e:  # noqa: BLE001 - a forked child must never return into pyunion
        print(f"pyunion: cannot start the container's init: {e}", file=sys.stderr)
        os._exit(125)
    container_init(spec, tty_sock)


def container_init(spec: ContainerSpec, tty_sock: socket.socket | None) -> NoReturn:
    """Body of pid 1, until it execs catatonit (`start_init`)."""
    code = 125
    try:
        set_pdeathsig(signal.SIGKILL)  # pyunion killed: the whole container goes
        # A session of its own, as runc gives every container: the terminal pyunion runs
        # on is then nobody's controlling terminal in here, so /dev/tty is ENXIO and
        # TIOCSTI through an inherited terminal fd (typing a command into the shell that
        # ran pyunion) needs CAP_SYS_ADMIN; and ^C there reaches pyunion only, which
        # forwards it once.
        os.setsid()
        # A session keyring of its own, as runc gives every container: the caller's (a
        # login's keys) was the container's, readable wherever the keyring calls are
        # allowed (seccomp=unconfined, CAP_SYS_ADMIN).
        try:
            join_new_session_keyring()
        except OSError as e:
            raise SetupError(f"cannot make the container's session keyring: {e.strerror}") from e
        # Nothing pyunion or its caller holds may reach the container (--preserve-fds aside).
        own = [fd for fd in (spec.report_fd, spec.go_fd) if fd >= 0]
        if tty_sock is not None:
            own.append(tty_sock.detach())
        moved = confine.close_fds(spec.confinement, own)
        if spec.report_fd >= 0:
            spec.report_fd = moved.pop(0)
        if spec.go_fd >= 0:
            spec.go_fd = moved.pop(0)
        if tty_sock is not None:
            tty_sock = socket.socket(fileno=moved.pop(0))
        set_process_title("pyunion-init")
        os.environ.clear()  # the host's: the command gets spec.env
        wipe_environ()
        mask = set(FORWARDED) | {signal.SIGCHLD}
        signal.pthread_sigmask(signal.SIG_BLOCK, mask)
        _prepare_filter(spec.confinement)  # while pyunion mounts the tree
        exe = _open_init(spec.init, os.path.dirname(spec.root))
        mount_fd = -1
        go_sock = None  # kept for the hand-over of signals (`_take_signals`)
        if spec.go_fd >= 0:  # the tree is mounted (detached): init attaches it below
            go_sock = socket.socket(fileno=spec.go_fd)
            go, fds, _, _ = socket.recv_fds(go_sock, 1, 1)
            spec.go_fd = -1
            if go != b"G" or len(fds) != 1:
                os._exit(125)  # no container after all: pyunion says why
            mount_fd = fds[0]
        # All of them, or no container (as runc): a container left in the host's ipc
        # namespace (it went on with a warning) attached the host root's SysV shared
        # memory, 0600 as it was, for its root is uid 0 there too. The network namespace
        # first (`--network none`): the sysfs mounted below is then its own.
        private_net = spec.network == "none"
        if spec.network.startswith("ns:"):
            _join_netns(spec.network[3:])
        try:
            unshare(
                CLONE_NEWNS | CLONE_NEWUTS | CLONE_NEWIPC | (CLONE_NEWNET if private_net else 0)
            )
            if private_net:
                syscalls.link_up("lo")
        except OSError as e:
            hint = " (--network host makes no network namespace)" if private_net else ""
            raise SetupError(f"cannot create the container's namespaces: {e.strerror}{hint}") from e
        make_private("/")
        if mount_fd >= 0:
            _attach_root(spec.root, mount_fd)
        with contextlib.suppress(OSError):
            socket.sethostname(spec.hostname)
        try:
            setup_root(spec)
        finally:
            if spec.report_fd >= 0:
                with contextlib.suppress(OSError):
                    os.write(spec.report_fd, "".join(p + "\n" for p in CREATED).encode())
                os.close(spec.report_fd)
        ident = resolve_user(spec.user, spec.group_add)
        if userns.unmapped([ident.uid]) or userns.unmapped([ident.gid], "gid"):
            raise SetupError(f"user {spec.user!r} ({ident.uid}:{ident.gid}) is {spec.outside}")
        if spec.workdir and not os.path.isdir(spec.workdir):
            if os.path.lexists(spec.workdir):
                raise SetupError(
                    f"the working directory {spec.workdir!r} is not a directory", CANNOT_INVOKE
                )
            if not spec.make_workdir:
                raise SetupError(
                    f"the working directory {spec.workdir!r} does not exist", CANNOT_INVOKE
                )
            try:
                _make_workdir(spec.workdir, ident.uid, ident.gid)
            except OSError as e:
                raise SetupError(
                    f"cannot create the working directory {spec.workdir!r}: {e.strerror}",
                    CANNOT_INVOKE,
                ) from e
        if spec.read_only:  # the root mount only: /dev, /proc, binds, tmpfs keep their flags
            mount(None, "/", None, MS_BIND | MS_REMOUNT | MS_RDONLY)
        slave = None
        if tty_sock is not None:
            master, slave = os.openpty()  # /dev/ptmx is now the container's devpts
            socket.send_fds(tty_sock, [b"T"], [master])
            os.close(master)
            tty_sock.close()
        _exec_init(spec, ident, exe, go_sock, slave)
    except SetupError as e:
        print(f"pyunion: {e}", file=sys.stderr)
        code = e.code
    except OSError as e:
        print(
            f"pyunion: cannot set up the container: {e.strerror}"
            + (f" ({e.filename})" if e.filename else ""),
            file=sys.stderr,
        )
    except BaseException as e:  # noqa: BLE001 - never a traceback, never a return into pyunion
        print(f"pyunion: container init failed: {e!r}", file=sys.stderr)
    finally:
        flush_stdio()
    os._exit(code)
