"""Following one GitLab job from the poller: its trace to GitLab, GitLab's cancel to the job,
and its ending to GitLab, exactly once, whichever poller does it.

The job's output is in its Redis log (masked by the worker before it got there); this ships
it as gitlab-runner's network/trace.go does: ``PATCH /jobs/:id/trace`` with Content-Range in
chunks of at most 1 MiB, at GitLab's ``X-GitLab-Trace-Update-Interval``; a 416 moves the
offset to the ``Range`` GitLab holds. ``Job-Status: canceling`` becomes a graceful cancel;
``canceled``, ``failed`` or a 403 a hard one. A job that prints nothing is touched (``PUT
state=running``) at the update interval instead, at least every 30 s as gitlab-runner does,
so a cancel reaches it too. When the job has ended in Redis (however: its worker, a lease
reaper, a cancel) the final ``PUT`` carries state, failure_reason, exit_code and the trace's
crc32 and size; 202 is asked again after the interval, 412 resends the whole trace.

Which poller follows a job: whoever holds its follow lock (SET NX with a TTL, renewed); the
set of jobs in flight is in Redis, so a poller that restarts, or another one, picks up a job
whose follower is gone and carries on from the offset GitLab reports.
"""

from __future__ import annotations

import logging
import threading
import time
import zlib
from typing import Any, cast

import httpx

from kata_ci.errors import KataCIError
from kata_ci.runner.gitlab_runner.api import GitLabAPI, Reply
from kata_ci.runner.ops import context
from kata_ci.runner.queue.store import PREFIX, Job, JobStore

log = logging.getLogger("kata_ci.gitlab")
INFLIGHT = f"{PREFIX}gitlab:inflight"  # set of job ids whose ending GitLab has not had yet
CHUNK = 1 << 20  # gitlab-runner's DefaultTracePatchLimit
TOUCH_AFTER = 30.0  # gitlab-runner's forceSendInterval
LOCK_TTL = 15.0
FINAL_PATIENCE = 3600.0  # s of retrying the final update (202s, GitLab down) before giving up
ALWAYS_SUPPORTED = ("script_failure", "runner_system_failure", "job_execution_timeout")
ENDINGS = {  # Redis state -> (GitLab state, failure_reason)
    "success": ("success", ""), "failed": ("failed", "script_failure"),
    "timeout": ("failed", "job_execution_timeout"),
    "system_failure": ("failed", "runner_system_failure"),
    "cancelled": ("failed", "job_canceled"),
}


def failure_reason(reason: str, supported: list[str]) -> str:
    """gitlab-runner's compatibility rule: a reason GitLab does not list is not sent."""
    if not reason or reason in ALWAYS_SUPPORTED or reason in supported:
        return reason
    return "unknown_failure"


def lock_key(job_id: str) -> str:
    return f"{PREFIX}gitlab:follow:{job_id}"


def try_lock(store: JobStore, job_id: str, owner: str) -> bool:
    return bool(store.r.set(lock_key(job_id), owner, nx=True, px=int(LOCK_TTL * 1000)))


