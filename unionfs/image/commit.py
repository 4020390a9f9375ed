"""Committing an upper directory as a new OCI layer on top of its image.

The upper is read in the overlay formats pyunion and the kernel write, and the
tar is written in the OCI format:
- char device 0/0 NAME (kernel whiteout), or a zero-size file marked
  trusted.overlay.whiteout in an `x` directory (xwhiteout) -> empty file `.wh.NAME`;
  a `.wh.NAME` file already there (pyunion's fallback without root) stays as it is;
- an opaque directory (trusted/user.overlay.opaque or user.fuseoverlayfs.opaque =
  y, or a `.wh..wh..opq` file or `.wh..opq` char 0/0 in it) -> `DIR/.wh..wh..opq`,
  written right after DIR and before any of its children;
- internal xattrs (trusted.overlay.*, user.overlay.*, user.fuseoverlayfs.*) are
  dropped, the others go in PAX `SCHILY.xattr.*` records;
- the names of a multiply-linked file become one file and tar hard links to it;
- a sparse file (one whose holes add up to 1 MiB or more: a `lastlog` after
  `useradd -u 2000000000`, a `truncate -s 1T`) is a PAX 1.0 sparse member, its
  holes left out as GNU tar writes them and as tarfile, Go's archive/tar and
  pyunion's own unpacker read them (before: written as zeros, 2 GiB of
  them in 27 s, and then refused by the import's bound on expansion);
- a file is written with the size it had when opened: one that shrinks
  meanwhile is padded with zeros, never a truncated tar.
Entries are written in byte order of their names, with numeric owners only and
no user/group names, so the same tree gives the same tar; `timestamp` clamps every
mtime for reproducible layers. A directory the kernel marked with
trusted.overlay.redirect or a file with trusted.overlay.metacopy has its content
in a lower layer; committing those is refused rather than silently wrong.
"""

from __future__ import annotations

import copy
import errno
import gzip
import hashlib
import io
import logging
import os
import stat
import tarfile
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, BinaryIO

import zstandard

from ..compression import Prefixed
from ..errors import UserError
from ..syscalls import fdpath
from ..tarsafe import forget_members
from ..tree import DIR_FLAGS, DirCursor, NotRegularFile, open_regular, open_trusted
from ..whiteout import (
    AUFS_META_PREFIX,
    OPQ_CHAR,
    OPQ_OCI,
    WH_PREFIX,
    dir_flags,
    is_internal_xattr,
    is_whiteout_stat,
    is_xwhiteout,
)
from .load import MEDIA_BY_COMPRESSION, store_layer_stream
from .safetext import ImageError, printable
from .store import (
    DOCKER_CONFIG,
    DOCKER_LAYER,
    DOCKER_LAYER_GZIP,
    MT_CONFIG,
    MT_LAYER_GZIP,
    MT_MANIFEST,
    Image,
    Store,
    canonical_json,
    digest_of,
    normalize_tag,
)

log = logging.getLogger(__name__)
MAX_TIMESTAMP = 253402300799  # 9999-12-31T23:59:59Z, the last time an OCI "created" can say
_REFUSE_XATTRS = (
    b"trusted.overlay.redirect",
    b"trusted.overlay.metacopy",
    b"user.overlay.redirect",
    b"user.overlay.metacopy",
)
# Docker media types and their OCI equivalents (the same blobs): for manifests written as OCI.
DOCKER_TO_OCI = {
    DOCKER_LAYER_GZIP: MT_LAYER_GZIP,
    DOCKER_LAYER: MEDIA_BY_COMPRESSION["none"],
    DOCKER_CONFIG: MT_CONFIG,
}


SPARSE_MIN_HOLES = 1 << 20  # holes that save less than this: the file is written whole

# The longest path a layer's entry may have: PATH_MAX less its NUL. Tools that extract by
# path (docker's and containerd's unpackers, tar without its chdir mode) cannot make a
# longer one, and a tar names every entry by its whole path, so a tree's tar grows with
# the square of its depth: a container's `mkdir` loop 20,000 deep cost a commit 46 s and
# 2.9 GB before the import refused the 800 MB of names it made. Refused at the first
# entry past it (`walk_error` says so), so no walk goes deeper than about 2,048 levels.
LAYER_PATH_MAX = 4095


