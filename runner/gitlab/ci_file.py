"""`.gitlab-ci.yml` to a list of runnable jobs, with GitLab's semantics (doc: ci/yaml).

Order of resolution, as GitLab does it: `include: local` merged under the main file, `extends`
(multi-level, hashes deep-merged, arrays replaced), `!reference`, `default:` (unless
`inherit:default`), then per job `rules` / `only` / `except`, `parallel` expansion and `needs`.
Every error names the file, the line and the job, before any VM starts.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kata_ci.errors import UserError
from kata_ci.runner.core.images import ImageUse
from kata_ci.runner.core.schedule import find_cycle
from kata_ci.runner.core.secrets import secret_problem
from kata_ci.runner.core.services import ServiceUse
from kata_ci.runner.gitlab.image import parse_image, parse_services
from kata_ci.runner.gitlab.keywords import DEFAULT_STAGES
from kata_ci.runner.gitlab.merge import merged_jobs, resolve
from kata_ci.runner.gitlab.rules import decide
from kata_ci.runner.gitlab.source import CIError

__all__ = ["CIError", "CIJob", "Pipeline", "load", "merged_jobs", "parse_duration"]


@dataclass
class CIJob:
    name: str
    stage: str
    before_script: list[str]
    script: list[str]
    after_script: list[str]
    variables: dict[str, str]
    needs: list[str] | None  # None: wait for all earlier stages
    when: str = "on_success"
    allow_failure: bool = False
    allow_exit_codes: list[int] = field(default_factory=list)
    timeout: float | None = None
    unsupported: list[str] = field(default_factory=list)  # keys said once per job
    line: int = 0
    masked: list[str] = field(default_factory=list)  # variables written with masked: true
    image: ImageUse | None = None  # its name (and user) not yet expanded: jobs.job_image
    services: tuple[ServiceUse, ...] = ()  # likewise
    notes: list[str] = field(default_factory=list)  # what of image: kata-ci does not honour


@dataclass
class Pipeline:
    path: Path
    stages: list[str]
    jobs: list[CIJob]

    def job(self, name: str) -> CIJob:
        for job in self.jobs:
            if job.name == name:
                return job
        raise CIError(f"{self.path}: no job named {name!r} "
                      f"(jobs: {', '.join(j.name for j in self.jobs)})")

    def named(self, name: str) -> list[CIJob]:
        """The job, or every variant of a parallel/matrix job by its base name."""
        variants = [j for j in self.jobs if j.name.startswith((f"{name}: [", f"{name} "))
                    and j.name != name]
        return variants if variants and not any(j.name == name for j in self.jobs) \
            else [self.job(name)]


def load(path: Path, project: Path, variables: Mapping[str, str],
         changed: Sequence[str] | None = None) -> Pipeline:
    """Parse and resolve ``path``; ``variables`` are the predefined + user ones for rules,
    ``changed`` the files `rules: changes` sees (the run's RepoSnapshot.changed, read once
    before any job; None: unknown, every file counts as changed)."""
    merged = resolve(path, project, variables)
    data, lines, where = merged.data, merged.lines, merged.where
    stages = data.get("stages") or DEFAULT_STAGES
    if not isinstance(stages, list) or not all(isinstance(s, str) for s in stages):
        raise CIError(f"{where('stages')}: stages must be a list of names")
    stages = [".pre", *[s for s in stages if s not in (".pre", ".post")], ".post"]
    global_vars = _variables(data.get("variables", {}), where("variables"))
    global_masked = _masked(data.get("variables", {}), where("variables"))
    jobs: list[CIJob] = []
    for name, body in merged.jobs.items():
        own = body.get("variables", {})
        job_vars = {**global_vars, **_variables(own, where(name))}
        masked = (global_masked - set(own)) | _masked(own, where(name))
        if body.get("inherit", {}).get("variables") is False:
            job_vars = _variables(own, where(name))
            masked = _masked(own, where(name))
        for job in _expand(name, body, job_vars, stages, where(name), project, variables,
                           changed):
            job.masked = sorted(masked)
            jobs.append(job)
    _check_needs(jobs, path, lines)
    return Pipeline(path=path, stages=stages, jobs=jobs)


def _variables(raw: Any, where: str) -> dict[str, str]:
    if not isinstance(raw, dict):
        raise CIError(f"{where}: variables must be a mapping")
    out = {}
    for key, value in raw.items():
        if isinstance(value, dict):
            value = value.get("value", "")
        out[str(key)] = "" if value is None else str(value).lower() \
            if isinstance(value, bool) else str(value)
    return out


def _masked(raw: dict[Any, Any], where: str) -> set[str]:
    """Names of the variables written as `NAME: {value: ..., masked: true}`; a literal value
    too short to mask is refused here (an expanded one when its job is built)."""
    names = set()
    for key, value in raw.items():
        if not isinstance(value, dict) or "masked" not in value:
            continue
        if not isinstance(value["masked"], bool):
            raise CIError(f"{where}: variable {key}: masked must be true or false")
        text = str(value.get("value", "") or "")
        problem = secret_problem(text) if "$" not in text else None
        if value["masked"] and problem:
            raise CIError(f"{where}: variable {key} is masked but its value {problem}")
        if value["masked"]:
            names.add(str(key))
    return names


def _script(value: Any, where: str, key: str) -> list[str]:
    """Script lines; nested arrays (from !reference) are flattened as GitLab does."""
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if not isinstance(value, list):
        raise CIError(f"{where}: {key} must be a string or a list of strings")
    out: list[str] = []
    for item in value:
        out.extend(_script(item, where, key) if isinstance(item, list) else [str(item)])
    return out


def _expand(name: str, body: dict[str, Any], job_vars: dict[str, str], stages: list[str],
            where: str, project: Path, predefined: Mapping[str, str],
            changed: Sequence[str] | None) -> list[CIJob]:
    stage = body.get("stage", "test")
    if stage not in stages:
        raise CIError(f"{where}: job {name!r}: stage {stage!r} is not in stages {stages[1:-1]}")
    if "script" not in body and "trigger" not in body:
        raise CIError(f"{where}: job {name!r} has no script")
    variants: list[tuple[str, dict[str, str]]] = [(name, {})]
    parallel = body.get("parallel")
    if isinstance(parallel, int):
        variants = [(f"{name} {i}/{parallel}",
                     {"CI_NODE_INDEX": str(i), "CI_NODE_TOTAL": str(parallel)})
                    for i in range(1, parallel + 1)]
    elif isinstance(parallel, dict) and "matrix" in parallel:
        variants = []
        for entry in parallel["matrix"]:
            keys = list(entry)
            values = [v if isinstance(v, list) else [v] for v in entry.values()]
            for combo in itertools.product(*values):
                label = ", ".join(str(c) for c in combo)
                variants.append((f"{name}: [{label}]", dict(zip(keys, map(str, combo),
                                                                strict=True))))
    try:
        image, notes = parse_image(body.get("image"), f"{where}: job {name!r}: image")
        services, more = parse_services(body.get("services"),
                                        f"{where}: job {name!r}: services")
        notes += more
    except UserError as exc:
        raise CIError(str(exc)) from None
    jobs = []
    for index, (job_name, extra) in enumerate(variants, 1):
        env = {**predefined, **job_vars, **extra, "CI_JOB_NAME": job_name, "CI_JOB_STAGE": stage}
        if parallel and "CI_NODE_INDEX" not in extra:
            env.update(CI_NODE_INDEX=str(index), CI_NODE_TOTAL=str(len(variants)))
        when, allow = decide(body, env, where, name, project, changed)
        if when == "never":
            continue
        allow_failure = body.get("allow_failure", False)
        codes = []
        if isinstance(allow_failure, dict):
            exit_codes = allow_failure.get("exit_codes", [])
            codes = [exit_codes] if isinstance(exit_codes, int) else list(exit_codes)
            allow_failure = False
        if allow is not None:
            allow_failure = allow
        needs = body.get("needs")
        jobs.append(CIJob(
            name=job_name, stage=stage,
            before_script=_script(body.get("before_script"), where, "before_script"),
            script=_script(body.get("script"), where, "script"),
            after_script=_script(body.get("after_script"), where, "after_script"),
            variables={**job_vars, **extra, "CI_JOB_NAME": job_name, "CI_JOB_STAGE": stage},
            needs=None if needs is None else [n if isinstance(n, str) else n["job"]
                                              for n in needs],
            when=when, allow_failure=bool(allow_failure) or (when == "manual" and "rules"
                                                             not in body),
            allow_exit_codes=codes, timeout=parse_duration(body.get("timeout"), where),
            line=int(where.rsplit(":", 1)[1]), image=image, services=services,
            notes=list(notes)))
    return jobs


def parse_duration(value: Any, where: str) -> float | None:
    if value is None:
        return None
    total, text = 0.0, str(value)
    units = {"s": 1, "sec": 1, "second": 1, "m": 60, "min": 60, "minute": 60, "h": 3600,
             "hour": 3600, "hr": 3600, "d": 86400, "day": 86400}
    for number, unit in re.findall(r"(\d+(?:\.\d+)?)\s*([a-z]*)", text):
        unit = unit.rstrip("s") if unit not in units else unit
        if unit not in units and unit:
            raise CIError(f"{where}: cannot read timeout {text!r}")
        total += float(number) * units.get(unit or "s", 1)
    if total <= 0:
        raise CIError(f"{where}: cannot read timeout {text!r}")
    return total


def _check_needs(jobs: list[CIJob], path: Path, lines: dict[str, int]) -> None:
    names = {j.name for j in jobs}
    base = {j.name.split(" ")[0].split(":")[0]: j for j in jobs}
    graph: dict[str, list[str]] = {}
    for job in jobs:
        if job.needs is None:
            continue
        resolved = []
        for need in job.needs:
            if need in names:
                resolved.append(need)
            elif need in base:  # needs on a parallel job: all of its variants
                resolved.extend(j.name for j in jobs if j.name.startswith(need + " ")
                                or j.name.startswith(need + ":"))
            else:
                raise CIError(f"{path}:{job.line}: job {job.name!r} needs {need!r}, "
                              "which is not a job of this pipeline")
        job.needs = resolved
        graph[job.name] = resolved
    cycle = find_cycle(graph)
    if cycle:
        raise CIError(f"{path}: needs form a cycle: {' -> '.join(cycle)}")
