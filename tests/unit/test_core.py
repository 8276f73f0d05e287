"""The shared job core: one state vocabulary, one timeout rule, one scheduler, one env."""

from __future__ import annotations

import threading
from dataclasses import dataclass

import pytest

from kata_ci.runner.core.command import Cancel
from kata_ci.runner.core.env import GUEST_PATH, job_env
from kata_ci.runner.core.outcome import (
    EXIT_CANCELLED,
    EXIT_SYSTEM_FAILURE,
    EXIT_TIMEOUT,
    FINAL,
    JobStatus,
    Outcome,
    OutcomeKind,
    exit_status,
)
from kata_ci.runner.core.schedule import JobResult, run_dag, with_needs
from kata_ci.runner.core.spec import RunSettings


@dataclass
class Job:
    name: str
    needs: tuple[str, ...] = ()


def test_one_spelling_per_state() -> None:
    """A system failure is stored as `system_failure` and shown as `system failure`, for
    the job store, the summary and the exit status alike."""
    status = JobStatus.of(Outcome(OutcomeKind.SYSTEM_FAILURE, EXIT_SYSTEM_FAILURE))
    assert status.value == "system_failure" and status.label == "system failure"
    assert set(FINAL) == {"success", "failed", "timeout", "cancelled", "system_failure"}
    assert exit_status(status, None) == EXIT_SYSTEM_FAILURE
    assert exit_status(JobStatus.FAILED, 42) == 42
    assert exit_status(JobStatus.TIMEOUT, None) == EXIT_TIMEOUT
    assert exit_status(JobStatus.CANCELLED, None) == EXIT_CANCELLED


def test_allowed_failure_is_a_warning_but_system_failure_never_is() -> None:
    """allow_failure / continue-on-error turn a failure or timeout into a warning; a
    system failure or a cancel stays what it is."""
    assert JobStatus.of(Outcome.job_failure("x"), allowed_failure=True) is JobStatus.WARNING
    assert JobStatus.of(Outcome.timeout(3), allowed_failure=True) is JobStatus.WARNING
    assert JobStatus.of(Outcome(OutcomeKind.SYSTEM_FAILURE, 125), True) \
        is JobStatus.SYSTEM_FAILURE
    assert JobStatus.of(Outcome.cancelled(), True) is JobStatus.CANCELLED


@pytest.mark.parametrize(("flag", "own", "expected"), [
    (False, None, 600.0), (False, 30.0, 30.0), (True, 30.0, 600.0), (True, None, 600.0)])
def test_job_timeout_precedence(flag: bool, own: float | None, expected: float) -> None:
    """A CI file's own job timeout beats the config's; an explicit --timeout beats both."""
    assert RunSettings(timeout=600.0, timeout_flag=flag).job_timeout(own) == expected


def test_env_builder_layers_term_and_path() -> None:
    """Defaults, then TERM only when given, then layers (later wins), PATH prepends first."""
    env = job_env({"A": "1", "B": "file"}, {"B": "flag"}, term="xterm", path_prepend=["/x"])
    assert env["A"] == "1" and env["B"] == "flag" and env["TERM"] == "xterm"
    assert env["PATH"] == f"/x:{GUEST_PATH}"
    assert "TERM" not in job_env({})


def test_with_needs_follows_needs_transitively_in_file_order() -> None:
    """Naming a job selects what it needs, and what those need; --only selects just it."""
    jobs = [Job("a"), Job("b", ("a",)), Job("c", ("b",)), Job("d")]
    by_name = {j.name: j for j in jobs}

    def needs(job: Job) -> list[Job]:
        return [by_name[n] for n in job.needs]

    assert [j.name for j in with_needs(jobs, [by_name["c"]], needs, only=False)] == \
        ["a", "b", "c"]
    assert [j.name for j in with_needs(jobs, [by_name["c"]], needs, only=True)] == ["c"]


def test_cancel_settles_waiting_jobs_and_lets_running_ones_see_it() -> None:
    """With one slot, a cancel while the first job runs ends it (it sees the cancel) and
    settles every job that has not started as cancelled, without running it."""
    cancel = Cancel()
    started = threading.Event()
    ran: list[str] = []

    def run(job: Job) -> JobResult:
        ran.append(job.name)
        started.set()
        while not cancel.is_set():
            threading.Event().wait(0.01)
        return JobResult(job.name, JobStatus.CANCELLED)

    def cancel_once_started() -> None:
        started.wait(5)
        cancel.set()

    threading.Thread(target=cancel_once_started, daemon=True).start()
    results = run_dag([Job("a"), Job("b"), Job("c", ("a",))], lambda j: j.needs,
                      lambda j, r: None, run, 1, cancel)
    assert ran == ["a"]
    assert [r.status for r in results] == [JobStatus.CANCELLED] * 3


def test_cancel_polls_its_source_at_most_every_interval() -> None:
    """A Redis-backed cancel is asked at most once per interval, and stays set once seen."""
    asked: list[int] = []

    def poll() -> bool:
        asked.append(1)
        return len(asked) >= 2

    cancel = Cancel(poll, interval=3600)
    assert not cancel.is_set() and not cancel.is_set()
    assert len(asked) == 1
    cancel = Cancel(poll, interval=0)
    assert cancel.is_set() and cancel.is_set()