def walk_error(upper: str, where: str | bytes, e: OSError) -> ImageError:
    """The one line for an upper that cannot become a layer: `where` is the entry."""
    text = printable(os.fsdecode(where))
    if e.errno == errno.ENAMETOOLONG:
        return ImageError(
            f"cannot commit {upper}: {text[:80]}...: a path longer than {LAYER_PATH_MAX} "
            "bytes (PATH_MAX) has no place in a layer"
        )
    if e.errno in (errno.ENOENT, errno.ENOTDIR, errno.ESTALE):
        return ImageError(
            f"{upper} changed while it was committed ({text} went away): stop what "
            "writes to it (unmount it) and commit again"
        )
    return ImageError(f"cannot commit {upper}: {text}: {e.strerror or e}")


def data_regions(fd: int, size: int) -> list[tuple[int, int]]:
    """The (offset, length) data regions of the first `size` bytes of the file `fd`, by
    SEEK_DATA/SEEK_HOLE (one region for all of it where the filesystem cannot say)."""
    regions: list[tuple[int, int]] = []
    off = 0
    while off < size:
        try:
            start = os.lseek(fd, off, os.SEEK_DATA)
        except OSError as e:
            if e.errno == errno.ENXIO:
                break  # a hole from here to the end
            if e.errno == errno.EINVAL:
                return [(0, size)]
            raise
        if start >= size:
            break
        end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
        regions.append((start, end - start))
        off = end
    return regions


class MemberData(io.RawIOBase):
    """A member's exact bytes: each (offset, length) region of the file `fd`, read with
    pread; zeros where the file has shrunk since it was measured, so that the member
    holds what its header says (a sparse member's map goes in front: `compression.Prefixed`)."""

    def __init__(self, fd: int, regions: list[tuple[int, int]]) -> None:
        self.fd = fd
        self.todo = list(reversed(regions))

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        while self.todo and self.todo[-1][1] == 0:
            self.todo.pop()
        if not self.todo:
            return 0
        off, left = self.todo[-1]
        want = min(len(b), left, 1 << 20)
        data = os.pread(self.fd, want, off) or bytes(want)  # shrunk: zeros
        n = len(data)
        b[:n] = data
        self.todo[-1] = (off + n, left - n)
        return n


def _reader(raw: io.RawIOBase) -> io.BufferedReader:
    """Reads of the exact length asked (tarfile takes a short read for the end of data)."""
    return io.BufferedReader(raw, 1 << 16)


def sparse_map(regions: list[tuple[int, int]], size: int) -> bytes:
    """The PAX 1.0 sparse map GNU tar puts before the data: the number of regions, then
    each one's offset and length, one per line, padded to a 512-byte block; a file that
    ends in a hole ends with an empty region at its size, as GNU tar writes it."""
    if not regions or sum(regions[-1]) < size:
        regions = [*regions, (size, 0)]
    text = f"{len(regions)}\n" + "".join(f"{o}\n{n}\n" for o, n in regions)
    raw = text.encode()
    return raw + bytes(-len(raw) % tarfile.BLOCKSIZE)


class HashingWriter(io.RawIOBase):
    """Writes through to `dst`, hashing and counting on the way."""

    def __init__(self, dst: BinaryIO | Any) -> None:
        self.dst = dst
        self.h = hashlib.sha256()
        self.count = 0

    def writable(self) -> bool:
        return True

    def write(self, b: Any) -> int:
        data = bytes(b)
        self.h.update(data)
        self.count += len(data)
        self.dst.write(data)
        return len(data)

    def digest(self) -> str:
        return "sha256:" + self.h.hexdigest()


@dataclass
class _Level:
    """A directory being written: where it is, its tar prefix, the names still to write."""

    parts: list[str]
    prefix: str
    names: list[str]
    xwh: bool


