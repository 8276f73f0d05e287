"""GitHub runners (issue 12), in one run, in the network lab: webhook received -> runner
process started in the guest (its first output in the job log), p50/p95 over N jobs, next
to the bare VM start (acquire -> agent healthy, same image cache, same network mode) measured
in the same run: the floor a runner start cannot beat.

Uses the contract FAKE of GitHub and the FAKE actions runner (tests/fakes/): GitHub and its
real runner cannot be reached here. The real runner's own start-up (.NET, connecting to
GitHub; Depot measured 3.7 s average) comes on top of these figures. Peers' published
figures to a running runner: fireactions ~20 s, actions-runner-controller 30-90 s.

    .venv/bin/python bench/bench_github.py [--jobs 20]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import redis

from kata_ci.executors.network.policy import build_policy
from kata_ci.executors.provider import VMRequest, open_provider
from kata_ci.runner.github_runner.state import GitHubState
from kata_ci.runner.queue.store import JobStore
from tests import netlab
from tests.e2e.network import github_lab as lab_gh
from tests.e2e.test_daemon import wait_until
from tests.fakes.github import FakeGitHub
from tests.integration.redis_server import RedisServer


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def first_output_at(store: JobStore, kata_id: str) -> float | None:
    """Host time the job log got its first guest output (the runner process is up)."""
    for entry_id, fields in store.r.xrange(f"kataci:log:{kata_id}"):
        if fields.get(b"s") in (b"stdout", b"stderr"):
            return int(entry_id.split(b"-")[0]) / 1000
    return None


def one_job(fake: FakeGitHub, store: JobStore, state: GitHubState) -> float:
    """Seconds from the webhook (the job queued at the fake, which delivers at once) to the
    runner's first output, after which the runner's VM is waited out."""
    sent = time.time()
    job = fake.queue_job(steps=({"name": "n", "run": "true"},))
    wait_until(lambda: state.job(job.id).get("kata_job", "") != "", 30, "demand")
    kata_id = state.job(job.id)["kata_job"]
    wait_until(lambda: first_output_at(store, kata_id) is not None, 300, "runner output")
    started = first_output_at(store, kata_id) or sent
    wait_until(lambda: store.get(kata_id).state not in ("queued", "running"), 300,
               "runner end")
    return started - sent


def bare_starts(cache: Path, count: int) -> list[float]:
    os.environ["KATA_CI_CACHE"] = str(cache)
    provider = open_provider("auto", lambda m: print(m, file=sys.stderr))
    policy = build_policy("egress", (), (), (netlab.INTERNET_V4,), "bench")
    times = []
    for _ in range(count):
        workspace = Path(tempfile.mkdtemp(prefix="kci-ghb-", dir="/tmp"))
        started = time.monotonic()
        vm = provider.acquire(VMRequest(workspace, "/workspace", 2, 1024, 120, policy),
                              lambda _: None)
        times.append(time.monotonic() - started)
        provider.release(vm, graceful=True)
        workspace.rmdir()
    return times


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--jobs", type=int, default=20)
    args = parser.parse_args()
    if netlab.check_isolated() is not None:
        os.execvp("unshare", ["unshare", "--net", "--mount", "--propagation", "private", "--",
                              sys.executable, *sys.argv])
    root = Path(tempfile.mkdtemp(prefix="kci-ghb-", dir="/tmp"))
    redis_server = RedisServer()
    with netlab.lab():  # the namespace's loopback is up from here: Redis can listen
        redis_server.start()
        cache = lab_gh.layer_cache(root)
        config = lab_gh.write_config(root / "config.toml", redis_server.url,
                                     f"http://{netlab.INTERNET_V4}:{lab_gh.API_PORT}")
        serve = lab_gh.Serve(config, root / "serve.log", 18471)
        fake = FakeGitHub(org="octo-org", repos=("octo-org/hello-world",), token=lab_gh.TOKEN,
                          webhook_url=serve.url, webhook_secret=lab_gh.SECRET,
                          sock=lab_gh.bind_in_world(lab_gh.API_PORT), long_poll=2.0)
        fake.start()
        worker = lab_gh.worker(config, root, cache)
        worker.start()
        serve.start()
        client = redis.Redis.from_url(redis_server.url)
        store, state = JobStore(client), GitHubState(client)
        latencies = []
        try:
            for _ in range(args.jobs):
                latencies.append(one_job(fake, store, state))
        finally:
            serve.stop()
            worker.stop()
            fake.stop()
        bare = bare_starts(cache, 5)
    redis_server.close()
    print(f"\nGitHub runners, {args.jobs} jobs, one worker, TCG, network egress")
    print(f"{'measure':<48}{'p50':>8}{'p95':>8}")
    print(f"{'webhook -> runner process started (guest)':<48}"
          f"{statistics.median(latencies):>7.2f}s{pct(latencies, 0.95):>7.2f}s")
    print(f"{'bare VM start (acquire -> agent healthy), floor':<48}"
          f"{statistics.median(bare):>7.2f}s{pct(bare, 0.95):>7.2f}s")
    print(f"{'ratio (p50)':<48}{statistics.median(latencies) / statistics.median(bare):>7.1f}x")


if __name__ == "__main__":
    main()
