"""A job's `strategy.matrix` expanded into its combinations (doc: workflow-syntax,
"jobs.<job_id>.strategy.matrix" and "Expanding or adding matrix configurations"). As GitHub's
parser: a matrix with neither a vector nor an include is refused; one whose every combination
is excluded runs once, without matrix values."""

from __future__ import annotations

import itertools
from typing import Any

from kata_ci.runner.github.available import WorkflowError

MAX_MATRIX = 256  # GitHub: "A matrix will generate a maximum of 256 jobs per workflow run"


def expand_matrix(matrix: Any, where: str) -> list[dict[str, Any]]:
    """Combinations as documented ("Expanding or adding matrix configurations")."""
    if matrix is None:
        return [{}]
    if not isinstance(matrix, dict):
        raise WorkflowError(f"{where}: strategy.matrix must be a mapping, not {matrix!r}"[:300])
    base_keys = [k for k in matrix if k not in ("include", "exclude")]
    for key in base_keys:
        if not isinstance(matrix[key], list) or not matrix[key]:
            raise WorkflowError(f"{where}: Matrix vector '{key}' does not contain any values"
                                if matrix[key] == [] else f"{where}: matrix.{key} must be a "
                                "list")
    rules = {}
    for part in ("include", "exclude"):
        rules[part] = matrix.get(part) or []
        if not isinstance(rules[part], list) or not all(isinstance(r, dict)
                                                        for r in rules[part]):
            raise WorkflowError(f"{where}: matrix.{part} must be a list of mappings")
    if not base_keys and not rules["include"]:
        # GitHub's workflow parser: neither a vector nor an include fails the job (a
        # dynamic `{"include": []}` does not make it vanish, nor its dependants run)
        raise WorkflowError(f"{where}: Matrix must define at least one vector")
    combos = [dict(zip(base_keys, values, strict=True))
              for values in itertools.product(*(matrix[k] for k in base_keys))] \
        if base_keys else []
    for rule in rules["exclude"]:
        combos = [c for c in combos if not all(c.get(k) == v for k, v in rule.items())]
    originals = [dict(c) for c in combos]
    for extra in rules["include"]:
        matched = False
        for combo, original in zip(combos, originals, strict=True):
            # Added only where it overwrites none of the combination's original values.
            if all(original.get(k, v) == v for k, v in extra.items() if k in base_keys):
                combo.update(extra)
                matched = True
        if not matched:  # a combination of its own, whose values later includes keep
            combos.append(dict(extra))
            originals.append(dict(extra))
    if not combos:  # every combination excluded: the job runs once, without matrix values
        combos = [{}]
    if len(combos) > MAX_MATRIX:
        raise WorkflowError(f"{where}: a matrix may generate at most {MAX_MATRIX} jobs per "
                            f"workflow run, not {len(combos)}")
    return combos
