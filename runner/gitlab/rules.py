"""Whether a job runs, as GitLab decides it: `rules` (if, exists, changes), else
`only`/`except`, else `when` (doc: ci/jobs/job_rules.md, ci/yaml#only--except)."""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from kata_ci.runner.core import beneath
from kata_ci.runner.gitlab.expr import evaluate
from kata_ci.runner.gitlab.keywords import WHENS
from kata_ci.runner.gitlab.source import CIError


def decide(body: dict[str, Any], env: Mapping[str, str], where: str, name: str,
            project: Path, changed: Sequence[str] | None) -> tuple[str, bool | None]:
    """(when, allow_failure override) from rules, or from only/except, or from `when`."""
    when = body.get("when", "on_success")
    if when not in WHENS:
        raise CIError(f"{where}: job {name!r}: unknown when: {when!r}")
    if "rules" in body:
        for rule in body["rules"]:
            if "if" in rule and not evaluate(str(rule["if"]), env):
                continue
            if "exists" in rule and not _exists(rule["exists"], project):
                continue
            if "changes" in rule and not _changes(rule["changes"], changed):
                continue
            return rule.get("when", when), rule.get("allow_failure")
        return "never", None
    ref = env.get("CI_COMMIT_REF_NAME", "")
    is_tag = bool(env.get("CI_COMMIT_TAG"))
    if "only" in body and not _refs_match(body["only"], ref, is_tag, env):
        return "never", None
    if "except" in body and _refs_match(body["except"], ref, is_tag, env):
        return "never", None
    return when, None


def _refs_match(spec: Any, ref: str, is_tag: bool, env: Mapping[str, str]) -> bool:
    refs = spec.get("refs", []) if isinstance(spec, dict) else spec
    for item in [refs] if isinstance(refs, str) else refs:
        if (item in ("branches", "pushes") and not is_tag) or (item == "tags" and is_tag):
            return True
        if item == env.get("CI_PIPELINE_SOURCE"):
            return True
        match = re.fullmatch(r"/(.*)/([a-z]*)", item)
        if match and re.search(match.group(1), ref):
            return True
        if item == ref:
            return True
    return False


def _exists(patterns: Any, project: Path) -> bool:
    items = patterns.get("paths", []) if isinstance(patterns, dict) else patterns
    return any(beneath.glob(project, str(p)) for p in items)


def _changes(patterns: Any, changed: Sequence[str] | None) -> bool:
    """Locally there is no push: the files that differ between the working tree and HEAD~1,
    as the run's RepoSnapshot read them (git never runs here: jobs may have rewritten .git
    by now). Outside git (or on the first commit) every file counts as changed, as GitLab
    does for a new branch."""
    items = patterns.get("paths", []) if isinstance(patterns, dict) else patterns
    if changed is None:
        return True
    return any(fnmatch.fnmatch(f, str(p)) for f in changed for p in items)
