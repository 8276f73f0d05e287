"""GitHub workflow loading and job logic, each case from GitHub's workflow-syntax docs."""

from __future__ import annotations

from pathlib import Path

import pytest

from kata_ci.runner.core.command import Cancel
from kata_ci.runner.core.outcome import JobStatus
from kata_ci.runner.core.schedule import JobResult
from kata_ci.runner.github.jobs import schedule as run_workflow_jobs
from kata_ci.runner.github.jobs import select as select_gh
from kata_ci.runner.github.steps import RunContext, parse_env_file
from kata_ci.runner.github.steps import condition as _condition
from kata_ci.runner.github.workflow import GHJob, WorkflowError, expand_matrix, load_workflow

FIXTURES = Path(__file__).resolve().parents[3] / "shared" / "fixtures" / "workflows"


def workflow(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "ci.yml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("name", sorted(p.name for p in FIXTURES.glob("*.yml")))
def test_shared_fixture_workflows_load(name: str) -> None:
    """The real starter workflows and a project's workflow load with their events and jobs."""
    wf = load_workflow(FIXTURES / name)
    assert wf.jobs and wf.events


def test_matrix_include_exclude_as_documented() -> None:
    """"Expanding or adding matrix configurations": exclude removes matching combinations;
    include extends every combination it does not contradict, else adds a new one. The
    CMake starter yields exactly its three documented builds."""
    wf = load_workflow(FIXTURES / "starter-cmake-multi-platform.yml")
    assert [j.name for j in wf.jobs] == [
        "build (ubuntu-latest, Release, gcc, g++)",
        "build (ubuntu-latest, Release, clang, clang++)",
        "build (windows-latest, Release, cl, cl)"]
    assert expand_matrix({"fruit": ["apple", "pear"], "animal": ["cat"],
                          "include": [{"color": "green"}, {"fruit": "apple", "shape": "circle"},
                                      {"fruit": "banana"}]}, "w") == [
        {"fruit": "apple", "animal": "cat", "color": "green", "shape": "circle"},
        {"fruit": "pear", "animal": "cat", "color": "green"},
        {"fruit": "banana"}]


def test_on_key_and_event_forms(tmp_path: Path) -> None:
    """`on:` may be a string, a list or a mapping (YAML reads the bare key as true)."""
    for on, events in (("push", ["push"]), ("[push, pull_request]", ["push", "pull_request"]),
                       ("{workflow_dispatch: {}, push: {branches: [main]}}",
                        ["workflow_dispatch", "push"])):
        wf = load_workflow(workflow(tmp_path, f"on: {on}\njobs: {{a: {{steps: [{{run: x}}]}}}}\n"))
        assert wf.events == events


@pytest.mark.parametrize(("text", "message"), [
    ("on: push\njobs: {a: {stepz: []}}\n", r"ci\.yml:2: job 'a' has unknown keys: stepz"),
    ("on: push\njobs: {a: {steps: [{run: x, usez: y}]}}\n", "step 1 has unknown keys: usez"),
    ("on: push\njobs: {a: {steps: [{run: x, uses: y}]}}\n", "exactly one of run and uses"),
    ("on: push\njobs: {a: {needs: b, steps: [{run: x}]}}\n", "needs 'b', which is not a job"),
    ("on: push\njobs: {a: {needs: b, steps: [{run: x}]}, b: {needs: a, steps: [{run: x}]}}\n",
     "needs form a cycle"),
    ("on: push\njobs: {a: {if: \"github.ref ==\", steps: [{run: x}]}}\n",
     "cannot parse expression"),
    ("on: push\njobs: {a: {steps: [{run: x}]}\n", "invalid YAML"),
])
def test_bad_workflows_name_file_job_and_problem(tmp_path: Path, text: str, message: str) -> None:
    """Unknown keys, bad steps, bad needs and unparsable expressions fail before any VM."""
    with pytest.raises(WorkflowError, match=message):
        load_workflow(workflow(tmp_path, text))


def test_env_file_format() -> None:
    """$GITHUB_ENV / $GITHUB_OUTPUT: NAME=value lines and NAME<<DELIM multiline blocks."""
    assert parse_env_file("A=1\nJSON<<EOF\n{\n  \"k\": 1\n}\nEOF\nB=x=y\n") == {
        "A": "1", "JSON": '{\n  "k": 1\n}', "B": "x=y"}


def test_if_defaults_to_success() -> None:
    """A step or job `if` without a status function means `success() && (if)`."""
    statuses = {"success": lambda: False, "always": lambda: True}
    assert _condition(None, {}, {"success": lambda: True}) is True
    assert _condition("true", {}, statuses) is False
    assert _condition("${{ always() }}", {}, statuses) is True


def test_select_by_id_name_and_needs(tmp_path: Path) -> None:
    """A job id selects all its matrix variants plus the jobs it needs; a shown name selects
    one variant; --only drops the needs."""
    wf = load_workflow(workflow(tmp_path, "on: push\njobs:\n  b: {steps: [{run: x}]}\n"
                                "  t: {needs: b, strategy: {matrix: {v: [1, 2]}}, "
                                "steps: [{run: x}]}\n"))
    assert [j.name for j in select_gh(wf, ["t"], only=False)] == ["b", "t (1)", "t (2)"]
    assert [j.name for j in select_gh(wf, ["t (2)"], only=True)] == ["t (2)"]


def test_scheduling_needs_if_and_fail_fast(tmp_path: Path) -> None:
    """Jobs wait for their needs; a failed need skips on-success jobs but not `if: always()`;
    with fail-fast, a failed matrix job cancels its siblings that have not started."""
    wf = load_workflow(workflow(tmp_path, """\
on: push
jobs:
  m: {strategy: {matrix: {v: [1, 2, 3]}}, steps: [{run: x}]}
  after: {needs: m, steps: [{run: x}]}
  report: {needs: m, if: always(), steps: [{run: x}]}
"""))
    ran: list[str] = []

    def run(job: GHJob) -> JobResult:
        ran.append(job.name)
        return JobResult(job.name, JobStatus.FAILED if job.name == "m (1)" else JobStatus.SUCCESS)

    rc = RunContext(wf, tmp_path, {}, {}, Cancel())
    results = {r.name: r.status.value for r in run_workflow_jobs(wf, wf.jobs, 1, run, rc)}
    assert results == {"m (1)": "failed", "m (2)": "cancelled", "m (3)": "cancelled",
                       "after": "skipped", "report": "success"}
    assert rc.needs["m"]["result"] == "failure"


def test_continue_on_error_may_be_an_expression() -> None:
    """continue-on-error takes a boolean or an expression, e.g. `${{ matrix.experimental }}`
    (workflow-syntax: jobs.<id>.continue-on-error, with the documented matrix example)."""
    from kata_ci.runner.github.steps import flag as _flag

    assert _flag("${{ matrix.experimental }}", {"matrix": {"experimental": False}}) is False
    assert _flag("${{ matrix.experimental }}", {"matrix": {"experimental": True}}) is True
    assert _flag(True, {}) is True and _flag(False, {}) is False
