"""fuse-overlayfs' owner options: ID mappings and squashing, as `pyunion-overlayfs -o` takes them.

containers/storage passes `uidmapping=`/`gidmapping=` when a container runs
in a user namespace other than the one its layers were written in (rootless
podman with `--userns=auto`, buildah with `--userns-uid-map`, ...): the layers
stay as they are on disk and the mount shifts the owners it shows. The syntax
is fuse-overlayfs': `DISK:SHOWN:COUNT` triples joined by `:` (its manual says
`UID:MAPPED-UID:LEN`), DISK being the ID as the daemon reads it from a layer
and SHOWN the ID the kernel is told. A reply (getattr, lookup, readdirplus,
the entry of a new object) shows DISK+i as SHOWN+i; a request (the caller's
IDs, which own what it creates, and a chown's) goes back the other way. An ID
outside every triple becomes the kernel's overflow ID (65534, `nobody`) in
either direction, as in fuse-overlayfs. POSIX ACLs carry IDs too, in
`system.posix_acl_access` and `system.posix_acl_default`: theirs are shifted
the same way.

`squash_to_root`, `squash_to_uid=N`, `squash_to_gid=N` show every object as
owned by root, or by N (`squash_to_uid`/`squash_to_gid` win over
`squash_to_root`); what is stored does not change, and a chown the daemon
cannot make (an unprivileged daemon copying up a file of another owner) is
not an error, as in fuse-overlayfs. `static_nlink` shows every directory with
one link.

The adaptor (`fuseops.py`) applies this where replies are built and where
requests hand owners to the core; without any of these options it does not
consult this module at all.
"""

from __future__ import annotations

import struct

from .digits import number
from .errors import UserError
from .userns import overflow_id

# (first ID on disk, first ID shown, count)
Extent = tuple[int, int, int]
ID_LIMIT = 1 << 32
ACL_XATTRS = (b"system.posix_acl_access", b"system.posix_acl_default")
_ACL_HEADER = struct.Struct("<I")
_ACL_ENTRY = struct.Struct("<HHI")
_ACL_VERSION = 2
_ACL_USER, _ACL_GROUP = 0x02, 0x08


def parse_extents(value: str, what: str) -> tuple[Extent, ...]:
    """`DISK:SHOWN:COUNT[:DISK:SHOWN:COUNT...]` (empty fields skipped, as fuse-overlayfs does)."""
    fields = [number(x) for x in value.split(":") if x != ""]
    nums = [x for x in fields if x is not None]
    if not fields or len(fields) % 3 or len(nums) != len(fields):
        raise UserError(
            f"malformed {what}={value!r}: expected ID:HOST-ID:COUNT triples joined by ':'"
        )
    out = []
    for i in range(0, len(nums), 3):
        disk, shown, count = nums[i : i + 3]
        if count == 0 or disk + count > ID_LIMIT or shown + count > ID_LIMIT:
            raise UserError(
                f"malformed {what}={value!r}: the triple {disk}:{shown}:{count} "
                "is empty or goes past the last ID"
            )
        out.append((disk, shown, count))
    return tuple(out)


def parse_id(value: str, what: str) -> int:
    n = number(value)
    if n is None or n >= ID_LIMIT - 1:
        raise UserError(f"malformed {what}={value!r}: expected a user or group ID")
    return n


def _shift(extents: tuple[Extent, ...], i: int, to_shown: bool, overflow: int) -> int:
    # Later triples first, as fuse-overlayfs reads them (it builds its list backwards).
    for disk, shown, count in reversed(extents):
        src, dst = (disk, shown) if to_shown else (shown, disk)
        if src <= i < src + count:
            return dst + i - src
    return overflow


