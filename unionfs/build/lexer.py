"""Variable substitution in Dockerfile words, the way BuildKit and buildah do it.

A word is processed like a shell word, minus word splitting and globbing:
single quotes keep everything literal, double quotes keep everything but `$`
and the escapes `\\"`, `\\$`, `\\\\`; outside quotes the escape character (`\\`, or
the one the `escape` directive chose) makes the next character literal. `$NAME`
and `${NAME}` expand to the variable's value (empty when unset), and the
modifiers are those of the Dockerfile reference: `${X:-word}` `${X-word}`
(default), `${X:+word}` `${X+word}` (alternative), `${X:?msg}` `${X?msg}`
(error), `${X#pat}` `${X##pat}` `${X%pat}` `${X%%pat}` (trim a prefix or
suffix) and `${X/pat/repl}` `${X//pat/repl}` (replace), patterns with `*` and `?`.

`Lexer.process` also reports which variables a word used, so that the build
cache can key a step by the build arguments it depends on.

What one word expands to is bounded (`MAX_EXPANSION`): a Containerfile whose
lines each double a variable (`ENV B=$A$A`, `ENV C=$B$B`, ...) would otherwise
grow past any memory in 40 lines; past the bound it is one line of error. So is
what all the words one `Lexer` (one build) expands take in (`MAX_BUILD_EXPANSION`):
words each under the first bound, naming a big variable thousands of times, asked
for terabytes from a 16 MiB Containerfile.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from ..errors import UserError
from .pattern import ANY_ONE, ANY_RUN, Glob, Token, literal


class SubstitutionError(UserError):
    """A malformed `${...}` or a `${X:?message}` whose variable is unset."""


MAX_EXPANSION = 1 << 20  # characters of variable values one word may take in
# ... and all the words of a build together: four image configs' worth (a config is read
# back up to 4 MiB, schema.MAX_JSON), far above what variables used as meant take in.
MAX_BUILD_EXPANSION = 16 << 20


_SPECIAL = set("@*#?-$!0")


@dataclass
class _Scan:
    text: str
    pos: int = 0

    def peek(self) -> str:
        return self.text[self.pos] if self.pos < len(self.text) else ""

    def next(self) -> str:
        ch = self.peek()
        if ch:
            self.pos += 1
        return ch


@dataclass
class Result:
    """One processed word: its value and the variables it looked up."""

    value: str
    words: list[str]
    used: set[str] = field(default_factory=set)


class _Words:
    """Whitespace splitting after expansion (quoted text stays in one word)."""

    def __init__(self) -> None:
        self.words: list[str] = []
        self.word = ""
        self.in_word = False

    def add_char(self, ch: str) -> None:
        if ch.isspace():
            if self.in_word and self.word:
                self.words.append(self.word)
                self.word = ""
                self.in_word = False
        else:
            self.add_raw(ch)

    def add_raw(self, s: str) -> None:
        self.word += s
        self.in_word = True

    def add_string(self, s: str) -> None:
        """Unquoted expanded text: split at whitespace (a whole value at once, not per
        character: values may be long)."""
        parts = re.split(r"(\s+)", s)
        for i, part in enumerate(parts):
            if not part:
                continue
            if i % 2:  # a run of whitespace
                self.add_char(part[0])
            else:
                self.add_raw(part)

    def done(self) -> list[str]:
        if self.word:
            self.words.append(self.word)
            self.word = ""
        return self.words


def _shell_glob(pattern: str) -> Glob:
    """A substitution's pattern (`*`, `?`, backslash escapes; no brackets)."""
    tokens: list[Token] = []
    i = 0
    while i < len(pattern):
        ch = pattern[i]
        i += 1
        if ch == "*":
            tokens.append(ANY_RUN)
        elif ch == "?":
            tokens.append(ANY_ONE)
        elif ch == "\\":
            if i < len(pattern) and pattern[i] in "}/":
                continue
            nxt = pattern[i] if i < len(pattern) else ""
            i += 1
            if nxt not in ("*", "?", "\\"):
                raise SubstitutionError(f"invalid escape '\\{nxt}' in pattern {pattern!r}")
            tokens.append(literal(nxt))
        else:
            tokens.append(literal(ch))
    return Glob(tokens)


