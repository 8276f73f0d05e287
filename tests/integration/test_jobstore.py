"""Job state in a real Redis: at-most-once claims, fencing, leases, bounded logs, cancel."""

from __future__ import annotations

import threading
import time

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


def test_end_with_token_requeues_once_only_when_allowed(store: JobStore) -> None:
    """A dead worker's job (its token known) goes back to the queue once if it allows a
    retry, never twice, and never when it does not allow it (system_failure then)."""
    sent: list[tuple[str, str]] = []
    store.requeue = lambda job_id, label: sent.append((job_id, label))
    plain = store.create(["true"], "default", 60, b"")
    token = store.claim(plain.id, "w1", "h", 1)
    assert token and store.end_stranded(plain.id, "died", token) == "system_failure"
    retry = store.create(["true"], "big", 60, b"", retry=True)
    first = store.claim(retry.id, "w1", "h", 1)
    assert first and store.end_stranded(retry.id, "died", first) == "queued"
    assert store.get(retry.id).state == "queued" and sent == [(retry.id, "big")]
    second = store.claim(retry.id, "w2", "h", 1)
    assert second and store.get(retry.id).attempt == 2
    assert store.end_stranded(retry.id, "died", second) == "system_failure"
    assert len(sent) == 1


def test_the_lease_holder_alone_renews_it(store: JobStore) -> None:
    """Renewal moves lease_until forward for the token that holds the lease, and for no
    other token."""
    job = store.create(["true"], "default", 60, b"")
    token = store.claim(job.id, "w1", "h", 1, ttl=5)
    assert token
    before = store.get(job.id).lease_until
    assert before is not None
    time.sleep(0.05)
    assert store.renew(job.id, token, 5)
    after = store.get(job.id).lease_until
    assert after is not None and after > before
    assert not store.renew(job.id, "w0:1", 5)
    assert store.get(job.id).lease_until == after


def test_renewed_lease_keeps_the_job(store: JobStore) -> None:
    """A job whose worker renews every ttl/3 is never reaped, however long it runs."""
    job = store.create(["true"], "default", 60, b"")
    token = store.claim(job.id, "w1", "h", 1, ttl=0.6)
    assert token
    for _ in range(10):
        time.sleep(0.2)
        assert store.renew(job.id, token, 0.6)
        assert store.reap_expired() == []
    assert store.get(job.id).state == "running"


def test_expired_lease_ends_the_job_and_fences_its_worker(store: JobStore) -> None:
    """A lease not renewed within its TTL: the job ends as system_failure with a note in its
    log, and the worker that held it can no longer renew, write output or finish."""
    job = store.create(["true"], "default", 60, b"ws")
    token = store.claim(job.id, "w1", "h", 1, ttl=0.5)
    assert token and store.append_log(job.id, "stdout", b"working\n", token)
    assert store.reap_expired() == []
    time.sleep(0.7)
    assert store.reap_expired() == [(job.id, "system_failure")]
    assert store.reap_expired() == []  # once
    ended = store.get(job.id)
    assert ended.state == "system_failure" and "stopped renewing its lease" in ended.message
    assert store.workspace(job.id) is None
    assert not store.renew(job.id, token, 5)
    assert not store.append_log(job.id, "stdout", b"late output\n", token)
    assert not store.finish(job.id, token, "success", 0, "")
    assert store.get(job.id).state == "system_failure"
    log = b"".join(d for _, d in store.read_log(job.id))
    assert log.startswith(b"working\n") and b"stopped renewing its lease" in log
    assert b"late output" not in log


def test_expired_job_allowing_retry_runs_once_more(store: JobStore) -> None:
    """With --retry, the first expiry queues the job again (its message re-sent, the old
    token fenced out); the second ends it."""
    sent: list[tuple[str, str]] = []
    store.requeue = lambda job_id, label: sent.append((job_id, label))
    job = store.create(["true"], "default", 60, b"ws", retry=True)
    first = store.claim(job.id, "w1", "h", 1, ttl=0.3)
    assert first
    time.sleep(0.5)
    assert store.reap_expired() == [(job.id, "queued")] and sent == [(job.id, "default")]
    assert store.workspace(job.id) == b"ws"  # the retry needs it
    assert store.get(job.id).lease_until is None
    second = store.claim(job.id, "w2", "h", 1, ttl=0.3)
    assert second and second != first
    assert not store.finish(job.id, first, "success", 0, "")
    assert not store.append_log(job.id, "stdout", b"stale", first)
    time.sleep(0.5)
    assert store.reap_expired() == [(job.id, "system_failure")] and len(sent) == 1


def test_a_store_that_cannot_requeue_leaves_retry_jobs_alone(store: JobStore) -> None:
    """Without a way to send the message again, an expired job allowing a retry is left
    running for a store that can (never queued without a message)."""
    job = store.create(["true"], "default", 60, b"", retry=True)
    assert store.claim(job.id, "w1", "h", 1, ttl=0.2)
    time.sleep(0.4)
    assert store.reap_expired() == [] and store.get(job.id).state == "running"


