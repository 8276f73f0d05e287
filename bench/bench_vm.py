"""Foundation benchmark: boot, exec, streaming, teardown and memory of one microVM.

Run: .venv/bin/python bench/bench_vm.py [--runs N] [--mb M]
Prints one table; every figure is measured in this run, on this machine and kernel, next to
its floor (a VM whose init powers off at once; raw virtio-serial throughput). Not a test:
nothing here asserts a time.
"""

from __future__ import annotations

import argparse
import socket
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

from kata_ci import paths
from kata_ci.executors.base import VMSpec
from kata_ci.executors.qemu.accel import choose
from kata_ci.executors.qemu.backend import QemuBackend, QemuVM
from kata_ci.images.build import load_current

ENV = {"PATH": "/usr/bin:/bin"}


def median_of(runs: int, measure: Callable[[], float]) -> tuple[float, float, float]:
    values = [measure() for _ in range(runs)]
    return statistics.median(values), min(values), max(values)


def pss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1])
    return 0


def drain(vm: QemuVM, argv: list[str]) -> tuple[int, float]:
    """Run argv, discard output; bytes received and seconds from first byte to exit."""
    stream = vm.agent.exec(argv, ENV)
    total, first = 0, None
    for chunk in stream:
        if first is None:
            first = time.perf_counter()
        total += len(chunk.data)
    return total, time.perf_counter() - (first or time.perf_counter())


# Runs inside the guest: the agent's own gRPC server and a client over a local unix socket, no
# virtio-serial, no bridge. It is the ceiling for gRPC streaming on this guest CPU.
GUEST_GRPC_CEILING = """
import sys, threading, time
sys.path[:0] = ['/opt/kata-ci/agent', '/opt/kata-ci/site']
import grpc
from kata_ci.guest import agent_pb2 as pb, agent_pb2_grpc as pbg
from kata_ci.guest.agent import make_server
server = make_server('/tmp/ceiling.sock', '/tmp', threading.Event())
server.start()
channel = grpc.insecure_channel('unix:/tmp/ceiling.sock',
                                options=[('grpc.max_receive_message_length', 8 << 20)])
request = pb.ExecRequest(exec_id='c', argv=['head', '-c', sys.argv[1], '/dev/zero'],
                         env={'PATH': '/usr/bin:/bin'})
total, first = 0, None
for event in pbg.AgentStub(channel).Exec(request):
    if event.WhichOneof('event') == 'output':
        first = first or time.perf_counter()
        total += len(event.output.data)
print(total / (time.perf_counter() - first) / 1e6)
"""


