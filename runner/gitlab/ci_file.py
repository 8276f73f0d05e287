"""`.gitlab-ci.yml` to a list of runnable jobs, with GitLab's semantics (doc: ci/yaml).

Order of resolution, as GitLab does it: `include: local` merged under the main file, `extends`
(multi-level, hashes deep-merged, arrays replaced), `!reference`, `default:` (unless
`inherit:default`), then per job `rules` / `only` / `except`, `parallel` expansion and `needs`.
Every error names the file, the line and the job, before any VM starts.
"""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kata_ci.errors import UserError
from kata_ci.runner.core.images import ImageUse
from kata_ci.runner.core.secrets import secret_problem
from kata_ci.runner.core.services import ServiceUse
from kata_ci.runner.gitlab.image import parse_image, parse_services
from kata_ci.runner.gitlab.keywords import DEFAULT_STAGES
from kata_ci.runner.gitlab.merge import merged_jobs, resolve
from kata_ci.runner.gitlab.needs import check_needs, parse_needs, scalar, variants_of
from kata_ci.runner.gitlab.rules import FILTERED, decide, workflow
from kata_ci.runner.gitlab.source import CIError
from kata_ci.runner.gitlab.validate import check_variables

__all__ = ["CIError", "CIJob", "Pipeline", "load", "merged_jobs", "parse_duration"]


def slug(text: str) -> str:
    """GitLab's *_SLUG (predefined_variables.md, CI_COMMIT_REF_SLUG): lowercased, every other
    character as `-`, cut to 63 bytes, then no leading or trailing `-` (Gitlab::Utils.slugify
    cuts before it strips, so a cut never leaves a trailing `-`)."""
    return re.sub(r"[^a-z0-9]", "-", text.lower())[:63].strip("-")


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
    notes: list[str] = field(default_factory=list)  # what kata-ci does not honour, said on run
    optional: set[str] = field(default_factory=set)  # needs written with optional: true
    # needs:parallel:matrix: an instance name -> {"": base job, variable: value, ...}
    matrix_needs: dict[str, dict[str, str]] = field(default_factory=dict)
    played: bool = False  # a manual job triggered by --manual or by its name (CI_JOB_MANUAL)


@dataclass
class Pipeline:
    path: Path
    stages: list[str]
    jobs: list[CIJob]
    empty: str = ""  # why nothing runs: GitLab's words (workflow rules, every job excluded)
    name: str = ""  # workflow:name

    def job(self, name: str) -> CIJob:
        for job in self.jobs:
            if job.name == name:
                return job
        raise CIError(f"{self.path}: no job named {name!r} "
                      f"(jobs: {', '.join(j.name for j in self.jobs)})")

    def named(self, name: str) -> list[CIJob]:
        """The job, or every variant of a parallel/matrix job by its base name. `job: [1/2]`
        names GitLab's `job 1/2` too (the spelling the matrix form uses)."""
        alias = re.fullmatch(r"(.*): \[(\d+/\d+)\]", name, re.S)
        if alias and not any(j.name == name for j in self.jobs):
            name = f"{alias.group(1)} {alias.group(2)}"
        if any(j.name == name for j in self.jobs):
            return [self.job(name)]
        variants = set(variants_of(self.jobs, name))
        return [j for j in self.jobs if j.name in variants] or [self.job(name)]


def load(path: Path, project: Path, variables: Mapping[str, str],
         changed: Sequence[str] | None = None,
         user: Mapping[str, str] | None = None) -> Pipeline:
    """Parse and resolve ``path``; ``variables`` are the predefined + user ones (`include`
    paths use them), ``user`` the --var ones again: rules see them over the file's own, as
    GitLab's pipeline variables win over YAML ones (ci/variables "CI/CD variable precedence").
    ``changed``: the files `rules: changes` sees (the run's RepoSnapshot.changed, read once
    before any job; None: unknown, every file counts as changed)."""
    user = dict(user or {})
    merged = resolve(path, project, variables)
    data, where = merged.data, merged.where
    stages = data.get("stages") or DEFAULT_STAGES
    if not isinstance(stages, list) or not all(isinstance(s, str) for s in stages):
        raise CIError(f"{where('stages')}: stages config should be an array of strings")
    stages = [".pre", *[s for s in stages if s not in (".pre", ".post")], ".post"]
    raw_globals = data.get("variables", {})
    check_variables(raw_globals, f"{where('variables')}: variables")
    file_globals = _variables(raw_globals, where("variables"))
    # workflow:rules see the global variables too (GitLab evaluates them in the pipeline's
    # global context: predefined < YAML globals < pipeline variables)
    runs, pipeline_vars, title = workflow(data.get("workflow"),
                                          {**variables, **file_globals, **user},
                                          where("workflow"), project, changed)
    if not runs:
        return Pipeline(path=path, stages=stages, jobs=[], empty=FILTERED, name=title)
    global_vars = {**file_globals, **pipeline_vars}
    global_masked = _masked(raw_globals, where("variables"))
    rule_env = {**variables, **pipeline_vars}
    jobs: list[CIJob] = []
    for name, body in merged.jobs.items():
        own = body.get("variables", {})
        job_vars = {**global_vars, **_variables(own, where(name))}
        masked = (global_masked - set(own)) | _masked(own, where(name))
        inherit = body.get("inherit", {}).get("variables", True)
        if inherit is not True:  # false, or the list of global variables to keep
            kept = set(inherit or [])
            job_vars = {**{k: v for k, v in global_vars.items() if k in kept},
                        **_variables(own, where(name))}
            masked = {m for m in global_masked if m in kept} | _masked(own, where(name))
        for job in _expand(name, body, job_vars, stages, where(name), project, rule_env,
                           changed, user):
            job.masked = sorted(masked)
            jobs.append(job)
    _check_unique(jobs, path)
    check_needs(jobs, set(merged.jobs), path, stages)
    empty = "" if jobs else "No stages / jobs for this pipeline."
    return Pipeline(path=path, stages=stages, jobs=jobs, empty=empty, name=str(title))


