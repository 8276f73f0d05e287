"""Real microVMs. The images must be built (`kata-ci images build`; .ci/run does it): a
missing image fails these tests rather than skipping them, so CI cannot pass vacuously.

``vm_factory`` owns teardown (like firecracker's tests/framework): every VM it made is killed
after the test, and when the test failed, each VM's console and backend logs are printed.

Start mode: like `kata-ci run`, from the config ($KATA_CI_CONFIG, ``[vm] start``). In snapshot
mode (the default) every VM with a workspace is restored from its size's template, built on
first use; scripts/test.sh runs a smoke subset again with start = "cold".
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from kata_ci import paths
from kata_ci.executors.base import VMSpec
from kata_ci.executors.provider import SnapshotProvider
from kata_ci.executors.qemu.accel import choose
from kata_ci.executors.qemu.backend import QemuBackend, QemuVM
from kata_ci.executors.templates import TemplateStore
from kata_ci.images.artifacts import Manifest
from kata_ci.images.build import load_current
from kata_ci.runner.core import config as config_mod

KATA_CI = [sys.executable, "-m", "kata_ci.runner.cli"]


def stop_process(proc: subprocess.Popen[bytes] | None, timeout: float,
                 sig: int = signal.SIGTERM) -> None:
    """Stop a kata-ci process a test started: ``sig``, ``timeout`` s to exit, then SIGKILL.
    Nothing to do when it was never started or has exited."""
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(sig)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="session")
def manifest() -> Manifest:
    return load_current(paths.cache_dir())


@pytest.fixture(scope="session")
def run_root() -> Iterator[Path]:
    # Short: unix socket paths must fit in 108 bytes.
    root = Path(tempfile.mkdtemp(prefix="kci-e2e-", dir="/tmp"))
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def backend(manifest: Manifest, run_root: Path) -> QemuBackend:
    decision = choose("auto", manifest, paths.cache_dir(), run_root)
    return QemuBackend(decision.accel, run_root, Path(manifest.tools.path))


VMFactory = Callable[..., QemuVM]
MakeVM = Callable[[VMSpec], QemuVM]


@pytest.fixture(scope="session")
def make_vm(backend: QemuBackend, manifest: Manifest) -> MakeVM:
    """A VM for ``spec``, not started: restored from a template (snapshot mode, workspace
    given, snapshots possible here) or cold-booted."""
    snapshots = config_mod.load().vm.start == "snapshot" and backend.snapshot_problem() is None
    base = VMSpec(kernel=Path(manifest.kernel.path), initramfs=Path(manifest.initramfs.path),
                  rootfs=Path(manifest.rootfs.path))
    provider = SnapshotProvider(backend, base, TemplateStore(paths.cache_dir() / "templates"),
                                lambda message: print(message, file=sys.stderr))

    def make(spec: VMSpec) -> QemuVM:
        if not snapshots or spec.workspace is None:
            return backend.create(spec)
        template = provider.template(spec)
        return backend.restore(spec, template.file)

    return make


@pytest.fixture
def vm_factory(request: pytest.FixtureRequest, manifest: Manifest,
               make_vm: MakeVM) -> Iterator[VMFactory]:
    made: list[QemuVM] = []

    def make(workspace: Path | None = None, **kw: object) -> QemuVM:
        spec = VMSpec(kernel=Path(manifest.kernel.path), initramfs=Path(manifest.initramfs.path),
                      rootfs=Path(manifest.rootfs.path), workspace=workspace,
                      **kw)  # type: ignore[arg-type]
        vm = make_vm(spec)
        made.append(vm)
        vm.start(timeout=120)
        return vm

    yield make
    failed = getattr(request.node, "rep_call", None) is not None and request.node.rep_call.failed
    for vm in made:
        if failed:
            print(f"\n=== VM {vm.id} diagnostics ===\n{vm.diagnostics(60)}", file=sys.stderr)
        vm.kill()


@pytest.fixture
def cli_env(run_root: Path) -> dict[str, str]:
    """Environment for `kata-ci` subprocesses: a private run dir to prove nothing is left."""
    run_dir = Path(tempfile.mkdtemp(prefix="r-", dir=run_root))
    return {**os.environ, "KATA_CI_RUN_DIR": str(run_dir)}


def leftovers(env: dict[str, str]) -> list[str]:
    """Anything a finished `kata-ci run` left: files in its run dir, processes naming it."""
    run_dir = env["KATA_CI_RUN_DIR"]
    found = [f"file {p}" for p in Path(run_dir).rglob("*")]
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if run_dir.encode() in cmdline and int(pid) != os.getpid():
            shown = cmdline.replace(b"\0", b" ")[:120]
            found.append(f"process {pid}: {shown!r}")
    return found


def kata_ci_run(args: list[str], env: dict[str, str], cwd: Path,
                timeout: float = 300) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([*KATA_CI, "run", *args], env=env, cwd=cwd, capture_output=True,
                          timeout=timeout)
