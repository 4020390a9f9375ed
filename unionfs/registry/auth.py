"""Registry credentials where the containers tools keep them, and the auth challenges.

Files, in the order containers/image (podman, buildah, skopeo) reads them:
`--authfile` or `$REGISTRY_AUTH_FILE` alone when given; else
`$XDG_RUNTIME_DIR/containers/auth.json` (`/run/containers/UID/auth.json` without
XDG_RUNTIME_DIR), `$XDG_CONFIG_HOME/containers/auth.json`, `~/.docker/config.json`.
All share docker's format: `{"auths": {"KEY": {"auth": base64("USER:PASS")}}}`,
where KEY is `HOST[:PORT]` (also `HOST[:PORT]/NAMESPACE...` to scope credentials to a
repository, the most specific key wins) or, in docker's file, an URL such as
`https://index.docker.io/v1/`. `login` writes the first file; `logout` removes
the entry from it.

A registry says how it wants to be authenticated in `WWW-Authenticate` on a 401:
`Basic realm=...`, or `Bearer realm=URL,service=...,scope=...`, the token dance
(ask the realm for a token for the scopes needed, then send `Authorization:
Bearer TOKEN`).
"""

from __future__ import annotations

import base64
import os
import re
from dataclasses import dataclass
from typing import Any

from .. import jsondoc
from ..errors import UserError
from ..image import reference
from ..image.store import write_json_atomic
from ..tree import read_named
from ..userns import host_uid

DOCKER_HUB_API = "registry-1.docker.io"  # where docker.io's /v2/ API lives
# What names docker.io in an auth file or on the command line.
DOCKER_HUB_NAMES = (reference.DOCKER_DOMAIN, reference.DOCKER_LEGACY_DOMAIN, DOCKER_HUB_API)


@dataclass(frozen=True)
class Credentials:
    username: str
    password: str

    @classmethod
    def parse(cls, text: str) -> Credentials:
        """`USER:PASS` as `--creds` takes it (`USER` alone is refused: no prompt here)."""
        user, sep, password = text.partition(":")
        if not sep or not user:
            raise UserError("--creds: expected USERNAME:PASSWORD")
        return cls(user, password)

    def basic(self) -> str:
        raw = f"{self.username}:{self.password}".encode()
        return "Basic " + base64.b64encode(raw).decode()


def auth_files(authfile: str | None = None) -> list[str]:
    """The files to read, first one first (the first is also the one `login` writes)."""
    given = authfile or os.environ.get("REGISTRY_AUTH_FILE")
    if given:
        return [given]
    rt = os.environ.get("XDG_RUNTIME_DIR")
    first = (
        os.path.join(rt, "containers", "auth.json")
        if rt
        else f"/run/containers/{host_uid()}/auth.json"
    )
    cfg = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return [
        first,
        os.path.join(cfg, "containers", "auth.json"),
        os.path.join(os.path.expanduser("~"), ".docker", "config.json"),
    ]


def _read(path: str) -> dict[str, Any]:
    """The credentials file, through no symlink of another user's and never her FIFO
    (`tree.read_named`): REGISTRY_AUTH_FILE or --authfile in a directory she can write
    (/tmp/auth.json) hung root's `pull` or `login` on her FIFO."""
    try:
        data = read_named(path, 1 << 20)
    except FileNotFoundError:
        return {}
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror}") from e
    return jsondoc.parse_object(data, path) if data.strip() else {}


def _key_host(key: str) -> str:
    """`https://host:port/v1/` -> `host:port`; `host/ns` stays; docker.io by any name."""
    k = re.sub(r"^[a-z]+://", "", key).rstrip("/")
    if k.split("/", 1)[0] in DOCKER_HUB_NAMES:
        return reference.DOCKER_DOMAIN
    if key.startswith(("http://", "https://")):
        return k.split("/", 1)[0]  # docker's URL keys name the registry only
    return k


def parse_registry(text: str) -> str:
    """A registry as `login`/`logout` take it: `HOST[:PORT]`, maybe with a scheme or a path."""
    host = _key_host(text.strip()).split("/", 1)[0]
    if not host or not reference.is_domain(host):
        raise UserError(f"invalid registry {text!r}")
    return host


