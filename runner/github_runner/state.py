"""What kata-ci knows of GitHub, in Redis: deliveries seen, workflow jobs, runners, demand.

Everything here survives a restart of `github serve` and of the workers (the reconcile loop
reads it back). Keys, prefix ``kataci:gh:``, each bounded by a TTL or a trim:
  delivery:<guid>    a webhook delivery handled (7 days): redeliveries and replays are no-ops
  job:<id>           a workflow job: repo, workflow, name, labels, status, runner (7 days)
  demanded:<id>      a runner was asked for this workflow job (7 days)
  jobs               workflow job ids by last update (the newest 1000)
  runner:<name>      a runner kata-ci made: id, scope, label set, kata job, state (7 days once
                     ended); state is starting -> idle (runner process up) -> busy (has a
                     job) -> done
  runners            names of runners not done
  pending:<scope>|<set>  kata job ids of demand units whose runner has no job yet

A unit of demand is a kata-ci job (source github) on the label set's kata-ci label: a worker
takes it like any job, and its runner takes whichever queued GitHub job fits (runners are
fungible per label set; GitHub decides which job a runner gets).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any, cast

import redis

from kata_ci.runner.github_runner.settings import GitHubConfig, LabelSet
from kata_ci.runner.queue.store import JobStore

P = "kataci:gh:"
KEEP = 7 * 24 * 3600
MAX_JOBS = 1000
LIVE_KATA_STATES = ("queued", "running")
Send = Callable[[str, str], None]


def _decode(raw: dict[bytes, bytes]) -> dict[str, str]:
    return {k.decode(): v.decode(errors="replace") for k, v in raw.items()}


class GitHubState:
    def __init__(self, client: redis.Redis) -> None:
        self.r = client

    # -- deliveries -----------------------------------------------------------------------
    def first_delivery(self, guid: str) -> bool:
        """True once per delivery guid: GitHub's redeliveries keep the guid."""
        return bool(self.r.set(f"{P}delivery:{guid}", b"1", nx=True, ex=KEEP))

    def forget_delivery(self, guid: str) -> None:
        """A delivery we failed to handle: its redelivery must be handled anew."""
        self.r.delete(f"{P}delivery:{guid}")

    # -- workflow jobs --------------------------------------------------------------------
    def record_job(self, job_id: int, fields: dict[str, Any]) -> None:
        key = f"{P}job:{job_id}"
        values = {k: v if isinstance(v, str) else json.dumps(v) for k, v in fields.items()}
        pipe = self.r.pipeline()
        pipe.hset(key, mapping=cast(Any, {**values, "id": str(job_id),
                                         "updated_at": str(time.time())}))
        pipe.expire(key, KEEP)
        pipe.zadd(f"{P}jobs", {str(job_id): time.time()})
        pipe.zremrangebyrank(f"{P}jobs", 0, -MAX_JOBS - 1)
        pipe.execute()

    def job(self, job_id: int | str) -> dict[str, str]:
        return _decode(cast(dict[bytes, bytes], self.r.hgetall(f"{P}job:{job_id}")))

    def recent_jobs(self, count: int = 50) -> list[dict[str, str]]:
        ids = cast(list[bytes], self.r.zrevrange(f"{P}jobs", 0, count - 1))
        return [j for j in (self.job(i.decode()) for i in ids) if j]

    def claim_demand(self, job_id: int) -> bool:
        """True once per workflow job: its runner is asked for once, whoever sees it first
        (the webhook, a redelivery, the reconcile loop)."""
        return bool(self.r.set(f"{P}demanded:{job_id}", b"1", nx=True, ex=KEEP))

    def release_demand(self, job_id: int) -> None:
        """No runner could be asked for now (max_runners): reconcile may claim it later."""
        self.r.delete(f"{P}demanded:{job_id}")

    def demanded(self, job_id: int) -> bool:
        return bool(self.r.exists(f"{P}demanded:{job_id}"))

    # -- runners --------------------------------------------------------------------------
    def add_runner(self, name: str, fields: dict[str, Any]) -> None:
        pipe = self.r.pipeline()
        pipe.hset(f"{P}runner:{name}", mapping=cast(Any, {k: str(v) for k, v in fields.items()}))
        pipe.persist(f"{P}runner:{name}")
        pipe.sadd(f"{P}runners", name)
        pipe.execute()

    def set_runner(self, name: str, **fields: Any) -> bool:
        """Update a known runner; False when kata-ci has no record of it."""
        key = f"{P}runner:{name}"
        if not self.r.exists(key):
            return False
        self.r.hset(key, mapping=cast(Any, {k: str(v) for k, v in fields.items()}))
        return True

    def runner(self, name: str) -> dict[str, str]:
        return _decode(cast(dict[bytes, bytes], self.r.hgetall(f"{P}runner:{name}")))

    def live_runners(self) -> list[dict[str, str]]:
        names = sorted(n.decode() for n in cast(set[bytes], self.r.smembers(f"{P}runners")))
        return [r for r in (self.runner(n) for n in names) if r]

    def runner_done(self, name: str, **fields: Any) -> None:
        pipe = self.r.pipeline()
        pipe.hset(f"{P}runner:{name}", mapping=cast(Any, {
            "state": "done", "ended_at": str(time.time()), **{k: str(v) for k, v in
                                                                fields.items()}}))
        pipe.expire(f"{P}runner:{name}", KEEP)
        pipe.srem(f"{P}runners", name)
        pipe.execute()

    def mark_busy(self, name: str, github_job: int | str) -> bool:
        """The runner got a job (a webhook or GitHub's runner list says so): it no longer
        counts as capacity waiting for one."""
        found = self.runner(name)
        if not found or found.get("state") == "done":
            return False
        self.set_runner(name, state="busy", busy_at=time.time(), github_job=github_job)
        self.drop_pending(found.get("scope", ""), found.get("label_set", ""),
                          found.get("kata_job", ""))
        return True

    # -- demand ---------------------------------------------------------------------------
    def _pending(self, scope: str, set_key: str) -> str:
        return f"{P}pending:{scope}|{set_key}"

    def add_pending(self, scope: str, set_key: str, kata_job: str) -> None:
        self.r.sadd(self._pending(scope, set_key), kata_job)

    def drop_pending(self, scope: str, set_key: str, kata_job: str) -> None:
        if kata_job:
            self.r.srem(self._pending(scope, set_key), kata_job)

    def pending(self, store: JobStore, scope: str, set_key: str) -> list[str]:
        """Demand units still waiting for a GitHub job; those whose kata job ended are
        dropped on the way (a worker lost with its VM, a cancel)."""
        key = self._pending(scope, set_key)
        waiting = []
        for raw in cast(set[bytes], self.r.smembers(key)):
            kata_id = raw.decode()
            state = cast(bytes | None, store.r.hget(f"kataci:job:{kata_id}", "state"))
            if state is not None and state.decode() in LIVE_KATA_STATES:
                waiting.append(kata_id)
            else:
                self.r.srem(key, kata_id)
        return sorted(waiting)

    def live_count(self, store: JobStore, scope: str, set_key: str) -> int:
        """Runners of this scope and set that hold a VM or wait for one (max_runners)."""
        busy = sum(1 for r in self.live_runners() if r.get("scope") == scope
                   and r.get("label_set") == set_key and r.get("state") == "busy")
        return busy + len(self.pending(store, scope, set_key))


def create_demand(store: JobStore, state: GitHubState, send: Send, config: GitHubConfig,
                  label_set: LabelSet, scope: str, reason: str,
                  max_timeout: float) -> str | None:
    """One more runner for ``label_set`` in ``scope``: a queued kata-ci job, sent to the
    workers of the set's kata-ci label. None when the set is at max_runners (the reconcile
    loop asks again once one is free)."""
    if state.live_count(store, scope, label_set.key) >= label_set.max_runners:
        return None
    entry = {"scope": scope, "label_set": label_set.key, "labels": list(label_set.labels),
             "reason": reason}
    job = store.create(["github-runner", scope, label_set.key], label_set.label, max_timeout,
                       None, github=entry)
    state.add_pending(scope, label_set.key, job.id)
    try:
        send(job.id, label_set.label)
    except Exception:
        state.drop_pending(scope, label_set.key, job.id)
        store.request_cancel(job.id)
        raise
    return job.id
