"""Whether a job runs, as GitLab decides it: `rules` (if, exists, changes), else
`only`/`except`, else `when` (doc: ci/jobs/job_rules.md, ci/yaml#only--except)."""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kata_ci.errors import UserError
from kata_ci.runner.core import beneath
from kata_ci.runner.gitlab.expr import evaluate
from kata_ci.runner.gitlab.keywords import WORKFLOW_KEYS, WORKFLOW_RULE_KEYS
from kata_ci.runner.gitlab.needs import scalar
from kata_ci.runner.gitlab.source import CIError


@dataclass(frozen=True)
class Decision:
    """What a job's rules (or only/except, or `when`) say for one pipeline."""

    when: str
    allow_failure: bool | None = None  # rules:allow_failure, over the job's
    variables: dict[str, str] = field(default_factory=dict)  # rules:variables
    needs: list[Any] | None = None  # rules:needs, instead of the job's
    start_in: str = ""  # rules:start_in, for when: delayed


def _matches(rule: Mapping[str, Any], env: Mapping[str, str], where: str, project: Path,
             changed: Sequence[str] | None) -> bool:
    try:
        if "if" in rule and not evaluate(str(rule["if"]), env):
            return False
    except UserError as exc:
        raise CIError(f"{where}: {exc}") from None
    if "exists" in rule and not _exists(rule["exists"], project):
        return False
    return not ("changes" in rule and not _changes(rule["changes"], changed))


def rule_variables(raw: Any) -> dict[str, str]:
    """rules:variables (validated as a hash of scalars or {value: ...})."""
    out = {}
    for key, value in (raw or {}).items():
        if isinstance(value, dict):
            value = value.get("value", "")
        out[str(key)] = scalar(value)
    return out


def decide(body: dict[str, Any], env: Mapping[str, str], where: str, name: str,
           project: Path, changed: Sequence[str] | None) -> Decision:
    """The job's Decision from rules (the first that matches; none: never), or from
    only/except, or from `when` (doc: job_rules.md "How rules are evaluated")."""
    when = body.get("when", "on_success")
    if "rules" in body:
        for rule in body["rules"] if isinstance(body["rules"], list) else []:
            if not isinstance(rule, dict) or not _matches(
                    rule, env, f"{where}: job {name!r}: rules:if", project, changed):
                continue
            return Decision(rule.get("when", when), rule.get("allow_failure"),
                            rule_variables(rule.get("variables")), rule.get("needs"),
                            scalar(rule.get("start_in")))
        return Decision("never")
    policy = f"{where}: job {name!r}"
    if "only" in body and not _policy(body["only"], env, policy, changed, every=True):
        return Decision("never")
    if "except" in body and _policy(body["except"], env, policy, changed, every=False):
        return Decision("never")
    return Decision(when)


def _policy(spec: Any, env: Mapping[str, str], where: str, changed: Sequence[str] | None,
            every: bool) -> bool:
    """only/except (ci/yaml "only:refs / except:refs", "only:variables / except:variables",
    "only:changes / except:changes"): each key given matches when any of its items does;
    `only` needs every key to match, `except` any (as GitLab evaluates them)."""
    if not isinstance(spec, dict):
        return _refs_match(spec, env)
    checks = []
    if "refs" in spec:
        checks.append(_refs_match(spec["refs"], env))
    if "variables" in spec:
        items = spec["variables"] if isinstance(spec["variables"], list) else []
        try:
            checks.append(any(evaluate(str(e), env) for e in items))
        except UserError as exc:
            raise CIError(f"{where}: only/except:variables: {exc}") from None
    if "changes" in spec:
        checks.append(_changes(spec["changes"], changed))
    # kubernetes: no cluster locally; only `kubernetes: active` then never matches
    if "kubernetes" in spec:
        checks.append(False)
    return all(checks) if every else any(checks)


FILTERED = "Pipeline filtered out by workflow rules."


def workflow(raw: Any, env: Mapping[str, str], where: str, project: Path,
             changed: Sequence[str] | None) -> tuple[bool, dict[str, str], str]:
    """workflow:rules (doc: ci/yaml "workflow:rules"): whether the pipeline runs at all, the
    matching rule's variables (pipeline-wide), and workflow:name with the variables it may
    use expanded (ci/yaml "workflow:name"). No workflow:rules: it runs."""
    if raw is None:
        return True, {}, ""
    if not isinstance(raw, dict) or set(map(str, raw)) - WORKFLOW_KEYS:
        raise CIError(f"{where}: workflow config contains unknown keys (allowed: "
                      f"{', '.join(sorted(WORKFLOW_KEYS))})")
    name = raw.get("name", "")
    if not isinstance(name, str) or len(name) > 255:
        raise CIError(f"{where}: workflow name should be a string of at most 255 characters")
    rules = raw.get("rules")
    if rules is None:
        return True, {}, _expanded(name, env)
    if not isinstance(rules, list) or not all(isinstance(r, dict) for r in rules):
        raise CIError(f"{where}: workflow:rules config should be an array of hashes")
    for rule in rules:
        unknown = set(map(str, rule)) - WORKFLOW_RULE_KEYS
        if unknown:
            raise CIError(f"{where}: workflow:rules:rule config contains unknown keys: "
                          f"{', '.join(sorted(unknown))}")
        if rule.get("when", "always") not in ("always", "never"):
            raise CIError(f"{where}: workflow:rules:rule when unknown value: {rule['when']} "
                          "(always or never)")
        if "if" in rule and not isinstance(rule["if"], str):
            raise CIError(f"{where}: workflow:rules:rule if should be a string")
        variables = rule.get("variables", {})
        if not isinstance(variables, dict):
            raise CIError(f"{where}: workflow:rules:rule:variables config should be a hash")
        if _matches(rule, env, f"{where}: workflow:rules:if", project, changed):
            found = rule_variables(variables)
            return rule.get("when", "always") == "always", found, _expanded(
                name, {**env, **found})
    return False, {}, _expanded(name, env)


def _expanded(text: str, env: Mapping[str, str]) -> str:
    """$VAR / ${VAR} from ``env`` (an unknown one is left as written); no control
    characters, as the name is printed on the terminal."""
    text = re.sub(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)\}?",
                  lambda m: env.get(m.group(1), m.group(0)), text)
    return re.sub(r"[\x00-\x1f\x7f-\x9f]", "?", text)


# only/except keywords for pipeline sources, and the CI_PIPELINE_SOURCE each one means
# (ci/yaml "only:refs / except:refs": `schedules`, `merge_requests`, `triggers`...)
SOURCES = {"api": "api", "chat": "chat", "external": "external", "pipelines": "pipeline",
           "merge_requests": "merge_request_event", "schedules": "schedule",
           "triggers": "trigger", "web": "web",
           "external_pull_requests": "external_pull_request_event"}


def _refs_match(refs: Any, env: Mapping[str, str]) -> bool:
    ref = env.get("CI_COMMIT_REF_NAME", "")
    is_tag = bool(env.get("CI_COMMIT_TAG"))
    for item in [refs] if isinstance(refs, str) else refs if isinstance(refs, list) else []:
        item = str(item)
        if (item in ("branches", "pushes") and not is_tag) or (item == "tags" and is_tag):
            return True
        if SOURCES.get(item, item) == env.get("CI_PIPELINE_SOURCE"):
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
