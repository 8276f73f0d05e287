"""What an operator sees of a real worker: its Prometheus metrics after real jobs in real VMs
(parsed with prometheus-client's own parser), its JSON-lines operator log, and the jobs'
milestones in the store."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families

from kata_ci.runner.queue.store import JobStore
from tests.e2e.test_daemon import Worker, submit_detached, wait_state, wait_until
from tests.integration.redis_server import RedisServer, free_port

pytestmark = pytest.mark.vm
# The job prints it; its command line does not hold it (argv is not output: it is logged).
MARKER, PRINTS_MARKER = "operator-log-42", "echo operator-log-$((6 * 7))"


class JsonWorker(Worker):
    """The operator log is stderr; stdout (Celery's notices on signals) is kept apart."""

    def start(self) -> None:
        with self.log.open("ab") as log, self.log.with_suffix(".out").open("ab") as out:
            self.proc = subprocess.Popen(self.args, env=self.env, stdout=out, stderr=log)
        wait_until(lambda: b" ready." in self.log.read_bytes(), 60, "worker ready")


@pytest.fixture
def metered(request: pytest.FixtureRequest, redis_server: RedisServer, run_root: Path,
            tmp_path: Path) -> Iterator[tuple[Worker, str, Path]]:
    """A worker with metrics on a free loopback port and JSON operator logs."""
    redis.Redis.from_url(redis_server.url).flushdb()
    config = tmp_path / "config.toml"
    config.write_text(f'[queue]\nbroker = "{redis_server.url}"\n'
                      '[vm]\ngrace = 2\nnetwork = "none"\n')
    url = f"http://127.0.0.1:{free_port()}/metrics"
    worker = JsonWorker(config, ["default"], run_root)
    worker.args += ["--metrics-listen", url.split("/")[2], "--log-format", "json"]
    try:
        worker.start()
        yield worker, url, config
    finally:
        worker.stop()
        if getattr(request.node, "rep_call", None) and request.node.rep_call.failed:
            print(f"\n=== {worker.log} ===\n{worker.log.read_text()[-4000:]}",
                  file=sys.stderr)


def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of /metrics by (name, sorted labels)."""
    text = httpx.get(url, timeout=10).text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str,
          **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def total(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str,
          **labels: str) -> float:
    """Sum over the samples of ``name`` whose labels include ``labels``."""
    return sum(v for (n, lbls), v in samples.items()
               if n == name and set(labels.items()) <= set(lbls))


def test_metrics_count_jobs_by_outcome_with_histograms(
        metered: tuple[Worker, str, Path], redis_server: RedisServer, tmp_path: Path) -> None:
    """After a success, a failure and a timeout, /metrics has each outcome once, three
    claims in the queue-wait and duration histograms, three VM starts, no VM left running,
    the output bytes counted and Redis up (then down once it stops)."""
    _, url, config = metered
    store = JobStore.connect(redis_server.url)
    before = scrape(url)
    assert value(before, "kata_ci_vms_running") == 0
    assert value(before, "kata_ci_redis_up") == 1
    ok = submit_detached(config, tmp_path, "--", "sh", "-c", "echo 0123456789")
    failed = submit_detached(config, tmp_path, "--", "sh", "-c", "exit 3")
    slow = submit_detached(config, tmp_path, "--timeout", "3", "--", "sleep", "60")
    assert [wait_state(store, j) for j in (ok, failed, slow)] == ["success", "failed",
                                                                 "timeout"]
    wait_until(lambda: total(scrape(url), "kata_ci_jobs_finished_total") == 3, 30,
               "three endings counted")
    after = scrape(url)
    base = {"source": "queue", "label": "default"}
    assert value(after, "kata_ci_jobs_started_total", **base) == 3
    for outcome in ("success", "failed", "timeout"):
        assert value(after, "kata_ci_jobs_finished_total", **base, outcome=outcome) == 1
        assert value(after, "kata_ci_job_duration_seconds_count", **base, outcome=outcome) == 1
    assert value(after, "kata_ci_job_duration_seconds_sum", **base, outcome="timeout") >= 3
    assert value(after, "kata_ci_job_queue_wait_seconds_count", **base) == 3
    assert total(after, "kata_ci_vm_start_seconds_count") == 3
    assert total(after, "kata_ci_vm_start_seconds_bucket", le="+Inf") == 3
    assert value(after, "kata_ci_vms_running") == 0
    assert value(after, "kata_ci_job_log_bytes_total", **base) >= len("0123456789\n")
    assert not [k for k in after if any(v in (ok, failed, slow) for _, v in k[1])], \
        "a job id became a label value"
    redis_server.stop()
    try:
        assert value(scrape(url), "kata_ci_redis_up") == 0
    finally:
        redis_server.start()


def test_json_operator_log_names_the_job_and_never_holds_its_output(
        metered: tuple[Worker, str, Path], redis_server: RedisServer, tmp_path: Path) -> None:
    """With --log-format json every operator log line is a JSON object; the lines about a
    job carry its id, source and label; the job's own output never reaches that log; and the
    job's milestones (VM ready, first output) are recorded in order."""
    worker, _, config = metered
    store = JobStore.connect(redis_server.url)
    job_id = submit_detached(config, tmp_path, "--", "sh", "-c",
                             f"{PRINTS_MARKER}; {PRINTS_MARKER} >&2")
    assert wait_state(store, job_id) == "success"
    worker.stop()
    text = worker.log.read_text()
    assert MARKER not in text
    assert MARKER in "".join(data.decode() for _, data in store.read_log(job_id))
    lines = [json.loads(line) for line in text.splitlines() if line.strip()]
    assert all(isinstance(line, dict) and {"time", "level", "logger", "message"} <= set(line)
               for line in lines)
    about = [line for line in lines if job_id in line["message"]]
    assert len(about) >= 2, about  # "running" and its ending
    assert all(line.get("job_id") == job_id and line.get("source") == "queue"
               and line.get("label") == "default" for line in about), about
    job = store.get(job_id)
    assert job.vm_ready_at and job.first_output_at and job.started_at and job.finished_at
    assert job.created_at <= job.started_at <= job.vm_ready_at <= job.first_output_at \
        <= job.finished_at
    assert job.vm_start in ("restore", "cold")