def _check_unique(jobs: list[CIJob], path: Path) -> None:
    """Job names are what kata-ci runs, lists and reports by: a parallel instance may not
    take the name of another job (`test 1/2` defined as a job beside `test: parallel: 2`),
    nor may two matrix entries make the same instance."""
    seen: dict[str, CIJob] = {}
    for job in jobs:
        if job.name in seen:
            raise CIError(f"{path}:{job.line}: job {job.name!r}: the name is used twice "
                          f"(also at line {seen[job.name].line}); job names must be unique")
        seen[job.name] = job


def _variables(raw: Any, where: str) -> dict[str, str]:
    if not isinstance(raw, dict):
        raise CIError(f"{where}: variables must be a mapping")
    out = {}
    for key, value in raw.items():
        if isinstance(value, dict):
            value = value.get("value", "")
        out[str(key)] = scalar(value)
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
            changed: Sequence[str] | None, user: Mapping[str, str]) -> list[CIJob]:
    stage = body.get("stage", "test")
    if stage not in stages:
        raise CIError(f"{where}: job {name!r}: stage {stage!r} is not in stages {stages[1:-1]}")
    if "script" not in body and "trigger" not in body:
        raise CIError(f"{where}: job {name!r} has no script")
    variants: list[tuple[str, dict[str, str]]] = [(name, {})]
    parallel = body.get("parallel")
    if isinstance(parallel, int) and not isinstance(parallel, bool):
        variants = [(f"{name} {i}/{parallel}",
                     {"CI_NODE_INDEX": str(i), "CI_NODE_TOTAL": str(parallel)})
                    for i in range(1, parallel + 1)]
    elif isinstance(parallel, dict) and "matrix" in parallel:
        variants = []
        # validate.py bounds the matrix (hashes of scalars, at most 200 jobs)
        for entry in parallel["matrix"] if isinstance(parallel["matrix"], list) else []:
            if not isinstance(entry, dict):
                continue
            keys = list(map(str, entry))
            values = [v if isinstance(v, list) else [v] for v in entry.values()]
            for combo in itertools.product(*values):
                label = ", ".join(map(scalar, combo))
                variants.append((f"{name}: [{label}]", dict(zip(keys, map(scalar, combo),
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
        env.update(user)  # --var wins over the file's variables, in rules as in the job
        decision = decide(body, env, where, name, project, changed)
        when, allow = decision.when, decision.allow_failure
        if when == "never":
            continue
        notes_here = list(notes)
        if when == "delayed":
            start_in = decision.start_in or body.get("start_in")
            notes_here.append(f"when: delayed (start_in: {start_in}): kata-ci starts the job "
                              "without waiting")
        # allow_failure's default is true for a job-level `when: manual`, false otherwise;
        # `when: manual` from rules keeps false (ci/yaml "allow_failure", "rules:when")
        allow_failure = body.get("allow_failure", body.get("when") == "manual")
        codes = []
        if isinstance(allow_failure, dict):
            exit_codes = allow_failure.get("exit_codes", [])
            codes = [exit_codes] if isinstance(exit_codes, int) else list(exit_codes)
            allow_failure = False
        if allow is not None:  # rules:allow_failure replaces the job's, exit_codes included
            allow_failure, codes = allow, []
        matrix_needs: dict[str, dict[str, str]] = {}
        needs, optional = parse_needs(decision.needs if decision.needs is not None
                                 else body.get("needs"), notes_here, matrix_needs)
        own = {**job_vars, **decision.variables, **extra}
        jobs.append(CIJob(
            name=job_name, stage=stage,
            before_script=_script(body.get("before_script"), where, "before_script"),
            script=_script(body.get("script"), where, "script"),
            after_script=_script(body.get("after_script"), where, "after_script"),
            variables={**own, "CI_JOB_NAME": job_name, "CI_JOB_STAGE": stage,
                       "CI_JOB_NAME_SLUG": slug(job_name),
                       **({"CI_NODE_INDEX": env["CI_NODE_INDEX"],
                           "CI_NODE_TOTAL": env["CI_NODE_TOTAL"]} if parallel else {})},
            needs=needs, optional=optional, matrix_needs=matrix_needs,
            when=when, allow_failure=allow_failure is True,
            allow_exit_codes=codes, timeout=parse_duration(body.get("timeout"), where),
            line=int(where.rsplit(":", 1)[1]), image=image, services=services,
            notes=notes_here))
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
    if not 0 < total < math.inf:
        raise CIError(f"{where}: cannot read timeout {text[:80]!r}")
    return total
