"""Unpacking a layer tar into a directory, safe against hostile archives.

Every name is resolved component by component from the layer root with
O_NOFOLLOW|O_DIRECTORY (a `tree.DirCursor`, so a walk in tar order costs the
same at any depth), and every file is created with *at calls relative to its
parent's fd, so nothing is ever written outside the layer: `..` and absolute
names are refused, a symlink met as a parent is refused (never followed), hard
links must point inside the tree. Device nodes are made only as root (skipped
with a warning otherwise); ownership is applied only as root. Header values
that no filesystem can hold (a NUL in a name, an mtime of 1e30 or NaN, a
negative or 2**40 uid, a member larger than its whole uncompressed blob) are
refused in one line.

A later entry replaces an earlier one of the same name, as containerd applies
layers: a directory over a directory merges with it; anything else first
removes what is there (a directory with its whole tree, without following a
symlink in it) and then takes its place. Hard links link to the entry their
target names at their point in the stream. Because containerd applies a layer
over the layers below, a non-directory entry deletes the lower directory of
that name, so a directory made again at that path in the same layer starts
empty: it is made opaque. A marker (`.wh.NAME`, `.wh..wh..opq`) whose directory
is replaced later in the stream is dropped with it.

Whiteouts: as root the OCI markers become the kernel's format (`.wh.NAME` -> char
device 0/0 NAME, `DIR/.wh..wh..opq` -> xattr trusted.overlay.opaque=y on DIR), so
the store's layer directories also mount under kernel overlayfs. As root of a
user namespace (an ordinary user's store, see userns.py) whiteouts are char 0/0
all the same (Linux 5.8+ lets anyone make one) and opaque directories get
user.overlay.opaque=y, the format of kernel overlayfs mounted in a user namespace
(`-o userxattr`). Without either (no namespace, or a filesystem that refuses
them) the `.wh.` files are kept as they are: pyunion and fuse-overlayfs read that
format in lower layers, the kernel does not.

Owners are applied as root, the root of a user namespace included: there an
owner the namespace does not map, or a device node (which only the host's root
may make), is an error that says so and what to do, rather than a layer with
wrong owners or missing files.
An OCI whiteout hides only the layers below, so a `.wh.NAME` next to a NAME of
the same layer leaves NAME alone (a directory NAME becomes opaque instead). The
markers are applied after the whole tar is read, whatever their order in it.
Internal overlay xattrs in the tar (trusted.overlay.* and friends, which could
redirect the kernel's lookups) are dropped.
"""

from __future__ import annotations

import contextlib
import errno
import gzip
import logging
import math
import os
import shutil
import stat
import tarfile
import zlib
from typing import IO, Any

import zstandard

from .. import sparse, userns
from ..syscalls import fdpath
from ..tarsafe import forget_members, open_tar
from ..tree import DIR_FLAGS, DirCursor, rmtree_at
from ..whiteout import AUFS_META_PREFIX, OPQ_OCI, WH_PREFIX, WhiteoutWriter, is_internal_xattr
from .safetext import ImageError

log = logging.getLogger(__name__)

# The markers' names (whiteout.py) as tar member names, which are str.
WH, OPQ, AUFS_META = (os.fsdecode(n) for n in (WH_PREFIX, OPQ_OCI, AUFS_META_PREFIX))
MAX_ID = 2**32 - 2  # (uid_t)-1 means "no change" to chown
MAX_TIME = 2**63 // 10**9  # an mtime in nanoseconds must fit in 64 bits
_PARENT_ERRNOS = (errno.ELOOP, errno.ENOTDIR)
_GONE_ERRNOS = (errno.ENOENT, errno.ELOOP, errno.ENOTDIR)

Ident = tuple[int, int]


class UnpackError(ImageError):
    """The archive is corrupt or tries to write outside its directory."""


def split_name(name: str, what: str = "entry", error: type[ImageError] = UnpackError) -> list[str]:
    """Path components of a name from an image (a tar member, a file of a layout);
    refuses absolute names, `..` and NUL with `error`."""
    if "\x00" in name:
        raise error(f"refusing {what} {name!r}: a NUL in its name")
    if name.startswith("/"):
        raise error(f"refusing {what} with an absolute path: {name!r}")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise error(f"refusing {what} with '..' in its path: {name!r}")
    return parts


