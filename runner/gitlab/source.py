"""A pipeline's YAML as GitLab reads it: the file beneath the project, `!reference` tags,
and `include: local` files merged under the including file (doc: ci/yaml "include",
"include:local"; ci/yaml/includes.md).

Every byte is hostile: files are read only through ``beneath`` (a link out of the project is
refused), and the parsed tree is bounded in depth and in size as walked (YAML aliases can
make a few hundred bytes expand into billions of nodes) before anything walks it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from kata_ci.errors import UserError
from kata_ci.runner.core import beneath
from kata_ci.runner.core.yamltree import tree_problem
from kata_ci.runner.gitlab.expr import evaluate

MAX_INCLUDES = 150  # GitLab's default "Maximum of 150 nested includes are allowed!"
MAX_INCLUDE_DEPTH = 100  # GitLab's include nesting limit
INCLUDE_KEYS = {"local", "rules", "inputs", "remote", "project", "file", "ref", "template",
                "component", "integrity", "cache"}


class CIError(UserError):
    pass


class Reference(list[Any]):
    """A `!reference [job, key, ...]` not yet resolved."""


class _Loader(yaml.SafeLoader):
    pass


def _reference(loader: yaml.SafeLoader, node: yaml.Node) -> Reference:
    if not isinstance(node, yaml.SequenceNode):
        raise yaml.constructor.ConstructorError(
            None, None, "!reference must be a sequence of keys", node.start_mark)
    return Reference(loader.construct_sequence(node))


_Loader.add_constructor("!reference", _reference)


def check_tree(value: Any, where: str) -> None:
    """GitLab's bounds on a parsed file (depth, size with aliases expanded)."""
    problem = tree_problem(value)
    if problem:
        raise CIError(f"{where}: {problem}")


def load_yaml(path: Path, project: Path) -> tuple[dict[str, Any], dict[str, int]]:
    """``path`` read beneath ``project`` when it lies in it: a job may have made it a link
    to a host file (refused, the content never shown)."""
    text = beneath.read_named(project, path)
    try:
        node = yaml.compose(text, Loader=_Loader)
        data = yaml.load(text, Loader=_Loader)
    except (yaml.YAMLError, RecursionError) as exc:
        raise CIError(f"{path}: invalid YAML: {exc}"[:2000]) from None
    if data is None:
        data = {}  # an empty file: GitLab's "jobs config should contain at least one visible job"
    if not isinstance(data, dict):
        raise CIError(f"{path}: the top level must be a mapping of jobs and keywords")
    check_tree(data, str(path))
    lines: dict[str, int] = {}
    if isinstance(node, yaml.MappingNode):
        lines = {str(k.value): k.start_mark.line + 1 for k, _ in node.value
                 if isinstance(k, yaml.ScalarNode)}
    for key in data:
        if not isinstance(key, str):
            raise CIError(f"{path}:{lines.get(str(key), 0)}: {key!r}: a job name or keyword "
                          "must be a string")
    return data, lines


def deep_merge(base: Any, override: Any) -> Any:
    """GitLab's extends merge: hashes merge key by key, anything else is replaced."""
    if isinstance(base, dict) and isinstance(override, dict):
        merged = dict(base)
        for key, value in override.items():
            merged[key] = deep_merge(base.get(key), value) if key in base else value
        return merged
    return override


def expand_path(text: str, variables: Mapping[str, str]) -> str:
    """$VAR and ${VAR} in an include path, from the variables GitLab allows there (project,
    pipeline and predefined ones); an unknown one stays as written, as GitLab leaves it."""
    return re.sub(r"\$(?:\{([A-Za-z_][A-Za-z0-9_]*)\}|([A-Za-z_][A-Za-z0-9_]*))",
                  lambda m: variables.get(m.group(1) or m.group(2), m.group(0)), text)


