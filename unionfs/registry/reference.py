"""Image references as users type them: `[REGISTRY/]REPOSITORY[:TAG][@DIGEST]`.

The grammar is the OCI distribution reference's (docker/distribution
`reference` package), with docker's normalisation of short names:

- the first `/`-separated component is a registry when it contains a `.` or a
  `:` or is `localhost` (`localhost/NAME` as podman names local images,
  `localhost:5000/NAME`, `registry.example.com/ns/NAME`); otherwise the registry
  is `docker.io`, and a one-component name on docker.io gets `library/`
  (`busybox` is `docker.io/library/busybox`);
- no tag and no digest means `:latest`;
- a `docker://` prefix (skopeo's and podman's transport name) is accepted.

`parse_reference` is the one place that knows the grammar for the registry
client; it is meant to give way to the image package's own reference module.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..errors import UserError
from ..image.store import check_digest

DOCKER_HUB = "docker.io"
DOCKER_HUB_API = "registry-1.docker.io"

_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_DOMAIN_PART = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_DOMAIN = rf"(?:{_DOMAIN_PART}(?:\.{_DOMAIN_PART})*|\[[0-9a-fA-F:]+\])(?::[0-9]+)?"
_TAG = r"[\w][\w.-]{0,127}"
_REF_RE = re.compile(rf"^(?P<name>(?:{_DOMAIN}/)?{_COMPONENT}(?:/{_COMPONENT})*)"
                     rf"(?::(?P<tag>{_TAG}))?(?:@(?P<digest>[a-z0-9]+:[0-9a-fA-F]+))?$")
_DOMAIN_RE = re.compile(rf"^{_DOMAIN}$")


@dataclass(frozen=True)
class Reference:
    """A fully qualified reference: registry, repository, and a tag and/or a digest."""

    registry: str            # "docker.io", "localhost:5000", "[::1]:5000"
    repository: str          # "library/busybox"
    tag: str | None
    digest: str | None

    @property
    def name(self) -> str:
        return f"{self.registry}/{self.repository}"

    @property
    def api_host(self) -> str:
        """Where the /v2/ API of the registry lives (docker.io's is elsewhere)."""
        return DOCKER_HUB_API if self.registry == DOCKER_HUB else self.registry

    @property
    def target(self) -> str:
        """The tag or digest to ask the registry for (a digest wins: it pins the content)."""
        return self.digest or self.tag or "latest"

    def __str__(self) -> str:
        s = self.name
        if self.tag:
            s += ":" + self.tag
        if self.digest:
            s += "@" + self.digest
        return s


def parse_reference(text: str) -> Reference:
    """Parse and normalise what a user typed (see the module comment); UserError if invalid."""
    ref = text.removeprefix("docker://")
    m = _REF_RE.match(ref)
    if not m or len(m.group("name")) > 255:
        raise UserError(f"invalid image reference {text!r}")
    name, tag, digest = m.group("name"), m.group("tag"), m.group("digest")
    if digest is not None:
        check_digest(digest.lower() if digest.startswith("sha") else digest, "digest")
    first, _, rest = name.partition("/")
    if rest and ("." in first or ":" in first or first == "localhost"):
        registry, repo = first, rest
    else:
        if rest and first.lower() != first:
            raise UserError(f"invalid image reference {text!r}")
        registry, repo = DOCKER_HUB, name
    if registry == "index.docker.io":
        registry = DOCKER_HUB
    if registry == DOCKER_HUB and "/" not in repo:
        repo = "library/" + repo
    if tag is None and digest is None:
        tag = "latest"
    return Reference(registry, repo, tag, digest)


def parse_registry(text: str) -> str:
    """A registry as `login`/`logout` take it: `HOST[:PORT]`, maybe with a scheme or a path."""
    host = re.sub(r"^[a-z]+://", "", text.strip()).split("/", 1)[0]
    if not host or not _DOMAIN_RE.match(host):
        raise UserError(f"invalid registry {text!r}")
    return DOCKER_HUB if host in ("index.docker.io", DOCKER_HUB_API) else host
