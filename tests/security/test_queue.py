"""The queue does not lose or strand jobs: a poison entry anyone with Redis access pushes onto a
queue's list is skipped, and a job whose worker is killed (host lost) ends within its lease.
Real redis-server, real `kata-ci worker` processes (Celery), real VMs."""

from __future__ import annotations

import base64
import configparser
import json
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis

from kata_ci.runner.queue.app import queue_name
from kata_ci.runner.queue.store import JobStore
from tests.e2e.conftest import KATA_CI
from tests.e2e.test_daemon import Worker, submit, submit_detached, wait_state, wait_until
from tests.integration.redis_server import RedisServer

TTL = 3.0  # the test's lease: heartbeats every 1 s, ended within 4 s of the last one
UNIT = Path(__file__).parents[2] / "ansible" / "files" / "kata-ci-worker.service"
QUEUE = queue_name("default")


def _config(tmp_path: Path, redis_server: RedisServer, queue: str = "") -> Path:
    redis.Redis.from_url(redis_server.url).flushdb()
    path = tmp_path / "config.toml"
    path.write_text(f'[queue]\nbroker = "{redis_server.url}"\n{queue}[vm]\ngrace = 2\n')
    return path


@pytest.fixture
def start(request: pytest.FixtureRequest, run_root: Path) -> Iterator[Callable[[Path], Worker]]:
    made: list[Worker] = []

    def make(config: Path) -> Worker:
        worker = Worker(config, ["default"], run_root)
        made.append(worker)
        worker.start()
        return worker

    yield make
    for worker in made:
        worker.stop()
    if getattr(request.node, "rep_call", None) and request.node.rep_call.failed:
        for worker in made:
            print(f"\n=== {worker.log} ===\n{worker.log.read_text()[-4000:]}")


def celery_message(args: object, body: object = None, **headers: object) -> bytes:
    """A kombu/Celery envelope as a producer would LPUSH it; ``body`` overrides the body."""
    payload = [args, {}, {"callbacks": None, "errbacks": None, "chain": None, "chord": None}]
    raw = json.dumps(payload if body is None else body).encode()
    return json.dumps({
        "body": base64.b64encode(raw).decode(), "content-encoding": "utf-8",
        "content-type": "application/json",
        "headers": {"lang": "py", "task": "kata_ci.run_job", "id": "p1", "retries": 0,
                    "timelimit": [None, None], "root_id": "p1", "parent_id": None,
                    "eta": None, "expires": None, **headers},
        "properties": {"delivery_tag": f"poison-{time.time()}", "body_encoding": "base64",
                       "delivery_info": {"exchange": "", "routing_key": QUEUE},
                       "delivery_mode": 2, "priority": 0}}).encode()


POISON = [
    b"\x80not json at all",  # not JSON: stock kombu stops the worker, exit status 0
    b'"a JSON string"',  # JSON, not a message object
    b'{"foreign": "producer"}',  # an object without kombu's fields: a reconnect loop
    celery_message(["a"], body="not a 3-tuple"),  # fails inside Celery's task strategy
    celery_message(["a"], timelimit="x"),
    celery_message(["a"], task=["not", "a", "name"]),
    celery_message([{"not": "an id"}]),  # well-formed, bad arguments
    celery_message(["0123456789abcdef", "extra"]),
    celery_message(["0123456789abcdef"]),  # an unknown job
]


def test_poison_entries_on_the_queue_list_are_skipped_and_the_next_job_runs(
        start: Callable[[Path], Worker], redis_server: RedisServer, tmp_path: Path) -> None:
    """Non-JSON, foreign and malformed Celery entries LPUSHed on the queue's list: the worker
    logs and skips each, stays up, and runs the real job queued behind them."""
    config = _config(tmp_path, redis_server)
    worker = start(config)
    client = redis.Redis.from_url(redis_server.url)
    for entry in POISON:
        client.lpush(QUEUE, entry)
    wait_until(lambda: client.llen(QUEUE) == 0 or worker.proc is None
               or worker.proc.poll() is not None, 60, "the poison to be consumed")
    time.sleep(1)
    assert worker.proc is not None and worker.proc.poll() is None, "the worker stopped"
    result = submit(config, tmp_path, "--", "echo", "still-working")
    assert result.returncode == 0 and result.stdout == b"still-working\n", result.stderr
    log = worker.log.read_bytes()
    assert log.count(b"skipped queue entry") + log.count(b"skipped message") >= 6, log[-3000:]
    assert log.count(b"rejected malformed job message") == 2
    assert b"rejected message for unknown job 0123456789abcdef" in log
    assert b"Unrecoverable error" not in log and b"Connection to broker lost" not in log
    assert worker.leftovers() == []


def _processes(worker: Worker) -> list[str]:
    return [p for p in worker.leftovers() if p.startswith("process")]