def raw_serial(vm: QemuVM, sock_path: Path, nbytes: int, via_pipe: bool) -> tuple[int, float]:
    """Guest writes straight into a second virtio-serial port (dd from /dev/zero, or fed
    through a pipe as a job's output is); the host reads QEMU's socket."""
    count = nbytes // 65536
    nbytes = count * 65536
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(str(sock_path))
    got = [0, 0.0, 0.0]

    def reader() -> None:
        while got[0] < nbytes:
            data = sock.recv(1 << 20)
            if not data:
                break
            if got[0] == 0:
                got[1] = time.perf_counter()
            got[0] += len(data)
        got[2] = time.perf_counter()

    thread = threading.Thread(target=reader)
    thread.start()
    time.sleep(0.3)  # the guest learns the host end is open
    source = f"head -c {nbytes} /dev/zero | " if via_pipe else ""
    infile = "" if via_pipe else "if=/dev/zero "
    script = ("p=$(grep -l kataci.raw /sys/class/virtio-ports/*/name); "
              f"{source}dd {infile}of=/dev/$(basename $(dirname $p)) bs=64k count={count} "
              "iflag=fullblock 2>/dev/null")
    list(vm.agent.exec(["sh", "-c", script], ENV))
    thread.join(300)
    sock.close()
    if thread.is_alive() or got[0] != nbytes:
        raise SystemExit(f"raw virtio-serial transfer incomplete: {got[0]} of {nbytes} bytes")
    return int(got[0]), got[2] - got[1]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--mb", type=int, default=100)
    args = parser.parse_args()
    manifest = load_current(paths.cache_dir())
    run_root = Path(tempfile.mkdtemp(prefix="kci-bench-", dir="/tmp"))
    decision = choose("auto", manifest, paths.cache_dir(), run_root)
    backend = QemuBackend(decision.accel, run_root, Path(manifest.tools.path))
    workspace = Path(tempfile.mkdtemp(prefix="kci-bench-ws-"))
    base = VMSpec(kernel=Path(manifest.kernel.path), initramfs=Path(manifest.initramfs.path),
                  rootfs=Path(manifest.rootfs.path), workspace=workspace)
    rows: list[tuple[str, str, str]] = []

    def floor_once() -> float:
        vm = backend.create_floor(base)
        try:
            return vm.start(60).agent_healthy
        finally:
            vm.kill()

    def boot_once() -> float:
        with backend.create(base) as vm:
            return vm.start(120).agent_healthy

    floor = median_of(args.runs, floor_once)
    boot = median_of(args.runs, boot_once)
    rows.append(("bare floor: QEMU + kernel + init that powers off", f"{floor[0]:.2f} s",
                 f"min {floor[1]:.2f} max {floor[2]:.2f}"))
    rows.append(("cold boot -> agent healthy", f"{boot[0]:.2f} s",
                 f"{boot[0] / floor[0]:.2f}x floor (min {boot[1]:.2f} max {boot[2]:.2f})"))

    raw_sock = run_root / "raw.sock"
    spec = VMSpec(kernel=base.kernel, initramfs=base.initramfs, rootfs=base.rootfs,
                  workspace=workspace, extra_qemu_args=(
                      "-chardev", f"socket,id=raw,path={raw_sock},server=on,wait=off",
                      "-device", "virtserialport,chardev=raw,name=kataci.raw"))
    with backend.create(spec) as vm:
        times = vm.start(120)
        rows.append(("  guest: agent process started / healthy (uptime)",
                     f"{times.guest_agent_started:.2f} s",
                     f"healthy at {times.guest_uptime_at_health:.2f} s guest uptime"))

        def exec_true() -> float:
            started = time.perf_counter()
            list(vm.agent.exec(["true"], ENV))
            return time.perf_counter() - started

        exec_true()
        time.sleep(1.0)  # idle: booted, one command run, nothing streamed yet
        pss = {name: pss_kib(pid) for name, pid in vm.processes().items()}
        rtt = median_of(max(args.runs * 4, 10), exec_true)
        rows.append(("exec round trip of `true`", f"{rtt[0] * 1000:.0f} ms",
                     f"min {rtt[1] * 1000:.0f} max {rtt[2] * 1000:.0f}"))
        rows.append(("host PSS of one idle VM + virtiofsd",
                     f"{sum(pss.values()) / 1024:.1f} MB",
                     ", ".join(f"{k} {v / 1024:.1f} MB" for k, v in pss.items())))
        nbytes = args.mb * 1_000_000
        raw_n, raw_s = raw_serial(vm, raw_sock, nbytes, via_pipe=False)
        piped_n, piped_s = raw_serial(vm, raw_sock, nbytes, via_pipe=True)
        got, secs = drain(vm, ["head", "-c", str(nbytes), "/dev/zero"])
        (workspace / "ceiling.py").write_text(GUEST_GRPC_CEILING)
        ceiling = float(b"".join(c.data for c in vm.agent.exec(
            ["python3", "ceiling.py", str(nbytes)], ENV)).decode().strip() or 0)
        raw_rate, rate = raw_n / raw_s / 1e6, got / secs / 1e6
        piped = piped_n / piped_s / 1e6
        rows.append(("raw virtio-serial guest->host (dd /dev/zero)", f"{raw_rate:.1f} MB/s",
                     f"{raw_n / 1e6:.0f} MB"))
        rows.append(("raw virtio-serial, fed through a pipe", f"{piped:.1f} MB/s",
                     f"{piped / raw_rate * 100:.0f}% of raw (a job's output crosses a pipe)"))
        rows.append(("  ceiling: gRPC alone inside the guest (no serial)", f"{ceiling:.1f} MB/s",
                     f"{ceiling / raw_rate * 100:.0f}% of raw"))
        rows.append(("Exec streaming guest->host (gRPC over serial)", f"{rate:.1f} MB/s",
                     f"{rate / raw_rate * 100:.0f}% of raw, {rate / ceiling * 100:.0f}% of "
                     f"the gRPC ceiling, {got / 1e6:.0f} MB"))

    def teardown_once() -> float:
        vm = backend.create(base)
        vm.start(120)
        list(vm.agent.exec(["true"], ENV))
        started = time.perf_counter()
        vm.stop()
        return time.perf_counter() - started

    down = median_of(max(args.runs // 2, 2), teardown_once)
    rows.append(("teardown: Shutdown RPC (sync), kill, reap, remove", f"{down[0] * 1000:.0f} ms",
                 f"min {down[1] * 1000:.0f} max {down[2] * 1000:.0f}"))

    width = max(len(r[0]) for r in rows)
    print(f"kata-ci foundation benchmark — accel {decision.accel} ({decision.reason})")
    print(f"kernel {manifest.kernel.detail}; {args.runs} runs per boot figure; median shown\n")
    for name, value, note in rows:
        print(f"{name:<{width}}  {value:>10}  {note}")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
