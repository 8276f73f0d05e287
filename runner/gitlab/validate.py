"""The shapes GitLab accepts for each keyword, checked once after `extends` and `!reference`
(doc: ci/yaml, each keyword's "Possible inputs"; GitLab's Config::Entry validations), so that
nothing later meets a type it does not expect. Messages follow GitLab's own:
`jobs:NAME:KEY config should be ...`. `image` and `services` are image.py's to check.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Hashable
from typing import Any

from kata_ci.runner.gitlab.keywords import DEFAULT_KEYS, JOB_KEYS, JOB_WHENS, RULE_KEYS
from kata_ci.runner.gitlab.shapes import (
    check_artifacts,
    check_cache,
    check_id_tokens,
    check_job_extras,
    check_retry_details,
)
from kata_ci.runner.gitlab.source import CIError

MAX_SCRIPT_NESTING = 10  # "a nested array of strings up to 10 levels deep"
MAX_PARALLEL = 200  # parallel: 1..200, and at most 200 jobs from one matrix
NEEDS_KEYS = {"job", "optional", "artifacts", "project", "ref", "pipeline", "parallel"}
VARIABLE_KEYS = {"value", "description", "expand", "options", "masked"}
POLICY_KEYS = {"refs", "variables", "changes", "kubernetes"}  # only/except as a hash
SCALARS = (str, int, float, bool)
# ChronicDuration's words for a duration ("3 hours 30 minutes", "1h30m", "10 seconds").
_UNITS = {**dict.fromkeys(("", "s", "sec", "secs", "second", "seconds"), 1),
          **dict.fromkeys(("m", "min", "mins", "minute", "minutes"), 60),
          **dict.fromkeys(("h", "hr", "hrs", "hour", "hours"), 3600),
          **dict.fromkeys(("d", "day", "days"), 86400),
          **dict.fromkeys(("w", "wk", "wks", "week", "weeks"), 604800),
          **dict.fromkeys(("mo", "mos", "month", "months"), 2592000),
          **dict.fromkeys(("y", "yr", "yrs", "year", "years"), 31536000)}
_PART = re.compile(r"(\d{1,12}(?:\.\d{1,6})?)\s*([a-z]*)[\s,]*(?:and\s+)?")


def _one_of(value: Any, allowed: set[str] | frozenset[str]) -> bool:
    """``value in allowed`` for any YAML value (a list or hash is not hashable)."""
    return isinstance(value, Hashable) and value in allowed


def _is_script(value: Any, depth: int = 0) -> bool:
    if isinstance(value, str):
        return True
    if isinstance(value, list) and depth < MAX_SCRIPT_NESTING:
        # GitLab's validate_string takes only strings (`- true` is refused there); scalars
        # are still taken: files in use write `script: [true]`
        return all(isinstance(v, SCALARS) or _is_script(v, depth + 1) for v in value)
    return False


def _strings(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def _duration(value: Any) -> float | None:
    """Seconds in a GitLab duration string, or None when it is not one. Read part by part
    (no backtracking regex: the text is the file's)."""
    if not isinstance(value, str):
        return None
    text, pos, total = value.strip().lower(), 0, 0.0
    while pos < len(text):
        part = _PART.match(text, pos)
        if not part or part.group(2) not in _UNITS:
            return None
        total += float(part.group(1)) * _UNITS[part.group(2)]
        pos = part.end()
    return total or None


def check_variables(value: Any, where: str) -> None:
    if not isinstance(value, dict):
        raise CIError(f"{where} config should be a hash of key value pairs")
    for key, item in value.items():
        if not isinstance(key, str):
            raise CIError(f"{where} config uses invalid data keys: {key!r}"[:300])
        if isinstance(item, dict):
            unknown = set(map(str, item)) - VARIABLE_KEYS
            if unknown or not isinstance(item.get("value", ""), SCALARS):
                raise CIError(f"{where}:{key} config uses invalid data keys: "
                              f"{', '.join(sorted(unknown)) or 'value'}"[:300])
            options = item.get("options", [])
            if not _strings(options) or not isinstance(item.get("expand", True), bool) \
                    or not isinstance(item.get("description", ""), str):
                raise CIError(f"{where}:{key} config should be a hash with value, "
                              "description (a string), expand (a boolean) and options (an "
                              "array of strings)")
        elif item is not None and not isinstance(item, SCALARS):
            raise CIError(f"{where}:{key} config should be a string, a number or a hash")


def _check_paths(rule: dict[Any, Any], key: str, where: str, extra: set[str]) -> None:
    """rules:exists / rules:changes: an array of strings, or {paths: [...], ...}."""
    item = rule[key]
    if isinstance(item, dict):
        unknown = set(map(str, item)) - {"paths"} - extra
        if unknown or not _strings(item.get("paths")) or not all(
                isinstance(item[k], str) for k in extra & set(item)):
            raise CIError(f"{where}:rules:rule:{key} config should be a hash with paths (an "
                          f"array of strings) and {', '.join(sorted(extra))} (strings)")
    elif not (isinstance(item, str) or _strings(item)):
        raise CIError(f"{where}:rules:rule:{key} should be an array of strings")


def _check_rules(rules: Any, where: str) -> None:
    if not isinstance(rules, list):
        raise CIError(f"{where}:rules config should be an array of hashes")
    for rule in rules:
        if not isinstance(rule, dict):
            raise CIError(f"{where}:rules config should be an array of hashes")
        unknown = set(map(str, rule)) - RULE_KEYS
        if unknown:
            raise CIError(f"{where}:rules:rule config contains unknown keys: "
                          f"{', '.join(sorted(unknown))}"[:300])
        if "if" in rule and not isinstance(rule["if"], str):
            raise CIError(f"{where}:rules:rule if should be a string")
        when = rule.get("when", "on_success")
        if not _one_of(when, JOB_WHENS | {"never"}):
            raise CIError(f"{where}:rules:rule when unknown value: {when}"[:300])
        if when == "delayed" and _duration(rule.get("start_in")) is None:
            raise CIError(f"{where}:rules:rule start in should be a duration")
        if when != "delayed" and "start_in" in rule:
            raise CIError(f"{where}:rules:rule config contains disallowed keys: start_in")
        for key in ("allow_failure", "interruptible"):
            if key in rule and not isinstance(rule[key], bool):
                raise CIError(f"{where}:rules:rule {key} should be a boolean value")
        if "variables" in rule:
            check_variables(rule["variables"], f"{where}:rules:rule:variables")
        if "needs" in rule:
            _check_needs(rule["needs"], f"{where}:rules:rule:needs")
        if "exists" in rule:
            _check_paths(rule, "exists", where, {"project", "ref"})
        if "changes" in rule:
            _check_paths(rule, "changes", where, {"compare_to"})


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
        for key in ("optional", "artifacts"):
            if not isinstance(need.get(key, False), bool):
                raise CIError(f"{where}:need {key} should be a boolean value")
        for key in ("project", "ref", "pipeline"):
            if key in need and not isinstance(need[key], str):
                raise CIError(f"{where}:need {key} should be a string")


def _check_parallel(value: Any, where: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, dict)):
        raise CIError(f"{where} should be an integer or a hash")
    if isinstance(value, int):
        if not 1 <= value <= MAX_PARALLEL:
            raise CIError(f"{where} config must be less than or equal to {MAX_PARALLEL} "
                          "and greater than or equal to 1")
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
                              "of strings"[:300])
            count *= len(values)
            if count > MAX_PARALLEL:
                break  # past the limit already; multiplying on could take long
        total += count
        if total > MAX_PARALLEL:
            raise CIError(f"{where}:matrix config generates too many jobs (maximum is "
                          f"{MAX_PARALLEL})")


