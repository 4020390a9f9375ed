"""Unpacking a layer tar into a directory, safe against hostile archives.

Every name is resolved component by component from the layer root's dir fd with
O_NOFOLLOW|O_DIRECTORY, and every file is created with *at calls relative to its
parent's fd, so nothing is ever written outside the layer: `..` and absolute
names are refused, a symlink met as a parent is refused (never followed), hard
links must point inside the tree. Device nodes are made only as root (skipped
with a warning otherwise); ownership is applied only as root.

Whiteouts: as root the OCI markers become the kernel's format (`.wh.NAME` -> char
device 0/0 NAME, `DIR/.wh..wh..opq` -> xattr trusted.overlay.opaque=y on DIR), so
the store's layer directories also mount under kernel overlayfs. Without root
(no mknod of 0/0 with trusted xattrs) the `.wh.` files are kept as they are:
pyunion and fuse-overlayfs read that format in lower layers, the kernel does not.
An OCI whiteout hides only the layers below, so a `.wh.NAME` next to a NAME of
the same layer leaves NAME alone (a directory NAME becomes opaque instead). The
markers are applied after the whole tar is read, whatever their order in it.
Internal overlay xattrs in the tar (trusted.overlay.* and friends, which could
redirect the kernel's lookups) are dropped.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import stat
import tarfile
from ..errors import UserError
from ..whiteout import is_internal_xattr

log = logging.getLogger(__name__)

WH = ".wh."
OPQ = ".wh..wh..opq"
AUFS_META = ".wh..wh."
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class UnpackError(UserError):
    """The archive is corrupt or tries to write outside its directory."""


def split_name(name: str, what: str = "entry") -> list[str]:
    """Path components of a tar member name; refuses absolute names and `..`."""
    if name.startswith("/"):
        raise UnpackError(f"refusing {what} with an absolute path: {name!r}")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise UnpackError(f"refusing {what} with '..' in its path: {name!r}")
    return parts


class Unpacker:
    """Extracts one layer tar into the directory open at `root_fd`."""

    def __init__(self, root_fd: int, kernel_format: bool | None = None) -> None:
        self.root_fd = root_fd
        self.as_root = os.geteuid() == 0
        self.kernel = self.as_root if kernel_format is None else kernel_format
        self.used_oci_markers = False
        self._cache: tuple[tuple[str, ...], int] | None = None
        self._dirs: list[tuple[list[str], tarfile.TarInfo]] = []
        self._whiteouts: list[list[str]] = []
        self._opaques: list[list[str]] = []
        self._warned: set[str] = set()

    # --- walking ---------------------------------------------------------------
    def _forget(self) -> None:
        if self._cache is not None:
            os.close(self._cache[1])
            self._cache = None

    def close(self) -> None:
        self._forget()

    def _open_dir(self, parts: list[str], name: str, create: bool = True) -> int:
        """A new fd on the directory `parts`, walked without following any symlink."""
        key = tuple(parts)
        if self._cache is not None and self._cache[0] == key:
            return os.dup(self._cache[1])
        fd = os.dup(self.root_fd)
        try:
            for comp in parts:
                try:
                    nfd = os.open(comp, _DIR_FLAGS, dir_fd=fd)
                except FileNotFoundError:
                    if not create:
                        raise
                    os.mkdir(comp, 0o755, dir_fd=fd)
                    nfd = os.open(comp, _DIR_FLAGS, dir_fd=fd)
                except OSError as e:
                    if e.errno in (errno.ELOOP, errno.ENOTDIR):
                        raise UnpackError(
                            f"refusing {name!r}: its parent {comp!r} is a symlink or not a "
                            "directory") from None
                    raise
                os.close(fd)
                fd = nfd
        except BaseException:
            os.close(fd)
            raise
        self._forget()
        self._cache = (key, os.dup(fd))
        return fd

    def _clear(self, pfd: int, name: str, keep_dir: bool) -> bool:
        """Make room for a new entry; True when an existing directory is kept as is."""
        try:
            st = os.stat(name, dir_fd=pfd, follow_symlinks=False)
        except FileNotFoundError:
            return False
        if stat.S_ISDIR(st.st_mode):
            if keep_dir:
                return True
            self._forget()
            shutil.rmtree(name, dir_fd=pfd)
        else:
            os.unlink(name, dir_fd=pfd)
        return False

    # --- extraction -------------------------------------------------------------
    def extract(self, tf: tarfile.TarFile) -> None:
        """Extract every member (streaming), then markers and directory metadata."""
        for m in tf:
            self._member(tf, m)
        self._finish()

    def _member(self, tf: tarfile.TarFile, m: tarfile.TarInfo) -> None:
        parts = split_name(m.name)
        if not parts:
            if m.isdir():
                self._dirs.append(([], m))
            return
        base = parts[-1]
        if base.startswith(WH):
            self._marker(parts, m)
            return
        pfd = self._open_dir(parts[:-1], m.name)
        try:
            self._create(tf, pfd, parts, m)
        except UnpackError:
            raise
        except OSError as e:
            raise UnpackError(f"cannot unpack {m.name!r}: {e.strerror or e}") from e
        finally:
            os.close(pfd)

    def _marker(self, parts: list[str], m: tarfile.TarInfo) -> None:
        base = parts[-1]
        if base == OPQ:
            self._opaques.append(parts[:-1])
        elif base.startswith(AUFS_META):
            return  # AUFS metadata (.wh..wh.plnk etc.): never part of the tree
        else:
            target = base[len(WH):]
            if target in ("", ".", ".."):
                raise UnpackError(f"refusing whiteout {m.name!r}: it names no entry")
            self._whiteouts.append(parts[:-1] + [target])

    def _create(self, tf: tarfile.TarFile, pfd: int, parts: list[str], m: tarfile.TarInfo) -> None:
        name = parts[-1]
        if m.isdir():
            if not self._clear(pfd, name, keep_dir=True):
                os.mkdir(name, 0o700, dir_fd=pfd)
            self._dirs.append((parts, m))
            return
        if m.islnk():
            self._hardlink(pfd, parts, m)
            return
        self._clear(pfd, name, keep_dir=False)
        if m.isreg():
            fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                         0o600, dir_fd=pfd)
            try:
                src = tf.extractfile(m)
                if src is not None:
                    with os.fdopen(fd, "wb", closefd=False) as out:
                        shutil.copyfileobj(src, out, 1 << 20)
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
            os.mknod(name, kind | 0o600, os.makedev(m.devmajor, m.devminor), dir_fd=pfd)
        elif m.isfifo():
            os.mkfifo(name, 0o600, dir_fd=pfd)
        else:
            self._warn("type" + str(m.type),
                       f"skipping {m.name!r}: unsupported tar type {m.type!r}")
            return
        self._meta_at(pfd, name, m, symlink=m.issym())

    def _hardlink(self, pfd: int, parts: list[str], m: tarfile.TarInfo) -> None:
        tparts = split_name(m.linkname, "hard link target")
        if not tparts:
            raise UnpackError(f"refusing hard link {m.name!r} to the layer root")
        tfd = self._open_dir(tparts[:-1], m.linkname, create=False) if len(tparts) > 1 \
            else os.dup(self.root_fd)
        try:
            try:
                tst = os.stat(tparts[-1], dir_fd=tfd, follow_symlinks=False)
            except FileNotFoundError:
                raise UnpackError(f"refusing hard link {m.name!r}: target {m.linkname!r} is not "
                                  "in the layer") from None
            if stat.S_ISDIR(tst.st_mode):
                raise UnpackError(f"refusing hard link {m.name!r} to directory {m.linkname!r}")
            try:
                st = os.stat(parts[-1], dir_fd=pfd, follow_symlinks=False)
                if (st.st_dev, st.st_ino) == (tst.st_dev, tst.st_ino):
                    return
            except FileNotFoundError:
                pass
            self._clear(pfd, parts[-1], keep_dir=False)
            os.link(tparts[-1], parts[-1], src_dir_fd=tfd, dst_dir_fd=pfd, follow_symlinks=False)
        except FileNotFoundError:
            raise UnpackError(f"refusing hard link {m.name!r}: target {m.linkname!r} is not "
                              "in the layer") from None
        finally:
            os.close(tfd)

    # --- metadata -------------------------------------------------------------
    def _warn(self, key: str, msg: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            log.warning(msg)

    @staticmethod
    def _times(m: tarfile.TarInfo) -> tuple[int, int]:
        ns = int(float(m.mtime) * 1_000_000_000)
        return ns, ns

    def _xattrs(self, m: tarfile.TarInfo) -> list[tuple[str, bytes]]:
        out = []
        for k, v in (m.pax_headers or {}).items():
            if not k.startswith("SCHILY.xattr."):
                continue
            name = k[len("SCHILY.xattr."):]
            if not name or is_internal_xattr(os.fsencode(name)):
                continue
            out.append((name, v.encode("utf-8", "surrogateescape")))
        return out

    def _set_xattr(self, target: int | str, name: str, value: bytes, follow: bool = True) -> None:
        try:
            os.setxattr(target, name, value, follow_symlinks=follow)
        except OSError as e:
            self._warn("xattr" + name.split(".")[0],
                       f"cannot set xattr {name}: {e.strerror} (skipped)")

    def _meta_fd(self, fd: int, m: tarfile.TarInfo) -> None:
        if self.as_root:
            os.fchown(fd, m.uid, m.gid)
        os.fchmod(fd, m.mode & 0o7777)
        for k, v in self._xattrs(m):
            self._set_xattr(fd, k, v)
        os.utime(fd, ns=self._times(m))

    def _meta_at(self, pfd: int, name: str, m: tarfile.TarInfo, symlink: bool) -> None:
        if self.as_root:
            os.chown(name, m.uid, m.gid, dir_fd=pfd, follow_symlinks=False)
        if not symlink:
            # We just made this node ourselves (not a symlink), so following is safe.
            os.chmod(name, m.mode & 0o7777, dir_fd=pfd)
        xs = self._xattrs(m)
        if xs:
            path = f"/proc/self/fd/{pfd}/{name}"
            for k, v in xs:
                self._set_xattr(path, k, v, follow=False)
        os.utime(name, ns=self._times(m), dir_fd=pfd, follow_symlinks=False)

    # --- after the last member -------------------------------------------------------
    def _finish(self) -> None:
        for parts in self._whiteouts:
            self._apply_whiteout(parts)
        for parts in self._opaques:
            self._apply_opaque(parts)
        # Deepest first, so a read-only parent never blocks a child's metadata.
        self._dirs.sort(key=lambda d: len(d[0]), reverse=True)
        for parts, m in self._dirs:
            try:
                fd = self._open_dir(parts, m.name, create=False)
            except FileNotFoundError:
                continue  # replaced later in the tar by a non-directory
            try:
                self._meta_fd(fd, m)
            finally:
                os.close(fd)
        self._forget()

    def _apply_whiteout(self, parts: list[str]) -> None:
        name = "/".join(parts)
        pfd = self._open_dir(parts[:-1], WH + name)
        try:
            try:
                st = os.stat(parts[-1], dir_fd=pfd, follow_symlinks=False)
            except FileNotFoundError:
                st = None
            if st is not None and stat.S_ISDIR(st.st_mode):
                # Deleted below and recreated in this layer: a new, opaque directory.
                fd = os.open(parts[-1], _DIR_FLAGS, dir_fd=pfd)
                try:
                    self._set_opaque(fd)
                finally:
                    os.close(fd)
                return
            if st is not None:
                return  # the layer's own NAME already hides the layers below
            if self.kernel:
                try:
                    os.mknod(parts[-1], stat.S_IFCHR, os.makedev(0, 0), dir_fd=pfd)
                    return
                except OSError as e:
                    if e.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.EINVAL):
                        raise
                    self.kernel = False
            self.used_oci_markers = True
            fd = os.open(WH + parts[-1], os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC,
                         0o600, dir_fd=pfd)
            os.close(fd)
        except OSError as e:
            raise UnpackError(f"cannot create whiteout for {name!r}: {e.strerror}") from e
        finally:
            os.close(pfd)

    def _apply_opaque(self, parts: list[str]) -> None:
        fd = self._open_dir(parts, "/".join(parts + [OPQ]))
        try:
            self._set_opaque(fd)
        finally:
            os.close(fd)

    def _set_opaque(self, dfd: int) -> None:
        if self.kernel:
            try:
                os.setxattr(dfd, "trusted.overlay.opaque", b"y")
                return
            except OSError as e:
                if e.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.EACCES):
                    raise
                self.kernel = False
        self.used_oci_markers = True
        fd = os.open(OPQ, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
                     dir_fd=dfd)
        os.close(fd)


def unpack(tf: tarfile.TarFile, dest: str, kernel_format: bool | None = None) -> str:
    """Extract the tar into the existing directory `dest`; returns "kernel" or "oci".

    The result names the whiteout format actually written (see the module comment).
    """
    root_fd = os.open(dest, _DIR_FLAGS)
    u = Unpacker(root_fd, kernel_format)
    try:
        u.extract(tf)
    except (tarfile.TarError, EOFError) as e:
        raise UnpackError(f"corrupt or truncated layer archive: {e}") from e
    finally:
        u.close()
        os.close(root_fd)
    return "oci" if u.used_oci_markers or not u.kernel else "kernel"