@dataclass
class _Walker:
    """Writes a tree as tar entries in name order, iteratively (any depth, two fds)."""

    tar: tarfile.TarFile
    timestamp: int | None
    links: dict[tuple[int, int], str] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)
    sparse_count: int = 0
    current: str = "."  # the entry being written, for an error's message

    def _info(self, name: str, st: os.stat_result, kind: bytes) -> tarfile.TarInfo:
        ti = tarfile.TarInfo(name)
        ti.type = kind
        ti.mode = stat.S_IMODE(st.st_mode)
        ti.uid, ti.gid = st.st_uid, st.st_gid
        ti.uname = ti.gname = ""
        mt = int(st.st_mtime)
        ti.mtime = mt if self.timestamp is None else min(mt, self.timestamp)
        return ti

    def _xattrs(self, target: int | bytes, follow: bool, name: str) -> dict[str, str]:
        try:
            names = os.listxattr(target, follow_symlinks=follow)
        except OSError:
            return {}
        out = {}
        for n in sorted(names):
            bn = os.fsencode(n)
            if bn in _REFUSE_XATTRS:
                raise ImageError(
                    f"cannot commit {name!r}: it has {n} (its content is in a "
                    "lower layer; mount without redirect_dir/metacopy)"
                )
            if is_internal_xattr(bn):
                continue
            try:
                v = os.getxattr(target, n, follow_symlinks=follow)
            except OSError:
                continue
            out["SCHILY.xattr." + n] = v.decode("utf-8", "surrogateescape")
        return out

    def _whiteout(self, prefix: str, name: str, st: os.stat_result) -> None:
        ti = self._info(prefix + WH_PREFIX.decode() + name, st, tarfile.REGTYPE)
        ti.mode = 0o644 if stat.S_ISCHR(st.st_mode) else ti.mode
        ti.size = 0
        self.tar.addfile(ti)

    def _open_level(self, dfd: int, parts: list[str], prefix: str) -> _Level:
        """Start a directory (its own entry already written): its opaque marker comes first."""
        opaque, xwh = dir_flags(dfd)
        if opaque:
            ti = self._info(prefix + OPQ_OCI.decode(), os.fstat(dfd), tarfile.REGTYPE)
            ti.mode, ti.size = 0o644, 0
            self.tar.addfile(ti)
        names = sorted(os.listdir(dfd), key=os.fsencode, reverse=True)  # popped from the end
        return _Level(parts, prefix, names, xwh)

    def walk(self, root_fd: int) -> None:
        """Write the entries below the directory open at `root_fd`, parents first."""
        cur = DirCursor(root_fd)
        try:
            stack = [self._open_level(root_fd, [], "")]
            while stack:
                level = stack[-1]
                if not level.names:
                    stack.pop()
                    continue
                name = level.names.pop()
                self.current = level.prefix + name
                dfd = cur.goto(level.parts)
                sub = self._one(dfd, level, name)
                forget_members(self.tar)  # 136 MB for a container's 300,000 files
                if sub is not None:
                    stack.append(self._open_level(cur.goto(sub.parts), sub.parts, sub.prefix))
        finally:
            cur.close()

    def _file(self, fd: int, path: str) -> None:
        """A regular file's member: a PAX 1.0 sparse one if its holes are worth it."""
        fst = os.fstat(fd)
        size = fst.st_size
        ti = self._info(path, fst, tarfile.REGTYPE)
        ti.pax_headers = self._xattrs(fd, True, path)
        regions = [(0, size)]
        if fst.st_blocks * 512 <= size - SPARSE_MIN_HOLES:  # maybe sparse: ask where data is
            regions = data_regions(fd, size)
        if size - sum(n for _, n in regions) < SPARSE_MIN_HOLES:
            ti.size = size
            self.tar.addfile(ti, _reader(MemberData(fd, [(0, size)])))
            return
        head = sparse_map(regions, size)
        # The ustar name is a stand-in (what a reader without sparse support extracts);
        # GNU.sparse.name is the file's. Short and ASCII, so tarfile adds no `path`.
        self.sparse_count += 1
        ti.name = f"GNUSparseFile.0/{self.sparse_count}"
        ti.size = len(head) + sum(n for _, n in regions)
        ti.pax_headers = {
            **ti.pax_headers,
            "GNU.sparse.major": "1",
            "GNU.sparse.minor": "0",
            "GNU.sparse.name": path,
            "GNU.sparse.realsize": str(size),
        }
        self.tar.addfile(ti, _reader(Prefixed(head, MemberData(fd, regions))))

    def _one(self, dfd: int, level: _Level, name: str) -> _Level | None:
        """Write one entry of `level`; a directory's level to descend into, if it is one."""
        bname = os.fsencode(name)
        prefix = level.prefix
        if len(os.fsencode(prefix + name)) > LAYER_PATH_MAX:
            raise OSError(errno.ENAMETOOLONG, os.strerror(errno.ENAMETOOLONG))
        st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
        if bname in (OPQ_OCI, OPQ_CHAR) or bname.startswith(AUFS_META_PREFIX):
            return None  # the opaque marker was written with the directory
        if bname.startswith(WH_PREFIX):
            if stat.S_ISREG(st.st_mode) or is_whiteout_stat(st):
                ti = self._info(prefix + name, st, tarfile.REGTYPE)
                ti.size = 0
                self.tar.addfile(ti)
            return None
        if is_whiteout_stat(st) or (level.xwh and is_xwhiteout(dfd, bname, st)):
            self._whiteout(prefix, name, st)
            return None
        path = prefix + name
        mode = st.st_mode
        if stat.S_ISDIR(mode):
            fd = os.open(name, DIR_FLAGS, dir_fd=dfd)
            try:
                ti = self._info(path, st, tarfile.DIRTYPE)
                ti.pax_headers = self._xattrs(fd, True, path)
                self.tar.addfile(ti)
            finally:
                os.close(fd)
            return _Level([*level.parts, name], path + "/", [], False)
        if stat.S_ISREG(mode):
            key = (st.st_dev, st.st_ino)
            if st.st_nlink > 1 and key in self.links:
                ti = self._info(path, st, tarfile.LNKTYPE)
                ti.linkname = self.links[key]
                self.tar.addfile(ti)
                return None
            try:
                fd = open_regular(dfd, name)
            except NotRegularFile:  # swapped since the stat: skipped, never opened
                self.skipped.append(path)
                return None
            try:
                self._file(fd, path)
            finally:
                os.close(fd)
            if st.st_nlink > 1:
                self.links[key] = path
            return None
        proc = fdpath(dfd, os.fsencode(name))
        if stat.S_ISLNK(mode):
            ti = self._info(path, st, tarfile.SYMTYPE)
            ti.linkname = os.readlink(name, dir_fd=dfd)
        elif stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
            ti = self._info(path, st, tarfile.CHRTYPE if stat.S_ISCHR(mode) else tarfile.BLKTYPE)
            ti.devmajor, ti.devminor = os.major(st.st_rdev), os.minor(st.st_rdev)
        elif stat.S_ISFIFO(mode):
            ti = self._info(path, st, tarfile.FIFOTYPE)
        else:
            self.skipped.append(path)  # sockets have no tar form
            return None
        ti.pax_headers = self._xattrs(proc, False, path)
        self.tar.addfile(ti)
        return None


