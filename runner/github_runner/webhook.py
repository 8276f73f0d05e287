"""``workflow_job`` webhooks: verified before anything reads them, handled in milliseconds.

GitHub gives a delivery 10 s and never redelivers on its own, so the handler only records
and enqueues: a ``queued`` job that a label set serves becomes one unit of demand (state.py);
``in_progress`` and ``completed`` update the job's record and the runner that took it.
Order of checks, each failing closed: body size (413) before reading it, HMAC-SHA256 over
the raw body compared in constant time (401) before parsing it, the delivery guid (a
replayed or redelivered guid is answered 200 and changes nothing), then the payload's shape
(400). Nothing in a payload is executed or used as a path; names are only stored and shown.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from kata_ci.runner.github_runner.settings import REPO, GitHubConfig
from kata_ci.runner.github_runner.state import GitHubState, Send, create_demand
from kata_ci.runner.queue.store import JobStore

log = logging.getLogger("kata_ci.github.webhook")
GUID = re.compile(r"[0-9A-Za-z-]{1,64}")
ACTIONS = ("queued", "in_progress", "completed", "waiting")
MAX_LABELS, MAX_TEXT = 100, 512


@dataclass(frozen=True)
class Answer:
    status: int
    message: str
    verdict: str = "error"  # for metrics: one of ops.metrics.VERDICTS


@dataclass(frozen=True)
class WorkflowJob:
    action: str
    id: int
    run_id: int
    repo: str
    labels: list[str]
    name: str
    workflow: str
    runner_name: str
    conclusion: str


def signature_ok(secret: bytes, body: bytes, header: str | None) -> bool:
    """GitHub's X-Hub-Signature-256: ``sha256=`` + hex HMAC-SHA256 of the raw body."""
    if not header or not header.startswith("sha256="):
        return False  # missing, or another algorithm (the legacy sha1 header alone)
    expected = "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest()
    return hmac.compare_digest(expected.encode(), header.strip().encode(errors="replace"))


def parse(body: bytes) -> WorkflowJob:
    """The fields kata-ci uses, checked; ValueError says what is wrong."""
    try:
        payload = json.loads(body)
    except RecursionError:  # a ValueError of its own, not a crash of the handler
        raise ValueError("the payload nests too deeply") from None
    if not isinstance(payload, dict):
        raise ValueError("the payload is not a JSON object")
    action, job, repo = payload.get("action"), payload.get("workflow_job"), \
        payload.get("repository")
    if action not in ACTIONS:
        raise ValueError(f"unknown action {str(action)[:40]!r}")
    if not isinstance(job, dict) or not isinstance(repo, dict):
        raise ValueError("workflow_job or repository missing")
    full_name = repo.get("full_name")
    if not isinstance(full_name, str) or not REPO.fullmatch(full_name):
        raise ValueError("repository.full_name is not owner/name")
    labels = job.get("labels")
    if not isinstance(labels, list) or len(labels) > MAX_LABELS or not all(
            isinstance(lbl, str) and 0 < len(lbl) <= 256 for lbl in labels):
        raise ValueError("workflow_job.labels is not a list of labels")
    for key in ("id", "run_id"):
        if not isinstance(job.get(key), int) or isinstance(job.get(key), bool):
            raise ValueError(f"workflow_job.{key} is not an integer")
    return WorkflowJob(action, job["id"], job["run_id"], full_name, labels,
                       _text(job.get("name")), _text(job.get("workflow_name")),
                       _text(job.get("runner_name")), _text(job.get("conclusion")))


def _text(value: object) -> str:
    return value[:MAX_TEXT] if isinstance(value, str) else ""


