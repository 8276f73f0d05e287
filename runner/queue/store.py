"""Job state, logs and workspaces in Redis: the daemon's source of truth.

Celery delivers at least once (acks_late, lost workers, visibility timeouts); this store makes
a job *run* at most once. ``claim`` moves a job from ``queued`` to ``running`` atomically (a Lua
script) and hands out a fencing token (worker + attempt). A second delivery of the same message
finds the job no longer queued and does nothing. Every later write by a worker (its output,
its lease renewals, its ending) names its token, and a write whose token is stale (the job
was ended by someone else, or re-attempted) is refused: a worker that comes back after its
job was given up cannot touch it again.

Leases: a claimed job holds a lease until ``lease_until`` (Redis server time, so hosts'
clocks do not matter), renewed by its worker's heartbeat. A job whose lease has passed lost
its worker (killed, host gone, partitioned away): whoever notices it (any live worker's
reaper, ``logs -f``, ``cancel``) ends it with ``end_stranded``: queued again once if it allows
a retry, ``cancelled`` if a cancel was asked, else ``system_failure``, with a note in its
log. Only running jobs hold leases: a queued job waits for a worker however long it takes.

Keys (prefix ``kataci:``):
  job:<id>        hash: state, argv, env, label, timestamps, exit_code, message, worker,
                  lease (the fencing token), lease_until...
  jobs            sorted set of job ids by creation time
  leases          sorted set of running job ids by lease_until: what reapers scan
  log:<id>        stream of output chunks (fields: s=stdout|stderr|kata-ci, d=bytes)
  ws:<id>         the packed workspace (tar.gz), deleted once the job ends
  host:<name>     hash job id -> worker pid and token, for cleaning up after a worker that
                  died on this host when the host's next worker starts
  cancel:<id>     set by `cancel` for the worker running the job (it polls): "1" hard,
                  "graceful" (GitLab's canceling: the script stops, after_script runs)
  worker:<name>   a worker's free slots (capacity.py)

History is bounded: an ended job's record and log go once it is older than ``retention``
(``[queue] retention``, 7 days by default), swept as new jobs are created.

A unit of GitHub demand carries ``source`` = github and ``github`` (JSON: label set, scope,
runner name prefix); the GitHub side's own records are under ``gh:`` (github_runner/state.py).
A job from GitLab carries ``source`` = gitlab and ``gitlab`` (JSON: the runner it came
through and the job payload, its job token included) until its poller has told GitLab how
it ended.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast

import redis
from redis.backoff import ExponentialBackoff, NoBackoff
from redis.retry import Retry

from kata_ci.errors import UserError
from kata_ci.runner.core.outcome import FINAL

PREFIX = "kataci:"
LEASES = f"{PREFIX}leases"
TRUNCATED = b"\n[kata-ci: log truncated: the job wrote more than the log limit]\n"
DEFAULT_LEASE_TTL = 30.0
DEFAULT_RETENTION = 7 * 86400.0
SWEEP_BATCH, SWEEP_PAGES = 200, 5  # old jobs looked at per create: keeps pace with any rate
Requeue = Callable[[str, str], None]  # (job id, label): send the job's message again

# Redis server time in seconds: every lease is stamped and judged by the one clock.
_NOW = """
local function now()
  local t = redis.call('TIME')
  return tonumber(t[1]) + tonumber(t[2]) / 1000000
end
"""
# queued -> running, once, with a lease. Returns the new attempt number, or 0 when not
# claimable. KEYS: job, leases. ARGV: worker, host, started_at, ttl, job id.
_CLAIM = _NOW + """
if redis.call('HGET', KEYS[1], 'state') ~= 'queued' then return 0 end
local attempt = redis.call('HINCRBY', KEYS[1], 'attempt', 1)
local until_ = now() + tonumber(ARGV[4])
redis.call('HSET', KEYS[1], 'state', 'running', 'worker', ARGV[1], 'host', ARGV[2],
           'started_at', ARGV[3], 'lease', ARGV[1] .. ':' .. attempt,
           'lease_until', string.format('%.6f', until_))
