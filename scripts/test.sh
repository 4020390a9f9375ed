#!/usr/bin/env bash
# Install what is needed, then run the whole test suite. Extra arguments go to pytest
# (`-m "not mount"`: only the fast tier, no root or FUSE needed).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh

# Gates before the tests: lint, formatting and types (versions pinned in pyproject.toml's
# test extra). Fix what they report rather than silencing it.
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/mypy --strict unionfs/

# pytest's default base temp (/tmp/pytest-of-USER) is shared by every checkout, and a
# session removes what older sessions left there: concurrent runs from two checkouts
# would delete each other's directories. Each checkout gets its own, unless given one.
args=("$@")
basetemp=1
for a in "${args[@]}"; do
    case "$a" in --basetemp|--basetemp=*) basetemp=0 ;; esac
done
if [ "$basetemp" = 1 ]; then
    # Short: some tools under test limit their paths (podman's runroot: 50 characters).
    key=$(printf '%s' "$PWD" | sha256sum | cut -c1-8)
    args=("--basetemp=${TMPDIR:-/tmp}/pyt-$(id -u)-$key" "${args[@]}")
fi
exec .venv/bin/python -m pytest "${args[@]}"