class Webhooks:
    """The endpoint's logic, apart from HTTP (``server.py`` serves it)."""

    def __init__(self, config: GitHubConfig, secret: bytes, store: JobStore,
                 state: GitHubState, send: Send, max_timeout: float) -> None:
        self.config = config
        self.secret = secret
        self.store = store
        self.state = state
        self.send = send
        self.max_timeout = max_timeout

    @property
    def max_body(self) -> int:
        return self.config.max_body_kib * 1024

    def handle(self, headers: Mapping[str, str], body: bytes) -> Answer:
        """One delivery, whole body read (the server has checked its size)."""
        if not signature_ok(self.secret, body, headers.get("x-hub-signature-256")):
            log.warning("webhook refused: bad or missing X-Hub-Signature-256")
            return Answer(401, "bad signature", "bad_signature")
        event = headers.get("x-github-event", "")
        if event == "ping":
            return Answer(200, "pong", "ping")
        if event != "workflow_job":
            return Answer(202, f"event {event[:40]!r} ignored", "ignored_event")
        guid = headers.get("x-github-delivery", "")
        if not GUID.fullmatch(guid):
            return Answer(400, "missing or malformed X-GitHub-Delivery", "malformed")
        try:
            job = parse(body)
        except ValueError as exc:  # signed by GitHub, yet not what we know: say it, keep none
            log.warning("webhook %s refused: %s", guid, exc)
            return Answer(400, f"unreadable workflow_job payload: {exc}", "malformed")
        if not self.state.first_delivery(guid):
            return Answer(200, "duplicate delivery: already handled", "duplicate")
        try:
            return self._act(job)
        except Exception:
            self.state.forget_delivery(guid)  # its redelivery must be handled
            raise

    def _act(self, job: WorkflowJob) -> Answer:
        if not self.config.serves_repo(job.repo):
            return Answer(202, f"repository {job.repo} is not served here", "ignored_repo")
        label_set = self.config.label_set_for(job.labels)
        known = bool(self.state.job(job.id))
        if label_set is None and not known:
            return Answer(202, f"no label set serves {job.labels}", "ignored_label")
        record: dict[str, Any] = {"repo": job.repo, "run_id": str(job.run_id),
                                  "name": job.name, "workflow": job.workflow,
                                  "labels": job.labels, "status": job.action}
        if label_set is not None:
            record.update(label_set=label_set.key, scope=self.config.scope_of(job.repo))
        if job.runner_name:
            record["runner_name"] = job.runner_name
        if job.conclusion:
            record["conclusion"] = job.conclusion
        self.state.record_job(job.id, record)
        if job.action == "queued" and label_set is not None:
            return self._queued(job, label_set.key)
        if job.action in ("in_progress", "completed") and job.runner_name.startswith(
                self.config.name_prefix):
            self.state.mark_busy(job.runner_name, job.id)
        if job.action == "completed" and not job.runner_name:
            self._unneeded(job)
        return Answer(200, f"job {job.id} {job.action}", "updated")

    def _queued(self, job: WorkflowJob, set_key: str) -> Answer:
        label_set = self.config.label_set(set_key)
        assert label_set is not None
        if not self.state.claim_demand(job.id):
            return Answer(200, f"job {job.id}: a runner was already asked for",
                          "already_requested")
        created = create_demand(self.store, self.state, self.send, self.config, label_set,
                                self.config.scope_of(job.repo), f"webhook: job {job.id}",
                                self.max_timeout)
        if created is None:
            log.info("job %s (%s): label set %s is at max_runners; reconcile asks later",
                     job.id, job.repo, set_key)
            self.state.release_demand(job.id)
            return Answer(202, f"job {job.id}: at max_runners, queued for reconcile",
                          "deferred")
        self.state.record_job(job.id, {"kata_job": created})
        log.info("job %s (%s %s/%s) queued: runner demand %s on label %s", job.id, job.repo,
                 job.workflow, job.name, created, label_set.label)
        return Answer(201, f"job {job.id}: runner requested ({created})", "accepted")

    def _unneeded(self, job: WorkflowJob) -> None:
        """A job that ended without ever getting a runner (cancelled while queued): one
        demand unit of its set still waiting is no longer needed."""
        found = self.state.job(job.id)
        scope, set_key = found.get("scope", ""), found.get("label_set", "")
        for kata_id in self.state.pending(self.store, scope, set_key):
            if self.store.get(kata_id).state == "queued":
                self.store.request_cancel(kata_id)
                self.state.drop_pending(scope, set_key, kata_id)
                log.info("job %s ended unassigned: demand %s withdrawn", job.id, kata_id)
                return