class _Includes:
    """The include tree of one pipeline: every file counted against GitLab's limits."""

    def __init__(self, project: Path, variables: Mapping[str, str]) -> None:
        self.project = project
        self.variables = variables
        self.count = 0

    def merge(self, data: dict[str, Any], path: Path, lines: Mapping[str, int],
              depth: int) -> dict[str, Any]:
        includes = data.pop("include", None)
        if includes is None:
            return data
        where = f"{path}:{lines.get('include', 0)}"
        if depth >= MAX_INCLUDE_DEPTH:
            raise CIError(f"{where}: Maximum nesting depth of includes ({MAX_INCLUDE_DEPTH}) "
                          "exceeded")
        merged: dict[str, Any] = {}
        for item in includes if isinstance(includes, list) else [includes]:
            for rel in self._files(item, where):
                self.count += 1
                if self.count > MAX_INCLUDES:
                    raise CIError(f"{where}: Maximum of {MAX_INCLUDES} nested includes are "
                                  "allowed!")
                target = self.project / rel
                sub, sub_lines = load_yaml(target, self.project)
                merged = deep_merge(merged, self.merge(sub, target, sub_lines, depth + 1))
        result: dict[str, Any] = deep_merge(merged, data)  # the including file wins
        return result

    def _files(self, item: Any, where: str) -> list[str]:
        """The project-relative files one include entry names (none when its rules say so)."""
        if isinstance(item, str):
            item = {"remote": item} if re.match(r"https?://", item) else {"local": item}
        if not isinstance(item, dict):
            raise CIError(f"{where}: include config should be a hash or a string, not "
                          f"{item!r}"[:300])
        unknown = set(map(str, item)) - INCLUDE_KEYS
        if unknown:
            raise CIError(f"{where}: include config contains unknown keys: "
                          f"{', '.join(sorted(unknown))}")
        if "local" not in item:
            kind = next((k for k in ("remote", "project", "template", "component")
                         if k in item), "?")
            raise CIError(f"{where}: include: {kind} {item.get(kind)!r} cannot be fetched here "
                          "(kata-ci runs without network access); vendor the file into the "
                          "repository and use include: local"[:500])
        if "inputs" in item:
            raise CIError(f"{where}: include:inputs (spec:inputs) is not supported by kata-ci")
        if not self._included(item.get("rules"), where):
            return []
        local = item["local"]
        if not isinstance(local, str) or not local.strip():
            raise CIError(f"{where}: include:local must be a path, not {local!r}"[:300])
        name = expand_path(local, self.variables)
        rel = name.lstrip("/")  # "a full path relative to the root directory (/)"
        if not re.search(r"\.ya?ml$", rel):
            raise CIError(f"{where}: Included file `{name}` does not have YAML extension!")
        if ".." in rel.split("/"):
            raise CIError(f"{where}: Local file `{name}` leaves the project: include:local "
                          "paths are relative to the project's root")
        try:
            found = beneath.glob(self.project, rel)
        except beneath.Escape as exc:
            raise CIError(f"{where}: include:local `{name}`: {exc}") from None
        if not found:
            raise CIError(f"{where}: Local file `{name}` does not exist!")
        return found

    def _included(self, rules: Any, where: str) -> bool:
        """include:rules: `if` (and `when: never`), as documented for include; `exists` and
        `changes` there are not evaluated locally (the file is included)."""
        if rules is None:
            return True
        if not isinstance(rules, list) or not all(isinstance(r, dict) for r in rules):
            raise CIError(f"{where}: include:rules must be a list of hashes")
        for rule in rules:
            try:
                if "if" in rule and not evaluate(str(rule["if"]), self.variables):
                    continue
            except UserError as exc:
                raise CIError(f"{where}: include:rules: {exc}") from None
            return bool(rule.get("when", "always") != "never")
        return False


def with_includes(data: dict[str, Any], path: Path, project: Path, lines: Mapping[str, int],
                  variables: Mapping[str, str] | None = None) -> dict[str, Any]:
    """``data`` with its `include:` files merged under it (recursively)."""
    return _Includes(project, variables or {}).merge(data, path, lines, 0)
