"""Queue throughput: trivial jobs per minute through submit -> Redis -> worker -> VM -> result
(worker concurrency 2), next to the same number of bare `kata-ci run` in the same run.

Run: .venv/bin/python bench/bench_queue.py [--jobs N]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from kata_ci.runner.core.outcome import FINAL
from kata_ci.runner.queue.store import JobStore
from tests.integration.redis_server import RedisServer

KATA_CI = [sys.executable, "-m", "kata_ci.runner.cli"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--jobs", type=int, default=8)
    args = parser.parse_args()
    n = args.jobs
    work = Path(tempfile.mkdtemp(prefix="kci-bq-"))
    server = RedisServer()
    server.start()
    config = work / "config.toml"
    config.write_text(f'[queue]\nbroker = "{server.url}"\nconcurrency = 2\n')
    env = {**os.environ, "KATA_CI_RUN_DIR": str(work / "run")}
    log = (work / "worker.log").open("wb")
    worker = subprocess.Popen([*KATA_CI, "worker", "--config", str(config)], env=env,
                              stdout=log, stderr=log)
    try:
        while b" ready." not in (work / "worker.log").read_bytes():
            time.sleep(0.1)
        store = JobStore.connect(server.url)
        rows = []

        def bare(_: int) -> float:
            started = time.perf_counter()
            subprocess.run([*KATA_CI, "run", "--", "true"], env=env, cwd=work, check=True,
                           capture_output=True)
            return time.perf_counter() - started

        started = time.perf_counter()
        for i in range(n):
            bare(i)
        sequential = time.perf_counter() - started
        started = time.perf_counter()
        with ThreadPoolExecutor(2) as pool:
            list(pool.map(bare, range(n)))
        parallel = time.perf_counter() - started

        started = time.perf_counter()
        ids = [subprocess.run([*KATA_CI, "submit", "--config", str(config), "--detach", "--",
                               "true"], cwd=work, check=True, capture_output=True)
               .stdout.decode().strip() for _ in range(n)]
        while any(store.get(i).state not in FINAL for i in ids):
            time.sleep(0.05)
        queued = time.perf_counter() - started
        states = sorted({store.get(i).state for i in ids})
        rows.append((f"bare `kata-ci run -- true` x{n}, one at a time", sequential))
        rows.append((f"bare `kata-ci run -- true` x{n}, two at a time", parallel))
        rows.append((f"submit -> queue -> worker (concurrency 2) x{n}", queued))
        print(f"queue benchmark: {n} trivial jobs each; final states of queued jobs: {states}\n")
        for name, secs in rows:
            print(f"{name:<50} {secs:6.1f} s  {n / secs * 60:5.1f} jobs/min  "
                  f"{secs / parallel:4.2f}x bare-2")
    finally:
        worker.terminate()
        worker.wait(30)
        server.close()


if __name__ == "__main__":
    main()
