"""Attacks from a hostile guest on the host through the VM's own processes and the share:
setuid files, device nodes, file capabilities and ownership through virtio-fs; QEMU's and the
file server's privileges; console flooding; a guest that halts; memory exhaustion."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from kata_ci.errors import SystemFailure
from kata_ci.executors.qemu.backend import QemuVM
from kata_ci.executors.qemu.confine import CGROUP_ROOT
from kata_ci.executors.qemu.logs import DEFAULT_CAP
from tests.e2e.conftest import KATA_CI, VMFactory

ENV = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"}
OWNER = 4321  # an unprivileged host uid that owns the test's workspace


@pytest.fixture
def owned_dir() -> Iterator[Path]:
    """A workspace under /tmp (pytest's tmp_path sits below a root-only 0700 folder, which a
    file server running as another user could not reach)."""
    path = Path(tempfile.mkdtemp(prefix="kci-sec-", dir="/tmp"))
    os.chmod(path, 0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def run(vm: QemuVM, script: str, cwd: str = "") -> tuple[str, int]:
    stream = vm.agent.exec(["sh", "-c", script], ENV, cwd=cwd)
    out = b"".join(chunk.data for chunk in stream)
    assert stream.exit is not None
    return out.decode(errors="replace"), stream.exit.exit_code


ATTACK = """
cp /bin/sh suid-sh; chmod 4755 suid-sh; chmod u+s suid-sh
python3 -c 'import os; os.open("created-suid", os.O_CREAT | os.O_WRONLY, 0o4755)'
mkdir sgid-dir; chmod 2775 sgid-dir
mknod blockdev b 8 0; mknod chardev c 1 3
touch capfile
python3 -c "import os; os.setxattr('capfile', 'security.capability', \\
  bytes.fromhex('0100000200200000') + bytes(12))"  # v2: permitted cap_net_raw
touch rootowned; chown 0:0 rootowned; chown 1:1 rootowned
ls -ln; true
"""


def _check_no_powers(workspace: Path, owner: int) -> None:
    for entry in workspace.iterdir():
        st = entry.lstat()
        assert not st.st_mode & (stat.S_ISUID | stat.S_ISGID), f"{entry.name} kept a setid bit"
        assert not stat.S_ISBLK(st.st_mode) and not stat.S_ISCHR(st.st_mode), \
            f"{entry.name} is a device node on the host"
        assert st.st_uid == owner, f"{entry.name} is owned by uid {st.st_uid}, not {owner}"
        if stat.S_ISREG(st.st_mode):
            assert "security.capability" not in os.listxattr(entry, follow_symlinks=False)


@pytest.mark.parametrize("owner", [OWNER, 0], ids=["user-owned", "root-owned"])
def test_guest_root_gets_no_setid_devices_caps_or_foreign_owners_on_host(
        vm_factory: VMFactory, owned_dir: Path, owner: int) -> None:
    """Guest root makes setuid/setgid files, device nodes, a file capability and chowns to
    root in the share: on the host none of it exists and everything belongs to the owner."""
    workspace = owned_dir
    os.chown(workspace, owner, owner)
    vm = vm_factory(workspace)
    out, _ = run(vm, ATTACK, cwd=str(workspace))
    assert (workspace / "suid-sh").is_file(), out  # plain files and chmod still work
    _check_no_powers(workspace, owner)


def test_qemu_and_file_server_run_unprivileged_seccompd_in_a_limited_cgroup(
        vm_factory: VMFactory, owned_dir: Path) -> None:
    """QEMU runs as a non-root uid under seccomp; the file server of a user-owned workspace
    runs as that user under seccomp; both sit in the VM's cgroup with memory and pids limits."""
    workspace = owned_dir
    os.chown(workspace, OWNER, OWNER)
    vm = vm_factory(workspace, memory_mib=512)
    procs = vm.processes()
    for name, pid in procs.items():
        status = Path(f"/proc/{pid}/status").read_text()
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        uids = fields["Uid"].split()
        assert "0" not in uids, f"{name} runs with uid 0: {uids}"
        assert fields["Seccomp"].strip() == "2", f"{name} has no seccomp filter"
        assert fields["NoNewPrivs"].strip() == "1", f"{name} may gain privileges"
    assert Path(f"/proc/{procs['virtiofsd']}/status").read_text().count(f"\t{OWNER}\t") >= 1
    memory = [line.split(":", 2)[2] for line in
              Path(f"/proc/{procs['qemu']}/cgroup").read_text().splitlines()
              if line.split(":")[1] in ("memory", "")]
    group = next(g for g in memory if vm.id in g)
    v2 = CGROUP_ROOT / group.lstrip("/")
    v1 = CGROUP_ROOT / "memory" / group.lstrip("/")
    limit = (v2 / "memory.max") if v2.is_dir() and (v2 / "memory.max").exists() \
        else (v1 / "memory.limit_in_bytes")
    assert int(limit.read_text()) < (4 << 30), "memory limit missing or unbounded"
    assert int(limit.read_text()) >= 512 << 20


