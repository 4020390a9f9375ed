"""`-v HOST:CONTAINER[:OPTIONS]` of `pyunion run`: the spec podman takes, and the bind it makes.

HOST is absolute, or starts with "." (relative to the working directory, as podman
reads it); anything else would be one of podman's named volumes, which pyunion lacks.

Options (comma-separated, podman's spelling): `ro`/`rw`, `nosuid`/`suid`,
`nodev`/`dev`, `noexec`/`exec`, `rbind` (the default: mounts below HOST come
along) or `bind` (HOST alone), `z`/`Z` (SELinux relabelling: accepted and
ignored, there is no SELinux here), `private`/`rprivate` (what the
container's mount namespace is anyway). Read-only and the other attributes
apply to every mount below the target (mount_setattr with AT_RECURSIVE), as
Docker does for `:ro`; kernels older than 5.12 get the same by a remount of
each submount. `--tmpfs CONTAINER[:OPTIONS]` is parsed here too (`parse_tmpfs`).
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass

from . import syscalls
from .errors import UserError
from .syscalls import (
    AT_EMPTY_PATH,
    AT_RECURSIVE,
    MOUNT_ATTR_NODEV,
    MOUNT_ATTR_NOEXEC,
    MOUNT_ATTR_NOSUID,
    MOUNT_ATTR_RDONLY,
    MS_BIND,
    MS_NODEV,
    MS_NOEXEC,
    MS_NOSUID,
    MS_RDONLY,
    MS_REMOUNT,
)
from .tree import open_trusted

IGNORED = {"z", "Z", "private", "rprivate"}
PAIRS = {"ro": "rw", "nosuid": "suid", "nodev": "dev", "noexec": "exec", "bind": "rbind"}
OPPOSITE = {**PAIRS, **{v: k for k, v in PAIRS.items()}}
ATTRS = {
    "ro": MOUNT_ATTR_RDONLY,
    "nosuid": MOUNT_ATTR_NOSUID,
    "nodev": MOUNT_ATTR_NODEV,
    "noexec": MOUNT_ATTR_NOEXEC,
}


@dataclass
class Volume:
    source: str  # on the host, symlinks resolved (only root's and the caller's followed)
    target: str  # inside the container, resolved in its root
    read_only: bool = False
    recursive: bool = True
    nosuid: bool = False
    nodev: bool = False
    noexec: bool = False

    @property
    def attrs(self) -> int:
        """The MOUNT_ATTR_* flags to set on the bind (and every mount below it)."""
        return (
            (MOUNT_ATTR_RDONLY if self.read_only else 0)
            | (MOUNT_ATTR_NOSUID if self.nosuid else 0)
            | (MOUNT_ATTR_NODEV if self.nodev else 0)
            | (MOUNT_ATTR_NOEXEC if self.noexec else 0)
        )


def parse(spec: str) -> Volume:
    """One `-v` value; a bad one is a UserError (exit 125) naming what is wrong."""
    parts = spec.split(":")
    if len(parts) not in (2, 3) or not parts[0] or not parts[1]:
        raise UserError(f"bad volume {spec!r}: expected HOST:CONTAINER[:OPTIONS]", 125)
    src, dst = parts[0], parts[1]
    options = parts[2].split(",") if len(parts) == 3 else []
    seen: set[str] = set()
    for opt in options:
        if opt in IGNORED:
            continue
        if opt not in OPPOSITE:
            raise UserError(
                f"bad volume {spec!r}: unknown option {opt!r} (supported: ro, rw, "
                "nosuid, suid, nodev, dev, noexec, exec, rbind, bind, z, Z)",
                125,
            )
        if opt in seen or OPPOSITE[opt] in seen:
            raise UserError(
                f"bad volume {spec!r}: option {opt!r} given twice or with its opposite", 125
            )
        seen.add(opt)
    return _volume(spec, src, dst, seen)


def _volume(spec: str, src: str, dst: str, seen: set[str]) -> Volume:
    """The bind of SRC (resolved on the host) at DST with the options `seen`. A SRC that
    starts with "." is relative to the working directory, as in podman."""
    if src.startswith("."):
        src = os.path.abspath(src)
    if not src.startswith("/"):
        raise UserError(
            f"bad volume {spec!r}: the host path must be absolute "
            "(named volumes are not supported)",
            125,
        )
    try:
        fd = open_trusted(src, os.O_PATH)
    except FileNotFoundError:
        raise UserError(f"volume source {src!r} does not exist", 125) from None
    except OSError as e:
        raise UserError(f"volume source {src!r}: {e.strerror}", 125) from None
    try:
        real = os.readlink(syscalls.fd_str(fd))
    finally:
        os.close(fd)
    if not dst.startswith("/") or os.path.normpath(dst) == "/":
        raise UserError(f"bad volume {spec!r}: the container path must be absolute and not /", 125)
    return Volume(
        real,
        dst,
        read_only="ro" in seen,
        recursive="bind" not in seen,
        nosuid="nosuid" in seen,
        nodev="nodev" in seen,
        noexec="noexec" in seen,
    )


# -- --tmpfs CONTAINER[:OPTIONS] ------------------------------------------------------------
@dataclass
class Tmpfs:
    """A `--tmpfs` mount: podman's defaults are nosuid and nodev (not noexec), and the
    image's content at the target copied up into it (`tmpcopyup`)."""

    target: str
    flags: int = MS_NOSUID | MS_NODEV
    data: str = ""  # size=, mode=, nr_inodes=, nr_blocks=: the kernel's tmpfs options
    copyup: bool = True


