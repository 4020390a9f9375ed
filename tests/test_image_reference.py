"""Image names: distribution's reference grammar, docker's domain rule, podman's and
docker's normalisation, and escaped display of text from images."""

from __future__ import annotations

import pytest

from unionfs.image import reference
from unionfs.image.reference import InvalidReference, Reference
from unionfs.image.safetext import ImageError, printable

HEX = "0" * 64

VALID = {
    "busybox": Reference(None, "busybox"),
    "library/busybox:1.36": Reference(None, "library/busybox", "1.36"),
    "docker.io/library/busybox:latest": Reference("docker.io", "library/busybox", "latest"),
    "localhost/app": Reference("localhost", "app"),
    "localhost:5000/team/app:v1.0-rc_1": Reference("localhost:5000", "team/app", "v1.0-rc_1"),
    "[::1]:5000/img:2": Reference("[::1]:5000", "img", "2"),
    "Example.COM/x": Reference("Example.COM", "x"),
    "a__b/c--d.e---f": Reference(None, "a__b/c--d.e---f"),
    "x:Tag_With-Upper.1": Reference(None, "x", "Tag_With-Upper.1"),
    f"x@sha256:{HEX}": Reference(None, "x", None, f"sha256:{HEX}"),
    f"x:1@sha256:{HEX}": Reference(None, "x", "1", f"sha256:{HEX}"),
    "x:" + "t" * 128: Reference(None, "x", "t" * 128),
    f"foo/{HEX}": Reference(None, f"foo/{HEX}"),
}

INVALID = [
    "",
    "Busybox",
    "foo/Bar",
    "a___b",
    "a-",
    "-a",
    "a//b",
    "/a",
    "a/",
    "a:",
    ":a",
    "a:b:c",
    "x:" + "t" * 129,
    "x:.tag",
    "x:-tag",
    "a b",
    "a\tb",
    "a\n",
    "a\x1b[31m",
    "ünï",
    "x@sha256:abc",
    "x@",
    HEX,
    "a" * 256,
    "a.",
    "a..b",
    "localhost:port/x",
    "[::1/x",
    "x:t\u0430g",
]


@pytest.mark.parametrize("text", sorted(VALID))
def test_valid(text: str) -> None:
    ref = reference.parse(text)
    assert ref == VALID[text]
    assert str(ref) == text


@pytest.mark.parametrize("text", INVALID)
def test_invalid(text: str) -> None:
    with pytest.raises(InvalidReference) as ei:
        reference.parse(text)
    msg = str(ei.value)
    assert "\n" not in msg and msg.isprintable()


def test_not_a_string() -> None:
    with pytest.raises(InvalidReference, match="not a string"):
        reference.parse(5)


def test_tagged_is_what_the_store_keeps() -> None:
    assert reference.tagged("busybox") == "busybox:latest"
    assert reference.tagged("reg:5000/a/b") == "reg:5000/a/b:latest"
    assert reference.tagged("a:1") == "a:1"
    with pytest.raises(InvalidReference, match="digest"):
        reference.tagged(f"a@sha256:{HEX}")


@pytest.mark.parametrize(
    "text,local,remote",
    [
        ("busybox", "localhost/busybox:latest", "docker.io/library/busybox:latest"),
        ("foo/bar:1", "localhost/foo/bar:1", "docker.io/foo/bar:1"),
        ("quay.io/x/y", "quay.io/x/y:latest", "quay.io/x/y:latest"),
        ("localhost/x:2", "localhost/x:2", "localhost/x:2"),
        ("docker.io/alpine", "docker.io/alpine:latest", "docker.io/library/alpine:latest"),
        (f"a:1@sha256:{HEX}", f"localhost/a@sha256:{HEX}", f"docker.io/library/a@sha256:{HEX}"),
    ],
)
def test_normalisation(text: str, local: str, remote: str) -> None:
    assert reference.normalize_local(text) == local
    assert reference.normalize_remote(text) == remote


@pytest.mark.parametrize(
    "text,parts",
    [
        ("busybox", ("docker.io", "library/busybox", "latest", None)),
        ("docker://quay.io/a/b/c:v1", ("quay.io", "a/b/c", "v1", None)),
        (f"localhost:5000/x@sha256:{HEX}", ("localhost:5000", "x", None, f"sha256:{HEX}")),
        (f"x:1@sha256:{HEX}", ("docker.io", "library/x", "1", f"sha256:{HEX}")),
        ("localhost/img", ("localhost", "img", "latest", None)),
        ("user/img:t", ("docker.io", "user/img", "t", None)),
        ("index.docker.io/alpine", ("docker.io", "library/alpine", "latest", None)),
        ("Registry.Example/x", ("Registry.Example", "x", "latest", None)),  # docker: a domain
        ("[::1]:5000/img", ("[::1]:5000", "img", "latest", None)),
    ],
)
def test_remote_references_are_split_as_docker_does(text: str, parts: tuple[object, ...]) -> None:
    ref = reference.parse_remote(text)
    assert (ref.domain, ref.path, ref.tag, ref.digest) == parts
    assert ref.target == (ref.digest or ref.tag)
    assert reference.parse_remote(str(ref)) == ref  # normalised once and for all


@pytest.mark.parametrize(
    "text",
    [
        "UPPER",
        "a//b",
        "a:b:c",
        "x@sha256:12",
        "-x",
        "",
        "Bad/Name",
        f"x@sha256:{HEX.upper().replace('0', 'A')}",
        f"x@md5:{HEX}",
        HEX,
        "docker://",
        "docker:/x",
        "docker.io/" + "a" * 240,
    ],
)
def test_invalid_remote_references(text: str) -> None:
    with pytest.raises(InvalidReference, match="invalid image reference") as ei:
        reference.parse_remote(text)
    assert "\n" not in str(ei.value)


def test_local_aliases_and_repositories_from_file_names() -> None:
    assert reference.local_aliases("x:1") == ["x:1", "localhost/x:1"]
    assert reference.local_aliases("localhost/x:1") == ["localhost/x:1", "x:1"]
    assert reference.repository_from("My Image_v2.tar") == "my-image-v2-tar"
    assert reference.repository_from("\x1b[31m!!") == "31m"
    assert reference.repository_from("___") == "imported"
    assert reference.repository_from(HEX) == "imported"


def test_printable_escapes_what_drives_a_terminal() -> None:
    assert printable("plain text, é, 日本") == "plain text, é, 日本"
    assert printable("a\x1b[2Jb\x07\nc\u202ed\udcff") == "a\\x1b[2Jb\\x07\\nc\\u202ed\\udcff"
    assert str(ImageError("bad \x1b]0;title\x07")) == "bad \\x1b]0;title\\x07"
