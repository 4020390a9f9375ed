"""Exporting an image from the store: an OCI image layout (directory or tar) or a
`docker save` archive (the `manifest.json` + `ID/layer.tar` shape that `docker
load`, `skopeo docker-archive:` and podman read).

OCI exports copy the stored blobs byte for byte, so the image keeps its digests.
Docker archives need uncompressed layers; they are decompressed on the way and
checked against their DiffIDs. Tar output is deterministic (fixed times and
owners) and appears under its final name only when complete; a failed export
leaves nothing behind.

The destination may be in a directory another user can write (root exporting
into her home): its parent is opened once (`tree.open_trusted`), and everything
is made relative to that fd and to the fds of the directories made, with
O_NOFOLLOW|O_EXCL, then renamed into place with RENAME_NOREPLACE; a symlink she
swaps in anywhere on the way is never followed.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import tarfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO, Any

from ..errors import UserError
from ..syscalls import RENAME_NOREPLACE, renameat2
from ..tree import DIR_FLAGS, open_trusted, rmtree_at
from .oci import CONTAINERD_NAME, HashingReader, decompressed
from .safetext import ImageError
from .store import MT_INDEX, REF_NAME, Image, Store
from .unpack import CORRUPT

NEW_FILE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


def _tar_add(
    tar: tarfile.TarFile,
    name: str,
    data: bytes | None = None,
    *,
    fileobj: Any = None,
    size: int = 0,
    is_dir: bool = False,
) -> None:
    ti = tarfile.TarInfo(name)
    ti.mtime = 0
    ti.uid = ti.gid = 0
    ti.uname = ti.gname = ""
    if is_dir:
        ti.type, ti.mode = tarfile.DIRTYPE, 0o755
        tar.addfile(ti)
        return
    ti.mode = 0o644
    if data is not None:
        ti.size = len(data)
        tar.addfile(ti, io.BytesIO(data))
    else:
        ti.size = size
        tar.addfile(ti, fileobj)


@dataclass
class _Output:
    """The output being made: a directory fd (`is_dir`) or a file open for writing."""

    fd: int
    file: IO[bytes] | None = None


@contextlib.contextmanager
def _atomic_output(path: str, is_dir: bool) -> Iterator[_Output]:
    """A new directory or file under a temporary name beside `path`, held by fd;
    renamed to `path` on success (never over something there), removed on failure."""
    full = os.path.abspath(path)
    parent, name = os.path.split(full)
    if not name:
        raise UserError(f"{path} already exists")
    try:
        pfd = open_trusted(parent, os.O_RDONLY | os.O_DIRECTORY)
    except NotADirectoryError:
        raise UserError(f"{parent} is not a directory") from None
    except OSError as e:
        raise UserError(f"cannot export to {path}: {e.strerror}") from None
    try:
        with contextlib.suppress(FileNotFoundError):
            os.stat(name, dir_fd=pfd, follow_symlinks=False)
            raise UserError(f"{path} already exists")
        tmp = f".{name}.tmp-{uuid.uuid4().hex[:8]}"
        out: _Output | None = None
        try:
            if is_dir:
                os.mkdir(tmp, 0o755, dir_fd=pfd)
                out = _Output(os.open(tmp, DIR_FLAGS, dir_fd=pfd))
            else:
                fd = os.open(tmp, NEW_FILE, 0o644, dir_fd=pfd)
                out = _Output(fd, os.fdopen(fd, "wb", closefd=False))
            yield out
            if out.file is not None:
                out.file.close()
            try:
                renameat2(pfd, os.fsencode(tmp), pfd, os.fsencode(name), RENAME_NOREPLACE)
            except FileExistsError:
                raise UserError(f"{path} already exists") from None
            except FileNotFoundError:  # someone who can write the directory moved it
                raise UserError(f"cannot export to {path}: the output was moved away") from None
        except BaseException:
            with contextlib.suppress(OSError):
                rmtree_at(pfd, tmp)
            raise
        finally:
            if out is not None:
                if out.file is not None:
                    out.file.close()
                os.close(out.fd)
    finally:
        os.close(pfd)


def _subdir(dfd: int, name: str) -> int:
    """The directory NAME below `dfd` (made if missing), never through a symlink."""
    with contextlib.suppress(FileExistsError):
        os.mkdir(name, 0o755, dir_fd=dfd)
    return os.open(name, DIR_FLAGS, dir_fd=dfd)


def _write_new(dfd: int, name: str, data: bytes | IO[bytes]) -> None:
    """A new file NAME below `dfd` (O_EXCL|O_NOFOLLOW) holding `data`."""
    with os.fdopen(os.open(name, NEW_FILE, 0o644, dir_fd=dfd), "wb") as f:
        if isinstance(data, bytes):
            f.write(data)
        else:
            while chunk := data.read(1 << 20):
                f.write(chunk)


def _names(img: Image, named: str | None) -> tuple[str | None, str | None]:
    """(full name, tag part) to label the exported image with: the tag `ref` named (as
    `Store.find` spells it in full), else the image's first."""
    full = named or (img.tags[0] if img.tags else None)
    if full is None:
        return None, None
    return full, full.rsplit(":", 1)[-1]