# The flags podman's --tmpfs takes, each with its opposite (MS_* set, cleared).
TMPFS_FLAGS = {
    "ro": (MS_RDONLY, 0),
    "rw": (0, MS_RDONLY),
    "nosuid": (MS_NOSUID, 0),
    "suid": (0, MS_NOSUID),
    "nodev": (MS_NODEV, 0),
    "dev": (0, MS_NODEV),
    "noexec": (MS_NOEXEC, 0),
    "exec": (0, MS_NOEXEC),
}
TMPFS_DATA = ("size", "mode", "nr_inodes", "nr_blocks")


def parse_tmpfs(spec: str) -> Tmpfs:
    """One `--tmpfs` value; a bad one is a UserError (exit 125), as podman's."""
    target, _, options = spec.partition(":")
    return _tmpfs(spec, target, options.split(",") if options else [])


def _tmpfs(spec: str, target: str, options: list[str]) -> Tmpfs:
    if not target.startswith("/") or os.path.normpath(target) == "/":
        raise UserError(f"bad --tmpfs {spec!r}: the container path must be absolute and not /", 125)
    fs = Tmpfs(target)
    data = []
    for opt in options:
        key, eq, value = opt.partition("=")
        if opt in TMPFS_FLAGS:
            add, clear = TMPFS_FLAGS[opt]
            fs.flags = (fs.flags | add) & ~clear
        elif opt in ("tmpcopyup", "notmpcopyup"):
            fs.copyup = opt == "tmpcopyup"
        elif eq and key in TMPFS_DATA and value and "\0" not in value:  # the kernel checks it
            data.append(opt)
        else:
            raise UserError(
                f"bad --tmpfs {spec!r}: unknown option {opt!r} (supported: ro, rw, nosuid, "
                "suid, nodev, dev, noexec, exec, size=, mode=, nr_inodes=, nr_blocks=, "
                "tmpcopyup, notmpcopyup)",
                125,
            )
    fs.data = ",".join(data)
    return fs


# -- --mount type=bind|tmpfs,... -----------------------------------------------------------
MOUNT_KEYS = {"source": "src", "src": "src", "destination": "dst", "dst": "dst", "target": "dst"}
MOUNT_IGNORED = {"z", "Z", "relabel", "bind-propagation"}  # no SELinux; private already


