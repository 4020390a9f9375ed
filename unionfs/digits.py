"""Decimal numbers in text from outside (options, an image's /etc/passwd): one rule.

`str.isdigit()` accepts `²` and other scripts' digits, which `int()` refuses or
reads (`int("١٢")` is 12), and `int()` refuses more than 4300 digits with a
ValueError: a check with the one and a conversion with the other gave a
traceback where a one-line refusal was due.
"""

from __future__ import annotations

MAX_DIGITS = 4000  # within int()'s limit (4300), both ways: a message may print the number
HUGE = 10**MAX_DIGITS  # past every bound a caller checks (IDs, microseconds)


def number(text: str) -> int | None:
    """`text` as a number when it is ASCII digits only, else None; more than
    `MAX_DIGITS` significant digits read as `HUGE` (out of every caller's range, never
    an error)."""
    if not (text.isascii() and text.isdigit()):
        return None
    significant = text.lstrip("0") or "0"
    return int(significant) if len(significant) <= MAX_DIGITS else HUGE