def _ident(st: os.stat_result) -> Ident:
    return st.st_dev, st.st_ino


def _lstat(name: str, dirfd: int) -> os.stat_result | None:
    try:
        return os.stat(name, dir_fd=dirfd, follow_symlinks=False)
    except FileNotFoundError:
        return None


class Unpacker:
    """Extracts one layer tar into the directory open at `root_fd`.

    `max_member`: no member may be larger (the size of an uncompressed blob).
    """

    def __init__(
        self, root_fd: int, kernel_format: bool | None = None, max_member: int | None = None
    ) -> None:
        self.root_fd = root_fd
        self.as_root = os.geteuid() == 0
        # The layer is in one format: the kernel's where allowed (as root; as root of a user
        # namespace with user.overlay.opaque), else OCI markers (mode 0600, no user xattr),
        # for whiteouts and opaque dirs together.
        self.whiteouts = WhiteoutWriter(
            kernel=self.as_root if kernel_format is None else kernel_format,
            marker_mode=0o600,
            user_opaque_xattr=False,
            together=True,
            userxattr=True,
        )
        self.max_member = max_member
        self._cur = DirCursor(root_fd)  # where entries are made
        self._aux = DirCursor(root_fd)  # hard link targets
        self._root_ident = _ident(os.fstat(root_fd))
        # What to apply after the last member, each with the identity of the directory it
        # was meant for: a directory replaced meanwhile no longer matches and is skipped.
        self._dirs: dict[tuple[str, ...], tuple[tarfile.TarInfo, Ident]] = {}
        self._whiteouts: list[tuple[list[str], Ident]] = []
        self._opaques: list[tuple[list[str], Ident]] = []
        self._warned: set[str] = set()

    def close(self) -> None:
        self._cur.close()
        self._aux.close()

    # --- walking ---------------------------------------------------------------
    def _goto(
        self, cursor: DirCursor, parts: list[str], name: str, create: bool, what: str = ""
    ) -> int:
        """The directory `parts`, missing ones made if `create`; a symlink or a
        non-directory on the way is an UnpackError that says which it is."""
        try:
            return cursor.goto(parts, mkdir=0o755 if create else None)
        except OSError as e:
            if e.errno not in _PARENT_ERRNOS:
                raise
            bad = "/".join(parts[: len(cursor.parts) + 1])
            kind = "a symlink" if e.errno == errno.ELOOP else "not a directory"
            raise UnpackError(
                f"refusing {name!r}: {what}{bad!r} is {kind} (nothing is written through it)"
            ) from None

    def _clear(self, pfd: int, name: str, st: os.stat_result) -> None:
        """Remove what an entry replaces (a directory with its tree, never following)."""
        if stat.S_ISDIR(st.st_mode):
            self._aux.reset()  # it might stand inside the tree about to go
            rmtree_at(pfd, name)
        else:
            os.unlink(name, dir_fd=pfd)

    # --- extraction -------------------------------------------------------------
    def extract(self, tf: tarfile.TarFile) -> None:
        """Extract every member (streaming), then markers and directory metadata."""
        for m in tf:
            self._member(tf, m)
            forget_members(tf)  # hard links are found by name (`_hardlink`), not in tarfile
        self._finish()

    def _member(self, tf: tarfile.TarFile, m: tarfile.TarInfo) -> None:
        self._check_header(m)
        parts = split_name(m.name)
        if not parts:
            if m.isdir():
                self._dirs[()] = (m, self._root_ident)
            return
        if parts[-1].startswith(WH):
            self._marker(parts, m)
            return
        pfd = self._goto(self._cur, parts[:-1], m.name, create=True, what="its parent ")
        try:
            self._create(tf, pfd, parts, m)
        except UnpackError:
            raise
        except OSError as e:
            raise UnpackError(f"cannot unpack {m.name!r}: {e.strerror or e}") from e

    def _check_header(self, m: tarfile.TarInfo) -> None:
        """Refuse header values no filesystem can hold, before anything is made of them."""

        def bad(why: str) -> UnpackError:
            return UnpackError(f"refusing {m.name!r}: {why}")

        if "\x00" in m.name or "\x00" in m.linkname:
            raise bad("a NUL in its name or link target")
        mtime = float(m.mtime)
        if not math.isfinite(mtime) or abs(mtime) >= MAX_TIME:
            raise bad(f"its mtime {m.mtime!r} is out of range")
        for what, v in (("uid", m.uid), ("gid", m.gid)):
            if not 0 <= v <= MAX_ID:
                raise bad(f"its {what} {v} is out of range")
        try:
            stored = sparse.stored_size(m, sparse.data_regions(m))
        except sparse.SparseError as e:
            raise bad(str(e)) from None
        if m.size < 0 or (self.max_member is not None and stored > self.max_member):
            raise bad(f"its header declares {stored} bytes, more than the layer holds")
        if (m.ischr() or m.isblk()) and not (0 <= m.devmajor < 2**32 and 0 <= m.devminor < 2**32):
            raise bad("its device number is out of range")
        for k in m.pax_headers or {}:
            if k.startswith("SCHILY.xattr.") and ("\x00" in k or len(k) > 13 + 255):
                raise bad(f"invalid xattr name {k[13:]!r}")

    def _marker(self, parts: list[str], m: tarfile.TarInfo) -> None:
        base = parts[-1]
        if base.startswith(AUFS_META) and base != OPQ:
            return  # AUFS metadata (.wh..wh.plnk etc.): never part of the tree
        target = base[len(WH) :]
        if base != OPQ and target in ("", ".", ".."):
            raise UnpackError(f"refusing whiteout {m.name!r}: it names no entry")
        self._goto(self._cur, parts[:-1], m.name, create=True, what="its directory ")
        if base == OPQ:
            self._opaques.append((parts[:-1], self._cur.ident()))
        else:
            self._whiteouts.append(([*parts[:-1], target], self._cur.ident()))

    def _create(self, tf: tarfile.TarFile, pfd: int, parts: list[str], m: tarfile.TarInfo) -> None:
        name = parts[-1]
        if m.islnk():
            self._hardlink(pfd, parts, m)
            return
        old = _lstat(name, pfd)
        if m.isdir():
            if old is not None and stat.S_ISDIR(old.st_mode):
                ident = _ident(old)  # a directory again: merged, its metadata the later one
            else:
                if old is not None:
                    self._clear(pfd, name, old)
                os.mkdir(name, 0o700, dir_fd=pfd)
                ident = _ident(os.stat(name, dir_fd=pfd, follow_symlinks=False))
                if old is not None:  # the earlier entry deleted the directory below
                    self._opaques.append((parts, ident))
            self._dirs[tuple(parts)] = (m, ident)
            return
        if old is not None:
            self._clear(pfd, name, old)
        if m.isreg():
            fd = os.open(
                name,
                os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                0o600,
                dir_fd=pfd,
            )
            try:
                self._write_data(tf, m, fd)
                self._meta_fd(fd, m)
            finally:
                os.close(fd)
            return
        if m.issym():
            os.symlink(m.linkname, name, dir_fd=pfd)
        elif m.ischr() or m.isblk():
            if not self.as_root:
                self._warn("dev", f"skipping device node {m.name!r}: needs root")
                return
            kind = stat.S_IFCHR if m.ischr() else stat.S_IFBLK
            try:
                os.mknod(name, kind | 0o600, os.makedev(m.devmajor, m.devminor), dir_fd=pfd)
            except PermissionError:
                if not userns.in_user_namespace():
                    raise
                raise UnpackError(
                    f"refusing device node {m.name!r} ({m.devmajor}:{m.devminor}): only the "
                    "host's root can make device nodes, not an ordinary user (not even in a "
                    "user namespace); import the image as root, or without its device nodes"
                ) from None
        elif m.isfifo():
            os.mkfifo(name, 0o600, dir_fd=pfd)
        else:
            self._warn(
                "type" + str(m.type), f"skipping {m.name!r}: unsupported tar type {m.type!r}"
            )
            return
        self._meta_at(pfd, name, m, symlink=m.issym())

    def _write_data(self, tf: tarfile.TarFile, m: tarfile.TarInfo, fd: int) -> None:
        """A regular member's bytes; a sparse member's holes stay holes (`sparse.py`), so
        a tiny archive cannot fill the disk with zeros it never held."""
        regions = sparse.data_regions(m)  # checked in _check_header
        if regions is None:
            src = tf.extractfile(m)
            if src is not None:
                with os.fdopen(fd, "wb", closefd=False) as out:
                    shutil.copyfileobj(src, out, 1 << 20)
            return
        try:
            sparse.write_regions(sparse.open_data(tf, m, regions), fd, regions, m.size)
        except (sparse.SparseError, EOFError) as e:
            raise UnpackError(f"refusing {m.name!r}: {e}") from None

    def _hardlink(self, pfd: int, parts: list[str], m: tarfile.TarInfo) -> None:
        """Link to what the target names now (a later entry of that name does not change it)."""
        tparts = split_name(m.linkname, "hard link target")
        if not tparts:
            raise UnpackError(f"refusing hard link {m.name!r} to the layer root")
        missing = UnpackError(
            f"refusing hard link {m.name!r}: target {m.linkname!r} is not in the layer"
        )

        def target() -> tuple[int, os.stat_result]:
            try:
                tfd = self._goto(
                    self._aux,
                    tparts[:-1],
                    m.name,
                    create=False,
                    what=f"the parent of its target {m.linkname!r}, ",
                )
            except FileNotFoundError:
                raise missing from None
            tst = _lstat(tparts[-1], tfd)
            if tst is None:
                raise missing
            if stat.S_ISDIR(tst.st_mode):
                raise UnpackError(f"refusing hard link {m.name!r} to directory {m.linkname!r}")
            return tfd, tst

        _tfd, tst = target()
        old = _lstat(parts[-1], pfd)
        if old is not None:
            if _ident(old) == _ident(tst):
                return  # already that file (a link to itself, or twice the same link)
            self._clear(pfd, parts[-1], old)
            _tfd, tst = target()  # clearing may have moved the cursor, or removed the target
        os.link(tparts[-1], parts[-1], src_dir_fd=_tfd, dst_dir_fd=pfd, follow_symlinks=False)

    # --- metadata -------------------------------------------------------------
    def _warn(self, key: str, msg: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            log.warning("%s", msg)

    @staticmethod
    def _times(m: tarfile.TarInfo) -> tuple[int, int]:
        ns = int(float(m.mtime) * 1_000_000_000)  # in range: checked by _check_header
        return ns, ns

    def _xattrs(self, m: tarfile.TarInfo) -> list[tuple[str, bytes]]:
        out = []
        for k, v in (m.pax_headers or {}).items():
            if not k.startswith("SCHILY.xattr."):
                continue
            name = k[len("SCHILY.xattr.") :]
            if not name or is_internal_xattr(os.fsencode(name)):
                continue
            out.append((name, v.encode("utf-8", "surrogateescape")))
        return out

    def _set_xattr(self, target: int | bytes, name: str, value: bytes, follow: bool = True) -> None:
        try:
            os.setxattr(target, name, value, follow_symlinks=follow)
        except OSError as e:
            self._warn(
                "xattr" + name.split(".")[0], f"cannot set xattr {name!r}: {e.strerror} (skipped)"
            )

    def _chown(self, m: tarfile.TarInfo, fd: int, name: str | None = None) -> None:
        """Give the entry its owner (as root): by `fd`, or NAME in the directory `fd`."""
        try:
            if name is None:
                os.fchown(fd, m.uid, m.gid)
            else:
                os.chown(name, m.uid, m.gid, dir_fd=fd, follow_symlinks=False)
        except OSError as e:
            if e.errno != errno.EINVAL or not (
                userns.unmapped([m.uid]) or userns.unmapped([m.gid], "gid")
            ):
                raise
            raise UnpackError(
                f"cannot unpack {m.name!r}: its owner {m.uid}:{m.gid} is {userns.outside_hint()}"
            ) from None

    def _meta_fd(self, fd: int, m: tarfile.TarInfo) -> None:
        if self.as_root:
            self._chown(m, fd)
        os.fchmod(fd, m.mode & 0o7777)
        for k, v in self._xattrs(m):
            self._set_xattr(fd, k, v)
        os.utime(fd, ns=self._times(m))

    def _meta_at(self, pfd: int, name: str, m: tarfile.TarInfo, symlink: bool) -> None:
        if self.as_root:
            self._chown(m, pfd, name)
        if not symlink:
            # We just made this node ourselves (not a symlink), so following is safe.
            os.chmod(name, m.mode & 0o7777, dir_fd=pfd)
        xs = self._xattrs(m)
        if xs:
            path = fdpath(pfd, os.fsencode(name))
            for k, v in xs:
                self._set_xattr(path, k, v, follow=False)
        os.utime(name, ns=self._times(m), dir_fd=pfd, follow_symlinks=False)

    # --- after the last member -------------------------------------------------------
    def _reach(self, parts: list[str] | tuple[str, ...], ident: Ident) -> int | None:
        """The cursor's fd on `parts` if it is still the directory recorded as `ident`."""
        try:
            fd = self._cur.goto(list(parts))
        except OSError as e:
            if e.errno in _GONE_ERRNOS:
                return None
            raise
        return fd if self._cur.ident() == ident else None

    def _finish(self) -> None:
        for parts, pident in self._whiteouts:
            pfd = self._reach(parts[:-1], pident)
            if pfd is not None:
                self._apply_whiteout(pfd, parts)
        for parts, ident in self._opaques:
            fd = self._reach(parts, ident)
            if fd is not None:
                self._set_opaque(fd)
        # Children before parents (reverse tree order), so that a read-only directory never
        # blocks the way to its children, and each directory is reached from its parent,
        # which is still ours: the cursor never stands in one whose mode was applied.
        for key in sorted(self._dirs, reverse=True):
            m, ident = self._dirs[key]
            if not key:
                fd = os.dup(self.root_fd)
            else:
                try:
                    pfd = self._cur.goto(list(key[:-1]))
                    fd = os.open(key[-1], DIR_FLAGS, dir_fd=pfd)
                except OSError as e:
                    if e.errno in _GONE_ERRNOS:
                        continue  # replaced later in the tar by a non-directory
                    raise
            try:
                if _ident(os.fstat(fd)) == ident:
                    self._meta_fd(fd, m)
            finally:
                os.close(fd)

    def _apply_whiteout(self, pfd: int, parts: list[str]) -> None:
        name = "/".join(parts)
        try:
            st = _lstat(parts[-1], pfd)
            if st is not None and stat.S_ISDIR(st.st_mode):
                # Deleted below and recreated in this layer: a new, opaque directory.
                fd = os.open(parts[-1], DIR_FLAGS, dir_fd=pfd)
                try:
                    self._set_opaque(fd)
                finally:
                    os.close(fd)
                return
            if st is not None:
                return  # the layer's own NAME already hides the layers below
            # FileExistsError: its marker is there already (the tar names this whiteout twice).
            with contextlib.suppress(FileExistsError):
                self.whiteouts.make_whiteout(pfd, os.fsencode(parts[-1]))
        except OSError as e:
            raise UnpackError(f"cannot create whiteout for {name!r}: {e.strerror}") from e

    def _set_opaque(self, dfd: int) -> None:
        self.whiteouts.set_opaque(dfd)


# What a hostile or damaged tar stream can raise from inside tarfile and the decompressors.
CORRUPT = (
    tarfile.TarError,
    EOFError,
    zlib.error,
    zstandard.ZstdError,
    gzip.BadGzipFile,
    ValueError,
    OverflowError,
    UnicodeError,
)


def unpack(
    src: tarfile.TarFile | IO[bytes] | Any,
    dest: str,
    kernel_format: bool | None = None,
    max_member: int | None = None,
) -> str:
    """Extract a layer tar (a TarFile, or a stream read as one) into the existing directory
    `dest`; returns the whiteout format actually written: "kernel", "userxattr" (char 0/0
    whiteouts, user.overlay.opaque) or "oci"."""
    root_fd = os.open(dest, DIR_FLAGS)
    u = Unpacker(root_fd, kernel_format, max_member)
    try:
        if isinstance(src, tarfile.TarFile):
            u.extract(src)
        else:
            with open_tar(fileobj=src, mode="r|", errorlevel=2) as tf:
                u.extract(tf)
    except ImageError:
        raise
    except CORRUPT as e:
        raise UnpackError(f"corrupt or truncated layer archive: {e}") from e
    except OSError as e:
        raise UnpackError(f"cannot unpack the layer: {e.strerror or e}") from e
    finally:
        u.close()
        os.close(root_fd)
    return u.whiteouts.format
