"""The reconcile loop: what GitHub says against what kata-ci has, every reconcile_interval.

Webhooks get lost (GitHub does not redeliver; its own docs and every peer say so), workers
die, and a runner made for job A may take job B. So, per scope and label set: queued jobs
(REST) minus demand units still waiting for a job = runners to ask for now (within
max_runners). And runners: kata-ci's own (by name prefix) that GitHub lists but no live
kata-ci job holds are deregistered once offline, never while busy; records of runners whose
kata-ci job ended without cleaning up are closed. Only one `github serve` reconciles at a
time (a Redis lock); everything it needs is in Redis, so a restart loses nothing.
"""

from __future__ import annotations

import itertools
import logging
import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from kata_ci.runner.core.config import Config
from kata_ci.runner.github_runner.api import GitHubAPI
from kata_ci.runner.github_runner.state import (
    LIVE_KATA_STATES,
    GitHubState,
    Send,
    create_demand,
)
from kata_ci.runner.ops.metrics import RECONCILE_ACTIONS
from kata_ci.runner.queue.store import JobStore

log = logging.getLogger("kata_ci.github.reconcile")
LOCK = "kataci:gh:reconcile-lock"
MAX_ORG_REPOS = 100


@dataclass
class Report:
    queued: dict[str, int] = field(default_factory=dict)  # "scope|set" -> queued jobs
    created: list[str] = field(default_factory=list)  # kata job ids of new demand
    deleted: list[str] = field(default_factory=list)  # runner names deregistered
    closed: list[str] = field(default_factory=list)  # runner records closed
    skipped: bool = False  # another instance holds the lock


class Reconciler:
    def __init__(self, config: Config, store: JobStore, state: GitHubState, send: Send,
                 api: GitHubAPI) -> None:
        self.config, self.store, self.state, self.send, self.api = config, store, state, \
            send, api
        self.gh = config.github

    def once(self) -> Report:
        report = Report()
        ttl = max(5, int(self.gh.reconcile_interval))
        if not self.state.r.set(LOCK, b"1", nx=True, ex=ttl):
            report.skipped = True
            return report
        try:
            self._demand(report)
            self._runners(report)
        finally:
            self.state.r.delete(LOCK)
        return report

    def _repos(self) -> list[str]:
        if self.gh.repositories:
            return list(self.gh.repositories)
        org = self.api.gh.get_organization(self.gh.org)
        return [r.full_name for r in itertools.islice(org.get_repos(), MAX_ORG_REPOS)]

    def _demand(self, report: Report) -> None:
        counts: Counter[tuple[str, str]] = Counter()
        for repo in self._repos():
            for job in self.api.queued_jobs(repo):
                label_set = self.gh.label_set_for(job.labels)
                if label_set is None:
                    continue
                scope = self.gh.scope_of(repo)
                counts[(scope, label_set.key)] += 1
                if not self.state.job(job.id):
                    self.state.record_job(job.id, {
                        "repo": repo, "name": job.name, "workflow": job.workflow,
                        "labels": job.labels, "status": "queued", "label_set": label_set.key,
                        "scope": scope, "seen_by": "reconcile"})
                self.state.claim_demand(job.id)  # a late webhook for it asks for no more
        for (scope, set_key), queued in sorted(counts.items()):
            report.queued[f"{scope}|{set_key}"] = queued
            label_set = self.gh.label_set(set_key)
            assert label_set is not None
            missing = queued - len(self.state.pending(self.store, scope, set_key))
            for _ in range(max(0, missing)):
                created = create_demand(self.store, self.state, self.send, self.gh, label_set,
                                        scope, "reconcile", self.config.queue.max_job_timeout)
                if created is None:
                    break
                report.created.append(created)
            if missing > 0:
                log.info("%s %s: %d queued, %d runners asked for now", scope, set_key, queued,
                         len(report.created))

    def _live(self, record: dict[str, str]) -> bool:
        kata_id = record.get("kata_job", "")
        state = self.store.r.hget(f"kataci:job:{kata_id}", "state") if kata_id else None
        return isinstance(state, bytes) and state.decode() in LIVE_KATA_STATES

    def _runners(self, report: Report) -> None:
        for record in self.state.live_runners():
            if not self._live(record):  # its worker died with the VM: close the record
                name, scope = record.get("name", ""), record.get("scope", "")
                runner_id = record.get("id", "")
                gone = True
                if runner_id.isdigit():
                    gone = self.api.delete_runner(scope, int(runner_id))
                if gone:
                    self.state.runner_done(name, deregistered=1, closed_by="reconcile")
                    report.closed.append(name)
        for scope in self.gh.scopes():
            for runner in self.api.runners(scope, self.gh.name_prefix):
                record = self.state.runner(runner.name)
                if runner.busy:
                    if record:
                        self.state.mark_busy(runner.name, record.get("github_job", ""))
                    continue  # never a busy one
                if record and record.get("state") != "done" and self._live(record):
                    continue
                if runner.status == "offline" and self.api.delete_runner(scope, runner.id):
                    log.info("deregistered orphaned runner %s (%s)", runner.name, scope)
                    report.deleted.append(runner.name)


def loop(reconciler: Reconciler, stop: threading.Event,
         on_error: Callable[[Exception], None]) -> None:
    """Reconcile at once, then every interval, until ``stop``."""
    while True:
        try:
            report = reconciler.once()
            count(report)
            if report.created or report.deleted or report.closed:
                log.info("reconcile: %d runners asked for, %d deregistered, %d closed",
                         len(report.created), len(report.deleted), len(report.closed))
        except Exception as exc:  # GitHub or Redis away, or a bug: try next round
            RECONCILE_ACTIONS.labels("failed").inc()
            on_error(exc)
        if stop.wait(reconciler.gh.reconcile_interval):
            return


def count(report: Report) -> None:
    """A round's actions as metrics (ops/metrics.py)."""
    if report.skipped:
        RECONCILE_ACTIONS.labels("skipped").inc()
    for action, done in (("requested", report.created), ("deregistered", report.deleted),
                         ("closed", report.closed)):
        if done:
            RECONCILE_ACTIONS.labels(action).inc(len(done))