def parse_mount(spec: str) -> Volume | Tmpfs:
    """One `--mount` value (podman's and docker's long form) as the bind or tmpfs it
    means: `type=bind,source=HOST,target=CONTAINER[,readonly][,bind-nonrecursive]...`
    or `type=tmpfs,target=CONTAINER[,tmpfs-size=N][,tmpfs-mode=OCTAL]...`; the flags
    of `-v` and `--tmpfs` are taken too. A bad one is a UserError (125)."""
    kind = None
    paths: dict[str, str] = {}
    flags: list[str] = []
    for item in spec.split(","):
        key, eq, value = item.partition("=")
        if key == "type" and eq:
            kind = value
        elif key in MOUNT_KEYS and eq and value:
            paths[MOUNT_KEYS[key]] = value
        elif key in ("readonly", "ro") and value in ("", "true", "false"):
            flags.append("rw" if value == "false" else "ro")
        elif key == "bind-nonrecursive" and value in ("", "true", "false"):
            flags.append("rbind" if value == "false" else "bind")
        elif key == "tmpfs-size" and value:
            flags.append(f"size={value}")
        elif key == "tmpfs-mode" and value:
            flags.append(f"mode={value}")
        elif key in MOUNT_IGNORED:
            continue
        elif item:
            flags.append(item)
    if kind not in ("bind", "tmpfs"):
        raise UserError(
            f"bad --mount {spec!r}: type=bind or type=tmpfs is needed (no named volumes)", 125
        )
    if "dst" not in paths or ("src" in paths) != (kind == "bind"):
        what = "source= and target=" if kind == "bind" else "target= and no source="
        raise UserError(f"bad --mount {spec!r}: type={kind} takes {what}", 125)
    if kind == "tmpfs":
        return _tmpfs(spec, paths["dst"], flags)
    seen: set[str] = set()
    for opt in flags:
        if opt not in OPPOSITE:
            raise UserError(f"bad --mount {spec!r}: unknown option {opt!r}", 125)
        seen.discard(OPPOSITE[opt])
        seen.add(opt)
    return _volume(spec, paths["src"], paths["dst"], seen)


# -- mount attributes, recursively --------------------------------------------------------------
_ST_FLAGS = (
    (os.ST_RDONLY, MS_RDONLY),
    (os.ST_NOSUID, MS_NOSUID),
    (os.ST_NODEV, MS_NODEV),
    (os.ST_NOEXEC, MS_NOEXEC),
    (os.ST_NOATIME, 0x400),
    (os.ST_NODIRATIME, 0x800),
    (os.ST_RELATIME, 0x200000),
)
_ATTR_TO_MS = (
    (MOUNT_ATTR_RDONLY, MS_RDONLY),
    (MOUNT_ATTR_NOSUID, MS_NOSUID),
    (MOUNT_ATTR_NODEV, MS_NODEV),
    (MOUNT_ATTR_NOEXEC, MS_NOEXEC),
)


def set_attrs(fd: int, attrs: int, recursive: bool = True) -> None:
    """Set MOUNT_ATTR_* `attrs` on the mount whose root `fd` is (and every mount below it)."""
    if not attrs:
        return
    try:
        syscalls.mount_setattr(fd, "", AT_EMPTY_PATH | (AT_RECURSIVE if recursive else 0), attrs)
    except OSError as e:
        if e.errno != errno.ENOSYS:
            raise
        remount_each(fd, attrs, recursive)


def remount_each(fd: int, attrs: int, recursive: bool = True) -> None:
    """What `set_attrs` does on kernels without mount_setattr: remount the mount and each
    one below it, one by one, keeping the flags each already has (a bind remount that
    dropped a locked flag would fail)."""
    top = os.readlink(syscalls.fd_str(fd))
    prefix = top.rstrip("/") + "/"
    add = 0
    for attr, ms in _ATTR_TO_MS:
        if attrs & attr:
            add |= ms
    targets = [syscalls.fd_str(fd)]
    if recursive:
        from .mount import mounts  # here: the container's init imports this module

        targets += [mp for mp, _, _ in mounts() if mp.startswith(prefix)]
    for target in targets:
        flags = os.statvfs(target).f_flag
        keep = 0
        for st, ms in _ST_FLAGS:
            if flags & st:
                keep |= ms
        syscalls.mount(None, target, None, MS_BIND | MS_REMOUNT | keep | add)
