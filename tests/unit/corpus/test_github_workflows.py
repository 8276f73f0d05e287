"""GitHub workflows as GitHub documents them: expressions where the context-availability
table allows them (matrix, env, runs-on, timeout-minutes, continue-on-error, shell), a matrix
from another job's outputs, skipping after an upstream failure, YAML 1.2 booleans. Each case
is an example of the doc section its docstring names (docs.github.com/actions/...)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from kata_ci.runner.core.spec import RunSettings
from kata_ci.runner.github.jobs import GitHubPlan
from kata_ci.runner.github.steps import JobState, contexts, minutes
from kata_ci.runner.github.workflow import WorkflowError
from tests.unit.corpus.test_github_jobs import context, load, run


def test_matrix_from_needs_outputs(tmp_path: Path) -> None:
    """workflow-syntax "Example: Using an output to define two matrices" (jobs.<id>.strategy.
    matrix with fromJSON of needs.<job>.outputs): the instances exist once the job's needs
    have ended, named by their values; jobs needing it wait for every instance."""
    wf = load(tmp_path, "on: push\njobs:\n  plan:\n    outputs: {t: '${{ steps.s.outputs.t }}'}\n"
              "    steps: [{id: s, run: x}]\n"
              "  build:\n    needs: plan\n    strategy:\n      matrix:\n"
              "        target: ${{ fromJSON(needs.plan.outputs.t) }}\n"
              "    steps: [{run: x}]\n"
              "  after: {needs: build, steps: [{run: x}]}\n")
    assert [j.name for j in wf.jobs] == ["plan", "build", "after"]
    got = run(tmp_path, wf, {}, {"plan": {"t": '["a", "b"]'}})
    assert got == {"plan": "success", "build (a)": "success", "build (b)": "success",
                   "after": "success"}


def test_whole_matrix_from_an_expression_with_include(tmp_path: Path) -> None:
    """workflow-syntax "jobs.<job_id>.strategy.matrix" ("Using contexts to create matrices"):
    a whole matrix from fromJSON, with include, expands as a written one would."""
    wf = load(tmp_path, "on: push\njobs:\n  m:\n    strategy:\n"
              "      matrix: ${{ fromJSON('{\"os\":[\"x\",\"y\"],\"include\":[{\"os\":\"x\","
              "\"extra\":\"1\"}]}') }}\n    steps: [{run: x}]\n")
    assert run(tmp_path, wf, {}) == {"m (x, 1)": "success", "m (y)": "success"}


def test_matrix_values_spliced_from_an_expression(tmp_path: Path) -> None:
    """expressions "fromJSON" ("Example returning a JSON object"): a matrix key's array from
    an expression is spliced in, next to written values."""
    wf = load(tmp_path, "on: push\njobs:\n  m:\n    strategy:\n      matrix:\n"
              "        os: ${{ fromJSON('[\"a\",\"b\"]') }}\n        v: [1]\n"
              "    steps: [{run: x}]\n")
    assert list(run(tmp_path, wf, {})) == ["m (a, 1)", "m (b, 1)"]


def test_a_matrix_that_cannot_be_built_fails_its_job(tmp_path: Path) -> None:
    """workflow-syntax "jobs.<job_id>.strategy.matrix": a matrix from needs outputs that is
    not a matrix fails that job (with the reason), not the run; one of literals only is
    refused at load, with file:line and job."""
    wf = load(tmp_path, "on: push\njobs:\n  p: {steps: [{run: x}]}\n  m:\n    needs: p\n"
              "    strategy:\n      matrix: ${{ fromJSON(needs.p.outputs.m) }}\n"
              "    steps: [{run: x}]\n")
    assert run(tmp_path, wf, {}, {"p": {"m": "[1]"}}) == {"p": "success", "m": "failed"}
    with pytest.raises(WorkflowError, match=r"ci\.yml:3: job 'm': strategy\.matrix must be"):
        load(tmp_path, "on: push\njobs:\n  m:\n    strategy:\n"
             "      matrix: ${{ fromJSON('[1]') }}\n    steps: [{run: x}]\n")


def test_skipped_when_any_ancestor_failed(tmp_path: Path) -> None:
    """workflow-syntax "jobs.<job_id>.needs" ("If a job fails or is skipped, all jobs that
    need it are skipped unless..."): success() looks at the whole chain: a job whose direct
    need ran with always() is still skipped when a job further up failed."""
    wf = load(tmp_path, "on: push\njobs:\n  a: {steps: [{run: x}]}\n"
              "  b: {needs: a, if: always(), steps: [{run: x}]}\n"
              "  c: {needs: b, steps: [{run: x}]}\n"
              "  d: {needs: b, if: always(), steps: [{run: x}]}\n")
    assert run(tmp_path, wf, {"a": "failed"}) == {"a": "failed", "b": "success",
                                                  "c": "skipped", "d": "success"}


def spec_of(tmp_path: Path, text: str, name: str | None = None) -> Any:
    wf = load(tmp_path, text)
    rc = context(tmp_path, wf)
    job = wf.jobs[0] if name is None else next(j for j in wf.jobs if j.name == name)
    return GitHubPlan(wf, [job], rc, RunSettings()).spec(job)


def test_job_env_and_timeout_from_expressions(tmp_path: Path) -> None:
    """contexts "Context availability" (jobs.<id>.env: github, matrix, secrets...;
    jobs.<id>.timeout-minutes: github, matrix, needs...): both are evaluated for the job."""
    spec = spec_of(tmp_path, "on: push\njobs:\n  j:\n    strategy: {matrix: {v: [7]}}\n"
                   "    env: {LABEL: 'v${{ matrix.v }}-${{ github.event_name }}'}\n"
                   "    timeout-minutes: ${{ matrix.v }}\n    steps: [{run: x}]\n")
    assert spec.timeout == 7 * 60


def test_workflow_and_job_env_rendered_in_contexts(tmp_path: Path) -> None:
    """contexts "env context": a job's env values with expressions are rendered before its
    steps see them."""
    wf = load(tmp_path, "on: push\njobs:\n  j:\n    strategy: {matrix: {v: [x]}}\n"
              "    env: {LABEL: '${{ matrix.v }}-built'}\n    steps: [{run: x}]\n")
    rc = context(tmp_path, wf)
    plan = GitHubPlan(wf, wf.jobs, rc, RunSettings())
    plan.spec(wf.jobs[0])
    script = plan.scripts[wf.jobs[0].name]
    assert contexts(script.job, JobState(), rc)["env"]["LABEL"] == "x-built"


@pytest.mark.parametrize(("value", "expected"), [
    (5.0, 5.0), ("${{ 3 }}", 3.0), ("${{ matrix.slow && 60 || 10 }}", 10.0), (None, None)])
def test_timeout_minutes_values(value: Any, expected: float | None) -> None:
    """workflow-syntax "jobs.<job_id>.timeout-minutes" (expressions allowed): a number or an
    expression's number."""
    assert minutes(value, {"matrix": {"slow": False}}) == expected


def test_a_timeout_that_is_not_positive_fails(tmp_path: Path) -> None:
    """workflow-syntax "timeout-minutes": a value that is not a positive number is refused;
    written literally at load, from an expression when the job starts."""
    with pytest.raises(WorkflowError, match="positive number"):
        load(tmp_path, "on: push\njobs: {j: {timeout-minutes: -1, steps: [{run: x}]}}\n")
    with pytest.raises(Exception, match="not a positive number"):
        spec_of(tmp_path, "on: push\njobs: {j: {timeout-minutes: '${{ 0 }}', "
                "steps: [{run: x}]}}\n")


@pytest.mark.parametrize("field", [
    "runs-on: ${{ fromJSON( }}", "env: {A: '${{ matrix. }}'}",
    "timeout-minutes: '${{ 1 + }}'", "continue-on-error: '${{ ) }}'",
    "strategy: {matrix: {a: ['${{ nope( }}']}}"])
def test_expression_syntax_errors_at_load(tmp_path: Path, field: str) -> None:
    """expressions "About expressions": a malformed expression in any job field is reported
    with file:line and the job before anything runs."""
    with pytest.raises(WorkflowError, match=r"ci\.yml:3: job 'j'"):
        load(tmp_path, f"on: push\njobs:\n  j:\n    {field}\n    steps: [{{run: x}}]\n")


def test_yaml_1_2_booleans(tmp_path: Path) -> None:
    """workflow-syntax "env" with YAML 1.2 (GitHub's parser): yes/no/on/off are strings;
    only true/false are booleans."""
    wf = load(tmp_path, "on: push\nenv: {A: yes, B: off, C: true}\n"
              "jobs: {j: {steps: [{run: x}]}}\n")
    assert wf.env == {"A": "yes", "B": "off", "C": "true"}
