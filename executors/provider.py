"""``VMProvider``: where the job lifecycle gets a running VM and gives it back.

Between the lifecycle and the ``Backend``: the lifecycle asks for a VM of a size over a
workspace and gets one whose agent answers; how it came to be is the provider's business.
``ColdBootProvider`` boots every VM from the images; ``SnapshotProvider`` restores each from
a template of its size (built once, kept in the cache) and boots cold when it cannot.
"""

from __future__ import annotations

import abc
import contextlib
import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

from kata_ci import paths
from kata_ci.errors import RestoreFailed, RestoreStalled, SystemFailure
from kata_ci.executors.base import VM, Backend, VMSpec
from kata_ci.executors.network.policy import NONE, NetworkPolicy
from kata_ci.executors.templates import Template, TemplateStore
from kata_ci.images.artifacts import Manifest
from kata_ci.images.build import load_current
from kata_ci.images.oci.registry import RegistryConfig
from kata_ci.images.oci.store import ImageStore

StartMode = Literal["snapshot", "cold"]
TEMPLATE_TIMEOUT = 300.0  # boot + save of a template, under TCG on a loaded host

Notify = Callable[[str], None]


@dataclass(frozen=True)
class VMRequest:
    """What one job needs of its VM."""

    workspace: Path
    guest_workdir: str | None
    vcpus: int
    memory_mib: int
    boot_timeout: float
    network: NetworkPolicy = NONE
    workspace_ids: tuple[int, int] = (0, 0)  # VMSpec.workspace_ids


class VMListener(Protocol):
    """Told of every VM the provider hands out and takes back (metrics, job milestones);
    called in the job's thread. A listener that raises is the listener's bug: ignored."""

    def started(self, vm: VM) -> None: ...  # its agent answered; vm.boot_times is set

    def released(self, vm: VM) -> None: ...  # gone, every host resource with it


class VMProvider(abc.ABC):
    # OCI images jobs run in (images/oci/): the host's one cache, made at first use.
    registries = RegistryConfig()
    pull_policy = "always"
    image_progress: Notify | None = None
    _images: ImageStore | None = None
    _listeners: tuple[VMListener, ...] = ()

    def listen(self, listener: VMListener) -> None:
        self._listeners = (*self._listeners, listener)

    def _tell(self, event: str, vm: VM) -> None:
        for listener in self._listeners:
            with contextlib.suppress(Exception):
                getattr(listener, event)(vm)

    def image_store(self) -> ImageStore:
        if self._images is None:
            self._images = ImageStore(paths.cache_dir() / "oci", self.registries,
                                      self.image_progress)
        return self._images

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

    mode = "cold"

    def __init__(self, backend: Backend, base: VMSpec, why: str = "") -> None:
        self.backend = backend
        self.base = base
        self.why = why  # why not from snapshots, for `doctor` and notes

    def spec(self, request: VMRequest) -> VMSpec:
        return dataclasses.replace(self.base, workspace=request.workspace,
                                   guest_workdir=request.guest_workdir, vcpus=request.vcpus,
                                   memory_mib=request.memory_mib, network=request.network,
                                   workspace_ids=request.workspace_ids)

    def acquire(self, request: VMRequest, on_created: Callable[[VM], None]) -> VM:
        return self._start(self.backend.create(self.spec(request)), request, on_created)

    def prepare(self, sizes: list[tuple[int, int, bool]]) -> list[str]:
        """Ahead of need (worker start, `images build`): nothing to do for cold boots."""
        return []

    def _start(self, vm: VM, request: VMRequest, on_created: Callable[[VM], None]) -> VM:
        try:
            on_created(vm)
            vm.boot_times = vm.start(request.boot_timeout)
        except BaseException:
            vm.kill()
            raise
        self._tell("started", vm)
        return vm

    def release(self, vm: VM, graceful: bool) -> None:
        try:
            if graceful:
                vm.stop()
        except Exception:  # stop is best effort; kill below is what must happen
            pass
        finally:
            vm.kill()
            self._tell("released", vm)