class IdMap:
    """What a mount does to owners (see the module comment); `None` stands for nothing.
    Never changed once made (`make`); equal to another of the same fields."""

    __slots__ = (
        "gids",
        "overflow_gid",
        "overflow_uid",
        "squash_gid",
        "squash_uid",
        "static_nlink",
        "uids",
    )

    def __init__(
        self,
        uids: tuple[Extent, ...] = (),
        gids: tuple[Extent, ...] = (),
        squash_uid: int | None = None,
        squash_gid: int | None = None,
        static_nlink: bool = False,
        overflow_uid: int = 65534,
        overflow_gid: int = 65534,
    ) -> None:
        self.uids = uids
        self.gids = gids
        self.squash_uid = squash_uid
        self.squash_gid = squash_gid
        self.static_nlink = static_nlink
        self.overflow_uid = overflow_uid
        self.overflow_gid = overflow_gid

    def _key(self) -> tuple[object, ...]:
        return tuple(getattr(self, name) for name in IdMap.__slots__)

    def __eq__(self, other: object) -> bool:
        return self._key() == other._key() if isinstance(other, IdMap) else NotImplemented

    def __hash__(self) -> int:
        return hash(self._key())

    def __repr__(self) -> str:
        fields = ", ".join(f"{n}={getattr(self, n)!r}" for n in IdMap.__slots__)
        return f"IdMap({fields})"

    @classmethod
    def make(
        cls,
        uids: tuple[Extent, ...] = (),
        gids: tuple[Extent, ...] = (),
        squash_root: bool = False,
        squash_uid: int | None = None,
        squash_gid: int | None = None,
        static_nlink: bool = False,
    ) -> IdMap | None:
        """The map for these options; None when they change nothing."""
        if squash_root:
            squash_uid = 0 if squash_uid is None else squash_uid
            squash_gid = 0 if squash_gid is None else squash_gid
        if not (uids or gids or squash_uid is not None or squash_gid is not None or static_nlink):
            return None
        return cls(
            uids,
            gids,
            squash_uid,
            squash_gid,
            static_nlink,
            overflow_id("uid") if uids else 65534,
            overflow_id("gid") if gids else 65534,
        )

    @property
    def squashing(self) -> bool:
        return self.squash_uid is not None or self.squash_gid is not None

    @property
    def shifts(self) -> bool:
        """Whether request IDs change (only the mappings shift them; squashing does not)."""
        return bool(self.uids or self.gids)

    # replies: what the kernel is shown
    def shown_uid(self, uid: int) -> int:
        if self.squash_uid is not None:
            return self.squash_uid
        return _shift(self.uids, uid, True, self.overflow_uid) if self.uids else uid

    def shown_gid(self, gid: int) -> int:
        if self.squash_gid is not None:
            return self.squash_gid
        return _shift(self.gids, gid, True, self.overflow_gid) if self.gids else gid

    # requests: what is written
    def disk_uid(self, uid: int) -> int:
        return _shift(self.uids, uid, False, self.overflow_uid) if self.uids else uid

    def disk_gid(self, gid: int) -> int:
        return _shift(self.gids, gid, False, self.overflow_gid) if self.gids else gid

    def acl(self, value: bytes, to_shown: bool) -> bytes:
        """A POSIX ACL xattr with its user and group IDs shifted (anything else unchanged)."""
        if (
            not self.shifts
            or len(value) < _ACL_HEADER.size
            or (len(value) - _ACL_HEADER.size) % _ACL_ENTRY.size
            or _ACL_HEADER.unpack_from(value)[0] != _ACL_VERSION
        ):
            return value  # not an ACL we know: the kernel refuses it anyway
        out = bytearray(value)
        for off in range(_ACL_HEADER.size, len(value), _ACL_ENTRY.size):
            tag, perm, i = _ACL_ENTRY.unpack_from(value, off)
            if tag == _ACL_USER and self.uids:
                i = _shift(self.uids, i, to_shown, self.overflow_uid)
            elif tag == _ACL_GROUP and self.gids:
                i = _shift(self.gids, i, to_shown, self.overflow_gid)
            _ACL_ENTRY.pack_into(out, off, tag, perm, i)
        return bytes(out)
