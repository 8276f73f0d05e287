"""No CI file makes kata-ci raise: the shared fixture files, truncated and mutated, go through
the CLI's loaders (listing, `ci config`) and through building every job's spec; each input
gives exit 0 or exit 2 with a `kata-ci:` message, never a traceback."""

from __future__ import annotations

import random
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from kata_ci.errors import UserError
from kata_ci.runner.cli.app import main
from kata_ci.runner.cli.ci import choose, discover, plan_for
from kata_ci.runner.core.command import Cancel
from kata_ci.runner.core.spec import RunSettings

FIXTURES = Path(__file__).resolve().parents[3] / "shared" / "fixtures"
GITLAB = sorted((FIXTURES / "gitlab-ci").glob("*.gitlab-ci.yml"))
WORKFLOWS = sorted((FIXTURES / "workflows").glob("*.yml"))
PER_FILE = 40  # mutations of each kind per fixture file
# What a mutation puts in place of a scalar: every YAML type, GitLab's and YAML's tags, and
# values that have crashed loaders (recursion, huge numbers, expressions, references).
REPLACEMENTS = [
    "[]", "{}", "null", "~", "true", "0", "-1", "99999999999999999999", "1e400", "''",
    "[a, [b, [c]]]", "{a: {b: 1}}", "!reference [.x, y]", "!reference []", "!reference [{}]",
    "!!binary aGk=", "!!set {a}", "'${{'", "${{ fromJSON('[') }}", "${{ matrix.x }}",
    "$UNDEFINED", "'*'", "../../../etc/passwd", "'/'", "[1, 2]", "'when: never'",
    "!reference [job, rules]", "*nowhere", "&anchor value", "'\\0'",
]


def _mutations(text: str, seed: str) -> Iterator[str]:
    rng = random.Random(seed)
    lines = text.splitlines(keepends=True)
    for _ in range(PER_FILE):  # truncated anywhere, mid-token included
        yield text[:rng.randrange(len(text))]
    for _ in range(PER_FILE):  # a line dropped, duplicated or shifted
        i = rng.randrange(len(lines))
        kind = rng.randrange(3)
        changed = list(lines)
        if kind == 0:
            del changed[i]
        elif kind == 1:
            changed.insert(i, lines[i])
        else:
            changed[i] = ("  " + lines[i]) if rng.random() < .5 else lines[i].lstrip()
        yield "".join(changed)
    values = [i for i, line in enumerate(lines) if ": " in line and not line.strip()
              .startswith("#")]
    items = [i for i, line in enumerate(lines) if line.lstrip().startswith("- ")]
    for _ in range(PER_FILE):  # a value or list item replaced by any other YAML
        changed = list(lines)
        replacement = rng.choice(REPLACEMENTS)
        if values and (rng.random() < .6 or not items):
            i = rng.choice(values)
            key = changed[i].split(": ", 1)[0]
            changed[i] = f"{key}: {replacement}\n"
        elif items:
            i = rng.choice(items)
            indent = changed[i][:len(changed[i]) - len(changed[i].lstrip())]
            changed[i] = f"{indent}- {replacement}\n"
        yield "".join(changed)


def _cases(files: list[Path]) -> list[tuple[str, int, str]]:
    return [(path.name, n, text) for path in files
            for n, text in enumerate(_mutations(path.read_text(), path.name))]


def _check(result: Result, what: str) -> None:
    if result.exit_code == 0:
        return
    assert isinstance(result.exception, SystemExit), (
        f"{what}: {type(result.exception).__name__}: {result.exception}")
    assert result.exit_code == 2, f"{what}: exit {result.exit_code}\n{result.output}"
    assert "kata-ci:" in result.stderr and len(result.stderr.strip()) > len("kata-ci:"), \
        f"{what}: no message: {result.stderr!r}"
    assert "Traceback" not in result.output


def _specs(workspace: Path, gitlab_ci: Path | None, workflow: Path | None) -> None:
    """Every job of the file made into a JobSpec, as a run does before its VMs start; only a
    UserError may come out."""
    try:
        found = discover(workspace, gitlab_ci, workflow, {}, "push")
        target = choose(found, [], pipeline=True)
        plan = plan_for(found, target, [], False, workspace, {}, RunSettings(), Cancel())
        for job in plan.jobs:
            plan.spec(job)
    except UserError:
        pass


@pytest.fixture(scope="module")
def runner() -> CliRunner:
    return CliRunner()


@pytest.fixture
def workspace(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    (tmp_path / "config.toml").write_text('[vm]\nnetwork = "none"\n')
    monkeypatch.setenv("KATA_CI_CONFIG", str(tmp_path / "config.toml"))
    (tmp_path / "ws").mkdir()
    return tmp_path / "ws"


@pytest.mark.parametrize(("name", "n", "text"), _cases(GITLAB),
                         ids=lambda v: v if isinstance(v, str) and len(v) < 60 else None)
def test_mutated_gitlab_files_exit_2_with_a_message(runner: CliRunner, workspace: Path,
                                                    name: str, n: int, text: str) -> None:
    """A truncated or mutated GitLab fixture file: the listing and `ci config` exit 0 or 2
    with a message, and building every job's spec raises nothing but a UserError."""
    path = workspace / ".gitlab-ci.yml"
    path.write_text(text)
    _check(runner.invoke(main, ["run", "-C", str(workspace), "--gitlab-ci", str(path)]),
           f"{name} #{n} listing")
    _check(runner.invoke(main, ["ci", "config", "-C", str(workspace)]), f"{name} #{n} config")
    _specs(workspace, path, None)


@pytest.mark.parametrize(("name", "n", "text"), _cases(WORKFLOWS),
                         ids=lambda v: v if isinstance(v, str) and len(v) < 60 else None)
def test_mutated_workflows_exit_2_with_a_message(runner: CliRunner, workspace: Path,
                                                 name: str, n: int, text: str) -> None:
    """A truncated or mutated GitHub starter workflow: the listing exits 0 or 2 with a
    message, and building every job's spec raises nothing but a UserError."""
    path = workspace / ".github" / "workflows" / "ci.yml"
    path.parent.mkdir(parents=True)
    path.write_text(text)
    _check(runner.invoke(main, ["run", "-C", str(workspace), "--workflow", str(path)]),
           f"{name} #{n} listing")
    _specs(workspace, None, path)


def test_the_unmutated_fixtures_load(runner: CliRunner, workspace: Path) -> None:
    """The fixture files as they are list their jobs (exit 0): the mutations start from
    valid files, so an exit 2 above is the mutation's doing."""
    for source in GITLAB:
        shutil.copy(source, workspace / ".gitlab-ci.yml")
        result = runner.invoke(main, ["run", "-C", str(workspace), "--gitlab-ci",
                                      str(workspace / ".gitlab-ci.yml")])
        assert result.exit_code == 0, f"{source.name}: {result.output}"
    for source in WORKFLOWS:
        result = runner.invoke(main, ["run", "-C", str(workspace), "--workflow", str(source)])
        assert result.exit_code == 0, f"{source.name}: {result.output}"
