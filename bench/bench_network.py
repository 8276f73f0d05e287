"""Per-job networking (issue 10), in one run, against the network suite's lab hosts:

- TCP throughput (a 64 MiB HTTP download) and connect latency (median of 20) from a guest
  in egress mode, next to the same measured from the host namespace (the floor);
- the boot time networking adds per VM: namespace + tap + ruleset before QEMU starts, and
  the wait for pasta after the agent answers; VM start p50 with network none vs egress.

The lab needs a network namespace of its own, so the script re-runs itself under unshare:
    .venv/bin/python bench/bench_network.py [--starts 8]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from kata_ci.executors.base import VM
from kata_ci.executors.network.policy import NONE, NetworkPolicy, build_policy
from kata_ci.executors.provider import VMRequest, open_provider
from tests import netlab

SIZE = 64 << 20
URL = f"http://{netlab.INTERNET_V4}"
PROBE = (f"curl -s -o /dev/null -w '%{{speed_download}}\\n' {URL}/bytes/{SIZE}; "
         f"for i in $(seq 20); do curl -s -o /dev/null -w '%{{time_connect}}\\n' {URL}/hello; "
         "done")
ENV = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"}


def measure(output: str) -> tuple[float, float]:
    """(MiB/s, median connect ms) from PROBE's output."""
    values = [float(v) for v in output.split()]
    return values[0] / (1 << 20), statistics.median(values[1:]) * 1000


def in_guest(vm: VM, script: str) -> str:
    stream = vm.agent.exec(["sh", "-c", script], ENV)
    out = b"".join(chunk.data for chunk in stream).decode()
    assert stream.exit is not None and stream.exit.exit_code == 0, out
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--starts", type=int, default=8)
    args = parser.parse_args()
    if netlab.check_isolated() is not None:
        os.execvp("unshare", ["unshare", "--net", "--mount", "--propagation", "private", "--",
                              sys.executable, *sys.argv])
    with netlab.lab():
        host = measure(subprocess.run(["sh", "-c", PROBE], capture_output=True, text=True,
                                      check=True).stdout)
        provider = open_provider("auto", lambda m: print(m, file=sys.stderr))
        workspace = Path(tempfile.mkdtemp(prefix="kci-bench-net-", dir="/tmp"))
        egress = build_policy("egress", [], [], [netlab.INTERNET_V4], "bench")
        starts: dict[str, list[float]] = {"none": [], "egress": []}
        setup: list[float] = []
        uplink: list[float] = []
        guest = (0.0, 0.0)
        for policy in (NONE, egress):  # build each template before timing
            provider.release(provider.acquire(_request(workspace, policy), lambda _: None), True)
        for i in range(args.starts):
            for name, policy in (("none", NONE), ("egress", egress)):
                began = time.monotonic()
                vm = provider.acquire(_request(workspace, policy), lambda _: None)
                starts[name].append(time.monotonic() - began)
                times = vm.boot_times
                if name == "egress":
                    if times is not None:
                        setup.append(times.network_setup)
                        uplink.append(times.uplink_wait)
                    if i == 0:
                        guest = measure(in_guest(vm, PROBE))
                provider.release(vm, True)
        workspace.rmdir()
    none_p50, egress_p50 = (statistics.median(starts[k]) for k in ("none", "egress"))
    rows = [
        ("TCP throughput, 64 MiB download", f"{host[0]:.0f} MiB/s", f"{guest[0]:.1f} MiB/s",
         f"{guest[0] / host[0]:.3f}x"),
        ("TCP connect latency, median of 20", f"{host[1]:.2f} ms", f"{guest[1]:.2f} ms",
         f"{guest[1] / host[1]:.1f}x"),
        ("VM start p50 (restore), none vs egress", f"{none_p50 * 1000:.0f} ms",
         f"{egress_p50 * 1000:.0f} ms", f"{(egress_p50 - none_p50) * 1000:+.0f} ms"),
    ]
    if setup:
        rows.append(("netns + tap + nftables before QEMU, p50", "",
                     f"{statistics.median(setup) * 1000:.1f} ms", ""))
        rows.append(("wait for pasta after the agent, p50", "",
                     f"{statistics.median(uplink) * 1000:.1f} ms", ""))
    print(f"\n{'':42} {'host netns':>14} {'guest':>14} {'ratio':>9}")
    for label, a, b, c in rows:
        print(f"{label:42} {a:>14} {b:>14} {c:>9}")


def _request(workspace: Path, policy: NetworkPolicy) -> VMRequest:
    return VMRequest(workspace, None, 2, 1024, 120.0, policy)


if __name__ == "__main__":
    main()
