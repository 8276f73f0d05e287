"""GitHub workflow files to runnable jobs (doc: actions/using-workflows/workflow-syntax).

`on:` filters by event, `strategy.matrix` expands with include/exclude as documented, and
unknown keys are refused with the file, line and job, before any VM starts. Expressions are
kept as text: they are evaluated while the job runs (runner/github_run.py).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from kata_ci.errors import UserError
from kata_ci.runner.core import beneath
from kata_ci.runner.core.schedule import find_cycle
from kata_ci.runner.github.container import Container, parse_container, parse_services
from kata_ci.runner.github.expr import ExpressionError, evaluate

WORKFLOW_KEYS = {"name", "run-name", "on", "permissions", "env", "defaults", "concurrency",
                 "jobs"}
JOB_KEYS = {"name", "needs", "runs-on", "permissions", "environment", "concurrency",
            "outputs", "env", "defaults", "if", "steps", "timeout-minutes", "strategy",
            "continue-on-error", "container", "services", "uses", "with", "secrets"}
STEP_KEYS = {"id", "if", "name", "uses", "run", "working-directory", "shell", "with", "env",
             "continue-on-error", "timeout-minutes"}


class WorkflowError(UserError):
    pass


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
    timeout_minutes: float | None


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
    timeout_minutes: float | None  # None: kata-ci's timeout applies
    continue_on_error: Any
    outputs: dict[str, str]
    fail_fast: bool
    unsupported: list[str] = field(default_factory=list)  # keys noted once per job
    line: int = 0
    container: Container | None = None  # its expressions rendered when the job is built
    services: dict[str, Container] = field(default_factory=dict)  # id -> container, likewise


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
    if not matrix:
        return [{}]
    if isinstance(matrix, str):
        raise WorkflowError(f"{where}: matrix from an expression ({matrix}) is not supported")
    base_keys = [k for k in matrix if k not in ("include", "exclude")]
    for key in base_keys:
        if not isinstance(matrix[key], list):
            raise WorkflowError(f"{where}: matrix.{key} must be a list")
    combos = [dict(zip(base_keys, values, strict=True))
              for values in itertools.product(*(matrix[k] for k in base_keys))] \
        if base_keys else []
    for rule in matrix.get("exclude", []) or []:
        combos = [c for c in combos if not all(c.get(k) == v for k, v in rule.items())]
    originals = [dict(c) for c in combos]
    for extra in matrix.get("include", []) or []:
        matched = False
        for combo, original in zip(combos, originals, strict=True):
            # Added only where it overwrites none of the combination's original values.
            if all(original.get(k, v) == v for k, v in extra.items() if k in base_keys):
                combo.update(extra)
                matched = True
        if not matched:
            combos.append(dict(extra))
    return combos


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
        data = yaml.safe_load(text)
        node = yaml.compose(text)
    except yaml.YAMLError as exc:
        raise WorkflowError(f"{path}: invalid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise WorkflowError(f"{path}: the top level must be a mapping")
    if True in data:  # YAML 1.1 reads the key `on` as the boolean true
        data["on"] = data.pop(True)
    unknown = set(data) - WORKFLOW_KEYS
    if unknown:
        keys = ", ".join(sorted(map(str, unknown)))
        raise WorkflowError(f"{path}: unknown top-level keys: {keys}")
    lines: dict[str, int] = {}
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            if key.value == "jobs" and isinstance(value, yaml.MappingNode):
                lines = {k.value: k.start_mark.line + 1 for k, _ in value.value}
    jobs_raw = data.get("jobs")
    if not isinstance(jobs_raw, dict) or not jobs_raw:
        raise WorkflowError(f"{path}: a workflow needs a `jobs` mapping")
    defaults = (data.get("defaults") or {}).get("run", {}) or {}
    jobs: list[GHJob] = []
    for key, raw in jobs_raw.items():
        where = f"{path}:{lines.get(key, 0)}"
        if not isinstance(raw, dict):
            raise WorkflowError(f"{where}: job {key!r} must be a mapping")
        unknown = set(raw) - JOB_KEYS
        if unknown:
            raise WorkflowError(f"{where}: job {key!r} has unknown keys: "
                                f"{', '.join(sorted(unknown))}")
        if "uses" in raw:
            raise WorkflowError(f"{where}: job {key!r}: reusable workflows (jobs.<id>.uses) "
                                "cannot be fetched here")
        needs = raw.get("needs", [])
        needs = [needs] if isinstance(needs, str) else list(needs)
        for need in needs:
            if need not in jobs_raw:
                raise WorkflowError(f"{where}: job {key!r} needs {need!r}, which is not a job "
                                    "of this workflow")
        strategy = raw.get("strategy") or {}
        job_defaults = (raw.get("defaults") or {}).get("run", {}) or {}
        steps = [_step(s, i, where, key) for i, s in enumerate(raw.get("steps") or [])]
        if not steps:
            raise WorkflowError(f"{where}: job {key!r} has no steps")
        for if_ in [raw.get("if")] + [s.if_ for s in steps]:
            if if_ is not None:
                _check_expression(str(if_), where, key)
        combos = expand_matrix(strategy.get("matrix"), f"{where}: job {key!r}")
        try:
            container = parse_container(raw.get("container"), where, key)
            services = parse_services(raw.get("services"), where, key)
        except UserError as exc:
            raise WorkflowError(str(exc)) from None
        for combo in combos:
            label = ", ".join(_display(v) for v in combo.values())
            jobs.append(GHJob(
                key=key, name=f"{key} ({label})" if combo else key, needs=needs,
                if_=None if raw.get("if") is None else str(raw["if"]), matrix=combo,
                env=_text_map(raw.get("env"), where, "env"),
                shell=job_defaults.get("shell", defaults.get("shell")),
                working_directory=job_defaults.get("working-directory",
                                                   defaults.get("working-directory")),
                steps=steps, timeout_minutes=_minutes(raw.get("timeout-minutes"), where, key),
                continue_on_error=raw.get("continue-on-error", False),
                outputs=_text_map(raw.get("outputs"), where, "outputs"),
                fail_fast=bool(strategy.get("fail-fast", True)),
                line=lines.get(key, 0), container=container, services=services))
    _check_cycles(jobs_raw, path)
    return Workflow(path=path, name=str(data.get("name", path.name)),
                    events=events_of(data.get("on")),
                    env=_text_map(data.get("env"), str(path), "env"), jobs=jobs)


def _minutes(value: Any, where: str, job: str) -> float | None:
    """timeout-minutes: a positive number (an expression there is not supported)."""
    if value is None:
        return None
    try:
        minutes = float(value)
    except (TypeError, ValueError):
        minutes = -1.0
    if isinstance(value, bool) or not minutes > 0:
        raise WorkflowError(f"{where}: job {job!r}: timeout-minutes must be a positive number, "
                            f"not {value!r}")
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
