"""`kata-ci gitlab run`: take jobs from GitLab when, and only when, a worker can run them.

One loop per configured runner (an instance, group or project runner) asks
``POST /jobs/request`` (a long poll; ``X-GitLab-Last-Update`` echoed back) only while the
workers serving its label have a free slot (their announcements in Redis, minus what waits
in the label's Celery queue), so a job is never taken from GitLab just to wait here. A 201 is
committed at once (``PUT state=running``: the two-phase commit; 409 = another runner has it,
dropped), checked (a payload kata-ci cannot read is failed towards GitLab right away, never
left running), stored as a queued job with its payload, and sent through the Celery queue
like any other job. A Follower (follow.py) then carries its trace and ending to GitLab.

Runner tokens with an expiry are reset at 75 % of their lifetime, as gitlab-runner does,
and the new token is written back to the config file.
"""

from __future__ import annotations

import datetime
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx

from kata_ci.errors import KataCIError, UserError
from kata_ci.runner.core import config as config_mod
from kata_ci.runner.core.config import Config
from kata_ci.runner.gitlab_runner import settings
from kata_ci.runner.gitlab_runner.api import GitLabAPI
from kata_ci.runner.gitlab_runner.follow import Follower, describe, inflight, record, try_lock
from kata_ci.runner.gitlab_runner.payload import parse_job
from kata_ci.runner.gitlab_runner.settings import GitLabRunner
from kata_ci.runner.ops.metrics import GITLAB_JOBS_TAKEN
from kata_ci.runner.queue import capacity
from kata_ci.runner.queue.app import queue_name
from kata_ci.runner.queue.store import JobStore

log = logging.getLogger("kata_ci.gitlab")
Send = Callable[[str, str], None]  # (job id, label): the Celery message


def parse_time(text: object) -> float:
    """GitLab's ISO 8601 times (``2021-09-27T21:05:03.203Z``) as epoch seconds; 0 if none."""
    if not isinstance(text, str) or not text:
        return 0.0
    try:
        return datetime.datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return 0.0


