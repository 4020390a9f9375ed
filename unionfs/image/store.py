"""The image store: blobs and an index that form an OCI image layout, plus unpacked layers.

Layout of a store directory (itself a valid OCI image layout, so `skopeo copy
oci:STORE:NAME ...` and `umoci` can read the images straight out of it):

    oci-layout, index.json       the OCI layout; each image is one manifest descriptor,
                                 its tag in `org.opencontainers.image.ref.name`
                                 (untagged images have no such annotation)
    blobs/sha256/HEX             manifests, configs and layer blobs as imported
                                 (compressed or not), each verified against its digest
    layers/HEX/diff/             a layer unpacked once, named by its DiffID
    layers/HEX/layer.json        {"diff_id", "size" (uncompressed bytes), "blob",
                                 "media_type", "whiteouts": "kernel" | "oci"}
    tmp/                         work area; everything is built here and renamed into place
    .lock                        shared by importers, exclusive for removals

Atomicity: a blob or layer becomes visible only by rename(2) of a complete
file or directory from tmp/, after a syncfs; index.json is replaced by rename
under its own lock, and only after every blob and layer it names is in place.
So an interrupted command leaves at most unreferenced blobs or layers (reused
by a later import, removed by `rmi`) and stale tmp/ entries (removed by the
next command that can take the store lock exclusively).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from .. import syscalls
from ..errors import UserError

REF_NAME = "org.opencontainers.image.ref.name"
MT_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MT_INDEX = "application/vnd.oci.image.index.v1+json"
MT_CONFIG = "application/vnd.oci.image.config.v1+json"
MT_LAYER = "application/vnd.oci.image.layer.v1.tar"
MT_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
MT_LAYER_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"

_DIGEST_RE = re.compile(r"^(sha256:[0-9a-f]{64}|sha512:[0-9a-f]{128})$")


def check_digest(digest: object, what: str = "digest") -> str:
    """A digest string safe to use as a file name; anything else is a corrupt image."""
    if not isinstance(digest, str) or not _DIGEST_RE.match(digest):
        raise UserError(f"invalid {what} {digest!r}")
    return digest


def short_id(digest: str) -> str:
    return digest.split(":", 1)[-1][:12]


def default_store() -> str:
    """$PYUNION_STORE, else $XDG_DATA_HOME/pyunion/store, else ~/.local/share/pyunion/store."""
    env = os.environ.get("PYUNION_STORE")
    if env:
        return env
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local",
                                                            "share")
    return os.path.join(base, "pyunion", "store")


def syncfs(fd: int) -> None:
    """Flush the store's filesystem once before publishing, rather than fsync per file."""
    try:
        syscalls.syncfs(fd)
    except OSError:
        os.sync()


