"""Fast start (issue 9): every figure in snapshot mode next to the cold boot, in one run.

- queue -> first output line of a job (p50/p95 over --jobs jobs, one at a time)
- `kata-ci run -- true` wall time
- a 6-job GitLab pipeline, `kata-ci run --pipeline -j 2`
- trivial jobs/min through the queue, worker concurrency 2
- host PSS per running VM with N = 1, 4, 8 restored from one template, against one cold VM

Run: .venv/bin/python bench/bench_start.py [--jobs 20]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.bench_pipeline import PIPELINE
from kata_ci import paths
from kata_ci.executors.base import VM
from kata_ci.executors.provider import ColdBootProvider, open_provider
from kata_ci.executors.qemu.backend import QemuVM
from kata_ci.runner.core.config import QueueConfig
from kata_ci.runner.core.outcome import FINAL
from kata_ci.runner.queue.app import TASK, make_app, queue_name
from kata_ci.runner.queue.store import JobStore
from kata_ci.runner.queue.workspace import Bounds, pack
from tests.integration.redis_server import RedisServer

KATA_CI = [sys.executable, "-m", "kata_ci.runner.cli"]
MODES = ("cold", "snapshot")


def pctl(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


@contextmanager
def worker(work: Path, url: str, mode: str, concurrency: int) -> Iterator[None]:
    config = work / f"worker-{mode}-{concurrency}.toml"
    config.write_text(f'[vm]\nstart = "{mode}"\n[queue]\nbroker = "{url}"\n'
                      f"concurrency = {concurrency}\nworkspace_quota_mib = 0\n")
    log_path = work / f"worker-{mode}-{concurrency}.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen([*KATA_CI, "worker", "--config", str(config)],
                                env={**os.environ, "KATA_CI_RUN_DIR": str(work / "run")},
                                stdout=log, stderr=log)
    try:
        while b" ready." not in log_path.read_bytes():
            if proc.poll() is not None:
                raise SystemExit(log_path.read_text())
            time.sleep(0.1)
        yield
    finally:
        proc.terminate()
        proc.wait(60)


def queue_first_lines(store: JobStore, url: str, workspace: bytes, n: int) -> list[float]:
    app = make_app(url, 3600)
    took = []
    for _ in range(n):
        started = time.perf_counter()
        job = store.create(["echo", "first"], "default", 600, workspace)
        app.send_task(TASK, args=[job.id], queue=queue_name("default"))
        for stream, data in store.read_log(job.id, follow=True, block_ms=20):
            if stream == "stdout" and b"first" in data:
                took.append(time.perf_counter() - started)
                break
        while store.get(job.id).state not in FINAL:
            time.sleep(0.02)
    return took


def queue_throughput(store: JobStore, url: str, workspace: bytes, n: int) -> float:
    app = make_app(url, 3600)
    started = time.perf_counter()
    ids = []
    for _ in range(n):
        job = store.create(["true"], "default", 600, workspace)
        app.send_task(TASK, args=[job.id], queue=queue_name("default"))
        ids.append(job.id)
    while any(store.get(i).state not in FINAL for i in ids):
        time.sleep(0.05)
    return n / (time.perf_counter() - started) * 60


def cli_walls(work: Path, flags: list[str], n: int) -> list[float]:
    env = {**os.environ, "KATA_CI_RUN_DIR": str(work / "run")}
    took = []
    for _ in range(n):
        started = time.perf_counter()
        subprocess.run([*KATA_CI, "run", *flags, "--", "true"], cwd=work, env=env, check=True,
                       capture_output=True)
        took.append(time.perf_counter() - started)
    return took


def pipeline_wall(work: Path, flags: list[str]) -> float:
    project = Path(tempfile.mkdtemp(prefix="pipe-", dir=work))
    (project / ".gitlab-ci.yml").write_text(PIPELINE)
    env = {**os.environ, "KATA_CI_RUN_DIR": str(work / "run")}
    started = time.perf_counter()
    done = subprocess.run([*KATA_CI, "run", *flags, "--pipeline", "-j", "2"], cwd=project,
                          env=env, capture_output=True)
    if done.returncode != 0:
        raise SystemExit(done.stderr.decode())
    return time.perf_counter() - started


def pss_mib(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                total += int(line.split()[1])
    return total / 1024


def pss_per_vm(provider: ColdBootProvider, work: Path, n: int) -> float:
    from kata_ci.executors.provider import VMRequest

    vms: list[VM] = []
    try:
        for i in range(n):
            share = work / f"pss-{provider.mode}-{n}-{i}"
            share.mkdir()
            vms.append(provider.acquire(VMRequest(share, None, 2, 1024, 300), lambda vm: None))
        time.sleep(3)  # settle: what an idle running VM holds, not the start's transients
        pids = [pid for vm in vms for pid in vm.processes().values()
                if isinstance(vm, QemuVM)]
        return pss_mib(pids) / n
    finally:
        for vm in vms:
            provider.release(vm, graceful=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--jobs", type=int, default=20)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="kci-bs-"))
    os.environ["KATA_CI_RUN_DIR"] = str(work / "run")
    (work / "ws").mkdir()
    packed = pack(work / "ws", Bounds.of(QueueConfig()))
    server = RedisServer()
    server.start()
    store = JobStore.connect(server.url)
    results: dict[str, dict[str, object]] = {m: {} for m in MODES}
    note = print
    try:
        for mode in MODES:
            note(f"[{mode}] queue -> first output line x{args.jobs}", file=sys.stderr)
            with worker(work, server.url, mode, 1):
                results[mode]["first"] = queue_first_lines(store, server.url, packed, args.jobs)
            note(f"[{mode}] queue throughput, concurrency 2", file=sys.stderr)
            with worker(work, server.url, mode, 2):
                results[mode]["rate"] = queue_throughput(store, server.url, packed, 12)
            flags = ["--cold"] if mode == "cold" else []
            note(f"[{mode}] kata-ci run -- true; pipeline", file=sys.stderr)
            results[mode]["run"] = cli_walls(work / "ws", flags, 5)
            results[mode]["pipeline"] = pipeline_wall(work, flags)
        providers = {m: open_provider("auto", lambda s: None, start=m) for m in MODES}
        note("PSS", file=sys.stderr)
        cold_pss = pss_per_vm(providers["cold"], work, 1)
        pss = {n: pss_per_vm(providers["snapshot"], work, n) for n in (1, 4, 8)}
    finally:
        server.close()
    report(results, cold_pss, pss, args.jobs)


def report(results: dict[str, dict[str, object]], cold_pss: float, pss: dict[int, float],
           jobs: int) -> None:
    cold, snap = results["cold"], results["snapshot"]

    def row(name: str, c: float, s: float, unit: str, fmt: Callable[[float], str]) -> None:
        print(f"{name:<44} {fmt(c):>9} {fmt(s):>9} {unit:<8} {s / c:6.2f}x cold")

    secs = lambda v: f"{v:.2f}"  # noqa: E731
    first_c, first_s = cold["first"], snap["first"]
    assert isinstance(first_c, list) and isinstance(first_s, list)
    print(f"fast start benchmark, one run ({jobs} jobs per latency row); "
          f"snapshot vs cold boot measured in the same run\n")
    print(f"{'':<44} {'cold':>9} {'snapshot':>9}")
    row("queue -> first output line, p50", statistics.median(first_c),
        statistics.median(first_s), "s", secs)
    row("queue -> first output line, p95", pctl(first_c, 0.95), pctl(first_s, 0.95), "s", secs)
    runs_c, runs_s = cold["run"], snap["run"]
    assert isinstance(runs_c, list) and isinstance(runs_s, list)
    row("`kata-ci run -- true` wall, median of 5", statistics.median(runs_c),
        statistics.median(runs_s), "s", secs)
    row("6-job pipeline, --pipeline -j 2", float(cold["pipeline"]),  # type: ignore[arg-type]
        float(snap["pipeline"]), "s", secs)  # type: ignore[arg-type]
    row("trivial jobs/min through the queue, conc. 2", float(cold["rate"]),  # type: ignore[arg-type]
        float(snap["rate"]), "jobs/min", lambda v: f"{v:.1f}")  # type: ignore[arg-type]
    for n, value in pss.items():
        row(f"host PSS per running VM, N={n} restored", cold_pss, value, "MiB",
            lambda v: f"{v:.0f}")
    print(f"\n(PSS cold column: one cold-booted VM; {paths.cache_dir()})")


if __name__ == "__main__":
    main()
