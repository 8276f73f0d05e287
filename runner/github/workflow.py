"""GitHub workflow files to runnable jobs (doc: actions/using-workflows/workflow-syntax).

`on:` filters by event, `strategy.matrix` expands with include/exclude as documented, and
unknown keys are refused with the file, line and job, before any VM starts. Every `${{ }}` is
parsed here, and checked to name only the contexts GitHub's context-availability table offers
in its field (doc: actions/reference/contexts "Context availability"). Expressions are
evaluated where their contexts exist: a strategy or name built only of literals here; one that
names `github`, `needs`, `vars` or `inputs` when the run is planned or its needs have ended
(jobs.py); the job's other fields as it starts; a step's as the step starts.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from kata_ci.errors import UserError
from kata_ci.runner.core import beneath
from kata_ci.runner.core.schedule import find_cycle
from kata_ci.runner.core.yamltree import tree_problem
from kata_ci.runner.github.available import (
    AVAILABLE,
    PRE_RUN,
    check_containers,
    check_embedded,
    check_expression,
    waits_for_run,
)
from kata_ci.runner.github.available import WorkflowError as WorkflowError
from kata_ci.runner.github.container import Container, parse_container, parse_services
from kata_ci.runner.github.expr import evaluate_tree, render, to_string
from kata_ci.runner.github.matrix import MAX_MATRIX as MAX_MATRIX
from kata_ci.runner.github.matrix import expand_matrix as expand_matrix

WORKFLOW_KEYS = {"name", "run-name", "on", "permissions", "env", "defaults", "concurrency",
                 "jobs"}
JOB_KEYS = {"name", "needs", "runs-on", "permissions", "environment", "concurrency",
            "outputs", "env", "defaults", "if", "steps", "timeout-minutes", "strategy",
            "continue-on-error", "container", "services", "uses", "with", "secrets"}
STRATEGY_KEYS = {"matrix", "fail-fast", "max-parallel"}
STEP_KEYS = {"id", "if", "name", "uses", "run", "working-directory", "shell", "with", "env",
             "continue-on-error", "timeout-minutes"}


class _Loader(yaml.SafeLoader):
    """YAML 1.2 booleans, as GitHub reads workflows: only true/false. PyYAML's YAML 1.1
    would make `yes`, `no`, `on` and `off` booleans (`FLAG: yes` must stay "yes")."""


_Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_Loader.add_implicit_resolver("tag:yaml.org,2002:bool",
                              re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                              list("tTfF"))
_Loader.add_constructor("tag:yaml.org,2002:bool",
                        lambda loader, node: str(node.value).lower() == "true")


@dataclass
class Step:
    index: int
    id: str
    name: str
    run: str | None
    uses: str | None
    shell: str | None
    working_directory: str | None
    env: dict[str, str]
    if_: str | None
    continue_on_error: Any
    timeout_minutes: float | str | None  # str: an expression, evaluated as the step starts


@dataclass
class GHJob:
    key: str  # the job id in the file; needs refer to it
    name: str  # shown name: the key, plus matrix values
    needs: list[str]
    if_: str | None
    matrix: dict[str, Any]
    env: dict[str, str]
    shell: str | None
    working_directory: str | None
    steps: list[Step]
    timeout_minutes: float | str | None  # None: kata-ci's; str: an expression
    continue_on_error: Any
    outputs: dict[str, str]
    fail_fast: bool
    unsupported: list[str] = field(default_factory=list)  # keys noted once per job
    line: int = 0
    container: Container | None = None  # its expressions rendered when the job is built
    services: dict[str, Container] = field(default_factory=dict)  # id -> container, likewise
    # The strategy as written, while it (or the name) waits for contexts known only when
    # the run is planned (github) or the job's needs have ended: see jobs.GitHubGraph.expand.
    matrix_source: Any = None
    title: str | None = None  # `name:` as written; the shown name is built from it
    runs_on: Any = None  # as written: evaluated as the job starts (kata-ci runs a VM)
    max_parallel: int | None = None  # strategy.max-parallel
    index: int = 0  # strategy.job-index
    total: int = 1  # strategy.job-total


@dataclass
class Workflow:
    path: Path
    name: str
    events: list[str]
    env: dict[str, str]
    jobs: list[GHJob]


def _text_map(value: Any, where: str, what: str) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise WorkflowError(f"{where}: {what} must be a mapping")
    return {str(k): "" if v is None else str(v).lower() if isinstance(v, bool) else
            str(int(v)) if isinstance(v, float) and v.is_integer() else str(v)
            for k, v in value.items()}


def events_of(on: Any) -> list[str]:
    if isinstance(on, str):
        return [on]
    if isinstance(on, list):
        return [str(e) for e in on]
    if isinstance(on, dict):
        return [str(e) for e in on]
    return []


def has_expression(value: Any) -> bool:
    if isinstance(value, str):
        return "${{" in value
    if isinstance(value, dict):
        return any(has_expression(k) or has_expression(v) for k, v in value.items())
    if isinstance(value, list):
        return any(has_expression(v) for v in value)
    return False


def _step(raw: Any, index: int, where: str, job: str) -> Step:
    if not isinstance(raw, dict):
        raise WorkflowError(f"{where}: job {job!r}: step {index + 1} must be a mapping")
    unknown = set(raw) - STEP_KEYS
    if unknown:
        raise WorkflowError(f"{where}: job {job!r}: step {index + 1} has unknown keys: "
                            f"{', '.join(sorted(unknown))}")
    if ("run" in raw) == ("uses" in raw):
        raise WorkflowError(f"{where}: job {job!r}: step {index + 1} needs exactly one of "
                            "run and uses")
    name = raw.get("name") or (f"Run {str(raw['run']).splitlines()[0][:60]}" if "run" in raw
                               else f"Run {raw['uses']}")
    timeout = _minutes(raw.get("timeout-minutes"), where, job)
    return Step(index=index, id=str(raw.get("id", f"__step{index}")), name=str(name),
                run=str(raw["run"]) if "run" in raw else None,
                uses=str(raw["uses"]) if "uses" in raw else None, shell=raw.get("shell"),
                working_directory=raw.get("working-directory"),
                env=_text_map(raw.get("env"), where, "env"),
                if_=None if raw.get("if") is None else str(raw["if"]),
                continue_on_error=raw.get("continue-on-error", False),
                timeout_minutes=timeout)


def load_workflow(path: Path, workspace: Path | None = None) -> Workflow:
    """``path`` is read beneath ``workspace`` when it lies in it (links leaving it refused)."""
    text = beneath.read_named(workspace, path) if workspace is not None \
        else beneath.read_user_file(path)
    try:
        data = yaml.load(text, Loader=_Loader)
        node = yaml.compose(text, Loader=_Loader)
    except (yaml.YAMLError, RecursionError) as exc:
        raise WorkflowError(f"{path}: invalid YAML: {exc}"[:2000]) from None
    if not isinstance(data, dict):
        raise WorkflowError(f"{path}: the top level must be a mapping")
    problem = tree_problem(data)
    if problem:
        raise WorkflowError(f"{path}: {problem}")
    if True in data:  # a YAML 1.1 writer's `on` may still arrive as the boolean true
        data["on"] = data.pop(True)
    unknown = set(map(str, data)) - WORKFLOW_KEYS
    if unknown:
        raise WorkflowError(f"{path}: unknown top-level keys: {', '.join(sorted(unknown))}")
    lines: dict[str, int] = {}
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            if key.value == "jobs" and isinstance(value, yaml.MappingNode):
                lines = {str(k.value): k.start_mark.line + 1 for k, _ in value.value}
    jobs_raw = data.get("jobs")
    if not isinstance(jobs_raw, dict) or not jobs_raw:
        raise WorkflowError(f"{path}: a workflow needs a `jobs` mapping")
    defaults = _run_defaults(data.get("defaults"), str(path))
    for what in ("env", "run-name", "concurrency"):
        check_embedded(data.get(what), str(path), what, AVAILABLE[what])
    jobs: list[GHJob] = []
    keys = set(map(str, jobs_raw))
    for key, raw in jobs_raw.items():
        where = f"{path}:{lines.get(str(key), 0)}"
        taken = {j.name for j in jobs} | (keys - {str(key)})
        jobs += _job(str(key), raw, jobs_raw, defaults, where, lines.get(str(key), 0), taken)
    _check_cycles(jobs_raw, path)
    return Workflow(path=path, name=str(data.get("name", path.name)),
                    events=events_of(data.get("on")),
                    env=_text_map(data.get("env"), str(path), "env"), jobs=jobs)


def _run_defaults(raw: Any, where: str) -> dict[str, Any]:
    """defaults.run (shell, working-directory): strings, maybe expressions."""
    if raw is None:
        return {}
    run = raw.get("run") if isinstance(raw, dict) else None
    if not isinstance(raw, dict) or not isinstance(run or {}, dict) or \
            not all(isinstance(v, str) for v in (run or {}).values()):
        raise WorkflowError(f"{where}: defaults must be {{run: {{shell, working-directory}}}}")
    check_embedded(run, where, "defaults.run", AVAILABLE["defaults.run"])
    return dict(run or {})


def _job(key: str, raw: Any, jobs_raw: dict[str, Any], defaults: dict[str, Any], where: str,
         line: int, taken: set[str]) -> list[GHJob]:
    """The job's instances: one per matrix combination, or one waiting for its matrix."""
    if not isinstance(raw, dict):
        raise WorkflowError(f"{where}: job {key!r} must be a mapping")
    unknown = set(map(str, raw)) - JOB_KEYS
    if unknown:
        raise WorkflowError(f"{where}: job {key!r} has unknown keys: "
                            f"{', '.join(sorted(unknown))}")
    if "uses" in raw:
        raise WorkflowError(f"{where}: job {key!r}: reusable workflows (jobs.<id>.uses) "
                            "cannot be fetched here")
    needs = raw.get("needs", [])
    needs = [needs] if isinstance(needs, str) else needs
    if not isinstance(needs, list) or not all(isinstance(n, str) for n in needs):
        raise WorkflowError(f"{where}: job {key!r}: needs must be a job id or a list of them")
    for need in needs:
        if need not in jobs_raw:
            raise WorkflowError(f"{where}: job {key!r} needs {need!r}, which is not a job "
                                "of this workflow")
    strategy = raw.get("strategy") or {}
    if not isinstance(strategy, dict):
        raise WorkflowError(f"{where}: job {key!r}: strategy must be a mapping")
    unknown = set(map(str, strategy)) - STRATEGY_KEYS
    if unknown:
        raise WorkflowError(f"{where}: job {key!r}: strategy has unknown keys: "
                            f"{', '.join(sorted(unknown))}")
    title = raw.get("name")
    if title is not None and not isinstance(title, (str, int, float)):
        raise WorkflowError(f"{where}: job {key!r}: name must be a string")
    run_defaults = {**defaults, **_run_defaults(raw.get("defaults"), where)}
    steps_raw = raw.get("steps") or []
    if not isinstance(steps_raw, list):
        raise WorkflowError(f"{where}: job {key!r}: steps must be a list")
    steps = [_step(s, i, where, key) for i, s in enumerate(steps_raw)]
    if not steps:
        raise WorkflowError(f"{where}: job {key!r} has no steps")
    if raw.get("if") is not None:
        check_expression(str(raw["if"]), where, key, AVAILABLE["jobs.<job_id>.if"])
    for step, step_raw in zip(steps, steps_raw, strict=True):
        what = f"{where}: job {key!r}: step {step.index + 1}"
        if step.if_ is not None:
            check_expression(step.if_, where, key, AVAILABLE["jobs.<job_id>.steps.if"])
        check_embedded({k: v for k, v in step_raw.items() if k != "if"}, what, "step",
                        AVAILABLE["jobs.<job_id>.steps"])
    for field_name in ("runs-on", "timeout-minutes", "continue-on-error", "name",
                       "concurrency"):
        check_embedded(raw.get(field_name), f"{where}: job {key!r}", field_name, PRE_RUN)
    environment = raw.get("environment")
    url = environment.get("url") if isinstance(environment, dict) else None
    check_embedded({k: v for k, v in environment.items() if k != "url"}
                    if isinstance(environment, dict) else environment,
                    f"{where}: job {key!r}", "environment", PRE_RUN)
    check_embedded(url, f"{where}: job {key!r}", "environment.url",
                    AVAILABLE["jobs.<job_id>.environment.url"])
    for field_name in ("env", "strategy", "outputs"):
        check_embedded(raw.get(field_name), f"{where}: job {key!r}", field_name,
                        AVAILABLE[f"jobs.<job_id>.{field_name}"])
    check_containers(raw, f"{where}: job {key!r}")
    try:
        container = parse_container(raw.get("container"), where, key)
        services = parse_services(raw.get("services"), where, key)
    except UserError as exc:
        raise WorkflowError(str(exc)) from None
    base = GHJob(
        key=key, name=key, needs=list(needs),
        if_=None if raw.get("if") is None else str(raw["if"]), matrix={},
        env=_text_map(raw.get("env"), where, "env"),
        shell=run_defaults.get("shell"), working_directory=run_defaults.get("working-directory"),
        steps=steps, timeout_minutes=_minutes(raw.get("timeout-minutes"), where, key),
        continue_on_error=raw.get("continue-on-error", False),
        outputs=_text_map(raw.get("outputs"), where, "outputs"),
        fail_fast=True, line=line, container=container, services=services,
        title=None if title is None else str(title), runs_on=raw.get("runs-on"))
    if waits_for_run(strategy) or waits_for_run(title):
        return [replace(base, matrix_source=strategy)]  # built by jobs.GitHubGraph.expand
    return build(base, strategy, {}, f"{where}: job {key!r}", taken)


