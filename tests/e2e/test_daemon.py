"""The daemon end to end: real redis-server, real `kata-ci worker` processes (Celery), real VMs.

Each worker gets its own run dir, so "nothing left behind" and "orphan VM reaped" are checked
per worker. A failed test prints the worker logs.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis
from kombu.connection import Connection

from kata_ci.runner.core.outcome import FINAL
from kata_ci.runner.queue.app import TASK, make_app, queue_name
from kata_ci.runner.queue.store import JobStore
from tests.e2e.conftest import KATA_CI, leftovers, stop_process
from tests.integration.redis_server import RedisServer, free_port


class Worker:
    def __init__(self, config: Path, labels: list[str], root: Path) -> None:
        self.run_dir = Path(tempfile.mkdtemp(prefix="w-", dir=root))
        self.log = self.run_dir.with_suffix(".log")
        self.env = {**os.environ, "KATA_CI_RUN_DIR": str(self.run_dir)}
        self.args = [*KATA_CI, "worker", "--config", str(config),
                     *[a for label in labels for a in ("--label", label)]]
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        # The log is appended to across restarts: only this start's own " ready." counts.
        seen = self.log.read_bytes().count(b" ready.") if self.log.exists() else 0
        with self.log.open("ab") as sink:
            self.proc = subprocess.Popen(self.args, env=self.env, stdout=sink, stderr=sink)
        wait_until(lambda: self.log.read_bytes().count(b" ready.") > seen, 60, "worker ready")

    def stop(self) -> None:
        stop_process(self.proc, 30)

    def leftovers(self) -> list[str]:
        """Files in this worker's run dir and live processes naming it (zombies do not)."""
        return leftovers(self.env)


