"""fuse-overlayfs' owner options (`uidmapping=`, `gidmapping=`, `squash_to_*`, `static_nlink`).

First the rules alone (the example of fuse-overlayfs' manual, overflow IDs,
precedence, ACL entries), then real mounts: pyunion-overlayfs and
fuse-overlayfs over the same layers with the same options must show the same
owners, and write the same owners to the upper for chown, create, mkdir,
symlink, mknod and a copy-up.
"""

from __future__ import annotations

import struct

import pytest

from unionfs.errors import UserError
from unionfs.idmap import IdMap, parse_extents


def test_the_manuals_example() -> None:
    # uidmapping=0:1000:1:1:110000:65536 run outside the namespace: the layer's 0 and 1
    # are shown as 1000 and 110000, which the namespace sees as 0 and 1.
    m = IdMap.make(
        parse_extents("0:1000:1:1:110000:65536", "uidmapping"),
        parse_extents("0:1000:1:1:110000:65536", "gidmapping"),
    )
    assert m is not None
    assert [m.shown_uid(i) for i in (0, 1, 2, 65536)] == [1000, 110000, 110001, 175535]
    assert [m.disk_uid(i) for i in (1000, 110000, 175535)] == [0, 1, 65536]
    assert m.shown_uid(65537) == m.overflow_uid == 65534  # outside every triple
    assert m.disk_gid(5) == m.overflow_gid


def test_empty_fields_and_bad_values() -> None:
    assert parse_extents(":0:0:1:1:1:65536", "gidmapping") == ((0, 0, 1), (1, 1, 65536))
    for bad in ("0:1", "a:b:c", "0:0:0", "0:4294967295:2", "-1:0:1", ""):
        with pytest.raises(UserError, match="malformed uidmapping"):
            parse_extents(bad, "uidmapping")


def test_squash_precedence() -> None:
    m = IdMap.make(squash_root=True)
    assert m is not None and (m.shown_uid(1234), m.shown_gid(99)) == (0, 0)
    m = IdMap.make(squash_root=True, squash_uid=1000)
    assert m is not None and (m.shown_uid(5), m.shown_gid(5)) == (1000, 0)
    m = IdMap.make(parse_extents("0:100:10", "u"), parse_extents("0:200:10", "g"), squash_uid=7)
    assert m is not None and (m.shown_uid(3), m.shown_gid(3)) == (7, 203)
    assert (m.disk_uid(103), m.disk_gid(203)) == (3, 3)  # requests are still shifted
    assert IdMap.make() is None  # nothing to do: the adaptor keeps its plain path


def test_later_triples_win_where_they_overlap() -> None:
    m = IdMap.make(parse_extents("0:100:10:5:500:10", "u"))
    assert m is not None and (m.shown_uid(4), m.shown_uid(5)) == (104, 500)


def test_acl_ids_are_shifted() -> None:
    def acl(*entries: tuple[int, int, int]) -> bytes:
        return struct.pack("<I", 2) + b"".join(struct.pack("<HHI", *e) for e in entries)

    m = IdMap.make(parse_extents("0:100000:65536", "u"), parse_extents("0:200000:65536", "g"))
    assert m is not None
    disk = acl((0x01, 7, 0xFFFFFFFF), (0x02, 6, 1000), (0x08, 4, 33), (0x20, 4, 0xFFFFFFFF))
    shown = acl((0x01, 7, 0xFFFFFFFF), (0x02, 6, 101000), (0x08, 4, 200033), (0x20, 4, 0xFFFFFFFF))
    assert m.acl(disk, True) == shown and m.acl(shown, False) == disk
    assert m.acl(b"not an acl", True) == b"not an acl"
