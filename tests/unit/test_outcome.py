"""Every ending is classed once: job success/failure, signal death, system failure."""

from __future__ import annotations

import pytest

from kata_ci.errors import SystemFailure, UserError
from kata_ci.executors.agent_client import Exit
from kata_ci.runner.core.env import job_env, parse_env
from kata_ci.runner.core.outcome import EXIT_SYSTEM_FAILURE, Outcome, OutcomeKind


@pytest.mark.parametrize(("ex", "kind", "code"), [
    (Exit(0), OutcomeKind.SUCCESS, 0),
    (Exit(1), OutcomeKind.JOB_FAILURE, 1),
    (Exit(42), OutcomeKind.JOB_FAILURE, 42),
    (Exit(137, signal=9), OutcomeKind.JOB_FAILURE, 137),
])
def test_exit_statuses_map_to_outcomes(ex: Exit, kind: OutcomeKind, code: int) -> None:
    """The command's status is the job's status; a signal death is 128+N as in a shell."""
    outcome = Outcome.from_exit(ex)
    assert (outcome.kind, outcome.exit_code) == (kind, code)


def test_signal_death_is_named() -> None:
    """A job killed by a signal says which, not just a number."""
    assert Outcome.from_exit(Exit(137, signal=9)).message == "command killed by SIGKILL"


def test_system_failure_keeps_diagnostics() -> None:
    """A system failure exits 125 and carries the console tail for the report."""
    outcome = Outcome.system_failure(SystemFailure("VM died", "kernel panic"))
    assert outcome.kind is OutcomeKind.SYSTEM_FAILURE and outcome.exit_code == EXIT_SYSTEM_FAILURE
    assert outcome.message == "VM died" and outcome.diagnostics == "kernel panic"


def test_env_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    """--env K=V sets; --env K passes the host value; malformed names are refused."""
    monkeypatch.setenv("FROM_HOST", "yes")
    assert parse_env(["A=1", "B=x=y", "FROM_HOST"]) == {"A": "1", "B": "x=y", "FROM_HOST": "yes"}
    for bad in ("=1", "1A=2", "A-B=3"):
        with pytest.raises(UserError):
            parse_env([bad])
    monkeypatch.delenv("NOT_SET_ANYWHERE", raising=False)
    with pytest.raises(UserError, match="not set on the host"):
        parse_env(["NOT_SET_ANYWHERE"])


def test_host_environment_does_not_leak(monkeypatch: pytest.MonkeyPatch) -> None:
    """The job sees a fixed base environment plus what was asked for, not the host's."""
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "hunter2")
    env = job_env({"X": "1"})
    assert "AWS_SECRET_ACCESS_KEY" not in env
    assert env["X"] == "1" and env["CI"] == "true" and env["HOME"] == "/root"
