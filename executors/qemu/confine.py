"""How each VM process is confined on the host: identity, cgroup, rlimits, seccomp.

Every QEMU and file server starts through ``kata-ci-jail`` (executors/jail/jail.c), which joins
the VM's cgroup, drops to the identity chosen here, sets no_new_privs and the parent-death
signal, then execs. Chosen here, in Python, because the choice needs the host's users,
cgroup layout and the workspace's owner; the C side only applies it.

Identities (README, "Security model"):
- QEMU: the ``kata-ci`` system user when kata-ci runs as root (made by setup; in group kvm
  where that exists); otherwise the invoking user. Never root.
- the file server (virtiofsd): the owner of the workspace directory, so that the guest can
  do to the checkout exactly what its owner could, and every file the guest creates or
  chowns is owned by that user (``--translate-uid squash-guest``). Root only when the
  workspace itself belongs to root; then it keeps only the capabilities a file server needs
  (no CAP_MKNOD, CAP_SETFCAP, CAP_FSETID), and the jail's seccomp filter refuses setuid/setgid
  modes and device nodes whichever identity it runs under.
"""

from __future__ import annotations

import contextlib
import errno
import os
import pwd
import signal
import time
from dataclasses import dataclass
from pathlib import Path

from kata_ci.errors import SystemFailure, UserError

SERVICE_USER = "kata-ci"
CGROUP_ROOT = Path("/sys/fs/cgroup")
CGROUP_PARENT = "kata-ci"
# QEMU beyond guest RAM: the TCG translation cache (up to 1 GiB, touched as used), device
# emulation and I/O buffers. Under KVM far less is needed.
OVERHEAD_MIB = {"tcg": 1024, "kvm": 256}
FILESERVER_MIB = 256
PIDS_MAX = 1024


@dataclass(frozen=True)
class Identity:
    uid: int
    gid: int
    groups: tuple[int, ...] = ()  # supplementary: kvm for /dev/kvm


def qemu_identity() -> Identity | None:
    """Who QEMU runs as; None: as kata-ci itself (already unprivileged)."""
    if os.geteuid() != 0:
        return None
    try:
        entry = pwd.getpwnam(SERVICE_USER)
    except KeyError:
        raise UserError(f"kata-ci runs as root, and VMs run as the unprivileged user "
                        f"{SERVICE_USER!r}, which does not exist: run scripts/setup.sh (or "
                        f"`useradd --system --user-group {SERVICE_USER}`)") from None
    groups = tuple(g for g in os.getgrouplist(SERVICE_USER, entry.pw_gid) if g != entry.pw_gid)
    return Identity(entry.pw_uid, entry.pw_gid, groups)


def workspace_owner(workspace: Path) -> Identity:
    st = os.stat(workspace)
    return Identity(st.st_uid, st.st_gid)


def fileserver_identity(owner: Identity) -> Identity | None:
    """Who the file server runs as: the workspace's owner; None: as kata-ci itself."""
    if os.geteuid() != 0 or owner.uid == 0:
        return None
    return owner


def jail_argv(jail: Path, identity: Identity | None, cgroups: list[Path],
              fsize: int | None = None, no_setid_files: bool = False,
              netns: Path | None = None) -> list[str]:
    argv = [str(jail)]
    for group in cgroups:
        argv += ["--cgroup", str(group)]
    if netns is not None:
        argv += ["--netns", str(netns)]
    if identity is not None:
        argv += ["--uid", str(identity.uid), "--gid", str(identity.gid)]
        if identity.groups:
            argv += ["--groups", ",".join(map(str, identity.groups))]
    if fsize:
        argv += ["--fsize", str(fsize)]
    if no_setid_files:
        argv.append("--no-setid-files")
    return [*argv, "--"]


@dataclass(frozen=True)
class Limits:
    memory_bytes: int
    cpus: float
    pids: int


def limits_for(vcpus: int, memory_mib: int, accel: str) -> Limits:
    """A VM's cgroup limits, from its size: RAM + emulator overhead + the file server;
    one host core per vCPU plus one for QEMU's I/O thread; a pids bound against fork bombs
    reaching the host through the emulator's thread pool."""
    mib = memory_mib + OVERHEAD_MIB.get(accel, 1024) + FILESERVER_MIB
    return Limits(memory_bytes=mib << 20, cpus=vcpus + 1.0, pids=PIDS_MAX)


