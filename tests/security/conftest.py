"""Attacks on the host, each a test. VM-based attacks reuse the e2e fixtures (real microVMs,
``vm_factory`` owns teardown and dumps console logs on failure)."""

from tests.e2e.conftest import (  # noqa: F401  (pytest finds fixtures by name)
    backend,
    cli_env,
    make_vm,
    manifest,
    run_root,
    vm_factory,
)
