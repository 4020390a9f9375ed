"""Reading images from outside: OCI image layouts and `docker save` archives.

A source is a directory or a tar file (plain or compressed), read through one
small interface (`Source`). `find_images` turns it into `Candidate`s: a config,
layer references bottom first, tags, and, for OCI layouts, the manifest bytes to
keep as they are. Shapes understood:
- OCI layout: `oci-layout` + `index.json` + `blobs/ALG/HEX`; an index entry may be
  a nested index (multi-platform): this machine's platform is picked, or --platform
  (`platforms.select`, the same rule as a pull's).
- the newer `docker save` (Docker 25+): also an OCI layout; preferred when present.
- the old `docker save`: `manifest.json` listing `Config`, `RepoTags`, `Layers`
  (`ID/layer.tar`, possibly symlinks inside the archive to another member).
- skopeo's `dir:` (`podman save --format docker-dir`): `version`, `manifest.json`
  and blobs named by their digest's hex; its image has no name.
Every blob read through `verified_blob` or a layer stream is checked against its
digest and its declared size while it streams (nothing past size+1 is read);
names taken from the archive are refused if absolute or containing `..`. Files
of a layout directory are opened only if they are regular files inside it
(`tree.open_regular`: no FIFO, no device, no symlink out; no symlink at all
under `blobs/`); the directory or archive itself is reached through no symlink
of another user's (`tree.open_trusted`, in `DirSource` and `load.open_archive`).
Every JSON document is checked by `schema` before anything uses it; the names
an archive gives its images are checked by the importer.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import posixpath
import tarfile
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import IO, Any, BinaryIO

from .. import compression
from ..errors import UserError
from ..tarsafe import open_tar
from ..tree import DIR_FLAGS, NotRegularFile, open_regular, open_trusted
from . import platforms, schema
from .schema import MAX_JSON, ImageFormatError
from .store import (
    DOCKER_LIST,
    DOCKER_MANIFEST,
    MT_INDEX,
    MT_MANIFEST,
    REF_NAME,
    check_digest,
    digest_of,
)
from .unpack import split_name

CONTAINERD_NAME = "io.containerd.image.name"

__all__ = [
    "CONTAINERD_NAME",
    "MAX_JSON",
    "Candidate",
    "HashingReader",
    "ImageFormatError",
    "LayerRef",
    "SizedReader",
    "Source",
    "decompressed",
    "find_images",
    "open_source",
]


# --- sources -------------------------------------------------------------------
def _clean(path: str) -> str:
    """A member path from inside an archive, normalized; refuses escapes (`split_name`)."""
    return "/".join(split_name(path, "image file", ImageFormatError))


class Source:
    """Files of an image layout or archive, by relative path."""

    def exists(self, path: str) -> bool:
        raise NotImplementedError

    def open(self, path: str, size: int | None = None) -> IO[bytes]:
        """A stream of the file's bytes that fails unless there are exactly `size` of them
        (default: the size the file has when opened)."""
        raise NotImplementedError

    def close(self) -> None:
        pass

    def identity(self, path: str) -> Hashable:
        """What the file at `path` is, whatever name reaches it (a symlink, a hard link):
        the same for two names of one file. `path` itself when it cannot be opened (its
        reading then says why)."""
        raise NotImplementedError

    def read(self, path: str, limit: int = MAX_JSON, size: int | None = None) -> bytes:
        if size is not None and size > limit:
            raise ImageFormatError(
                f"{path} is too large ({size} bytes declared, at most {limit} read)"
            )
        with self.open(path, size) as f:
            data = f.read(limit + 1)
        if len(data) > limit:
            raise ImageFormatError(f"{path} is too large (over {limit} bytes)")
        return data


def _check_size(path: str, actual: int, declared: int | None) -> int:
    if declared is not None and actual != declared:
        raise ImageFormatError(f"{path} is {actual} bytes but its descriptor declares {declared}")
    return actual


class DirSource(Source):
    """A layout or archive unpacked in a directory: regular files inside it only."""

    def __init__(self, root: str) -> None:
        self.root = root
        try:  # as root's other paths: her directory may be a symlink of hers to root's
            self.fd = open_trusted(root, DIR_FLAGS & ~os.O_NOFOLLOW)
        except OSError as e:
            raise ImageFormatError(f"cannot open {root}: {e.strerror}") from e

    def exists(self, path: str) -> bool:
        """True also for a FIFO or a symlink there: reading it then says what is wrong."""
        try:
            os.stat(_clean(path), dir_fd=self.fd, follow_symlinks=False)
        except (OSError, ImageFormatError):
            return False
        return True

    def _open(self, path: str) -> int:
        rel = _clean(path)
        # A blob is named by its digest: a symlink there is never what the layout means.
        symlinks = not rel.startswith("blobs/")
        try:
            return open_regular(self.fd, rel, symlinks=symlinks)
        except NotRegularFile as e:
            raise ImageFormatError(f"refusing {path} in {self.root}: it {e.strerror}") from e

    def identity(self, path: str) -> Hashable:
        try:
            fd = self._open(path)
        except (OSError, ImageFormatError):
            return path
        try:
            st = os.fstat(fd)
        finally:
            os.close(fd)
        return st.st_dev, st.st_ino

    def open(self, path: str, size: int | None = None) -> IO[bytes]:
        try:
            fd = self._open(path)
        except FileNotFoundError:
            raise ImageFormatError(f"{path} is missing from {self.root}") from None
        except OSError as e:
            raise ImageFormatError(f"cannot read {path} in {self.root}: {e.strerror}") from e
        f = os.fdopen(fd, "rb")
        try:
            actual = _check_size(path, os.fstat(fd).st_size, size)
        except BaseException:
            f.close()
            raise
        return _reader(SizedReader(f, actual, path))

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


_ARCHIVE_ERRORS: tuple[type[Exception], ...] = (
    tarfile.TarError,
    ValueError,
    OverflowError,
    *compression.ERRORS,
)


class TarSource(Source):
    """A layout or archive packed in a tar; symlinks between members are followed inside it.
    Read from `fileobj` if given (closed with the source), else opened by `path`."""

    def __init__(self, path: str, fileobj: IO[bytes] | None = None) -> None:
        self.fileobj = fileobj
        try:
            if fileobj is None:
                self.tf = open_tar(path, "r:*")
            else:
                self.tf = open_tar(fileobj=fileobj, mode="r:*")
            self.members: dict[str, tarfile.TarInfo] = {}
            for m in self.tf.getmembers():
                try:
                    self.members[_clean(m.name)] = m
                except ImageFormatError:
                    continue  # never looked up, so harmless
        except _ARCHIVE_ERRORS as e:
            raise ImageFormatError(f"cannot read archive {path}: {e}") from e

    def _resolve(self, path: str) -> tarfile.TarInfo | None:
        path = _clean(path)
        for _ in range(16):
            m = self.members.get(path)
            if m is None:
                return None
            if m.issym():
                base = posixpath.dirname(path)
                target = (
                    m.linkname if m.linkname.startswith("/") else posixpath.join(base, m.linkname)
                )
                path = _clean(posixpath.normpath("/" + target).lstrip("/"))
                continue
            if m.islnk():
                path = _clean(m.linkname)
                continue
            return m if m.isreg() else None
        return None

    def exists(self, path: str) -> bool:
        return self._resolve(path) is not None

    def identity(self, path: str) -> Hashable:
        try:
            m = self._resolve(path)
        except ImageFormatError:
            m = None
        return path if m is None else m.offset_data

    def open(self, path: str, size: int | None = None) -> IO[bytes]:
        m = self._resolve(path)
        f = self.tf.extractfile(m) if m is not None else None
        if f is None or m is None:
            raise ImageFormatError(f"{path} is missing from the archive (or not a regular file)")
        return _reader(SizedReader(f, _check_size(path, m.size, size), path))

    def close(self) -> None:
        if hasattr(self, "tf"):
            self.tf.close()
        if self.fileobj is not None:
            self.fileobj.close()


def open_source(path: str, archive: IO[bytes] | None = None) -> Source:
    """The layout directory PATH, or the archive PATH (read from `archive` if given: the
    file the caller opened, checked to be a regular file, and closed with the source)."""
    if archive is not None:
        try:
            return TarSource(path, archive)
        except BaseException:
            archive.close()
            raise
    if os.path.isdir(path):
        return DirSource(path)
    if os.path.isfile(path):
        return TarSource(path)
    if os.path.exists(path):
        raise UserError(f"{path}: not a directory nor a regular file")
    raise UserError(f"{path}: no such file or directory")


# --- streams ----------------------------------------------------------------------
class HashingReader(io.RawIOBase):
    """Passes reads through, hashing them (and optionally copying them to `tee`)."""

    def __init__(
        self,
        src: IO[bytes] | Any,
        algo: str = "sha256",
        tee: BinaryIO | None = None,
        progress: Callable[[int], None] | None = None,
    ) -> None:
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


class SizedReader(io.RawIOBase):
    """Passes reads through, failing as soon as the stream proves longer or shorter than
    `size`: it never asks its source for more than size+1 bytes."""

    def __init__(self, src: IO[bytes] | Any, size: int, what: str) -> None:
        self.src = src
        self.size = size
        self.what = what
        self.count = 0

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        want = min(len(b), self.size + 1 - self.count)
        data = self.src.read(want) if want > 0 else b""
        n = len(data)
        self.count += n
        if self.count > self.size:
            raise ImageFormatError(
                f"{self.what} is longer than the {self.size} bytes its descriptor declares"
            )
        if n == 0 and self.count < self.size and len(b):
            raise ImageFormatError(
                f"{self.what} is shorter ({self.count} bytes) than the "
                f"{self.size} bytes its descriptor declares"
            )
        b[:n] = data
        return n

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.src.close()
        super().close()


def _reader(raw: io.RawIOBase) -> IO[bytes]:
    return io.BufferedReader(raw, 1 << 16)


LAYER_KINDS = (compression.GZIP, compression.ZSTD)
"""What a layer blob may be compressed with: what a manifest's media types can say."""


