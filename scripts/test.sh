#!/usr/bin/env bash
# The test command (README, .ci/run): set-up if needed, then the cheap checks first (lint,
# types, unit, integration), then the real-VM suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/lint.sh
.venv/bin/kata-ci doctor
.venv/bin/python -m pytest -q -p no:cacheprovider tests/unit tests/integration
.venv/bin/python -m pytest -q -p no:cacheprovider tests/security tests/e2e