def wait_until(check: Callable[[], bool], seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


@pytest.fixture
def config(redis_server: RedisServer, tmp_path: Path) -> Path:
    redis.Redis.from_url(redis_server.url).flushdb()
    path = tmp_path / "config.toml"
    path.write_text(f'[queue]\nbroker = "{redis_server.url}"\n[vm]\ngrace = 2\n')
    return path


@pytest.fixture
def workers(request: pytest.FixtureRequest, config: Path,
            run_root: Path) -> Iterator[Callable[..., Worker]]:
    made: list[Worker] = []

    def make(*labels: str) -> Worker:
        worker = Worker(config, list(labels) or ["default"], run_root)
        made.append(worker)
        worker.start()
        return worker

    yield make
    for worker in made:
        worker.stop()
    if getattr(request.node, "rep_call", None) and request.node.rep_call.failed:
        for worker in made:
            print(f"\n=== {worker.log} ===\n{worker.log.read_text()[-4000:]}", file=sys.stderr)


@pytest.fixture
def store(redis_server: RedisServer) -> JobStore:
    return JobStore.connect(redis_server.url)


def submit(config: Path, cwd: Path, *args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([*KATA_CI, "submit", "--config", str(config), *args], cwd=cwd,
                          capture_output=True, timeout=300)


def submit_detached(config: Path, cwd: Path, *args: str) -> str:
    result = submit(config, cwd, "--detach", *args)
    assert result.returncode == 0, result.stderr
    return result.stdout.decode().strip()


def wait_state(store: JobStore, job_id: str, seconds: float = 300) -> str:
    wait_until(lambda: store.get(job_id).state in FINAL, seconds, f"job {job_id} to end")
    return store.get(job_id).state


def test_submit_runs_in_a_vm_and_exits_with_the_job_status(
        workers: Callable[..., Worker], config: Path, tmp_path: Path) -> None:
    """submit -> queue -> worker -> VM: the shipped workspace is there, output streams back,
    stdout/stderr stay apart, and submit exits with the job's status."""
    worker = workers()
    (tmp_path / "data.txt").write_text("shipped\n")
    result = submit(config, tmp_path, "--", "sh", "-c", "cat data.txt; echo e >&2; exit 7")
    assert result.returncode == 7, result.stderr
    assert result.stdout == b"shipped\n"
    assert b"e\n" in result.stderr
    assert worker.leftovers() == []


def test_a_message_delivered_twice_starts_one_vm(
        workers: Callable[..., Worker], config: Path, redis_server: RedisServer,
        store: JobStore, tmp_path: Path) -> None:
    """The same job message sent twice: one VM runs it, the second delivery is ignored."""
    worker = workers()
    job_id = submit_detached(config, tmp_path, "--", "sh", "-c", "sleep 1; echo once")
    make_app(redis_server.url, 3600).send_task(TASK, args=[job_id], queue=queue_name("default"))
    assert wait_state(store, job_id) == "success"
    wait_until(lambda: b"duplicate delivery ignored" in worker.log.read_bytes(), 60,
               "the second delivery")
    assert store.get(job_id).attempt == 1
    assert worker.log.read_bytes().count(f"job {job_id}: running".encode()) == 1
    assert [d for _, d in store.read_log(job_id)] == [b"once\n"]


def test_labels_route_jobs_to_the_workers_that_serve_them(
        workers: Callable[..., Worker], config: Path, store: JobStore, tmp_path: Path) -> None:
    """A job for label `big` reaches only the worker serving `big`, and `small` likewise."""
    small, big = workers("small"), workers("big")
    ids = {label: submit_detached(config, tmp_path, "--label", label, "--", "true")
           for label in ("big", "small")}
    for label, job_id in ids.items():
        assert wait_state(store, job_id) == "success"
        served_by = small if label == "small" else big
        assert f"job {job_id}: running".encode() in served_by.log.read_bytes()
    assert f"job {ids['big']}".encode() not in small.log.read_bytes()
    assert f"job {ids['small']}".encode() not in big.log.read_bytes()


def test_cancel_stops_a_running_job_within_seconds(
        workers: Callable[..., Worker], config: Path, store: JobStore, tmp_path: Path) -> None:
    """`kata-ci cancel` on a `sleep 600` job: SIGTERM reaches it, cancelled, nothing left."""
    worker = workers()
    script = "trap 'echo got-term; exit 143' TERM; echo ready; sleep 600 & wait"
    job_id = submit_detached(config, tmp_path, "--", "sh", "-c", script)
    wait_until(lambda: any(d == b"ready\n" for _, d in store.read_log(job_id)), 300, "ready")
    started = time.monotonic()
    cancel = subprocess.run([*KATA_CI, "cancel", "--config", str(config), job_id],
                            capture_output=True, timeout=60)
    assert cancel.returncode == 0 and b"cancelling" in cancel.stdout
    assert wait_state(store, job_id, 30) == "cancelled"
    assert time.monotonic() - started < 15
    assert b"got-term\n" in b"".join(d for _, d in store.read_log(job_id))
    assert worker.leftovers() == []


def test_a_killed_worker_leaves_no_vm_and_its_job_ends_as_system_failure(
        workers: Callable[..., Worker], config: Path, store: JobStore, tmp_path: Path) -> None:
    """SIGKILL the worker mid-job, start it again: the orphan VM is gone, the job is
    system_failure (not `running` forever)."""
    worker = workers()
    job_id = submit_detached(config, tmp_path, "--", "sh", "-c", "echo ready; sleep 600")
    wait_until(lambda: any(d == b"ready\n" for _, d in store.read_log(job_id)), 300, "ready")
    assert len(list(worker.run_dir.glob("*/vm.json"))) == 1
    assert worker.proc is not None
    worker.proc.send_signal(signal.SIGKILL)
    worker.proc.wait()
    worker.start()
    assert wait_state(store, job_id, 30) == "system_failure"
    assert worker.leftovers() == []  # no VM directory, no QEMU or virtiofsd still running


def test_stopping_the_worker_cancels_its_job_with_grace(
        workers: Callable[..., Worker], config: Path, store: JobStore, tmp_path: Path) -> None:
    """SIGTERM to the worker (systemctl stop): its running job gets SIGTERM and the grace
    period, ends as system_failure (no --retry), and the worker exits well within the
    unit's TimeoutStopSec."""
    worker = workers()
    script = "trap 'echo got-term; exit 143' TERM; echo ready; sleep 600 & wait"
    job_id = submit_detached(config, tmp_path, "--", "sh", "-c", script)
    wait_until(lambda: any(d == b"ready\n" for _, d in store.read_log(job_id)), 300, "ready")
    assert worker.proc is not None
    started = time.monotonic()
    worker.proc.terminate()
    assert worker.proc.wait(60) == 0
    assert time.monotonic() - started < 30
    job = store.get(job_id)
    assert (job.state, job.message) == ("system_failure", "the worker running it was stopped")
    assert b"got-term\n" in b"".join(d for _, d in store.read_log(job_id))
    assert worker.leftovers() == []


def test_redis_restart_mid_job(workers: Callable[..., Worker], config: Path,
                               redis_server: RedisServer, store: JobStore, tmp_path: Path) -> None:
    """Redis restarts while a job runs: the job completes with its whole log, and the worker
    takes the next job."""
    workers()
    job_id = submit_detached(config, tmp_path, "--", "sh", "-c", "echo before; sleep 6; echo after")
    wait_until(lambda: any(d == b"before\n" for _, d in store.read_log(job_id)), 300, "before")
    redis_server.stop()
    time.sleep(1)
    redis_server.start()
    assert wait_state(store, job_id) == "success"
    assert [d for _, d in store.read_log(job_id)] == [b"before\n", b"after\n"]
    result = submit(config, tmp_path, "--", "echo", "next")
    assert result.returncode == 0 and result.stdout == b"next\n", result.stderr


def test_malformed_messages_are_rejected_and_the_worker_goes_on(
        workers: Callable[..., Worker], config: Path, redis_server: RedisServer,
        store: JobStore, tmp_path: Path) -> None:
    """A non-JSON body, a wrong argument and an unknown job are logged and dropped; the next
    real job still runs."""
    worker = workers()
    app = make_app(redis_server.url, 3600)
    app.send_task(TASK, args=[{"not": "an id"}], queue=queue_name("default"))
    app.send_task(TASK, args=["0123456789abcdef"], queue=queue_name("default"))
    with Connection(redis_server.url) as conn:  # type: ignore[no-untyped-call]
        conn.SimpleQueue(queue_name("default")).put(
            b"\x80not json", content_type="application/x-python-serialize",
            content_encoding="binary")
    result = submit(config, tmp_path, "--", "echo", "still-working")
    assert result.returncode == 0 and result.stdout == b"still-working\n", result.stderr
    log = worker.log.read_bytes()
    assert b"rejected malformed job message" in log
    assert b"rejected message for unknown job 0123456789abcdef" in log


def test_unreachable_broker_is_a_clear_error_at_start(tmp_path: Path) -> None:
    """worker and submit against a broker nobody listens on: exit 2, naming the URL."""
    url = f"redis://127.0.0.1:{free_port()}/0"
    config = tmp_path / "config.toml"
    config.write_text(f'[queue]\nbroker = "{url}"\n')
    for args in (["worker"], ["submit", "--", "true"], ["jobs"]):
        result = subprocess.run([*KATA_CI, *args, "--config", str(config)] if args[0] != "submit"
                                else [*KATA_CI, "submit", "--config", str(config), "--", "true"],
                                capture_output=True, timeout=60, cwd=tmp_path)
        assert result.returncode == 2, (args, result.stderr)
        assert f"cannot reach the broker at {url}".encode() in result.stderr


def test_a_job_allowing_retry_runs_again_after_its_worker_died(
        workers: Callable[..., Worker], config: Path, store: JobStore, tmp_path: Path) -> None:
    """submit --retry: SIGKILL the worker mid-job, restart it: the job runs a second time and
    succeeds; its first workspace directory is gone."""
    worker = workers()
    script = "echo run; sleep 4; echo done"
    job_id = submit_detached(config, tmp_path, "--retry", "--", "sh", "-c", script)
    wait_until(lambda: any(d == b"run\n" for _, d in store.read_log(job_id)), 300, "first run")
    assert worker.proc is not None
    worker.proc.send_signal(signal.SIGKILL)
    worker.proc.wait()
    worker.start()
    assert wait_state(store, job_id) == "success"
    assert store.get(job_id).attempt == 2
    assert b"its one retry" in b"".join(d for _, d in store.read_log(job_id))
    assert not list(Path(tempfile.gettempdir()).glob(f"kata-ci-{job_id}-*"))
    assert worker.leftovers() == []


def test_worker_term_does_not_leak_and_submit_passes_env(
        workers: Callable[..., Worker], config: Path, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A queued job sees what its submitter gave (`submit -e`), not the worker's TERM."""
    monkeypatch.setenv("TERM", "worker-term")
    workers()
    env = {k: v for k, v in os.environ.items() if k != "TERM"}
    result = subprocess.run([*KATA_CI, "submit", "--config", str(config), "-e", "FOO=bar",
                             "--", "sh", "-c", 'echo "FOO=$FOO TERM=${TERM-unset}"'],
                            cwd=tmp_path, env=env, capture_output=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout == b"FOO=bar TERM=unset\n"