def decompressed(src: Any) -> tuple[Any, str]:
    """(a readable uncompressed stream, compression name) for a layer blob stream."""
    return compression.decompressed(src, LAYER_KINDS)


DECOMPRESS_ERRORS: tuple[type[Exception], ...] = (*compression.ERRORS, tarfile.TarError)


# --- finding images -------------------------------------------------------------
@dataclass
class LayerRef:
    """One layer blob to import: its path in the source and what it must hash to."""

    path: str
    diff_id: str
    digest: str | None  # None for the old docker archives: computed on the way
    media_type: str | None
    size: int | None


@dataclass
class Candidate:
    """One image found in a source, not yet in the store."""

    config_bytes: bytes
    config: dict[str, Any]
    config_digest: str
    layers: list[LayerRef]  # bottom first
    tags: list[str] = field(default_factory=list)  # as the archive names it: not validated
    manifest_bytes: bytes | None = None  # kept verbatim (OCI); None: we write one
    manifest_digest: str | None = None
    manifest_media_type: str = MT_MANIFEST


def blob_path(digest: str) -> str:
    algo, hexd = check_digest(digest).split(":", 1)
    return f"blobs/{algo}/{hexd}"


def verified_blob(src: Source, digest: str, what: str, size: int | None = None) -> bytes:
    """A (small) blob of the layout: at most MAX_JSON bytes, its declared size, its digest."""
    data = src.read(blob_path(digest), size=size)
    if digest_of(data, digest.split(":", 1)[0]) != digest:
        raise ImageFormatError(f"{what} {digest} does not match its digest")
    return data


