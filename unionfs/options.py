"""Mount options: the kernel's and fuse-overlayfs' `-o` syntax, parsed into a `MountConfig`.

`lowerdir=L1:L2` lists layers top first; `\\:` escapes a colon and `\\,` a comma,
as in the kernel. Options we implement are consumed here; options that only
concern the kernel's FUSE mount (allow_other, ...) are passed through to
libfuse; harmless ones containers/storage passes are accepted and ignored;
those that would change what the mount shows and that we cannot honour (ID
mappings, squashing owners) are refused with the reason, and so is anything
unknown, since libfuse itself rejects unknown options.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from .errors import UserError

log = logging.getLogger(__name__)

# Options libfuse understands and we pass on unchanged.
FUSE_PASSTHROUGH = {"allow_other", "allow_root", "auto_unmount", "default_permissions"}
# Generic mount options that make no sense for us to act on, accepted silently.
IGNORED = {
    "rw", "dev", "suid", "exec", "async", "atime", "relatime", "noatime", "nodiratime",
    "strictatime", "lazytime", "nolazytime", "auto", "noauto", "user", "nouser", "_netdev",
    "nofail", "defaults", "noacl", "acl", "index", "redirect_dir", "metacopy", "xino",
    "userxattr", "volatile", "fsync", "nfs_export", "uuid", "default_permissions",
    "threaded", "fast_ino", "static_nlink", "noxattrs", "timeout", "context",
    "fscontext", "defcontext", "rootcontext", "max_read", "nodev", "nosuid", "noexec",
    "debug",
}
# fuse-overlayfs options that change what the mount shows (owners, modes); we
# cannot honour them, and ignoring them would silently show a different tree.
REFUSED = {
    "squash_to_root": "showing every file as owned by root",
    "squash_to_uid": "showing every file as owned by one user",
    "squash_to_gid": "showing every file as owned by one group",
}
# Security-label options: their value may hold commas inside double quotes.
LABEL_OPTIONS = {"context", "fscontext", "defcontext", "rootcontext"}
# Options we implement ourselves (not passed to libfuse).
MOUNT_FLAGS = {"ro", "nosuid", "nodev", "noexec"}


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
    uid_map: list[tuple[int, int, int]] = field(default_factory=list)
    gid_map: list[tuple[int, int, int]] = field(default_factory=list)


def split_escaped(text: str, sep: str) -> list[str]:
    """Split on `sep`, honouring backslash escapes (`\\:` is a literal colon)."""
    parts: list[str] = []
    cur: list[str] = []
    it = iter(text)
    for ch in it:
        if ch == "\\":
            nxt = next(it, None)
            if nxt is None:
                raise UserError(f"malformed option string (trailing backslash): {text!r}")
            if nxt == sep:
                cur.append(nxt)
            else:
                cur.append("\\" + nxt)
            continue
        if ch == sep:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    parts.append("".join(cur))
    return parts


def _unescape(text: str) -> str:
    return text.replace("\\\\", "\\")


def _parse_idmap(value: str, what: str) -> list[tuple[int, int, int]]:
    """fuse-overlayfs' `ID:HOST-ID:COUNT[:ID:HOST-ID:COUNT...]` (empty fields skipped, as it does)."""
    fields = [x for x in value.split(":") if x != ""]
    try:
        nums = [int(x) for x in fields]
    except ValueError:
        nums = []
    if not nums or len(nums) % 3 or min(nums) < 0:
        raise UserError(f"malformed {what} {value!r}: expected ID:HOST-ID:COUNT[:ID:HOST-ID:COUNT...]")
    return [(nums[i], nums[i + 1], nums[i + 2]) for i in range(0, len(nums), 3)]


def _identity_idmap(value: str, what: str) -> list[tuple[int, int, int]]:
    """Accept an ID mapping only when it maps every ID to itself (nothing to translate)."""
    mapping = _parse_idmap(value, what)
    if any(inside != outside for inside, outside, _ in mapping):
        raise UserError(
            f"{what}={value}: ID mapping is not supported; pyunion shows owners as they are "
            "on disk (use the mount program without a user-namespace ID mapping)")
    return mapping