def _oci_index(store: Store, img: Image, full: str | None, tag: str | None) -> bytes:
    desc: dict[str, Any] = {
        "mediaType": img.media_type,
        "digest": img.digest,
        "size": store.blob_size(img.digest),
    }
    if full:
        desc["annotations"] = {REF_NAME: tag, CONTAINERD_NAME: full}
    return json.dumps(
        {"schemaVersion": 2, "mediaType": MT_INDEX, "manifests": [desc]}, indent=1
    ).encode()


def _blobs(img: Image) -> list[str]:
    return [img.config_digest] + [d["digest"] for d in img.manifest["layers"]]


def export_oci(store: Store, img: Image, path: str, named: str | None) -> None:
    full, tag = _names(img, named)
    index = _oci_index(store, img, full, tag)
    layout = json.dumps({"imageLayoutVersion": "1.0.0"}).encode()
    digests = [img.digest, *_blobs(img)]
    if path.endswith(".tar"):
        with (
            _atomic_output(path, False) as out,
            tarfile.open(fileobj=out.file, mode="w", format=tarfile.PAX_FORMAT) as tar,
        ):
            _tar_add(tar, "oci-layout", layout)
            _tar_add(tar, "index.json", index)
            _tar_add(tar, "blobs", is_dir=True)
            _tar_add(tar, "blobs/sha256", is_dir=True)
            seen: set[str] = set()
            for d in digests:
                if d in seen:
                    continue
                seen.add(d)
                p = store.blob_path(d)
                with open(p, "rb") as f:
                    _tar_add(
                        tar,
                        "blobs/" + d.replace(":", "/"),
                        fileobj=f,
                        size=os.fstat(f.fileno()).st_size,
                    )
        return
    with _atomic_output(path, True) as out:
        for name, data in (("oci-layout", layout), ("index.json", index)):
            _write_new(out.fd, name, data)
        blobs = _subdir(out.fd, "blobs")
        try:
            for d in digests:
                algo, hexd = d.split(":", 1)
                afd = _subdir(blobs, algo)
                try:
                    try:
                        # Blobs are immutable: share them.
                        os.link(store.blob_path(d), hexd, dst_dir_fd=afd, follow_symlinks=False)
                    except FileExistsError:
                        continue
                    except OSError as e:
                        if e.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK):
                            raise
                        with open(store.blob_path(d), "rb") as s:
                            _write_new(afd, hexd, s)
                finally:
                    os.close(afd)
        finally:
            os.close(blobs)


def export_docker(store: Store, img: Image, path: str, named: str | None) -> None:
    full, _tag = _names(img, named)
    repo_tags = [full] if full else []
    cfg_hex = img.config_digest.split(":", 1)[1]
    layer_names = []
    with (
        _atomic_output(path, False) as out,
        tarfile.open(fileobj=out.file, mode="w", format=tarfile.PAX_FORMAT) as tar,
    ):
        _tar_add(tar, f"{cfg_hex}.json", store.read_blob(img.config_digest))
        seen: set[str] = set()
        for desc, diff_id in zip(img.manifest["layers"], img.diff_ids, strict=True):
            hexd = diff_id.split(":", 1)[1]
            name = f"{hexd}/layer.tar"
            layer_names.append(name)
            if hexd in seen:
                continue
            seen.add(hexd)
            size = store.layer_info(diff_id)["size"]
            _tar_add(tar, f"{hexd}", is_dir=True)
            with open(store.blob_path(desc["digest"]), "rb") as f:
                raw, _comp = decompressed(f)
                h = HashingReader(raw)
                try:
                    _tar_add(tar, name, fileobj=h, size=size)
                    if h.read(1) or h.digest() != diff_id:
                        raise ImageError(f"layer {diff_id} in the store does not match its DiffID")
                except (OSError, *CORRUPT) as e:
                    raise ImageError(f"layer {diff_id} in the store is damaged: {e}") from e
        manifest = [{"Config": f"{cfg_hex}.json", "RepoTags": repo_tags, "Layers": layer_names}]
        _tar_add(tar, "manifest.json", json.dumps(manifest).encode())
        if full:
            name, _, tag = full.rpartition(":")
            top = layer_names[-1].split("/")[0] if layer_names else cfg_hex
            _tar_add(tar, "repositories", json.dumps({name: {tag: top}}).encode())


def export_image(store: Store, ref: str, path: str, fmt: str = "oci") -> Image:
    img, named = store.find(ref)
    if fmt == "oci":
        export_oci(store, img, path, named)
    elif fmt == "docker":
        export_docker(store, img, path, named)
    else:
        raise UserError(f"unknown export format {fmt!r} (oci or docker)")
    return img