def build(job: GHJob, strategy_raw: Any, ctx: Mapping[str, Any], where: str,
          taken: set[str]) -> list[GHJob]:
    """``job``'s instances: its strategy evaluated with ``ctx`` (contexts known so far),
    the matrix expanded, each named as GitHub shows it. ``taken``: names already in use
    (every job id and shown name), to which these are added. UserError if it cannot be."""
    strategy = evaluate_tree(strategy_raw or {}, ctx)
    if not isinstance(strategy, dict):
        raise WorkflowError(f"{where}: strategy must be a mapping")
    fail_fast = _boolean(strategy.get("fail-fast", True), f"{where}: strategy.fail-fast")
    limit = strategy.get("max-parallel")
    try:
        number = None if limit is None or isinstance(limit, bool) else float(limit)
    except (TypeError, ValueError, OverflowError):
        number = None
    if limit is not None and (number is None or not number.is_integer() or number < 1):
        raise WorkflowError(f"{where}: strategy.max-parallel must be a positive integer, not "
                            f"{limit!r}"[:300])
    combos = expand_matrix(strategy.get("matrix"), where)
    made = []
    for index, combo in enumerate(combos):
        one = replace(job, matrix=combo, matrix_source=None, fail_fast=fail_fast,
                      max_parallel=None if number is None else int(number), index=index,
                      total=len(combos))
        name = _shown_name(one, ctx, where)
        if name in taken:  # the scheduler tells jobs by name: a repeated one gets a number
            name = next(f"{name} ({n})" for n in itertools.count(2)
                        if f"{name} ({n})" not in taken)
        taken.add(name)
        made.append(replace(one, name=name))
    return made


