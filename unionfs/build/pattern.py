"""Glob patterns, matched in linear time: COPY/ADD sources, ignore files, `${X#pat}`.

The pattern language of COPY/ADD sources and of ignore files is Go's
filepath.Match: `*` matches within one path component, `?` one character,
`[...]` a class (`[^...]` its complement), `\\` escapes the next character.
Ignore files add `**` (any number of components, moby/patternmatcher) and also
take `[!...]`. The substitutions `${X#pat}`, `${X%pat}` and `${X/pat/repl}`
take `*` and `?` matching any character (the lexer parses their syntax).

Every pattern becomes a `Glob`: a list of tokens run as an NFA, whose sets of
states are turned into DFA states as they are met and kept (as RE2 does, and
Docker's matchers are Go's linear-time regexp). A name costs one dict lookup
per character once its transitions are known, and building one costs the
pattern's length: at worst O(len(name) * len(pattern)), whatever the pattern.
A backtracking regex took exponential time on `**/**/**/.../x` against a deep
path or on `*a*a*a*...b` against a long name, and hung the build.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Literal

from ..errors import UserError

CharTest = Callable[[str], bool]


@dataclass(frozen=True)
class Token:
    """`one`: one character passing `test`; `star`: any number of them; `dirs`: nothing,
    or anything ending in '/' (the `**/` of ignore files, the regex `(.*/)?`)."""

    kind: Literal["one", "star", "dirs"]
    test: CharTest
    literal: str | None = None  # a `one` token of exactly this character


def _any(_c: str) -> bool:
    return True


def _not_slash(c: str) -> bool:
    return c != "/"


def literal(ch: str) -> Token:
    return Token("one", ch.__eq__, ch)


ANY_ONE = Token("one", _any)  # `?` of the shell
ANY_RUN = Token("star", _any)  # `*` of the shell, a trailing `**` of ignore files
ONE = Token("one", _not_slash)  # `?`
RUN = Token("star", _not_slash)  # `*`
DIRS = Token("dirs", _any)  # `**/`


def literals(text: str) -> list[Token]:
    return [literal(c) for c in text]


def _class(body: str, negate: bool, pattern: str, where: str) -> Token:
    """`[body]`: single characters and ranges `a-z`; a backslash is itself."""
    ranges: list[tuple[str, str]] = []
    k = 0
    while k < len(body):
        if k + 2 < len(body) and body[k + 1] == "-":
            lo, hi = body[k], body[k + 2]
            if lo > hi:
                raise UserError(f"bad pattern {pattern!r}{where}: bad range {lo}-{hi}")
            ranges.append((lo, hi))
            k += 3
        else:
            ranges.append((body[k], body[k]))
            k += 1

    def test(c: str) -> bool:
        return negate != any(lo <= c <= hi for lo, hi in ranges)

    return Token("one", test)


def parse(
    pattern: str, *, globstar: bool = False, negation: str = "^", where: str = ""
) -> list[Token]:
    """The tokens of a filepath.Match pattern (`globstar`: with `**`; `negation`: the
    characters that complement a class)."""
    out: list[Token] = []
    i, n = 0, len(pattern)
    while i < n:
        ch = pattern[i]
        i += 1
        if ch == "*":
            if globstar and i < n and pattern[i] == "*":
                i += 1
                if i < n and pattern[i] == "/":
                    i += 1
                out.append(ANY_RUN if i >= n else DIRS)
            else:
                out.append(RUN)
        elif ch == "?":
            out.append(ONE)
        elif ch == "\\" and i < n:
            out.append(literal(pattern[i]))
            i += 1
        elif ch == "[":
            j = i
            negate = j < n and pattern[j] in negation
            if negate:
                j += 1
            start = j
            if j < n and pattern[j] == "]":
                j += 1
            while j < n and pattern[j] != "]":
                j += 1
            if j >= n:
                raise UserError(f"bad pattern {pattern!r}{where}: unclosed '['")
            out.append(_class(pattern[start:j], negate, pattern, where))
            i = j + 1
        else:
            out.append(literal(ch))
    return out


class Glob:
    """A compiled pattern: whole-string, prefix and leftmost-longest matches."""

    MAX_DFA_STATES = 2048  # past this the DFA is built again from scratch (memory bound)

    def __init__(self, tokens: list[Token]) -> None:
        self.tokens = tuple(tokens)
        lit = [t.literal for t in tokens]
        self.literal = "".join(c for c in lit if c is not None) if None not in lit else None
        self._n = len(tokens)
        self._reset()

    # --- the NFA: state i is "before token i", n accepts, n+1+i is "inside `dirs` token i"
    def _close(self, states: set[int]) -> frozenset[int]:
        todo = list(states)
        while todo:
            s = todo.pop()
            if s < self._n and self.tokens[s].kind != "one" and s + 1 not in states:
                states.add(s + 1)
                todo.append(s + 1)
        return frozenset(states)

    def _moves(self, state: int, ch: str, out: set[int]) -> None:
        n = self._n
        if state < n:
            tok = self.tokens[state]
            if tok.kind == "one":
                if tok.test(ch):
                    out.add(state + 1)
            elif tok.kind == "star":
                if tok.test(ch):
                    out.add(state)
            else:
                out.add(n + 1 + state)
                if ch == "/":
                    out.add(state + 1)
        elif state > n:
            out.add(state)
            if ch == "/":
                out.add(state - n)

    def _step(self, states: frozenset[int], ch: str) -> frozenset[int]:
        out: set[int] = set()
        for s in states:
            self._moves(s, ch, out)
        return self._close(out)

    # --- the DFA, built lazily --------------------------------------------------------------
    def _reset(self) -> None:
        self._sets: list[frozenset[int]] = []
        self._ids: dict[frozenset[int], int] = {}
        self._trans: list[dict[str, int]] = []
        self._accepts: list[bool] = []
        self._dead = self._intern(frozenset())
        self._start = self._intern(self._close({0}))

    def _intern(self, states: frozenset[int]) -> int:
        sid = self._ids.get(states)
        if sid is None:
            sid = len(self._sets)
            self._ids[states] = sid
            self._sets.append(states)
            self._trans.append({})
            self._accepts.append(self._n in states)
        return sid

    def _next(self, sid: int, ch: str) -> int:
        nxt = self._trans[sid].get(ch)
        if nxt is None:
            states = self._step(self._sets[sid], ch)
            if len(self._sets) >= self.MAX_DFA_STATES:
                self._reset()
                return self._intern(states)  # `sid` is gone: nothing to remember it under
            nxt = self._intern(states)
            self._trans[sid][ch] = nxt
        return nxt

    # --- matching --------------------------------------------------------------------------
    def match(self, s: str) -> bool:
        """Whether the whole of `s` matches."""
        if self.literal is not None:
            return s == self.literal
        sid = self._start
        for ch in s:
            sid = self._next(sid, ch)
            if sid == self._dead:
                return False
        return self._accepts[sid]

    def prefixes(self, s: str) -> Iterator[int]:
        """The lengths of the prefixes of `s` that match, shortest first."""
        sid = self._start
        if self._accepts[sid]:
            yield 0
        for i, ch in enumerate(s):
            sid = self._next(sid, ch)
            if sid == self._dead:
                return
            if self._accepts[sid]:
                yield i + 1

    def reversed(self) -> Glob:
        """The pattern that matches the reversed strings (for suffixes); no `dirs` token."""
        assert all(t.kind != "dirs" for t in self.tokens)
        return Glob(list(reversed(self.tokens)))

    def search(self, s: str, pos: int = 0) -> tuple[int, int] | None:
        """The leftmost match in `s` from `pos` on, the longest of those: (start, end)."""
        if self.literal is not None:
            i = s.find(self.literal, pos)
            return None if i < 0 else (i, i + len(self.literal))
        start_set = self._sets[self._start]
        threads: dict[int, int] = {}  # NFA state -> the leftmost start that reached it
        best: tuple[int, int] | None = None
        i = pos
        while True:
            if best is None:
                for st in start_set:
                    threads.setdefault(st, i)
            if self._n in threads:
                b = threads[self._n]
                if best is None or b < best[0] or (b == best[0] and i > best[1]):
                    best = (b, i)
            if best is not None:
                threads = {st: b for st, b in threads.items() if b <= best[0]}
            if i >= len(s) or not threads:
                return best
            ch = s[i]
            nxt: dict[int, int] = {}
            for st, b in threads.items():
                moved: set[int] = set()
                self._moves(st, ch, moved)
                for t in self._close(moved):
                    if nxt.get(t, b) >= b:
                        nxt[t] = b
            threads = nxt
            i += 1


def compile_glob(
    pattern: str, *, globstar: bool = False, negation: str = "^", where: str = ""
) -> Glob:
    """A filepath.Match pattern (see `parse`) ready to match."""
    return Glob(parse(pattern, globstar=globstar, negation=negation, where=where))
