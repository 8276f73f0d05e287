"""`.gitlab-ci.yml` to a list of runnable jobs, with GitLab's semantics (doc: ci/yaml).

Order of resolution, as GitLab does it: `include: local` merged under the main file, `extends`
(multi-level, hashes deep-merged, arrays replaced), `!reference`, `default:` (unless
`inherit:default`), then per job `rules` / `only` / `except`, `parallel` expansion and `needs`.
Every error names the file, the line and the job, before any VM starts.
"""

from __future__ import annotations

import fnmatch
import itertools
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from kata_ci.errors import UserError
from kata_ci.runner.core import beneath
from kata_ci.runner.core.images import ImageUse
from kata_ci.runner.core.schedule import find_cycle
from kata_ci.runner.core.secrets import secret_problem
from kata_ci.runner.core.services import ServiceUse
from kata_ci.runner.gitlab.expr import evaluate
from kata_ci.runner.gitlab.image import parse_image, parse_services

JOB_KEYS = {
    "after_script", "allow_failure", "artifacts", "before_script", "cache", "coverage",
    "dependencies", "environment", "extends", "hooks", "id_tokens", "identity", "image",
    "inherit", "interruptible", "manual_confirmation", "needs", "only", "except", "pages",
    "parallel", "release", "resource_group", "retry", "rules", "script", "secrets", "services",
    "stage", "tags", "timeout", "trigger", "variables", "when", "start_in", "run",
    "dast_configuration",
}
GLOBAL_KEYS = {"default", "include", "stages", "variables", "workflow", "image", "services",
               "cache", "before_script", "after_script", "spec"}
DEFAULT_KEYS = {"after_script", "artifacts", "before_script", "cache", "hooks", "id_tokens",
                "image", "interruptible", "retry", "services", "tags", "timeout"}
DEFAULT_STAGES = [".pre", "build", "test", "deploy", ".post"]
WHENS = {"on_success", "on_failure", "always", "manual", "never", "delayed"}


class Reference(list[str]):
    """A `!reference [job, key, ...]` not yet resolved."""


class _Loader(yaml.SafeLoader):
    pass


_Loader.add_constructor("!reference", lambda loader, node: Reference(
    loader.construct_sequence(node)))  # type: ignore[arg-type]


class CIError(UserError):
    pass


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


