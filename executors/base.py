"""The narrow executor interface: what a job runner may ask of any VM backend.

Modelled on gitlab-runner's executor lifecycle and pyinfra's connectors: a small ABC per
backend, and optional features declared in ``Capabilities`` rather than faked.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Literal

from kata_ci.executors.agent_client import AgentClient
from kata_ci.executors.network.policy import NONE, NetworkPolicy

Accel = Literal["kvm", "tcg"]


@dataclass(frozen=True)
class VMSpec:
    """Everything a backend needs to make one VM. Validated by the caller (runner.config)."""

    kernel: Path
    initramfs: Path
    rootfs: Path | None
    vcpus: int = 2
    memory_mib: int = 1024
    workspace: Path | None = None  # shared over virtio-fs; nothing else of the host is
    guest_workdir: str | None = None  # where the workspace appears; default: same path
    network: NetworkPolicy = NONE  # mode none: no NIC at all
    overlay_size: str = "50%"  # tmpfs upper layer over the read-only rootfs
    max_file_size: int | None = None  # bytes; no file the guest writes in the workspace grows past
    extra_kernel_args: tuple[str, ...] = field(default=())
    extra_qemu_args: tuple[str, ...] = field(default=())  # operators' escape hatch; bench uses it
    # A read-only image stacked above the rootfs (images/runner_layer.py: /opt/actions-runner);
    # the guest's second disk, kataci.layer=1 on its command line.
    layer: Path | None = None
    # The guest ids the workspace's owner appears as (and the job's files are stored as
    # the owner's whatever they say): the job's image user, so that it may write there.
    workspace_ids: tuple[int, int] = (0, 0)

    @property
    def workdir(self) -> str | None:
        if self.workspace is None:
            return None
        return self.guest_workdir or str(self.workspace)


@dataclass(frozen=True)
class Capabilities:
    """Optional backend features; callers check these instead of trying and failing."""

    snapshot: bool = False
    hotplug: bool = False
    vsock: bool = False


@dataclass(frozen=True)
class BootTimes:
    """Where boot time went, in seconds: host wall clock and the guest's own uptime."""

    agent_healthy: float  # host: VM process started -> Health answered
    guest_uptime_at_health: float
    guest_agent_started: float  # guest uptime when the agent process began
    restored: bool = False  # from a snapshot (then guest uptime counts from the template)
    network_setup: float = 0.0  # host: the VM's network namespace, before QEMU started
    uplink_wait: float = 0.0  # host: waiting for pasta after the agent answered


class VM(abc.ABC):
    """One microVM. ``kill`` is idempotent and never raises; use it as a context manager."""

    id: str
    boot_times: BootTimes | None = None  # set by the provider once started (benchmarks)

    @abc.abstractmethod
    def start(self, timeout: float) -> BootTimes:
        """Boot (or restore) until the guest agent answers Health and the workspace is
        mounted; SystemFailure otherwise (RestoreFailed: the snapshot was at fault)."""

    @property
    @abc.abstractmethod
    def agent(self) -> AgentClient:
        """The typed agent client; valid after ``start``."""

    @abc.abstractmethod
    def check(self) -> None:
        """Raise SystemFailure if any part of the VM (VM process, file server) has died."""

    @abc.abstractmethod
    def stop(self, timeout: float = 2.0) -> None:
        """Graceful: the guest syncs and powers off; then every host resource is released."""

    @abc.abstractmethod
    def kill(self) -> None:
        """Release every host resource now. Idempotent, never raises, safe from any thread."""

    def attach_image(self, disk: Path, index: int) -> None:
        """Hot-add a read-only OCI image disk (images/oci/) as SCSI target ``index``, LUN 0,
        of a started VM; the agent's PrepareRoot mounts it. SystemFailure if it cannot."""
        from kata_ci.errors import SystemFailure

        raise SystemFailure(f"this VM backend cannot attach image disks ({disk.name})")

    @abc.abstractmethod
    def diagnostics(self, lines: int = 30) -> str:
        """The tail of the guest console and backend logs, for failure reports."""

    def __enter__(self) -> VM:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.kill()


class Backend(abc.ABC):
    name: str
    capabilities: Capabilities

    @abc.abstractmethod
    def create(self, spec: VMSpec) -> VM:
        """A VM not yet started; creating allocates nothing on the host."""

    # Snapshot start (capabilities.snapshot): a template is a booted, saved guest of one
    # size; a VM restored from it is the same as a cold one once started.
    def snapshot_problem(self) -> str | None:
        """None when this backend can start VMs from snapshots here, else why not."""
        return f"the {self.name} backend has no snapshots"

    def template_key(self, spec: VMSpec) -> str:
        """Everything a restore of ``spec`` depends on, hashed."""
        raise NotImplementedError

    def template_meta(self, spec: VMSpec) -> dict[str, object]:
        """Recorded beside the template; ``family``: templates that replace each other."""
        return {}

    def save_template(self, spec: VMSpec, file: Path, timeout: float) -> None:
        """Boot a template of ``spec`` and save it to ``file``; SystemFailure otherwise."""
        raise NotImplementedError

    def restore(self, spec: VMSpec, file: Path) -> VM:
        """A VM that ``start`` restores from ``file`` instead of booting."""
        raise NotImplementedError
