"""Pure functions from a VMSpec (+ file locations, acceleration) to QEMU and virtiofsd argv.

No I/O here: unit tests pin the exact command lines, and the backend only executes them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from kata_ci.executors.base import Accel, VMSpec
from kata_ci.executors.network.policy import GATEWAY_V4, GATEWAY_V6, GUEST_MAC, GUEST_V4, GUEST_V6

AGENT_PORT_NAME = "kataci.agent"  # /dev/virtio-ports/<name> in the guest (guest/transport.py)
AGENT_PORT_ID = "agentport"  # QMP VSERPORT_CHANGE reports this id when the guest opens it
WORKSPACE_TAG = "workspace"  # virtio-fs tag, mounted by the agent's Mount RPC (guest/init.c)
SCSI_ID = "scsi0"  # the controller OCI image disks are hot-added to (bus scsi0.0)
QEMU = "qemu-system-x86_64"
# QEMU's own seccomp filter (qemu-options "-sandbox"): no obsolete syscalls, no setuid/setgid,
# no fork/exec, no scheduler or priority changes. On top of the unprivileged identity.
SANDBOX = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"
# Guest xattrs: security.capability is refused (a file capability must never take effect on
# the host); everything else passes unchanged.
XATTRMAP = ":bad:all:security.capability:security.capability: :ok:all:::"
NO_ID = 4294967295  # count for "every id" in virtiofsd's translate maps


@dataclass(frozen=True)
class GuestFiles:
    """How QEMU names the files it must open. The backend passes them as inherited file
    descriptors (/proc/self/fd/N): QEMU runs as an identity that cannot read kata-ci's cache,
    and the console is a pipe to a size-capped log, never a file QEMU could grow."""

    kernel: str
    initramfs: str
    rootfs: str | None
    console: str
    tap: str | None = None  # the VM's tap0, opened by kata-ci in the VM's network namespace
    layer: str | None = None  # the runner layer image, when the spec has one


@dataclass(frozen=True)
class VMPaths:
    """The per-VM files, all inside one run directory removed at teardown."""

    root: Path

    @property
    def qmp(self) -> Path:
        return self.root / "qmp.sock"

    @property
    def agent(self) -> Path:
        return self.root / "agent.sock"

    @property
    def virtiofs(self) -> Path:
        return self.root / "fs.sock"

    @property
    def console(self) -> Path:
        return self.root / "console.log"

    @property
    def qemu_log(self) -> Path:
        return self.root / "qemu.log"

    @property
    def virtiofsd_log(self) -> Path:
        return self.root / "virtiofsd.log"

    @property
    def pasta_log(self) -> Path:
        return self.root / "pasta.log"


def kernel_cmdline(spec: VMSpec, floor: bool = False, tsc_khz: int | None = None) -> str:
    """Guest kernel command line. Only kataci.* options for our init; never secrets, and
    nothing of one job (its workspace path comes by the Mount RPC): a snapshot freezes it.

    ``tsc_khz``: under TCG the guest's RDTSC reads the host TSC, but microvm offers the kernel
    nothing to calibrate it against (no PIT speaker port, HPET or ACPI PM timer), so without
    the frequency the guest falls back to the jiffies clocksource: 4 ms clock resolution and
    no vDSO clock_gettime for every job.
    """
    words = [
        "console=ttyS0", "quiet", "loglevel=4",
        # reboot=t + QEMU -no-reboot: a guest reboot ends the VM process (no ACPI needed).
        "reboot=t", "panic=-1",
        "8250.nr_uarts=1", "tsc=reliable", "no_timer_check", "random.trust_cpu=on",
    ]
    if tsc_khz:
        words.append(f"tsc_early_khz={tsc_khz}")
    if floor:
        words.append("kataci.mode=floor")
    else:
        words.append(f"kataci.overlay_size={spec.overlay_size}")
        words.append("kataci.transport=serial")
        if spec.layer is not None:  # guest/init.c stacks /dev/vdb above the rootfs
            words.append("kataci.layer=1")
        if spec.network.nic:  # the same in every VM (policy.py): a template may hold them
            words.append(f"kataci.ip4={GUEST_V4},{GATEWAY_V4}")
            words.append(f"kataci.ip6={GUEST_V6},{GATEWAY_V6}")
    words.extend(spec.extra_kernel_args)
    return " ".join(words)


def accel_args(accel: Accel, vcpus: int) -> list[str]:
    if accel == "kvm":
        return ["-accel", "kvm", "-cpu", "host"]
    # Multi-threaded TCG: one host thread per vCPU. "max" gives RDRAND (fast CRNG seeding).
    # The translation cache keeps QEMU's default size: bounding it (tb-size=32/64) cut ~50 MB
    # of PSS but made boot 45% slower (bench/bench_vm.py, closing note of the foundation).
    thread = "multi" if vcpus > 1 else "single"
    return ["-accel", f"tcg,thread={thread}", "-cpu", "max"]


def qemu_argv(spec: VMSpec, paths: VMPaths, accel: Accel, floor: bool = False,
              tsc_khz: int | None = None, files: GuestFiles | None = None,
              in_run_dir: bool = False) -> list[str]:
    """The QEMU command line for one microVM.

    microvm: no PCI, no firmware, no ACPI; virtio-mmio devices announced on the kernel command
    line. vhost-user-fs needs guest RAM in a shared memfd, so RAM comes from an explicit
    memory-backend whenever a workspace is shared. ``in_run_dir``: QEMU starts with the run
    dir as its working directory and names its sockets relative to it, so its identity needs
    no access to the folders above (they may be root's).
    """
    name = paths.root.name
    if in_run_dir:
        paths = VMPaths(Path("."))
    mem = f"{spec.memory_mib}M"
    files = files or GuestFiles(str(spec.kernel), str(spec.initramfs),
                                str(spec.rootfs) if spec.rootfs else None, str(paths.console),
                                layer=str(spec.layer) if spec.layer else None)
    # rtc=on: the guest starts with the right second (Health then sets it to the millisecond).
    machine = "microvm,x-option-roms=off,isa-serial=on,rtc=on,acpi=off"
    argv = [QEMU, "-name", f"kata-ci,process=kata-ci-vm-{name}",
            "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
            "-sandbox", SANDBOX,
            *accel_args(accel, spec.vcpus),
            "-smp", str(spec.vcpus), "-m", mem]
    if spec.workspace is not None and not floor:
        machine += ",memory-backend=mem"
        argv += ["-object", f"memory-backend-memfd,id=mem,size={mem},share=on"]
    argv += [
        "-machine", machine,
        # Modern virtio over mmio: vhost-user (virtiofsd) refuses legacy devices.
        "-global", "virtio-mmio.force-legacy=false",
        "-kernel", files.kernel, "-initrd", files.initramfs,
        "-append", kernel_cmdline(spec, floor, tsc_khz if accel == "tcg" else None),
        "-chardev", f"file,id=console,path={files.console}", "-serial", "chardev:console",
        "-chardev", f"socket,id=qmp,path={paths.qmp},server=on,wait=off",
        "-mon", "chardev=qmp,mode=control",
    ]
    if floor:
        return argv
    argv += [
        "-object", "rng-random,id=rng,filename=/dev/urandom",
        "-device", "virtio-rng-device,rng=rng",
        "-device", "virtio-serial-device,max_ports=4",
        "-chardev", f"socket,id=agent,path={paths.agent},server=on,wait=off",
        "-device", f"virtserialport,chardev=agent,name={AGENT_PORT_NAME},id={AGENT_PORT_ID}",
    ]
    if files.rootfs is not None:
        # readonly=on: one image serves every VM at once; each guest writes to its own tmpfs.
        argv += ["-drive", f"id=root,file={files.rootfs},format=raw,if=none,readonly=on",
                 "-device", "virtio-blk-device,drive=root"]
    if spec.layer is not None:
        # Right after the rootfs: the guest finds it as /dev/vdb (init.c). Read-only for the
        # same reason; a job's writes under /opt/actions-runner go to its tmpfs overlay.
        assert files.layer is not None, "a VMSpec with a layer needs GuestFiles.layer"
        argv += ["-drive", f"id=layer,file={files.layer},format=raw,if=none,readonly=on",
                 "-device", "virtio-blk-device,drive=layer"]
    # OCI images (VM.attach_image): hot-added later as LUNs of this controller, in cold and
    # restored VMs alike, so a template made before any job's image is known serves all.
    argv += ["-device", f"virtio-scsi-device,id={SCSI_ID}"]
    if spec.network.nic:
        # tap0 of the VM's network namespace, which QEMU runs in (executors/network/netns.py),
        # passed open: QEMU's identity has no access to /dev/net/tun.
        argv += ["-netdev", f"tap,id=net0,fd={files.tap}",
                 "-device", f"virtio-net-device,netdev=net0,mac={GUEST_MAC}"]
    if spec.workspace is not None:
        argv += ["-chardev", f"socket,id=fs,path={paths.virtiofs}",
                 "-device", f"vhost-user-fs-device,chardev=fs,tag={WORKSPACE_TAG},queue-size=1024"]
    return argv + list(spec.extra_qemu_args)


SNAPSHOT_FDSET = 1
SNAPSHOT_URI = f"file:/dev/fdset/{SNAPSHOT_FDSET}"


def snapshot_args(fd: int, restore: bool) -> list[str]:
    """The snapshot file, opened by kata-ci and inherited as ``fd``: QEMU's identity cannot
    open kata-ci's cache, and a restoring QEMU gets it read-only. Migration URIs name it as
    ``SNAPSHOT_URI``. ``restore``: QEMU waits for migrate-incoming instead of booting."""
    argv = ["-add-fd", f"fd={fd},set={SNAPSHOT_FDSET},opaque=kata-ci-snapshot"]
    return argv + (["-incoming", "defer"] if restore else [])


def virtiofsd_argv(spec: VMSpec, program: str, fd: int, owner_uid: int, owner_gid: int,
                   root: bool) -> list[str]:
    """virtiofsd 1.13 (images/tools.py) sharing exactly the workspace, on a listening socket
    kata-ci made (``fd``), so the server needs no access to the run directory.

    sandbox=namespace (pivot_root into the workspace): a symlink pointing outside it resolves
    inside the sandbox, never to the host's files. cache=auto: the host may change files while
    the job runs (an editor, a second job) and the guest must see it. Ownership: whatever uid
    or gid the guest creates or chowns to lands on the host as the workspace's owner, and the
    owner's files appear to the guest as root's (or as ``spec.workspace_ids``: an image's
    user), so the job's own user may write them.
    ``root``: the server runs as root (a root-owned workspace); it then gives up the
    capabilities to make device nodes, set file capabilities and keep setid bits on write.
    """
    assert spec.workspace is not None
    argv = [program, f"--fd={fd}", f"--shared-dir={spec.workspace}", "--sandbox=namespace",
            "--cache=auto", "--log-level=warn", "--rlimit-nofile=0", "--xattr",
            f"--xattrmap={XATTRMAP}",
            f"--translate-uid=squash-guest:0:{owner_uid}:{NO_ID}",
            f"--translate-gid=squash-guest:0:{owner_gid}:{NO_ID}",
            f"--translate-uid=host:{owner_uid}:{spec.workspace_ids[0]}:1",
            f"--translate-gid=host:{owner_gid}:{spec.workspace_ids[1]}:1"]
    if root:
        argv.append("--modcaps=-mknod:-setfcap:-fsetid")
    return argv
