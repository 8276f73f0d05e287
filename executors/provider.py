"""``VMProvider``: where the job lifecycle gets a running VM and gives it back.

Between the lifecycle and the ``Backend``: the lifecycle asks for a VM of a size over a
workspace and gets one whose agent answers; how it came to be is the provider's business.
Today every VM is cold-booted; the warm-start issue replaces the inside of ``acquire`` (restore
from a snapshot, a pre-restored pool), not its callers.
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from kata_ci import paths
from kata_ci.executors.base import VM, Backend, VMSpec
from kata_ci.images.build import load_current

Notify = Callable[[str], None]


@dataclass(frozen=True)
class VMRequest:
    """What one job needs of its VM."""

    workspace: Path
    guest_workdir: str | None
    vcpus: int
    memory_mib: int
    boot_timeout: float
    network: Literal["none"] = "none"


class VMProvider(abc.ABC):
    @abc.abstractmethod
    def acquire(self, request: VMRequest, on_created: Callable[[VM], None]) -> VM:
        """A started VM whose agent answers, or SystemFailure. ``on_created`` gets the VM
        before it boots, so that a cancel can kill it mid-boot. Whatever happens (failure,
        KeyboardInterrupt), nothing is left behind when this raises."""

    @abc.abstractmethod
    def release(self, vm: VM, graceful: bool) -> None:
        """Give the VM back: ``graceful`` lets the guest sync first. Every host resource is
        gone afterwards; never raises."""


class ColdBootProvider(VMProvider):
    """A fresh VM per job, booted from the images."""

    def __init__(self, backend: Backend, base: VMSpec) -> None:
        self.backend = backend
        self.base = base

    def acquire(self, request: VMRequest, on_created: Callable[[VM], None]) -> VM:
        spec = dataclasses.replace(self.base, workspace=request.workspace,
                                   guest_workdir=request.guest_workdir, vcpus=request.vcpus,
                                   memory_mib=request.memory_mib, network=request.network)
        vm = self.backend.create(spec)
        try:
            on_created(vm)
            vm.start(request.boot_timeout)
        except BaseException:
            vm.kill()
            raise
        return vm

    def release(self, vm: VM, graceful: bool) -> None:
        try:
            if graceful:
                vm.stop()
        except Exception:  # stop is best effort; kill below is what must happen
            pass
        finally:
            vm.kill()


def open_provider(accel: str, notify: Notify, max_file_size: int | None = None) -> VMProvider:
    """Once per process: images, acceleration, and the VMs of earlier kata-ci processes that
    were killed outright. UserError when this host cannot run VMs (nothing was started)."""
    from kata_ci.executors.qemu.accel import choose
    from kata_ci.executors.qemu.backend import QemuBackend, reap_orphans

    cache = paths.cache_dir()
    manifest = load_current(cache)
    run_root = paths.run_dir()
    for vm_id in reap_orphans(run_root):
        notify(f"removed VM {vm_id} left by a kata-ci process that no longer runs")
    decision = choose(accel, manifest, cache, run_root)
    if decision.fresh and decision.accel == "tcg":
        notify(f"using TCG software emulation, not KVM: {decision.reason} "
               "Jobs run several times slower; `kata-ci doctor` explains.")
    base = VMSpec(kernel=Path(manifest.kernel.path), initramfs=Path(manifest.initramfs.path),
                  rootfs=Path(manifest.rootfs.path), max_file_size=max_file_size)
    return ColdBootProvider(QemuBackend(decision.accel, run_root, Path(manifest.tools.path)),
                            base)
