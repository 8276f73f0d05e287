"""Choosing KVM or TCG by trying, not by assuming.

/dev/kvm can exist and still be useless: nested or PVM-only KVM on a cloud VM hangs stock
guest kernels. So ``auto`` boots the real kernel with an init that powers off at once under
KVM; only if that works in a few seconds is KVM used. The verdict is cached per host boot,
kernel and QEMU, so the probe runs (and is announced) once.
"""

from __future__ import annotations

import functools
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from kata_ci.errors import SystemFailure, UserError
from kata_ci.executors.base import Accel, VMSpec
from kata_ci.executors.qemu.snapshot import qemu_version
from kata_ci.images.artifacts import Manifest, hash_inputs

PROBE_TIMEOUT = 10.0
VERDICT_FILE = "accel.json"


@dataclass(frozen=True)
class AccelDecision:
    accel: Accel
    reason: str
    fresh: bool = False  # probed just now (announce it) rather than read from the cache


def kvm_access() -> str | None:
    """None when /dev/kvm is usable by us, else why not."""
    if not os.path.exists("/dev/kvm"):
        return "no /dev/kvm (no hardware virtualization exposed to this host)"
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return "/dev/kvm exists but this user cannot open it (add it to the kvm group)"
    return None


def _host_key(manifest: Manifest) -> str:
    try:
        boot_id = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        boot_id = "unknown"
    qemu = qemu_version() or "missing"
    return hash_inputs([boot_id, qemu, manifest.kernel.sha256, manifest.initramfs.sha256])


def choose(preference: str, manifest: Manifest, cache: Path, run_root: Path) -> AccelDecision:
    if preference == "tcg":
        return AccelDecision("tcg", "configured (accel = tcg)")
    problem = kvm_access()
    if preference == "kvm":
        if problem:
            raise UserError(f"accel = kvm, but {problem}")
        return AccelDecision("kvm", "configured (accel = kvm)")
    if problem:
        return AccelDecision("tcg", problem)
    key = _host_key(manifest)
    verdict = cache / VERDICT_FILE
    try:
        saved = json.loads(verdict.read_text())
        if saved.get("key") == key:
            return AccelDecision(saved["accel"], saved["reason"])
    except (OSError, ValueError, KeyError):
        pass
    decision = probe(manifest, run_root)
    cache.mkdir(parents=True, exist_ok=True)
    # Atomic: two first runs on a host may probe at once; the last verdict written wins whole.
    tmp = verdict.with_name(f"{VERDICT_FILE}.{os.getpid()}")
    tmp.write_text(json.dumps({"key": key, **asdict(decision), "fresh": False}))
    os.replace(tmp, verdict)
    return decision


def probe(manifest: Manifest, run_root: Path) -> AccelDecision:
    from kata_ci.executors.qemu.backend import QemuBackend  # avoid an import cycle

    spec = VMSpec(kernel=Path(manifest.kernel.path), initramfs=Path(manifest.initramfs.path),
                  rootfs=None, vcpus=1, memory_mib=256)
    vm = QemuBackend("kvm", run_root, Path(manifest.tools.path)).create_floor(spec)
    try:
        times = vm.start(PROBE_TIMEOUT)
    except SystemFailure as exc:
        return AccelDecision("tcg", f"/dev/kvm is present but a guest kernel does not boot "
                             f"under it ({exc.args[0]}; nested or PVM-only KVM?).", fresh=True)
    finally:
        vm.kill()
    return AccelDecision("kvm", f"a guest booted under KVM in {times.agent_healthy:.2f}s",
                         fresh=True)


@functools.cache
def host_tsc_khz() -> int | None:
    """The host TSC frequency, when the host has a constant TSC whose rate it knows.

    TCG guests read the host TSC; they need this number to use it as their clocksource.
    """
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    flags = next((line for line in info.splitlines() if line.startswith("flags")), "").split()
    mhz = next((line.split(":")[1] for line in info.splitlines() if line.startswith("cpu MHz")),
               "")
    if "constant_tsc" not in flags or "tsc_known_freq" not in flags or not mhz.strip():
        return None
    return round(float(mhz) * 1000)
