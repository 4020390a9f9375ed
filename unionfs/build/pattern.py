"""Glob patterns, matched in linear time: COPY/ADD sources, ignore files, `${X#pat}`.

The pattern language of COPY/ADD sources and of ignore files is Go's
filepath.Match: `*` matches within one path component, `?` one character,
`[...]` a class (`[^...]` its complement), `\\` escapes the next character.
Ignore files add `**` (any number of components, moby/patternmatcher); as in
Go, `[!...]` is a class holding `!`, not a complement. The substitutions
`${X#pat}`, `${X%pat}` and `${X/pat/repl}` take `*` and `?` matching any
character (the lexer parses their syntax).

Every pattern becomes a `Glob`: a list of tokens run as an NFA whose sets of
states are bitsets, the steps met kept as DFA transitions up to a bound (as
RE2 does, and Docker's matchers are Go's linear-time regexp). A name costs one
dict lookup per character once its transitions are known, and a few big-int
operations otherwise: at worst O(len(name) * len(pattern) / 64), whatever the
pattern. A backtracking regex took exponential time on `**/**/**/.../x` against a deep
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


def parse(pattern: str, *, globstar: bool = False, where: str = "") -> list[Token]:
    """The tokens of a filepath.Match pattern (`globstar`: with `**`)."""
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
            negate = j < n and pattern[j] == "^"  # only `^`: Go's `[!a]` is `!` or `a`
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
    """A compiled pattern: whole-string, prefix and leftmost-longest matches.

    A set of NFA states is an int, bit i set when the state is in it, so one step
    of the NFA is a few big-int operations whatever the pattern's size. Steps met
    are kept as DFA transitions up to a bound; past it they are computed again,
    never thrown away: a pattern whose DFA would be huge (`**/*a???...?`) was
    rebuilt over and over, each character a pure-Python walk over its states.
    """

    MAX_DFA_TRANSITIONS = 8192  # kept per pattern (memory bound); more run as the NFA

    def __init__(self, tokens: list[Token]) -> None:
        self.tokens = tuple(tokens)
        lit = [t.literal for t in tokens]
        self.literal = "".join(c for c in lit if c is not None) if None not in lit else None
        # NFA state i is "before token i", n accepts, n+1+i is "inside `dirs` token i".
        n = self._n = len(tokens)
        self._eps = sum(1 << i for i, t in enumerate(tokens) if t.kind != "one")
        self._dirs = sum(1 << i for i, t in enumerate(tokens) if t.kind == "dirs")
        self._accept = 1 << n
        self._low = (1 << (n + 1)) - 1  # the states before a token, and accepting
        self._masks: dict[str, tuple[int, int]] = {}
        self._trans: dict[int, dict[str, int]] = {}
        self._kept = 0
        self.start = self._close(1)

    def _close(self, states: int) -> int:
        """With the states reached through `star` and `dirs` tokens (empty matches).

        Adding the set bits of a run of such tokens to the run carries through it:
        each bit that changes is a state reached from one below it in the run."""
        return states | ((self._eps + (states & self._eps)) ^ self._eps)

    def _char_masks(self, ch: str) -> tuple[int, int]:
        """The `one` and the `star` tokens that take `ch`."""
        masks = self._masks.get(ch)
        if masks is None:
            one = star = 0
            for i, t in enumerate(self.tokens):
                if t.kind != "dirs" and t.test(ch):
                    if t.kind == "one":
                        one |= 1 << i
                    else:
                        star |= 1 << i
            masks = (one, star)
            if len(self._masks) < self.MAX_DFA_TRANSITIONS:
                self._masks[ch] = masks
        return masks

    def _step(self, states: int, ch: str) -> int:
        """The NFA states after `ch` from `states`."""
        one, star = self._char_masks(ch)
        n1 = self._n + 1
        dirs = states & self._dirs
        out = ((states & one) << 1) | (states & star) | (dirs << n1) | (states & ~self._low)
        if ch == "/":
            out |= (dirs << 1) | ((states >> n1) << 1)
        return self._close(out)

    # --- the DFA: the steps already met -------------------------------------------------
    def advance(self, states: int, s: str) -> int:
        """The states after reading `s` from `states` (0: nothing can match any more)."""
        trans = self._trans
        for ch in s:
            if not states:
                return 0
            row = trans.get(states)
            nxt = row.get(ch) if row is not None else None
            if nxt is None:
                nxt = self._step(states, ch)
                if self._kept < self.MAX_DFA_TRANSITIONS:
                    self._kept += 1
                    trans.setdefault(states, {})[ch] = nxt
            states = nxt
        return states

    def accepts(self, states: int) -> bool:
        return bool(states & self._accept)

    # --- matching --------------------------------------------------------------------------
    def match(self, s: str) -> bool:
        """Whether the whole of `s` matches."""
        if self.literal is not None:
            return s == self.literal
        return self.accepts(self.advance(self.start, s))

    def prefixes(self, s: str) -> Iterator[int]:
        """The lengths of the prefixes of `s` that match, shortest first."""
        states = self.start
        if self.accepts(states):
            yield 0
        for i, ch in enumerate(s):
            states = self.advance(states, ch)
            if not states:
                return
            if self.accepts(states):
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
        threads: dict[int, int] = {}  # start -> the states reached from it and no earlier one
        best: tuple[int, int] | None = None
        i = pos
        while True:
            if best is None:
                threads[i] = self.start & ~self._union(threads)
            for b, states in threads.items():
                if self.accepts(states) and (best is None or b < best[0] or i > best[1]):
                    best = (b, i)
                    break  # starts are in order: a later one is not leftmost
            if best is not None:
                threads = {b: st for b, st in threads.items() if b <= best[0]}
            threads = {b: st for b, st in threads.items() if st}
            if i >= len(s) or not threads:
                return best
            ch = s[i]
            seen = 0
            nxt: dict[int, int] = {}
            for b, states in threads.items():  # earliest start first: it keeps a state
                moved = self.advance(states, ch) & ~seen
                seen |= moved
                nxt[b] = moved
            threads = nxt
            i += 1

    @staticmethod
    def _union(threads: dict[int, int]) -> int:
        out = 0
        for states in threads.values():
            out |= states
        return out


def compile_glob(pattern: str, *, globstar: bool = False, where: str = "") -> Glob:
    """A filepath.Match pattern (see `parse`) ready to match."""
    return Glob(parse(pattern, globstar=globstar, where=where))
