#!/usr/bin/env bash
# ruff + mypy --strict. mypy cannot follow setuptools' package-dir mapping (runner/ installs as
# kata_ci.runner, ...), so it checks a symlinked view of the kata_ci namespace under build/.
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-.venv/bin/python}
"$py" -m ruff check .
view=build/typecheck/kata_ci
rm -rf build/typecheck && mkdir -p "$view"
for f in kata_ci/*.py; do ln -s "$PWD/$f" "$view/"; done
for d in runner executors guest images; do ln -s "$PWD/$d" "$view/$d"; done
ln -s "$PWD/tests" build/typecheck/tests
cd build/typecheck && MYPYPATH=. "../../$py" -m mypy --config-file ../../pyproject.toml -p kata_ci -p tests
