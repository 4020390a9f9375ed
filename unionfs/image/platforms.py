"""Platforms: which image of a multi-platform index to take, for import and pull alike.

A platform is `{"os", "architecture"[, "variant"]}` as an OCI index or Docker
manifest list describes each entry, named by GOOS/GOARCH (`linux/amd64`,
`linux/arm/v7`). The default is this machine's; `--platform OS/ARCH[/VARIANT]`
chooses another. An entry matches when its os and architecture are the ones
wanted and, if a variant is wanted, its variant is that one or unset. Of an
index whose entries carry platforms the first match is taken (none: one line
listing what there is); an index without any platform (a layout listing
several images) is taken whole.
"""

from __future__ import annotations

import platform
from typing import Any

from ..errors import UserError
from .schema import ImageFormatError

Platform = dict[str, str]

_ARCH = {
    "x86_64": "amd64",
    "amd64": "amd64",
    "aarch64": "arm64",
    "arm64": "arm64",
    "i386": "386",
    "i686": "386",
    "ppc64le": "ppc64le",
    "s390x": "s390x",
    "riscv64": "riscv64",
}


class NoMatchingPlatform(ImageFormatError):
    """An index has no image for the platform wanted."""


def host() -> Platform:
    """This machine's platform, in GOOS/GOARCH words."""
    m = platform.machine().lower()
    arch = _ARCH.get(m)
    if arch is None and m.startswith("armv"):
        return {"os": "linux", "architecture": "arm", "variant": "v" + m[4]}
    return {"os": "linux", "architecture": arch or m}


def parse(text: str) -> Platform:
    """`OS/ARCH[/VARIANT]` as `--platform` takes it."""
    parts = text.split("/")
    if len(parts) not in (2, 3) or not all(parts):
        raise UserError(f"invalid platform {text!r} (expected OS/ARCH[/VARIANT])")
    p = {"os": parts[0], "architecture": parts[1]}
    if len(parts) == 3:
        p["variant"] = parts[2]
    return p


def matches(entry_platform: dict[str, Any] | None, want: Platform) -> bool:
    """Does an index entry's platform give what is wanted (see the module comment)?"""
    if not entry_platform:
        return False
    if entry_platform.get("os") != want["os"]:
        return False
    if entry_platform.get("architecture") != want["architecture"]:
        return False
    return "variant" not in want or entry_platform.get("variant") in (None, want["variant"])


def describe(p: dict[str, Any] | None) -> str:
    """`os/architecture[/variant]`, or `?` for an entry that does not say."""
    if not p:
        return "?"
    return "/".join(str(p[k]) for k in ("os", "architecture", "variant") if p.get(k))


def select(entries: list[dict[str, Any]], want: Platform) -> list[dict[str, Any]]:
    """The entries of an index to take for `want`: the first match, or all of an index
    that names no platform at all; NoMatchingPlatform (one line) otherwise."""
    described = [e for e in entries if e.get("platform")]
    if not described:
        return entries
    for e in described:
        if matches(e.get("platform"), want):
            return [e]
    avail = ", ".join(sorted({describe(e.get("platform")) for e in described}))
    raise NoMatchingPlatform(
        f"no image for platform {describe(want)} (available: {avail}; choose one with --platform)"
    )
