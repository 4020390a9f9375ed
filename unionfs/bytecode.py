"""A daemon's modules from their docstring-free bytecode, where it was compiled.

A daemon holds the code of every module it imports for as long as its mount
lives, docstrings included (they are constants of the code objects), and
reads none of them. `python -OO` compiles modules without docstrings and
asserts into `NAME.cpython-311.opt-2.pyc` beside the usual `.pyc`; the
daemon's interpreter is the command's (a fork of it), which runs without
`-OO`, so `strip_docstrings` makes the modules it imports from then on load
from that bytecode when there is some, up to date with its source: trio,
attrs, sortedcontainers and pyunion's own, ~0.65 MiB of each daemon's memory
(scripts/setup.sh compiles them; `python -m compileall -o 2 DIR` does).
A module without that bytecode (the standard library's, as Debian installs
it) loads as before; nothing is compiled here, which would cost the daemon
more memory than it saves.

Without asserts too: pyunion's own code asserts only what mypy needs told
(a value is not None, of a type), never a check it relies on.
"""

from __future__ import annotations

import importlib.machinery as machinery
import importlib.util
import marshal
import os
import sys
import types

_installed = False


class _Stripped(machinery.SourceFileLoader):
    """The standard source loader, which prefers the module's up-to-date `.opt-2.pyc`."""

    def get_code(self, fullname: str) -> types.CodeType | None:
        source = self.get_filename(fullname)
        try:
            with open(importlib.util.cache_from_source(source, optimization=2), "rb") as f:
                data = f.read()
            st = os.stat(source)
        except (OSError, ValueError):
            return super().get_code(fullname)
        # The header of a pyc checked by time (PEP 552): magic, flags 0, mtime, size.
        if (
            data[:4] == importlib.util.MAGIC_NUMBER
            and int.from_bytes(data[4:8], "little") == 0
            and int.from_bytes(data[8:12], "little") == int(st.st_mtime) & 0xFFFFFFFF
            and int.from_bytes(data[12:16], "little") == st.st_size & 0xFFFFFFFF
        ):
            try:
                code = marshal.loads(memoryview(data)[16:])
            except (EOFError, ValueError, TypeError):
                pass
            else:
                if isinstance(code, types.CodeType):
                    return code
        return super().get_code(fullname)


def strip_docstrings() -> None:
    """Load the modules imported from now on from their `.opt-2.pyc` where one is up to
    date (idempotent). For a daemon-to-be, before it imports what serving needs."""
    global _installed
    if _installed:
        return
    _installed = True
    sys.path_hooks.insert(
        0,
        machinery.FileFinder.path_hook(
            (machinery.ExtensionFileLoader, machinery.EXTENSION_SUFFIXES),
            (_Stripped, machinery.SOURCE_SUFFIXES),
            (machinery.SourcelessFileLoader, machinery.BYTECODE_SUFFIXES),
        ),
    )
    sys.path_importer_cache.clear()  # the finders made so far hand out the usual loader