def _load_yaml(path: Path, project: Path) -> tuple[dict[str, Any], dict[str, int]]:
    """``path`` read beneath ``project`` when it lies in it: a job may have made it a link
    to a host file (refused, the content never shown)."""
    text = beneath.read_named(project, path)
    try:
        data = yaml.load(text, Loader=_Loader)
        node = yaml.compose(text, Loader=_Loader)
    except yaml.YAMLError as exc:
        raise CIError(f"{path}: invalid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise CIError(f"{path}: the top level must be a mapping of jobs and keywords")
    lines = {}
    if isinstance(node, yaml.MappingNode):
        lines = {k.value: k.start_mark.line + 1 for k, _ in node.value
                 if isinstance(k, yaml.ScalarNode)}
    return data, lines


def deep_merge(base: Any, override: Any) -> Any:
    """GitLab's extends merge: hashes merge key by key, anything else is replaced."""
    if isinstance(base, dict) and isinstance(override, dict):
        merged = dict(base)
        for key, value in override.items():
            merged[key] = deep_merge(base.get(key), value) if key in base else value
        return merged
    return override


@dataclass
class _Resolved:
    data: dict[str, Any]
    lines: dict[str, int]
    jobs: dict[str, dict[str, Any]]  # after extends and !reference, hidden ones included

    def where(self, name: str) -> str:
        return f"{self.path}:{self.lines.get(name, 0)}"

    path: Path = Path()


def merged_jobs(path: Path, project: Path) -> _Resolved:
    """Jobs as GitLab sees them after include, extends and !reference (before default)."""
    data, lines = _load_yaml(path, project)
    data = _with_includes(data, path, project, lines)
    def where(name: str) -> str:
        return f"{path}:{lines.get(name, 0)}"

    raw_jobs = {k: v for k, v in data.items() if k not in GLOBAL_KEYS}
    for name, body in raw_jobs.items():
        if not isinstance(body, dict):
            raise CIError(f"{where(name)}: job {name!r} must be a mapping")
        unknown = set(body) - JOB_KEYS
        if unknown:
            raise CIError(f"{where(name)}: job {name!r} config contains unknown keys: "
                          f"{', '.join(sorted(unknown))}")
    resolved = {n: _extends(n, raw_jobs, where, []) for n in raw_jobs}
    resolved = {n: _references(body, resolved, where(n), n) for n, body in resolved.items()}
    return _Resolved(data=data, lines=lines, jobs=resolved, path=path)


def load(path: Path, project: Path, variables: Mapping[str, str],
         changed: Sequence[str] | None = None) -> Pipeline:
    """Parse and resolve ``path``; ``variables`` are the predefined + user ones for rules,
    ``changed`` the files `rules: changes` sees (the run's RepoSnapshot.changed, read once
    before any job; None: unknown, every file counts as changed)."""
    merged = merged_jobs(path, project)
    data, lines, resolved, where = merged.data, merged.lines, merged.jobs, merged.where
    stages = data.get("stages") or DEFAULT_STAGES
    if not isinstance(stages, list) or not all(isinstance(s, str) for s in stages):
        raise CIError(f"{where('stages')}: stages must be a list of names")
    stages = [".pre", *[s for s in stages if s not in (".pre", ".post")], ".post"]
    default = _references(data.get("default", {}) or {}, resolved, where("default"), "default")
    for key in ("image", "services", "cache", "before_script", "after_script"):
        if key in data and key not in default:  # deprecated global forms of default:
            default[key] = data[key]
    global_vars = _variables(data.get("variables", {}), where("variables"))
    global_masked = _masked(data.get("variables", {}), where("variables"))
    jobs: list[CIJob] = []
    for name, body in resolved.items():
        if name.startswith("."):
            continue  # hidden job: a template only
        body = _apply_default(body, default)
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


def _with_includes(data: dict[str, Any], path: Path, project: Path,
                   lines: dict[str, int]) -> dict[str, Any]:
    includes = data.pop("include", None)
    if includes is None:
        return data
    merged: dict[str, Any] = {}
    for item in includes if isinstance(includes, list) else [includes]:
        spec = {"local": item} if isinstance(item, str) and not item.startswith("http") else item
        if isinstance(item, str) and item.startswith("http"):
            spec = {"remote": item}
        if not isinstance(spec, dict) or "local" not in spec:
            kind = next(iter(spec), "?") if isinstance(spec, dict) else "?"
            raise CIError(f"{path}:{lines.get('include', 0)}: include: {kind} {spec!r} cannot "
                          "be fetched here (kata-ci runs without network access); vendor the "
                          "file into the repository and use include: local")
        for rel in beneath.glob(project, str(spec["local"])):
            target = project / rel
            sub, _ = _load_yaml(target, project)
            merged = deep_merge(merged, _with_includes(sub, target, project, {}))
    result: dict[str, Any] = deep_merge(merged, data)  # the including file wins
    return result


def _extends(name: str, jobs: dict[str, Any], where: Any, chain: list[str]) -> dict[str, Any]:
    if name in chain:
        raise CIError(f"{where(chain[0])}: job {chain[0]!r}: circular extends: "
                      f"{' -> '.join([*chain, name])}")
    if len(chain) > 10:
        raise CIError(f"{where(chain[0])}: job {chain[0]!r}: extends nests deeper than 11")
    body = jobs[name]
    parents = body.get("extends", [])
    merged: dict[str, Any] = {}
    for parent in [parents] if isinstance(parents, str) else parents:
        if parent not in jobs:
            raise CIError(f"{where(name)}: job {name!r} extends unknown job {parent!r}")
        merged = deep_merge(merged, _extends(parent, jobs, where, [*chain, name]))
    own = {k: v for k, v in body.items() if k != "extends"}
    result: dict[str, Any] = deep_merge(merged, own)
    return result


def _references(value: Any, jobs: dict[str, Any], where: str, name: str) -> Any:
    if isinstance(value, Reference):
        target: Any = jobs
        for key in value:
            if not isinstance(target, dict) or key not in target:
                raise CIError(f"{where}: job {name!r}: !reference {list(value)} not found")
            target = target[key]
        return _references(target, jobs, where, name)
    if isinstance(value, dict):
        return {k: _references(v, jobs, where, name) for k, v in value.items()}
    if isinstance(value, list):
        return [_references(v, jobs, where, name) for v in value]
    return value


def _apply_default(body: dict[str, Any], default: dict[str, Any]) -> dict[str, Any]:
    inherit = body.get("inherit", {}).get("default", True)
    keys = DEFAULT_KEYS if inherit is True else set(inherit or []) & DEFAULT_KEYS
    return {**{k: v for k, v in default.items() if k in keys}, **body}


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
        when, allow = _decide(body, env, where, name, project, changed)
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


def _decide(body: dict[str, Any], env: Mapping[str, str], where: str, name: str,
            project: Path, changed: Sequence[str] | None) -> tuple[str, bool | None]:
    """(when, allow_failure override) from rules, or from only/except, or from `when`."""
    when = body.get("when", "on_success")
    if when not in WHENS:
        raise CIError(f"{where}: job {name!r}: unknown when: {when!r}")
    if "rules" in body:
        for rule in body["rules"]:
            if "if" in rule and not evaluate(str(rule["if"]), env):
                continue
            if "exists" in rule and not _exists(rule["exists"], project):
                continue
            if "changes" in rule and not _changes(rule["changes"], changed):
                continue
            return rule.get("when", when), rule.get("allow_failure")
        return "never", None
    ref = env.get("CI_COMMIT_REF_NAME", "")
    is_tag = bool(env.get("CI_COMMIT_TAG"))
    if "only" in body and not _refs_match(body["only"], ref, is_tag, env):
        return "never", None
    if "except" in body and _refs_match(body["except"], ref, is_tag, env):
        return "never", None
    return when, None


def _refs_match(spec: Any, ref: str, is_tag: bool, env: Mapping[str, str]) -> bool:
    refs = spec.get("refs", []) if isinstance(spec, dict) else spec
    for item in [refs] if isinstance(refs, str) else refs:
        if (item in ("branches", "pushes") and not is_tag) or (item == "tags" and is_tag):
            return True
        if item == env.get("CI_PIPELINE_SOURCE"):
            return True
        match = re.fullmatch(r"/(.*)/([a-z]*)", item)
        if match and re.search(match.group(1), ref):
            return True
        if item == ref:
            return True
    return False


def _exists(patterns: Any, project: Path) -> bool:
    items = patterns.get("paths", []) if isinstance(patterns, dict) else patterns
    return any(beneath.glob(project, str(p)) for p in items)


def _changes(patterns: Any, changed: Sequence[str] | None) -> bool:
    """Locally there is no push: the files that differ between the working tree and HEAD~1,
    as the run's RepoSnapshot read them (git never runs here: jobs may have rewritten .git
    by now). Outside git (or on the first commit) every file counts as changed, as GitLab
    does for a new branch."""
    items = patterns.get("paths", []) if isinstance(patterns, dict) else patterns
    if changed is None:
        return True
    return any(fnmatch.fnmatch(f, str(p)) for f in changed for p in items)


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