def write_layer_tar(upper: str, out: BinaryIO | Any, timestamp: int | None = None) -> list[str]:
    """Write the upper directory as an OCI layer tar to `out`; returns skipped paths."""
    # Root commits an upper that may lie below another user's directory (a kept upper in
    # her home): a symlink she swaps in on the way must not lead the walk to root's files.
    try:
        root = open_trusted(upper, os.O_RDONLY | os.O_DIRECTORY)
    except OSError as e:
        raise ImageError(f"cannot open upper directory {upper}: {e.strerror}") from None
    w: _Walker | None = None
    try:
        with tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT) as tar:
            w = _Walker(tar, timestamp)
            w.walk(root)
        return w.skipped
    except OSError as e:
        raise walk_error(upper, w.current if w is not None else ".", e) from None
    finally:
        os.close(root)


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@dataclass
class Changes:
    """Config changes to apply with the commit (None: keep the base image's)."""

    message: str | None = None
    author: str | None = None
    cmd: list[str] | None = None
    entrypoint: list[str] | None = None
    env: list[str] = field(default_factory=list)
    workdir: str | None = None
    user: str | None = None


def new_config(
    base: dict[str, Any], diff_id: str, changes: Changes, created: str
) -> dict[str, Any]:
    cfg = copy.deepcopy(base)
    cfg["created"] = created
    if changes.author is not None:
        cfg["author"] = changes.author
    cfg["rootfs"] = {
        "type": "layers",
        "diff_ids": [*list((base.get("rootfs") or {}).get("diff_ids", [])), diff_id],
    }
    run = cfg.setdefault("config", {}) or {}
    cfg["config"] = run
    if changes.cmd is not None:
        run["Cmd"] = changes.cmd
    if changes.entrypoint is not None:
        run["Entrypoint"] = changes.entrypoint
    if changes.workdir is not None:
        run["WorkingDir"] = changes.workdir
    if changes.user is not None:
        run["User"] = changes.user
    if changes.env:
        env = list(run.get("Env") or [])
        for kv in changes.env:
            key = kv.split("=", 1)[0]
            env = [e for e in env if e.split("=", 1)[0] != key] + [kv]
        run["Env"] = env
    hist: dict[str, Any] = {"created": created, "created_by": changes.message or "pyunion commit"}
    if changes.author is not None:
        hist["author"] = changes.author
    cfg["history"] = [*list(base.get("history") or []), hist]
    for k in ("container", "container_config"):
        cfg.pop(k, None)
    return cfg


