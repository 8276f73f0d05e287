"""VMs whose owning kata-ci process is gone (SIGKILLed, host crash): found by the record
each VM keeps in its run directory (``vm.json``: owner pid, QEMU and virtiofsd pids)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
from pathlib import Path

from kata_ci.executors.network.netns import remove_netns
from kata_ci.executors.qemu.confine import remove_stale_cgroup
from kata_ci.procs import pid_alive

RECORD = "vm.json"


def reap_orphans(run_root: Path) -> list[str]:
    """Kill and remove VMs whose owning process is gone. Returns the reaped VM ids."""
    reaped: list[str] = []
    if not run_root.is_dir():
        return reaped
    for vm_dir in run_root.iterdir():
        try:
            record = json.loads((vm_dir / RECORD).read_text())
        except (OSError, ValueError):
            continue
        if pid_alive(record.get("owner")):
            continue
        for key in ("qemu", "virtiofsd", "pasta"):
            pid = record.get(key)
            # Only a process whose command line names this VM: pids get reused.
            if pid and _cmdline_mentions(pid, vm_dir.name):
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
        remove_netns(vm_dir.name)  # the kernel drops its links and ruleset with it
        shutil.rmtree(vm_dir, ignore_errors=True)
        remove_stale_cgroup(vm_dir.name)
        reaped.append(vm_dir.name)
    return reaped


def _cmdline_mentions(pid: int, vm_id: str) -> bool:
    try:
        return vm_id.encode() in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
