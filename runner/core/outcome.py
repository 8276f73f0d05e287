"""How a job ended, in one vocabulary: the CLI summary, the job store and the exit status all
speak it.

An ``Outcome`` is what the lifecycle returns: one of five kinds, classed once where the job
ended (GitLab's script_failure vs runner_system_failure; timeout and cancel on their own). A
``JobStatus`` is what a job source records and shows: an outcome, plus the states that only a
scheduler knows (skipped, manual) and the allowed failure (warning).
"""

from __future__ import annotations

import enum
import signal
from dataclasses import dataclass

from kata_ci.errors import SystemFailure
from kata_ci.executors.agent_client import Exit

EXIT_TIMEOUT = 124  # as timeout(1)
EXIT_SYSTEM_FAILURE = 125  # as docker run: the sandbox failed, not the command
EXIT_CANCELLED = 130  # as a shell after SIGINT


class OutcomeKind(enum.Enum):
    SUCCESS = "success"
    JOB_FAILURE = "job_failure"
    SYSTEM_FAILURE = "system_failure"
    TIMEOUT = "timeout"
    CANCELLED = "cancelled"


@dataclass(frozen=True)
class Outcome:
    kind: OutcomeKind
    exit_code: int  # what `kata-ci run` exits with
    message: str = ""
    diagnostics: str = ""
    reason: str = ""  # a finer class of system failure for GitLab: image_pull_failure

    @classmethod
    def from_exit(cls, ex: Exit) -> Outcome:
        if ex.exit_code == 0:
            return cls(OutcomeKind.SUCCESS, 0)
        if ex.signal:
            name = _signame(ex.signal)
            return cls(OutcomeKind.JOB_FAILURE, ex.exit_code, f"command killed by {name}")
        text = ex.error or f"command exited with status {ex.exit_code}"
        return cls(OutcomeKind.JOB_FAILURE, ex.exit_code, text)

    @classmethod
    def system_failure(cls, failure: SystemFailure) -> Outcome:
        return cls(OutcomeKind.SYSTEM_FAILURE, EXIT_SYSTEM_FAILURE, str(failure.args[0]),
                   failure.diagnostics, getattr(failure, "reason", ""))

    @classmethod
    def job_failure(cls, message: str, exit_code: int = 1) -> Outcome:
        return cls(OutcomeKind.JOB_FAILURE, exit_code, message)

    @classmethod
    def cancelled(cls, message: str = "job cancelled") -> Outcome:
        return cls(OutcomeKind.CANCELLED, EXIT_CANCELLED, message)

    @classmethod
    def timeout(cls, seconds: float) -> Outcome:
        return cls(OutcomeKind.TIMEOUT, EXIT_TIMEOUT, f"job timed out after {seconds:g}s")

    @property
    def ran_to_end(self) -> bool:
        """The job's own code decided the ending: the VM may be stopped gracefully."""
        return self.kind in (OutcomeKind.SUCCESS, OutcomeKind.JOB_FAILURE)


def _signame(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


class JobStatus(enum.Enum):
    """A job's recorded state. ``value`` is stored (Redis) and matched; ``label`` is shown."""

    QUEUED = "queued"
    RUNNING = "running"
    SUCCESS = "success"
    FAILED = "failed"
    WARNING = "warning"  # failed, but allowed to (allow_failure, continue-on-error)
    TIMEOUT = "timeout"
    CANCELLED = "cancelled"
    SYSTEM_FAILURE = "system_failure"
    SKIPPED = "skipped"
    MANUAL = "manual"

    @property
    def label(self) -> str:
        return self.value.replace("_", " ")

    @property
    def ok(self) -> bool:
        """Counts as passed for what comes after it and for the run's exit status."""
        return self in (JobStatus.SUCCESS, JobStatus.WARNING, JobStatus.SKIPPED,
                        JobStatus.MANUAL)

    @property
    def final(self) -> bool:
        return self not in (JobStatus.QUEUED, JobStatus.RUNNING)

    @classmethod
    def of(cls, outcome: Outcome, allowed_failure: bool = False) -> JobStatus:
        """The one mapping from an outcome to a status. ``allowed_failure``: a failed or
        timed-out job that its file allows to fail is a warning."""
        if outcome.kind in (OutcomeKind.JOB_FAILURE, OutcomeKind.TIMEOUT) and allowed_failure:
            return cls.WARNING
        return _STATUS[outcome.kind]


_STATUS = {OutcomeKind.SUCCESS: JobStatus.SUCCESS, OutcomeKind.JOB_FAILURE: JobStatus.FAILED,
           OutcomeKind.TIMEOUT: JobStatus.TIMEOUT, OutcomeKind.CANCELLED: JobStatus.CANCELLED,
           OutcomeKind.SYSTEM_FAILURE: JobStatus.SYSTEM_FAILURE}
FINAL = tuple(s.value for s in JobStatus if s.final and s not in (
    JobStatus.WARNING, JobStatus.SKIPPED, JobStatus.MANUAL))  # what a queued job can end as


def exit_status(status: JobStatus, exit_code: int | None) -> int:
    """What `kata-ci run`/`submit` exit with for one job: the command's own status when it
    failed, else 0 or the documented code of the ending."""
    if status is JobStatus.FAILED:
        return exit_code if exit_code else 1
    return {JobStatus.TIMEOUT: EXIT_TIMEOUT, JobStatus.CANCELLED: EXIT_CANCELLED,
            JobStatus.SYSTEM_FAILURE: EXIT_SYSTEM_FAILURE}.get(status, 0)
