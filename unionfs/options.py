"""Mount options: the kernel's and fuse-overlayfs' `-o` syntax, parsed into a `MountConfig`.

One parser for `pyunion mount -o` and `pyunion-overlayfs -o`, with the
kernel's rules: items are separated by commas, except an escaped one (`\\,`)
or one inside double quotes (`context="a:b:c1,c2"`); empty items are
skipped; `lowerdir=L1:L2` lists layers top first, `\\:` escaping a colon; a
backslash escapes any character in a path (`\\\\` is one backslash).

Options we implement are consumed here; options that only concern the
kernel's FUSE mount (allow_other, ...) are passed through to libfuse; harmless
ones containers/storage passes are accepted and ignored; fuse-overlayfs'
owner options (`uidmapping=`, `gidmapping=`, `squash_to_root`,
`squash_to_uid=`, `squash_to_gid=`, `static_nlink`) become the mount's
`IdMap` (see idmap.py); options that would change what the mount shows and
that we cannot honour are refused with the reason, and so is anything
unknown: fuse-overlayfs drops those with a warning, but an option dropped may
be one that mattered (`sync`, `nosymfollow`). Mount propagation flags
(podman's `private`) and libfuse's threading options are taken: they change
nothing that is shown.
"""

from __future__ import annotations

import re

from .digits import number
from .errors import UserError
from .idmap import Extent, IdMap, parse_extents, parse_id

# Options libfuse understands and we pass on unchanged.
FUSE_PASSTHROUGH = {"allow_other", "allow_root", "auto_unmount", "default_permissions"}
# The VFS flags a mount takes from us (libfuse's defaults for root are dev,suid,exec).
VFS_FLAGS = ("nosuid", "nodev", "noexec")
# Mount propagation: containers/common passes `private` with `-v SRC:DST:O` and
# `--rootfs DIR:O`, then bind-mounts the merged tree into the container as `slave`;
# fuse-overlayfs ignores them. They say where mounts propagate, not what this one shows.
PROPAGATION = {
    "private",
    "rprivate",
    "slave",
    "rslave",
    "shared",
    "rshared",
    "unbindable",
    "runbindable",
}
# The kernel's redirect_dir values that follow no redirect: pyunion never writes one and
# cannot follow one (a layer's renamed directory would show the wrong tree);
# fuse-overlayfs refuses every other value too.
REDIRECT_OFF = {"off", "nofollow"}
# Generic mount options that make no sense for us to act on, accepted silently.
IGNORED = {
    "rw",
    "dev",
    "suid",
    "exec",
    "async",
    "atime",
    "relatime",
    "noatime",
    "nodiratime",
    "strictatime",
    "lazytime",
    "nolazytime",
    "auto",
    "noauto",
    "user",
    "nouser",
    "_netdev",
    "nofail",
    "defaults",
    "noacl",
    "acl",
    "index",
    "metacopy",
    "xino",
    "userxattr",
    "volatile",
    "fsync",
    "nfs_export",
    "uuid",
    "default_permissions",
    "threaded",
    "fast_ino",
    "noxattrs",
    "timeout",
    "context",
    "fscontext",
    "defcontext",
    "rootcontext",
    "max_read",
    "nodev",
    "nosuid",
    "noexec",
    "debug",
    # libfuse's threading: pyunion serves requests on one trio loop.
    "clone_fd",
    "max_threads",
    "max_idle_threads",
}


