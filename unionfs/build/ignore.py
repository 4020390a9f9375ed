""".dockerignore / .containerignore: which context files COPY and ADD never see.

Docker's rules (moby/patternmatcher): one pattern per line, lines starting
with `#` are comments (before trimming: ` #x` is a pattern), surrounding
whitespace dropped; each pattern is cleaned like a path (`./a/../b`
is `b`, a leading `/` means the context root); `*` matches within one path
component, `?` one character, `[...]` a class, `\\` escapes, `**` any number of
components. A path is excluded when the last pattern that matches it, or one of
its parent directories, is not a `!` exception. So `docs` excludes everything
under docs/, and `!docs/README.md` after it brings that one file back; an
excluded directory is only searched for such files when an exception's text
starts with the directory's path (`may_include_below`).
"""

from __future__ import annotations

import posixpath
from collections import OrderedDict
from dataclasses import dataclass

from ..errors import UserError
from .pattern import ANY_RUN, DIRS, Glob, literals, parse

IGNORE_FILES = (".containerignore", ".dockerignore")  # the first one found wins, as in buildah


@dataclass(frozen=True)
class _Prefix:
    """A path read so far: per pattern, its states and whether the path or a parent
    matched (Docker excludes a path when a pattern matches it or a parent)."""

    states: tuple[int, ...]
    hits: tuple[bool, ...]


@dataclass
class _Pattern:
    text: str
    exclusion: bool
    glob: Glob


def _clean(p: str) -> str:
    p = posixpath.normpath(p)
    if p.startswith("/") and len(p) > 1:
        p = p.lstrip("/") or "/"
    return p


def _compile(pattern: str) -> Glob:
    rest = pattern[2:]
    if pattern.startswith("**") and rest and not any(c in rest for c in "*?[\\"):
        # A leading ** and nothing special after it: a plain suffix match (`**.go`).
        if rest.startswith("/"):
            return Glob([DIRS, *literals(rest[1:])])
        return Glob([ANY_RUN, *literals(rest)])
    return Glob(parse(pattern, globstar=True, where=" in the ignore file"))


class Matcher:
    """Patterns of an ignore file, evaluated against slash-separated relative paths."""

    DIR_CACHE = 1024  # directories whose matcher states are kept (the walk's recent ones)

    def __init__(self, lines: list[str]) -> None:
        self.patterns: list[_Pattern] = []
        for raw in lines:
            if raw.startswith("#"):  # before trimming, as Docker: " #x" is a pattern
                continue
            line = raw.strip()
            if not line:
                continue
            exclusion = line.startswith("!")
            if exclusion:
                line = line[1:].strip()
                if not line:
                    raise UserError('illegal exclusion pattern "!" in the ignore file')
            p = _clean(line)
            self.patterns.append(_Pattern(p, exclusion, _compile(p)))
        self._root = _Prefix(
            tuple(p.glob.start for p in self.patterns), (False,) * len(self.patterns)
        )
        self._dirs: OrderedDict[str, _Prefix] = OrderedDict()

    def excluded(self, path: str) -> bool:
        """Whether `path` (relative to the context, no leading slash) is ignored."""
        if not self.patterns:
            return False
        path = posixpath.normpath(path)
        if path in (".", ""):
            return False
        parent, _, name = path.rpartition("/")
        hits = self._extend(self._prefix(parent), parent, name).hits
        matched = False
        for p, hit in zip(self.patterns, hits, strict=True):
            if hit and p.exclusion == matched:  # the last pattern that matches decides
                matched = not p.exclusion
        return matched

    def _prefix(self, directory: str) -> _Prefix:
        """The states after `directory`, carried on from the nearest directory above it
        already met: a file costs the length of its name, not of its path (nor of each
        parent's, matched again from the start)."""
        missing: list[str] = []
        known = self._root
        while directory:
            found = self._dirs.get(directory)
            if found is not None:
                self._dirs.move_to_end(directory)
                known = found
                break
            missing.append(directory)
            directory = directory.rpartition("/")[0]
        for d in reversed(missing):
            parent, _, name = d.rpartition("/")
            known = self._dirs[d] = self._extend(known, parent, name)
        while len(self._dirs) > self.DIR_CACHE:
            self._dirs.popitem(last=False)
        return known

    def _extend(self, prefix: _Prefix, parent: str, name: str) -> _Prefix:
        """`prefix` (the states after `parent`) carried on to `parent/name`."""
        text = f"/{name}" if parent else name
        states = tuple(
            p.glob.advance(st, text) for p, st in zip(self.patterns, prefix.states, strict=True)
        )
        hits = tuple(
            hit or p.glob.accepts(st)
            for p, st, hit in zip(self.patterns, states, prefix.hits, strict=True)
        )
        return _Prefix(states, hits)

    def may_include_below(self, directory: str) -> bool:
        """Whether an excluded directory is walked for exceptions: only when an exception's
        text starts with the directory's path, the rule of Docker (moby's archive walk,
        BuildKit's fsutil) and buildah; so `!*/sub/yes` brings nothing back from below an
        excluded `d/sub`, and `!d/sub/yes` does."""
        prefix = directory + "/"
        return any(p.exclusion and (p.text + "/").startswith(prefix) for p in self.patterns)


def read_ignore_file(data: bytes, name: str) -> Matcher:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise UserError(f"{name} is not valid UTF-8") from None
    return Matcher(text.lstrip("\ufeff").splitlines())
