"""The shapes GitLab accepts for each job keyword, checked once after `extends` and
`!reference` (doc: ci/yaml, each keyword's "Possible inputs"), so that nothing later meets a
type it does not expect. Messages follow GitLab's own: `jobs:NAME:KEY config should be ...`.
"""

from __future__ import annotations

from typing import Any

from kata_ci.runner.gitlab.keywords import DEFAULT_KEYS, JOB_KEYS, JOB_WHENS, RULE_KEYS
from kata_ci.runner.gitlab.source import CIError

MAX_SCRIPT_NESTING = 10  # "a nested array of strings up to 10 levels deep"
MAX_PARALLEL = 200  # parallel: 1..200, and at most 200 jobs from one matrix
NEEDS_KEYS = {"job", "optional", "artifacts", "project", "ref", "pipeline", "parallel"}
VARIABLE_KEYS = {"value", "description", "expand", "options", "masked"}
SCALARS = (str, int, float, bool)


def _is_script(value: Any, depth: int = 0) -> bool:
    if isinstance(value, str):
        return True
    if isinstance(value, list) and depth < MAX_SCRIPT_NESTING:
        return all(isinstance(v, SCALARS) or _is_script(v, depth + 1) for v in value)
    return False


def _strings(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def check_variables(value: Any, where: str) -> None:
    if not isinstance(value, dict):
        raise CIError(f"{where} config should be a hash of key value pairs")
    for key, item in value.items():
        if not isinstance(key, str):
            raise CIError(f"{where} config uses invalid data keys: {key!r}")
        if isinstance(item, dict):
            unknown = set(map(str, item)) - VARIABLE_KEYS
            if unknown or not isinstance(item.get("value", ""), SCALARS):
                raise CIError(f"{where}:{key} config uses invalid data keys: "
                              f"{', '.join(sorted(unknown)) or 'value'}")
        elif item is not None and not isinstance(item, SCALARS):
            raise CIError(f"{where}:{key} config should be a string, a number or a hash")


def _check_rules(rules: Any, where: str) -> None:
    if not isinstance(rules, list):
        raise CIError(f"{where}:rules config should be an array of hashes")
    for rule in rules:
        if not isinstance(rule, dict):
            raise CIError(f"{where}:rules config should be an array of hashes")
        unknown = set(map(str, rule)) - RULE_KEYS
        if unknown:
            raise CIError(f"{where}:rules:rule config contains unknown keys: "
                          f"{', '.join(sorted(unknown))}")
        if "if" in rule and not isinstance(rule["if"], str):
            raise CIError(f"{where}:rules:rule if should be a string")
        when = rule.get("when", "on_success")
        if when not in JOB_WHENS | {"never"}:
            raise CIError(f"{where}:rules:rule when unknown value: {when}")
        if "allow_failure" in rule and not isinstance(rule["allow_failure"], bool):
            raise CIError(f"{where}:rules:rule allow_failure should be a boolean value")
        if "variables" in rule:
            check_variables(rule["variables"], f"{where}:rules:rule:variables")
        if "needs" in rule:
            _check_needs(rule["needs"], f"{where}:rules:rule:needs")
        for key in ("exists", "changes"):
            item = rule.get(key)
            if key in rule and not (isinstance(item, str) or _strings(item)
                                    or isinstance(item, dict)):
                raise CIError(f"{where}:rules:rule:{key} should be an array of strings")


def _check_needs(needs: Any, where: str) -> None:
    if not isinstance(needs, list):
        raise CIError(f"{where} config should be an array")
    for need in needs:
        if isinstance(need, str):
            continue
        if not isinstance(need, dict) or set(map(str, need)) - NEEDS_KEYS:
            raise CIError(f"{where} config has an entry that is neither a job name nor a "
                          f"hash of {', '.join(sorted(NEEDS_KEYS))}: {need!r}"[:300])
        if "job" in need and not isinstance(need["job"], str):
            raise CIError(f"{where}:need job should be a string")
        if "job" not in need and "pipeline" not in need:
            raise CIError(f"{where}:need config missing required keys: job")
        if not isinstance(need.get("optional", False), bool):
            raise CIError(f"{where}:need optional should be a boolean value")


def _check_parallel(value: Any, where: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, dict)):
        raise CIError(f"{where} should be an integer or a hash")
    if isinstance(value, int):
        if not 1 <= value <= MAX_PARALLEL:
            raise CIError(f"{where} config must be less than or equal to {MAX_PARALLEL} "
                          "and greater than or equal to 1"[:300])
        return
    matrix = value.get("matrix")
    if set(map(str, value)) != {"matrix"} or not isinstance(matrix, list) or not matrix:
        raise CIError(f"{where}:matrix config should be an array of hashes")
    total = 0
    for entry in matrix:
        if not isinstance(entry, dict) or not entry:
            raise CIError(f"{where}:matrix config should be an array of hashes")
        count = 1
        for key, item in entry.items():
            values = item if isinstance(item, list) else [item]
            if not isinstance(key, str) or not values or \
                    not all(isinstance(v, SCALARS) for v in values):
                raise CIError(f"{where}:matrix:{key} config should be a string or an array "
                              "of strings")
            count *= len(values)
        total += count
    if total > MAX_PARALLEL:
        raise CIError(f"{where}:matrix config generates too many jobs (maximum is "
                      f"{MAX_PARALLEL})")


