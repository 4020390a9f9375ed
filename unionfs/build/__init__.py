"""`pyunion build`: a Containerfile becomes a layered image in the store.

Modules: `parse` (the Containerfile, through BuildKit's parser), `lexer`
(variable substitution), `instructions` (metadata steps and variable scopes),
`ignore` (.dockerignore rules), `sources` (what COPY reads, and its digest),
`copier` (writing into a container's root), `layer` (an upper as a store layer),
`cache` (step results by key), `executor` (stages and steps), `cli`.

The names below are loaded on first use, so that registering the `build`
subcommand costs other commands nothing at start-up.
"""

from __future__ import annotations

from typing import Any

__all__ = ["BuildError", "BuildOptions", "build"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from . import executor

        return getattr(executor, name)
    raise AttributeError(name)
