"""What a COPY or ADD reads: the build context (or another stage's tree) through fds.

A source tree is held by a directory fd and every path in it is opened with
openat2(RESOLVE_IN_ROOT), so a symlink in the context, absolute or full of
`..`, resolves inside the context and never leads to the host's files.
A source named in the instruction (or matched by its glob) is followed if it is
a symlink, as Docker does; inside a copied directory symlinks are copied as
symlinks and never followed. Directories are walked iteratively, pruning what
the ignore file excludes (unless an exception pattern may bring something back).

The digest of a set of sources covers exactly what the copy depends on: every
entry's path, type, mode, owner, size, content and symlink target (a source
directory's own mode and owner are left out: its contents are copied). It keys
the build cache and names the sources in the history (`COPY file:DIGEST in /dst`).
"""

from __future__ import annotations

import errno
import hashlib
import os
import posixpath
import re
import stat
from dataclasses import dataclass, field

from .. import syscalls
from ..errors import UserError
from ..tree import DirCursor, NotRegularFile, open_regular, open_trusted
from .ignore import Matcher
from .pattern import compile_glob

_GLOB_CHARS = re.compile(r"[*?\[\\]")


@dataclass
class Entry:
    rel: str  # path below the source ('' for the source itself)
    path: str  # path in the tree, for opening ('' for the tree root)
    st: os.stat_result
    target: str | None = None  # a symlink's target


@dataclass
class Source:
    name: str  # the path matched, relative to the tree root
    is_dir: bool
    entries: list[Entry] = field(default_factory=list)


def clean(path: str) -> str:
    """A source path relative to the tree root: `..` cannot climb above it."""
    return posixpath.normpath("/" + path).lstrip("/")


def _unescape(component: str) -> str:
    return re.sub(r"\\(.)", r"\1", component)


