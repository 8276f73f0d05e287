"""Jobs as GitLab resolves them before rules (doc: ci/yaml/yaml_optimization.md): `extends`
(multi-level, hashes deep-merged, arrays replaced), then `!reference` tags against the
extended jobs and hidden keys (of any YAML type), then `default:` (unless `inherit:default`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kata_ci.runner.gitlab.keywords import DEFAULT_KEYS, GLOBAL_KEYS
from kata_ci.runner.gitlab.source import CIError, Reference, deep_merge, load_yaml, with_includes
from kata_ci.runner.gitlab.validate import check_default, check_globals, check_job

MAX_EXTENDS = 11  # GitLab: "nesting too deep" past 11 levels of extends
MAX_REFERENCE_DEPTH = 10  # GitLab resolves !reference tags 10 levels deep
MAX_RESOLVED = 2_000_000  # values walked resolving references, over the whole file
# Keys whose nested arrays GitLab flattens (a !reference to a list inside a list nests it):
# its ComposableArray entries (rules, needs, services) flatten their config, tags and stages
# take nested arrays of strings. Scripts stay nested here, as GitLab's merged view shows them.
FLATTENED = ("rules", "needs", "services", "tags")


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
    order: list[str] = field(default_factory=list)  # every top-level key, as merged

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
        if not name.startswith(".") and not isinstance(body, (dict, Reference)):
            raise CIError(f"{where(name)}: jobs:{name} config should be a hash")
    extends = _Extends(raw, where)
    extended = {n: extends.body(n) if isinstance(b, dict) else b for n, b in raw.items()}
    resolver = _References(extended, data)
    resolved = {n: resolver.resolve(body, where(n), n) for n, body in extended.items()}
    globals_ = {k: resolver.resolve(v, where(k), k) for k, v in data.items()
                if k in GLOBAL_KEYS}
    globals_ = _flattened(globals_, ("stages",))
    if isinstance(globals_.get("workflow"), dict):
        globals_["workflow"] = _flattened(globals_["workflow"], ("rules",))
    if isinstance(globals_.get("default"), dict):
        globals_["default"] = _flattened(globals_["default"], FLATTENED)
    check_globals(globals_, where)
    jobs: dict[str, dict[str, Any]] = {}
    for name, body in resolved.items():
        if name.startswith("."):
            continue
        if not isinstance(body, dict):  # a job written as one !reference to a non-hash
            raise CIError(f"{where(name)}: jobs:{name} config should be a hash")
        jobs[name] = _flattened(body, FLATTENED)
        check_job(name, jobs[name], where(name))
    return Resolved(path=path, data=globals_, lines=lines, jobs=jobs, templates=resolved,
                    order=list(data))


def _flattened(body: dict[str, Any], keys: tuple[str, ...]) -> dict[str, Any]:
    """``body`` with the nested lists under ``keys`` flattened (without recursion: the
    nesting is as deep as the references made it)."""
    out = dict(body)
    for key in keys:
        if isinstance(out.get(key), list):
            flat: list[Any] = []
            stack: list[Any] = [iter(out[key])]
            while stack:
                item = next(stack[-1], stack)
                if item is stack:
                    stack.pop()
                elif isinstance(item, list):
                    stack.append(iter(item))
                else:
                    flat.append(item)
            out[key] = flat
    return out


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
    check_default(default, merged.where("default"))
    if default:
        data["default"] = default
    jobs = {name: apply_default(body, default) for name, body in merged.jobs.items()}
    return Resolved(path=path, data=data, lines=merged.lines, jobs=jobs,
                    templates=merged.templates, order=merged.order)


class _Extends:
    """`extends` as GitLab's Config::Extendable: parents deep-merged in order, the job's own
    keys over them, refused past 11 levels or in a cycle. Each result is kept, so a diamond
    of parents costs its size once, not once per path."""

    def __init__(self, jobs: dict[str, Any], where: Callable[[str], str]) -> None:
        self.jobs = jobs
        self.where = where
        self.done: dict[str, tuple[dict[str, Any], int]] = {}  # name -> (body, levels)

    def body(self, name: str) -> dict[str, Any]:
        return self._extend(name, [])[0]

    def _extend(self, name: str, chain: list[str]) -> tuple[dict[str, Any], int]:
        first = chain[0] if chain else name
        if len(chain) > MAX_EXTENDS:  # before recursing further: a long chain is no crash
            raise CIError(f"{self.where(first)}: job {first!r}: nesting too deep in `extends` "
                          f"(more than {MAX_EXTENDS} levels)")
        if name in chain:
            raise CIError(f"{self.where(first)}: job {first!r}: circular dependency detected "
                          f"in `extends`: {' -> '.join([*chain, name])}")
        if name not in self.done:
            self.done[name] = self._merge(name, chain)
        body, levels = self.done[name]
        if len(chain) + levels > MAX_EXTENDS:
            raise CIError(f"{self.where(first)}: job {first!r}: nesting too deep in `extends` "
                          f"(more than {MAX_EXTENDS} levels)")
        return body, levels

    def _merge(self, name: str, chain: list[str]) -> tuple[dict[str, Any], int]:
        body = self.jobs[name]
        parents = body.get("extends", [])
        if isinstance(parents, str):
            parents = [parents]
        if isinstance(parents, Reference) or not isinstance(parents, list) or \
                not all(isinstance(p, str) for p in parents):  # !reference: resolved later
            raise CIError(f"{self.where(name)}: jobs:{name}:extends should be a string or an "
                          "array of strings")
        merged: dict[str, Any] = {}
        levels = 0
        for parent in parents:
            if parent not in self.jobs:
                raise CIError(f"{self.where(name)}: job {name!r}: unknown key in `extends`: "
                              f"{parent}"[:500])
            if not isinstance(self.jobs[parent], dict):
                raise CIError(f"{self.where(name)}: job {name!r}: invalid base hash in "
                              f"`extends`: {parent}")
            inherited, depth = self._extend(parent, [*chain, name])
            merged = deep_merge(merged, inherited)
            levels = max(levels, depth + 1)
        own = {k: v for k, v in body.items() if k != "extends"}
        result: dict[str, Any] = deep_merge(merged, own)
        return result, levels


class _References:
    """`!reference [key, sub, ...]` against the extended jobs and the top-level keys, as
    GitLab's tag resolver does after `extends`: nested references resolved (10 deep), cycles
    refused with GitLab's words; a referenced list inside a list is nested there. What
    the references expand to is counted: a few lines referencing each other many times over
    could stand for billions of values."""

    def __init__(self, jobs: dict[str, Any], data: dict[str, Any]) -> None:
        self.root = {**data, **jobs}
        self.budget = MAX_RESOLVED

    def resolve(self, value: Any, where: str, name: str) -> Any:
        return self._walk(value, where, name, [])

    def _walk(self, value: Any, where: str, name: str, chain: list[tuple[Any, ...]]) -> Any:
        self.budget -= 1
        if self.budget < 0:
            raise CIError(f"{where}: job {name!r}: the configuration is too big once `extends` "
                          f"and `!reference` are resolved (more than {MAX_RESOLVED} values)")
        if isinstance(value, Reference):
            return self._target(value, where, name, chain)
        if isinstance(value, dict):
            return {k: self._walk(v, where, name, chain) for k, v in value.items()}
        if isinstance(value, list):
            return [self._walk(item, where, name, chain) for item in value]
        return value

    def _target(self, ref: Reference, where: str, name: str,
                chain: list[tuple[Any, ...]]) -> Any:
        # Ruby's Array#inspect, as GitLab's messages show the sequence
        shown = ("!reference [" + ", ".join(f'"{k}"' if isinstance(k, str) else repr(k)
                                            for k in ref) + "]")[:300]
        seq = tuple(ref)
        if not seq or not all(isinstance(k, str) for k in seq):  # Tags::Reference#valid?
            raise CIError(f"{where}: job {name!r}: {shown} is not valid (a !reference is a "
                          "non-empty array of key names)")
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
        return self._walk(target, where, name, [*chain, seq])


def apply_default(body: dict[str, Any], default: dict[str, Any]) -> dict[str, Any]:
    inherit = body.get("inherit", {}).get("default", True)
    keys = DEFAULT_KEYS if inherit is True else set(inherit or []) & DEFAULT_KEYS
    return {**{k: v for k, v in default.items() if k in keys}, **body}