class Poller:
    def __init__(self, config: Config, config_path: Path | None, store: JobStore, send: Send,
                 check_interval: float = 3.0) -> None:
        if not config.gitlab.runners:
            raise UserError("no GitLab runner is configured: `kata-ci gitlab register` first")
        self.config = config
        self.config_path = config_path
        self.store = store
        self.send = send
        self.check_interval = check_interval
        self.stop = threading.Event()
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.followers: dict[str, Follower] = {}
        self.lock = threading.Lock()

    def run(self) -> None:
        """Until ``stop`` is set: one thread per runner, and the adoption of jobs in flight
        that nobody follows (this poller's before a restart, or a dead poller's)."""
        threads = [threading.Thread(target=self._loop, args=(runner,), daemon=True,
                                    name=f"kata-ci-gitlab-{i}")
                   for i, runner in enumerate(self.config.gitlab.runners)]
        for thread in threads:
            thread.start()
        while not self.stop.is_set():
            self.adopt()
            self.stop.wait(2.0)
        for thread in threads:
            thread.join(timeout=5)

    def adopt(self) -> None:
        with self.lock:  # finished followers go: a poller runs for months
            for job_id in [j for j, f in self.followers.items() if not f.is_alive()]:
                del self.followers[job_id]
        for job_id in inflight(self.store):
            with self.lock:
                follower = self.followers.get(job_id)
                if follower is not None and follower.is_alive():
                    continue
                if try_lock(self.store, job_id, self.owner):
                    self._follow(job_id)

    def _follow(self, job_id: str) -> None:
        follower = Follower(self.store, job_id, self.owner, self.stop)
        self.followers[job_id] = follower
        follower.start()

    # -- one runner -------------------------------------------------------------------------
    def _loop(self, runner: GitLabRunner) -> None:
        api = GitLabAPI(runner.url, timeout=30.0, verify=runner.tls_ca_file or True)
        last_update, failures = "", 0
        try:
            while not self.stop.is_set():
                try:
                    runner, last_update, failures = self._once(api, runner, last_update,
                                                               failures)
                except Exception:  # Redis away, a bug of ours: this runner keeps polling
                    log.exception("%s: polling failed; trying again", runner.shown)
                    self.stop.wait(5.0)
        finally:
            api.close()

    def _once(self, api: GitLabAPI, runner: GitLabRunner, last_update: str,
              failures: int) -> tuple[GitLabRunner, str, int]:
        """One turn of a runner's loop: (runner, last_update, failures) for the next."""
        runner = self._rotate(api, runner)
        if capacity.free_slots(self.store.r, runner.label,
                               queue_name(runner.label)) <= 0:
            self.stop.wait(0.5)
            return runner, last_update, failures
        started = time.monotonic()
        try:
            reply = api.request_job(runner.token, runner.system_id, last_update)
        except httpx.HTTPError as exc:
            failures += 1
            log.warning("%s: jobs/request failed: %s", runner.shown, exc)
            self.stop.wait(min(60.0, 2.0 ** failures))
            return runner, last_update, failures
        failures = 0
        if reply.status == 201:
            self._take(api, runner, reply.json())
            return runner, last_update, failures
        if reply.status == 204:
            last_update = reply.headers.get("x-gitlab-last-update", last_update)
            if time.monotonic() - started < 1.0:  # no long poll in front of GitLab
                self.stop.wait(self.check_interval)
            return runner, last_update, failures
        level = logging.ERROR if reply.status == 403 else logging.WARNING
        log.log(level, "%s: jobs/request: %s%s", runner.shown, describe(reply),
                " (is the runner token valid?)" if reply.status == 403 else "")
        self.stop.wait(60.0 if reply.status == 403 else self.check_interval)
        if reply.status == 403:  # another poller may have rotated the token: read it again
            runner = self._reread(runner)
        return runner, last_update, failures

    def _reread(self, runner: GitLabRunner) -> GitLabRunner:
        if self.config_path is None:
            return runner
        try:
            fresh = config_mod.load(self.config_path).gitlab.runners
        except KataCIError as exc:
            log.warning("%s: cannot read %s again: %s", runner.shown, self.config_path, exc)
            return runner
        return next((r for r in fresh if (r.url, r.id) == (runner.url, runner.id)), runner)

    def _take(self, api: GitLabAPI, runner: GitLabRunner, payload: Any) -> None:
        job_id = payload.get("id") if isinstance(payload, dict) else None
        token = payload.get("token") if isinstance(payload, dict) else None
        if not isinstance(job_id, int) or not isinstance(token, str):
            log.error("%s: jobs/request gave a job without id or token; ignored", runner.shown)
            return
        try:  # the two-phase commit: ours, or someone else's
            commit = api.update_job(job_id, token, {"state": "running"})
        except httpx.HTTPError as exc:
            log.warning("%s: job %s: could not confirm it (%s); GitLab gives it to another "
                        "runner", runner.shown, job_id, exc)
            return
        if commit.status != 200 or commit.job_status in ("canceling", "canceled", "failed"):
            log.info("%s: job %s dropped: %s%s", runner.shown, job_id, describe(commit),
                     " (another runner has it)" if commit.status == 409 else "")
            return
        try:
            job = parse_job(payload)
        except UserError as exc:
            self._refuse(api, job_id, token, str(exc))
            return
        entry = {"url": runner.url, "runner_id": runner.id, "runner": runner.shown,
                 "ca": runner.tls_ca_file, "payload": payload, "gitlab_id": job_id}
        limit = self.config.queue.max_job_timeout
        try:
            created = self.store.create([job.name], runner.label,
                                        min(job.timeout or limit, limit), None, gitlab=entry)
            record(self.store, created.id)
        except Exception as exc:  # Redis gone after the commit: GitLab must not wait for it
            self._refuse(api, job_id, token, f"the runner could not queue it ({exc})")
            raise
        with self.lock:
            if try_lock(self.store, created.id, self.owner):
                self._follow(created.id)
        try:
            self.send(created.id, runner.label)
        except Exception as exc:  # the broker is gone: the job ends, GitLab is told so
            log.error("job %s: could not be queued: %s", created.id, exc)
            self.store.request_cancel(created.id)
        GITLAB_JOBS_TAKEN.labels(runner.label).inc()  # a configured label: bounded
        log.info("%s: GitLab job %s (%s) is job %s on label %s", runner.shown, job_id,
                 job.name, created.id, runner.label,
                 extra={"job_id": created.id, "source": "gitlab", "label": runner.label})

    def _refuse(self, api: GitLabAPI, job_id: int, token: str, why: str) -> None:
        """A job kata-ci cannot even start: its reason in its trace, failed at once."""
        text = f"kata-ci: cannot run this job: {why}\n".encode()
        try:
            api.patch_trace(job_id, token, 0, text)
            import zlib
            api.update_job(job_id, token, {
                "state": "failed", "failure_reason": "runner_system_failure",
                "output": {"checksum": f"crc32:{zlib.crc32(text) & 0xffffffff:08x}",
                           "bytesize": len(text)}})
        except httpx.HTTPError as exc:
            log.warning("job %s: could not report its failure: %s", job_id, exc)
        log.error("GitLab job %s refused: %s", job_id, why)

    def _rotate(self, api: GitLabAPI, runner: GitLabRunner) -> GitLabRunner:
        due = runner.rotate_at()
        if due is None or time.time() < due or self.config_path is None:
            return runner
        try:
            reply = api.reset_token(runner.token)
            body = reply.json() if reply.status == 201 else None
            if not isinstance(body, dict) or not isinstance(body.get("token"), str):
                raise UserError(f"token reset: {describe(reply)}")
            new = settings.update_token(self.config_path, runner, body["token"], time.time(),
                                        parse_time(body.get("token_expires_at")))
        except (httpx.HTTPError, KataCIError) as exc:
            log.warning("%s: token rotation failed (%s); trying again in a minute",
                        runner.shown, exc)
            return replace(runner, token_obtained_at=runner.token_obtained_at + 60)
        log.info("%s: runner token rotated", runner.shown)
        return new
