"""Where GitHub's expressions may appear and which contexts each may name (doc: contexts,
"Context availability"): checked when a workflow loads, so a typo or a context that a field
cannot have is reported with file:line and job before any VM starts."""

from __future__ import annotations

import re
from collections.abc import Collection, Mapping
from typing import Any

from kata_ci.errors import UserError
from kata_ci.runner.github.expr import ExpressionError, parse


class WorkflowError(UserError):
    pass


# Contexts each field may name (doc: contexts, "Context availability").
PRE_RUN = frozenset({"github", "needs", "strategy", "matrix", "vars", "inputs"})
RUNTIME = PRE_RUN | {"job", "runner", "env", "secrets", "steps"}
AVAILABLE: dict[str, frozenset[str]] = {
    "env": frozenset({"github", "secrets", "inputs", "vars"}),
    "run-name": frozenset({"github", "inputs", "vars"}),
    "concurrency": frozenset({"github", "inputs", "vars"}),
    "defaults.run": PRE_RUN | {"env"},
    "jobs.<job_id>.env": PRE_RUN | {"secrets"},
    "jobs.<job_id>.if": frozenset({"github", "needs", "vars", "inputs"}),
    "jobs.<job_id>.strategy": frozenset({"github", "needs", "vars", "inputs"}),
    "jobs.<job_id>.outputs": RUNTIME,
    "jobs.<job_id>.environment.url": RUNTIME - {"secrets"},
    "jobs.<job_id>.container.env": RUNTIME - {"steps"},
    "jobs.<job_id>.container.credentials": PRE_RUN | {"env", "secrets"},
    "jobs.<job_id>.steps": RUNTIME,
    "jobs.<job_id>.steps.if": RUNTIME - {"secrets"},
}  # any other job field (name, runs-on, timeout-minutes, container...): PRE_RUN
def waits_for_run(value: Any, contexts: str = "github|needs|vars|inputs") -> bool:
    """Whether ``value``'s expressions name one of ``contexts`` (by default, those only the
    run provides). A name inside a string literal counts too: then it merely waits."""
    return any(re.search(rf"\b({contexts})\b", body, re.I) for body in bodies(value))


def bodies(value: Any) -> list[str]:
    if isinstance(value, dict):
        return [b for k, v in value.items() for b in bodies(k) + bodies(v)]
    if isinstance(value, list):
        return [b for v in value for b in bodies(v)]
    return re.findall(r"\$\{\{(.*?)\}\}", value, re.DOTALL) if isinstance(value, str) else []


def check_containers(raw: Mapping[str, Any], where: str) -> None:
    """container and services: env and credentials may name more contexts than the rest."""
    containers = [("container", raw.get("container"))] + [
        (f"services.{k}", v) for k, v in (raw.get("services") or {}).items()] \
        if isinstance(raw.get("services") or {}, dict) else []
    for what, body in containers:
        if not isinstance(body, dict):
            check_embedded(body, where, what, PRE_RUN)
            continue
        for part, value in body.items():
            allowed = AVAILABLE.get(f"jobs.<job_id>.container.{part}", PRE_RUN)
            check_embedded(value, where, f"{what}.{part}", allowed)


def check_embedded(value: Any, where: str, what: str,
                    allowed: Collection[str] | None = None) -> None:
    """Every `${{ }}` in a field (keys too) parses and names only ``allowed`` contexts
    (evaluated later, where its contexts exist)."""
    for body in bodies(value):
        try:
            parse(body, allowed)
        except ExpressionError as exc:
            raise WorkflowError(f"{where}: {what}: {exc}") from None


def check_expression(text: str, where: str, job: str, allowed: Collection[str]) -> None:
    """Parse (not evaluate) conditions up front, so a typo fails before any VM starts."""
    body = text.strip()
    if body.startswith("${{") and body.endswith("}}") and "${{" not in body[3:]:
        body = body[3:-2]
    try:
        if "${{" in body:  # `if: ${{ a }} && b`: GitHub reads the whole as a string
            for inner in bodies(body):
                parse(inner, allowed)
        else:
            parse(body, allowed)
    except ExpressionError as exc:
        raise WorkflowError(f"{where}: job {job!r}: {exc}") from None