class MountConfig:
    """Everything a mount needs; layers are listed top first.

    A plain class, as every one a daemon imports: the daemon, which unpickles one, then
    never loads `dataclasses` (and its generated methods), ~0.17 MiB of each daemon."""

    __slots__ = (
        "debug",
        "detached",
        "foreground",
        "fsname",
        "fuse_options",
        "idmap",
        "killpriv",
        "lowers",
        "mountpoint",
        "read_only",
        "spin_us",
        "upper",
        "volatile",
        "work",
        "writeback",
    )

    def __init__(
        self,
        lowers: list[str],
        mountpoint: str,
        upper: str | None = None,
        work: str | None = None,
        fuse_options: set[str] | None = None,
        read_only: bool = False,
        volatile: bool = False,
        writeback: bool = False,
        spin_us: int = 30,
        killpriv: bool = True,
        debug: bool = False,
        foreground: bool = False,
        fsname: str = "pyunion",
        idmap: IdMap | None = None,
        detached: bool = False,
    ) -> None:
        self.lowers = lowers
        self.mountpoint = mountpoint
        self.upper = upper
        self.work = work
        self.fuse_options: set[str] = set() if fuse_options is None else fuse_options
        self.read_only = read_only
        self.volatile = volatile  # fsync=0 / volatile: skip fsync to disk
        self.writeback = writeback  # writeback=1: the kernel's writeback cache (README)
        self.spin_us = spin_us  # poll /dev/fuse this long before sleeping (see reqloop.py)
        self.killpriv = killpriv  # killpriv=0: the kernel clears set-ID bits (fuseinit)
        self.debug = debug
        self.foreground = foreground
        self.fsname = fsname
        self.idmap = idmap  # fuse-overlayfs' owner options; None: owners as on disk
        self.detached = detached  # mount.mount_detached: a container's mount, in no namespace


class _Owners:
    """The owner options as read, made into one `IdMap` once every option is in."""

    __slots__ = ("gids", "seen", "squash_gid", "squash_root", "squash_uid", "static_nlink", "uids")

    def __init__(self) -> None:
        self.uids: tuple[Extent, ...] = ()
        self.gids: tuple[Extent, ...] = ()
        self.squash_root = False
        self.squash_uid: int | None = None
        self.squash_gid: int | None = None
        self.static_nlink = False
        self.seen = False


def _scan(text: str, sep: str, quotes: bool) -> list[str]:
    """Split `text` on `sep` where it is neither escaped nor (with `quotes`) inside double quotes.

    Escapes and quotes are kept in the pieces: a later split of a value (the
    colons of `lowerdir=`) must still see them; `unescape` removes them last.
    """
    parts: list[str] = []
    cur: list[str] = []
    quoted = False
    i, n = 0, len(text)
    while i < n:
        ch = text[i]
        if ch == "\\":
            if i + 1 == n:
                raise UserError(f"malformed option string (trailing backslash): {text!r}")
            cur.append(text[i : i + 2])
            i += 2
            continue
        if ch == '"' and quotes:
            quoted = not quoted
        if ch == sep and not quoted:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
        i += 1
    if quoted:
        raise UserError(f"malformed option string (unterminated quote): {text!r}")
    parts.append("".join(cur))
    return parts


def unescape(text: str) -> str:
    """`\\X` -> `X`, as the kernel reads a path in an option (`\\,`, `\\:`, `\\\\`)."""
    return re.sub(r"\\(.)", r"\1", text, flags=re.DOTALL)


def split_options(text: str) -> list[str]:
    """The items of one `-o` string, by the kernel's rules.

    Items are separated by commas that are not escaped (`\\,`) and not inside
    double quotes (an SELinux `context="a:b:c1,c2"`, as the kernel's LSM option
    parser allows); empty items (`a,,b`, a trailing comma, as containers/storage
    passes them) are skipped, as the kernel and libfuse do.
    """
    return [item for item in _scan(text, ",", quotes=True) if item != ""]


def split_lowerdirs(value: str) -> list[str]:
    """The layers of `lowerdir=`, top first: split on unescaped colons, then unescaped.

    `::` (containers/storage's separator before data-only layers) counts as one colon.
    """
    return [unescape(x) for x in _scan(value, ":", quotes=False) if x != ""]


def _flag(item: str, value: str) -> bool:
    if value in ("", "1", "yes", "true"):
        return True
    if value in ("0", "no", "false"):
        return False
    raise UserError(f"malformed option {item!r}: expected 0 or 1")


def _ignoring(item: str) -> None:
    """Say (in the debug log) that `item` is accepted and ignored. logging is imported
    here, when there is something to say: `pyunion mount` itself logs nothing else."""
    import logging

    logging.getLogger(__name__).debug("ignoring mount option %r", item)


