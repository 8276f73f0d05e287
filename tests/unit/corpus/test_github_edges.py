"""GitHub workflow edge cases as GitHub's runner and parser treat them: a matrix with no
vector, one whose every combination is excluded, numbers from fromJSON in names and toJSON,
$GITHUB_ENV / $GITHUB_OUTPUT files the runner refuses, blanks around a command's data. Each
case names the doc section (docs.github.com/actions/...) it is an example of."""

from __future__ import annotations

from pathlib import Path

import pytest

from kata_ci.runner.core.outcome import OutcomeKind
from kata_ci.runner.core.secrets import GITHUB_MASK, Masker, MaskingSink
from kata_ci.runner.core.spec import RunSettings
from kata_ci.runner.github.expr import evaluate
from kata_ci.runner.github.jobs import GitHubPlan
from kata_ci.runner.github.steps import FileCommandError, GitHubSteps, parse_env_file
from kata_ci.runner.github.workflow import WorkflowError
from tests.unit.corpus.test_github_commands import process
from tests.unit.corpus.test_github_jobs import Collect, FakeSession, context, load, run

NEEDS_MATRIX = ("on: push\njobs:\n  p: {steps: [{run: x}]}\n  m:\n    needs: p\n"
                "    strategy:\n      matrix: ${{ fromJSON(needs.p.outputs.m) }}\n"
                "    steps: [{run: x}]\n  z: {needs: m, steps: [{run: x}]}\n")


@pytest.mark.parametrize("matrix", ["{}", "{include: []}", "{include: [], exclude: [{a: 1}]}"])
def test_a_matrix_without_a_vector_is_refused_at_load(tmp_path: Path, matrix: str) -> None:
    """workflow-syntax "jobs.<job_id>.strategy.matrix" (a matrix of variables, or include):
    neither a vector nor an include is GitHub's "Matrix must define at least one vector",
    with file:line and job."""
    with pytest.raises(WorkflowError, match=r"ci\.yml:3: job 'm': Matrix must define at "
                                            r"least one vector"):
        load(tmp_path, f"on: push\njobs:\n  m:\n    strategy: {{matrix: {matrix}}}\n"
                       "    steps: [{run: x}]\n")


def test_an_empty_matrix_from_needs_fails_its_job_and_skips_dependants(tmp_path: Path) -> None:
    """workflow-syntax "Example: Using an output to define two matrices": a needs output of
    `{"include": []}` fails the matrix job (it does not vanish), so a job needing it is
    skipped rather than run as if it had succeeded."""
    wf = load(tmp_path, NEEDS_MATRIX)
    assert run(tmp_path, wf, {}, {"p": {"m": '{"include": []}'}}) == {
        "p": "success", "m": "failed", "z": "skipped"}


def test_every_combination_excluded_runs_the_job_once(tmp_path: Path) -> None:
    """workflow-syntax "Excluding matrix configurations": excluding every combination leaves
    the job, run once without matrix values (as GitHub's matrix builder), not dropped."""
    wf = load(tmp_path, "on: push\njobs:\n  m:\n    strategy:\n      matrix: {os: [a], "
                        "exclude: [{os: a}]}\n    steps: [{run: x}]\n"
                        "  z: {needs: m, steps: [{run: x}]}\n")
    assert [(j.name, j.matrix, j.total) for j in wf.jobs] == [("m", {}, 1), ("z", {}, 1)]


def test_numbers_from_fromjson_are_shown_as_github_prints_them(tmp_path: Path) -> None:
    """expressions "fromJSON" and "toJSON" (literals "number"): a whole number from JSON is
    `1` in a shown name and in toJSON, not Python's `1.0`."""
    wf = load(tmp_path, NEEDS_MATRIX)
    got = run(tmp_path, wf, {}, {"p": {"m": '{"v": [1, 2.5], "include": [{"v": 1, '
                                            '"w": "x"}]}'}})
    assert list(got) == ["p", "m (1, x)", "m (2.5)", "z"]
    assert evaluate("toJSON(fromJSON('[1, 2.5, true]'))", {}) == "[\n  1,\n  2.5,\n  true\n]"


@pytest.mark.parametrize(("text", "message"), [
    ("A<<EOF\nno end\n", "Invalid value. Matching delimiter not found 'EOF'"),
    ("=x\n", "Invalid format '=x'. Name must not be empty"),
    ("A<<\n", "Invalid format 'A<<'. Delimiter must not be empty"),
    ("just text\n", "Invalid format 'just text'"),
])
def test_env_files_the_runner_refuses(text: str, message: str) -> None:
    """workflow-commands "Multiline strings" / "Setting an environment variable": a file
    command GitHub's runner cannot read is refused in its words, never cut short."""
    with pytest.raises(FileCommandError) as caught:
        parse_env_file(text)
    assert str(caught.value) == message
    assert parse_env_file("\nA=x<<y\nB<<E=1\nv\nE=1\n") == {"A": "x<<y", "B": "v"}


def test_a_refused_env_file_fails_the_step_and_node_options_is_an_error(
        tmp_path: Path) -> None:
    """workflow-commands "Setting an environment variable" and "Multiline strings": an
    unterminated $GITHUB_ENV block fails the step ("Unable to process file command 'env'
    successfully."); NODE_OPTIONS is refused with the runner's error annotation, the step
    going on and the variable unchanged."""
    wf = load(tmp_path, "on: push\njobs:\n  j:\n    steps:\n      - {run: a}\n"
                        "      - {run: b}\n")
    plan = GitHubPlan(wf, wf.jobs, context(tmp_path, wf), RunSettings())
    plan.spec(wf.jobs[0])
    script: GitHubSteps = plan.scripts["j"]
    sink = Collect()
    session = FakeSession(tmp_path, MaskingSink(sink, Masker(replacement=GITHUB_MASK)), [
        (b"", b"NODE_OPTIONS=--require=/x.js\nOK=1\n"), (b"", b"V<<EOF\nnever closed\n")])
    assert script.run(session).kind is OutcomeKind.JOB_FAILURE
    assert "NODE_OPTIONS" not in dict(session.commands[1].env or {})
    assert dict(session.commands[1].env or {})["OK"] == "1"
    assert script.state.annotations == [
        "Error: Can't store NODE_OPTIONS output parameter using '$GITHUB_ENV' command."]
    assert "Error: Unable to process file command 'env' successfully.\n" \
           "Error: Invalid value. Matching delimiter not found 'EOF'" in sink.got.decode()
    assert script.state.steps["__step0"]["outcome"] == "success"
    assert script.state.steps["__step1"]["outcome"] == "failure"


def test_command_data_keeps_trailing_blanks_and_masks_without_them(tmp_path: Path) -> None:
    """workflow-commands "About workflow commands" / "Masking a value in a log": blanks
    before `::` are allowed and those after the data belong to it (the runner trims the
    start only); add-mask masks the value without surrounding blanks (a superset)."""
    shown, produced = process(tmp_path, "  ::set-output name=o::v  \n::add-mask:: s3cr3t-v \n"
                                        "see s3cr3t-v\n")
    assert produced.outputs == {"o": "v  "}
    assert "see ***\n" in shown