def _split_raw(text: str) -> list[str]:
    """Split an option string on commas, keeping escapes; commas inside double quotes stay."""
    items: list[str] = []
    cur: list[str] = []
    quoted = False
    it = iter(text)
    for ch in it:
        if ch == "\\":
            cur.append(ch)
            cur.append(next(it, ""))
        elif ch == '"':
            quoted = not quoted
            cur.append(ch)
        elif ch == "," and not quoted:
            items.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    items.append("".join(cur))
    return items


def normalize_overlayfs_options(text: str) -> str:
    """Tidy an option string as containers/storage passes it to fuse-overlayfs.

    It leaves empty items (`workdir=W,,volatile`, a trailing comma), which the
    kernel and libfuse skip, and may add an SELinux `context="a,b"` label whose
    quoted value holds commas. We drop both (a label is not ours to apply: a
    FUSE file system gets its label from the policy), and keep the rest as is.
    """
    kept = []
    for item in _split_raw(text):
        if item == "":
            continue
        if item.partition("=")[0] in LABEL_OPTIONS:
            log.debug("ignoring mount option %r", item)
            continue
        kept.append(item)
    return ",".join(kept)


def _flag(item: str, value: str) -> bool:
    if value in ("", "1", "yes", "true"):
        return True
    if value in ("0", "no", "false"):
        return False
    raise UserError(f"malformed option {item!r}: expected 0 or 1")


def parse_options(opts: list[str], cfg: MountConfig) -> None:
    """Apply every `-o` string in `opts` to `cfg`."""
    for opt_string in opts:
        if opt_string == "":
            raise UserError("malformed option string: empty -o")
        for item in split_escaped(opt_string, ","):
            if item == "":
                raise UserError(f"malformed option string {opt_string!r}: empty option")
            key, eq, value = item.partition("=")
            if key == "lowerdir":
                if not eq or value == "":
                    raise UserError("malformed option: lowerdir needs at least one directory")
                # containers/storage may use '::' for data-only layers; treat as ':'.
                layers = [_unescape(x) for x in split_escaped(value, ":")]
                layers = [x for x in layers if x != ""]
                if not layers:
                    raise UserError("malformed option: lowerdir needs at least one directory")
                cfg.lowers = layers
            elif key == "upperdir":
                if not value:
                    raise UserError("malformed option: upperdir needs a directory")
                cfg.upper = _unescape(value)
            elif key == "workdir":
                if not value:
                    raise UserError("malformed option: workdir needs a directory")
                cfg.work = _unescape(value)
            elif key == "ro" and not eq:
                cfg.read_only = True
            elif key == "volatile" or (key == "fsync" and value == "0"):
                cfg.volatile = True
            elif key == "writeback":
                cfg.writeback = _flag(item, value)
            elif key == "spin":
                if not value.isdigit() or int(value) > 10000:
                    raise UserError(f"malformed option {item!r}: spin takes microseconds, 0 to 10000")
                cfg.spin_us = int(value)
            elif key == "fsname" and eq:
                cfg.fsname = value
            elif key == "uidmapping":
                cfg.uid_map = _identity_idmap(value, "uidmapping")
            elif key == "gidmapping":
                cfg.gid_map = _identity_idmap(value, "gidmapping")
            elif key in REFUSED:
                raise UserError(f"mount option {item!r} is not supported ({REFUSED[key]})")
            elif key == "xattr_permissions" and value not in ("", "0"):
                raise UserError(f"mount option {item!r} is not supported "
                                "(owners and modes kept in xattrs; needed with force_mask)")
            elif key == "plugins" and value:
                raise UserError(f"mount option {item!r} is not supported (fuse-overlayfs layer plugins)")
            elif key in ("xattr_permissions", "plugins"):
                log.debug("ignoring mount option %r", item)
            elif key in FUSE_PASSTHROUGH and not eq:
                cfg.fuse_options.add(key)
            elif key in ("nosuid", "nodev", "noexec") and not eq:
                cfg.fuse_options.add(key)
            elif key in IGNORED:
                log.debug("ignoring mount option %r", item)
            else:
                raise UserError(f"unknown mount option {item!r}")
