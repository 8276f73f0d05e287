#!/usr/bin/env bash
# The test command (README, .ci/run): set-up if needed, then the cheap checks first (lint,
# types, unit, integration), then the real-VM suite in snapshot mode (the default start), then
# the network suite inside a network namespace of its own (its only hosts are the ones it
# makes: no packet can reach a real address), then a smoke subset with every VM cold-booted,
# then the ansible playbook against a real Debian 12 target (tests/deploy/).
# Outside the network suite, jobs run with network = "none": those tests need no uplink.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/lint.sh
.venv/bin/kata-ci doctor
.venv/bin/python -m pytest -q -p no:cacheprovider tests/unit tests/integration
offline=$(mktemp --suffix=.toml)
cold=$(mktemp --suffix=.toml)
trap 'rm -f "$offline" "$cold"' EXIT
printf '[vm]\nnetwork = "none"\n' >"$offline"
printf '[vm]\nstart = "cold"\nnetwork = "none"\n' >"$cold"
KATA_CI_CONFIG=$offline .venv/bin/python -m pytest -q -p no:cacheprovider \
  --ignore=tests/e2e/network --ignore=tests/security/network tests/security tests/e2e
unshare --net --mount --propagation private -- \
  .venv/bin/python -m pytest -q -p no:cacheprovider tests/e2e/network tests/security/network
KATA_CI_CONFIG=$cold .venv/bin/python -m pytest -q -p no:cacheprovider \
  tests/e2e/test_vm.py tests/e2e/test_cli_run.py
bash scripts/test-ansible.sh -q  # the playbook on a fresh Debian 12 container (~4 min)
