"""JSON from outside pyunion, parsed by one strict parser.

Image documents, registry answers (errors, tokens), credential files, seccomp
profiles, the build cache and JSON given on the command line are all written by
someone else. The stdlib's parser accepts NaN and Infinity and recurses once per
nesting level, so 100,000 `[` end in a RecursionError raised from deep inside it;
every caller would have to remember that. `parse` is strict as containers/image
is (UTF-8, no NaN or Infinity, no number out of range) and bounds the nesting
(msgspec stops at the interpreter's recursion limit): any bad document is one
`JSONError` whose message names it. The size is the caller's to bound: it knows
how much it may read.
"""

from __future__ import annotations

from typing import Any

import msgspec

from .errors import UserError


class JSONError(UserError):
    """A document that is not strict JSON, as one line naming it."""


def parse(data: bytes | str, what: str) -> Any:
    """`data` as plain JSON values (dicts, lists, str, int, float, bool, None)."""
    try:
        return msgspec.json.decode(data)
    except msgspec.DecodeError as e:
        raise JSONError(f"{what} is not valid JSON: {e}") from None
    except RecursionError:
        raise JSONError(f"{what} is nested too deeply") from None


def parse_object(data: bytes | str, what: str) -> dict[str, Any]:
    """`parse` for a document that must be a JSON object."""
    obj = parse(data, what)
    if not isinstance(obj, dict):
        raise JSONError(f"{what} is not a JSON object")
    return obj