redis.call('ZADD', KEYS[2], until_, ARGV[5])
return attempt
"""
# The heartbeat: only the holder of a running job's lease extends it (even just past its
# end, if nobody has ended the job yet: ending and renewing are atomic, one of them wins).
# KEYS: job, leases. ARGV: token, ttl, job id.
_RENEW = _NOW + """
if redis.call('HGET', KEYS[1], 'lease') ~= ARGV[1] then return 0 end
if redis.call('HGET', KEYS[1], 'state') ~= 'running' then return 0 end
local until_ = now() + tonumber(ARGV[2])
redis.call('HSET', KEYS[1], 'lease_until', string.format('%.6f', until_))
redis.call('ZADD', KEYS[2], until_, ARGV[3])
return 1
"""
# The ending, by the lease holder only. KEYS: job, leases.
# ARGV: token, state, exit_code, message, finished_at, job id.
_FINISH = """
if redis.call('HGET', KEYS[1], 'lease') ~= ARGV[1] then return 0 end
if redis.call('HGET', KEYS[1], 'state') ~= 'running' then return 0 end
redis.call('HSET', KEYS[1], 'state', ARGV[2], 'exit_code', ARGV[3], 'message', ARGV[4],
           'finished_at', ARGV[5])
redis.call('ZREM', KEYS[2], ARGV[6])
return 1
"""
# A running job whose worker is gone: with a token, that lease's holder is known dead (its
# pid, its own stop); without one, only once the lease has passed. Returns the new state or
# ''. KEYS: job, leases, cancel flag, log. ARGV: token, why, job id, finished_at, can_requeue.
_END = _NOW + """
if redis.call('HGET', KEYS[1], 'state') ~= 'running' then
  redis.call('ZREM', KEYS[2], ARGV[3])
  return ''
end
if ARGV[1] ~= '' then
  if redis.call('HGET', KEYS[1], 'lease') ~= ARGV[1] then return '' end
else
  local until_ = tonumber(redis.call('HGET', KEYS[1], 'lease_until') or '')
  if until_ == nil or until_ > now() then return '' end
end
local ending = 'system_failure'
if redis.call('EXISTS', KEYS[3]) == 1 then
  ending = 'cancelled'
elseif redis.call('HGET', KEYS[1], 'retry') == '1'
       and tonumber(redis.call('HGET', KEYS[1], 'attempt') or '0') < 2 then
  if ARGV[5] ~= '1' then return '' end  -- left for a store that can send its message again
  ending = 'queued'
end
redis.call('ZREM', KEYS[2], ARGV[3])
local note
if ending == 'queued' then
  redis.call('HSET', KEYS[1], 'state', 'queued', 'lease', '', 'lease_until', '',
             'message', 'retried once: ' .. ARGV[2])
  note = ARGV[2] .. '; running it again (its one retry)'
else
  local message = ARGV[2]
  if ending == 'cancelled' then message = 'cancelled; ' .. ARGV[2] end
  redis.call('HSET', KEYS[1], 'state', ending, 'exit_code', '', 'message', message,
             'finished_at', ARGV[4])
  note = message .. ((ending == 'system_failure') and '; system failure' or '')
end
redis.call('XADD', KEYS[4], '*', 's', 'kata-ci', 'd', '\\nkata-ci: ' .. note .. '\\n')
return ending
"""
# One output chunk, counted against the log limit; past it, one marker and no more. With a
# token, only while that lease holds the running job. KEYS: job, log.
# ARGV: token ('' = a note of ours), stream, data, limit, marker.
_APPEND = """
if redis.call('HEXISTS', KEYS[1], 'state') == 0 then return 0 end
if ARGV[1] ~= '' and (redis.call('HGET', KEYS[1], 'lease') ~= ARGV[1]
                      or redis.call('HGET', KEYS[1], 'state') ~= 'running') then return 0 end
local n = string.len(ARGV[3])
local total = redis.call('HINCRBY', KEYS[1], 'log_bytes', n)
local limit = tonumber(ARGV[4])
if total - n >= limit then return 1 end
local data = ARGV[3]
if total > limit then data = string.sub(data, 1, limit - (total - n)) .. ARGV[5] end
redis.call('XADD', KEYS[2], '*', 's', ARGV[2], 'd', data)
return 1
"""
# Cancel a job that has not started: nothing will run it afterwards.
_CANCEL_QUEUED = """
if redis.call('HGET', KEYS[1], 'state') ~= 'queued' then return 0 end
redis.call('HSET', KEYS[1], 'state', 'cancelled', 'message', 'cancelled before it started',
           'finished_at', ARGV[1])
