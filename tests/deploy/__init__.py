"""Deployment tests: ansible/site.yml against a real Debian 12 target (scripts/test-ansible.sh)."""