def _pick_manifests(
    src: Source, descs: list[dict[str, Any]], want: dict[str, str]
) -> tuple[list[dict[str, Any]], list[tuple[dict[str, Any], dict[str, Any]]]]:
    """Resolve index entries down to image manifests: (every manifest once, in the order
    first met; (manifest, top-level entry) for the name each top-level entry gives).

    Each index is read once however many entries name it, and each manifest is listed
    once: a 4 MiB index.json naming one 4 MiB index 30,000 times, whose entries name
    one manifest 30,000 times, made 30,000 reads of it and 900 million pairs (hours,
    then out of memory). A top-level entry naming an index that holds several images
    (one without platforms) names the last image it lists; the others come unnamed."""
    found: dict[str, dict[str, Any]] = {}
    last: dict[str, dict[str, Any] | None] = {}  # index digest -> the last image it lists

    def visit(d: dict[str, Any], depth: int) -> dict[str, Any] | None:
        digest = d["digest"]
        if digest in last:
            return last[digest]
        if depth > 4:
            raise ImageFormatError("image indexes nested too deep")
        sub = schema.load_object(
            verified_blob(src, digest, "index", d["size"]), schema.Index, f"index {digest}"
        )
        end: dict[str, Any] | None = None
        for e in platforms.select(sub["manifests"], want):
            mt = e.get("mediaType")
            if mt in (MT_INDEX, DOCKER_LIST):
                end = visit(e, depth + 1) or end
            elif mt in (MT_MANIFEST, DOCKER_MANIFEST, None):
                end = found.setdefault(e["digest"], e)
        last[digest] = end
        return end

    named = []
    for d in descs:
        mt = d.get("mediaType")
        if mt in (MT_INDEX, DOCKER_LIST):
            m = visit(d, 0)
            if m is not None:
                named.append((m, d))
        elif mt in (MT_MANIFEST, DOCKER_MANIFEST, None):
            named.append((found.setdefault(d["digest"], d), d))
    return list(found.values()), named


