#!/usr/bin/env bash
# The test command (README, .ci/run): set-up if needed, then the cheap checks first (lint,
# types, unit, integration), then the real-VM suite in snapshot mode (the default start), then
# a smoke subset again with every VM cold-booted.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/lint.sh
.venv/bin/kata-ci doctor
.venv/bin/python -m pytest -q -p no:cacheprovider tests/unit tests/integration
.venv/bin/python -m pytest -q -p no:cacheprovider tests/security tests/e2e
cold=$(mktemp --suffix=.toml)
trap 'rm -f "$cold"' EXIT
printf '[vm]\nstart = "cold"\n' >"$cold"
KATA_CI_CONFIG=$cold .venv/bin/python -m pytest -q -p no:cacheprovider \
  tests/e2e/test_vm.py tests/e2e/test_cli_run.py
