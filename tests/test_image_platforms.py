"""Which image of an index import and pull take: one rule (`image.platforms`)."""

from __future__ import annotations

import platform

import pytest

from unionfs.errors import UserError
from unionfs.image import platforms


def entry(n: int, p: dict[str, str] | None) -> dict[str, object]:
    e: dict[str, object] = {"digest": f"sha256:{n:064x}", "size": 1}
    if p is not None:
        e["platform"] = p
    return e


INDEX = [
    entry(0, {"os": "linux", "architecture": "amd64"}),
    entry(1, {"os": "linux", "architecture": "arm", "variant": "v6"}),
    entry(2, {"os": "linux", "architecture": "arm", "variant": "v7"}),
    entry(3, {"os": "linux", "architecture": "arm64"}),
    entry(4, {"os": "linux", "architecture": "arm64", "variant": "v8"}),
    entry(5, {"os": "windows", "architecture": "amd64"}),
]


@pytest.mark.parametrize(
    "want,index",
    [
        ("linux/amd64", 0),
        ("linux/arm/v7", 2),
        ("linux/arm", 1),
        ("linux/arm64/v8", 3),
        ("windows/amd64", 5),
    ],
)
def test_first_match_is_taken(want: str, index: int) -> None:
    assert platforms.select(INDEX, platforms.parse(want)) == [INDEX[index]]


def test_no_match_is_one_line_listing_what_there_is() -> None:
    with pytest.raises(platforms.NoMatchingPlatform) as ei:
        platforms.select([*INDEX, entry(6, None)], platforms.parse("linux/s390x"))
    assert str(ei.value) == (
        "no image for platform linux/s390x (available: linux/amd64, "
        "linux/arm/v6, linux/arm/v7, linux/arm64, linux/arm64/v8, "
        "windows/amd64; choose one with --platform)"
    )


def test_an_index_naming_no_platform_is_taken_whole() -> None:
    plain = [entry(7, None), entry(8, None)]
    assert platforms.select(plain, platforms.parse("linux/s390x")) == plain


@pytest.mark.parametrize("text", ["linux", "linux/", "/amd64", "a/b/c/d", ""])
def test_invalid_platform_option(text: str) -> None:
    with pytest.raises(UserError, match="expected OS/ARCH"):
        platforms.parse(text)


def test_host_is_in_goarch_words() -> None:
    host = platforms.host()
    assert host["os"] == "linux"
    if platform.machine() == "x86_64":
        assert host == {"os": "linux", "architecture": "amd64"}
    assert platforms.matches(host, host) and not platforms.matches(None, host)
    assert platforms.describe(None) == "?"
