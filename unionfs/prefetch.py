"""The files a container's start reads, asked of the disk all at once (architecture.md).

After `echo 3 > /proc/sys/vm/drop_caches` (or a boot), `pyunion run` read
about 240 files before its container ran: the daemon's modules (trio, pyfuse3,
the filesystem), the caller's (argparse, run, sandbox) and those of the child
that reads the image (msgspec). Each import opens and reads its file when it
gets to it, one at a time, so every file cost a round trip to the disk while
nothing else was asked of it. The daemon-to-be (`prefork.Prefork`), forked
first thing, now first names them all to the kernel (`posix_fadvise`
WILLNEED: the reads are queued, and it goes on at once), for itself and for
the caller: the later imports find their pages read or on the way.

Only where the start is cold: when the daemon's first module is in the page
cache already (`RWF_NOWAIT` reads it), nothing is asked (a warm start pays
~30 us). The lists below name what a start imports; one that is missing a
module only makes that module's read a round trip again (a test compares
them with what a start loads: tests/test_startup.py). Nothing here is
executed or trusted: the files are those the imports would open, found the
way the imports find them (`PathFinder`), without importing anything.
"""

from __future__ import annotations

import contextlib
import os
import sys
from importlib.machinery import EXTENSION_SUFFIXES, ModuleSpec, PathFinder
from importlib.util import cache_from_source

TYPE_CHECKING = False  # typing's, without importing typing on a mount's start (architecture.md)
if TYPE_CHECKING:
    from collections.abc import Iterator

# What the daemon imports after the fork (`mount._preload`), from its docstring-free
# bytecode (`bytecode.strip_docstrings`): whole packages, and the standard library's
# modules that the caller does not import first (those it does, it reads itself).
DAEMON_PACKAGES = (
    "trio",
    "trio._core",
    "attr",
    "attrs",
    "outcome",
    "sniffio",
    "sortedcontainers",
    "pyfuse3",
    "unionfs",
)
DAEMON_MODULES = (
    "_contextvars",
    "_queue",
    "bisect",
    "contextvars",
    "enum",
    "heapq",
    "logging",
    "mmap",
    "queue",
    "random",
    "signal",
    "socket",
    "string",
    "threading",
    "traceback",
)
# What the caller of `run` or `mount` imports once the daemon is forked, with the usual
# bytecode; then what only `run`'s image-reading child (`run._confinement_and_image`) does.
CLIENT_PACKAGES = ("unionfs", "re", "ctypes")
RUN_PACKAGES = ("unionfs.image", "msgspec")
RUN_MODULES = (
    "_decimal",
    "_uuid",
    "datetime",
    "decimal",
    "numbers",
    "typing_extensions",
    "uuid",
)
CLIENT_MODULES = (
    "_compat_pickle",
    "_ctypes",
    "_typing",
    "_weakrefset",
    "argparse",
    "ast",
    "copy",
    "copyreg",
    "dataclasses",
    "dis",
    "fnmatch",
    "gettext",
    "inspect",
    "linecache",
    "locale",
    "opcode",
    "pickle",
    "platform",
    "selectors",
    "struct",
    "termios",
    "textwrap",
    "token",
    "tokenize",
    "tty",
    "typing",
    "weakref",
)

_FLAGS = os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_NOCTTY | os.O_CLOEXEC


def _spec_dir(name: str) -> str | None:
    """The directory of package `name`, found without importing it or its parents."""
    spec = _find(name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return str(next(iter(spec.submodule_search_locations)))


def _find(name: str) -> ModuleSpec | None:
    parent, _, _ = name.rpartition(".")
    path = None
    if parent:
        pdir = _spec_dir(parent)
        if pdir is None:
            return None
        path = [pdir]
    try:
        return PathFinder.find_spec(name, path)
    except (ImportError, ValueError, OSError):
        return None


def _module_files(name: str, optimization: str | int) -> Iterator[str]:
    """The file a module loads: its bytecode of that optimization, or its extension."""
    spec = _find(name)
    origin = spec.origin if spec is not None else None
    if origin is None:
        return
    if origin.endswith(".py"):
        yield cache_from_source(origin, optimization=optimization)
    elif origin.endswith(tuple(EXTENSION_SUFFIXES)):
        yield origin


def _package_files(name: str, stripped: bool) -> Iterator[str]:
    """A package's own modules: their bytecode (the `-OO` one if `stripped` and there is
    one: `bytecode.strip_docstrings` loads that), its extensions."""
    pdir = _spec_dir(name)
    if pdir is None:
        return
    usual = f".{sys.implementation.cache_tag}.pyc"
    opt2 = f".{sys.implementation.cache_tag}.opt-2.pyc"
    with contextlib.suppress(OSError), os.scandir(pdir) as it:
        for e in it:
            if e.name.endswith(tuple(EXTENSION_SUFFIXES)) and e.is_file(follow_symlinks=False):
                yield e.path
    found: dict[str, dict[str, str]] = {}
    with contextlib.suppress(OSError), os.scandir(f"{pdir}/__pycache__") as it:
        for e in it:
            for suffix in (opt2, usual):
                if e.name.endswith(suffix) and e.is_file(follow_symlinks=False):
                    found.setdefault(e.name[: -len(suffix)], {})[suffix] = e.path
                    break
    for kinds in found.values():
        if stripped and opt2 in kinds:
            yield kinds[opt2]
        elif usual in kinds:
            yield kinds[usual]


def start_files(run: bool = True) -> Iterator[str]:
    """The files of the modules above, the daemon's first; `run`'s own if `run`."""
    for name in DAEMON_PACKAGES:
        yield from _package_files(name, stripped=True)
    for name in DAEMON_MODULES:  # the standard library's: no -OO bytecode (Debian's)
        yield from _module_files(name, "")
    for name in CLIENT_PACKAGES:
        yield from _package_files(name, stripped=False)
    for name in CLIENT_MODULES:
        yield from _module_files(name, "")
    for name in RUN_PACKAGES if run else ():
        yield from _package_files(name, stripped=False)
    for name in RUN_MODULES if run else ():
        yield from _module_files(name, "")


def _warm() -> bool:
    """Whether the daemon's first module is in the page cache (its bytecode's first page,
    read without waiting); True without any (nothing to gain then)."""
    for optimization in (2, ""):
        for path in _module_files("trio", optimization):
            try:
                fd = os.open(path, _FLAGS)
            except OSError:
                continue
            try:
                return os.preadv(fd, [bytearray(1)], 0, os.RWF_NOWAIT) == 1
            except OSError:  # BlockingIOError: it is not; another: the read will say
                return False
            finally:
                os.close(fd)
    return True


def advise(paths: Iterator[str]) -> int:
    """Queue the reads of the regular files among `paths` (WILLNEED); how many."""
    n = 0
    for path in paths:
        try:
            fd = os.open(path, _FLAGS)
        except OSError:
            continue
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)  # ESPIPE for a FIFO
            n += 1
        except OSError:
            pass
        finally:
            os.close(fd)
    return n


def start(run: bool) -> None:
    """For a cold start of `run` (else `mount`): queue the reads of `start_files`. The
    daemon-to-be calls it before its imports: in a thread beside them it was no sooner,
    and a thread's fd could be one the daemon's `_pin_nothing` closes."""
    if not _warm():
        advise(start_files(run))
