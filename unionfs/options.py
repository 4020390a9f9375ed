"""Mount options: the kernel's and fuse-overlayfs' `-o` syntax, parsed into a `MountConfig`.

One parser for `pyunion mount -o` and `pyunion-overlayfs -o`, with the
kernel's rules: items are separated by commas, except an escaped one (`\\,`)
or one inside double quotes (`context="a:b:c1,c2"`); empty items are
skipped; `lowerdir=L1:L2` lists layers top first, `\\:` escaping a colon; a
backslash escapes any character in a path (`\\\\` is one backslash).

Options we implement are consumed here; options that only concern the
kernel's FUSE mount (allow_other, ...) are passed through to libfuse; harmless
ones containers/storage passes are accepted and ignored; those that would
change what the mount shows and that we cannot honour (ID mappings, squashing
owners) are refused with the reason, and so is anything unknown, since libfuse
itself rejects unknown options.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field

from .errors import UserError

log = logging.getLogger(__name__)

# Options libfuse understands and we pass on unchanged.
FUSE_PASSTHROUGH = {"allow_other", "allow_root", "auto_unmount", "default_permissions"}
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
    "redirect_dir",
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
    "static_nlink",
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
}
# fuse-overlayfs options that change what the mount shows (owners, modes); we
# cannot honour them, and ignoring them would silently show a different tree.
REFUSED = {
    "squash_to_root": "showing every file as owned by root",
    "squash_to_uid": "showing every file as owned by one user",
    "squash_to_gid": "showing every file as owned by one group",
}


@dataclass
class MountConfig:
    """Everything a mount needs; layers are listed top first."""

    lowers: list[str]
    mountpoint: str
    upper: str | None = None
    work: str | None = None
    fuse_options: set[str] = field(default_factory=set)
    read_only: bool = False
    volatile: bool = False  # fsync=0 / volatile: skip fsync to disk
    writeback: bool = False  # writeback=1: the kernel's writeback cache (README: the mtime caveat)
    spin_us: int = 30  # poll /dev/fuse this long before sleeping (see reqloop.py)
    debug: bool = False
    foreground: bool = False
    fsname: str = "pyunion"


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


def _parse_idmap(value: str, what: str) -> list[tuple[int, int, int]]:
    """fuse-overlayfs' `ID:HOST-ID:COUNT[:ID:HOST-ID:COUNT...]` (empty fields skipped, as there)."""
    fields = [x for x in value.split(":") if x != ""]
    try:
        nums = [int(x) for x in fields]
    except ValueError:
        nums = []
    if not nums or len(nums) % 3 or min(nums) < 0:
        raise UserError(
            f"malformed {what} {value!r}: expected ID:HOST-ID:COUNT[:ID:HOST-ID:COUNT...]"
        )
    return [(nums[i], nums[i + 1], nums[i + 2]) for i in range(0, len(nums), 3)]


def _check_identity_idmap(value: str, what: str) -> None:
    """Accept an ID mapping only when it maps every ID to itself (nothing to translate)."""
    if any(inside != outside for inside, outside, _ in _parse_idmap(value, what)):
        raise UserError(
            f"{what}={value}: ID mapping is not supported; pyunion shows owners as they are "
            "on disk (use the mount program without a user-namespace ID mapping)"
        )


def _flag(item: str, value: str) -> bool:
    if value in ("", "1", "yes", "true"):
        return True
    if value in ("0", "no", "false"):
        return False
    raise UserError(f"malformed option {item!r}: expected 0 or 1")


def parse_options(opts: list[str], cfg: MountConfig) -> None:
    """Apply every `-o` string in `opts` to `cfg`: the one parser of both commands.

    `pyunion mount -o` and `pyunion-overlayfs -o` (containers/storage's mount
    program) read options by the same rules (`split_options`).
    """
    for opt_string in opts:
        for item in split_options(opt_string):
            key, eq, value = item.partition("=")
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
            elif key == "volatile" or (key == "fsync" and value == "0"):
                cfg.volatile = True
            elif key == "writeback":
                cfg.writeback = _flag(item, value)
            elif key == "spin":
                if not value.isdigit() or int(value) > 10000:
                    raise UserError(
                        f"malformed option {item!r}: spin takes microseconds, 0 to 10000"
                    )
                cfg.spin_us = int(value)
            elif key == "fsname" and eq:
                cfg.fsname = unescape(value)
            elif key in ("uidmapping", "gidmapping"):
                _check_identity_idmap(value, key)
            elif key in REFUSED:
                raise UserError(f"mount option {item!r} is not supported ({REFUSED[key]})")
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
                log.debug("ignoring mount option %r", item)
            elif not eq and (key in FUSE_PASSTHROUGH or key in ("nosuid", "nodev", "noexec")):
                cfg.fuse_options.add(key)
            elif key in IGNORED:
                # Security labels (context=...) among them: a FUSE file system
                # gets its label from the policy, not from a mount option.
                log.debug("ignoring mount option %r", item)
            else:
                raise UserError(f"unknown mount option {item!r}")
