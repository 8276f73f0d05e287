#!/usr/bin/env bash
# The deployment test (tests/deploy/test_ansible.py): ansible/site.yml run twice against a fresh
# Debian 12 host, a systemd-nspawn container booted from a debootstrap tree, as broker and
# worker at once. Proves that the playbook deploys (Redis, kata-ci and its images, the units
# of worker, status page, `gitlab run`, `github serve`), that its second run reports
# changed=0, that every service is active afterwards, and (second test) that a job submitted
# there runs in a microVM.
#
#   sudo scripts/test-ansible.sh [pytest options]
#
# Needs root, debootstrap and systemd-container (scripts/setup.sh installs both), Debian's
# mirrors and PyPI, and this host's guest images and tools (`kata-ci images build`): the
# container gets the images read-only and builds only what it lacks, and its network goes
# out through the tools' pasta. Takes ~4 min (~5 the first time: debootstrap; the Debian
# tree is cached under ~/.cache/kata-ci/ansible-target/). The whole output is also written
# to $KATA_CI_ANSIBLE_LOG (default /tmp/ansible-last-run.txt). tests/deploy/target.py says
# what the container is allowed and why.
set -euo pipefail
cd "$(dirname "$0")/.."
export KATA_CI_ANSIBLE_TEST=1
log=${KATA_CI_ANSIBLE_LOG:-/tmp/ansible-last-run.txt}
started=$(date +%s)
status=0
.venv/bin/python -m pytest -p no:cacheprovider -s -v tests/deploy/test_ansible.py "$@" 2>&1 \
  | tee "$log" || status=$?
echo "scripts/test-ansible.sh: exit $status after $(( $(date +%s) - started ))s" | tee -a "$log"
exit "$status"