def _check_allow_failure(allow: Any, where: str) -> None:
    def code(c: Any) -> bool:
        return isinstance(c, int) and not isinstance(c, bool)

    if isinstance(allow, dict):
        codes = allow.get("exit_codes")
        if set(map(str, allow)) != {"exit_codes"} or not (code(codes) or (
                isinstance(codes, list) and codes and all(map(code, codes)))):
            raise CIError(f"{where}:allow_failure exit_codes should be an integer or an array "
                          "of integers")
    elif not isinstance(allow, bool):
        raise CIError(f"{where}:allow_failure config should be a hash or a boolean value")


def _check_policy(key: str, item: Any, where: str) -> None:
    """only/except: refs as an array of strings (or /regexps/), or a hash of refs,
    variables, changes, kubernetes (ci/yaml "only / except")."""
    refs = item.get("refs", []) if isinstance(item, dict) else item
    if isinstance(item, dict):
        unknown = set(map(str, item)) - POLICY_KEYS
        if unknown:
            raise CIError(f"{where}:{key} config contains unknown keys: "
                          f"{', '.join(sorted(unknown))}"[:300])
        for sub in ("variables", "changes"):
            if sub in item and not _strings(item[sub]):
                raise CIError(f"{where}:{key}:{sub} config should be an array of strings")
        if item.get("kubernetes", "active") != "active":
            raise CIError(f"{where}:{key}:kubernetes config should be active")
    refs = [refs] if isinstance(refs, str) else refs
    if not _strings(refs):
        raise CIError(f"{where}:{key} config should be an array of strings or regular "
                      "expressions")
    for ref in refs:
        pattern = re.fullmatch(r"/(.*)/([a-z]*)", ref)
        try:
            if pattern:
                re.compile(pattern.group(1))
        except (re.error, RecursionError, OverflowError):
            raise CIError(f"{where}:{key} config should be an array of strings or regular "
                          f"expressions: {ref}"[:300]) from None


