"""`pyunion build`: a Containerfile becomes a layered image in the store.

Modules: `parse` (the Containerfile, through BuildKit's parser), `lexer`
(variable substitution), `instructions` (metadata steps and variable scopes),
`ignore` (.dockerignore rules), `sources` (what COPY reads, and its digest),
`copier` (writing into a container's root), `layer` (an upper as a store layer),
`cache` (step results by key), `executor` (stages and steps), `cli`.
"""

from __future__ import annotations

from .executor import BuildError, BuildOptions, build

__all__ = ["BuildError", "BuildOptions", "build"]
