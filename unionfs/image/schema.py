"""The shapes of image JSON, checked in one place before anything reads it.

An image's index, manifests and config are written by whoever built it, and the
code that reads them (import, export, `images`, `history`, `run`'s Env, Cmd,
User, WorkingDir) trusts their shapes: a number where a list belongs, a NaN, a
2**80 size or a NUL inside an argument would otherwise surface as a traceback
deep in that code. So every such document is parsed by `load` as strict JSON
(no NaN or Infinity, UTF-8, at most MAX_JSON bytes, nesting bounded) and
checked against the types below (msgspec structs, after the OCI image spec and
docker's image format): wrong shapes are one line naming the place, such as
"config: Expected `str`, got `int` - at `$.config.Env[0]`". Fields pyunion does
not use are kept as they are, unchecked. `load` returns the plain dict, so the
rest of the code keeps its simple `.get()` access, which the check made safe.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Annotated, Any, TypeVar

import msgspec

from .. import jsondoc
from .safetext import ImageError

MAX_JSON = 4 << 20  # containers/image allows 4 MiB for a manifest or a config

T = TypeVar("T")


class ImageFormatError(ImageError):
    """The input is not an image we understand, or is corrupt."""


# -- scalars ------------------------------------------------------------------------------
# The digests pyunion verifies (and uses as file names in the store).
DIGEST_RE = re.compile(r"sha256:[0-9a-f]{64}|sha512:[0-9a-f]{128}", re.ASCII)
_DIGEST = rf"\A(?:{DIGEST_RE.pattern})\Z"
_MEDIA_TYPE = (
    r"\A[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]{0,126}/[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]{0,126}"
    r"(?:;[ -~]*)?\Z"
)
_NO_NUL = r"\A[^\x00]*\Z"
Digest = Annotated[str, msgspec.Meta(pattern=_DIGEST)]
Size = Annotated[int, msgspec.Meta(ge=0, le=2**63 - 1)]
MediaType = Annotated[str, msgspec.Meta(pattern=_MEDIA_TYPE)]
Arg = Annotated[str, msgspec.Meta(pattern=_NO_NUL)]  # reaches execve: no NUL
Annotations = dict[str, str]


# -- descriptors, indexes, manifests ------------------------------------------------------
class Platform(msgspec.Struct):
    architecture: str
    os: str
    variant: str | None = None
    os_version: str | None = msgspec.field(default=None, name="os.version")
    os_features: list[str] | None = msgspec.field(default=None, name="os.features")


class Descriptor(msgspec.Struct):
    digest: Digest
    size: Size
    media_type: MediaType | None = msgspec.field(default=None, name="mediaType")
    urls: list[str] | None = None
    annotations: Annotations | None = None
    platform: Platform | None = None
    artifact_type: MediaType | None = msgspec.field(default=None, name="artifactType")


class Index(msgspec.Struct):
    manifests: list[Descriptor]
    schema_version: int | None = msgspec.field(default=None, name="schemaVersion")
    media_type: MediaType | None = msgspec.field(default=None, name="mediaType")
    annotations: Annotations | None = None


class Manifest(msgspec.Struct):
    config: Descriptor
    layers: list[Descriptor]
    schema_version: int | None = msgspec.field(default=None, name="schemaVersion")
    media_type: MediaType | None = msgspec.field(default=None, name="mediaType")
    annotations: Annotations | None = None
    subject: Descriptor | None = None


# -- the image config ---------------------------------------------------------------------------
class RuntimeConfig(msgspec.Struct):
    """The part `run` uses (docker writes null for empty lists, so None is allowed)."""

    User: Arg | None = None
    Env: list[Arg] | None = None
    Entrypoint: list[Arg] | None = None
    Cmd: list[Arg] | None = None
    WorkingDir: Arg | None = None
    Labels: dict[str, str] | None = None
    ExposedPorts: dict[str, Any] | None = None
    Volumes: dict[str, Any] | None = None
    StopSignal: str | None = None
    ArgsEscaped: bool | None = None
    Shell: list[Arg] | None = None
    OnBuild: list[str] | None = None


class RootFS(msgspec.Struct):
    type: str
    diff_ids: list[Digest]


class History(msgspec.Struct):
    created: str | None = None
    created_by: str | None = None
    author: str | None = None
    comment: str | None = None
    empty_layer: bool | None = None


class ImageConfig(msgspec.Struct):
    rootfs: RootFS
    created: str | None = None
    author: str | None = None
    architecture: str | None = None
    os: str | None = None
    variant: str | None = None
    config: RuntimeConfig | None = None
    history: list[History] | None = None


# -- docker save's manifest.json ---------------------------------------------------------------
class DockerEntry(msgspec.Struct):
    Config: str
    Layers: list[str]
    RepoTags: list[str] | None = None


DockerManifest = list[DockerEntry]


# -- checking -----------------------------------------------------------------------------------
def parse_json(data: bytes, what: str) -> Any:
    """Strict JSON: UTF-8, no NaN/Infinity, no number out of range, bounded nesting."""
    if len(data) > MAX_JSON:
        raise ImageFormatError(f"{what} is too large (over {MAX_JSON} bytes)")
    try:
        return jsondoc.parse(data, what)
    except jsondoc.JSONError as e:
        raise ImageFormatError(str(e)) from None


_PATTERN_NAMES = {
    "`str` matching regex " + repr(pattern): name
    for pattern, name in (
        (_DIGEST, "a sha256 or sha512 digest"),
        (_MEDIA_TYPE, "a media type"),
        (_NO_NUL, "a string without NUL"),
    )
}


def check(obj: Any, schema: type[T], what: str) -> T:
    """`obj` as `schema`, or one line saying where it differs."""
    try:
        return msgspec.convert(obj, schema)
    except msgspec.ValidationError as e:
        msg = str(e)
        for pat, name in _PATTERN_NAMES.items():
            msg = msg.replace(pat, name)
        raise ImageFormatError(f"{what}: {msg}") from None
    except RecursionError:
        raise ImageFormatError(f"{what} is nested too deeply") from None


def load(data: bytes, schema: type[Any], what: str) -> Any:
    """Parse and check a document; returns it as plain JSON values (dicts and lists)."""
    obj = parse_json(data, what)
    check(obj, schema, what)
    return obj


def load_object(data: bytes, schema: type[Any], what: str) -> dict[str, Any]:
    """`load` for the documents that are JSON objects (all but docker's manifest.json)."""
    obj = load(data, schema, what)
    if not isinstance(obj, dict):  # a struct only converts from an object: cannot happen
        raise ImageFormatError(f"{what} is not a JSON object")
    return obj


def diff_ids(config: dict[str, Any], blobs: Sequence[str], what: str) -> list[str]:
    """A checked config's DiffIDs, bottom first: one per layer blob of its manifest
    (`blobs`: digests, or paths in a docker archive; `what` names the manifest), or one
    line saying they disagree. A blob listed twice must have one DiffID both times: it
    unpacks to one tar, and import and pull verify and unpack it once."""
    ids: list[str] = config["rootfs"]["diff_ids"]
    if len(ids) != len(blobs):
        raise ImageFormatError(
            f"{what} has {len(blobs)} layers but its config lists {len(ids)} diff_ids"
        )
    first: dict[str, int] = {}
    for i, (blob, diff) in enumerate(zip(blobs, ids, strict=True)):
        j = first.setdefault(blob, i)
        if ids[j] != diff:
            raise ImageFormatError(
                f"{what}: layer {i + 1} is the blob of layer {j + 1} again, but the config "
                f"gives it another DiffID ({diff}, not {ids[j]})"
            )
    return list(ids)


class LayerInfo(msgspec.Struct):
    """The store's own record of an unpacked layer (`layers/HEX/layer.json`)."""

    diff_id: Digest
    size: Size
    blob: Digest
    media_type: str | None = None
    whiteouts: str | None = None