def _decode(entry: object, path: str) -> Credentials | None:
    if not isinstance(entry, dict):
        return None
    auth = entry.get("auth")
    if isinstance(auth, str) and auth:
        try:
            user, sep, password = base64.b64decode(auth).decode().partition(":")
        except (ValueError, UnicodeDecodeError):
            raise UserError(f"{path}: an 'auth' entry is not base64 of USER:PASSWORD") from None
        if sep:
            return Credentials(user, password)
    return None


def lookup(
    registry: str, repository: str | None = None, authfile: str | None = None
) -> Credentials | None:
    """Stored credentials for a repository of `registry`, the most specific key first."""
    want = [f"{registry}/{repository}"] if repository else []
    if repository:
        parts = repository.split("/")
        want += [f"{registry}/{'/'.join(parts[:i])}" for i in range(len(parts) - 1, 0, -1)]
    want.append(registry)
    for path in auth_files(authfile):
        auths = _read(path).get("auths")
        if not isinstance(auths, dict):
            continue
        by_key = {_key_host(k): v for k, v in auths.items() if isinstance(k, str)}
        for key in want:
            if key in by_key:
                creds = _decode(by_key[key], path)
                if creds is not None:
                    return creds
    return None


def _write(path: str, data: dict[str, Any]) -> None:
    """Replace the file atomically, mode 0600 like podman's, its directory 0700."""
    os.makedirs(os.path.dirname(path) or ".", mode=0o700, exist_ok=True)
    write_json_atomic(path, data)


def store(key: str, creds: Credentials, authfile: str | None = None) -> str:
    """Save credentials for `key` (a registry) in the first auth file; returns its path."""
    path = auth_files(authfile)[0]
    data = _read(path)
    auths = data.get("auths")
    if not isinstance(auths, dict):
        auths = data["auths"] = {}
    raw = f"{creds.username}:{creds.password}".encode()
    auths[key] = {"auth": base64.b64encode(raw).decode()}
    try:
        _write(path, data)
    except OSError as e:
        raise UserError(f"cannot write {path}: {e.strerror}") from e
    return path


def remove(key: str | None, authfile: str | None = None) -> bool:
    """Forget the credentials of `key` (None: all of them); False when there were none."""
    path = auth_files(authfile)[0]
    data = _read(path)
    auths = data.get("auths")
    if not isinstance(auths, dict) or not auths:
        return False
    if key is None:
        data["auths"] = {}
    else:
        names = [k for k in auths if _key_host(k) == key]
        if not names:
            return False
        for k in names:
            del auths[k]
    try:
        _write(path, data)
    except OSError as e:
        raise UserError(f"cannot write {path}: {e.strerror}") from e
    return True


# --- challenges -------------------------------------------------------------------
@dataclass(frozen=True)
class Challenge:
    scheme: str  # "basic" or "bearer" (lower case)
    params: dict[str, str]


_PARAM_RE = re.compile(r'\s*([A-Za-z0-9_.-]+)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^\s,]*))\s*,?')


def parse_challenges(header: str) -> list[Challenge]:
    """`WWW-Authenticate` values: `Scheme k=v, k="v", ...`, maybe several schemes."""
    out: list[Challenge] = []
    pos = 0
    header = header.strip()
    while pos < len(header):
        m = re.compile(r"\s*([A-Za-z][A-Za-z0-9!#$%&'*+.^_`|~-]*)").match(header, pos)
        if not m:
            break
        scheme = m.group(1).lower()
        pos = m.end()
        params: dict[str, str] = {}
        while True:
            pm = _PARAM_RE.match(header, pos)
            if not pm or (pm.group(2) is None and pm.group(3) is None):
                break
            val = pm.group(2)
            params[pm.group(1).lower()] = (
                re.sub(r"\\(.)", r"\1", val) if val is not None else pm.group(3)
            )
            pos = pm.end()
        out.append(Challenge(scheme, params))
        while pos < len(header) and header[pos] in ", ":
            pos += 1
    return out
