"""Modules a mount's daemon carries but never uses, loaded only on first use.

trio imports `ssl` (for `trio.SSLStream`), `idna` (for host names given to
`trio.socket`) and `hmac` (for DTLS cookies; it imports hashlib, which maps
OpenSSL's libcrypto) at module level, and uses them only inside functions. A daemon
serves a filesystem and never opens a connection, yet each of its processes
would map OpenSSL and build these modules: about 5 MiB of its resident memory
per mount (README: Performance). So they are registered here as lazy modules,
with the standard library's recipe (importlib.util.LazyLoader, "Implementing
lazy imports"): `import ssl` still succeeds everywhere, and the module is
executed when an attribute of it is first read (`ssl.create_default_context`
in the registry client), so commands that do use TLS work as before.

On Python 3.11 the recipe alone does not hold: a second `import ssl`
(trio imports it twice) reads `ssl.__spec__` to see whether the module is
still initializing, and the lazy module loads on any attribute read. The
subclass below answers that one read from the module's own dictionary.
"""

from __future__ import annotations

import contextlib
import importlib.util
import sys
import types
from collections.abc import Callable

TYPE_CHECKING = False  # typing's, without importing typing on a mount's start (architecture.md)
if TYPE_CHECKING:
    from importlib.abc import Loader
    from importlib.machinery import ModuleSpec

# Never used by a daemon (see the docstring); anything else a daemon imports is used.
UNUSED_BY_DAEMON = ("ssl", "idna", "hmac")
# Also never used by a daemon: `ctypes.util` imports tempfile and shutil (and shutil bz2
# and lzma, which map their libraries) for `find_library`, which a daemon never calls
# (`syscalls.import_with_sonames` answers trio's lookup by soname). Deferred in the
# daemon-to-be only (`prefork.Prefork`): on Python 3.11 a lazy module is not safe to
# load from two threads at once (fixed in 3.12), and other commands use these from
# worker threads (pull's unpacking: shutil.copyfileobj). `ipaddress` likewise: trio's
# sockets import it for addresses a daemon never resolves (~0.25 MiB per daemon).
DAEMON_ONLY = ("tempfile", "shutil", "bz2", "lzma", "ipaddress")
# Deferred in `pyunion mount` too, whose process only hands a daemon its mount (or is the
# daemon, `-f`), and runs no thread before the daemon's imports: those, and `inspect`, which
# dataclasses imports and uses only for a class without a docstring (~3 ms of every mount).
# trio's import loads `inspect`, in the daemon's one thread, before it serves.
MOUNT_COMMAND = (*DAEMON_ONLY, "inspect")


_classes: dict[type[types.ModuleType], type[types.ModuleType]] = {}


def _lazy_class(lazy: type[types.ModuleType]) -> type[types.ModuleType]:
    """The standard library's lazy module class `lazy`, which reading `__spec__` does not load."""
    cls = _classes.get(lazy)
    if cls is None:

        def __getattribute__(self: types.ModuleType, attr: str) -> object:
            if attr == "__spec__":  # the import system's check, on every `import NAME`
                return types.ModuleType.__getattribute__(self, attr)
            return lazy.__getattribute__(self, attr)  # loads it, then reads `attr`

        cls = _classes[lazy] = type(lazy.__name__, (lazy,), {"__getattribute__": __getattribute__})
    return cls


def defer(names: tuple[str, ...] = UNUSED_BY_DAEMON) -> None:
    """Register `names` as lazy modules unless imported already (idempotent)."""
    for name in names:
        if name in sys.modules:
            continue
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None:
            continue  # not installed: an import of it fails as it would have
        loader = importlib.util.LazyLoader(spec.loader)
        spec.loader = loader
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        loader.exec_module(module)
        module.__class__ = _lazy_class(type(module))


class _Then:
    """A loader that runs its module's own loader, then each of `then` on the module."""

    def __init__(self, loader: Loader, then: list[Callable[[types.ModuleType], None]]) -> None:
        self.loader = loader
        self.then = then

    def create_module(self, spec: ModuleSpec) -> types.ModuleType | None:
        return self.loader.create_module(spec)

    def exec_module(self, module: types.ModuleType) -> None:
        self.loader.exec_module(module)
        for then in self.then:
            then(module)


class _WhenImported:
    """A finder on `sys.meta_path` for one module: its spec, with the loader `_Then`.
    It takes itself off at the first import of that module."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.then: list[Callable[[types.ModuleType], None]] = []

    def find_spec(
        self, fullname: str, path: object = None, target: object = None
    ) -> ModuleSpec | None:
        if fullname != self.name:
            return None
        with contextlib.suppress(ValueError):
            sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        if spec is not None and spec.loader is not None:
            spec.loader = _Then(spec.loader, self.then)  # type: ignore[assignment]
        return spec


def when_imported(name: str, then: Callable[[types.ModuleType], None]) -> None:
    """Run `then(module)` as soon as the top-level module `name` is imported (now if it
    is already; in the order asked). The CLI sets up logging so: a command whose process
    never logs (the caller of `pyunion mount`) never imports it (~3 ms), and any other is
    set up before its first line."""
    module = sys.modules.get(name)
    if module is not None:
        then(module)
        return
    finder = next(
        (f for f in sys.meta_path if isinstance(f, _WhenImported) and f.name == name), None
    )
    if finder is None:
        finder = _WhenImported(name)
        sys.meta_path.insert(0, finder)
    finder.then.append(then)