return 1
"""

# Milestones, each set once, by the lease holder. KEYS: job. ARGV: token, field, value...
_MARK = """
if redis.call('HGET', KEYS[1], 'lease') ~= ARGV[1] then return 0 end
if redis.call('HGET', KEYS[1], 'state') ~= 'running' then return 0 end
for i = 2, #ARGV, 2 do redis.call('HSETNX', KEYS[1], ARGV[i], ARGV[i + 1]) end
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
    retry: bool = False  # may run once more if its worker is lost
    lease_until: float | None = None  # Redis server time; only while running
    source: str = "queue"  # queue (`submit`) | gitlab (`gitlab run`) | github (`github serve`)
    reason: str = ""  # Outcome.reason of a system failure (image_pull_failure)
    host: str = ""  # the host of the worker that claimed it
    # Milestones (worker's clock, like created/started/finished): its VM answered, and how
    # it came to be (restore | cold); its first byte of output.
    vm_ready_at: float | None = None
    vm_start: str = ""
    first_output_at: float | None = None

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
                   attempt=int(get.get("attempt", "0")), retry=get.get("retry") == "1",
                   lease_until=number("lease_until"), source=get.get("source", "queue"),
                   reason=get.get("reason", ""), host=get.get("host", ""),
                   vm_ready_at=number("vm_ready_at"), vm_start=get.get("vm_start", ""),
                   first_output_at=number("first_output_at"))


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


