"""Job state, logs and workspaces in Redis: the daemon's source of truth.

Celery delivers at least once (acks_late, lost workers, visibility timeouts); this store makes
a job *run* at most once. ``claim`` moves a job from ``queued`` to ``running`` atomically (a Lua
script) and hands out a fencing token (job id + attempt). A second delivery of the same message
finds the job no longer queued and does nothing. Every later write by a worker names its token,
and a write whose token is stale (the job was reaped or re-attempted) is refused.

Keys (prefix ``kataci:``):
  job:<id>        hash: state, argv, env, label, timestamps, exit_code, message, worker...
  jobs            sorted set of job ids by creation time
  log:<id>        stream of output chunks (fields: s=stdout|stderr|kata-ci, d=bytes)
  ws:<id>         the packed workspace (tar.gz), deleted once the job ends
  host:<name>     hash job id -> worker pid, for reaping after a worker died on this host
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast

import redis
from redis.backoff import ExponentialBackoff, NoBackoff
from redis.retry import Retry

from kata_ci.errors import UserError
from kata_ci.runner.core.outcome import FINAL

PREFIX = "kataci:"
TRUNCATED = b"\n[kata-ci: log truncated: the job wrote more than the log limit]\n"

# queued -> running, once. Returns the new attempt number, or 0 when not claimable.
_CLAIM = """
local state = redis.call('HGET', KEYS[1], 'state')
if state ~= 'queued' then return 0 end
local attempt = redis.call('HINCRBY', KEYS[1], 'attempt', 1)
redis.call('HSET', KEYS[1], 'state', 'running', 'worker', ARGV[1], 'host', ARGV[2],
           'started_at', ARGV[3], 'lease', ARGV[1] .. ':' .. attempt)
return attempt
"""
# Any write guarded by the fencing token: only the lease holder may finish the job.
_FINISH = """
if redis.call('HGET', KEYS[1], 'lease') ~= ARGV[1] then return 0 end
if redis.call('HGET', KEYS[1], 'state') ~= 'running' then return 0 end
redis.call('HSET', KEYS[1], 'state', ARGV[2], 'exit_code', ARGV[3], 'message', ARGV[4],
           'finished_at', ARGV[5])
return 1
"""
# A job whose worker died goes back to the queue, once, if it allows a retry.
_REQUEUE = """
if redis.call('HGET', KEYS[1], 'lease') ~= ARGV[1] then return 0 end
if redis.call('HGET', KEYS[1], 'state') ~= 'running' then return 0 end
if redis.call('HGET', KEYS[1], 'retry') ~= '1' then return 0 end
if tonumber(redis.call('HGET', KEYS[1], 'attempt')) >= 2 then return 0 end
redis.call('HSET', KEYS[1], 'state', 'queued', 'lease', '', 'message', ARGV[2])
return 1
"""
# Cancel a job that has not started: nothing will run it afterwards.
_CANCEL_QUEUED = """
if redis.call('HGET', KEYS[1], 'state') ~= 'queued' then return 0 end
redis.call('HSET', KEYS[1], 'state', 'cancelled', 'message', 'cancelled before it started',
           'finished_at', ARGV[1])
