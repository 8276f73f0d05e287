"""kata-ci as a GitLab runner (issue 11), in one run, against the contract FAKE of GitLab
(tests/fakes/gitlab.py; GitLab itself cannot be reached here), a real Redis, a real
`kata-ci worker`, a real `kata-ci gitlab run` and real VMs:

- jobs/request 201 -> first trace byte received by the fake (p50/p95 over N jobs; kata-ci's
  own first line, before the VM), -> the script's first output line there (the commit, the
  queue, the worker, the source fetch, the VM start, the PATCH), -> the final PUT;
- trace latency: a line's arrival in the job's Redis log (the host has it from the guest;
  the Redis entry id is Redis's clock in ms) -> the PATCH carrying it received by the fake,
  at the fake's X-GitLab-Trace-Update-Interval (given; GitLab's default is 3 s);
- next to the floor measured in the same run: a bare VM start (acquire -> agent healthy ->
  release) through the same provider the worker uses.

    .venv/bin/python bench/bench_gitlab.py [--jobs 20] [--interval 1]
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
from kata_ci.executors.provider import VMRequest, open_provider
from kata_ci.runner.queue.store import JobStore
from tests.fakes.git_http import make_repo
from tests.fakes.gitlab import FakeGitLab
from tests.integration.redis_server import RedisServer

KATA_CI = [sys.executable, "-m", "kata_ci.runner.cli"]


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def floor(count: int) -> list[float]:
    provider = open_provider("auto", lambda m: print(m, file=sys.stderr))
    with tempfile.TemporaryDirectory() as ws:
        request = VMRequest(Path(ws), "/workspace", 2, 1024, 120.0)
        provider.prepare([(2, 1024, False)])
        times = []
        for _ in range(count):
            started = time.monotonic()
            vm = provider.acquire(request, lambda vm: None)
            times.append(time.monotonic() - started)
            provider.release(vm, graceful=True)
    return times



def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--jobs", type=int, default=20)
    parser.add_argument("--interval", type=int, default=1)
    args = parser.parse_args()
    boots = floor(args.jobs // 2 or 1)
    root = Path(tempfile.mkdtemp(prefix="kci-bench-gl-", dir="/tmp"))
    redis = RedisServer()
    redis.start()
    fake = FakeGitLab(make_repo(root, {"README": "bench\n"}, "bench"), long_poll=5.0,
                      trace_interval=args.interval)
    fake.start()
    config = root / "config.toml"
    config.write_text(
        f'[queue]\nbroker = "{redis.url}"\n[vm]\nnetwork = "none"\n'
        f'[[gitlab.runners]]\nurl = "{fake.url}"\ntoken = "{fake.runner_token}"\n'
        'system_id = "s_0123456789ab"\nid = 1\nlabel = "default"\n')
    env = {**os.environ, "KATA_CI_RUN_DIR": str(root / "run")}
    logs = [(root / "worker.log").open("wb"), (root / "poller.log").open("wb")]
    procs = [subprocess.Popen([*KATA_CI, "worker", "--config", str(config)], env=env,
                              stdout=logs[0], stderr=logs[0])]
    store = JobStore.connect(redis.url)
    try:
        while b" ready." not in (root / "worker.log").read_bytes():
            time.sleep(0.2)
        procs.append(subprocess.Popen([*KATA_CI, "gitlab", "run", "--config", str(config),
                                       "--check-interval", "0.2"], env=env,
                                      stdout=logs[1], stderr=logs[1]))
        first, output, total, latency = [], [], [], []
        wall = time.time() - time.monotonic()
        lines = 15
        for i in range(args.jobs):
            job = fake.add_job([f"for n in $(seq {lines}); do echo J{i}-L$n; sleep 0.2; done"])
            done = fake.wait_final(job.id, 600)
            assert done.final and done.final["state"] == "success", bytes(done.trace)
            assert done.handed_at is not None and done.first_trace_at is not None
            patches = [r for r in fake.requests if r.method == "PATCH" and r.status == 202
                       and f"/{job.id}/" in r.path]
            first.append(done.first_trace_at - done.handed_at)
            output.append(next(r.at for r in patches if f"J{i}-L1\n".encode() in r.body)
                          - done.handed_at)
            total.append(max(r.at for r in fake.requests if r.method == "PUT"
                             and r.path.endswith(f"/{job.id}")) - done.handed_at)
            ours = next(j for j in store.recent(5) if j.argv == [done.payload["job_info"]["name"]]
                        and j.created_at >= wall + done.handed_at - 5)
            entries = store.r.xrange(f"kataci:log:{ours.id}")
            for n in range(1, lines + 1):
                mark = f"J{i}-L{n}\n".encode()
                arrived = next(int(eid.split(b"-")[0]) / 1000 for eid, fields in entries
                               if mark in fields[b"d"])
                patched = next(r.at + wall for r in patches if mark in r.body)
                latency.append(patched - arrived)
        print(f"\nGitLab runner, {args.jobs} jobs one after another, trace interval "
              f"{args.interval} s (fake GitLab), this machine (TCG):\n")
        print("| measure | p50 | p95 | ratio p50 / VM start p50 |")
        print("| --- | --- | --- | --- |")
        base = statistics.median(boots)
        for name, values in (("bare VM start (floor, same provider)", boots),
                             ("jobs/request 201 -> first trace byte", first),
                             ("jobs/request 201 -> first script output at GitLab", output),
                             ("jobs/request 201 -> final PUT (3 s script)", total),
                             (f"trace latency per line ({lines} lines/job, Redis log -> "
                              "PATCH received)", latency)):
            print(f"| {name} | {statistics.median(values):.2f} s | {pct(values, 0.95):.2f} s | "
                  f"{statistics.median(values) / base:.2f} |")
    finally:
        for proc in reversed(procs):
            proc.terminate()
            proc.wait(60)
        fake.stop()
        redis.close()


if __name__ == "__main__":
    main()
