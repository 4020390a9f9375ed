"""Go's filepath.Match: the pattern language of COPY/ADD sources and of ignore files.

`*` matches within one path component, `?` one character, `[...]` a class
(`[^...]` its complement), `\\` escapes the next character. Ignore files add
`**` (any number of components, moby/patternmatcher) and also take `[!...]`.
"""

from __future__ import annotations

import re

from ..errors import UserError


def translate(pattern: str, *, globstar: bool = False, negation: str = "^", where: str = "") -> str:
    """The regular expression (without anchors) that matches what `pattern` matches."""
    out = ""
    i, n = 0, len(pattern)
    while i < n:
        ch = pattern[i]
        i += 1
        if ch == "*":
            if globstar and i < n and pattern[i] == "*":
                i += 1
                if i < n and pattern[i] == "/":
                    i += 1
                out += ".*" if i >= n else "(.*/)?"
            else:
                out += "[^/]*"
        elif ch == "?":
            out += "[^/]"
        elif ch == "\\" and i < n:
            out += re.escape(pattern[i])
            i += 1
        elif ch == "[":
            j = i
            if j < n and pattern[j] in negation:
                j += 1
            if j < n and pattern[j] == "]":
                j += 1
            while j < n and pattern[j] != "]":
                j += 1
            if j >= n:
                raise UserError(f"bad pattern {pattern!r}{where}: unclosed '['")
            body = pattern[i:j]
            if body[:1] in tuple(negation):
                body = "^" + body[1:]
            out += "[" + body.replace("\\", "\\\\") + "]"
            i = j + 1
        else:
            out += re.escape(ch)
    return out