return 1
"""


@dataclass(frozen=True)
class Job:
    id: str
    state: str
    argv: list[str]
    env: dict[str, str]  # what `submit -e` set (and the submitter's TERM)
    label: str
    timeout: float
    created_at: float
    started_at: float | None
    finished_at: float | None
    exit_code: int | None
    message: str
    worker: str
    attempt: int

    @classmethod
    def from_hash(cls, raw: dict[bytes, bytes]) -> Job:
        get = {k.decode(): v.decode() for k, v in raw.items()}

        def number(key: str) -> float | None:
            return float(get[key]) if get.get(key) else None

        code = get.get("exit_code")
        return cls(id=get["id"], state=get["state"], argv=json.loads(get["argv"]),
                   env=json.loads(get.get("env", "{}")),
                   label=get["label"], timeout=float(get["timeout"]),
                   created_at=float(get["created_at"]), started_at=number("started_at"),
                   finished_at=number("finished_at"),
                   exit_code=int(code) if code not in (None, "") else None,
                   message=get.get("message", ""), worker=get.get("worker", ""),
                   attempt=int(get.get("attempt", "0")))


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


class JobStore:
    def __init__(self, client: redis.Redis, log_limit: int = 16 << 20) -> None:
        self.r = client
        self.log_limit = log_limit
        self._claim = client.register_script(_CLAIM)
        self._finish = client.register_script(_FINISH)
        self._cancel_queued = client.register_script(_CANCEL_QUEUED)
        self._requeue = client.register_script(_REQUEUE)

    @classmethod
    def connect(cls, url: str, log_limit: int = 16 << 20,
                outage_seconds: float = 300.0) -> JobStore:
        """A store on ``url``. Unreachable at start: a UserError naming it, at once. Once
        connected, commands ride out a Redis restart of up to ``outage_seconds`` (retried with
        backoff): a running job's output then waits, its final state is never dropped."""
        try:
            redis.Redis.from_url(url, socket_connect_timeout=3, retry=Retry(NoBackoff(), 0)).ping()
        except (redis.ConnectionError, redis.TimeoutError, ValueError) as exc:
            raise UserError(f"cannot reach the broker at {url}: {exc}") from None
        retries = max(1, int(outage_seconds))  # ~1 s apart once the backoff is capped
        client = redis.Redis.from_url(
            url, socket_connect_timeout=3, health_check_interval=10,
            retry=Retry(ExponentialBackoff(cap=1.0, base=0.05), retries),
            retry_on_error=[redis.ConnectionError, redis.TimeoutError])
        return cls(client, log_limit)

    # -- submission ------------------------------------------------------------------------
    def create(self, argv: Sequence[str], label: str, timeout: float, workspace: bytes,
               retry: bool = False, env: Mapping[str, str] | None = None) -> Job:
        job_id = uuid.uuid4().hex[:16]
        now = time.time()
        fields = {"id": job_id, "state": "queued", "argv": json.dumps(list(argv)),
                  "env": json.dumps(dict(env or {})),
                  "label": label, "timeout": str(timeout), "created_at": str(now),
                  "attempt": "0", "log_bytes": "0", "retry": "1" if retry else "0"}
        pipe = self.r.pipeline()
        pipe.hset(self._job(job_id), mapping=cast(Any, fields))
        pipe.set(f"{PREFIX}ws:{job_id}", workspace)
        pipe.zadd(f"{PREFIX}jobs", {job_id: now})
        pipe.execute()
        return self.get(job_id)

    def get(self, job_id: str) -> Job:
        raw = cast(dict[bytes, bytes], self.r.hgetall(self._job(job_id)))
        if not raw:
            raise UserError(f"no job {job_id}")
        return Job.from_hash(raw)

    def recent(self, count: int = 20) -> list[Job]:
        ids = cast(list[bytes], self.r.zrevrange(f"{PREFIX}jobs", 0, count - 1))
        return [self.get(i.decode()) for i in ids]

    def workspace(self, job_id: str) -> bytes | None:
        return cast(bytes | None, self.r.get(f"{PREFIX}ws:{job_id}"))

    # -- the worker's side ------------------------------------------------------------------
    def claim(self, job_id: str, worker: str, host: str, pid: int) -> str | None:
        """The fencing token if this delivery may run the job, else None (run already)."""
        attempt = int(cast(int, self._claim(keys=[self._job(job_id)],
                                            args=[worker, host, str(time.time())])))
        if attempt == 0:
            return None
        self.r.hset(f"{PREFIX}host:{host}", job_id, json.dumps({"pid": pid, "worker": worker}))
        return f"{worker}:{attempt}"

    def finish(self, job_id: str, token: str, state: str, exit_code: int | None,
               message: str) -> bool:
        """Record the ending; False when the token is stale (someone else owns the job now)."""
        assert state in FINAL
        done = bool(self._finish(keys=[self._job(job_id)], args=[
            token, state, "" if exit_code is None else str(exit_code), message,
            str(time.time())]))
        if done:  # a stale worker must not clean up after the job's real owner
            host = self.r.hget(self._job(job_id), "host")
            if host:
                self.r.hdel(f"{PREFIX}host:{_text(host)}", job_id)
            self.r.delete(f"{PREFIX}ws:{job_id}")
        return done

    def requeue_once(self, job_id: str, token: str, why: str) -> bool:
        """Back to ``queued`` if the job allows a retry and has not had one; fenced."""
        if not self._requeue(keys=[self._job(job_id)], args=[token, why]):
            return False
        host = self.r.hget(self._job(job_id), "host")
        if host:
            self.r.hdel(f"{PREFIX}host:{_text(host)}", job_id)
        return True

    def running_on_host(self, host: str) -> dict[str, dict[str, Any]]:
        raw = cast(dict[bytes, bytes], self.r.hgetall(f"{PREFIX}host:{host}"))
        return {k.decode(): json.loads(v) for k, v in raw.items()}

    def lease(self, job_id: str) -> str:
        value = self.r.hget(self._job(job_id), "lease")
        return _text(value) if value else ""

    # -- logs ---------------------------------------------------------------------------------
    def append_log(self, job_id: str, stream: str, data: bytes) -> None:
        """Store a chunk as it streams; past the limit, one truncation marker and no more."""
        key = self._job(job_id)
        total = int(self.r.hincrby(key, "log_bytes", len(data)))
        if total - len(data) >= self.log_limit:
            return
        if total > self.log_limit:
            data = data[: self.log_limit - (total - len(data))] + TRUNCATED
        self.r.xadd(f"{PREFIX}log:{job_id}", {"s": stream, "d": data})

    def read_log(self, job_id: str, follow: bool = False,
                 block_ms: int = 500) -> Iterator[tuple[str, bytes]]:
        """Chunks from the start; with ``follow``, until the job reaches a final state."""
        last = "0-0"
        key = f"{PREFIX}log:{job_id}"
        while True:
            batch = cast(list[Any], self.r.xread({key: last}, count=512,
                                                 block=block_ms if follow else None))
            for _, entries in batch:
                for entry_id, fields in entries:
                    last = entry_id.decode()
                    yield fields[b"s"].decode(), fields[b"d"]
            if batch:
                continue
            if not follow or self.get(job_id).state in FINAL:
                # One more read: chunks written just before the final state.
                if not follow:
                    return
                tail = cast(list[Any], self.r.xread({key: last}, count=512))
                for _, entries in tail:
                    for _, fields in entries:
                        yield fields[b"s"].decode(), fields[b"d"]
                return

    # -- cancel -------------------------------------------------------------------------------
    def request_cancel(self, job_id: str) -> str:
        """Cancel: a queued job ends now; a running one is told to (its worker polls)."""
        job = self.get(job_id)
        if job.state in FINAL:
            return job.state
        if self._cancel_queued(keys=[self._job(job_id)], args=[str(time.time())]):
            self.r.delete(f"{PREFIX}ws:{job_id}")
            return "cancelled"
        self.r.set(f"{PREFIX}cancel:{job_id}", "1", ex=7 * 86400)
        return "cancelling"

    def cancel_requested(self, job_id: str) -> bool:
        return bool(self.r.exists(f"{PREFIX}cancel:{job_id}"))

    @staticmethod
    def _job(job_id: str) -> str:
        return f"{PREFIX}job:{job_id}"