def test_console_flood_is_capped_on_the_host(vm_factory: VMFactory) -> None:
    """A job writing far more than the cap to the serial console leaves at most the cap on
    the host, and the newest output is kept."""
    vm = vm_factory()
    flood = 3 * DEFAULT_CAP
    run(vm, f"head -c {flood} /dev/zero | tr '\\0' x > /dev/ttyS0; echo FLOOD-END > /dev/ttyS0")
    deadline = time.monotonic() + 30
    console = vm.paths.console
    while "FLOOD-END" not in vm.diagnostics(5) and time.monotonic() < deadline:
        time.sleep(0.2)
    sizes = sum(p.stat().st_size for p in console.parent.glob(console.name + "*"))
    assert sizes <= DEFAULT_CAP, f"console logs hold {sizes} bytes on the host"
    assert "FLOOD-END" in vm.diagnostics(5)


def test_guest_that_powers_off_is_a_system_failure_at_once(vm_factory: VMFactory) -> None:
    """A job powers the guest off (a halt without ACPI, QEMU keeps running): the call in
    flight fails as a system failure naming the halt within 2 s of the power-off."""
    vm = vm_factory()
    stream = vm.agent.exec(["python3", "-c", "import ctypes, os, time; "
                            "os.write(1, b'halting\\n'); time.sleep(0.2); "
                            "ctypes.CDLL(None).reboot(0x4321FEDC); time.sleep(120)"], ENV)
    halting_at = None
    with pytest.raises(SystemFailure):
        for chunk in stream:
            if b"halting" in chunk.data:
                halting_at = time.monotonic()
    assert halting_at is not None
    elapsed = time.monotonic() - halting_at - 0.2
    with pytest.raises(SystemFailure, match="stopped on its own"):
        vm.check()
    assert elapsed < 2.0, f"halt noticed only {elapsed:.1f}s after it happened"


def test_filling_every_tmpfs_gives_enospc_and_the_agent_survives(
        vm_factory: VMFactory) -> None:
    """A job fills /, /tmp, /run and /dev/shm in RAM: each write ends with ENOSPC and the
    agent still answers the next command (no OOM kill of the agent)."""
    vm = vm_factory(memory_mib=512)
    script = ("for f in /fill /tmp/fill /run/fill /dev/shm/fill; do "
              "dd if=/dev/zero of=$f bs=1M 2>&1 | grep -o 'No space left on device'; done")
    out, _ = run(vm, script)
    assert out.count("No space left on device") == 4, out
    out, code = run(vm, "echo agent-alive; cat /proc/$(pgrep -f kata_ci.guest.agent | head -1)"
                        "/oom_score_adj")
    assert code == 0 and "agent-alive" in out and "-1000" in out


def test_one_file_cannot_grow_past_the_bound(vm_factory: VMFactory, tmp_path: Path) -> None:
    """fallocate/dd past the per-file bound fail in the guest (EFBIG); the host file stays
    within the bound, so an instant fallocate of gigabytes costs the host nothing."""
    workspace = tmp_path / "ws"
    workspace.mkdir()
    vm = vm_factory(workspace, max_file_size=32 << 20)
    out, _ = run(vm, "fallocate -l 8G big; echo falloc=$?; "
                     "dd if=/dev/zero of=grown bs=1M count=64 2>&1 | tail -1", cwd=str(workspace))
    assert "falloc=1" in out
    assert not (workspace / "big").exists() or (workspace / "big").stat().st_size <= 32 << 20
    assert (workspace / "grown").stat().st_size <= 32 << 20


def test_second_run_in_a_busy_checkout_says_so(cli_env: dict[str, str], tmp_path: Path) -> None:
    """While one `kata-ci run` runs jobs in a checkout, a second one stops at once with a
    clear 'busy' message instead of racing it (guest file locks do not cross VMs)."""
    first = subprocess.Popen([*KATA_CI, "run", "--", "sleep", "30"], env=cli_env, cwd=tmp_path,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(2)  # the lock is taken before the VM boots
        second = subprocess.run([*KATA_CI, "run", "--", "true"], env=cli_env, cwd=tmp_path,
                                capture_output=True, timeout=120)
        assert second.returncode == 2
        assert b"busy" in second.stderr and b"Traceback" not in second.stderr
    finally:
        first.terminate()
        first.wait(60)


def test_a_process_left_in_a_vms_cgroup_is_killed_and_the_cgroup_removed() -> None:
    """A process still in a VM's cgroup when the VM is torn down (as virtiofsd's sandbox
    child can be for a moment) is killed, and the cgroup goes: none outlives its VM."""
    import signal
    import uuid

    from kata_ci.executors.qemu.confine import Limits, VMCgroup

    group = VMCgroup(f"test-{uuid.uuid4().hex[:8]}", Limits(512 << 20, 1.0, 256))
    dirs = group.create()
    if not dirs:
        pytest.skip(f"no cgroups here: {group.reason}")
    child = subprocess.Popen(["sleep", "300"])
    try:
        for path in dirs:
            (path / "cgroup.procs").write_text(str(child.pid))
        group.remove()
        assert child.wait(5) == -signal.SIGKILL
        assert not [p for p in dirs if p.exists()]
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
