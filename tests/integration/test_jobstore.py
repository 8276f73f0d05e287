"""Job state in a real Redis: at-most-once claims, fencing, bounded logs, cancel."""

from __future__ import annotations

import threading

import pytest
import redis

from kata_ci.errors import UserError
from kata_ci.runner.queue.store import TRUNCATED, JobStore
from tests.integration.redis_server import RedisServer


@pytest.fixture
def store(redis_server: RedisServer) -> JobStore:
    client = redis.Redis.from_url(redis_server.url)
    client.flushdb()
    return JobStore(client, log_limit=1000)


def test_a_job_is_claimed_once_however_often_delivered(store: JobStore) -> None:
    """Eight concurrent deliveries of one job: exactly one claim succeeds."""
    job = store.create(["true"], "default", 60, b"")
    tokens: list[str | None] = []
    barrier = threading.Barrier(8)

    def deliver(n: int) -> None:
        barrier.wait()
        tokens.append(store.claim(job.id, f"w{n}", "host", 1))

    threads = [threading.Thread(target=deliver, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len([t for t in tokens if t]) == 1
    assert store.get(job.id).state == "running" and store.get(job.id).attempt == 1


def test_redelivery_after_the_end_does_nothing(store: JobStore) -> None:
    """A message delivered again after the job finished cannot start it again."""
    job = store.create(["true"], "default", 60, b"")
    token = store.claim(job.id, "w1", "h", 1)
    assert token and store.finish(job.id, token, "success", 0, "")
    assert store.claim(job.id, "w2", "h", 1) is None
    assert store.get(job.id).state == "success"


def test_a_stale_token_cannot_finish_the_job(store: JobStore) -> None:
    """Fencing: a worker whose lease was taken over cannot overwrite the job's ending."""
    job = store.create(["true"], "default", 60, b"")
    token = store.claim(job.id, "w1", "h", 1)
    assert token
    assert not store.finish(job.id, "w0:7", "success", 0, "")
    assert store.get(job.id).state == "running"
    assert store.finish(job.id, token, "failed", 3, "exit 3")
    assert (store.get(job.id).state, store.get(job.id).exit_code) == ("failed", 3)


def test_log_is_bounded_with_one_truncation_marker(store: JobStore) -> None:
    """Past the per-job limit the log gets a single marker and nothing more."""
    job = store.create(["true"], "default", 60, b"")
    for _ in range(5):
        store.append_log(job.id, "stdout", b"x" * 300)
    data = b"".join(d for _, d in store.read_log(job.id))
    assert data == b"x" * 1000 + TRUNCATED


def test_log_keeps_streams_and_order(store: JobStore) -> None:
    """stdout and stderr chunks come back tagged and in the order they were written."""
    job = store.create(["true"], "default", 60, b"")
    store.append_log(job.id, "stdout", b"a")
    store.append_log(job.id, "stderr", b"b")
    store.append_log(job.id, "stdout", b"c")
    assert list(store.read_log(job.id)) == [("stdout", b"a"), ("stderr", b"b"), ("stdout", b"c")]


def test_follow_ends_when_the_job_ends(store: JobStore) -> None:
    """`logs -f` returns every chunk, including ones written just before the ending."""
    job = store.create(["true"], "default", 60, b"")
    token = store.claim(job.id, "w", "h", 1)
    assert token

    def work() -> None:
        store.append_log(job.id, "stdout", b"one\n")
        store.append_log(job.id, "stdout", b"two\n")
        store.finish(job.id, token, "success", 0, "")

    timer = threading.Timer(0.3, work)
    timer.start()
    chunks = [d for _, d in store.read_log(job.id, follow=True, block_ms=100)]
    timer.join()
    assert chunks == [b"one\n", b"two\n"]


def test_cancel_queued_and_running(store: JobStore) -> None:
    """A queued job is cancelled at once (and can no longer be claimed); a running one is
    flagged for its worker."""
    queued = store.create(["true"], "default", 60, b"ws")
    assert store.request_cancel(queued.id) == "cancelled"
    assert store.claim(queued.id, "w", "h", 1) is None and store.workspace(queued.id) is None
    running = store.create(["true"], "default", 60, b"")
    assert store.claim(running.id, "w", "h", 1)
    assert not store.cancel_requested(running.id)
    assert store.request_cancel(running.id) == "cancelling"
    assert store.cancel_requested(running.id)


def test_unreachable_broker_is_a_clear_error() -> None:
    """Connecting to a port where nothing listens names the URL in a UserError."""
    from tests.integration.redis_server import free_port

    url = f"redis://127.0.0.1:{free_port()}/0"
    with pytest.raises(UserError, match=f"cannot reach the broker at {url}"):
        JobStore.connect(url)


def test_state_survives_a_redis_restart(redis_server: RedisServer, store: JobStore) -> None:
    """With AOF (as shipped), a job's state and log are there after Redis restarts."""
    job = store.create(["true"], "default", 60, b"")
    token = store.claim(job.id, "w", "h", 1)
    assert token
    store.append_log(job.id, "stdout", b"before restart\n")
    redis_server.stop()
    redis_server.start()
    assert store.get(job.id).state == "running"
    assert list(store.read_log(job.id)) == [("stdout", b"before restart\n")]


def test_writes_ride_out_a_redis_restart(redis_server: RedisServer) -> None:
    """A log write made while Redis is down waits for it to return instead of failing."""
    store = JobStore.connect(redis_server.url, outage_seconds=30)
    job = store.create(["true"], "default", 60, b"")
    redis_server.stop()
    restart = threading.Timer(1.5, redis_server.start)
    restart.start()
    store.append_log(job.id, "stdout", b"written during the outage\n")
    restart.join()
    assert list(store.read_log(job.id)) == [("stdout", b"written during the outage\n")]


def test_requeue_once_only_when_allowed(store: JobStore) -> None:
    """A dead worker's job goes back to the queue once if it allows a retry, never twice,
    and never when it does not allow it."""
    plain = store.create(["true"], "default", 60, b"")
    token = store.claim(plain.id, "w1", "h", 1)
    assert token and not store.requeue_once(plain.id, token, "why")
    retry = store.create(["true"], "default", 60, b"", retry=True)
    first = store.claim(retry.id, "w1", "h", 1)
    assert first and store.requeue_once(retry.id, first, "why")
    assert store.get(retry.id).state == "queued"
    second = store.claim(retry.id, "w2", "h", 1)
    assert second and store.get(retry.id).attempt == 2
    assert not store.requeue_once(retry.id, second, "why")
