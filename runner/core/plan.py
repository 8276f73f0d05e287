"""Running a CI file's jobs: the scheduler picks, the lifecycle runs, a format interprets.

A ``Plan`` is what a format (GitLab pipeline, GitHub workflow) says about its jobs; this
module is the only place that joins it to the scheduler and the lifecycle, so both formats
share one way of running, prefixing output and reporting.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Protocol, TypeVar

from kata_ci.errors import UserError
from kata_ci.executors.provider import VMProvider
from kata_ci.runner.core.command import Cancel
from kata_ci.runner.core.lifecycle import run_job
from kata_ci.runner.core.outcome import Outcome
from kata_ci.runner.core.schedule import JobResult, Named, run_dag
from kata_ci.runner.core.sinks import PrefixedOutput, note
from kata_ci.runner.core.spec import JobSpec

J = TypeVar("J", bound=Named)


class Plan(Protocol[J]):
    @property
    def jobs(self) -> Sequence[J]: ...

    def after(self, job: J) -> list[str]:
        """Names of the jobs that must have ended before this one is decided."""

    def decide(self, job: J, results: Mapping[str, JobResult]) -> JobResult | None:
        """None: run it; else its result without a VM (skipped, manual, cancelled)."""

    def spec(self, job: J) -> JobSpec:
        """The job as the lifecycle runs it; UserError if it cannot be built."""

    def result(self, job: J, outcome: Outcome, took: float) -> JobResult:
        """The job's recorded result from its outcome (allowed failures, outputs)."""

    def group(self, job: J) -> str:
        """Its stage or workflow, for the summary."""


def run_plan(plan: Plan[J], provider: VMProvider, output: PrefixedOutput, parallel: int,
             cancel: Cancel) -> list[JobResult]:
    def run(job: J) -> JobResult:
        started = time.monotonic()
        sink = output.sink(job.name)
        try:
            try:
                spec = plan.spec(job)
            except UserError as exc:
                note(sink, str(exc))
                outcome = Outcome.job_failure(str(exc))
            else:
                outcome = run_job(spec, provider, sink, cancel)
        finally:
            output.flush(job.name)
        return plan.result(job, outcome, time.monotonic() - started)

    return run_dag(plan.jobs, plan.after, plan.decide, run, parallel, cancel,
                   getattr(plan, "expand", None))
