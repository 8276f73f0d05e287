"""A pipeline's YAML as GitLab reads it: the file beneath the project, `!reference` tags,
and `include: local` files merged under the including file (doc: ci/yaml "include",
"include:local"; ci/yaml/includes.md).

Every byte is hostile: files are read only through ``beneath`` (a link out of the project is
refused), and the parsed tree is bounded in depth and in size as walked (YAML aliases can
make a few hundred bytes expand into billions of nodes) before anything walks it.
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from kata_ci.errors import UserError
from kata_ci.runner.core import beneath
from kata_ci.runner.core.yamltree import tree_problem
from kata_ci.runner.gitlab.expr import evaluate
from kata_ci.runner.gitlab.keywords import JOB_ONLY, JOB_ONLY_PREFIXES

MAX_INCLUDES = 150  # includes.md: "The maximum number of nested included files ... is 150"
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
            None, None, f"!reference {str(node.value)[:100]!r} is not valid (a !reference is "
            "a non-empty array of key names)", node.start_mark)
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
    return parse_yaml(read(path, project), path)


def read(path: Path, project: Path) -> str:
    try:
        return beneath.read_named(project, path)
    except CIError:
        raise
    except UserError as exc:  # one error type out of the loader, whatever refused the read
        raise CIError(str(exc)) from None


def parse_yaml(text: str, path: Path) -> tuple[dict[str, Any], dict[str, int]]:
    """The top-level mapping of one file and the line of each of its keys."""
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
        for key_node, _ in node.value:  # `1:`, `null:`, `true:` parse to no string
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag not in (
                    "tag:yaml.org,2002:str", "tag:yaml.org,2002:merge"):  # `<<: *anchor`
                raise CIError(f"{path}:{key_node.start_mark.line + 1}: "
                              f"{str(getattr(key_node, 'value', ''))[:100]!r}: a job name or "
                              "keyword must be a string")
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


def include_variables(variables: Mapping[str, str]) -> dict[str, str]:
    """The variables an `include` may use (includes.md "Use variables with include"): all
    but the job-only predefined ones (predefined_variables.md "Variable availability": they
    "cannot be used with workflow, include or rules")."""
    return {k: v for k, v in variables.items()
            if k not in JOB_ONLY and not k.startswith(JOB_ONLY_PREFIXES)}


def expand_path(text: str, variables: Mapping[str, str]) -> str:
    """$VAR and ${VAR} in an include path; an unknown one stays as written, as GitLab leaves
    it (and then the file is not found)."""
    return re.sub(r"\$(?:\{([A-Za-z_][A-Za-z0-9_]*)\}|([A-Za-z_][A-Za-z0-9_]*))",
                  lambda m: variables.get(m.group(1) or m.group(2), m.group(0)), text)


def wildcard(pattern: str) -> re.Pattern[str]:
    """GitLab's Repository#search_files_by_wildcard_path: `**` is any characters, `*` any
    but `/`, everything else literal; the whole path must match. So `configs/**.yml` takes
    subfolders too and `configs/**/*.yml` only subfolders (includes.md "Use include:local
    with wildcard file paths")."""
    return re.compile("^" + ".*?".join("[^/]*?".join(map(re.escape, part.split("*")))
                                       for part in pattern.split("**")) + "$")


class _Includes:
    """The include tree of one pipeline: every file counted against GitLab's limit (which
    counts duplicates, so a file including itself stops there)."""

    def __init__(self, project: Path, variables: Mapping[str, str]) -> None:
        self.project = project
        self.variables = include_variables(variables)
        self.count = 0

    def merge(self, data: dict[str, Any], path: Path, lines: Mapping[str, int]) -> dict[str, Any]:
        includes = data.pop("include", None)
        if includes is None:
            return data
        where = f"{path}:{lines.get('include', 0)}"
        if isinstance(includes, Reference):  # resolved only after includes, as in GitLab
            raise CIError(f"{where}: include config should be a hash, a string or an array "
                          "(a !reference is resolved after includes)")
        merged: dict[str, Any] = {}
        for item in includes if isinstance(includes, list) else [includes]:
            for rel in self._files(item, where):
                self.count += 1
                if self.count > MAX_INCLUDES:
                    raise CIError(f"{where}: Maximum of {MAX_INCLUDES} nested includes are "
                                  "allowed!")
                target = self.project / rel
                text = read(target, self.project)
                if not text.strip():
                    raise CIError(f"{where}: Local file `{rel}` is empty!")
                sub, sub_lines = parse_yaml(text, target)
                # "nested include configuration is merged first", "the last included file
                # takes precedence"
                merged = deep_merge(merged, self.merge(sub, target, sub_lines))
        result: dict[str, Any] = deep_merge(merged, data)  # the including file wins
        return result

    def _files(self, item: Any, where: str) -> list[str]:
        """The project-relative files one include entry names (none when its rules say so)."""
        if isinstance(item, str):
            item = {"remote": item} if re.match(r"https?://", item) else {"local": item}
        if not isinstance(item, dict) or isinstance(item, Reference):
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
        # "a full path relative to the root directory (/)"; ./ is the root too
        rel = re.sub(r"^(\./|/)+", "", name)
        if not re.search(r"\.ya?ml$", rel):
            raise CIError(f"{where}: Included file `{name}` does not have YAML extension!")
        if ".." in rel.split("/"):
            raise CIError(f"{where}: Local file `{name}` leaves the project: include:local "
                          "paths are relative to the project's root")
        try:
            if "*" in rel:
                return self._matching(rel)  # no match: nothing included, as GitLab expands
            if beneath.exists(self.project, rel):
                return [rel]
        except UserError as exc:
            raise CIError(f"{where}: include:local `{name}`: {exc}") from None
        raise CIError(f"{where}: Local file `{name}` does not exist!")

    def _matching(self, rel: str) -> list[str]:
        """Files (not under .git) whose project-relative path matches the wildcard, walked
        beneath the project from the pattern's fixed leading directories."""
        pattern = wildcard(rel)
        fixed = rel.split("*", 1)[0].rpartition("/")[0]
        found: list[str] = []
        with beneath.opened_root(self.project) as rootfd:
            try:
                fd = beneath.open_fd(rootfd, fixed or ".", os.O_RDONLY | os.O_DIRECTORY)
            except (FileNotFoundError, NotADirectoryError):
                return []
            except OSError as exc:
                raise CIError(f"{fixed}: {exc.strerror}") from None
            try:
                for entry in beneath.walk(fd):
                    path = f"{fixed}/{entry.rel}" if fixed else entry.rel
                    if path.split("/", 1)[0] != ".git" and not stat.S_ISDIR(
                            entry.info.st_mode) and pattern.match(path):
                        found.append(path)
                    if len(found) > MAX_INCLUDES:
                        break  # past the limit already: merge() says so
            finally:
                os.close(fd)
        return found

    def _included(self, rules: Any, where: str) -> bool:
        """include:rules (includes.md "Use rules with include"): `if` and `exists` are
        evaluated, `when: never` leaves the file out; `changes` is not known while the
        configuration is read here (the file is included)."""
        if rules is None:
            return True
        if not isinstance(rules, list) or not all(isinstance(r, dict) for r in rules):
            raise CIError(f"{where}: include:rules config should be an array of hashes")
        for rule in rules:
            unknown = set(map(str, rule)) - {"if", "exists", "changes", "when"}
            if unknown:
                raise CIError(f"{where}: include:rules:rule config contains unknown keys: "
                              f"{', '.join(sorted(unknown))}")
            when = rule.get("when", "always")
            if not isinstance(when, str) or when not in ("always", "never"):
                raise CIError(f"{where}: include:rules:rule when unknown value: {when!r}"[:300])
            try:
                if "if" in rule and not evaluate(str(rule["if"]), self.variables):
                    continue
                if "exists" in rule and not self._exists(rule["exists"]):
                    continue
            except UserError as exc:
                raise CIError(f"{where}: include:rules: {exc}") from None
            return bool(when != "never")
        return False

    def _exists(self, spec: Any) -> bool:
        paths = spec.get("paths") if isinstance(spec, dict) else spec
        paths = [paths] if isinstance(paths, str) else paths
        if not isinstance(paths, list) or not all(isinstance(p, str) for p in paths):
            raise CIError("rules:exists should be an array of strings")
        return any(beneath.glob(self.project, p.lstrip("/")) for p in paths)


def with_includes(data: dict[str, Any], path: Path, project: Path, lines: Mapping[str, int],
                  variables: Mapping[str, str] | None = None) -> dict[str, Any]:
    """``data`` with its `include:` files merged under it (recursively)."""
    return _Includes(project, variables or {}).merge(data, path, lines)
