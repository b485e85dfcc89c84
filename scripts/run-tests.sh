#!/usr/bin/env bash
# The whole test suite: install everything, lint and type-check, then pytest (unit and end-to-end).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
# The venv's tools (cython for the aarch64 cross-build test) come first.
export PATH="$PWD/.venv/bin:$PATH"
.venv/bin/ruff check .
.venv/bin/ruff format --check .
# cython-lint runs pycodestyle from PATH (the venv's, above)
git ls-files -z '*.pyx' '*.pxd' | xargs -0 .venv/bin/cython-lint
.venv/bin/mypy  # the xvf package, settings in pyproject.toml ([tool.mypy])
.venv/bin/python -m pytest -p no:cacheprovider -q "$@"
