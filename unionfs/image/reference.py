"""Image names: the reference grammar of the OCI distribution spec, written once.

    reference   := name [ ":" tag ] [ "@" digest ]
    name        := [ domain "/" ] path-component [ "/" path-component ]*
    domain      := host [ ":" port ]    host: DNS name or [IPv6]
    path-component := [a-z0-9]+ ( ( "." | "_" | "__" | "-"+ ) [a-z0-9]+ )*
    tag         := [A-Za-z0-9_][A-Za-z0-9_.-]{0,127}
    digest      := ALGORITHM ":" HEX{32,}

(the regular expressions of distribution's `reference` package, which docker,
podman, skopeo and containerd share). A name is at most 255 characters, and a
64-hex-digit name is refused as it would be mistaken for an image ID. Nothing
else gets through: no upper case in a repository, no spaces, no control
characters, so a name printed from the store cannot drive the terminal.

Which part is the registry follows docker's rule: the first component is a
domain only if it has a "." or ":" or is "localhost" (or has upper case).
`normalize_local` is podman's naming of local images (`localhost/NAME:latest`).
`parse_remote` is docker's for pulls and pushes: no registry means docker.io
(`index.docker.io` is its old name), a one-component name there is under
`library/`, no tag and no digest means ":latest", and skopeo's and podman's
transport prefix `docker://` may stand in front; it gives the registry,
repository, tag and digest apart, and `normalize_remote` the same as one
string. The store keeps names as they were given (plus ":latest") and treats
`localhost/NAME` as `NAME`, and a docker.io name as `docker_canonical` has it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..errors import UserError
from .safetext import printable
from .schema import DIGEST_RE

NAME_MAX = 255
DEFAULT_TAG = "latest"
LOCAL_DOMAIN = "localhost"
DOCKER_DOMAIN = "docker.io"
DOCKER_LEGACY_DOMAIN = "index.docker.io"  # docker's old name for docker.io
TRANSPORT = "docker://"  # skopeo's and podman's name for the registry transport
DOCKER_OFFICIAL = "library"

_ALNUM = r"[a-z0-9]+"
_SEPARATOR = r"(?:[._]|__|[-]+)"
PATH_COMPONENT = rf"{_ALNUM}(?:{_SEPARATOR}{_ALNUM})*"
_DOMAIN_COMPONENT = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_DOMAIN_NAME = rf"{_DOMAIN_COMPONENT}(?:\.{_DOMAIN_COMPONENT})*"
_IPV6 = r"\[[a-fA-F0-9:]+\]"
DOMAIN = rf"(?:{_DOMAIN_NAME}|{_IPV6})(?::[0-9]+)?"
TAG = r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}"
DIGEST = r"[A-Za-z][A-Za-z0-9]*(?:[-_+.][A-Za-z][A-Za-z0-9]*)*:[0-9a-fA-F]{32,}"
_PATH = rf"{PATH_COMPONENT}(?:/{PATH_COMPONENT})*"

# re.ASCII and fullmatch: \w and [..] never match beyond ASCII, "$" never before a "\n".
_REFERENCE_RE = re.compile(rf"(?:({DOMAIN})/)?({_PATH})(?::({TAG}))?(?:@({DIGEST}))?", re.ASCII)
_TAG_RE = re.compile(TAG, re.ASCII)
_DOMAIN_RE = re.compile(DOMAIN, re.ASCII)
_PATH_RE = re.compile(_PATH, re.ASCII)
_HEX64_RE = re.compile(r"[0-9a-f]{64}", re.ASCII)


class InvalidReference(UserError):
    """A name that is not a valid image reference."""


@dataclass(frozen=True)
class Reference:
    """A parsed reference; `domain` is None when the name has no registry part."""

    domain: str | None
    path: str
    tag: str | None = None
    digest: str | None = None

    @property
    def name(self) -> str:
        return f"{self.domain}/{self.path}" if self.domain else self.path

    def __str__(self) -> str:
        out = self.name
        if self.tag is not None:
            out += ":" + self.tag
        if self.digest is not None:
            out += "@" + self.digest
        return out


@dataclass(frozen=True)
class RemoteReference(Reference):
    """A reference normalised for a registry (`parse_remote`): the registry is always known."""

    domain: str

    @property
    def target(self) -> str:
        """The tag or digest to ask the registry for (a digest wins: it pins the content)."""
        return self.digest or self.tag or DEFAULT_TAG


def _split_domain(first: str | None, path: str) -> tuple[str | None, str]:
    """docker's rule: "foo/bar" is a path in the default registry, "foo.io/bar" is not."""
    if first is None:
        return None, path
    if "." in first or ":" in first or first == LOCAL_DOMAIN or first.lower() != first:
        return first, path
    return None, f"{first}/{path}"