def _tag_of(desc: dict[str, Any], default_repo: str) -> str | None:
    """The name an index entry gives its image, as written (the importer validates it)."""
    ann = desc.get("annotations") or {}
    full = ann.get(CONTAINERD_NAME)
    if full:
        return str(full)
    ref = ann.get(REF_NAME)
    if not ref:
        return None
    return str(ref) if "/" in ref or ":" in ref else f"{default_repo}:{ref}"


def _oci_candidates(
    src: Source, ref: str | None, want: dict[str, str], default_repo: str
) -> list[Candidate]:
    index = schema.load_object(src.read("index.json"), schema.Index, "index.json")
    descs: list[dict[str, Any]] = index["manifests"]
    if ref is not None:
        sel = [
            d
            for d in descs
            if (d.get("annotations") or {}).get(REF_NAME) == ref
            or (d.get("annotations") or {}).get(CONTAINERD_NAME) == ref
        ]
        if not sel:
            names = sorted({(d.get("annotations") or {}).get(REF_NAME, "") for d in descs} - {""})
            raise ImageFormatError(
                f"no image {ref!r} in the layout (it has: {', '.join(names) or 'no names'})"
            )
        descs = sel
    if not descs:
        raise ImageFormatError("the image layout's index.json lists no images")
    manifests, named = _pick_manifests(src, descs, want)
    tags: dict[str, dict[str, None]] = {}  # manifest digest -> its names, in order, once
    for mdesc, top in named:
        tag = _tag_of(top, default_repo)
        if tag:
            tags.setdefault(mdesc["digest"], {})[tag] = None
    by_digest: dict[str, Candidate] = {}
    for mdesc in manifests:
        digest = mdesc["digest"]
        mbytes = verified_blob(src, digest, "manifest", mdesc["size"])
        by_digest[digest] = _from_manifest(
            src, mbytes, digest, mdesc.get("mediaType"), list(tags.get(digest, ())), blob_path
        )
    if not by_digest:
        raise ImageFormatError("no image manifests found in the layout")
    return list(by_digest.values())


def _from_manifest(
    src: Source,
    mbytes: bytes,
    digest: str,
    media_type: str | None,
    tags: list[str],
    path_of: Callable[[str], str],
) -> Candidate:
    """The image of one manifest (kept verbatim), its blobs read at `path_of(digest)`."""
    man = schema.load_object(mbytes, schema.Manifest, f"manifest {digest}")
    cdesc = man["config"]
    cdigest = cdesc["digest"]
    data = src.read(path_of(cdigest), size=cdesc["size"])
    if digest_of(data, cdigest.split(":", 1)[0]) != cdigest:
        raise ImageFormatError(f"config {cdigest} does not match its digest")
    config = schema.load_object(data, schema.ImageConfig, f"config {cdigest}")
    ldescs = man["layers"]
    diff_ids = schema.diff_ids(config, [ld["digest"] for ld in ldescs], f"manifest {digest}")
    layers = [
        LayerRef(path_of(ld["digest"]), diff, ld["digest"], ld.get("mediaType"), ld["size"])
        for ld, diff in zip(ldescs, diff_ids, strict=True)
    ]
    mt = media_type or man.get("mediaType") or MT_MANIFEST
    return Candidate(data, config, cdigest, layers, tags, mbytes, digest, mt)


# skopeo's `dir:` transport (and `podman save --format docker-dir`): `version`,
# `manifest.json` (one image's manifest, or an index whose images' manifests are
# `HEX.manifest.json`), and every blob as a file named by its digest's hex.
DIR_VERSION = b"Directory Transport Version: "


def _dir_blob(digest: str) -> str:
    algo, hexd = check_digest(digest).split(":", 1)
    return hexd if algo == "sha256" else f"{algo}-{hexd}"