def commit(
    store: Store,
    upper: str,
    base_ref: str,
    tag: str | None = None,
    changes: Changes | None = None,
    compression: str = "gzip",
    timestamp: int | None = None,
) -> tuple[str, Image]:
    """Commit `upper` as a new layer on the image `base_ref`; returns (manifest digest, base)."""
    changes = changes or Changes()
    if compression not in MEDIA_BY_COMPRESSION:
        raise UserError(f"unknown compression {compression!r} (none, gzip or zstd)")
    if not os.path.isdir(upper):
        raise UserError(f"{upper} is not a directory")
    if tag is not None:
        tag = normalize_tag(tag)
    if timestamp is not None and not 0 <= timestamp <= MAX_TIMESTAMP:
        raise UserError(f"--timestamp {timestamp}: out of range (0 to {MAX_TIMESTAMP})")
    base = store.lookup(base_ref)
    with store.using(), store.tempdir() as tmp:
        tar_path = os.path.join(tmp, "layer.tar")
        with open(tar_path, "wb") as f:
            if compression == "gzip":
                with gzip.GzipFile(
                    filename="", mode="wb", fileobj=f, mtime=0, compresslevel=6
                ) as z:
                    skipped = write_layer_tar(upper, z, timestamp)
            elif compression == "zstd":
                with zstandard.ZstdCompressor(level=3).stream_writer(f, closefd=False) as z:
                    skipped = write_layer_tar(upper, z, timestamp)
            else:
                skipped = write_layer_tar(upper, f, timestamp)
        for p in skipped:
            log.warning("not committed (no tar form): %s", printable(p))
        with open(tar_path, "rb") as f:
            info = store_layer_stream(store, tmp, f, None, None, "new layer")
        store.sync()
        info["publish"]()
        created = (
            _now()
            if timestamp is None
            else datetime.fromtimestamp(timestamp, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        )
        cfg = new_config(base.config, info["diff_id"], changes, created)
        cbytes = canonical_json(cfg)
        cdigest = digest_of(cbytes)
        store.put_blob_bytes(cbytes, cdigest, tmp)
        layers = []
        for d in base.manifest.get("layers", []):
            d = dict(d)
            d["mediaType"] = DOCKER_TO_OCI.get(d.get("mediaType", ""), d.get("mediaType"))
            layers.append(d)
        layers.append(
            {
                "mediaType": MEDIA_BY_COMPRESSION[compression],
                "digest": info["digest"],
                "size": info["compressed_size"],
            }
        )
        man = {
            "schemaVersion": 2,
            "mediaType": MT_MANIFEST,
            "config": {"mediaType": MT_CONFIG, "digest": cdigest, "size": len(cbytes)},
            "layers": layers,
        }
        mbytes = canonical_json(man)
        mdigest = digest_of(mbytes)
        store.put_blob_bytes(mbytes, mdigest, tmp)
        # Named while the store is held: an rmi waiting for it would collect the new,
        # still unnamed layer and blobs the moment it is let go.
        store.add_image(mdigest, len(mbytes), tag, MT_MANIFEST)
    return mdigest, base