def parse_options(opts: list[str], cfg: MountConfig) -> None:
    """Apply every `-o` string in `opts` to `cfg`: the one parser of both commands.

    `pyunion mount -o` and `pyunion-overlayfs -o` (containers/storage's mount
    program) read options by the same rules (`split_options`).
    """
    owners = _Owners()
    for opt_string in opts:
        for item in split_options(opt_string):
            key, eq, value = item.partition("=")
            if _owner_option(owners, item, key, eq, value):
                continue
            if key == "lowerdir":
                layers = split_lowerdirs(value)
                if not layers:
                    raise UserError("malformed option: lowerdir needs at least one directory")
                cfg.lowers = layers
            elif key == "upperdir":
                if not value:
                    raise UserError("malformed option: upperdir needs a directory")
                cfg.upper = unescape(value)
            elif key == "workdir":
                if not value:
                    raise UserError("malformed option: workdir needs a directory")
                cfg.work = unescape(value)
            elif key == "ro" and not eq:
                cfg.read_only = True
            elif key == "volatile" and eq:
                # `volatile=0` turned fsync off: the kernel's flag takes no value.
                raise UserError(f"malformed option {item!r}: volatile takes no value")
            elif key == "volatile" or (key == "fsync" and value == "0"):
                cfg.volatile = True
            elif key == "redirect_dir":
                if value not in REDIRECT_OFF:
                    raise UserError(
                        f"mount option {item!r} is not supported "
                        "(redirects are neither written nor followed: redirect_dir=off)"
                    )
            elif key == "writeback":
                cfg.writeback = _flag(item, value)
            elif key == "killpriv":
                cfg.killpriv = _flag(item, value)
            elif key == "spin":
                spin = number(value)
                if spin is None or spin > 10000:
                    raise UserError(
                        f"malformed option {item!r}: spin takes microseconds, 0 to 10000"
                    )
                cfg.spin_us = spin
            elif key == "fsname" and eq:
                cfg.fsname = unescape(value)
            elif key == "xattr_permissions" and value not in ("", "0"):
                raise UserError(
                    f"mount option {item!r} is not supported "
                    "(owners and modes kept in xattrs; needed with force_mask)"
                )
            elif key == "plugins" and value:
                raise UserError(
                    f"mount option {item!r} is not supported (fuse-overlayfs layer plugins)"
                )
            elif key in ("xattr_permissions", "plugins"):
                _ignoring(item)
            elif key in PROPAGATION:
                if eq:
                    raise UserError(f"malformed option {item!r}: {key} takes no value")
                _ignoring(item)
            elif key in FUSE_PASSTHROUGH or key in VFS_FLAGS:
                if eq:
                    # `nosuid=1` was taken for an ignored option: the mount kept suid.
                    raise UserError(f"malformed option {item!r}: {key} takes no value")
                cfg.fuse_options.add(key)
            elif key in IGNORED:
                # Security labels (context=...) among them: a FUSE file system
                # gets its label from the policy, not from a mount option.
                _ignoring(item)
            else:
                raise UserError(f"unknown mount option {item!r}")
    if owners.seen:
        cfg.idmap = IdMap.make(
            owners.uids,
            owners.gids,
            owners.squash_root,
            owners.squash_uid,
            owners.squash_gid,
            owners.static_nlink,
        )


def _owner_option(owners: _Owners, item: str, key: str, eq: str, value: str) -> bool:
    """Read one of fuse-overlayfs' owner options into `owners`; False: not one of them.

    As in fuse-overlayfs, a later occurrence replaces an earlier one, and
    `squash_to_root`/`static_nlink` are plain flags (`=0` turns them off).
    """
    if key in ("uidmapping", "gidmapping"):
        extents = parse_extents(value, key)
        if key == "uidmapping":
            owners.uids = extents
        else:
            owners.gids = extents
    elif key in ("squash_to_uid", "squash_to_gid"):
        n = parse_id(value, key)
        if key == "squash_to_uid":
            owners.squash_uid = n
        else:
            owners.squash_gid = n
    elif key == "squash_to_root":
        owners.squash_root = _flag(item, value)
    elif key == "static_nlink":
        owners.static_nlink = _flag(item, value)
    else:
        return False
    owners.seen = True
    return True
