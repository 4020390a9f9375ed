""".dockerignore / .containerignore: which context files COPY and ADD never see.

Docker's rules (moby/patternmatcher): one pattern per line, `#` comment lines,
surrounding whitespace dropped; each pattern is cleaned like a path (`./a/../b`
is `b`, a leading `/` means the context root); `*` matches within one path
component, `?` one character, `[...]` a class, `\\` escapes, `**` any number of
components. A path is excluded when the last pattern that matches it, or one of
its parent directories, is not a `!` exception. So `docs` excludes everything
under docs/, and `!docs/README.md` after it brings that one file back.
"""

from __future__ import annotations

import posixpath
from dataclasses import dataclass

from ..errors import UserError
from .pattern import ANY_RUN, DIRS, Glob, literals, parse

IGNORE_FILES = (".containerignore", ".dockerignore")  # the first one found wins, as in buildah


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
    return Glob(parse(pattern, globstar=True, negation="^!", where=" in the ignore file"))


class Matcher:
    """Patterns of an ignore file, evaluated against slash-separated relative paths."""

    def __init__(self, lines: list[str]) -> None:
        self.patterns: list[_Pattern] = []
        for raw in lines:
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            exclusion = line.startswith("!")
            if exclusion:
                line = line[1:].strip()
                if not line:
                    raise UserError('illegal exclusion pattern "!" in the ignore file')
            p = _clean(line)
            self.patterns.append(_Pattern(p, exclusion, _compile(p)))
        self.has_exceptions = any(p.exclusion for p in self.patterns)

    def excluded(self, path: str) -> bool:
        """Whether `path` (relative to the context, no leading slash) is ignored."""
        if not self.patterns:
            return False
        path = posixpath.normpath(path)
        if path in (".", ""):
            return False
        parts = path.split("/")
        parents = ["/".join(parts[: i + 1]) for i in range(len(parts) - 1)]
        matched = False
        for p in self.patterns:
            if p.exclusion != matched:
                continue
            hit = p.glob.match(path) or any(p.glob.match(q) for q in parents)
            if hit:
                matched = not p.exclusion
        return matched

    def may_include_below(self, directory: str) -> bool:
        """Whether an excluded directory can still hold included paths (an exception)."""
        return self.has_exceptions


def read_ignore_file(data: bytes, name: str) -> Matcher:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise UserError(f"{name} is not valid UTF-8") from None
    return Matcher(text.lstrip("\ufeff").splitlines())