def write_json_atomic(path: str, data: Any) -> None:
    d = os.path.dirname(path)
    fd, tmp = tempfile.mkstemp(dir=d, prefix=".tmp-")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1, sort_keys=True)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.rename(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def canonical_json(data: Any) -> bytes:
    """Stable bytes for a manifest or config we write, so equal content has one digest."""
    return json.dumps(data, sort_keys=True, separators=(",", ":")).encode()


@dataclass
class Image:
    """One image in the store: its manifest, config and tags."""

    digest: str                      # manifest digest
    manifest: dict[str, Any]
    config: dict[str, Any]
    config_digest: str
    tags: list[str] = field(default_factory=list)

    @property
    def id(self) -> str:
        return self.config_digest

    @property
    def diff_ids(self) -> list[str]:
        """Bottom first, as in the config."""
        return list(self.config.get("rootfs", {}).get("diff_ids", []))


def normalize_tag(name: str) -> str:
    """`name` -> `name:latest` when it has no tag (a ':' after the last '/')."""
    if "@" in name:
        raise UserError(f"invalid tag {name!r}: digests cannot be tags")
    last = name.rsplit("/", 1)[-1]
    if not name or not last or name.startswith(("/", ":")) or any(c.isspace() for c in name):
        raise UserError(f"invalid tag {name!r}")
    return name if ":" in last else name + ":latest"


class Store:
    """A directory holding images and their unpacked layers (see the module comment)."""

    def __init__(self, root: str | None = None, create: bool = True) -> None:
        self.root = os.path.abspath(root or default_store())
        if create:
            self._init()
        elif not os.path.isfile(os.path.join(self.root, "index.json")):
            raise UserError(f"no image store at {self.root}")

    # --- layout ---------------------------------------------------------------
    def _init(self) -> None:
        try:
            for d in ("blobs/sha256", "layers", "tmp"):
                os.makedirs(os.path.join(self.root, d), exist_ok=True)
            lay = os.path.join(self.root, "oci-layout")
            if not os.path.exists(lay):
                write_json_atomic(lay, {"imageLayoutVersion": "1.0.0"})
            idx = os.path.join(self.root, "index.json")
            if not os.path.exists(idx):
                write_json_atomic(idx, {"schemaVersion": 2, "mediaType": MT_INDEX,
                                        "manifests": []})
        except OSError as e:
            raise UserError(f"cannot create image store {self.root}: {e.strerror}") from e

    def blob_path(self, digest: str) -> str:
        algo, hexd = check_digest(digest).split(":", 1)
        return os.path.join(self.root, "blobs", algo, hexd)

    def layer_dir(self, diff_id: str) -> str:
        """The directory that holds the layer's `diff/` tree and `layer.json`."""
        algo, hexd = check_digest(diff_id, "DiffID").split(":", 1)
        return os.path.join(self.root, "layers", hexd if algo == "sha256" else f"{algo}-{hexd}")

    def layer_path(self, diff_id: str) -> str:
        """The unpacked tree of a layer: what goes into a lowerdir."""
        return os.path.join(self.layer_dir(diff_id), "diff")

    def has_blob(self, digest: str) -> bool:
        return os.path.isfile(self.blob_path(digest))

    def has_layer(self, diff_id: str) -> bool:
        return os.path.isfile(os.path.join(self.layer_dir(diff_id), "layer.json"))

    def layer_info(self, diff_id: str) -> dict[str, Any]:
        try:
            with open(os.path.join(self.layer_dir(diff_id), "layer.json")) as f:
                info: dict[str, Any] = json.load(f)
            return info
        except (OSError, ValueError) as e:
            raise UserError(f"layer {diff_id} is missing from the store {self.root}") from e

    def read_blob(self, digest: str) -> bytes:
        try:
            with open(self.blob_path(digest), "rb") as f:
                return f.read()
        except OSError as e:
            raise UserError(f"blob {digest} is missing from the store {self.root}") from e

    def read_json_blob(self, digest: str) -> dict[str, Any]:
        try:
            data = json.loads(self.read_blob(digest))
        except ValueError as e:
            raise UserError(f"blob {digest} in the store is not JSON") from e
        if not isinstance(data, dict):
            raise UserError(f"blob {digest} in the store is not a JSON object")
        return data

    # --- temporary work area and publishing ---------------------------------
    @contextlib.contextmanager
    def tempdir(self) -> Iterator[str]:
        """A private directory under tmp/, removed afterwards whatever was left in it."""
        path = os.path.join(self.root, "tmp", uuid.uuid4().hex)
        os.mkdir(path, 0o700)
        try:
            yield path
        finally:
            remove_tree(path)

    def publish_blob(self, tmp_file: str, digest: str) -> None:
        """Rename a complete, verified blob into place (a blob already there wins)."""
        dst = self.blob_path(digest)
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        if os.path.exists(dst):
            os.unlink(tmp_file)
            return
        os.rename(tmp_file, dst)

    def put_blob_bytes(self, data: bytes, digest: str, tmpdir: str) -> None:
        if self.has_blob(digest):
            return
        p = os.path.join(tmpdir, "blob-" + uuid.uuid4().hex)
        with open(p, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        self.publish_blob(p, digest)

    def publish_layer(self, tmp_layer_dir: str, diff_id: str) -> None:
        """Rename an unpacked layer (a dir with diff/ and layer.json) into place."""
        dst = self.layer_dir(diff_id)
        try:
            os.rename(tmp_layer_dir, dst)
        except OSError as e:
            if e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
            if self.has_layer(diff_id):
                return  # published meanwhile by another import: theirs is as good
            self._trash(dst)  # a directory without layer.json is nobody's: replace it
            os.rename(tmp_layer_dir, dst)

    def sync(self) -> None:
        fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY)
        try:
            syncfs(fd)
        finally:
            os.close(fd)

    # --- locking ----------------------------------------------------------------
    @contextlib.contextmanager
    def _flock(self, name: str, mode: int) -> Iterator[bool]:
        fd = os.open(os.path.join(self.root, name), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            try:
                fcntl.flock(fd, mode)
                got = True
            except BlockingIOError:
                got = False
            yield got
        finally:
            os.close(fd)

    @contextlib.contextmanager
    def using(self) -> Iterator[None]:
        """Held (shared) while adding to the store, so removals and cleanup wait for us."""
        self.cleanup_tmp()
        with self._flock(".lock", fcntl.LOCK_SH):
            yield

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[None]:
        with self._flock(".lock", fcntl.LOCK_EX):
            yield

    def cleanup_tmp(self) -> None:
        """Remove what interrupted commands left in tmp/, if nobody is using the store."""
        with self._flock(".lock", fcntl.LOCK_EX | fcntl.LOCK_NB) as got:
            if not got:
                return
            tmp = os.path.join(self.root, "tmp")
            with contextlib.suppress(OSError):
                for name in os.listdir(tmp):
                    remove_tree(os.path.join(tmp, name))

    # --- the index ----------------------------------------------------------------
    def _read_index(self) -> dict[str, Any]:
        try:
            with open(os.path.join(self.root, "index.json")) as f:
                idx: dict[str, Any] = json.load(f)
        except FileNotFoundError:
            return {"schemaVersion": 2, "mediaType": MT_INDEX, "manifests": []}
        except (OSError, ValueError) as e:
            raise UserError(f"the store's index.json is unreadable: {e}") from e
        idx.setdefault("manifests", [])
        return idx

    @contextlib.contextmanager
    def edit_index(self) -> Iterator[dict[str, Any]]:
        """Read-modify-write of index.json under its lock; written only if the block succeeds."""
        with self._flock(".index.lock", fcntl.LOCK_EX):
            idx = self._read_index()
            yield idx
            write_json_atomic(os.path.join(self.root, "index.json"), idx)

    def add_image(self, manifest_digest: str, size: int, tag: str | None,
                  media_type: str = MT_MANIFEST) -> None:
        """Record an image (its manifest blob must be in place); a tag moves to it."""
        with self.edit_index() as idx:
            entries = idx["manifests"]
            if tag is not None:
                tag = normalize_tag(tag)
                for e in entries:
                    ann = e.get("annotations") or {}
                    if ann.get(REF_NAME) == tag:
                        del ann[REF_NAME]
            desc: dict[str, Any] = {"mediaType": media_type, "digest": manifest_digest,
                                    "size": size}
            if tag is not None:
                desc["annotations"] = {REF_NAME: tag}
            entries.append(desc)
            idx["manifests"] = _dedupe(entries)

    def images(self) -> list[Image]:
        """Every image in the store, one per manifest, in index order."""
        out: dict[str, Image] = {}
        for e in self._read_index()["manifests"]:
            d = e.get("digest")
            if not isinstance(d, str):
                continue
            img = out.get(d)
            if img is None:
                img = self._load_image(d)
                out[d] = img
            ref = (e.get("annotations") or {}).get(REF_NAME)
            if ref and ref not in img.tags:
                img.tags.append(ref)
        return list(out.values())

    def _load_image(self, manifest_digest: str) -> Image:
        m = self.read_json_blob(manifest_digest)
        cd = check_digest((m.get("config") or {}).get("digest"), "config digest")
        return Image(manifest_digest, m, self.read_json_blob(cd), cd)

    def lookup(self, ref: str) -> Image:
        """An image by tag (`name`, `name:tag`), image ID or manifest digest (or a prefix)."""
        imgs = self.images()
        if not ref:
            raise UserError("empty image name")
        for cand in (ref, ref + ":latest") if ":" not in ref.rsplit("/", 1)[-1] else (ref,):
            for img in imgs:
                if cand in img.tags:
                    return img
        # A short name matches a tag that ends with it ("busybox" ~ "docker.io/library/busybox").
        bare = ref if ":" in ref.rsplit("/", 1)[-1] else ref + ":latest"
        found = [i for i in imgs if any(t.endswith("/" + bare) for t in i.tags)]
        if len(found) == 1:
            return found[0]
        hexpart = ref.split(":", 1)[1] if ref.startswith(("sha256:", "sha512:")) else ref
        if len(hexpart) >= 4 and re.fullmatch(r"[0-9a-f]+", hexpart):
            found = [i for i in imgs
                     if i.config_digest.split(":", 1)[1].startswith(hexpart)
                     or i.digest.split(":", 1)[1].startswith(hexpart)]
            if len(found) == 1:
                return found[0]
            if len(found) > 1:
                raise UserError(f"image ID {ref!r} is ambiguous")
        raise UserError(f"no image {ref!r} in the store {self.root}")

    # --- removal ------------------------------------------------------------------
    def remove(self, ref: str) -> tuple[list[str], list[str]]:
        """Remove a tag (or an image by ID, with all its tags); then what nobody uses.

        Returns (untagged names, deleted digests: manifests, configs and layers).
        """
        with self.exclusive():
            img = self.lookup(ref)
            norm = _maybe_norm(ref) or ref
            named = [t for t in img.tags if t in (ref, norm) or t.endswith("/" + norm)]
            by_tag = len(named) == 1
            untagged: list[str] = []
            with self.edit_index() as idx:
                keep = []
                for e in idx["manifests"]:
                    t = (e.get("annotations") or {}).get(REF_NAME)
                    if e.get("digest") != img.digest:
                        keep.append(e)
                        continue
                    if by_tag and t != named[0]:
                        keep.append(e)
                        continue
                    if t:
                        untagged.append(t)
                idx["manifests"] = keep
            deleted = self.gc()
        return untagged, deleted

    def gc(self) -> list[str]:
        """Delete blobs and layers no image refers to (call with the store held exclusively)."""
        live_blobs: set[str] = set()
        live_layers: set[str] = set()
        for img in self.images():
            live_blobs.add(img.digest)
            live_blobs.add(img.config_digest)
            for d in img.manifest.get("layers", []):
                live_blobs.add(d.get("digest"))
            live_layers.update(img.diff_ids)
        deleted: list[str] = []
        layers_root = os.path.join(self.root, "layers")
        for name in sorted(os.listdir(layers_root)):
            diff_id = ("sha256:" + name) if "-" not in name else name.replace("-", ":", 1)
            if diff_id in live_layers:
                continue
            self._trash(os.path.join(layers_root, name))
            deleted.append(diff_id)
        blobs_root = os.path.join(self.root, "blobs")
        for algo in sorted(os.listdir(blobs_root)):
            for hexd in sorted(os.listdir(os.path.join(blobs_root, algo))):
                d = f"{algo}:{hexd}"
                if d not in live_blobs:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(os.path.join(blobs_root, algo, hexd))
                    deleted.append(d)
        return deleted

    def _trash(self, path: str) -> None:
        """Make a directory vanish at once (rename into tmp/), then delete it at leisure."""
        dst = os.path.join(self.root, "tmp", "trash-" + uuid.uuid4().hex)
        try:
            os.rename(path, dst)
        except FileNotFoundError:
            return
        remove_tree(dst)


def _dedupe(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One descriptor per (image, tag); an image that lost its last tag stays, untagged."""
    tagged = {e.get("digest") for e in entries if (e.get("annotations") or {}).get(REF_NAME)}
    seen: set[tuple[Any, Any]] = set()
    out = []
    for e in entries:
        ann = e.get("annotations") or {}
        if not ann:
            e.pop("annotations", None)
        ref = ann.get(REF_NAME)
        if ref is None and e.get("digest") in tagged:
            continue
        key = (e.get("digest"), ref)
        if key not in seen:
            seen.add(key)
            out.append(e)
    return out


def _maybe_norm(ref: str) -> str | None:
    try:
        return normalize_tag(ref)
    except UserError:
        return None


def remove_tree(path: str) -> None:
    """rmtree that also copes with read-only directories left by an unpacked layer."""
    def onerror(func: Any, p: str, exc: Any) -> None:
        parent = os.path.dirname(p)
        try:
            os.chmod(parent, 0o700)
            if os.path.isdir(p) and not os.path.islink(p):
                os.chmod(p, 0o700)
                shutil.rmtree(p, ignore_errors=True)
            else:
                os.unlink(p)
        except OSError:
            pass

    if os.path.lexists(path):
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, onerror=onerror)
        else:
            os.unlink(path)