def check_job(name: str, body: dict[str, Any], where_line: str) -> None:
    """Every keyword of a visible job in a shape GitLab accepts; CIError otherwise."""
    where = f"{where_line}: jobs:{name}"
    unknown = set(map(str, body)) - JOB_KEYS
    if unknown:
        raise CIError(f"{where} config contains unknown keys: {', '.join(sorted(unknown))}")
    if "script" not in body and "trigger" not in body:
        raise CIError(f"{where} config should implement the script: or a trigger: keyword")
    for key in ("script", "before_script", "after_script"):
        if key in body and not _is_script(body[key]):
            raise CIError(f"{where}:{key} config should be a string or a nested array of "
                          f"strings up to {MAX_SCRIPT_NESTING} levels deep")
    for key in ("stage", "timeout", "start_in", "coverage", "resource_group"):
        if key in body and not isinstance(body[key], str):
            raise CIError(f"{where}:{key} config should be a string")
    when = body.get("when", "on_success")
    if when not in JOB_WHENS:
        raise CIError(f"{where} when unknown value: {when}")
    if when == "delayed" and "start_in" not in body:
        raise CIError(f"{where} start in should be a duration")
    if "rules" in body:
        _check_rules(body["rules"], where)
        both = sorted({"only", "except"} & set(body))
        if both:
            raise CIError(f"{where} config key may not be used with `rules`: "
                          f"{', '.join(both)}")
    for key in ("only", "except"):
        item = body.get(key)
        if key in body and not (_strings(item) or isinstance(item, (str, dict))):
            raise CIError(f"{where}:{key} config should be an array of strings or a hash")
    if "needs" in body:
        _check_needs(body["needs"], f"{where}:needs")
    if "parallel" in body:
        _check_parallel(body["parallel"], f"{where}:parallel")
    allow = body.get("allow_failure", False)
    if isinstance(allow, dict):
        codes = allow.get("exit_codes")
        if set(map(str, allow)) != {"exit_codes"} or not (
                (isinstance(codes, int) and not isinstance(codes, bool)) or (isinstance(codes, list)
                and codes and all(isinstance(c, int) and not isinstance(c, bool)
                                  for c in codes))):
            raise CIError(f"{where}:allow_failure exit_codes should be an integer or an array "
                          "of integers")
    elif not isinstance(allow, bool):
        raise CIError(f"{where}:allow_failure config should be a hash or a boolean value")
    if "variables" in body:
        check_variables(body["variables"], f"{where}:variables")
    _check_inherit(body.get("inherit"), where)
    for key in ("tags", "dependencies"):
        if key in body and not _strings(body[key]):
            raise CIError(f"{where}:{key} config should be an array of strings")


def _check_inherit(inherit: Any, where: str) -> None:
    if inherit is None:
        return
    if not isinstance(inherit, dict) or set(map(str, inherit)) - {"default", "variables"}:
        raise CIError(f"{where}:inherit config contains unknown keys (default, variables)")
    for key, item in inherit.items():
        if not isinstance(item, bool) and not _strings(item):
            raise CIError(f"{where}:inherit:{key} config should be a boolean value or an "
                          "array of strings")


def check_default(default: Any, where: str) -> None:
    if not isinstance(default, dict):
        raise CIError(f"{where}: default config should be a hash")
    unknown = set(map(str, default)) - DEFAULT_KEYS
    if unknown:
        raise CIError(f"{where}: default config contains unknown keys: "
                      f"{', '.join(sorted(unknown))}")
    for key in ("before_script", "after_script"):
        if key in default and not _is_script(default[key]):
            raise CIError(f"{where}: default:{key} config should be a string or a nested "
                          f"array of strings up to {MAX_SCRIPT_NESTING} levels deep")
