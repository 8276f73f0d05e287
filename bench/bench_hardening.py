"""What the sandbox hardening costs: boot time, exec latency and host memory of a confined VM
against the same VM started the pre-hardening way, interleaved in one run.

Run: .venv/bin/python bench/bench_hardening.py [--runs N]

"confined" is kata-ci as shipped: kata-ci-jail (cgroup, identity drop, no_new_privs, seccomp
on the file server), QEMU as the kata-ci user with -sandbox, virtiofsd 1.13 as the
workspace's owner with id squashing, console and logs through capped pipes. "unconfined" is
the same code with the confinement switched off here, in the benchmark only (identity,
cgroup, jail and QEMU's -sandbox patched out): everything else, including the images and
virtiofsd 1.13, is the same, so the difference is the hardening. Not a test: nothing asserts.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from kata_ci import paths
from kata_ci.executors.base import VMSpec
from kata_ci.executors.qemu import backend as backend_mod
from kata_ci.executors.qemu.accel import choose
from kata_ci.executors.qemu.backend import QemuBackend
from kata_ci.images.build import load_current

ENV = {"PATH": "/usr/bin:/bin"}


@contextlib.contextmanager
def unconfined() -> Iterator[None]:
    saved: dict[str, Any] = {name: getattr(backend_mod, name) for name in
                             ("qemu_identity", "fileserver_identity", "jail_argv", "qemu_argv")}
    real_qemu_argv = saved["qemu_argv"]
    real_create = backend_mod.VMCgroup.create

    def qemu_argv(*args: Any, **kw: Any) -> list[str]:
        argv: list[str] = real_qemu_argv(*args, **kw)
        at = argv.index("-sandbox")
        return argv[:at] + argv[at + 2:]

    backend_mod.qemu_identity = lambda: None  # type: ignore[assignment]
    backend_mod.fileserver_identity = lambda owner: None  # type: ignore[assignment]
    backend_mod.jail_argv = lambda *a, **k: []  # type: ignore[assignment]
    backend_mod.qemu_argv = qemu_argv  # type: ignore[assignment]
    backend_mod.VMCgroup.create = lambda self: []  # type: ignore[method-assign]
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(backend_mod, name, value)
        backend_mod.VMCgroup.create = real_create  # type: ignore[method-assign]


def pss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1])
    return 0


def one(backend: QemuBackend, spec: VMSpec) -> tuple[float, float, float]:
    """Boot to agent Health (s), exec `true` (ms), PSS of QEMU + file server (MiB)."""
    vm = backend.create(spec)
    try:
        started = time.perf_counter()
        vm.start(180)
        boot = time.perf_counter() - started
        started = time.perf_counter()
        list(vm.agent.exec(["true"], ENV))
        exec_ms = (time.perf_counter() - started) * 1000
        time.sleep(1)
        pss = sum(pss_kib(pid) for pid in vm.processes().values()) / 1024
        return boot, exec_ms, pss
    finally:
        vm.kill()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    manifest = load_current(paths.cache_dir())
    run_root = Path(tempfile.mkdtemp(prefix="kci-bench-", dir="/tmp"))
    decision = choose("auto", manifest, paths.cache_dir(), run_root)
    backend = QemuBackend(decision.accel, run_root, Path(manifest.tools.path))
    workspace = Path(tempfile.mkdtemp(prefix="kci-bench-ws-"))
    spec = VMSpec(kernel=Path(manifest.kernel.path), initramfs=Path(manifest.initramfs.path),
                  rootfs=Path(manifest.rootfs.path), workspace=workspace)
    results: dict[str, list[tuple[float, float, float]]] = {"confined": [], "unconfined": []}
    for _ in range(args.runs):  # interleaved: both arms see the same host load
        results["confined"].append(one(backend, spec))
        with unconfined():
            results["unconfined"].append(one(backend, spec))
    print(f"accel={decision.accel} runs={args.runs} (median, min-max)")
    print(f"{'metric':34} {'confined':>20} {'unconfined':>20} {'ratio':>7}")
    for index, (label, unit) in enumerate((("boot to agent Health", "s"),
                                           ("exec `true`", "ms"),
                                           ("PSS qemu + virtiofsd", "MiB"))):
        cells = []
        medians = []
        for arm in ("confined", "unconfined"):
            values = [row[index] for row in results[arm]]
            medians.append(statistics.median(values))
            cells.append(f"{medians[-1]:.2f} ({min(values):.2f}-{max(values):.2f}) {unit}")
        print(f"{label:34} {cells[0]:>20} {cells[1]:>20} {medians[0] / medians[1]:>7.2f}")


if __name__ == "__main__":
    main()
