"""Dependency graphs of CI jobs (GitLab `needs`, GitHub `needs`)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence


def find_cycle(graph: Mapping[str, Sequence[str]]) -> list[str] | None:
    """A dependency cycle as a path that returns to its start (a -> b -> a), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(name: str, trail: list[str]) -> list[str] | None:
        if state.get(name) == 1:
            return [*trail, name]
        if state.get(name) == 2:
            return None
        state[name] = 1
        for dep in graph.get(name, ()):
            cycle = visit(dep, [*trail, name])
            if cycle:
                return cycle
        state[name] = 2
        return None

    for name in graph:
        cycle = visit(name, [])
        if cycle:
            return cycle[cycle.index(cycle[-1]):]
    return None
