"""GitHub workflow files to runnable jobs (doc: actions/using-workflows/workflow-syntax).

`on:` filters by event, `strategy.matrix` expands with include/exclude as documented, and
unknown keys are refused with the file, line and job, before any VM starts. Expressions are
kept as text: they are evaluated while the job runs (runner/github_run.py).
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from kata_ci.errors import UserError
from kata_ci.runner.core import beneath
from kata_ci.runner.core.schedule import find_cycle
from kata_ci.runner.core.yamltree import tree_problem
from kata_ci.runner.github.container import Container, parse_container, parse_services
from kata_ci.runner.github.expr import ExpressionError, evaluate, parse

WORKFLOW_KEYS = {"name", "run-name", "on", "permissions", "env", "defaults", "concurrency",
                 "jobs"}
JOB_KEYS = {"name", "needs", "runs-on", "permissions", "environment", "concurrency",
            "outputs", "env", "defaults", "if", "steps", "timeout-minutes", "strategy",
            "continue-on-error", "container", "services", "uses", "with", "secrets"}
MAX_MATRIX = 256  # GitHub: "A matrix will generate a maximum of 256 jobs per workflow run"
STEP_KEYS = {"id", "if", "name", "uses", "run", "working-directory", "shell", "with", "env",
             "continue-on-error", "timeout-minutes"}


class WorkflowError(UserError):
    pass


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
    matrix_source: Any = None  # a matrix with expressions: expanded once its needs ended


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


def expand_matrix(matrix: Any, where: str) -> list[dict[str, Any]]:
    """Combinations as documented ("Expanding or adding matrix configurations")."""
    if matrix is None or matrix == {}:
        return [{}]
    if not isinstance(matrix, dict):
        raise WorkflowError(f"{where}: strategy.matrix must be a mapping, not {matrix!r}"[:300])
    base_keys = [k for k in matrix if k not in ("include", "exclude")]
    for key in base_keys:
        if not isinstance(matrix[key], list) or not matrix[key]:
            raise WorkflowError(f"{where}: Matrix vector '{key}' does not contain any values"
                                if matrix[key] == [] else f"{where}: matrix.{key} must be a "
                                "list")
    rules = {}
    for part in ("include", "exclude"):
        rules[part] = matrix.get(part) or []
        if not isinstance(rules[part], list) or not all(isinstance(r, dict)
                                                        for r in rules[part]):
            raise WorkflowError(f"{where}: matrix.{part} must be a list of mappings")
    combos = [dict(zip(base_keys, values, strict=True))
              for values in itertools.product(*(matrix[k] for k in base_keys))] \
        if base_keys else []
    for rule in rules["exclude"]:
        combos = [c for c in combos if not all(c.get(k) == v for k, v in rule.items())]
    originals = [dict(c) for c in combos]
    for extra in rules["include"]:
        matched = False
        for combo, original in zip(combos, originals, strict=True):
            # Added only where it overwrites none of the combination's original values.
            if all(original.get(k, v) == v for k, v in extra.items() if k in base_keys):
                combo.update(extra)
                matched = True
        if not matched:  # a combination of its own, whose values later includes keep
            combos.append(dict(extra))
            originals.append(dict(extra))
    if len(combos) > MAX_MATRIX:
        raise WorkflowError(f"{where}: a matrix may generate at most {MAX_MATRIX} jobs per "
                            f"workflow run, not {len(combos)}")
    return combos


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
    _check_embedded(data.get("env"), str(path), "env")
    jobs: list[GHJob] = []
    for key, raw in jobs_raw.items():
        where = f"{path}:{lines.get(str(key), 0)}"
        jobs += _job(str(key), raw, jobs_raw, defaults, where, lines.get(str(key), 0))
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
    _check_embedded(run, where, "defaults.run")
    return dict(run or {})


def _job(key: str, raw: Any, jobs_raw: dict[str, Any], defaults: dict[str, Any], where: str,
         line: int) -> list[GHJob]:
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
    run_defaults = {**defaults, **_run_defaults(raw.get("defaults"), where)}
    steps_raw = raw.get("steps") or []
    if not isinstance(steps_raw, list):
        raise WorkflowError(f"{where}: job {key!r}: steps must be a list")
    steps = [_step(s, i, where, key) for i, s in enumerate(steps_raw)]
    if not steps:
        raise WorkflowError(f"{where}: job {key!r} has no steps")
    for if_ in [raw.get("if")] + [s.if_ for s in steps]:
        if if_ is not None:
            _check_expression(str(if_), where, key)
    for field_name in ("env", "runs-on", "strategy", "timeout-minutes", "continue-on-error",
                       "name", "outputs", "container", "services"):
        _check_embedded(raw.get(field_name), f"{where}: job {key!r}", field_name)
    for step, step_raw in zip(steps, steps_raw, strict=True):
        _check_embedded(step_raw, f"{where}: job {key!r}: step {step.index + 1}", "step")
    matrix = strategy.get("matrix")
    deferred = has_expression(matrix)  # evaluated when its needs have ended
    combos = [{}] if deferred else expand_matrix(matrix, f"{where}: job {key!r}")
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
        fail_fast=strategy.get("fail-fast", True) is not False,
        line=line, container=container, services=services,
        matrix_source=matrix if deferred else None)
    return [base] if deferred else [instance(base, combo) for combo in combos]


def instance(job: GHJob, combo: dict[str, Any]) -> GHJob:
    """One matrix combination of ``job``, named as GitHub shows it: `key (a, b)`."""
    label = ", ".join(_display(v) for v in combo.values())
    return replace(job, name=f"{job.key} ({label})" if combo else job.key, matrix=combo,
                   matrix_source=None)


def _check_embedded(value: Any, where: str, what: str) -> None:
    """Every `${{ }}` in a field parses (evaluated later, where its contexts exist)."""
    if isinstance(value, dict):
        for sub in value.values():
            _check_embedded(sub, where, what)
    elif isinstance(value, list):
        for sub in value:
            _check_embedded(sub, where, what)
    elif isinstance(value, str) and "${{" in value:
        for body in re.findall(r"\$\{\{(.*?)\}\}", value, re.DOTALL):
            try:
                parse(body)
            except ExpressionError as exc:
                raise WorkflowError(f"{where}: {what}: {exc}") from None


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
    if isinstance(value, dict):
        return ", ".join(_display(v) for v in value.values())
    return str(value).lower() if isinstance(value, bool) else str(value)


def _check_expression(text: str, where: str, job: str) -> None:
    """Parse (not evaluate) conditions up front, so a typo fails before any VM starts."""
    body = text.strip()
    if body.startswith("${{") and body.endswith("}}"):
        body = body[3:-2]
    try:
        evaluate(body, {}, {n: (lambda *a: True) for n in
                            ("success", "failure", "always", "cancelled", "hashFiles")})
    except ExpressionError as exc:
        raise WorkflowError(f"{where}: job {job!r}: {exc}") from None


def _check_cycles(jobs: dict[str, Any], path: Path) -> None:
    graph = {name: [body["needs"]] if isinstance(body.get("needs"), str)
             else list(body.get("needs", [])) for name, body in jobs.items()}
    cycle = find_cycle(graph)
    if cycle:
        raise WorkflowError(f"{path}: needs form a cycle: {' -> '.join(cycle)}")
