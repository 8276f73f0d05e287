"""Bounds on a parsed CI file, checked before anything walks it recursively: nesting depth,
and size as walked with aliases expanded (a few hundred bytes of YAML aliases can stand for
billions of values: the "billion laughs" file)."""

from __future__ import annotations

from typing import Any

MAX_DEPTH = 100  # GitLab's max_yaml_depth; GitHub's files are far shallower
MAX_NODES = 500_000


def tree_problem(value: Any) -> str | None:
    """Why ``value`` is too big to walk, or None."""
    stack: list[tuple[Any, int]] = [(value, 0)]
    seen = 0
    while stack:
        item, depth = stack.pop()
        seen += 1
        if depth > MAX_DEPTH or seen > MAX_NODES:
            return (f"the parsed YAML is too big (deeper than {MAX_DEPTH} levels or more than "
                    f"{MAX_NODES} values once aliases are expanded)")
        if isinstance(item, dict):
            for key, sub in item.items():
                if not isinstance(key, (str, int, float, bool)) and key is not None:
                    return f"a mapping key must be a scalar, not {key!r}"[:200]
                stack.append((sub, depth + 1))
        elif isinstance(item, list):
            stack.extend((sub, depth + 1) for sub in item)
    return None
