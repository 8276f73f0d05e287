"""Jobs as GitLab resolves them before rules (doc: ci/yaml/yaml_optimization.md): `extends`
(multi-level, hashes deep-merged, arrays replaced), then `!reference` tags against the
extended jobs and hidden keys (of any YAML type), then `default:` (unless `inherit:default`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kata_ci.runner.gitlab.keywords import DEFAULT_KEYS, GLOBAL_KEYS
from kata_ci.runner.gitlab.source import CIError, Reference, deep_merge, load_yaml, with_includes
from kata_ci.runner.gitlab.validate import check_default, check_job

MAX_EXTENDS = 11  # GitLab: "nesting too deep" past 11 levels of extends
MAX_REFERENCE_DEPTH = 10  # GitLab resolves !reference tags 10 levels deep
# Keys whose lists take a referenced list in place, flattened (GitLab flattens nested arrays
# in these: scripts up to 10 levels, rules and needs one level when a !reference is a list).
FLATTENED = {"rules", "needs", "services", "tags"}


@dataclass
class Resolved:
    """A pipeline file as GitLab's merged view shows it: includes merged, `extends` and
    `!reference` resolved, `default:` (and the deprecated global forms) applied to each job.
    What happens per job after this (rules, parallel, needs) is ci_file.py's."""

    path: Path
    data: dict[str, Any]  # the top-level keywords (stages, variables, workflow, default...)
    lines: dict[str, int]  # top-level key -> line in ``path``
    jobs: dict[str, dict[str, Any]]  # visible jobs in file order, default: applied
    templates: dict[str, Any]  # every job and hidden key after extends/!reference

    def where(self, name: str) -> str:
        return f"{self.path}:{self.lines.get(name, 0)}"


def merged_jobs(path: Path, project: Path,
                variables: Mapping[str, str] | None = None) -> Resolved:
    """Jobs as GitLab sees them after include, extends and !reference (before default)."""
    data, lines = load_yaml(path, project)
    data = with_includes(data, path, project, lines, variables)

    def where(name: str) -> str:
        return f"{path}:{lines.get(name, 0)}"

    raw = {k: v for k, v in data.items() if k not in GLOBAL_KEYS}
    for name, body in raw.items():
        if not name.startswith(".") and not isinstance(body, dict):
            raise CIError(f"{where(name)}: jobs:{name} config should be a hash")
    extended = {n: _extends(n, raw, where, []) if isinstance(raw[n], dict) else raw[n]
                for n in raw}
    resolver = _References(extended, data)
    resolved = {n: resolver.resolve(body, where(n), n) for n, body in extended.items()}
    globals_ = {k: resolver.resolve(v, where(k), k) for k, v in data.items()
                if k in GLOBAL_KEYS}
    for name, body in resolved.items():
        if not name.startswith("."):
            check_job(name, body, where(name))
    return Resolved(path=path, data=globals_, lines=lines, jobs={
        n: b for n, b in resolved.items() if not n.startswith(".")}, templates=resolved)


def resolve(path: Path, project: Path, variables: Mapping[str, str]) -> Resolved:
    """The whole merged configuration; ``variables`` (predefined + user) are those
    `include` paths may use."""
    merged = merged_jobs(path, project, variables)
    data = dict(merged.data)
    default = data.get("default") or {}
    check_default(default, merged.where("default"))
    default = dict(default)
    for key in ("image", "services", "cache", "before_script", "after_script"):
        if key in data and key not in default:  # deprecated global forms of default:
            default[key] = data.pop(key)
    if default:
        data["default"] = default
    jobs = {name: apply_default(body, default) for name, body in merged.jobs.items()}
    return Resolved(path=path, data=data, lines=merged.lines, jobs=jobs,
                    templates=merged.templates)


def _extends(name: str, jobs: dict[str, Any], where: Callable[[str], str],
             chain: list[str]) -> dict[str, Any]:
    if name in chain:
        raise CIError(f"{where(chain[0])}: job {chain[0]!r}: circular dependency detected in "
                      f"`extends`: {' -> '.join([*chain, name])}")
    if len(chain) > MAX_EXTENDS:
        raise CIError(f"{where(chain[0])}: job {chain[0]!r}: nesting too deep in `extends` "
                      f"(more than {MAX_EXTENDS} levels)")
    body = jobs[name]
    parents = body.get("extends", [])
    if isinstance(parents, str):
        parents = [parents]
    if not isinstance(parents, list) or not all(isinstance(p, str) for p in parents):
        raise CIError(f"{where(name)}: jobs:{name}:extends should be a string or an array of "
                      "strings")
    merged: dict[str, Any] = {}
    for parent in parents:
        if parent not in jobs:
            raise CIError(f"{where(name)}: job {name!r}: unknown key in `extends`: {parent}")
        if not isinstance(jobs[parent], dict):
            raise CIError(f"{where(name)}: job {name!r}: `extends` {parent!r} is not a hash")
        merged = deep_merge(merged, _extends(parent, jobs, where, [*chain, name]))
    own = {k: v for k, v in body.items() if k != "extends"}
    result: dict[str, Any] = deep_merge(merged, own)
    return result


class _References:
    """`!reference [key, sub, ...]` against the extended jobs and the top-level keys, as
    GitLab's tag resolver does: nested references resolved (10 deep), cycles refused with
    GitLab's words, a referenced list in a list keyword spliced in place."""

    def __init__(self, jobs: dict[str, Any], data: dict[str, Any]) -> None:
        self.root = {**data, **jobs}

    def resolve(self, value: Any, where: str, name: str) -> Any:
        return self._walk(value, where, name, [], None)

    def _walk(self, value: Any, where: str, name: str, chain: list[tuple[Any, ...]],
              key: str | None) -> Any:
        if isinstance(value, Reference):
            return self._target(value, where, name, chain)
        if isinstance(value, dict):
            return {k: self._walk(v, where, name, chain, str(k)) for k, v in value.items()}
        if isinstance(value, list):
            out: list[Any] = []
            for item in value:
                got = self._walk(item, where, name, chain, None)
                if isinstance(item, Reference) and isinstance(got, list) and key in FLATTENED:
                    out.extend(got)
                else:
                    out.append(got)
            return out
        return value

    def _target(self, ref: Reference, where: str, name: str,
                chain: list[tuple[Any, ...]]) -> Any:
        shown = "!reference [" + ", ".join(f'"{k}"' for k in ref) + "]"
        seq = tuple(ref)
        if not seq or not all(isinstance(k, str) for k in seq):
            raise CIError(f"{where}: job {name!r}: {shown} must be a list of key names"[:500])
        if seq in chain:
            raise CIError(f"{where}: job {name!r}: {shown} is part of a circular chain")
        if len(chain) >= MAX_REFERENCE_DEPTH:
            raise CIError(f"{where}: job {name!r}: {shown}: too many nested references "
                          f"(more than {MAX_REFERENCE_DEPTH})")
        target: Any = self.root
        for part in seq:
            if not isinstance(target, dict) or part not in target:
                raise CIError(f"{where}: job {name!r}: {shown} could not be found")
            target = target[part]
        return self._walk(target, where, name, [*chain, seq], seq[-1])


def apply_default(body: dict[str, Any], default: dict[str, Any]) -> dict[str, Any]:
    inherit = body.get("inherit", {}).get("default", True)
    keys = DEFAULT_KEYS if inherit is True else set(inherit or []) & DEFAULT_KEYS
    return {**{k: v for k, v in default.items() if k in keys}, **body}