def test_a_job_whose_worker_is_killed_ends_within_the_lease(
        start: Callable[[Path], Worker], redis_server: RedisServer, tmp_path: Path) -> None:
    """SIGKILL the worker running `sleep 100` (its host is gone): its VM dies with it, another
    live worker's reaper ends the job as system_failure within 4/3 x TTL, `logs -f` returns
    the job's status and note, `cancel` returns the final state at once."""
    config = _config(tmp_path, redis_server, f"lease_ttl = {TTL}\n")
    store = JobStore.connect(redis_server.url)
    doomed = start(config)
    job_id = submit_detached(config, tmp_path, "--", "sh", "-c", "echo ready; sleep 100")
    wait_until(lambda: any(d == b"ready\n" for _, d in store.read_log(job_id)), 300, "ready")
    survivor = start(config)
    assert doomed.proc is not None
    doomed.proc.send_signal(signal.SIGKILL)
    killed = time.monotonic()
    doomed.proc.wait()
    assert wait_state(store, job_id, TTL * 4 / 3 + 10) == "system_failure"
    assert time.monotonic() - killed < TTL * 4 / 3 + 8
    assert "stopped renewing its lease" in store.get(job_id).message
    assert f"job {job_id}: its worker stopped renewing its lease".encode() in \
        survivor.log.read_bytes()
    follow = subprocess.run([*KATA_CI, "logs", "-f", "--config", str(config), job_id],
                            capture_output=True, timeout=30)
    assert follow.returncode == 125 and follow.stdout == b"ready\n", follow.stderr
    assert b"stopped renewing its lease" in follow.stderr
    started = time.monotonic()
    cancel = subprocess.run([*KATA_CI, "cancel", "--config", str(config), job_id],
                            capture_output=True, timeout=30)
    assert cancel.returncode == 0 and cancel.stdout == f"{job_id}: system_failure\n".encode()
    assert time.monotonic() - started < 15
    wait_until(lambda: not _processes(doomed), 10, "the killed worker's VM to die")
    doomed.start()  # the host comes back: its next worker removes what the dead one left
    wait_until(lambda: not doomed.leftovers(), 30, "the dead worker's files to be removed")
    assert not list(Path(tempfile.gettempdir()).glob(f"kata-ci-{job_id}-*"))
    assert survivor.leftovers() == []


def test_logs_and_cancel_end_jobs_stranded_with_no_worker_left(
        start: Callable[[Path], Worker], redis_server: RedisServer, tmp_path: Path) -> None:
    """The only worker is SIGKILLed just after claiming two jobs: with nobody left to reap,
    `logs -f` of one ends it (system_failure) within the lease, and `cancel` of the other,
    once its lease has passed, ends it as cancelled at once."""
    config = _config(tmp_path, redis_server, f"lease_ttl = {TTL}\nconcurrency = 2\n")
    store = JobStore.connect(redis_server.url)
    worker = start(config)
    followed, cancelled = (submit_detached(config, tmp_path, "--", "sleep", "100")
                           for _ in range(2))
    wait_until(lambda: all(store.get(j).state == "running" for j in (followed, cancelled)),
               60, "both jobs to be claimed")
    assert worker.proc is not None
    worker.proc.send_signal(signal.SIGKILL)
    worker.proc.wait()
    started = time.monotonic()
    follow = subprocess.run([*KATA_CI, "logs", "-f", "--config", str(config), followed],
                            capture_output=True, timeout=TTL * 4 / 3 + 30)
    assert follow.returncode == 125, follow.stderr
    assert b"stopped renewing its lease" in follow.stderr
    assert time.monotonic() - started < TTL + 10
    assert store.get(followed).state == "system_failure"
    wait_until(lambda: (store.get(cancelled).lease_until or 0) < time.time() - 0.5, 30,
               "the second lease to pass")
    cancel = subprocess.run([*KATA_CI, "cancel", "--config", str(config), cancelled],
                            capture_output=True, timeout=30)
    assert cancel.returncode == 0 and cancel.stdout == f"{cancelled}: cancelled\n".encode()
    assert store.get(cancelled).state == "cancelled"
    wait_until(lambda: not _processes(worker), 10, "the killed worker's VMs to die")
    worker.start()
    wait_until(lambda: not worker.leftovers(), 30, "the dead worker's files to be removed")


def test_the_shipped_unit_restarts_the_worker_on_any_exit() -> None:
    """The systemd unit restarts the worker whatever its exit status, never gives up, and
    stops it with SIGTERM to the worker alone, within a bound that covers the cancel grace."""
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.optionxform = str  # type: ignore[assignment,method-assign]
    unit.read(UNIT)
    service = unit["Service"]
    assert service["Restart"] == "always"
    assert 1 <= int(service["RestartSec"].rstrip("s")) <= 30
    assert unit["Unit"]["StartLimitIntervalSec"] == "0"
    assert service["KillMode"] == "mixed"
    assert 30 <= int(service["TimeoutStopSec"].rstrip("s")) <= 600
    assert service["OOMPolicy"] == "continue"
    if shutil.which("systemd-analyze"):
        checked = Path(tempfile.mkdtemp()) / UNIT.name
        checked.write_text(UNIT.read_text().replace("/opt/kata-ci/.venv/bin/kata-ci", "/bin/true"))
        result = subprocess.run(["systemd-analyze", "verify", str(checked)],
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == 0 and "Unknown" not in result.stderr, result.stderr


def test_a_forged_job_record_cannot_mint_metric_labels() -> None:
    """A job record (anyone who can write to Redis can forge one) naming an invented label
    and source: the worker's metrics count it as `other`, never under the forged words, so
    no one can grow the metrics' cardinality or inject label text."""
    from prometheus_client import REGISTRY, generate_latest

    from kata_ci.runner.ops.metrics import JobMeter

    forged = 'x"} 1\nkata_ci_fake 1\n{'
    meter = JobMeter(forged, forged + "label", ["default"], 0.0, 1.0)
    meter.output(10)
    meter.finished("success")
    text = generate_latest(REGISTRY).decode()
    assert "kata_ci_fake" not in text and "x\\\"}" not in text
    assert 'kata_ci_jobs_started_total{label="other",source="other"}' in text