def _check_retry(value: Any, where: str) -> None:
    retry = value.get("max", 0) if isinstance(value, dict) else value
    if isinstance(value, dict) and set(map(str, value)) - {"max", "when", "exit_codes"}:
        raise CIError(f"{where}:retry config contains unknown keys (max, when, exit_codes)")
    if isinstance(retry, bool) or not isinstance(retry, int) or not 0 <= retry <= 2:
        raise CIError(f"{where}:retry config should be an integer between 0 and 2 or a hash")
    check_retry_details(value, where)


def _check_inherit(inherit: Any, where: str) -> None:
    if not isinstance(inherit, dict) or set(map(str, inherit)) - {"default", "variables"}:
        raise CIError(f"{where}:inherit config contains unknown keys (default, variables)")
    for key, item in inherit.items():
        if not isinstance(item, bool) and not _strings(item):
            raise CIError(f"{where}:inherit:{key} config should be a boolean value or an "
                          "array of strings")


def _check_script(key: str, value: Any, where: str) -> None:
    if not _is_script(value):
        raise CIError(f"{where}:{key} config should be a string or a nested array of "
                      f"strings up to {MAX_SCRIPT_NESTING} levels deep")


def _check_timeout(key: str, value: Any, where: str) -> None:
    if not isinstance(value, str):
        raise CIError(f"{where}:{key} config should be a string")
    if _duration(value) is None:
        raise CIError(f"{where}:{key} config should be a duration")


def _check_hooks(key: str, value: Any, where: str) -> None:
    """hooks:pre_get_sources_script, the one hook GitLab has: a script."""
    if not isinstance(value, dict) or set(map(str, value)) - {"pre_get_sources_script"}:
        raise CIError(f"{where}:{key} config should be a hash of pre_get_sources_script")
    if "pre_get_sources_script" in value:
        _check_script("pre_get_sources_script", value["pre_get_sources_script"],
                      f"{where}:{key}")


def _check_strings(key: str, value: Any, where: str) -> None:
    if not _strings(value):
        raise CIError(f"{where}:{key} config should be an array of strings")


def _check_shape(kind: type | tuple[type, ...], words: str) -> Callable[[str, Any, str], None]:
    def check(key: str, value: Any, where: str) -> None:
        if not isinstance(value, kind):
            raise CIError(f"{where}:{key} config should be {words}")
    return check


