"""``kata-ci doctor``: can this host run kata-ci VMs, with KVM or TCG, and if not what to do."""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from kata_ci import paths
from kata_ci.errors import KataCIError
from kata_ci.executors.base import Accel
from kata_ci.executors.provider import base_spec
from kata_ci.executors.qemu.accel import choose
from kata_ci.executors.qemu.argv import QEMU
from kata_ci.executors.qemu.confine import CGROUP_ROOT, SERVICE_USER, qemu_identity
from kata_ci.executors.templates import TemplateStore
from kata_ci.images.artifacts import Manifest
from kata_ci.images.build import load_current
from kata_ci.images.kernel import SOURCE_TARBALL
from kata_ci.runner.core import config as config_mod

Status = Literal["ok", "warn", "fail"]


@dataclass(frozen=True)
class Check:
    name: str
    status: Status
    detail: str


def _qemu() -> list[Check]:
    if shutil.which(QEMU) is None:
        return [Check("qemu", "fail", f"{QEMU} not found: apt-get install qemu-system-x86")]
    version = subprocess.run([QEMU, "--version"], capture_output=True, text=True).stdout
    machines = subprocess.run([QEMU, "-machine", "help"], capture_output=True, text=True).stdout
    checks = [Check("qemu", "ok", version.splitlines()[0] if version else QEMU)]
    if "microvm" not in machines:
        checks.append(Check("microvm", "fail", f"{QEMU} lacks the microvm machine type"))
    return checks


def _confinement() -> list[Check]:
    """Who the VM processes run as and whether they get cgroups (README, Security model)."""
    try:
        identity = qemu_identity()
    except KataCIError as exc:
        return [Check("vm identity", "fail", str(exc))]
    who = (f"QEMU runs as {SERVICE_USER} (uid {identity.uid}); the file server as the "
           "workspace's owner" if identity else "QEMU and the file server run as you")
    checks = [Check("vm identity", "ok", who)]
    if os.geteuid() == 0:
        checks.append(Check("cgroups", "ok", f"one per VM under {CGROUP_ROOT}"))
    elif (CGROUP_ROOT / "cgroup.controllers").is_file() and os.access(CGROUP_ROOT, os.W_OK):
        checks.append(Check("cgroups", "ok", "delegated cgroup v2 subtree"))
    else:
        checks.append(Check("cgroups", "warn", "not delegated to this user: VMs run without "
                            "memory/CPU/pids limits of their own"))
    return checks


def _images_and_accel() -> list[Check]:
    cache = paths.cache_dir()
    try:
        manifest = load_current(cache)
    except KataCIError as exc:
        builders = [t for t in ("debootstrap", "gcc", "mkfs.ext4") if shutil.which(t) is None]
        if not SOURCE_TARBALL.exists():
            builders.append("linux-source-6.1")
        hint = f" (missing for building: {', '.join(builders)})" if builders else ""
        return [Check("images", "fail", f"{exc}{hint}"),
                Check("acceleration", "warn", "not probed: needs the guest kernel")]
    checks = [Check("images", "ok", f"kernel {manifest.kernel.detail}; {manifest.rootfs.detail}"),
              Check("tools", "ok", f"kata-ci-jail, virtiofsd ({manifest.tools.detail})")]
    try:
        decision = choose("auto", manifest, cache, paths.run_dir())
    except KataCIError as exc:
        return [*checks, Check("acceleration", "fail", str(exc))]
    if decision.accel == "kvm":
        checks.append(Check("acceleration", "ok", f"KVM: {decision.reason}"))
    else:
        checks.append(Check("acceleration", "warn",
                            f"TCG software emulation (slower): {decision.reason}"))
    return [*checks, _start_mode(manifest, decision.accel)]


def _start_mode(manifest: Manifest, accel: Accel) -> Check:
    """Snapshot or cold start, and why; which template the default VM size restores."""
    from kata_ci.executors.qemu.backend import QemuBackend
    from kata_ci.executors.qemu.snapshot import MIN_QEMU, MIN_VIRTIOFSD, describe

    try:
        cfg = config_mod.load()
    except KataCIError as exc:
        return Check("start", "fail", str(exc))
    backend = QemuBackend(accel, paths.run_dir(), Path(manifest.tools.path))
    problem = backend.snapshot_problem()
    minimum = (f"needs QEMU >= {'.'.join(map(str, MIN_QEMU))} and virtiofsd >= "
               f"{'.'.join(map(str, MIN_VIRTIOFSD))}")
    if problem is not None:
        return Check("start", "warn", f"cold boot for every job: {problem}; snapshot start "
                     f"{minimum} (scripts/setup.sh installs QEMU from bookworm-backports)")
    if cfg.vm.start == "cold":
        return Check("start", "ok", f"cold boot: {cfg.source} sets vm.start = \"cold\"")
    base = dataclasses.replace(base_spec(manifest), vcpus=cfg.vm.vcpus,
                               memory_mib=cfg.vm.memory_mib, workspace=Path("/"))
    key = backend.template_key(base)
    ready = TemplateStore(paths.cache_dir() / "templates").find(key) is not None
    state = "ready" if ready else "built by the first job or `kata-ci images build`"
    return Check("start", "ok", f"snapshot restore ({describe()}); template {key} for "
                 f"{cfg.vm.vcpus} vCPU / {cfg.vm.memory_mib} MiB: {state}")


def _run_dir() -> Check:
    root = paths.run_dir()
    try:
        root.mkdir(parents=True, exist_ok=True)
        probe = root / f".doctor-{os.getpid()}"
        probe.mkdir()
        probe.rmdir()
    except OSError as exc:
        return Check("run dir", "fail", f"{root}: {exc}")
    return Check("run dir", "ok", str(root))


def _network() -> list[Check]:
    """What per-VM networking needs: namespaces (root), nftables, /dev/net/tun, pasta."""
    from kata_ci.executors.network.netns import available

    try:
        cfg = config_mod.load()
        policy = cfg.policy()
    except KataCIError as exc:
        return [Check("network", "fail", str(exc))]
    why_not = available()
    if why_not is not None:
        return [Check("network", "warn" if policy.nic else "ok",
                      f"{why_not}: jobs run with network = none (no NIC)")]
    missing = []
    if shutil.which("nft") is None:
        missing.append("nftables (apt-get install nftables)")
    if not Path("/dev/net/tun").exists():
        missing.append("/dev/net/tun (modprobe tun)")
    try:
        pasta = Path(load_current(paths.cache_dir()).tools.path) / "bin" / "pasta"
        if not pasta.is_file():
            missing.append(f"{pasta} (kata-ci images build)")
    except KataCIError:
        pass  # the images check reports it
    if missing:
        return [Check("network", "fail" if policy.nic else "warn",
                      f"missing {', '.join(missing)}; network = none still works")]
    return [Check("network", "ok", f"default {policy.describe()}; a namespace per VM, "
                                   f"nftables policy, pasta uplink")]


def run_checks() -> list[Check]:
    return [*_qemu(), *_confinement(), _run_dir(), *_images_and_accel(), *_network()]