class SnapshotProvider(ColdBootProvider):
    """Each VM restored from the template of its size: a fresh VMM process and file server
    per job, the agent reseeded and the workspace mounted by RPC. A template missing or made
    from other inputs is built first (once per host and size); one that fails to restore is
    removed and the job boots cold, with a note."""

    mode = "snapshot"

    def __init__(self, backend: Backend, base: VMSpec, store: TemplateStore,
                 notify: Notify) -> None:
        super().__init__(backend, base)
        self.store = store
        self.notify = notify
        # Per process: a template that cannot be built is tried once; one rebuilt after a
        # failed restore that fails again is not built again (jobs boot cold, said once each).
        self.unbuildable: dict[str, str] = {}
        self.restore_failures: dict[str, int] = {}

    def acquire(self, request: VMRequest, on_created: Callable[[VM], None]) -> VM:
        spec = self.spec(request)
        try:
            template = self.template(spec)
        except SystemFailure as exc:
            self.notify(f"no VM template ({exc.args[0]}); booting cold")
            return super().acquire(request, on_created)
        try:
            return self._start(self.backend.restore(spec, template.file), request, on_created)
        except RestoreStalled as exc:  # nothing ran yet; the template is not to blame
            self.notify(f"the restored VM did not answer ({exc.args[0]}); booting cold")
            return super().acquire(request, on_created)
        except RestoreFailed as exc:
            self.store.discard(template)
            self.restore_failures[template.key] = self.restore_failures.get(template.key, 0) + 1
            if self.restore_failures[template.key] >= 2:  # not the file: this host, for now
                self.unbuildable[template.key] = f"restores keep failing: {exc.args[0]}"
            self.notify(f"could not restore the VM from its template ({exc.args[0]}); "
                        "booting cold, the template is rebuilt for the next job")
        return super().acquire(request, on_created)

    def template(self, spec: VMSpec) -> Template:
        key = self.backend.template_key(spec)
        found = self.store.find(key)
        if found is not None:
            return found
        if key in self.unbuildable:
            raise SystemFailure(self.unbuildable[key])
        self.notify(f"building the VM template for {spec.vcpus} vCPU / {spec.memory_mib} MiB "
                    "(once; later jobs of this size start from it)")
        try:
            return self.store.build(key, self.backend.template_meta(spec),
                                    lambda file: self.backend.save_template(spec, file,
                                                                            TEMPLATE_TIMEOUT))
        except SystemFailure as exc:
            self.unbuildable[key] = exc.args[0]
            raise

    def prepare(self, sizes: list[tuple[int, int, bool]]) -> list[str]:
        """(vcpus, memory_mib, NIC) of each VM kind to come: their templates, built now."""
        keys = []
        for vcpus, memory, nic in dict.fromkeys(sizes):
            network = NetworkPolicy(mode="egress") if nic else NONE
            spec = dataclasses.replace(self.base, vcpus=vcpus, memory_mib=memory,
                                       workspace=Path("/"), network=network)
            keys.append(self.template(spec).key)
        return keys


def base_spec(manifest: Manifest, max_file_size: int | None = None) -> VMSpec:
    """The VM every job starts from: the manifest's images, its runner layer when it has one
    (then every VM has it, cold or restored: the layer is part of the template key)."""
    return VMSpec(kernel=Path(manifest.kernel.path), initramfs=Path(manifest.initramfs.path),
                  rootfs=Path(manifest.rootfs.path),
                  layer=Path(manifest.runner.path) if manifest.runner else None,
                  max_file_size=max_file_size)


def open_provider(accel: str, notify: Notify, max_file_size: int | None = None,
                  start: StartMode = "snapshot", registries: RegistryConfig | None = None,
                  pull_policy: str = "always") -> ColdBootProvider:
    provider = _open(accel, notify, max_file_size, start)
    provider.registries = registries or RegistryConfig()
    provider.pull_policy = pull_policy
    provider.image_progress = notify
    return provider


def _open(accel: str, notify: Notify, max_file_size: int | None,
          start: StartMode) -> ColdBootProvider:
    """Once per process: images, acceleration, and the VMs of earlier kata-ci processes that
    were killed outright. UserError when this host cannot run VMs (nothing was started)."""
    from kata_ci.executors.qemu.accel import choose
    from kata_ci.executors.qemu.backend import QemuBackend
    from kata_ci.executors.qemu.orphans import reap_orphans

    cache = paths.cache_dir()
    manifest = load_current(cache)
    run_root = paths.run_dir()
    for vm_id in reap_orphans(run_root):
        notify(f"removed VM {vm_id} left by a kata-ci process that no longer runs")
    decision = choose(accel, manifest, cache, run_root)
    if decision.fresh and decision.accel == "tcg":
        notify(f"using TCG software emulation, not KVM: {decision.reason} "
               "Jobs run several times slower; `kata-ci doctor` explains.")
    base = base_spec(manifest, max_file_size=max_file_size)
    backend = QemuBackend(decision.accel, run_root, Path(manifest.tools.path))
    if start == "cold":
        return ColdBootProvider(backend, base, "cold boot asked for (--cold or [vm] start)")
    problem = backend.snapshot_problem()
    if problem is not None:
        return ColdBootProvider(backend, base, problem)
    return SnapshotProvider(backend, base, TemplateStore(cache / "templates"), notify)
