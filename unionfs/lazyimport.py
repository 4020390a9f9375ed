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

import _thread
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
# sockets import it for addresses a daemon never resolves (~0.25 MiB per daemon). And
# `subprocess`, which ctypes.util imports for the same `find_library`, with `selectors`
# and `locale`, which only subprocess imports there (~0.5 MiB).
DAEMON_ONLY = (
    "tempfile",
    "shutil",
    "bz2",
    "lzma",
    "ipaddress",
    "subprocess",
    "selectors",
    "locale",
)
# Deferred in `pyunion mount` too, whose process only hands a daemon its mount (or is the
# daemon, `-f`), and runs no thread before the daemon's imports: those, and `inspect`, which
# dataclasses imports and uses only for a class without a docstring (~3 ms of every mount).
# trio's import loads `inspect`, in the daemon's one thread, before it serves.
MOUNT_COMMAND = (*DAEMON_ONLY, "inspect")


# What of trio a daemon runs on: the event loop (`_core`), Event and the locks (`_sync`),
# worker threads (`to_thread`, `from_thread`), the signal receiver (`_signals`) and
# timeouts; not its sockets, TLS, DTLS, files, paths and subprocesses (`import_trio_core`).
TRIO_PARTS = ("_core", "_sync", "_signals", "_timeouts", "from_thread", "to_thread")

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


def import_trio_core() -> types.ModuleType:
    """trio with only `TRIO_PARTS` imported: a daemon's (architecture.md, start-up).

    trio's `__init__` imports all of trio, most of which a daemon never runs: its
    sockets, TLS and DTLS streams, `trio.Path` (and pathlib), files and subprocesses
    (~1.1 MiB of each daemon's heap). Here the package is made without running it,
    the parts are imported as its submodules, and their public names are bound in it
    and in a `trio.lowlevel` of trio's core (trio's own imports sockets and
    subprocesses). Any other name read of either runs trio's `__init__` then, so that
    whatever reads it gets what trio gives: nothing is missing, only loaded late.
    Where trio is imported already, or is not laid out so, it is imported whole.
    """
    if "trio" in sys.modules:
        return sys.modules["trio"]
    spec = importlib.util.find_spec("trio")
    if spec is None or spec.loader is None or spec.submodule_search_locations is None:
        return importlib.import_module("trio")
    pkg = importlib.util.module_from_spec(spec)
    low = types.ModuleType("trio.lowlevel")
    sys.modules["trio"] = pkg
    sys.modules["trio.lowlevel"] = low
    pkg.__dict__["lowlevel"] = low
    try:
        parts = [importlib.import_module("trio." + part) for part in TRIO_PARTS]
    except ImportError:  # another trio: whole, as any other program imports it
        for name in [n for n in sys.modules if n == "trio" or n.startswith("trio.")]:
            del sys.modules[name]
        return importlib.import_module("trio")
    pkg.__dict__["__version__"] = importlib.import_module("trio._version").__version__
    for part in parts:
        if part.__name__ in ("trio.from_thread", "trio.to_thread"):
            continue  # (modules of their own in trio too)
        names = {k: v for k, v in vars(part).items() if _public(k, v)}
        pkg.__dict__.update(names)
        if part.__name__ == "trio._core":
            low.__dict__.update(names)
    lock = _thread.RLock()
    state = ["partial"]  # then "loading" (trio's __init__ running), "whole"

    def load_whole(name: str) -> bool:
        """Run trio's `__init__` in the package; False while it runs (its own imports ask
        for the submodules they then import)."""
        with lock:
            if state[0] != "partial":
                return state[0] == "whole"
            state[0] = "loading"
            try:
                del sys.modules["trio.lowlevel"], pkg.__dict__["lowlevel"]
                assert spec.loader is not None
                spec.loader.exec_module(pkg)  # imports the rest, binds every name
            except BaseException:
                state[0] = "partial"
                raise
            whole = sys.modules["trio.lowlevel"]
            low.__dict__.update((k, v) for k, v in vars(whole).items() if k[:2] != "__")
            del pkg.__dict__["__getattr__"], low.__dict__["__getattr__"]
            state[0] = "whole"
        import logging  # (a daemon has; the tests read its debug log for this line)

        logging.getLogger(__name__).debug("trio: all of it imported, for trio.%s", name)
        return True

    def whole_package(name: str) -> object:
        # Another dunder is a probe (copy, pickle, inspect), not a name of trio's.
        if name[:2] == "__" or not load_whole(name):
            raise AttributeError(name)
        return getattr(pkg, name)

    def whole_lowlevel(name: str) -> object:
        if name[:2] == "__" or not load_whole("lowlevel." + name):
            raise AttributeError(name)
        return getattr(sys.modules["trio.lowlevel"], name)

    pkg.__dict__["__getattr__"] = whole_package
    low.__dict__["__getattr__"] = whole_lowlevel
    return pkg


def _public(name: str, value: object) -> bool:
    """A name trio's `__init__` would bind: public, and not a module the part imported."""
    return name[:1] != "_" and not isinstance(value, types.ModuleType)
