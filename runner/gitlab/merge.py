"""Jobs as GitLab resolves them before rules: `extends` (multi-level, hashes deep-merged,
arrays replaced), then `!reference`, then `default:` (unless `inherit:default`)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kata_ci.runner.gitlab.keywords import DEFAULT_KEYS, GLOBAL_KEYS, JOB_KEYS
from kata_ci.runner.gitlab.source import CIError, Reference, deep_merge, load_yaml, with_includes


@dataclass
class Resolved:
    """A pipeline file as GitLab's merged view shows it: includes merged, `extends` and
    `!reference` resolved, `default:` (and the deprecated global forms) applied to each job.
    What happens per job after this (rules, parallel, needs) is ci_file.py's."""

    path: Path
    data: dict[str, Any]  # the top-level keywords (stages, variables, workflow, default...)
    lines: dict[str, int]  # top-level key -> line in ``path``
    jobs: dict[str, dict[str, Any]]  # visible jobs in file order, default: applied
    templates: dict[str, dict[str, Any]]  # every job and hidden key after extends/!reference

    def where(self, name: str) -> str:
        return f"{self.path}:{self.lines.get(name, 0)}"


def merged_jobs(path: Path, project: Path) -> Resolved:
    """Jobs as GitLab sees them after include, extends and !reference (before default)."""
    data, lines = load_yaml(path, project)
    data = with_includes(data, path, project, lines)
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
    resolved = {n: references(body, resolved, where(n), n) for n, body in resolved.items()}
    return Resolved(path=path, data=data, lines=lines, jobs=resolved, templates=resolved)


def resolve(path: Path, project: Path, variables: Mapping[str, str]) -> Resolved:
    """The whole merged configuration; ``variables`` (predefined + user) are those
    `include` paths may use."""
    del variables  # include paths with variables: not yet
    merged = merged_jobs(path, project)
    data, templates = merged.data, merged.templates
    default = references(data.get("default", {}) or {}, templates, merged.where("default"),
                         "default")
    for key in ("image", "services", "cache", "before_script", "after_script"):
        if key in data and key not in default:  # deprecated global forms of default:
            default[key] = data[key]
    data = {**data, "default": default}
    jobs = {name: apply_default(body, default) for name, body in templates.items()
            if not name.startswith(".")}
    return Resolved(path=path, data=data, lines=merged.lines, jobs=jobs, templates=templates)


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


def references(value: Any, jobs: dict[str, Any], where: str, name: str) -> Any:
    if isinstance(value, Reference):
        target: Any = jobs
        for key in value:
            if not isinstance(target, dict) or key not in target:
                raise CIError(f"{where}: job {name!r}: !reference {list(value)} not found")
            target = target[key]
        return references(target, jobs, where, name)
    if isinstance(value, dict):
        return {k: references(v, jobs, where, name) for k, v in value.items()}
    if isinstance(value, list):
        return [references(v, jobs, where, name) for v in value]
    return value


def apply_default(body: dict[str, Any], default: dict[str, Any]) -> dict[str, Any]:
    inherit = body.get("inherit", {}).get("default", True)
    keys = DEFAULT_KEYS if inherit is True else set(inherit or []) & DEFAULT_KEYS
    return {**{k: v for k, v in default.items() if k in keys}, **body}
