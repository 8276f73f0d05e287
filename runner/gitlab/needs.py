"""`needs` as GitLab resolves them (doc: ci/yaml "needs", "needs:optional",
"needs:project", "needs:pipeline:job", "needs:parallel:matrix"): names of this pipeline's
jobs, checked against its stages, with GitLab's errors."""

from __future__ import annotations

import itertools
import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kata_ci.runner.core.schedule import find_cycle
from kata_ci.runner.gitlab.source import CIError

if TYPE_CHECKING:  # ci_file imports this module
    from kata_ci.runner.gitlab.ci_file import CIJob


def scalar(value: Any) -> str:
    """A YAML scalar as GitLab (Ruby) writes it: `true`, not Python's `True`."""
    return str(value).lower() if isinstance(value, bool) else "" if value is None else str(value)


def variants_of(jobs: Sequence[CIJob], base: str) -> list[str]:
    """The instances of the parallel job ``base`` (`base 1/2`, `base: [a, b]`), not jobs that
    merely start with its name (`build docs` is not an instance of `build`)."""
    pattern = re.compile(re.escape(base) + r"(?: \d+/\d+|: \[.*\])", re.S)
    return [j.name for j in jobs if pattern.fullmatch(j.name)]


def parse_needs(raw: Any, notes: list[str],
                matrix: dict[str, dict[str, str]]) -> tuple[list[str] | None, set[str]]:
    """Job names a job needs, and which of them are optional. A cross-project (`project:`)
    or parent-pipeline (`pipeline:`) need cannot be met locally: noted and left out.
    `needs:parallel:matrix` names instances: their names go in ``matrix`` with the variables
    that pick them (GitLab matches by values, whatever the order of the keys)."""
    if raw is None:
        return None, set()
    names: list[str] = []
    optional: set[str] = set()
    for need in raw if isinstance(raw, list) else []:  # validate.py: needs is an array
        if isinstance(need, str):
            names.append(need)
            continue
        if not isinstance(need, dict):
            continue
        if "project" in need or "pipeline" in need:
            what = f"project {need.get('project')}" if "project" in need else \
                f"pipeline {need.get('pipeline')}"
            notes.append(f"needs: {need.get('job', '')} from {what} is another pipeline's "
                         "job; kata-ci runs this pipeline only, so it is skipped")
            continue
        job = str(need.get("job", ""))
        wanted = [job]
        entries = need.get("parallel", {}).get("matrix") if isinstance(
            need.get("parallel"), dict) else None
        if isinstance(entries, list):
            wanted = []
            for entry in entries:
                if not isinstance(entry, dict):
                    continue
                values = [v if isinstance(v, list) else [v] for v in entry.values()]
                for combo in itertools.product(*values):
                    label = f"{job}: [{', '.join(map(scalar, combo))}]"
                    matrix[label] = {"": job, **dict(zip(map(str, entry), map(scalar, combo),
                                                         strict=True))}
                    wanted.append(label)
        names.extend(wanted)
        if need.get("optional") is True:
            optional.update(wanted)
    return names, optional


def check_needs(jobs: list[CIJob], defined: set[str], path: Path, stages: list[str]) -> None:
    """Needs resolved to the pipeline's job names (a parallel job: all its instances), as
    GitLab checks them (doc: ci/yaml "needs", "needs:optional", "needs:parallel:matrix"):
    a needed job may be in the same or an earlier stage, never a later one."""
    by_name = {j.name: j for j in jobs}
    order = {s: i for i, s in enumerate(stages)}
    graph: dict[str, list[str]] = {}
    for job in jobs:
        if job.needs is None:
            continue
        resolved: list[str] = []
        for need in job.needs:
            found = [need] if need in by_name else variants_of(jobs, need)
            pick = job.matrix_needs.get(need)
            if pick is not None and not found:
                found = [n for n in variants_of(jobs, pick[""]) if all(
                    by_name[n].variables.get(k) == v for k, v in pick.items() if k)]
            base = pick[""] if pick is not None else need
            if found:
                later = [n for n in found if order[by_name[n].stage] > order[job.stage]]
                if later:
                    raise CIError(f"{path}:{job.line}: {job.name} job: need {need} is not "
                                  "defined in current or prior stages")
                resolved.extend(n for n in found if n not in resolved)
            elif need in job.optional:
                continue  # needs:optional: a job that is not in this pipeline is ignored
            elif base in defined:
                raise CIError(
                    f"{path}:{job.line}: '{job.name}' job needs '{need}' job, but '{need}' "
                    "does not exist in the pipeline. This might be because of the only, "
                    "except, or rules keywords. To need a job that sometimes does not exist "
                    "in the pipeline, use needs:optional.")
            else:
                raise CIError(f"{path}:{job.line}: {job.name} job: undefined need: {need}")
        job.needs = resolved
        graph[job.name] = resolved
    cycle = find_cycle(graph)
    if cycle:
        raise CIError(f"{path}: needs form a cycle: {' -> '.join(cycle)}")