def test_a_queued_job_has_no_lease_to_expire(store: JobStore) -> None:
    """A job no worker has picked up stays queued past any TTL, and can still be claimed."""
    job = store.create(["true"], "default", 60, b"")
    assert store.get(job.id).lease_until is None
    assert store.claim("0000000000000000", "w", "h", 1, ttl=0.2) is None  # no such job
    time.sleep(0.4)
    assert store.reap_expired() == [] and store.end_stranded(job.id) == ""
    assert store.get(job.id).state == "queued"
    assert store.claim(job.id, "w1", "h", 1)


def test_follow_ends_when_the_lease_expires(store: JobStore) -> None:
    """`logs -f` of a job whose worker vanished ends it itself (no worker alive to reap)
    and returns with the note."""
    job = store.create(["true"], "default", 60, b"")
    token = store.claim(job.id, "w1", "h", 1, ttl=0.5)
    assert token and store.append_log(job.id, "stdout", b"before\n", token)
    started = time.monotonic()
    chunks = [d for _, d in store.read_log(job.id, follow=True, block_ms=100)]
    assert time.monotonic() - started < 3
    assert chunks[0] == b"before\n" and b"stopped renewing its lease" in chunks[-1]
    assert store.get(job.id).state == "system_failure"


def test_cancel_of_a_stranded_job_returns_its_end(store: JobStore) -> None:
    """`cancel` of a running job whose lease passed ends it as cancelled at once (no
    retry); with a live lease it only flags the job for its worker."""
    live = store.create(["true"], "default", 60, b"")
    assert store.claim(live.id, "w1", "h", 1, ttl=30)
    assert store.request_cancel(live.id) == "cancelling"
    stranded = store.create(["true"], "default", 60, b"", retry=True)
    store.requeue = lambda job_id, label: None
    assert store.claim(stranded.id, "w1", "h", 1, ttl=0.2)
    time.sleep(0.4)
    assert store.request_cancel(stranded.id) == "cancelled"
    assert store.get(stranded.id).state == "cancelled"
    assert store.get(live.id).state == "running"


def test_leases_are_judged_by_redis_time(store: JobStore) -> None:
    """lease_until is stamped from the Redis server's clock, not the worker's."""
    job = store.create(["true"], "default", 60, b"")
    assert store.claim(job.id, "w1", "h", 1, ttl=10)
    sec, usec = store.r.time()
    until = store.get(job.id).lease_until
    assert until is not None and abs(until - (sec + usec / 1e6 + 10)) < 1


def test_an_image_pull_failure_keeps_its_reason_for_gitlab(store: JobStore) -> None:
    """A job ended by ImagePullFailure is recorded as a system failure with the reason
    image_pull_failure (what GitLab's final update carries), another system failure without."""
    from kata_ci.errors import ImagePullFailure, SystemFailure
    from kata_ci.runner.core.outcome import Outcome

    pulled = Outcome.system_failure(ImagePullFailure("image x not found"))
    plain = Outcome.system_failure(SystemFailure("VM died"))
    assert (pulled.reason, plain.reason) == ("image_pull_failure", "")
    for outcome in (pulled, plain):
        job = store.create(["true"], "default", 60, None)
        token = store.claim(job.id, "w", "host", 1)
        assert token is not None
        assert store.finish(job.id, token, "system_failure", None, outcome.message,
                            outcome.reason)
        assert store.get(job.id).reason == outcome.reason


def test_history_is_swept_after_retention_but_live_jobs_stay(store: JobStore) -> None:
    """Past `retention`, an ended job's record, log and history entry go; a queued job, a
    running one and a GitLab job whose ending is not yet reported stay, however old."""
    store.retention = 60
    ended = store.create(["true"], "default", 60, b"ws")
    store.append_log(ended.id, "stdout", b"out")
    store.request_cancel(ended.id)
    waiting = store.create(["true"], "default", 60, b"ws")
    running = store.create(["true"], "default", 60, b"ws")
    assert store.claim(running.id, "w", "h", 1)
    unreported = store.create(["x"], "default", 60, None, gitlab={"payload": {}})
    store.request_cancel(unreported.id)
    assert store.sweep() == 0  # nothing is old yet
    assert store.sweep(time.time() + 61) == 1
    assert not store.r.exists(f"kataci:job:{ended.id}", f"kataci:log:{ended.id}")
    assert [j.id for j in store.recent(10)] == [unreported.id, running.id, waiting.id]
    store.reported(unreported.id)
    assert store.sweep(time.time() + 200) == 1
    assert {j.id for j in store.recent(10)} == {running.id, waiting.id}