def parse(text: object, what: str = "image name") -> Reference:
    """Parse a reference; anything off the grammar is an InvalidReference (one line)."""
    if not isinstance(text, str):
        raise InvalidReference(f"invalid {what} {printable(repr(text))}: not a string")
    m = _REFERENCE_RE.fullmatch(text)
    if m is None:
        raise InvalidReference(
            f"invalid {what} {printable(repr(text))} (expected "
            "[REGISTRY/]NAME[:TAG][@DIGEST], with NAME in lower case "
            "and a TAG of at most 128 letters, digits, '_', '.' and '-')"
        )
    first, path, tag, digest = m.groups()
    domain, path = _split_domain(first, path)
    ref = Reference(domain, path, tag, digest)
    if len(ref.name) > NAME_MAX:
        raise InvalidReference(f"invalid {what}: longer than {NAME_MAX} characters")
    if domain is None and _HEX64_RE.fullmatch(path):
        raise InvalidReference(f"invalid {what} {text!r}: a 64-digit hex name is an image ID")
    return ref


def is_tag(text: str) -> bool:
    return _TAG_RE.fullmatch(text) is not None


def tagged(text: object, what: str = "image name") -> str:
    """NAME[:TAG] as the store keeps it: validated, ":latest" when no tag; no digest."""
    ref = parse(text, what)
    if ref.digest is not None:
        raise InvalidReference(f"invalid {what} {text!r}: a digest cannot be a tag")
    return f"{ref.name}:{ref.tag or DEFAULT_TAG}"


def normalize_local(text: str) -> str:
    """podman's name for a local image: `localhost/` when no registry, `:latest` when no tag."""
    ref = parse(text)
    domain = ref.domain if ref.domain else LOCAL_DOMAIN
    return _with_tag(Reference(domain, ref.path, ref.tag, ref.digest))


def parse_remote(text: object, what: str = "image reference") -> RemoteReference:
    """A reference to pull or push, normalised as docker does (see the module comment).

    A digest must be one pyunion can verify (sha256 or sha512, lower-case hex).
    """
    if isinstance(text, str):
        text = text.removeprefix(TRANSPORT)
    ref = parse(text, what)
    domain, path = ref.domain or DOCKER_DOMAIN, ref.path
    if domain == DOCKER_LEGACY_DOMAIN:
        domain = DOCKER_DOMAIN
    if domain == DOCKER_DOMAIN and "/" not in path:
        path = f"{DOCKER_OFFICIAL}/{path}"
    if ref.digest is not None and not DIGEST_RE.fullmatch(ref.digest):
        raise InvalidReference(
            f"invalid {what} {printable(repr(text))}: unsupported digest "
            "(expected sha256 or sha512 in lower-case hex)"
        )
    tag = DEFAULT_TAG if ref.tag is None and ref.digest is None else ref.tag
    out = RemoteReference(domain, path, tag, ref.digest)
    if len(out.name) > NAME_MAX:
        raise InvalidReference(f"invalid {what}: {out.name} is longer than {NAME_MAX} characters")
    return out


def normalize_remote(text: str) -> str:
    """docker's name for a pull: `docker.io[/library]` when no registry, `:latest` when no tag."""
    return _with_tag(parse_remote(text))


def is_domain(text: str) -> bool:
    """A registry as references name it: `HOST[:PORT]` (a DNS name or `[IPv6]`)."""
    return _DOMAIN_RE.fullmatch(text) is not None


def _with_tag(ref: Reference) -> str:
    if ref.tag is None and ref.digest is None:
        return str(Reference(ref.domain, ref.path, DEFAULT_TAG))
    if ref.tag is not None and ref.digest is not None:  # podman keeps the digest only
        return str(Reference(ref.domain, ref.path, None, ref.digest))
    return str(ref)


def docker_canonical(name: str) -> str | None:
    """docker's full name for a NAME:TAG whose registry is docker.io (or its old name
    index.docker.io), `library/` before a one-component path: what podman finds
    `docker.io/busybox` by. None for any other registry, no registry, or no valid name."""
    try:
        ref = parse(name)
    except InvalidReference:
        return None
    if ref.domain not in (DOCKER_DOMAIN, DOCKER_LEGACY_DOMAIN):
        return None
    path = ref.path if "/" in ref.path else f"{DOCKER_OFFICIAL}/{ref.path}"
    return _with_tag(Reference(DOCKER_DOMAIN, path, ref.tag, ref.digest))


def local_aliases(name: str) -> list[str]:
    """The names that mean the same local image: `NAME` and `localhost/NAME`."""
    prefix = LOCAL_DOMAIN + "/"
    if name.startswith(prefix):
        return [name, name[len(prefix) :]]
    return [name, prefix + name]


def repository_from(text: str, default: str = "imported") -> str:
    """A valid repository name made of arbitrary text (a file name, say)."""
    words = re.findall(r"[a-z0-9]+", text.lower(), re.ASCII)
    out = "-".join(words)[:NAME_MAX]
    if not out or not _PATH_RE.fullmatch(out) or _HEX64_RE.fullmatch(out):
        return default
    return out