class JobStore:
    """``requeue`` sends a job's message again: a store without one leaves the jobs that
    allow a retry for a store that has one (every worker and every CLI command has one)."""

    def __init__(self, client: redis.Redis, log_limit: int = 16 << 20,
                 requeue: Requeue | None = None, retention: float = DEFAULT_RETENTION) -> None:
        self.r = client
        self.log_limit = log_limit
        self.requeue = requeue
        self.retention = retention
        self._claim = client.register_script(_CLAIM)
        self._renew = client.register_script(_RENEW)
        self._finish = client.register_script(_FINISH)
        self._end = client.register_script(_END)
        self._append = client.register_script(_APPEND)
        self._cancel_queued = client.register_script(_CANCEL_QUEUED)
        self._mark = client.register_script(_MARK)

    @classmethod
    def connect(cls, url: str, log_limit: int = 16 << 20, outage_seconds: float = 300.0,
                requeue: Requeue | None = None,
                retention: float = DEFAULT_RETENTION) -> JobStore:
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
        return cls(client, log_limit, requeue, retention)

    # -- submission ------------------------------------------------------------------------
    def create(self, argv: Sequence[str], label: str, timeout: float, workspace: bytes | None,
               retry: bool = False, env: Mapping[str, str] | None = None,
               gitlab: Mapping[str, Any] | None = None,
               github: Mapping[str, Any] | None = None) -> Job:
        """A queued job: from `submit` (its packed workspace), from GitLab (``gitlab``:
        the runner and the payload; the worker makes the workspace from it), or a unit of
        GitHub demand (``github``: the label set and scope of the runner to start)."""
        job_id = uuid.uuid4().hex[:16]
        now = time.time()
        fields = {"id": job_id, "state": "queued", "argv": json.dumps(list(argv)),
                  "env": json.dumps(dict(env or {})),
                  "label": label, "timeout": str(timeout), "created_at": str(now),
                  "attempt": "0", "log_bytes": "0", "retry": "1" if retry else "0",
                  "source": "gitlab" if gitlab else "github" if github else "queue"}
        if gitlab:
            fields["gitlab"] = json.dumps(dict(gitlab))
        if github:
            fields["github"] = json.dumps(dict(github))
        pipe = self.r.pipeline()
        pipe.hset(self._job(job_id), mapping=cast(Any, fields))
        if workspace is not None:
            pipe.set(f"{PREFIX}ws:{job_id}", workspace)
        pipe.zadd(f"{PREFIX}jobs", {job_id: now})
        pipe.execute()
        self.sweep(now)
        return self.get(job_id)

    def sweep(self, now: float | None = None) -> int:
        """Forget jobs created more than ``retention`` s ago that have ended (or whose
        record is gone): their record, log and place in the history. Queued and running
        ones stay however old, and so does a GitLab job until its poller has reported its
        ending. Run at each ``create``, a bounded batch; returns how many went."""
        cutoff = (now or time.time()) - self.retention
        gone = kept = 0
        for _ in range(SWEEP_PAGES):  # live old jobs are skipped, never a wall to the rest
            old = cast(list[bytes], self.r.zrangebyscore(f"{PREFIX}jobs", "-inf", cutoff,
                                                         start=kept, num=SWEEP_BATCH))
            for raw in old:
                job_id = raw.decode()
                state, gitlab = self.r.hmget(self._job(job_id), ["state", "gitlab"])
                if (state is not None and _text(state) not in FINAL) or gitlab:
                    kept += 1
                    continue
                pipe = self.r.pipeline()
                pipe.delete(self._job(job_id), f"{PREFIX}log:{job_id}",
                            f"{PREFIX}ws:{job_id}", self._cancel(job_id))
                pipe.zrem(f"{PREFIX}jobs", job_id)
                pipe.execute()
                gone += 1
            if len(old) < SWEEP_BATCH or gone:
                break
        return gone

    def get(self, job_id: str) -> Job:
        raw = cast(dict[bytes, bytes], self.r.hgetall(self._job(job_id)))
        if not raw:
            raise UserError(f"no job {job_id}")
        return Job.from_hash(raw)

    def recent(self, count: int = 20) -> list[Job]:
        """The newest ``count`` jobs still in the history, newest first."""
        ids = cast(list[bytes], self.r.zrevrange(f"{PREFIX}jobs", 0, count - 1))
        jobs = []
        for job_id in ids:
            raw = cast(dict[bytes, bytes], self.r.hgetall(self._job(job_id.decode())))
            if raw:  # swept between the two reads
                jobs.append(Job.from_hash(raw))
        return jobs

    def gitlab(self, job_id: str) -> dict[str, Any] | None:
        """A GitLab job's runner and payload; None once its ending was reported."""
        raw = self.r.hget(self._job(job_id), "gitlab")
        try:
            value = json.loads(cast(bytes, raw)) if raw else None
        except ValueError:
            return None
        return value if isinstance(value, dict) else None

    def github(self, job_id: str) -> dict[str, Any] | None:
        """A GitHub demand unit's entry (no secret in it: the JIT config is made by the
        worker and never stored)."""
        raw = self.r.hget(self._job(job_id), "github")
        try:
            entry = json.loads(cast(bytes, raw)) if raw else None
        except ValueError:
            return None
        return entry if isinstance(entry, dict) else None

    def reported(self, job_id: str) -> None:
        """The GitLab side knows how the job ended: its payload (and job token) goes."""
        self.r.hdel(self._job(job_id), "gitlab")

    def workspace(self, job_id: str) -> bytes | None:
        return cast(bytes | None, self.r.get(f"{PREFIX}ws:{job_id}"))

    # -- the worker's side ------------------------------------------------------------------
    def claim(self, job_id: str, worker: str, host: str, pid: int,
              ttl: float = DEFAULT_LEASE_TTL) -> str | None:
        """The fencing token if this delivery may run the job (its lease now runs for
        ``ttl`` s), else None (it runs or ran already)."""
        attempt = int(cast(int, self._claim(keys=[self._job(job_id), LEASES],
                                            args=[worker, host, str(time.time()), ttl, job_id])))
        if attempt == 0:
            return None
        token = f"{worker}:{attempt}"
        self.r.hset(f"{PREFIX}host:{host}", job_id,
                    json.dumps({"pid": pid, "worker": worker, "token": token}))
        return token

    def milestone(self, job_id: str, token: str, **fields: str) -> None:
        """Record when the job reached a milestone (``vm_ready_at``, ``first_output_at``...),
        the first time only, and only while ``token`` holds the running job."""
        self._mark(keys=[self._job(job_id)], args=[token, *(x for kv in fields.items()
                                                             for x in kv)])

    def renew(self, job_id: str, token: str, ttl: float) -> bool:
        """Extend the lease by ``ttl`` s from now; False when it is no longer this token's
        (the job was ended or given to another attempt): its worker must stop it."""
        return bool(self._renew(keys=[self._job(job_id), LEASES], args=[token, ttl, job_id]))

    def finish(self, job_id: str, token: str, state: str, exit_code: int | None,
               message: str, reason: str = "") -> bool:
        """Record the ending; False when the token is stale (someone else owns the job now).
        ``reason``: a finer class of a system failure (GitLab's image_pull_failure)."""
        assert state in FINAL
        done = bool(self._finish(keys=[self._job(job_id), LEASES], args=[
            token, state, "" if exit_code is None else str(exit_code), message,
            str(time.time()), job_id]))
        if done and reason:
            self.r.hset(self._job(job_id), "reason", reason)
        if done:  # a stale worker must not clean up after the job's real owner
            host = self.r.hget(self._job(job_id), "host")
            if host:
                self.forget(job_id, _text(host))
            self.r.delete(f"{PREFIX}ws:{job_id}", self._cancel(job_id))
        return done

    def end_stranded(self, job_id: str, why: str = "", token: str = "") -> str:
        """End a running job whose worker is gone; the new state, or '' when there was
        nothing to end. With ``token``: that lease's holder is known to be gone. Without: only
        if the lease has passed. Queued again once if the job allows a retry (and this store
        can send its message), ``cancelled`` if a cancel was asked, else system_failure.
        The worker's ``host:`` entry stays: its host's next worker start cleans up after it."""
        try:
            job = self.get(job_id)
        except UserError:
            self.r.zrem(LEASES, job_id)
            return ""
        why = why or (f"its worker {job.worker} stopped renewing its lease (worker killed or "
                      "its host lost)")
        ending = _text(cast(bytes, self._end(
            keys=[self._job(job_id), LEASES, self._cancel(job_id), f"{PREFIX}log:{job_id}"],
            args=[token, why, job_id, str(time.time()), "1" if self.requeue else "0"])))
        if ending and ending != "queued":
            self.r.delete(f"{PREFIX}ws:{job_id}", self._cancel(job_id))
        if ending == "queued" and self.requeue is not None:
            self.requeue(job_id, job.label)
        return ending

    def reap_expired(self) -> list[tuple[str, str]]:
        """End every running job whose lease has passed: (job id, new state) for each."""
        sec, usec = self.r.time()
        due = cast(list[bytes], self.r.zrangebyscore(LEASES, "-inf", sec + usec / 1e6))
        ended = [(job_id, self.end_stranded(job_id)) for job_id in map(_text, due)]
        return [(job_id, state) for job_id, state in ended if state]

    def running_on_host(self, host: str) -> dict[str, dict[str, Any]]:
        raw = cast(dict[bytes, bytes], self.r.hgetall(f"{PREFIX}host:{host}"))
        return {k.decode(): json.loads(v) for k, v in raw.items()}

    def forget(self, job_id: str, host: str) -> None:
        """Drop the job from ``host``'s list of jobs to clean up after."""
        self.r.hdel(f"{PREFIX}host:{host}", job_id)

    # -- logs ---------------------------------------------------------------------------------
    def append_log(self, job_id: str, stream: str, data: bytes, token: str = "") -> bool:
        """Store a chunk as it streams; past the limit, one truncation marker and no more.
        With ``token`` (a worker's output), dropped unless that lease still holds the job."""
        return bool(self._append(keys=[self._job(job_id), f"{PREFIX}log:{job_id}"],
                                 args=[token, stream, data, self.log_limit, TRUNCATED]))

    def read_log(self, job_id: str, follow: bool = False,
                 block_ms: int = 500) -> Iterator[tuple[str, bytes]]:
        """Chunks from the start; with ``follow``, until the job reaches a final state (a
        running job whose lease has passed is ended here: following it never hangs)."""
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
            if not follow:
                return
            state = self.get(job_id).state
            if state == "running" and self.end_stranded(job_id):
                state = self.get(job_id).state
            if state in FINAL:
                # One more read: chunks written just before the final state.
                tail = cast(list[Any], self.r.xread({key: last}, count=512))
                for _, entries in tail:
                    for _, fields in entries:
                        yield fields[b"s"].decode(), fields[b"d"]
                return

    # -- cancel -------------------------------------------------------------------------------
    def request_cancel(self, job_id: str, graceful: bool = False) -> str:
        """Cancel: a queued job ends now; a running one is told to (its worker polls), or
        ends now as cancelled if its lease has passed (its worker is gone). ``graceful``
        (GitLab's canceling): its script stops and its after_script still runs; a hard
        cancel is never softened by a later graceful one."""
        job = self.get(job_id)
        if job.state in FINAL:
            return job.state
        if self._cancel_queued(keys=[self._job(job_id)], args=[str(time.time())]):
            self.r.delete(f"{PREFIX}ws:{job_id}")
            return "cancelled"
        if graceful:
            self.r.set(self._cancel(job_id), "graceful", ex=7 * 86400, nx=True)
        else:
            self.r.set(self._cancel(job_id), "1", ex=7 * 86400)
        return self.end_stranded(job_id) or "cancelling"

    def cancel_requested(self, job_id: str, hard_only: bool = False) -> bool:
        value = self.r.get(self._cancel(job_id))
        return value is not None and not (hard_only and value == b"graceful")

    @staticmethod
    def _job(job_id: str) -> str:
        return f"{PREFIX}job:{job_id}"

    @staticmethod
    def _cancel(job_id: str) -> str:
        return f"{PREFIX}cancel:{job_id}"