class Follower(threading.Thread):
    """Ships one job's trace and ending; ends when GitLab has the ending (or gave up)."""

    def __init__(self, store: JobStore, job_id: str, owner: str, stop: threading.Event,
                 interval: float = 3.0) -> None:
        super().__init__(name=f"kata-ci-follow-{job_id}", daemon=True)
        self.store = store
        self.job_id = job_id
        self.owner = owner
        self.stopping = stop
        self.interval = interval
        self.trace = bytearray()
        self.sent = 0
        self.ended = threading.Event()  # the Redis log is read to its end
        self.abort = False  # GitLab no longer wants anything for this job
        self.lost = False  # the job's record is gone from Redis: GitLab is told it failed
        self.wake = threading.Event()

    def run(self) -> None:
        """In the job's context: the operator log's lines about it name it (ops/context.py)."""
        try:
            label = self.store.get(self.job_id).label  # set by our poller from its config
        except Exception:
            label = ""
        with context.job(self.job_id, "gitlab", label):
            self._run()

    def _run(self) -> None:
        entry = self.store.gitlab(self.job_id)
        if entry is None:
            self.store.r.srem(INFLIGHT, self.job_id)
            return
        payload = cast(dict[str, Any], entry.get("payload", {}))
        self.gitlab_id = int(payload.get("id", 0))
        self.token = str(payload.get("token", ""))
        self.reasons = [str(r) for r in payload.get("features", {}).get("failure_reasons", [])]
        self.api = GitLabAPI(str(entry["url"]), verify=str(entry.get("ca") or "") or True)
        context.spawn(self._read, name=f"kata-ci-log-{self.job_id}")
        try:
            self._follow()
        except Exception:  # a bug of ours must not take the poller down; the lock expires
            log.exception("job %s: following GitLab job %s failed", self.job_id, self.gitlab_id)
        finally:
            self.api.close()

    def _read(self) -> None:
        try:
            for _, data in self.store.read_log(self.job_id, follow=True):
                self.trace += data
                self.wake.set()
                if self.stopping.is_set():
                    return
        except KataCIError as exc:  # the job's record is gone (deleted by hand)
            log.warning("job %s: its log cannot be read: %s", self.job_id, exc)
            self.lost = True
        self.ended.set()
        self.wake.set()

    def _holds_lock(self) -> bool:
        key = lock_key(self.job_id)
        if self.store.r.get(key) != self.owner.encode():
            return False
        self.store.r.pexpire(key, int(LOCK_TTL * 1000))
        return True

    def _follow(self) -> None:
        last_sent, next_patch, failures = time.monotonic(), 0.0, 0
        while not self.stopping.is_set() and self._holds_lock():
            self.wake.clear()  # before looking: a chunk arriving from here on wakes the wait
            ended = self.ended.is_set()
            pending = self.sent < len(self.trace)
            if pending and (ended or time.monotonic() >= next_patch):
                advanced = self._patch()
                last_sent = time.monotonic()
                failures = 0 if advanced else failures + 1
                # GitLab's pace, not the job's; a PATCH that did not go through waits longer
                next_patch = last_sent + (self.interval if advanced else
                                          min(60.0, self.interval * 2 ** min(failures, 6)))
                if not advanced:
                    ended = False  # not at once, even for a job that has ended
            elif not pending and not ended and time.monotonic() - last_sent >= self._touch_after:
                self._relay(self._put({"state": "running", "output": self._output()}))
                last_sent = time.monotonic()
            if self.abort:
                break
            if ended and self.sent >= len(self.trace):
                self._finish()
                return
            timeout = min(LOCK_TTL / 3, self._touch_after)  # the lock is renewed this often
            if self.sent < len(self.trace):
                due = max(0.0, next_patch - time.monotonic())
                timeout = 0.0 if ended and not failures else min(timeout, due)
            self.wake.wait(timeout)
        if self.abort:
            self._done("GitLab no longer accepts updates for it")
        self.trace = bytearray()  # a poller runs for months: no finished trace stays held

    @property
    def _touch_after(self) -> float:
        """A quiet job is touched (PUT running) at GitLab's interval, at least 3 s apart and
        at most 30 s (gitlab-runner's forceSendInterval): its answer carries a cancel, which
        a job printing nothing would otherwise only hear of every 30 s."""
        return min(TOUCH_AFTER, max(self.interval, 3.0))

    def _patch(self) -> bool:
        """One chunk to GitLab; whether it went through (or GitLab's offset was taken)."""
        chunk = bytes(self.trace[self.sent:self.sent + CHUNK])
        try:
            reply = self.api.patch_trace(self.gitlab_id, self.token, self.sent, chunk)
        except httpx.HTTPError as exc:
            log.warning("job %s: trace update failed: %s", self.job_id, exc)
            return False
        advanced = reply.status == 202
        if advanced:
            self.sent += len(chunk)
        elif reply.status == 416:
            end = reply.range_end
            # GitLab holds a different amount: resend from where it is (0 if it lost it)
            advanced = end is not None and 0 <= end <= len(self.trace) and end != self.sent
            self.sent = end if end is not None and 0 <= end <= len(self.trace) else 0
        elif reply.status in (403, 404):
            self.abort = True
        else:
            log.warning("job %s: trace update: %s", self.job_id, describe(reply))
        self._relay(reply)
        return advanced

    def _relay(self, reply: Reply | None) -> None:
        """GitLab's say about the job: a cancel, a new interval."""
        if reply is None:
            return
        if reply.interval and reply.interval > 0:
            self.interval = min(reply.interval, 900.0)
        status = reply.job_status
        if status == "canceling":
            self.store.request_cancel(self.job_id, graceful=True)
        elif status in ("canceled", "failed") or reply.status == 403:
            self.store.request_cancel(self.job_id)
            self.abort = self.abort or reply.status in (403, 404)

    def _put(self, body: dict[str, Any]) -> Reply | None:
        try:
            return self.api.update_job(self.gitlab_id, self.token, body)
        except httpx.HTTPError as exc:
            log.warning("job %s: job update failed: %s", self.job_id, exc)
            return None

    def _output(self) -> dict[str, Any]:
        return {"checksum": f"crc32:{zlib.crc32(bytes(self.trace)) & 0xffffffff:08x}",
                "bytesize": len(self.trace)}

    def _finish(self) -> None:
        try:
            job: Job | None = self.store.get(self.job_id)
        except KataCIError:
            job = None
        state, reason = ENDINGS.get(job.state if job else "", ("failed", "runner_system_failure"))
        if job is not None and job.reason and job.state == "system_failure":
            reason = job.reason  # image_pull_failure; older GitLab gets unknown_failure
        body: dict[str, Any] = {"state": state, "output": self._output()}
        body["checksum"] = body["output"]["checksum"]  # the older spelling, for older GitLab
        if state == "failed":
            body["failure_reason"] = failure_reason(reason, self.reasons)
            if job is not None and job.exit_code is not None and reason == "script_failure":
                body["exit_code"] = job.exit_code
        deadline = time.monotonic() + FINAL_PATIENCE
        attempt = 0
        while time.monotonic() < deadline:
            reply = self._put(body)
            if reply is not None and reply.status == 200:
                self._done(f"GitLab has its ending: {state} {body.get('failure_reason', '')}")
                return
            if reply is not None and reply.status in (403, 404):
                self._done(f"GitLab refused its ending (HTTP {reply.status})")
                return
            if reply is not None and reply.status == 412:
                self.sent = 0  # GitLab could not verify the trace: all of it again
                for _ in range(len(self.trace) // CHUNK + 3):
                    if self.sent >= len(self.trace) or self.abort or not self._patch():
                        break
                body["output"] = self._output()
            attempt += 1
            wait = (reply.interval if reply is not None and reply.interval else
                    2.0 ** min(attempt, 6))
            if not self._sleep(min(wait, 900.0)):
                return  # stopping, or another poller holds the job now: it carries on
        self._done(f"gave up sending its ending after {FINAL_PATIENCE / 3600:g} h")

    def _sleep(self, seconds: float) -> bool:
        """Wait, renewing the follow lock meanwhile; False when stopping or the lock is lost."""
        end = time.monotonic() + seconds
        while (left := end - time.monotonic()) > 0:
            if self.stopping.wait(min(left, LOCK_TTL / 3)) or not self._holds_lock():
                return False
        return True

    def _done(self, why: str) -> None:
        log.info("job %s: GitLab job %s: %s", self.job_id, self.gitlab_id, why)
        self.store.reported(self.job_id)
        self.store.r.srem(INFLIGHT, self.job_id)
        self.store.r.delete(lock_key(self.job_id))


def inflight(store: JobStore) -> list[str]:
    return sorted(m.decode() for m in cast(set[bytes], store.r.smembers(INFLIGHT)))


def record(store: JobStore, job_id: str) -> None:
    store.r.sadd(INFLIGHT, job_id)


def describe(reply: Reply) -> str:
    """A reply for the operator's log: its status and the start of its body."""
    return f"HTTP {reply.status} {reply.body[:200].decode(errors='replace')!r}"
