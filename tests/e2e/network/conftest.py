"""The network suite: real VMs against the lab's hosts (tests/netlab.py), run by
scripts/test.sh inside a network namespace of its own. ``lab`` refuses to run elsewhere."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from kata_ci.executors.network.policy import NetworkPolicy, build_policy
from kata_ci.executors.qemu.backend import QemuVM
from tests import netlab
from tests.e2e.conftest import VMFactory

ENV = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"}
LAB_DNS = (netlab.INTERNET_V4,)
CONFIG = f'[network]\ndns = ["{netlab.INTERNET_V4}"]\n'


def policy(mode: str, allow: tuple[str, ...] = (), holes: tuple[str, ...] = ()) -> NetworkPolicy:
    return build_policy(mode, allow, holes, LAB_DNS, "test")


def run(vm: QemuVM, script: str) -> tuple[str, int]:
    stream = vm.agent.exec(["sh", "-c", script], ENV)
    out = b"".join(chunk.data for chunk in stream)
    assert stream.exit is not None
    return out.decode(errors="replace"), stream.exit.exit_code


@pytest.fixture
def net_env(cli_env: dict[str, str], tmp_path: Path) -> dict[str, str]:
    """`kata-ci` subprocess environment whose resolver asks the lab's DNS server."""
    config = tmp_path / "config.toml"
    config.write_text(CONFIG)
    return {**cli_env, "KATA_CI_CONFIG": str(config)}


@pytest.fixture
def workspace() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="kci-net-", dir="/tmp"))
    os.chmod(path, 0o755)
    yield path
    for item in sorted(path.rglob("*"), reverse=True):
        item.rmdir() if item.is_dir() else item.unlink()
    path.rmdir()


NetVM = Callable[..., QemuVM]


@pytest.fixture
def net_vm(lab: netlab.Lab, vm_factory: VMFactory, workspace: Path) -> NetVM:
    def make(mode: str = "egress", allow: tuple[str, ...] = (),
             holes: tuple[str, ...] = ()) -> QemuVM:
        return vm_factory(workspace, network=policy(mode, allow, holes))
    return make
