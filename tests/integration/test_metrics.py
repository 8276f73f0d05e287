"""The /metrics of real `kata-ci gitlab run` and `kata-ci github serve` processes, against the
contract FAKE of GitLab and signed webhook deliveries (real Redis, no VMs), parsed with
prometheus-client's parser. The worker's metrics are in tests/e2e/test_operations.py."""

from __future__ import annotations

import hashlib
import hmac
import http.client
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families

from kata_ci.runner.cli.daemon_options import parse_listen
from kata_ci.runner.ops.logs import JsonFormatter
from kata_ci.runner.queue import capacity
from kata_ci.runner.queue.app import queue_name
from tests.e2e.conftest import KATA_CI, stop_process
from tests.e2e.test_daemon import wait_until
from tests.fakes.git_http import make_repo
from tests.fakes.gitlab import FakeGitLab
from tests.integration.github_endpoint import payload
from tests.integration.redis_server import RedisServer, free_port

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]
SECRET = "metrics-webhook-secret-0123456789"


def scrape(url: str) -> Samples:
    text = httpx.get(url, timeout=10).text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


class Process:
    """A long-running kata-ci command with metrics on a free port; its log kept apart."""

    def __init__(self, args: list[str], log: Path) -> None:
        self.metrics = f"http://127.0.0.1:{free_port()}/metrics"
        self.log = log
        with log.open("ab") as sink:
            self.proc = subprocess.Popen([*KATA_CI, *args, "--metrics-listen",
                                          self.metrics.split("/")[2], "--log-format", "json"],
                                         stdout=sink, stderr=sink)

    def ready(self) -> bool:
        try:
            return httpx.get(self.metrics, timeout=2).status_code == 200
        except httpx.HTTPError:
            assert self.proc.poll() is None, self.log.read_text()
            return False

    def stop(self) -> None:
        stop_process(self.proc, 20)


@pytest.fixture
def processes(request: pytest.FixtureRequest) -> Iterator[list[Process]]:
    made: list[Process] = []
    yield made
    for proc in made:
        proc.stop()
    if getattr(request.node, "rep_call", None) and request.node.rep_call.failed:
        for proc in made:
            print(f"\n=== {proc.log} ===\n{proc.log.read_text()[-3000:]}", file=sys.stderr)


def test_gitlab_run_counts_requests_by_endpoint_and_status(
        redis_server: RedisServer, tmp_path: Path, processes: list[Process]) -> None:
    """`gitlab run` asks GitLab for jobs (204 while none), takes one (201), commits it (PUT
    200) and queues it: each request counted by endpoint and status, the job by label, and
    no job id or path among the label values."""
    redis.Redis.from_url(redis_server.url).flushdb()
    with FakeGitLab(make_repo(tmp_path, {"a.txt": "x\n"}), long_poll=0.3) as fake:
        config = tmp_path / "config.toml"
        config.write_text(f'[queue]\nbroker = "{redis_server.url}"\n'
                          f'[[gitlab.runners]]\nurl = "{fake.url}"\n'
                          f'token = "{fake.runner_token}"\nsystem_id = "s_0123456789ab"\n'
                          'id = 1\nlabel = "default"\n')
        client = redis.Redis.from_url(redis_server.url)
        capacity.announce(client, "w1", ["default"], 1, 0, 300)
        proc = Process(["gitlab", "run", "--config", str(config), "--check-interval", "0.1"],
                       tmp_path / "gitlab.log")
        processes.append(proc)
        wait_until(proc.ready, 60, "gitlab run's metrics")
        wait_until(lambda: value(scrape(proc.metrics), "kata_ci_gitlab_requests_total",
                                 endpoint="request_job", status="204") >= 1, 30, "a 204")
        job = fake.add_job(["echo hi"])
        wait_until(lambda: client.llen(queue_name("default")) == 1, 30, "the job queued")
        samples = scrape(proc.metrics)
    assert value(samples, "kata_ci_gitlab_requests_total", endpoint="request_job",
                 status="201") == 1
    assert value(samples, "kata_ci_gitlab_requests_total", endpoint="update_job",
                 status="200") >= 1
    assert value(samples, "kata_ci_gitlab_jobs_taken_total", label="default") == 1
    assert value(samples, "kata_ci_redis_up") == 1
    assert not [k for k in samples if any(str(job.id) in v for _, v in k[1])]