def _replace(glob: Glob, value: str, repl: str, replace_all: bool) -> str:
    """`${X/pat/repl}`: the leftmost-longest match replaced (every one with `//`); an
    empty match right after a match is not replaced, as in Go and the shell."""
    out: list[str] = []
    done = at = 0
    prev_end = -1
    while at <= len(value):
        m = glob.search(value, at)
        if m is None:
            break
        start, end = m
        if start == end == prev_end:
            at = end + 1
            continue
        out += [value[done:start], repl]
        done = prev_end = end
        if not replace_all:
            break
        at = end if end > start else end + 1
    out.append(value[done:])
    return "".join(out)


class Lexer:
    """Expands variables in words; `escape` is the Dockerfile's escape character."""

    def __init__(self, escape: str = "\\") -> None:
        self.escape = escape
        self.expanded = 0  # characters of values all its words took in (MAX_BUILD_EXPANSION)

    def process(self, word: str, env: dict[str, str]) -> Result:
        state = _State(self.escape, env, _Scan(word), MAX_BUILD_EXPANSION - self.expanded)
        try:
            value, words = state.until("", raw_escapes=False)
        except SubstitutionError as e:
            raise SubstitutionError(f"{e} (in {word!r})") from None
        finally:
            self.expanded += state.expanded
        return Result(value, words, state.used)

    def word(self, word: str, env: dict[str, str]) -> str:
        return self.process(word, env).value


