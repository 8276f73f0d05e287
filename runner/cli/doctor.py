"""``kata-ci doctor``: can this host run kata-ci VMs, with KVM or TCG, and if not what to do."""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass
from typing import Literal

from kata_ci import paths
from kata_ci.errors import KataCIError
from kata_ci.executors.qemu.accel import choose
from kata_ci.executors.qemu.argv import QEMU
from kata_ci.executors.qemu.confine import CGROUP_ROOT, SERVICE_USER, qemu_identity
from kata_ci.images.build import load_current
from kata_ci.images.kernel import SOURCE_TARBALL

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
    return checks


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


def run_checks() -> list[Check]:
    return [*_qemu(), *_confinement(), _run_dir(), *_images_and_accel()]