# Checks for the keywords a job and `default:` share.
SHARED: dict[str, Callable[[str, Any, str], None]] = {
    "before_script": _check_script, "after_script": _check_script,
    "timeout": _check_timeout,
    "retry": lambda key, value, where: _check_retry(value, where),
    "interruptible": _check_shape(bool, "a boolean value"),
    "artifacts": check_artifacts, "hooks": _check_hooks, "id_tokens": check_id_tokens,
    "cache": check_cache,
    "tags": lambda key, value, where: _check_strings(key, value, where),
}


def check_job(name: str, body: dict[str, Any], where_line: str) -> None:
    """Every keyword of a visible job in a shape GitLab accepts; CIError otherwise."""
    where = f"{where_line}: jobs:{name}"
    unknown = set(map(str, body)) - JOB_KEYS
    if unknown:
        raise CIError(f"{where} config contains unknown keys: "
                      f"{', '.join(sorted(unknown))}"[:500])
    if "script" not in body and "trigger" not in body and "run" not in body:
        raise CIError(f"{where} config should implement the script:, run:, or trigger: "
                      "keyword")
    if "script" in body and "run" in body:
        raise CIError(f"{where} config these keys cannot be used together: script, run")
    for key, check in SHARED.items():
        if key in body:
            check(key, body[key], where)
    if "script" in body:
        _check_script("script", body["script"], where)
    for key in ("stage", "coverage", "resource_group", "manual_confirmation"):
        if key in body and not isinstance(body[key], str):
            raise CIError(f"{where}:{key} config should be a string")
    when = body.get("when", "on_success")
    if not _one_of(when, JOB_WHENS):
        raise CIError(f"{where} when should be one of: on_success, on_failure, always, "
                      "manual, delayed")
    if "rules" in body:
        _check_rules(body["rules"], where)
        both = sorted({"only", "except", "start_in"} & set(body))
        if both:
            raise CIError(f"{where} config key may not be used with `rules`: "
                          f"{', '.join(both)}")
    if when == "delayed":
        start = _duration(body.get("start_in"))
        if start is None:
            raise CIError(f"{where} start in should be a duration")
        if start > 7 * 86400:
            raise CIError(f"{where} start in should not exceed the limit (1 week)")
    elif "start_in" in body:
        raise CIError(f"{where} start in must be blank (only with when: delayed)")
    for key in ("only", "except"):
        if key in body:
            _check_policy(key, body[key], where)
    if "needs" in body:
        _check_needs(body["needs"], f"{where}:needs")
    if "parallel" in body:
        _check_parallel(body["parallel"], f"{where}:parallel")
    _check_allow_failure(body.get("allow_failure", False), where)
    if "variables" in body:
        check_variables(body["variables"], f"{where}:variables")
    if "inherit" in body:
        _check_inherit(body["inherit"], where)
    if "dependencies" in body and not _strings(body["dependencies"]):
        raise CIError(f"{where}:dependencies config should be an array of strings")
    check_job_extras(body, where)


def check_default(default: Any, where: str) -> None:
    if not isinstance(default, dict):
        raise CIError(f"{where}: default config should be a hash")
    unknown = set(map(str, default)) - DEFAULT_KEYS
    if unknown:
        raise CIError(f"{where}: default config contains unknown keys: "
                      f"{', '.join(sorted(unknown))}"[:500])
    for key, check in SHARED.items():
        if key in default:
            check(key, default[key], f"{where}: default")


def check_globals(data: dict[str, Any], where: Callable[[str], str]) -> None:
    """The top-level keywords (after includes and !reference): `stages` an array of
    strings, `variables` a hash; `workflow` a hash (its rules are rules.py's)."""
    stages = data.get("stages")
    if stages is not None and not _strings(stages):
        raise CIError(f"{where('stages')}: stages config should be an array of strings")
    if "variables" in data:
        check_variables(data["variables"], f"{where('variables')}: variables")
    if "workflow" in data and not isinstance(data["workflow"], dict):
        raise CIError(f"{where('workflow')}: workflow config should be a hash")
    for key in ("before_script", "after_script"):  # the deprecated global forms of default:
        if key in data and not _is_script(data[key]):
            raise CIError(f"{where(key)}: {key} config should be a string or a nested array "
                          f"of strings up to {MAX_SCRIPT_NESTING} levels deep")
