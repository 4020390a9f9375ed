"""Reading images from outside: OCI image layouts and `docker save` archives.

A source is a directory or a tar file (plain or compressed), read through one
small interface (`Source`). `find_images` turns it into `Candidate`s: a config,
layer references bottom first, tags, and, for OCI layouts, the manifest bytes to
keep as they are. Shapes understood:
- OCI layout: `oci-layout` + `index.json` + `blobs/ALG/HEX`; an index entry may be
  a nested index (multi-platform): this machine's platform is picked, or --platform.
- the newer `docker save` (Docker 25+): also an OCI layout; preferred when present.
- the old `docker save`: `manifest.json` listing `Config`, `RepoTags`, `Layers`
  (`ID/layer.tar`, possibly symlinks inside the archive to another member).
Every blob read through `verified_json` or a layer stream is checked against its
digest; names taken from the archive are refused if absolute or containing `..`.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import platform
import posixpath
import tarfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import IO, Any, BinaryIO

import zstandard

from ..errors import UserError
from .store import (DOCKER_LIST, DOCKER_MANIFEST, MT_INDEX, MT_MANIFEST, REF_NAME,
                    check_digest)

CONTAINERD_NAME = "io.containerd.image.name"
MAX_JSON = 64 << 20


class ImageFormatError(UserError):
    """The input is not an image we understand, or is corrupt."""


# --- sources -------------------------------------------------------------------
def _clean(path: str) -> str:
    """A member path from inside an archive, normalized; refuses escapes."""
    if path.startswith("/"):
        raise ImageFormatError(f"refusing absolute path {path!r} in the image")
    parts = [p for p in path.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise ImageFormatError(f"refusing path with '..' in the image: {path!r}")
    return "/".join(parts)


class Source:
    """Files of an image layout or archive, by relative path."""

    def exists(self, path: str) -> bool:
        raise NotImplementedError

    def open(self, path: str) -> IO[bytes]:
        raise NotImplementedError

    def close(self) -> None:
        pass

    def read(self, path: str, limit: int = MAX_JSON) -> bytes:
        with self.open(path) as f:
            data = f.read(limit + 1)
        if len(data) > limit:
            raise ImageFormatError(f"{path} is too large")
        return data


class DirSource(Source):
    def __init__(self, root: str) -> None:
        self.root = root

    def exists(self, path: str) -> bool:
        return os.path.isfile(os.path.join(self.root, _clean(path)))

    def open(self, path: str) -> IO[bytes]:
        try:
            return open(os.path.join(self.root, _clean(path)), "rb")
        except OSError as e:
            raise ImageFormatError(f"cannot read {path} in {self.root}: {e.strerror}") from e


class TarSource(Source):
    """A layout or archive packed in a tar; symlinks between members are followed inside it."""

    def __init__(self, path: str) -> None:
        try:
            self.tf = tarfile.open(path, "r:*")
            self.members: dict[str, tarfile.TarInfo] = {}
            for m in self.tf.getmembers():
                try:
                    self.members[_clean(m.name)] = m
                except ImageFormatError:
                    continue  # never looked up, so harmless
        except (tarfile.TarError, EOFError, OSError, zlib.error) as e:
            raise ImageFormatError(f"cannot read archive {path}: {e}") from e

    def _resolve(self, path: str) -> tarfile.TarInfo | None:
        path = _clean(path)
        for _ in range(16):
            m = self.members.get(path)
            if m is None:
                return None
            if m.issym():
                base = posixpath.dirname(path)
                target = m.linkname if m.linkname.startswith("/") else \
                    posixpath.join(base, m.linkname)
                path = _clean(posixpath.normpath("/" + target).lstrip("/"))
                continue
            if m.islnk():
                path = _clean(m.linkname)
                continue
            return m if m.isreg() else None
        return None

    def exists(self, path: str) -> bool:
        return self._resolve(path) is not None

    def open(self, path: str) -> IO[bytes]:
        m = self._resolve(path)
        f = self.tf.extractfile(m) if m is not None else None
        if f is None:
            raise ImageFormatError(f"{path} is missing from the archive")
        return f

    def close(self) -> None:
        self.tf.close()


def open_source(path: str) -> Source:
    if os.path.isdir(path):
        return DirSource(path)
    if os.path.isfile(path):
        return TarSource(path)
    raise UserError(f"{path}: no such file or directory")


# --- streams ----------------------------------------------------------------------
class HashingReader(io.RawIOBase):
    """Passes reads through, hashing them (and optionally copying them to `tee`)."""

    def __init__(self, src: IO[bytes] | Any, algo: str = "sha256",
                 tee: BinaryIO | None = None,
                 progress: Callable[[int], None] | None = None) -> None:
        self.src = src
        self.h = hashlib.new(algo)
        self.algo = algo
        self.tee = tee
        self.count = 0
        self.progress = progress

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        data = self.src.read(len(b))
        n = len(data)
        b[:n] = data
        if n:
            self.h.update(data)
            self.count += n
            if self.tee is not None:
                self.tee.write(data)
            if self.progress is not None:
                self.progress(n)
        return n

    def digest(self) -> str:
        return f"{self.algo}:{self.h.hexdigest()}"

    def drain(self) -> None:
        while self.read(1 << 20):
            pass


class Prefixed(io.RawIOBase):
    """A stream with some already-read bytes put back in front."""

    def __init__(self, prefix: bytes, src: Any) -> None:
        self.prefix = prefix
        self.src = src

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        if self.prefix:
            n = min(len(b), len(self.prefix))
            b[:n] = self.prefix[:n]
            self.prefix = self.prefix[n:]
            return n
        data = self.src.read(len(b))
        b[:len(data)] = data
        return len(data)


def compression_of(head: bytes) -> str:
    """By magic number, not media type: files are often mislabelled."""
    if head.startswith(b"\x1f\x8b"):
        return "gzip"
    if head.startswith(b"\x28\xb5\x2f\xfd"):
        return "zstd"
    return "none"


def decompressed(src: Any) -> tuple[Any, str]:
    """(a readable uncompressed stream, compression name) for a layer blob stream."""
    head = b""
    while len(head) < 4:
        more = src.read(4 - len(head))
        if not more:
            break
        head += more
    comp = compression_of(head)
    raw = io.BufferedReader(Prefixed(head, src), 1 << 16)
    if comp == "gzip":
        return gzip.GzipFile(fileobj=raw, mode="rb"), comp
    if comp == "zstd":
        return zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True), comp
    return raw, comp


DECOMPRESS_ERRORS = (OSError, EOFError, zlib.error, zstandard.ZstdError, tarfile.TarError)


# --- finding images -------------------------------------------------------------
@dataclass
class LayerRef:
    """One layer blob to import: its path in the source and what it must hash to."""

    path: str
    diff_id: str
    digest: str | None       # None for the old docker archives: computed on the way
    media_type: str | None
    size: int | None


@dataclass
class Candidate:
    """One image found in a source, not yet in the store."""

    config_bytes: bytes
    config: dict[str, Any]
    config_digest: str
    layers: list[LayerRef]          # bottom first
    tags: list[str] = field(default_factory=list)
    manifest_bytes: bytes | None = None   # kept verbatim (OCI); None: we write one
    manifest_digest: str | None = None
    manifest_media_type: str = MT_MANIFEST


def _json(data: bytes, what: str) -> dict[str, Any]:
    try:
        obj = json.loads(data)
    except ValueError as e:
        raise ImageFormatError(f"{what} is not valid JSON") from e
    if not isinstance(obj, dict):
        raise ImageFormatError(f"{what} is not a JSON object")
    return obj


def blob_path(digest: str) -> str:
    algo, hexd = check_digest(digest).split(":", 1)
    return f"blobs/{algo}/{hexd}"


def verified_blob(src: Source, digest: str, what: str) -> bytes:
    data = src.read(blob_path(digest))
    algo, hexd = digest.split(":", 1)
    if hashlib.new(algo, data).hexdigest() != hexd:
        raise ImageFormatError(f"{what} {digest} does not match its digest")
    return data


def host_platform() -> dict[str, str]:
    m = platform.machine().lower()
    arch = {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64",
            "i386": "386", "i686": "386", "ppc64le": "ppc64le", "s390x": "s390x",
            "riscv64": "riscv64"}.get(m)
    if arch is None and m.startswith("armv"):
        return {"os": "linux", "architecture": "arm", "variant": "v" + m[4]}
    return {"os": "linux", "architecture": arch or m}


def parse_platform(text: str) -> dict[str, str]:
    parts = text.split("/")
    if len(parts) not in (2, 3) or not all(parts):
        raise UserError(f"invalid platform {text!r} (expected OS/ARCH[/VARIANT])")
    p = {"os": parts[0], "architecture": parts[1]}
    if len(parts) == 3:
        p["variant"] = parts[2]
    return p


def _platform_matches(desc_platform: dict[str, Any] | None, want: dict[str, str]) -> bool:
    if not desc_platform:
        return False
    if desc_platform.get("os") != want["os"]:
        return False
    if desc_platform.get("architecture") != want["architecture"]:
        return False
    return "variant" not in want or desc_platform.get("variant") in (None, want["variant"])


def _fmt_platform(p: dict[str, Any] | None) -> str:
    if not p:
        return "?"
    return "/".join(str(p[k]) for k in ("os", "architecture", "variant") if p.get(k))


def _pick_manifests(src: Source, descs: list[dict[str, Any]], want: dict[str, str],
                    depth: int = 0) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """Resolve index entries down to image manifests: (descriptor, top-level descriptor)."""
    out = []
    for d in descs:
        mt = d.get("mediaType")
        if mt in (MT_INDEX, DOCKER_LIST):
            if depth > 4:
                raise ImageFormatError("image indexes nested too deep")
            sub = _json(verified_blob(src, check_digest(d.get("digest")), "index"), "index")
            entries = [e for e in sub.get("manifests", []) if isinstance(e, dict)]
            plats = [e for e in entries if e.get("platform")]
            if plats:
                match = [e for e in entries if _platform_matches(e.get("platform"), want)]
                if not match:
                    avail = ", ".join(sorted({_fmt_platform(e.get("platform")) for e in plats}))
                    raise ImageFormatError(f"no image for platform {_fmt_platform(want)} "
                                           f"(available: {avail})")
                entries = match[:1]
            for m, _ in _pick_manifests(src, entries, want, depth + 1):
                out.append((m, d))
        elif mt in (MT_MANIFEST, DOCKER_MANIFEST, None):
            out.append((d, d))
    return out


def _tag_of(desc: dict[str, Any], default_repo: str) -> str | None:
    ann = desc.get("annotations") or {}
    full = ann.get(CONTAINERD_NAME)
    if isinstance(full, str) and full:
        return full
    ref = ann.get(REF_NAME)
    if not isinstance(ref, str) or not ref:
        return None
    if "/" in ref or ":" in ref:
        return ref if ":" in ref.rsplit("/", 1)[-1] else ref + ":latest"
    return f"{default_repo}:{ref}"


def _oci_candidates(src: Source, ref: str | None, want: dict[str, str],
                    default_repo: str) -> list[Candidate]:
    index = _json(src.read("index.json"), "index.json")
    descs = [d for d in index.get("manifests", []) if isinstance(d, dict)]
    if ref is not None:
        sel = [d for d in descs if (d.get("annotations") or {}).get(REF_NAME) == ref
               or (d.get("annotations") or {}).get(CONTAINERD_NAME) == ref]
        if not sel:
            names = sorted({(d.get("annotations") or {}).get(REF_NAME, "") for d in descs} - {""})
            raise ImageFormatError(f"no image {ref!r} in the layout (it has: "
                                   f"{', '.join(names) or 'no names'})")
        descs = sel
    if not descs:
        raise ImageFormatError("the image layout's index.json lists no images")
    by_digest: dict[str, Candidate] = {}
    for mdesc, top in _pick_manifests(src, descs, want):
        digest = check_digest(mdesc.get("digest"), "manifest digest")
        tag = _tag_of(top, default_repo)
        if digest in by_digest:
            if tag and tag not in by_digest[digest].tags:
                by_digest[digest].tags.append(tag)
            continue
        mbytes = verified_blob(src, digest, "manifest")
        man = _json(mbytes, "manifest")
        cdesc = man.get("config") or {}
        cdigest = check_digest(cdesc.get("digest"), "config digest")
        cbytes = verified_blob(src, cdigest, "config")
        config = _json(cbytes, "config")
        diff_ids = (config.get("rootfs") or {}).get("diff_ids") or []
        ldescs = man.get("layers") or []
        if len(diff_ids) != len(ldescs):
            raise ImageFormatError(f"manifest {digest} has {len(ldescs)} layers but its config "
                                   f"lists {len(diff_ids)} diff_ids")
        layers = []
        for ld, diff in zip(ldescs, diff_ids):
            ld_digest = check_digest(ld.get("digest"), "layer digest")
            layers.append(LayerRef(blob_path(ld_digest), check_digest(diff, "DiffID"),
                                   ld_digest, ld.get("mediaType"), ld.get("size")))
        c = Candidate(cbytes, config, cdigest, layers, [tag] if tag else [], mbytes, digest,
                      mdesc.get("mediaType") or man.get("mediaType") or MT_MANIFEST)
        by_digest[digest] = c
    if not by_digest:
        raise ImageFormatError("no image manifests found in the layout")
    return list(by_digest.values())


def _docker_candidates(src: Source, ref: str | None) -> list[Candidate]:
    data = src.read("manifest.json")
    try:
        entries = json.loads(data)
    except ValueError as e:
        raise ImageFormatError("manifest.json is not valid JSON") from e
    if not isinstance(entries, list) or not entries:
        raise ImageFormatError("manifest.json lists no images")
    out = []
    for e in entries:
        if not isinstance(e, dict) or not isinstance(e.get("Config"), str):
            raise ImageFormatError("manifest.json entry without a Config")
        tags = [t for t in (e.get("RepoTags") or []) if isinstance(t, str)]
        if ref is not None and ref not in tags and ref + ":latest" not in tags:
            continue
        cpath = _clean(e["Config"])
        cbytes = src.read(cpath)
        cdigest = "sha256:" + hashlib.sha256(cbytes).hexdigest()
        stem = posixpath.basename(cpath).removesuffix(".json").removeprefix("sha256:")
        if len(stem) == 64 and all(c in "0123456789abcdef" for c in stem) and \
                stem != cdigest[7:]:
            raise ImageFormatError(f"config {cpath} does not match its digest")
        config = _json(cbytes, "config")
        diff_ids = (config.get("rootfs") or {}).get("diff_ids") or []
        lpaths = e.get("Layers") or []
        if len(diff_ids) != len(lpaths):
            raise ImageFormatError(f"manifest.json lists {len(lpaths)} layers but the config "
                                   f"lists {len(diff_ids)} diff_ids")
        layers = [LayerRef(_clean(p), check_digest(d, "DiffID"), None, None, None)
                  for p, d in zip(lpaths, diff_ids)]
        out.append(Candidate(cbytes, config, cdigest, layers, tags))
    if not out:
        raise ImageFormatError(f"no image {ref!r} in the archive")
    return out


def find_images(src: Source, ref: str | None = None, want: dict[str, str] | None = None,
                default_repo: str = "imported") -> list[Candidate]:
    """The images in an OCI layout or docker archive (OCI form preferred when both)."""
    want = want or host_platform()
    if src.exists("index.json") and (src.exists("oci-layout") or not src.exists("manifest.json")):
        return _oci_candidates(src, ref, want, default_repo)
    if src.exists("manifest.json"):
        return _docker_candidates(src, ref)
    raise ImageFormatError("not an OCI image layout (no index.json) nor a docker archive "
                           "(no manifest.json)")