class SourceTree:
    """A directory COPY reads from: the context, or a stage's mounted root."""

    def __init__(
        self, root: str, matcher: Matcher | None, what: str, user_path: bool = False
    ) -> None:
        """`user_path`: ROOT was named by the caller and may cross directories a user
        can write (a context in her home): resolved with `tree.open_trusted`, so no
        symlink of hers is followed. A stage's root is pyunion's own `/proc/self/fd/N`."""
        self.root = root
        self.what = what
        self.matcher = matcher
        try:
            if user_path:
                self.fd = open_trusted(root)
            else:
                self.fd = os.open(root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as e:
            raise UserError(f"cannot open {what} {root}: {e.strerror}") from None

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def open(self, path: str, flags: int = os.O_PATH) -> int:
        """An fd of PATH resolved inside the tree (symlinks followed, but never out)."""
        return syscalls.open_in_root(self.fd, path or ".", flags)

    def ignored(self, path: str) -> bool:
        return self.matcher is not None and self.matcher.excluded(path)

    # --- globs ------------------------------------------------------------------
    def expand(self, pattern: str) -> list[str]:
        """Tree paths the source pattern names (a plain name is taken as is)."""
        cleaned = clean(pattern)
        if not _GLOB_CHARS.search(cleaned):
            return [cleaned]
        found = [""]
        for comp in cleaned.split("/"):
            nxt: list[str] = []
            if not _GLOB_CHARS.search(comp):
                name = _unescape(comp)
                nxt = [posixpath.join(p, name) if p else name for p in found]
            else:
                glob = compile_glob(comp)
                for parent in found:
                    for name in self._listdir(parent):
                        if glob.match(name):
                            path = posixpath.join(parent, name) if parent else name
                            if not self.ignored(path):
                                nxt.append(path)
            found = nxt
        return sorted(p for p in found if self._exists(p))

    def _listdir(self, path: str) -> list[str]:
        try:
            fd = self.open(path, os.O_RDONLY | os.O_DIRECTORY)
        except OSError:
            return []
        try:
            return os.listdir(fd)
        finally:
            os.close(fd)

    def _exists(self, path: str) -> bool:
        try:
            os.close(self.open(path))
            return True
        except OSError:
            return False

    # --- one source ----------------------------------------------------------------
    def source(self, path: str) -> Source:
        """The entries a COPY of `path` copies, the source itself first."""
        if path and self.ignored(path):
            raise UserError(f"{path!r} is excluded by the ignore file of {self.what}")
        try:
            fd = self.open(path)
        except OSError as e:
            hint = "" if e.errno != errno.ENOENT else " (no such file; symlinks resolve inside it)"
            raise UserError(
                f"cannot read {path or '.'!r} from {self.what}: {e.strerror}{hint}"
            ) from None
        try:
            st = os.stat(fd)
            real = self._path_of(fd)
        finally:
            os.close(fd)
        if real and real != path and self.ignored(real):
            # A symlink in the context to an ignored file (`x.json -> .env`): what it
            # names was never part of the context, as for docker and buildah.
            raise UserError(
                f"{path!r} leads to {real!r}, which is excluded by the ignore file of {self.what}"
            )
        if not stat.S_ISDIR(st.st_mode):
            return Source(path, False, [Entry("", real, st)])
        try:
            dirfd = self.open(real, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
        except OSError as e:
            raise UserError(f"cannot read {path or '.'!r} from {self.what}: {e.strerror}") from None
        try:
            return Source(path, True, [Entry("", real, st), *self._walk(dirfd, real)])
        finally:
            os.close(dirfd)

    def _path_of(self, fd: int) -> str:
        """Where an fd opened in the tree really is, relative to the tree root."""
        top = os.readlink(syscalls.fd_str(self.fd))
        here = os.readlink(syscalls.fd_str(fd))
        if here == top:
            return ""
        if not here.startswith(top.rstrip("/") + "/"):
            raise UserError(f"a source in {self.what} moved while it was read")
        return here[len(top.rstrip("/")) + 1 :]

    def _walk(self, top: int, base: str) -> list[Entry]:
        """Every entry below `top` (the directory `base`), ignore rules applied.

        Iterative, and a `DirCursor` reaches each directory from `top` one O_NOFOLLOW
        component at a time: a few fds whatever the tree's width or depth.
        """
        out: list[Entry] = []
        held: dict[str, Entry] = {}  # excluded directories kept for their included children
        pending: list[str] = [""]
        cur = DirCursor(top)
        rel = ""
        try:
            while pending:
                rel = pending.pop()
                dfd = cur.goto(rel.split("/") if rel else [])
                with os.scandir(dfd) as it:
                    items = sorted((e.name, e.stat(follow_symlinks=False)) for e in it)
                subdirs = []
                for name, st in items:
                    r = posixpath.join(rel, name) if rel else name
                    path = posixpath.join(base, r) if base else r
                    excluded = self.ignored(path)
                    is_dir = stat.S_ISDIR(st.st_mode)
                    if excluded and not (
                        is_dir and self.matcher is not None and self.matcher.may_include_below(path)
                    ):
                        continue
                    target = None
                    if stat.S_ISLNK(st.st_mode):
                        target = os.readlink(name, dir_fd=dfd)
                    entry = Entry(r, path, st, target)
                    if excluded:
                        held[r] = entry
                    else:
                        out.append(entry)
                    if is_dir:
                        subdirs.append(r)
                pending.extend(reversed(subdirs))  # depth first, in order: short moves
        except OSError as e:
            raise UserError(
                f"cannot read {posixpath.join(base, rel)!r} in {self.what}: {e.strerror}"
            ) from None
        finally:
            cur.close()
        if held:  # an excluded directory that holds included entries is still created
            have = {e.rel for e in out}
            for entry in list(out):
                parent = posixpath.dirname(entry.rel)
                while parent and parent not in have and parent in held:
                    out.append(held[parent])
                    have.add(parent)
                    parent = posixpath.dirname(parent)
        out.sort(key=lambda e: e.rel.split("/"))
        return out

    # --- content digest --------------------------------------------------------------
    def digest(self, sources: list[Source]) -> str:
        """sha256 over names, types, modes, owners, sizes, contents and link targets."""
        h = hashlib.sha256()
        for src in sources:
            h.update(b"S" + src.name.encode("utf-8", "surrogateescape") + b"\0")
            for e in src.entries:
                st = e.st
                if not e.rel and src.is_dir:
                    # A directory source's contents are copied, not the directory: its
                    # mode and owner change nothing (buildah's cache ignores them too).
                    h.update(b"D\n")
                    continue
                rec = (
                    f"{e.rel}\0{stat.S_IFMT(st.st_mode):o}\0{stat.S_IMODE(st.st_mode):o}\0"
                    f"{st.st_uid}\0{st.st_gid}\0"
                )
                h.update(rec.encode("utf-8", "surrogateescape"))
                if stat.S_ISREG(st.st_mode):
                    h.update(b"%d\0" % st.st_size)
                    h.update(self.file_digest(e).encode())
                elif e.target is not None:
                    h.update(e.target.encode("utf-8", "surrogateescape"))
                elif stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
                    h.update(b"%d" % st.st_rdev)
                h.update(b"\n")
        return h.hexdigest()

    def open_file(self, e: Entry) -> int:
        """The regular file the walk found as `e`, opened for reading; OSError otherwise.

        Between the walk and the read, whoever can write the context may put a FIFO
        there (a read would hang the build) or another file: the path is resolved
        without opening anything (`tree.open_regular`), and only the very file
        walked, still a regular file, is opened.
        """
        try:
            fd = open_regular(self.fd, e.path or ".", resolve="in_root")
        except NotRegularFile as err:
            raise OSError(errno.ESTALE, f"changed while it was read ({err.strerror})") from None
        if os.fstat(fd)[1:3] != e.st[1:3]:  # (st_ino, st_dev)
            os.close(fd)
            raise OSError(errno.ESTALE, "changed while it was read")
        return fd

    def file_digest(self, e: Entry) -> str:
        """sha256 of the file `e`: exactly its walked size is read, no more."""
        try:
            fd = self.open_file(e)
            h = hashlib.sha256()
            try:
                left = e.st.st_size
                while left > 0 and (chunk := os.read(fd, min(left, 1 << 20))):
                    h.update(chunk)
                    left -= len(chunk)
                if left or os.read(fd, 1):
                    raise OSError(errno.ESTALE, "changed while it was read")
            finally:
                os.close(fd)
        except OSError as err:
            raise UserError(f"cannot read {e.path!r} from {self.what}: {err.strerror}") from None
        return h.hexdigest()
