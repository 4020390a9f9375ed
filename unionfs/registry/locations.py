"""Where blobs were last seen: (registry, repository) per digest, for cross-repository mounts.

A push can ask a registry to mount a blob from another repository of the same
registry (`POST .../blobs/uploads/?mount=DIGEST&from=REPO`) instead of
uploading it, but only if it knows such a repository. Like containers/image's
blob info cache, pulls and pushes note where each blob is; it is only a hint
(a wrong one costs one refused mount, then an upload). Kept in the store
directory as `registry-locations.sqlite`, beside the images it describes;
losing it loses nothing but the hints.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import time
from collections.abc import Iterable, Iterator

FILE = "registry-locations.sqlite"


@contextlib.contextmanager
def _db(store_root: str) -> Iterator[sqlite3.Connection | None]:
    try:
        con = sqlite3.connect(os.path.join(store_root, FILE), timeout=10)
    except sqlite3.Error:
        yield None
        return
    try:
        con.execute(
            "CREATE TABLE IF NOT EXISTS seen (digest TEXT, registry TEXT, repo TEXT, "
            "at REAL, PRIMARY KEY (digest, registry, repo))"
        )
        yield con
        con.commit()
    except sqlite3.Error:
        pass  # a hint we could not keep
    finally:
        con.close()


def record(store_root: str, registry: str, repo: str, digests: Iterable[str]) -> None:
    now = time.time()
    with _db(store_root) as con:
        if con is not None:
            con.executemany(
                "INSERT OR REPLACE INTO seen VALUES (?, ?, ?, ?)",
                [(d, registry, repo, now) for d in set(digests)],
            )


def candidates(store_root: str, registry: str, digest: str, exclude: str) -> list[str]:
    """Repositories of `registry` that had `digest`, most recent first (at most 3)."""
    if not os.path.exists(os.path.join(store_root, FILE)):
        return []
    with _db(store_root) as con:
        if con is None:
            return []
        rows = con.execute(
            "SELECT repo FROM seen WHERE digest = ? AND registry = ? AND repo != ? "
            "ORDER BY at DESC LIMIT 3",
            (digest, registry, exclude),
        ).fetchall()
        return [r[0] for r in rows]
    return []