def strategy_context(job: GHJob) -> dict[str, Any]:
    """The `strategy` context (doc: contexts, "strategy context")."""
    return {"fail-fast": job.fail_fast, "job-index": job.index, "job-total": job.total,
            "max-parallel": job.max_parallel or job.total}


def _shown_name(job: GHJob, ctx: Mapping[str, Any], where: str) -> str:
    """`name:` with expressions is shown as rendered; a plain one, or the job id, gets the
    matrix values appended: `test (3.11, linux)`."""
    label = ", ".join(_display(v) for v in job.matrix.values() if v not in (None, ""))
    if job.title is not None and "${{" in job.title:
        try:
            shown = render(job.title, {**ctx, "matrix": job.matrix,
                                       "strategy": strategy_context(job)}).strip()
        except UserError as exc:
            raise WorkflowError(f"{where}: name: {exc}") from None
        if shown:
            return shown[:500]
    base = job.title.strip() if job.title and job.title.strip() else job.key
    return f"{base} ({label})" if label else base


def _boolean(value: Any, what: str) -> bool:
    """A boolean field, possibly an expression's text ("true"/"false")."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    raise WorkflowError(f"{what} must be true or false, not {value!r}"[:300])


def _minutes(value: Any, where: str, job: str) -> float | str | None:
    """timeout-minutes: a positive number, or an expression evaluated when it applies."""
    if value is None:
        return None
    if isinstance(value, str) and "${{" in value:
        return value
    try:
        minutes = float(value)
    except (TypeError, ValueError, OverflowError):
        minutes = -1.0
    if isinstance(value, bool) or not 0 < minutes < 1e9:
        raise WorkflowError(f"{where}: job {job!r}: timeout-minutes must be a positive number, "
                            f"not {value!r}"[:300])
    return minutes


def _display(value: Any) -> str:
    """A matrix value in a shown name; a number from fromJSON as GitHub prints it (1, not
    1.0)."""
    if isinstance(value, dict):
        return ", ".join(_display(v) for v in value.values())
    if isinstance(value, list):
        return "[" + ", ".join(_display(v) for v in value) + "]"
    return to_string(value)


def _check_cycles(jobs: dict[str, Any], path: Path) -> None:
    graph = {name: [body["needs"]] if isinstance(body.get("needs"), str)
             else list(body.get("needs", [])) for name, body in jobs.items()}
    cycle = find_cycle(graph)
    if cycle:
        raise WorkflowError(f"{path}: needs form a cycle: {' -> '.join(cycle)}")
