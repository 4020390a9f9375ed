"""`pyunion build` against hostile Containerfiles, contexts and archives.

Each case is something a Containerfile or a context can hold: a heredoc name
that is a host path, patterns that made a backtracking matcher take exponential
time, an archive member that reads as gigabytes, trees too deep or too wide
for the fd limit. The build must do the right thing, or fail in one line,
quickly, leaving nothing outside the store.
"""

from __future__ import annotations

import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest
from support import PYUNION, fuse_skip_reason

from unionfs.image import Store

needs_fuse = pytest.mark.skipif(fuse_skip_reason() is not None, reason=fuse_skip_reason() or "")


def _build(
    store: Path, ctx: Path, *args: str, nofile: int | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """`pyunion build`, under an fd limit of `nofile` if given."""

    def limit() -> None:
        if nofile is not None:
            resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))

    return subprocess.run(
        [*PYUNION, "build", "--store", str(store), *args, str(ctx)],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        stdin=subprocess.DEVNULL,
        preexec_fn=limit,
    )


def _layer(store: Path, tag: str, index: int = -1) -> Path:
    """The unpacked tree of one layer of an image in the store."""
    s = Store(str(store))
    return Path(s.layer_path(s.lookup(tag).diff_ids[index]))


def _one_line_error(r: subprocess.CompletedProcess[str]) -> str:
    assert r.returncode != 0, r.stdout
    assert "Traceback" not in r.stderr, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    return lines[0]


# --- F1: a heredoc's name is never a host path --------------------------------------------------
@needs_fuse
@pytest.mark.timeout(120)
def test_a_heredoc_name_never_becomes_a_host_path(tmp_path: Path) -> None:
    """`COPY <</abs/path` and `COPY <<../../x` wrote that host file (as root) before the
    build failed; `<<a/b` was a traceback. The name only names the file in the image,
    by its last component as buildah does."""
    outside = tmp_path / "outside"
    outside.mkdir()
    ctx = tmp_path / "ctx"
    ctx.mkdir()
    (ctx / "Containerfile").write_text(
        "FROM scratch\n"
        "ARG X=q\n"
        f"COPY <<{outside}/PWNED /abs/\nabsolute\n{outside}/PWNED\n"
        "COPY <<../../../../../../PWNED2 /rel\nrelative\n../../../../../../PWNED2\n"
        "COPY <<a/b <<${X}/x /two/\none\na/b\ntwo\n${X}/x\n"
    )
    store = tmp_path / "store"
    r = _build(store, ctx, "-t", "heredoc")
    assert r.returncode == 0, r.stderr
    assert os.listdir(outside) == []
    for d in (tmp_path, store, store.parent.parent):
        assert not (d / "PWNED2").exists()
    assert (_layer(store, "heredoc", 0) / "abs/PWNED").read_text() == "absolute\n"
    assert (_layer(store, "heredoc", 1) / "rel").read_text() == "relative\n"
    two = _layer(store, "heredoc", 2) / "two"
    assert sorted(os.listdir(two)) == ["b", "x"]
    assert (two / "b").read_text() == "one\n" and (two / "x").read_text() == "two\n"
    assert os.listdir(store / "tmp") == []
    (ctx / "Containerfile").write_text("FROM scratch\nCOPY <<.. /d\nx\n..\n")
    line = _one_line_error(_build(store, ctx))
    assert "COPY <<..: not a file name for a heredoc" in line


# --- F5: patterns match in linear time ----------------------------------------------------------
PATTERN_CASES = """
import sys, time
from unionfs.build.ignore import Matcher
from unionfs.build.lexer import Lexer
from unionfs.build.sources import SourceTree

started = time.monotonic()
m = Matcher(["**/" * 12 + "x"])
deep = "a/" * 30
assert not m.excluded(deep + "keep") and m.excluded(deep + "x") and m.excluded("x/y")
tree = SourceTree(sys.argv[1], None, "the context")
assert tree.expand("*a" * 14 + "b") == ["a" * 40 + "b"]
assert tree.expand("*a" * 14 + "c") == []
lx = Lexer()
v = "a" * 40
assert lx.word("${X#" + "*a" * 13 + "b}", {"X": v}) == v
assert lx.word("${X%" + "*a" * 13 + "b}", {"X": v}) == v
assert lx.word("${X##" + "*a" * 13 + "}", {"X": v + "bc"}) == "bc"
assert lx.word("${X%%" + "a*" * 13 + "}", {"X": "cb" + v}) == "cb"
assert lx.word("${X/" + "*a" * 13 + "b/R}", {"X": v + "bc"}) == "Rc"
print(round(time.monotonic() - started, 3))
"""


@pytest.mark.timeout(60)
def test_patterns_that_made_a_regex_backtrack_match_at_once(tmp_path: Path) -> None:
    """A `.dockerignore` line `**/**/.../x` against a 30-deep path, a COPY glob
    `*a*a...*ab` against a 40-character name and `${X#*a*a...*ab}` took exponential
    time (the build hung). Each now takes milliseconds, with the same answers."""
    (tmp_path / ("a" * 40)).touch()
    (tmp_path / ("a" * 40 + "b")).touch()
    r = subprocess.run(
        [sys.executable, "-c", PATTERN_CASES, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=20,
        check=False,
    )
    assert r.returncode == 0, r.stderr
    assert float(r.stdout) < 2, r.stdout
