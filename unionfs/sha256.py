"""SHA-256 of a short key (a pid file's name, a cached seccomp program's, the fork
server's socket), without OpenSSL where CPython has its own implementation.

hashlib takes SHA-256 from OpenSSL's libcrypto when it can: importing it maps
libcrypto and costs ~4 ms, in the daemon (which otherwise maps no OpenSSL at
all, README: Memory) and in `pyunion run` (which lives as long as its
container). CPython 3.11's own `_sha256` gives the same digest. Blobs of
images, which are long and streamed, keep using hashlib.
"""

from __future__ import annotations

import importlib


def sha256_hex(data: bytes) -> str:
    """The hex SHA-256 of `data`."""
    try:
        impl = importlib.import_module("_sha256")  # CPython <= 3.11
    except ImportError:
        impl = importlib.import_module("hashlib")
    return str(impl.sha256(data).hexdigest())
