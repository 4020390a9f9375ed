"""The image store: blobs and an index that form an OCI image layout, plus unpacked layers.

Layout of a store directory (itself a valid OCI image layout, so `skopeo copy
oci:STORE:NAME ...` and `umoci` can read the images straight out of it):

    oci-layout, index.json       the OCI layout; each image is one manifest descriptor,
                                 its tag in `org.opencontainers.image.ref.name`
                                 (untagged images have no such annotation)
    blobs/sha256/HEX             manifests, configs and layer blobs as imported
                                 (compressed or not), each verified against its digest
    layers/HEX/diff/             a layer unpacked once, named by its DiffID; a mount using
                                 it holds a shared flock on it (`layers.hold_lower`), and
                                 `gc` keeps it until that is gone
    layers/HEX/layer.json        {"diff_id", "size" (uncompressed bytes), "blob",
                                 "media_type", "whiteouts": "kernel" | "userxattr" | "oci"}
    tmp/                         work area; everything is built here and renamed into place
    .lock                        shared by importers, exclusive for removals

Atomicity: a blob or layer becomes visible only by rename(2) of a complete
file or directory from tmp/, after a syncfs; index.json is replaced by rename
under its own lock, and only after every blob and layer it names is in place.
So an interrupted command leaves at most unreferenced blobs or layers (reused
by a later import, removed by `rmi`) and stale tmp/ entries (removed by the
next command that can take the store lock exclusively).

Privacy: an unpacked layer holds the image's files with their owners and modes,
setuid-root programs included, so the store root, `blobs/`, `layers/`, each
`layers/HEX/` and `tmp/` are 0700, as containers/storage keeps its layers: no
other local user can reach into them. (The `diff/` trees keep the image's own
modes: a mount of them shows the image as it is.) Every command that writes to
a store first tightens directories an older pyunion left open.

Everything read back from the store goes through the same checks as an import
(`schema`): bounded reads of regular files, validated JSON.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import stat
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .. import syscalls
from ..errors import UserError
from ..sha256 import sha256_hex
from ..tree import (
    DIR_FLAGS,
    NotRegularFile,
    open_rel,
    open_trusted,
    private_dir,
    read_regular,
    rmtree,
)
from . import reference, schema
from .safetext import ImageError, printable

if TYPE_CHECKING:
    import logging

# Not imported here: hashlib (OpenSSL's libcrypto, ~4.5 MiB to read from a cold disk),
# json, logging and tempfile (shutil, bz2, lzma, random). `pyunion run` imports this
# module on its start-up path to read the image (`run._confinement_and_image`), which
# uses none of them; what writes to the store imports them where it does.


def _log() -> logging.Logger:
    import logging

    return logging.getLogger(__name__)


PRIVATE = 0o700

REF_NAME = "org.opencontainers.image.ref.name"
MT_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MT_INDEX = "application/vnd.oci.image.index.v1+json"
MT_CONFIG = "application/vnd.oci.image.config.v1+json"
MT_LAYER = "application/vnd.oci.image.layer.v1.tar"
MT_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
MT_LAYER_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff.tar"
DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"


def check_digest(digest: object, what: str = "digest") -> str:
    """A digest string safe to use as a file name; anything else is a corrupt image."""
    if not isinstance(digest, str) or not schema.DIGEST_RE.fullmatch(digest):
        raise ImageError(f"invalid {what} {digest!r}")
    return digest


def digest_of(data: bytes, algo: str = "sha256") -> str:
    """`ALGO:HEX` of some bytes, as descriptors name them."""
    if algo == "sha256":  # CPython's own: no libcrypto on run's start-up (`sha256_hex`)
        return f"{algo}:{sha256_hex(data)}"
    import hashlib

    return f"{algo}:{hashlib.new(algo, data).hexdigest()}"


def bare_id(digest: str) -> str:
    """An image ID as buildah prints it: the hex, no `sha256:`."""
    return digest.split(":", 1)[-1]


def short_id(digest: str) -> str:
    return bare_id(digest)[:12]


def default_store() -> str:
    """$PYUNION_STORE, else $XDG_DATA_HOME/pyunion/store, else ~/.local/share/pyunion/store.

    $XDG_DATA_HOME counts only when it is the caller's own: after `su` it may still
    name the other user's, whose store root would then use.
    """
    env = os.environ.get("PYUNION_STORE")
    if env:
        return env
    base = os.path.join(os.path.expanduser("~"), ".local", "share")
    xdg = os.environ.get("XDG_DATA_HOME")
    if xdg and os.path.isabs(xdg):
        with contextlib.suppress(OSError):
            if os.stat(xdg).st_uid == os.geteuid():
                base = xdg
    return os.path.join(base, "pyunion", "store")


def check_owner(root: str) -> None:
    """Refuse a store that is not the caller's own, or a symlink to one that another user
    made: its owner decides what is in it (root would run that user's images) and can
    point it anywhere (root would make /etc 0700 and write its index there)."""
    for follow in (False, True):
        try:
            st = os.stat(root, follow_symlinks=follow)
        except FileNotFoundError:
            return
        except OSError as e:
            raise UserError(f"cannot use the image store {printable(root)}: {e.strerror}") from e
        if st.st_uid != os.geteuid() and (follow or stat.S_ISLNK(st.st_mode)):
            raise UserError(
                f"the image store {printable(root)} belongs to uid {st.st_uid}; refusing to use it"
            )


def check_parent(root: str, create: bool) -> str:
    """Refuse a store in a directory another user can change (made, if missing and
    `create`, through no symlink of another user's); the store's path as resolved
    (`tree.private_dir`), to use from then on. The store is used by its path: in her
    directory she could exchange root's store (or root's symlink on the way to it)
    for her symlink to /etc between `check_owner` and the next use, and root made
    /etc 0700 (`Store.secure`)."""
    parent, name = os.path.split(root)
    try:
        if create:
            os.close(open_trusted(parent, mkdir=0o755))
        return os.path.join(private_dir(parent), name)
    except FileNotFoundError:
        return root  # no store there: said by the caller
    except OSError as e:
        raise UserError(
            f"the image store {printable(root)} {e.strerror}; refusing to use it"
        ) from None


def syncfs(fd: int) -> None:
    """Flush the store's filesystem once before publishing, rather than fsync per file."""
    try:
        syscalls.syncfs(fd)
    except OSError:
        os.sync()


def write_json_atomic(path: str, data: Any, limit: int | None = None, why: str = "") -> int:
    """Write JSON beside `path` (0600) and rename it into place; returns its size. With
    `limit`, a document longer than that many bytes is a UserError (saying `why` it
    grew so) and nothing is written."""
    import json
    import tempfile

    text = json.dumps(data, indent=1, sort_keys=True) + "\n"  # ASCII: len() is its size
    if limit is not None and len(text) > limit:
        raise UserError(
            f"{path} would be {len(text)} bytes, more than the {limit} pyunion reads back"
            + (f" ({why})" if why else "")
        )
    d = os.path.dirname(path)
    fd, tmp = tempfile.mkstemp(dir=d, prefix=".tmp-")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.rename(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return len(text)


def canonical_json(data: Any) -> bytes:
    """Stable bytes for a manifest or config we write, so equal content has one digest."""
    import json

    return json.dumps(data, sort_keys=True, separators=(",", ":")).encode()


@dataclass
class Image:
    """One image in the store: its manifest, config and tags."""

    digest: str  # manifest digest
    manifest: dict[str, Any]
    config: dict[str, Any]
    config_digest: str
    tags: list[str] = field(default_factory=list)

    @property
    def id(self) -> str:
        return self.config_digest

    @property
    def media_type(self) -> str:
        """The manifest's media type (OCI when it does not say, as the spec allows)."""
        return str(self.manifest.get("mediaType") or MT_MANIFEST)

    @property
    def diff_ids(self) -> list[str]:
        """Bottom first, as in the config (its shape was checked when it was loaded)."""
        return list(self.config["rootfs"]["diff_ids"])


def normalize_tag(name: object) -> str:
    """A valid reference as the store keeps it: `name:latest` when it has no tag."""
    return reference.tagged(name)


class Store:
    """A directory holding images and their unpacked layers (see the module comment)."""

    def __init__(self, root: str | None = None, create: bool = True) -> None:
        self.root = os.path.abspath(root or default_store())
        self._secured = False
        self._damaged: dict[str, str] = {}  # manifest digest -> why it cannot be loaded
        check_owner(self.root)
        self.root = check_parent(self.root, create)
        check_owner(self.root)  # as resolved, if it crossed a symlink
        if create:
            self._init()
        elif not os.path.isfile(os.path.join(self.root, "index.json")):
            raise UserError(f"no image store at {self.root}")

    # --- layout ---------------------------------------------------------------
    def _init(self) -> None:
        try:
            for d in ("", "blobs", "blobs/sha256", "layers", "tmp"):
                with contextlib.suppress(FileExistsError):
                    os.mkdir(os.path.join(self.root, d), PRIVATE)
            self.secure()
            lay = os.path.join(self.root, "oci-layout")
            if not os.path.exists(lay):
                write_json_atomic(lay, {"imageLayoutVersion": "1.0.0"})
            idx = os.path.join(self.root, "index.json")
            if not os.path.exists(idx):
                write_json_atomic(idx, {"schemaVersion": 2, "mediaType": MT_INDEX, "manifests": []})
        except OSError as e:
            raise UserError(f"cannot create image store {self.root}: {e.strerror}") from e

    def secure(self) -> None:
        """Make the store's directories 0700 (see the module comment); once per command."""
        if self._secured:
            return
        try:
            rfd = os.open(self.root, DIR_FLAGS & ~os.O_NOFOLLOW)
        except OSError as e:
            raise UserError(f"cannot open the image store {self.root}: {e.strerror}") from e
        try:
            _private(rfd)
            for rel in (b"blobs", b"layers", b"tmp"):
                try:
                    fd = open_rel(rfd, rel)
                except FileNotFoundError:
                    continue
                try:
                    _private(fd)
                    with os.scandir(fd) as it:
                        names = [e.name for e in it if e.is_dir(follow_symlinks=False)]
                    for name in names if rel != b"tmp" else []:
                        with contextlib.suppress(FileNotFoundError):
                            sub = os.open(name, DIR_FLAGS, dir_fd=fd)
                            try:
                                _private(sub)
                            finally:
                                os.close(sub)
                finally:
                    os.close(fd)
        except OSError as e:
            raise UserError(f"cannot make the image store {self.root} private: {e.strerror}") from e
        finally:
            os.close(rfd)
        self._secured = True

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

    def lower_dirs(self, diff_ids: Sequence[str]) -> list[str]:
        """An image's layer directories (its DiffIDs bottom first), TOP FIRST as lowerdir
        wants, each once: a layer the image repeats (docker's empty layer, two identical
        COPY steps) is kept at its topmost place only. That shows the same tree: the upper
        copy shadows every entry of the lower one and shows again what the layers between
        hid of it. A mount refuses one directory twice, as the kernel does."""
        return [self.layer_path(d) for d in dict.fromkeys(reversed(diff_ids))]

    def has_blob(self, digest: str) -> bool:
        return os.path.isfile(self.blob_path(digest))

    def has_layer(self, diff_id: str) -> bool:
        """Whether the layer is unpacked: its `layer.json` and its `diff/` tree are there.

        A `diff/` removed by hand made the image fail to run, and importing or
        pulling it again skipped the layer (its layer.json said it was there):
        now such a layer is unpacked again, and replaces the remains."""
        d = self.layer_dir(diff_id)
        return os.path.isfile(os.path.join(d, "layer.json")) and os.path.isdir(
            os.path.join(d, "diff")
        )

    def _read(self, path: str, limit: int = schema.MAX_JSON) -> bytes:
        """A file of the store (relative to its root): a regular file, at most `limit` bytes."""
        rfd = os.open(self.root, DIR_FLAGS & ~os.O_NOFOLLOW)
        try:
            return read_regular(rfd, path, limit)
        finally:
            os.close(rfd)

    def layer_info(self, diff_id: str) -> dict[str, Any]:
        rel = os.path.relpath(os.path.join(self.layer_dir(diff_id), "layer.json"), self.root)
        try:
            info = schema.load_object(
                self._read(rel, 1 << 16), schema.LayerInfo, f"layer {diff_id}: layer.json"
            )
        except OSError as e:
            raise UserError(f"layer {diff_id} is missing from the store {self.root}") from e
        return info

    def blob_size(self, digest: str) -> int:
        try:
            return os.stat(self.blob_path(digest)).st_size
        except OSError as e:
            raise UserError(f"blob {digest} is missing from the store {self.root}") from e

    def read_blob(self, digest: str, limit: int = schema.MAX_JSON) -> bytes:
        """A small blob (a manifest or a config), checked against its digest."""
        rel = os.path.relpath(self.blob_path(digest), self.root)
        try:
            data = self._read(rel, limit)
        except NotRegularFile as e:
            raise UserError(f"blob {digest} in the store {e.strerror}") from e
        except OSError as e:
            if e.errno == errno.EFBIG:
                raise UserError(f"blob {digest} in the store is too large to read") from e
            raise UserError(f"blob {digest} is missing from the store {self.root}") from e
        if digest_of(data, digest.split(":", 1)[0]) != digest:
            raise UserError(
                f"blob {digest} in the store {self.root} is damaged "
                "(its content does not match its digest)"
            )
        return data

    def read_json_blob(self, digest: str, kind: type[Any], what: str) -> dict[str, Any]:
        """A manifest or config from the store, checked like one being imported."""
        return schema.load_object(self.read_blob(digest), kind, f"{what} {digest} in the store")

    # --- temporary work area and publishing ---------------------------------
    @contextlib.contextmanager
    def tempdir(self) -> Iterator[str]:
        """A private directory under tmp/, removed afterwards whatever was left in it."""
        path = os.path.join(self.root, "tmp", uuid.uuid4().hex)
        os.mkdir(path, PRIVATE)
        try:
            yield path
        finally:
            _remove_quietly(path)

    def publish_blob(self, tmp_file: str, digest: str) -> None:
        """Rename a complete, verified blob into place (a blob already there wins)."""
        dst = self.blob_path(digest)
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        if os.path.exists(dst):
            os.unlink(tmp_file)
            return
        os.rename(tmp_file, dst)

    def put_blob_bytes(self, data: bytes, digest: str, tmpdir: str) -> None:
        """Store an image document (a config, a manifest) made or read whole: never one
        larger than `read_blob` reads back (a build's 5 MiB config was stored, and then
        the build failed to read it)."""
        if len(data) > schema.MAX_JSON:
            raise UserError(
                f"an image config or manifest of {len(data)} bytes is more than the "
                f"{schema.MAX_JSON} pyunion reads back"
            )
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

    def publish_layer_tree(
        self, tree: str, diff_id: str, size: int, blob: str, media_type: str, whiteouts: str
    ) -> None:
        """Make an already unpacked tree (under tmp/, same filesystem) the layer `diff_id`.

        For a tree that is exactly what the blob `blob` unpacks to, such as a build
        step's upper directory: it is moved, not copied. The caller syncs first.
        """
        layer_tmp = os.path.join(self.root, "tmp", "layer-" + uuid.uuid4().hex)
        os.mkdir(layer_tmp, PRIVATE)
        os.rename(tree, os.path.join(layer_tmp, "diff"))
        write_json_atomic(
            os.path.join(layer_tmp, "layer.json"),
            {
                "diff_id": diff_id,
                "size": size,
                "blob": blob,
                "media_type": media_type,
                "whiteouts": whiteouts,
            },
        )
        self.publish_layer(layer_tmp, diff_id)
        if os.path.isdir(layer_tmp):  # published meanwhile by someone else
            remove_tree(layer_tmp)

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
        self.secure()
        self.cleanup_tmp()
        with self._flock(".lock", fcntl.LOCK_SH):
            yield

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[None]:
        self.secure()
        with self._flock(".lock", fcntl.LOCK_EX):
            yield

    def cleanup_tmp(self) -> None:
        """Remove what interrupted commands left in tmp/, if nobody is using the store."""
        with self._flock(".lock", fcntl.LOCK_EX | fcntl.LOCK_NB) as got:
            if not got:
                return
            tmp = os.path.join(self.root, "tmp")
            try:
                names = os.listdir(tmp)
            except OSError:
                return
            for name in names:
                _remove_quietly(os.path.join(tmp, name))

    # --- the index ----------------------------------------------------------------
    def _read_index(self) -> dict[str, Any]:
        try:
            data = self._read("index.json")
        except FileNotFoundError:
            return {"schemaVersion": 2, "mediaType": MT_INDEX, "manifests": []}
        except OSError as e:
            raise UserError(f"the store's index.json is unreadable: {e.strerror or e}") from e
        return schema.load_object(data, schema.Index, f"the store's index {self.root}/index.json")

    @contextlib.contextmanager
    def edit_index(self) -> Iterator[dict[str, Any]]:
        """Read-modify-write of index.json under its lock; written only if the block succeeds."""
        self.secure()
        with self._flock(".index.lock", fcntl.LOCK_EX):
            idx = self._read_index()
            yield idx
            # Never more than `_read_index` reads back: an import naming one image 20,000
            # times made an index.json no later command could read.
            write_json_atomic(
                os.path.join(self.root, "index.json"),
                idx,
                schema.MAX_JSON,
                "too many images and names in the store: remove some with rmi",
            )

    def add_image(
        self,
        manifest_digest: str,
        size: int,
        tag: str | list[str] | None,
        media_type: str = MT_MANIFEST,
    ) -> None:
        """Record an image (its manifest blob must be in place); a tag moves to it, and so
        does each of a list (`add_images`).

        Every layer it names must be in the store already: an image is never tagged
        that `run` would then find incomplete, whichever command made it. It runs
        under the store's shared lock (`using`), so that no `rmi` can collect what
        it checked before the index names it; a command that publishes blobs or
        layers calls it inside its own `using` block, before they are unnamed."""
        tags = [] if tag is None else [tag] if isinstance(tag, str) else tag
        self.add_images([(manifest_digest, size, tags, media_type)])

    def add_images(self, images: Sequence[tuple[str, int, list[str], str]]) -> None:
        """`add_image` of each (manifest digest, size, tags, media type), in order (a name
        goes to the last image that has it), in one write of the index: one write per
        image and per name made an import of 16,000 images, or of one image under
        20,000 names, rewrite a growing index each time (an hour)."""
        with self.using():
            owner: dict[str, int] = {}  # name -> the last image that takes it
            for i, (digest, _size, tags, _mt) in enumerate(images):
                for diff_id in self._load_image(digest).diff_ids:
                    if not self.has_layer(diff_id):
                        raise UserError(
                            f"image {short_id(digest)}: layer {diff_id} is not in the store "
                            "(the image is not recorded)"
                        )
                for t in tags:
                    owner[normalize_tag(t)] = i
            with self.edit_index() as idx:
                entries = idx["manifests"]
                for e in entries:
                    ann = e.get("annotations") or {}
                    if ann.get(REF_NAME) in owner:
                        del ann[REF_NAME]
                named: list[list[str]] = [[] for _ in images]
                for t, i in owner.items():
                    named[i].append(t)
                for (digest, size, _tags, media_type), names in zip(images, named, strict=True):
                    desc: dict[str, Any] = {"mediaType": media_type, "digest": digest, "size": size}
                    if names:
                        entries += [{**desc, "annotations": {REF_NAME: t}} for t in names]
                    else:  # no name, or each taken by a later image: recorded unnamed
                        entries.append(desc)
                idx["manifests"] = _dedupe(entries)

    def images(self) -> list[Image]:
        """Every image in the store, one per manifest, in index order.

        An image whose manifest or config is missing, damaged or of a shape pyunion
        refuses is left out with a warning (once per command), so that the others stay
        usable; `rmi` still removes it by name or digest, and `gc` keeps its blobs.
        """
        out: dict[str, Image] = {}
        for e in self._read_index()["manifests"]:
            d = e["digest"]
            img = out.get(d)
            if img is None:
                if d in self._damaged:
                    continue
                try:
                    img = self._load_image(d)
                except UserError as err:
                    self._damaged[d] = str(err)
                    _log().warning(
                        "leaving out image %s: %s (pyunion rmi %s removes it)",
                        short_id(d),
                        printable(err),
                        short_id(d),
                    )
                    continue
                out[d] = img
            ref = (e.get("annotations") or {}).get(REF_NAME)
            if ref and ref not in img.tags:
                img.tags.append(ref)
        return list(out.values())

    def _damaged_match(self, ref: str) -> str | None:
        """The manifest digest of a damaged image that `ref` names (tag, digest or prefix)."""
        self.images()
        exact = _exact_names(ref)
        hexpart = ref.split(":", 1)[1] if ref.startswith(("sha256:", "sha512:")) else ref
        found = set()
        for e in self._read_index()["manifests"]:
            d = e["digest"]
            if d not in self._damaged:
                continue
            tag = (e.get("annotations") or {}).get(REF_NAME)
            if tag in exact or (len(hexpart) >= 4 and d.split(":", 1)[1].startswith(hexpart)):
                found.add(d)
        return found.pop() if len(found) == 1 else None

    def _blob_of(self, diff_id: str) -> str | None:
        try:
            return str(self.layer_info(diff_id)["blob"])
        except UserError:
            return None

    def _raw_refs(self, digest: str) -> set[str]:
        """Every digest a damaged image's manifest and config mention: what gc must keep."""
        out = {digest}
        pending = [digest]
        while pending:
            d = pending.pop()
            try:
                data = self._read(os.path.relpath(self.blob_path(d), self.root))
            except (OSError, UserError):
                continue  # missing, too large for JSON (a layer): nothing more to follow
            for m in schema.DIGEST_RE.finditer(data.decode("ascii", "replace")):
                if m.group() not in out:
                    out.add(m.group())
                    pending.append(m.group())
        return out

    def _load_image(self, manifest_digest: str) -> Image:
        m = self.read_json_blob(manifest_digest, schema.Manifest, "manifest")
        cd = m["config"]["digest"]
        config = self.read_json_blob(cd, schema.ImageConfig, "config")
        schema.diff_ids(
            config,
            [ld["digest"] for ld in m["layers"]],
            f"image {manifest_digest} in the store: its manifest",
        )
        return Image(manifest_digest, m, config, cd)

    def image(self, manifest_digest: str) -> Image:
        """The image of a manifest in the store, read alone (without its tags): `lookup`
        reads every image of the store, so a command reporting each of 200 images it
        stored, each with a 4 MiB config, read 40,000 configs."""
        return self._load_image(manifest_digest)

    def lookup(self, ref: str) -> Image:
        """An image by tag (`name`, `name:tag`, `localhost/name`), image ID or manifest
        digest (or a prefix of either), or `name@digest`."""
        return self.find(ref)[0]

    def find(self, ref: str) -> tuple[Image, str | None]:
        """(image, the one tag `ref` names, or None when it names the image itself)."""
        imgs = self.images()
        if not ref:
            raise UserError("empty image name")
        name, at, digest = ref.partition("@")
        if at:
            same = [i for i in imgs if i.digest == digest]
            if same and (not name or any(_same_repo(name, t) for t in same[0].tags)):
                return same[0], None
            raise ImageError(f"no image {ref!r} in the store {self.root}")
        exact = _exact_names(ref)
        canon = reference.docker_canonical(exact[1])  # docker.io/x ~ docker.io/library/x
        for img in imgs:
            for t in img.tags:
                if t in exact or (canon is not None and reference.docker_canonical(t) == canon):
                    return img, t
        # A short name matches a tag that ends with it ("busybox" ~ "docker.io/library/busybox").
        bare = exact[1]
        short = [(i, t) for i in imgs for t in i.tags if t.endswith("/" + bare)]
        if len(short) == 1:
            return short[0]
        if len(short) > 1:
            names = ", ".join(sorted(t for _, t in short))
            raise ImageError(f"{ref!r} is ambiguous: {names}")
        hexpart = ref.split(":", 1)[1] if ref.startswith(("sha256:", "sha512:")) else ref
        if len(hexpart) >= 4 and re.fullmatch(r"[0-9a-f]+", hexpart):
            ids = [
                i
                for i in imgs
                if i.config_digest.split(":", 1)[1].startswith(hexpart)
                or i.digest.split(":", 1)[1].startswith(hexpart)
            ]
            if len(ids) == 1:
                return ids[0], None
            if len(ids) > 1:
                raise ImageError(f"image ID {ref!r} is ambiguous")
        raise ImageError(f"no image {ref!r} in the store {self.root}")

    # --- removal ------------------------------------------------------------------
    def remove(self, ref: str) -> tuple[list[str], list[str]]:
        """Remove a tag (or an image by ID, with all its tags); then what nobody uses.

        Returns (untagged names, deleted digests: manifests, configs and layers).
        """
        with self.exclusive():
            try:
                img, named = self.find(ref)
                target = img.digest
            except UserError:
                damaged = self._damaged_match(ref)
                if damaged is None:
                    raise
                target, named = damaged, None
            untagged: list[str] = []
            with self.edit_index() as idx:
                keep = []
                for e in idx["manifests"]:
                    t = (e.get("annotations") or {}).get(REF_NAME)
                    if e["digest"] != target or (named is not None and t != named):
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
            for d in img.manifest["layers"]:
                live_blobs.add(d["digest"])
            live_layers.update(img.diff_ids)
        indexed = {e["digest"] for e in self._read_index()["manifests"]}
        kept: set[str] = set()  # what images pyunion cannot read might still use
        for d in indexed & set(self._damaged):
            kept |= self._raw_refs(d)
        live_blobs |= kept
        deleted: list[str] = []
        layers_root = os.path.join(self.root, "layers")
        for name in sorted(os.listdir(layers_root)):
            diff_id = ("sha256:" + name) if "-" not in name else name.replace("-", ":", 1)
            if (
                diff_id in live_layers
                or diff_id in kept
                or (kept and self._blob_of(diff_id) in kept)
            ):
                continue
            if self._trash_unless_mounted(os.path.join(layers_root, name)):
                deleted.append(diff_id)
            else:
                _log().warning(
                    "layer %s is in use by a mount (a running container); it is kept until "
                    "a later rmi",
                    diff_id,
                )
        blobs_root = os.path.join(self.root, "blobs")
        for algo in sorted(os.listdir(blobs_root)):
            for hexd in sorted(os.listdir(os.path.join(blobs_root, algo))):
                d = f"{algo}:{hexd}"
                if d not in live_blobs:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(os.path.join(blobs_root, algo, hexd))
                    deleted.append(d)
        return deleted

    def _trash_unless_mounted(self, layer_dir: str) -> bool:
        """Trash a layer directory unless a mount holds its `diff/` (`layers.hold_lower`).

        Its exclusive lock is held until the layer is out of the way, so that a mount
        starting meanwhile either holds it first (and it stays) or finds it gone.
        """
        try:
            fd = os.open(os.path.join(layer_dir, "diff"), DIR_FLAGS)
        except OSError:
            fd = -1  # no diff/ (a half layer): nobody can have mounted it
        try:
            if fd >= 0:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    return False
                except OSError:
                    pass  # flock refused here: nothing can hold it either
            self._trash(layer_dir)
            return True
        finally:
            if fd >= 0:
                os.close(fd)

    def _trash(self, path: str) -> None:
        """Make a directory vanish at once (rename into tmp/), then delete it at leisure."""
        dst = os.path.join(self.root, "tmp", "trash-" + uuid.uuid4().hex)
        try:
            os.rename(path, dst)
        except FileNotFoundError:
            return
        _remove_quietly(dst)


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


def _exact_names(ref: str) -> list[str]:
    """The tags `ref` names exactly: itself, with ":latest", and its `localhost/` alias."""
    bare = ref if ":" in ref.rsplit("/", 1)[-1] else ref + ":latest"
    return [ref, bare, *reference.local_aliases(bare)[1:]]


def _same_repo(name: str, tag: str) -> bool:
    repo = tag.rsplit(":", 1)[0]
    return name in reference.local_aliases(repo) or repo.endswith("/" + name)


def _private(fd: int) -> None:
    """chmod 0700 the directory open at `fd`, if it is looser (or has other bits)."""
    if stat.S_IMODE(os.fstat(fd).st_mode) != PRIVATE:
        os.fchmod(fd, PRIVATE)


def remove_tree(path: str) -> None:
    """Remove a tree of any depth without following a symlink in it (see `tree.rmtree`)."""
    rmtree(path)


def _remove_quietly(path: str) -> None:
    """Remove a tree in tmp/; if that fails, leave it for the next command to retry."""
    try:
        rmtree(path)
    except OSError as e:
        _log().warning(
            "could not remove %s (%s); a later command will retry", printable(path), e.strerror or e
        )