class VMCgroup:
    """One cgroup per VM (v2), or one per controller (v1: memory, cpu, pids). Only when
    kata-ci may create cgroups (root, or a delegated v2 subtree); otherwise ``dirs`` is empty
    and ``reason`` says why (doctor shows it)."""

    def __init__(self, vm_id: str, limits: Limits) -> None:
        self.vm_id = vm_id
        self.limits = limits
        self.dirs: list[Path] = []
        self.reason = ""

    def create(self) -> list[Path]:
        try:
            if (CGROUP_ROOT / "cgroup.controllers").is_file():
                self._create_v2()
            elif (CGROUP_ROOT / "memory").is_dir():
                self._create_v1()
            else:
                self.reason = "no cgroup file system at /sys/fs/cgroup"
        except OSError as exc:
            self.remove()
            if os.geteuid() == 0:
                raise SystemFailure(f"cannot create the VM's cgroup: {exc}") from None
            self.reason = f"cgroups not delegated to this user ({exc.strerror})"
        return self.dirs

    def _create_v2(self) -> None:
        parent = CGROUP_ROOT / CGROUP_PARENT
        parent.mkdir(exist_ok=True)
        enabled = (parent / "cgroup.subtree_control").read_text().split()
        wanted = [c for c in ("memory", "cpu", "pids") if c not in enabled]
        if wanted:
            with contextlib.suppress(OSError):  # a controller the kernel lacks: keep the rest
                (parent / "cgroup.subtree_control").write_text(
                    " ".join(f"+{c}" for c in wanted))
        group = parent / self.vm_id
        group.mkdir()
        self.dirs = [group]
        _write(group / "memory.max", str(self.limits.memory_bytes))
        _write(group / "memory.swap.max", "0")
        _write(group / "pids.max", str(self.limits.pids))
        period = 100_000
        _write(group / "cpu.max", f"{int(self.limits.cpus * period)} {period}")

    def _create_v1(self) -> None:
        for controller in ("memory", "cpu", "pids"):
            base = CGROUP_ROOT / controller
            if not base.is_dir():
                continue
            group = base / CGROUP_PARENT / self.vm_id
            group.mkdir(parents=True)
            self.dirs.append(group)
            if controller == "memory":
                _write(group / "memory.limit_in_bytes", str(self.limits.memory_bytes))
                with contextlib.suppress(OSError):  # only with swap accounting
                    _write(group / "memory.memsw.limit_in_bytes", str(self.limits.memory_bytes))
            elif controller == "cpu":
                period = 100_000
                _write(group / "cpu.cfs_period_us", str(period))
                _write(group / "cpu.cfs_quota_us", str(int(self.limits.cpus * period)))
            else:
                _write(group / "pids.max", str(self.limits.pids))

    def remove(self) -> None:
        """After the VM's processes we started are gone. What they left in the cgroup is
        killed first: virtiofsd's sandbox child (PID 1 of its own PID namespace) can outlive
        the parent we wait for by a moment, and a cgroup with a process cannot be removed
        (the churn bench found 4-10 of 20 left under load)."""
        deadline = time.monotonic() + REMOVE_WAIT
        for group in self.dirs:
            _empty_and_remove(group, deadline)
        self.dirs = []


REMOVE_WAIT = 5.0  # s for a killed leftover to leave its cgroup


def _empty_and_remove(group: Path, deadline: float) -> None:
    """rmdir ``group``, killing what is in it until it is empty or the deadline passes.
    Everything in a VM's cgroup is that VM's (QEMU, virtiofsd and their children): nothing
    of it may outlive the VM. cgroup v2 kills the whole group at once (``cgroup.kill``, no pid
    reuse race); v1 kills by pid from ``cgroup.procs``."""
    while True:
        try:
            group.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError as exc:
            if exc.errno != errno.EBUSY or time.monotonic() > deadline:
                return
        if (group / "cgroup.kill").exists():
            with contextlib.suppress(OSError):
                _write(group / "cgroup.kill", "1")
        else:
            with contextlib.suppress(OSError):
                for pid in (group / "cgroup.procs").read_text().split():
                    with contextlib.suppress(OSError, ValueError):
                        os.kill(int(pid), signal.SIGKILL)
        time.sleep(0.02)


def remove_stale_cgroup(vm_id: str) -> None:
    """The cgroup of a VM whose owner died (reap_orphans)."""
    candidates = [CGROUP_ROOT / CGROUP_PARENT / vm_id]
    candidates += [CGROUP_ROOT / c / CGROUP_PARENT / vm_id for c in ("memory", "cpu", "pids")]
    deadline = time.monotonic() + REMOVE_WAIT
    for group in candidates:
        _empty_and_remove(group, deadline)


def _write(path: Path, value: str) -> None:
    path.write_text(value + "\n")
