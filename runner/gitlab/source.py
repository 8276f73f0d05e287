"""A pipeline's YAML as GitLab reads it: the file beneath the project, `!reference` tags,
and `include: local` files merged under the including file."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from kata_ci.errors import UserError
from kata_ci.runner.core import beneath


class CIError(UserError):
    pass


class Reference(list[str]):
    """A `!reference [job, key, ...]` not yet resolved."""


class _Loader(yaml.SafeLoader):
    pass


_Loader.add_constructor("!reference", lambda loader, node: Reference(
    loader.construct_sequence(node)))  # type: ignore[arg-type]


def load_yaml(path: Path, project: Path) -> tuple[dict[str, Any], dict[str, int]]:
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


def with_includes(data: dict[str, Any], path: Path, project: Path,
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
            sub, _ = load_yaml(target, project)
            merged = deep_merge(merged, with_includes(sub, target, project, {}))
    result: dict[str, Any] = deep_merge(merged, data)  # the including file wins
    return result
