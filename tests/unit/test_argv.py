"""QEMU and virtiofsd command lines are pure functions of the VMSpec: pinned here."""

from __future__ import annotations

from pathlib import Path

from kata_ci.executors.base import VMSpec
from kata_ci.executors.qemu.argv import (
    SNAPSHOT_URI,
    VMPaths,
    kernel_cmdline,
    qemu_argv,
    snapshot_args,
    virtiofsd_argv,
)

PATHS = VMPaths(Path("/run/kata-ci/abc123"))


def spec(**kw: object) -> VMSpec:
    base: dict[str, object] = {"kernel": Path("/k/vmlinux"), "initramfs": Path("/i/init.cpio"),
                               "rootfs": Path("/r/rootfs.ext4")}
    base.update(kw)
    return VMSpec(**base)  # type: ignore[arg-type]


def option_after(argv: list[str], flag: str) -> list[str]:
    return [argv[i + 1] for i, a in enumerate(argv) if a == flag]


def test_workspace_vm_uses_shared_memfd_ram() -> None:
    """vhost-user-fs needs guest RAM in a shared memfd: the backend must be memfd,share=on."""
    argv = qemu_argv(spec(workspace=Path("/w"), memory_mib=768), PATHS, "tcg")
    assert "memory-backend-memfd,id=mem,size=768M,share=on" in option_after(argv, "-object")
    machine = option_after(argv, "-machine")[0]
    assert machine.startswith("microvm,") and "memory-backend=mem" in machine
    assert "acpi=off" in machine  # virtio-mmio devices must reach the kernel command line


def test_rootfs_is_attached_read_only() -> None:
    """One rootfs image serves all VMs, so QEMU must open it read-only."""
    drives = option_after(qemu_argv(spec(), PATHS, "tcg"), "-drive")
    assert drives == ["id=root,file=/r/rootfs.ext4,format=raw,if=none,readonly=on"]


def test_no_workspace_means_no_virtiofs_and_plain_ram() -> None:
    """Without a workspace there is no vhost-user-fs device and no memfd backend."""
    argv = qemu_argv(spec(), PATHS, "tcg")
    assert not any("vhost-user-fs" in a for a in argv)
    assert not any("memory-backend" in a for a in argv)


def test_floor_vm_has_only_kernel_console_and_qmp() -> None:
    """The floor/probe VM boots the kernel and init only: no disks, no agent, no share."""
    argv = qemu_argv(spec(workspace=Path("/w")), PATHS, "kvm", floor=True)
    assert option_after(argv, "-device") == []
    assert "kataci.mode=floor" in option_after(argv, "-append")[0]


def test_accel_kvm_vs_tcg() -> None:
    """KVM uses the host CPU model; TCG uses multi-threaded TCG with the 'max' CPU."""
    kvm = qemu_argv(spec(), PATHS, "kvm")
    tcg = qemu_argv(spec(vcpus=2), PATHS, "tcg")
    assert option_after(kvm, "-accel") == ["kvm"] and option_after(kvm, "-cpu") == ["host"]
    assert option_after(tcg, "-accel") == ["tcg,thread=multi"]
    assert option_after(tcg, "-cpu") == ["max"]
    assert option_after(qemu_argv(spec(vcpus=1), PATHS, "tcg"), "-accel") == ["tcg,thread=single"]


def test_agent_port_is_a_named_virtserialport_on_a_server_socket() -> None:
    """The guest finds the agent port by name; the host connects to QEMU's socket later."""
    argv = qemu_argv(spec(), PATHS, "tcg")
    assert ("socket,id=agent,path=/run/kata-ci/abc123/agent.sock,server=on,wait=off"
            in option_after(argv, "-chardev"))
    assert ("virtserialport,chardev=agent,name=kataci.agent,id=agentport"
            in option_after(argv, "-device"))


def test_kernel_cmdline_names_nothing_of_the_job() -> None:
    """A snapshot freezes the command line: the workspace path never appears on it (the
    agent's Mount RPC carries it), so two jobs' VMs get the same line."""
    one = kernel_cmdline(spec(workspace=Path("/home/me/my project")))
    assert one == kernel_cmdline(spec(workspace=Path("/srv/other")))
    assert "workdir" not in one and "/home/me" not in one


def test_snapshot_file_is_an_inherited_read_only_fdset() -> None:
    """QEMU reaches the snapshot only through the descriptor kata-ci opened (its identity
    cannot open the cache); a restore waits for migrate-incoming instead of booting."""
    assert snapshot_args(9, restore=True) == [
        "-add-fd", "fd=9,set=1,opaque=kata-ci-snapshot", "-incoming", "defer"]
    assert snapshot_args(9, restore=False) == ["-add-fd", "fd=9,set=1,opaque=kata-ci-snapshot"]
    assert SNAPSHOT_URI == "file:/dev/fdset/1"


def test_kernel_cmdline_reboot_ends_vm() -> None:
    """reboot=t with -no-reboot makes a guest power-off end the QEMU process."""
    argv = qemu_argv(spec(), PATHS, "tcg")
    assert "-no-reboot" in argv
    assert "reboot=t" in option_after(argv, "-append")[0].split()


def test_virtiofsd_shares_only_the_workspace_in_a_sandbox() -> None:
    """virtiofsd exports exactly the workspace, pivot_root-sandboxed so symlinks cannot escape,
    on the socket kata-ci passes, with guest ids squashed to the owner and file caps refused."""
    argv = virtiofsd_argv(spec(workspace=Path("/w/s")), "/t/virtiofsd", 7, 1000, 100, False)
    assert argv[0] == "/t/virtiofsd"
    assert "--shared-dir=/w/s" in argv and "--sandbox=namespace" in argv and "--fd=7" in argv
    assert "--translate-uid=squash-guest:0:1000:4294967295" in argv
    assert "--translate-gid=squash-guest:0:100:4294967295" in argv
    assert any(a.startswith("--xattrmap=:bad:all:security.capability:") for a in argv)
    assert not any(a.startswith("--modcaps") for a in argv)


def test_root_file_server_gives_up_mknod_setfcap_fsetid() -> None:
    """A file server that must run as root (root-owned workspace) drops the capabilities to
    make device nodes, set file capabilities and keep setid bits."""
    argv = virtiofsd_argv(spec(workspace=Path("/w")), "/t/virtiofsd", 3, 0, 0, True)
    assert "--modcaps=-mknod:-setfcap:-fsetid" in argv


def test_qemu_runs_its_seccomp_sandbox() -> None:
    """Every QEMU starts with its seccomp sandbox: no spawn, no privilege change."""
    argv = qemu_argv(spec(), PATHS, "tcg")
    assert option_after(argv, "-sandbox") == [
        "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"]


def test_tcg_guest_gets_the_host_tsc_rate_kvm_does_not() -> None:
    """Under TCG the TSC rate is passed so the guest can use it as clocksource; KVM has
    kvmclock and must not be given a rate."""
    tcg = option_after(qemu_argv(spec(), PATHS, "tcg", tsc_khz=2445404), "-append")[0]
    kvm = option_after(qemu_argv(spec(), PATHS, "kvm", tsc_khz=2445404), "-append")[0]
    assert "tsc_early_khz=2445404" in tcg.split()
    assert "tsc_early_khz" not in kvm