def _dir_candidates(src: Source, want: dict[str, str]) -> list[Candidate]:
    mbytes = src.read("manifest.json")
    top = schema.parse_json(mbytes, "manifest.json")
    if isinstance(top, dict) and "manifests" in top:  # an index (skopeo copy --all)
        index = schema.load_object(mbytes, schema.Index, "manifest.json")
        out = []
        for d in platforms.select(index["manifests"], want):
            digest = d["digest"]
            path = _dir_blob(digest) + ".manifest.json"
            data = src.read(path, size=d["size"])
            if digest_of(data, digest.split(":", 1)[0]) != digest:
                raise ImageFormatError(f"{path} does not match its digest")
            out.append(_from_manifest(src, data, digest, d.get("mediaType"), [], _dir_blob))
        return out
    return [_from_manifest(src, mbytes, digest_of(mbytes), None, [], _dir_blob)]


def _docker_candidates(src: Source, ref: str | None) -> list[Candidate]:
    """The images of an old `docker save` archive's manifest.json. An entry naming the
    same config and layer files as an earlier one (through any name: symlinks between
    members) is that image again, and only adds its names; each config file is read
    once. A 4 MiB manifest.json repeats an entry 60,000 times: each was imported anew,
    its layers read and hashed again (hours for a layer of a few MB)."""
    entries = schema.load(src.read("manifest.json"), schema.DockerManifest, "manifest.json")
    if not entries:
        raise ImageFormatError("manifest.json lists no images")
    configs: dict[Hashable, tuple[bytes, dict[str, Any], str]] = {}
    by_files: dict[tuple[Hashable, ...], Candidate] = {}
    names: dict[int, dict[str, None]] = {}  # id of a candidate -> its names, once each
    for e in entries:
        tags = list(e.get("RepoTags") or [])
        if ref is not None and ref not in tags and ref + ":latest" not in tags:
            continue
        cpath = _clean(e["Config"])
        lpaths = [_clean(p) for p in e["Layers"]]
        files = tuple(src.identity(p) for p in [cpath, *lpaths])
        c = by_files.get(files)
        if c is None:
            if files[0] not in configs:
                configs[files[0]] = _docker_config(src, cpath)
            cbytes, config, cdigest = configs[files[0]]
            diff_ids = schema.diff_ids(config, lpaths, "manifest.json")
            layers = [
                LayerRef(p, d, None, None, None) for p, d in zip(lpaths, diff_ids, strict=True)
            ]
            c = by_files[files] = Candidate(cbytes, config, cdigest, layers)
        names.setdefault(id(c), {}).update(dict.fromkeys(tags))
    if not by_files:
        raise ImageFormatError(f"no image {ref!r} in the archive")
    for c in by_files.values():
        c.tags = list(names[id(c)])
    return list(by_files.values())


def _docker_config(src: Source, cpath: str) -> tuple[bytes, dict[str, Any], str]:
    """(bytes, checked document, digest) of a config of an old `docker save` archive."""
    cbytes = src.read(cpath)
    cdigest = digest_of(cbytes)
    stem = posixpath.basename(cpath).removesuffix(".json").removeprefix("sha256:")
    if len(stem) == 64 and all(c in "0123456789abcdef" for c in stem) and stem != cdigest[7:]:
        raise ImageFormatError(f"config {cpath} does not match its digest")
    config = schema.load_object(cbytes, schema.ImageConfig, f"config {cpath}")
    return cbytes, config, cdigest


def find_images(
    src: Source,
    ref: str | None = None,
    want: dict[str, str] | None = None,
    default_repo: str = "imported",
) -> list[Candidate]:
    """The images in an OCI layout or docker archive (OCI form preferred when both)."""
    want = want or platforms.host()
    if src.exists("index.json") and (src.exists("oci-layout") or not src.exists("manifest.json")):
        return _oci_candidates(src, ref, want, default_repo)
    if src.exists("version") and src.read("version").startswith(DIR_VERSION):
        if ref is not None:
            raise ImageFormatError("a dir: layout holds one unnamed image: --ref names none")
        return _dir_candidates(src, want)
    if src.exists("manifest.json"):
        return _docker_candidates(src, ref)
    raise ImageFormatError(
        "not an OCI image layout (no index.json), a dir: layout (no version) "
        "nor a docker archive (no manifest.json)"
    )