class _State:
    def __init__(self, escape: str, env: dict[str, str], scan: _Scan, left: int) -> None:
        self.escape = escape
        self.env = env
        self.scan = scan
        self.raw_escapes = False
        self.used: set[str] = set()
        self.expanded = 0  # characters of values taken in so far (MAX_EXPANSION)
        self.left = left  # what the build's other words left of MAX_BUILD_EXPANSION

    def lookup(self, name: str) -> tuple[str, bool]:
        if name in self.env:
            self.used.add(name)
            value = self.env[name]
            self.expanded += len(value)
            if self.expanded > MAX_EXPANSION:
                raise SubstitutionError(f"expands to more than {MAX_EXPANSION} characters")
            if self.expanded > self.left:
                raise SubstitutionError(
                    "the Containerfile's variables expand to more than "
                    f"{MAX_BUILD_EXPANSION} characters in all"
                )
            return value, True
        return "", False

    def until(self, stop: str, raw_escapes: bool) -> tuple[str, list[str]]:
        """Process up to `stop` (consumed) or the end of the word when `stop` is ''."""
        saved, self.raw_escapes = self.raw_escapes, raw_escapes
        try:
            return self._until(stop)
        finally:
            self.raw_escapes = saved

    def _until(self, stop: str) -> tuple[str, list[str]]:
        out: list[str] = []
        words = _Words()
        sc = self.scan
        while sc.peek():
            ch = sc.peek()
            if stop and ch == stop:
                sc.next()
                return "".join(out), words.done()
            if ch == "$":
                tmp = self.dollar()
                out.append(tmp)
                words.add_string(tmp)
            elif ch == "'":
                tmp = self.single_quote()
                out.append(tmp)
                words.add_raw(tmp)
            elif ch == '"':
                tmp = self.double_quote()
                out.append(tmp)
                words.add_raw(tmp)
            else:
                ch = sc.next()
                if ch == self.escape:
                    if self.raw_escapes:
                        words.add_raw(ch)
                        out.append(ch)
                    ch = sc.next()
                    if not ch:
                        break
                    words.add_raw(ch)
                else:
                    words.add_char(ch)
                out.append(ch)
        if stop:
            raise SubstitutionError(
                f"unexpected end of statement while looking for matching {stop}"
            )
        return "".join(out), words.done()

    def single_quote(self) -> str:
        sc = self.scan
        sc.next()
        out: list[str] = []
        while True:
            ch = sc.next()
            if not ch:
                raise SubstitutionError(
                    "unexpected end of statement while looking for matching single-quote"
                )
            if ch == "'":
                return "".join(out)
            out.append(ch)

    def double_quote(self) -> str:
        sc = self.scan
        sc.next()
        out: list[str] = []
        while True:
            ch = sc.peek()
            if not ch:
                raise SubstitutionError(
                    "unexpected end of statement while looking for matching double-quote"
                )
            if ch == '"':
                sc.next()
                return "".join(out)
            if ch == "$":
                out.append(self.dollar())
                continue
            ch = sc.next()
            if ch == self.escape:
                if self.raw_escapes:
                    out.append(ch)
                nxt = sc.peek()
                if not nxt:
                    continue
                if nxt in ('"', "$", self.escape):
                    ch = sc.next()
            out.append(ch)

    def name(self) -> str:
        sc = self.scan
        out = ""
        while sc.peek():
            ch = sc.peek()
            if not out and ch.isdigit():
                while sc.peek() and sc.peek().isdigit():
                    out += sc.next()
                return out
            if not out and ch in _SPECIAL:
                return sc.next()
            if not (ch.isalnum() or ch == "_"):
                break
            out += sc.next()
        return out

    def dollar(self) -> str:
        sc = self.scan
        sc.next()
        if sc.peek() != "{":
            name = self.name()
            if not name:
                return "$"
            return self.lookup(name)[0]
        sc.next()
        if not sc.peek():
            raise SubstitutionError("syntax error: missing '}'")
        if sc.peek() in "{}:":
            raise SubstitutionError("syntax error: bad substitution")
        name = self.name()
        ch = sc.next()
        if ch == "}":
            return self.lookup(name)[0]
        mod = ch
        null_is_unset = False
        if ch == ":":
            null_is_unset = True
            ch = sc.next()
            mod += ch
            if ch not in "+-?":
                raise SubstitutionError(f"unsupported modifier ({mod}) in substitution")
        if ch and ch in "+-?#%":
            try:
                word, _ = self.until("}", raw_escapes=ch in "#%")
            except SubstitutionError:
                if not sc.peek():
                    raise SubstitutionError("syntax error: missing '}'") from None
                raise
            value, is_set = self.lookup(name)
            empty = not is_set or (null_is_unset and value == "")
            if ch == "-":
                return word if empty else value
            if ch == "+":
                return "" if empty else word
            if ch == "?":
                if empty:
                    what = (
                        "is not allowed to be unset" if not is_set else "is not allowed to be empty"
                    )
                    raise SubstitutionError(f"{name}: {word or what}")
                return value
            greedy = word.startswith(ch)
            if greedy:
                word = word[1:]
            # Shortest/longest prefix; a suffix is a prefix of the reversed value.
            glob = _shell_glob(word)
            if ch == "#":
                ends = list(glob.prefixes(value))
                return value[ends[-1 if greedy else 0] :] if ends else value
            ends = list(glob.reversed().prefixes(value[::-1]))
            return value[: len(value) - ends[-1 if greedy else 0]] if ends else value
        if ch == "/":
            replace_all = sc.peek() == "/"
            if replace_all:
                sc.next()
            try:
                pattern, _ = self.until("/", raw_escapes=True)
            except SubstitutionError:
                raise SubstitutionError("syntax error: missing '/' in ${}") from None
            try:
                repl, _ = self.until("}", raw_escapes=True)
            except SubstitutionError:
                raise SubstitutionError("syntax error: missing '}'") from None
            value, _ = self.lookup(name)
            return _replace(_shell_glob(pattern), value, repl, replace_all)
        if not ch:
            raise SubstitutionError("syntax error: missing '}'")
        raise SubstitutionError(f"unsupported modifier ({mod}) in substitution")
