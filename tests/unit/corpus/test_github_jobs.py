"""GitHub jobs as GitHub documents them: shown names, the context-availability table checked
at load, strategies built from the github context or from needs, max-parallel, runs-on, the
dependency chain of success()/failure(), and the environment a step gets. Each case is an
example of the doc section its docstring names (docs.github.com/actions/...)."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import pytest

from kata_ci.runner.core.command import Cancel
from kata_ci.runner.core.lifecycle import Session
from kata_ci.runner.core.outcome import JobStatus, Outcome, OutcomeKind
from kata_ci.runner.core.schedule import JobResult
from kata_ci.runner.core.secrets import GITHUB_MASK, Masker, MaskingSink
from kata_ci.runner.core.sinks import LogSink, Stream
from kata_ci.runner.core.spec import Command, Commands, JobSpec, RunSettings
from kata_ci.runner.github.jobs import GitHubGraph, GitHubPlan, github_context, prepare, select
from kata_ci.runner.github.jobs import schedule as run_jobs
from kata_ci.runner.github.steps import RunContext
from kata_ci.runner.github.workflow import GHJob, Workflow, WorkflowError, load_workflow
from kata_ci.runner.gitlab.jobs import predefined_variables


def load(tmp_path: Path, text: str) -> Workflow:
    (tmp_path / "ci.yml").write_text(text)
    return load_workflow(tmp_path / "ci.yml")


def context(tmp_path: Path, wf: Workflow) -> RunContext:
    github = github_context(predefined_variables(tmp_path), "push", wf, tmp_path)
    return RunContext(wf, tmp_path, github, {}, Cancel())


def run(tmp_path: Path, wf: Workflow, statuses: Mapping[str, str],
        outputs: Mapping[str, dict[str, str]] | None = None) -> dict[str, str]:
    """Schedule the workflow with a fake job runner: job id -> status and outputs."""
    def fake(job: GHJob) -> JobResult:
        return JobResult(job.name, JobStatus(statuses.get(job.key, "success")),
                         outputs=dict((outputs or {}).get(job.key, {})))
    results = run_jobs(wf, list(wf.jobs), 1, fake, context(tmp_path, wf))
    return {r.name: r.status.value for r in results}


def test_job_names_from_name_with_matrix_expressions(tmp_path: Path) -> None:
    """workflow-syntax "jobs.<job_id>.name" (contexts: matrix, strategy): a name with
    expressions is shown as rendered; a plain name or the id gets the matrix values
    appended; both the id and the shown name select jobs."""
    wf = load(tmp_path, "on: push\njobs:\n  t:\n    name: 'Test ${{ matrix.os }} #${{ "
              "strategy.job-index }}'\n    strategy: {matrix: {os: [linux, bsd]}}\n"
              "    steps: [{run: x}]\n  l:\n    name: Lint\n"
              "    strategy: {matrix: {py: ['3.11']}}\n    steps: [{run: x}]\n"
              "  plain: {steps: [{run: x}]}\n")
    assert [j.name for j in wf.jobs] == ["Test linux #0", "Test bsd #1", "Lint (3.11)",
                                         "plain"]
    assert [j.name for j in select(wf, ["Test bsd #1"], False)] == ["Test bsd #1"]
    assert len(select(wf, ["t"], False)) == 2


def test_repeated_shown_names_stay_apart(tmp_path: Path) -> None:
    """workflow-syntax "jobs.<job_id>.name": GitHub allows two jobs the same shown name (or
    a name equal to another job's id); kata-ci numbers the later one so each has its own
    result."""
    wf = load(tmp_path, "on: push\njobs:\n  a: {name: b, steps: [{run: x}]}\n"
              "  b: {steps: [{run: x}]}\n  c: {name: Same, steps: [{run: x}]}\n"
              "  d: {name: Same, steps: [{run: x}]}\n")
    assert [j.name for j in wf.jobs] == ["b (2)", "b", "Same", "Same (2)"]
    assert run(tmp_path, wf, {"a": "failed"})["b (2)"] == "failed"


@pytest.mark.parametrize(("field", "context"), [
    ("if: matrix.os == 'x'", "matrix"), ("if: ${{ env.A }}", "env"),
    ("runs-on: ${{ steps.s.outputs.os }}", "steps"),
    ("timeout-minutes: ${{ env.T }}", "env"), ("name: ${{ secrets.S }}", "secrets"),
    ("strategy: {matrix: {a: ['${{ matrix.b }}']}}", "matrix"),
    ("env: {A: '${{ steps.s.outputs.x }}'}", "steps"),
    ("container: {image: '${{ env.IMAGE }}'}", "env")])
def test_contexts_a_field_may_not_name_are_refused_at_load(tmp_path: Path, field: str,
                                                            context: str) -> None:
    """contexts "Context availability": a field naming a context the table does not offer
    there is refused with file:line and job, in GitHub's words (Unrecognized named-value)."""
    with pytest.raises(WorkflowError, match=rf"ci\.yml:3: job 'j'.*Unrecognized named-value: "
                                            rf"'{context}'"):
        load(tmp_path, f"on: push\njobs:\n  j:\n    {field}\n    steps: [{{run: x}}]\n")


def test_contexts_a_field_may_name_load(tmp_path: Path) -> None:
    """contexts "Context availability": each field accepts the contexts the table lists
    for it (step fields: steps, env, secrets; job env: secrets; outputs: steps)."""
    wf = load(tmp_path, "on: push\nenv: {W: '${{ github.sha }}'}\njobs:\n  j:\n"
              "    if: needs.p.result == 'success' && github.ref != ''\n    needs: p\n"
              "    env: {S: '${{ secrets.S }}'}\n    runs-on: ${{ matrix.os }}\n"
              "    strategy: {matrix: {os: [x]}}\n"
              "    outputs: {o: '${{ steps.s.outputs.o }}'}\n"
              "    container: {image: 'i:${{ matrix.os }}', env: {E: '${{ env.W }}'}}\n"
              "    steps:\n      - {id: s, if: steps.x.outcome == 'success' && env.W,"
              " run: 'echo ${{ secrets.S }}', env: {B: '${{ job.status }}'}}\n"
              "  p: {steps: [{run: x}]}\n")
    assert [j.name for j in wf.jobs] == ["j (x)", "p"]


def test_strategy_from_the_github_context_is_built_when_the_run_is_planned(
        tmp_path: Path) -> None:
    """workflow-syntax "jobs.<job_id>.strategy" (contexts: github, needs, vars, inputs):
    a matrix and fail-fast from the github context are built before any job runs, so the
    instances have their names (and can be selected); fail-fast false keeps siblings."""
    wf = load(tmp_path, "on: push\njobs:\n  m:\n    strategy:\n"
              "      fail-fast: ${{ github.event_name != 'push' }}\n"
              "      matrix: {event: ['${{ github.event_name }}', other]}\n"
              "    steps: [{run: x}]\n")
    assert [j.name for j in wf.jobs] == ["m"] and wf.jobs[0].matrix_source is not None
    ready = prepare(wf, context(tmp_path, wf).github)
    assert [j.name for j in ready.jobs] == ["m (push)", "m (other)"]
    assert not ready.jobs[0].fail_fast
    statuses = {"m": "failed"}
    assert run(tmp_path, ready, statuses) == {"m (push)": "failed", "m (other)": "failed"}


def test_fail_fast_cancels_siblings_that_have_not_started(tmp_path: Path) -> None:
    """workflow-syntax "jobs.<job_id>.strategy.fail-fast" (default true): after a failed
    instance, the ones not started are cancelled."""
    wf = load(tmp_path, "on: push\njobs:\n  m:\n    strategy: {matrix: {v: [1, 2]}}\n"
              "    steps: [{run: x}]\n")
    assert run(tmp_path, wf, {"m": "failed"}) == {"m (1)": "failed", "m (2)": "cancelled"}


def test_strategy_values_that_are_not_booleans_or_counts_are_refused(tmp_path: Path) -> None:
    """workflow-syntax "strategy.fail-fast" / "strategy.max-parallel": a boolean and a
    positive number, whether written or from an expression."""
    for strategy, message in (("{fail-fast: maybe}", "fail-fast must be true or false"),
                              ("{max-parallel: 0}", "max-parallel must be a positive"),
                              ("{max-parallel: '${{ 1.5 }}'}", "max-parallel must be"),
                              ("{parallel: 2}", "strategy has unknown keys: parallel")):
        with pytest.raises(WorkflowError, match=message):
            load(tmp_path, f"on: push\njobs:\n  m:\n    strategy: {strategy}\n"
                 "    steps: [{run: x}]\n")


def test_max_parallel_bounds_running_instances(tmp_path: Path) -> None:
    """workflow-syntax "jobs.<job_id>.strategy.max-parallel": at most that many of the
    matrix run at once (instance k waits for instance k-N), with any scheduler width."""
    wf = load(tmp_path, "on: push\njobs:\n  m:\n    strategy:\n"
              "      max-parallel: 2\n      matrix: {v: [1, 2, 3, 4, 5]}\n"
              "    steps: [{run: x}]\n")
    graph = GitHubGraph(wf, wf.jobs, context(tmp_path, wf))
    assert [graph.after(j) for j in wf.jobs] == [[], [], ["m (1)"], ["m (2)"], ["m (3)"]]
    running: set[str] = set()
    most = 0

    def fake(job: GHJob) -> JobResult:
        nonlocal most
        running.add(job.name)
        most = max(most, len(running))
        time.sleep(0.05)
        running.discard(job.name)
        return JobResult(job.name, JobStatus.SUCCESS)
    results = run_jobs(wf, list(wf.jobs), 4, fake, context(tmp_path, wf))
    assert all(r.ok for r in results) and len(results) == 5 and most == 2


def test_name_from_needs_outputs_is_known_once_needs_ended(tmp_path: Path) -> None:
    """workflow-syntax "jobs.<job_id>.name" (contexts include needs): the name is rendered
    when the job's needs have ended; jobs needing it wait for it under its new name."""
    wf = load(tmp_path, "on: push\njobs:\n  p: {outputs: {v: x}, steps: [{run: x}]}\n"
              "  d:\n    needs: p\n    name: Deploy ${{ needs.p.outputs.v }}\n"
              "    steps: [{run: x}]\n  z: {needs: d, steps: [{run: x}]}\n")
    assert run(tmp_path, wf, {}, {"p": {"v": "v1.2"}}) == {
        "p": "success", "Deploy v1.2": "success", "z": "success"}


def test_skipped_ancestor_skips_the_chain_and_failure_sees_ancestors(tmp_path: Path) -> None:
    """expressions "Status check functions" (failure(): "if any ancestor job fails") and
    workflow-syntax "jobs.<job_id>.needs": a skipped ancestor also skips success() jobs
    further down (as GitHub does, actions/runner#491); failure() is true for a failure
    anywhere upstream, not for a skip."""
    wf = load(tmp_path, "on: push\njobs:\n  a: {if: github.event_name == 'nope', "
              "steps: [{run: x}]}\n"
              "  b: {needs: a, if: always(), steps: [{run: x}]}\n"
              "  c: {needs: b, steps: [{run: x}]}\n"
              "  d: {needs: b, if: failure(), steps: [{run: x}]}\n")
    assert run(tmp_path, wf, {}) == {"a": "skipped", "b": "success", "c": "skipped",
                                     "d": "skipped"}
    wf = load(tmp_path, "on: push\njobs:\n  a: {steps: [{run: x}]}\n"
              "  b: {needs: a, if: always(), steps: [{run: x}]}\n"
              "  d: {needs: b, if: failure(), steps: [{run: x}]}\n")
    assert run(tmp_path, wf, {"a": "failed"}) == {"a": "failed", "b": "success",
                                                  "d": "success"}


def test_runs_on_is_evaluated_then_ignored(tmp_path: Path) -> None:
    """workflow-syntax "jobs.<job_id>.runs-on" (contexts: github, matrix...): evaluated as
    the job is built, then ignored (every job has its own VM); a bad expression fails the
    job."""
    (tmp_path / "ci.yml").write_text("on: push\njobs:\n  j:\n    strategy: {matrix: {os: "
                                     "[ubuntu-24.04]}}\n    runs-on: ${{ matrix.os }}\n"
                                     "    steps: [{run: x}]\n  k:\n"
                                     "    runs-on: ${{ fromJSON('nope') }}\n"
                                     "    steps: [{run: x}]\n")
    wf = load_workflow(tmp_path / "ci.yml")
    plan = GitHubPlan(wf, wf.jobs, context(tmp_path, wf), RunSettings())
    plan.spec(wf.jobs[0])
    assert not any("runs-on" in n for n in plan.scripts["j (ubuntu-24.04)"].notes)
    with pytest.raises(Exception, match="fromJSON: not JSON"):
        plan.spec(wf.jobs[1])


class FakeSession(Session):
    """A job's VM as seen by its steps: each command's stdout and $GITHUB_ENV content are
    given per step script; the commands are kept."""

    def __init__(self, tmp_path: Path, sink: LogSink,
                 steps: Sequence[tuple[bytes, bytes]]) -> None:
        super().__init__(JobSpec("j", Commands([]), {}, tmp_path), None,  # type: ignore[arg-type]
                         sink, Cancel())
        self.steps = list(steps)
        self.commands: list[Command] = []

    def run(self, command: Command, sink: LogSink | None = None,
            *args: object, **kwargs: object) -> Outcome:
        stdout, _ = self.steps[len(self.commands)]
        self.commands.append(command)
        (sink or self.sink).write("stdout", stdout)
        return Outcome(OutcomeKind.SUCCESS, 0)

    def put_files(self, files: Mapping[str, bytes], mode: int = 0o644) -> None:
        pass

    def get_files(self, paths: Sequence[str], max_bytes: int) -> dict[str, bytes | None]:
        env = self.steps[len(self.commands) - 1][1]
        return {p: env if p.endswith("/env") else b"" for p in paths}


class Collect:
    def __init__(self) -> None:
        self.got = b""

    def write(self, stream: Stream, data: bytes) -> None:
        self.got += data


def test_defaults_cannot_be_overwritten_and_set_output_is_a_step_output(
        tmp_path: Path) -> None:
    """variables reference "Default environment variables" ("You can't overwrite the value
    of the default environment variables named GITHUB_* and RUNNER_*") and workflow-commands
    "Setting an output parameter": env, $GITHUB_ENV and set-env leave GITHUB_SHA and
    RUNNER_OS alone, other names pass; ::set-output sets steps.<id>.outputs."""
    wf = load(tmp_path, "on: push\njobs:\n  j:\n    env: {GITHUB_SHA: forged, MINE: '1', "
              "ACTIONS_ALLOW_UNSECURE_COMMANDS: 'true'}\n    steps:\n"
              "      - {id: a, run: x}\n      - {run: 'echo ${{ steps.a.outputs.o }}'}\n")
    plan = GitHubPlan(wf, wf.jobs, context(tmp_path, wf), RunSettings())
    plan.spec(wf.jobs[0])
    script = plan.scripts["j"]
    sink = Collect()
    session = FakeSession(tmp_path, MaskingSink(sink, Masker(replacement=GITHUB_MASK)), [
        (b"::set-output name=o::out1\n::set-env name=RUNNER_OS::Forged\n",
         b"GITHUB_REF=refs/forged\nNEW=2\n"), (b"", b"")])
    assert script.run(session).kind is OutcomeKind.SUCCESS
    env = dict(session.commands[1].env or {})
    sha = context(tmp_path, wf).github["sha"]
    assert (env["GITHUB_SHA"], env["RUNNER_OS"], env["GITHUB_REF"]) == \
        (sha, "Linux", "refs/heads/" + context(tmp_path, wf).github["ref_name"])
    assert (env["MINE"], env["NEW"]) == ("1", "2")
    assert script.state.steps["a"]["outputs"] == {"o": "out1"}
