"""Snapshot start for QEMU: which QEMU and virtiofsd can do it, what a template's key is, and
how a template is made (boot, wait for the agent, save).

Why these versions: QEMU <= 8.1 refuses to migrate (so to save) a VM with a vhost-user-fs
device; 8.2 can, if the back-end transfers its own state, which virtiofsd does from 1.11 on.
kata-ci also needs QEMU 9.0 for the ``mapped-ram`` file format (a restore reads only written
pages, straight into guest RAM) and for migration to a file passed as a descriptor
(``/dev/fdset``): QEMU runs as an identity that cannot open kata-ci's cache.

A template is booted with the workspace device attached but not mounted and is saved before
the host ever connects to its agent (the agent serves one connection per VM life; a snapshot
taken after one never answers again). ../shared/notes/snapshot-restore.md has the measurements.
"""

from __future__ import annotations

import dataclasses
import functools
import re
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from kata_ci.executors.base import Accel, VMSpec
from kata_ci.executors.network.policy import NONE, NetworkPolicy
from kata_ci.executors.qemu.argv import QEMU, GuestFiles, VMPaths, qemu_argv, snapshot_args
from kata_ci.images.artifacts import hash_inputs

RECIPE = "template-v1"
MIN_QEMU = (9, 0)
MIN_VIRTIOFSD = (1, 11)


@functools.cache
def version_line(program: str) -> str:
    """The first line ``program --version`` prints (QEMU's carries the distribution's
    revision), or '' when it does not run. Once per process and program."""
    try:
        out = subprocess.run([program, "--version"], capture_output=True, text=True,
                             timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return out.strip().split("\n")[0]


def qemu_version() -> str:
    return version_line(QEMU)


def _numbers(text: str) -> tuple[int, ...]:
    found = re.search(r"(\d+)\.(\d+)(?:\.(\d+))?", text)
    return tuple(int(g) for g in found.groups() if g is not None) if found else ()


def snapshot_problem(tools: Path) -> str | None:
    """None when this host's QEMU and virtiofsd can start VMs from snapshots, else why not."""
    qemu = qemu_version()
    if not qemu:
        return f"{QEMU} does not run"
    if _numbers(qemu) < MIN_QEMU:
        return (f"{qemu.split('(')[0].strip()} is older than {'.'.join(map(str, MIN_QEMU))} "
                "(needed: vhost-user-fs migration, mapped-ram, fd-passed snapshot files)")
    fsd = version_line(str(tools / "bin" / "virtiofsd"))
    if _numbers(fsd) < MIN_VIRTIOFSD:
        return (f"virtiofsd {fsd or 'missing'} is older than "
                f"{'.'.join(map(str, MIN_VIRTIOFSD))} (needed: its state in snapshots)")
    return None


def describe() -> str:
    qemu = qemu_version()
    return qemu.split("(")[0].strip() or "QEMU missing"


def _identity(path: Path) -> str:
    """An image by its content key (the folder it is built in) and size, not by the location
    (root's cache or the published copy are the same image)."""
    try:
        size = path.stat().st_size
    except OSError:
        size = -1
    return f"{path.parent.name}/{path.name}:{size}"


def template_key(spec: VMSpec, accel: Accel, tsc_khz: int | None, tools: Path) -> str:
    """Everything a restore depends on: the exact QEMU command line (machine, devices, CPU,
    memory, kernel command line), the images, QEMU's and virtiofsd's versions and the
    QEMU binary itself. A changed input is a new key: a template is never restored by
    another QEMU, it is built anew. The runner layer is an image like the others (its disk
    and kataci.layer=1 are in the command line): a template made with a layer is restored
    only with that layer, one made without never into a VM that has one."""
    files = GuestFiles(kernel=_identity(spec.kernel), initramfs=_identity(spec.initramfs),
                       rootfs=_identity(spec.rootfs) if spec.rootfs else None, console="console",
                       tap="TAP", layer=_identity(spec.layer) if spec.layer else None)
    argv = qemu_argv(template_spec(spec, Path("/workspace")), VMPaths(Path("template")), accel,
                     tsc_khz=tsc_khz, files=files, in_run_dir=True) + snapshot_args(3, True)
    binary = _binary_identity()
    fsd = version_line(str(tools / "bin" / "virtiofsd"))
    return hash_inputs([RECIPE, qemu_version(), binary, fsd, *argv])


def _binary_identity() -> str:
    found = shutil.which(QEMU)
    if not found:
        return "missing"
    info = Path(found).stat()
    return f"{found}:{info.st_size}:{info.st_mtime_ns}"


def template_spec(spec: VMSpec, placeholder: Path) -> VMSpec:
    """The VM a template is booted as: the job's size and images, the workspace device
    present over an empty placeholder folder, nothing else of any job."""
    network = NetworkPolicy(mode="egress") if spec.network.nic else NONE
    return dataclasses.replace(spec, workspace=placeholder, guest_workdir=None, network=network,
                               workspace_ids=(0, 0))


def family(spec: VMSpec, accel: Accel) -> str:
    """Templates that replace each other when an input changes."""
    nic = "-nic" if spec.network.nic else ""
    return f"{accel}-{spec.vcpus}cpu-{spec.memory_mib}MiB-{spec.overlay_size}{nic}"


def meta(spec: VMSpec, accel: Accel) -> dict[str, Any]:
    return {"family": family(spec, accel), "qemu": qemu_version(), "accel": accel,
            "vcpus": spec.vcpus, "memory_mib": spec.memory_mib, "nic": spec.network.nic,
            "layer": _identity(spec.layer) if spec.layer else None}


def placeholder_dir() -> tempfile.TemporaryDirectory[str]:
    return tempfile.TemporaryDirectory(prefix="kata-ci-template-")