def _post(port: int, body: bytes, guid: str, secret: str = SECRET,
          event: str = "workflow_job") -> int:
    signature = "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=15)
    try:
        conn.request("POST", "/webhook", body=body, headers={
            "X-GitHub-Event": event, "X-GitHub-Delivery": guid,
            "X-Hub-Signature-256": signature, "Content-Type": "application/json"})
        return conn.getresponse().status
    finally:
        conn.close()


def test_github_serve_counts_webhook_deliveries_by_verdict(
        redis_server: RedisServer, tmp_path: Path, processes: list[Process]) -> None:
    """Deliveries to `github serve`: accepted, a redelivery (duplicate), a bad signature,
    labels nobody serves, a ping; each verdict counted once."""
    redis.Redis.from_url(redis_server.url).flushdb()
    (tmp_path / "secret").write_text(SECRET)
    os.chmod(tmp_path / "secret", 0o600)
    config = tmp_path / "config.toml"
    config.write_text(f'[queue]\nbroker = "{redis_server.url}"\n'
                      f'[github]\norg = "octo-org"\n'
                      f'webhook_secret_file = "{tmp_path / "secret"}"\n'
                      '[[github.label_sets]]\nlabels = ["self-hosted", "kata-ci"]\n'
                      'label = "default"\n')
    port = free_port()
    proc = Process(["github", "serve", "--no-reconcile", "--config", str(config), "--listen",
                    f"127.0.0.1:{port}"], tmp_path / "github.log")
    processes.append(proc)
    wait_until(proc.ready, 60, "github serve's metrics")
    wait_until(lambda: b"serving GitHub webhooks" in proc.log.read_bytes(), 30, "serving")
    guid = str(uuid.uuid4())
    assert _post(port, payload(), guid) == 201
    assert _post(port, payload(), guid) == 200
    assert _post(port, payload(job_id=2), str(uuid.uuid4()), secret="wrong") == 401
    assert _post(port, payload(job_id=3, labels=("ubuntu-latest",)), str(uuid.uuid4())) == 202
    assert _post(port, b"{}", str(uuid.uuid4()), event="ping") == 200
    samples = scrape(proc.metrics)
    for verdict in ("accepted", "duplicate", "bad_signature", "ignored_label", "ping"):
        assert value(samples, "kata_ci_github_webhook_deliveries_total",
                     verdict=verdict) == 1, verdict


def test_a_bad_metrics_address_is_refused_before_anything_starts(tmp_path: Path) -> None:
    """`worker --metrics-listen nonsense` exits 2 with one line naming the option, and
    never reaches the broker or the VMs."""
    config = tmp_path / "config.toml"
    config.write_text('[queue]\nbroker = "redis://127.0.0.1:1/0"\n')
    done = subprocess.run([*KATA_CI, "worker", "--config", str(config), "--metrics-listen",
                           "nonsense"], capture_output=True, timeout=60)
    assert done.returncode == 2
    assert b"--metrics-listen wants HOST:PORT" in done.stderr
    assert b"Traceback" not in done.stderr
    with pytest.raises(Exception, match="HOST:PORT"):
        parse_listen("127.0.0.1:99999", "--metrics-listen")


def test_json_lines_keep_a_traceback_in_one_line() -> None:
    """A record with an exception is still one JSON line, its traceback in exc_info."""
    import json
    import logging

    try:
        raise ValueError("boom")
    except ValueError:
        record = logging.LogRecord("kata_ci.x", logging.ERROR, __file__, 1, "failed %s",
                                   ("here",), sys.exc_info())
    record.job_id, record.source, record.label = "0123456789abcdef", "queue", "default"
    line = JsonFormatter().format(record)
    assert "\n" not in line
    parsed = json.loads(line)
    assert parsed["message"] == "failed here" and "ValueError: boom" in parsed["exc_info"]
    assert parsed["job_id"] == "0123456789abcdef" and parsed["level"] == "error"
