"""Shapes of the job keywords kata-ci does not act on but GitLab still validates (doc: ci/yaml
"artifacts", "cache", "retry", "environment", "trigger", "id_tokens", "secrets",
"release", "pages", "identity", "run"; GitLab's Config::Entry classes). A file GitLab
rejects is rejected here too, and nothing later meets, say, `artifacts: {paths: 1}`.
Messages follow GitLab's `jobs:NAME:KEY config ...` wording.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from kata_ci.runner.gitlab.source import CIError

WHENS = frozenset({"on_success", "on_failure", "always"})  # artifacts:when, cache:when
ARTIFACT_KEYS = {"name", "untracked", "paths", "reports", "when", "expire_in", "expose_as",
                 "exclude", "public", "access"}
CACHE_KEYS = {"key", "untracked", "paths", "when", "policy", "unprotect", "fallback_keys"}
MAX_CACHES = 4  # ci/yaml "cache": "You can specify a maximum of four caches"
ENVIRONMENT_KEYS = {"name", "url", "action", "on_stop", "kubernetes", "deployment_tier",
                    "auto_stop_in"}
ENVIRONMENT_ACTIONS = frozenset({"start", "prepare", "stop", "verify", "access"})
TRIGGER_KEYS = {"project", "branch", "strategy", "include", "forward", "inputs"}
RELEASE_KEYS = {"tag_name", "tag_message", "name", "description", "ref", "released_at",
                "milestones", "assets"}
PAGES_KEYS = {"path_prefix", "expire_in", "publish"}


def _strings(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def _one_of(value: Any, allowed: frozenset[str]) -> bool:
    return isinstance(value, str) and value in allowed


def _keys(value: dict[Any, Any], allowed: set[str], where: str) -> None:
    unknown = set(map(str, value)) - allowed
    if unknown:
        raise CIError(f"{where} config contains unknown keys: "
                      f"{', '.join(sorted(unknown))}"[:500])


def _typed(value: dict[Any, Any], where: str, **kinds: type) -> None:
    """Each of ``kinds`` present in ``value`` of its type (a boolean is no string or hash)."""
    words = {str: "a string", bool: "a boolean value", dict: "a hash"}
    for key, kind in kinds.items():
        if key in value and not isinstance(value[key], kind):
            raise CIError(f"{where}:{key} config should be {words.get(kind, kind.__name__)}")


def check_artifacts(key: str, value: Any, where: str) -> None:
    where = f"{where}:{key}"
    if not isinstance(value, dict):
        raise CIError(f"{where} config should be a hash")
    _keys(value, ARTIFACT_KEYS, where)
    _typed(value, where, name=str, untracked=bool, expire_in=str, expose_as=str, public=bool,
           access=str, reports=dict)
    for sub in ("paths", "exclude"):
        if sub in value and not _strings(value[sub]):
            raise CIError(f"{where}:{sub} config should be an array of strings")
    if "when" in value and not _one_of(value["when"], WHENS):
        raise CIError(f"{where} when should be on_success, on_failure or always")


def check_cache(key: str, value: Any, where: str) -> None:
    where = f"{where}:{key}"
    caches = value if isinstance(value, list) else [value]
    if len(caches) > MAX_CACHES:
        raise CIError(f"{where} config no more than {MAX_CACHES} caches can be created")
    for cache in caches:
        if not isinstance(cache, dict):
            raise CIError(f"{where} config should be a hash or an array of hashes")
        _keys(cache, CACHE_KEYS, where)
        _typed(cache, where, untracked=bool, unprotect=bool, policy=str)
        for sub in ("paths", "fallback_keys"):
            if sub in cache and not _strings(cache[sub]):
                raise CIError(f"{where}:{sub} config should be an array of strings")
        if "when" in cache and not _one_of(cache["when"], WHENS):
            raise CIError(f"{where}:when config should be one of on_success, on_failure, "
                          "always")
        cache_key = cache.get("key", "default")
        if isinstance(cache_key, dict):
            _keys(cache_key, {"files", "prefix"}, f"{where}:key")
            if not _strings(cache_key.get("files")) or not isinstance(
                    cache_key.get("prefix", ""), str):
                raise CIError(f"{where}:key:files config should be an array of strings")
        elif not isinstance(cache_key, (str, int, float)) or isinstance(cache_key, bool):
            raise CIError(f"{where}:key config should be a hash, a string or a symbol")


def check_retry_details(value: Any, where: str) -> None:
    """retry:when (strings) and retry:exit_codes (integers) of the hash form."""
    if not isinstance(value, dict):
        return
    when = value.get("when", [])
    if not (isinstance(when, str) or _strings(when)):
        raise CIError(f"{where}:retry when should be a string or an array of strings")
    codes = value.get("exit_codes", [])
    codes = codes if isinstance(codes, list) else [codes]
    if not all(isinstance(c, int) and not isinstance(c, bool) for c in codes):
        raise CIError(f"{where}:retry exit_codes should be an integer or an array of integers")


def check_id_tokens(key: str, value: Any, where: str) -> None:
    if not isinstance(value, dict):
        raise CIError(f"{where}:{key} config should be a hash")
    for name, token in value.items():
        here = f"{where}:{key}:{name}"[:300]
        if not isinstance(token, dict):
            raise CIError(f"{here} config should be a hash")
        _keys(token, {"aud"}, here)
        aud = token.get("aud")
        if not (isinstance(aud, str) or (_strings(aud) and aud)):
            raise CIError(f"{here}:aud config should be a string or an array of strings")


def _environment(value: Any, where: str) -> None:
    where = f"{where}:environment"
    if isinstance(value, str):
        return
    if not isinstance(value, dict):
        raise CIError(f"{where} config should be a hash or a string")
    _keys(value, ENVIRONMENT_KEYS, where)
    if not isinstance(value.get("name"), str):
        raise CIError(f"{where} name can't be blank (a string)")
    _typed(value, where, url=str, on_stop=str, deployment_tier=str, auto_stop_in=str,
           kubernetes=dict)
    if "action" in value and not _one_of(value["action"], ENVIRONMENT_ACTIONS):
        raise CIError(f"{where} action should be start, stop, prepare, verify, or access")


def _trigger(value: Any, where: str) -> None:
    where = f"{where}:trigger"
    if isinstance(value, str):
        return
    if not isinstance(value, dict):
        raise CIError(f"{where} config should be a hash or a string")
    _keys(value, TRIGGER_KEYS, where)
    _typed(value, where, project=str, branch=str, strategy=str, forward=dict, inputs=dict)
    include = value.get("include", [])
    if not isinstance(include, (str, dict)) and not (
            isinstance(include, list) and all(isinstance(i, (str, dict)) for i in include)):
        raise CIError(f"{where}:include config should be a hash, a string or an array")


def _release(value: Any, where: str) -> None:
    where = f"{where}:release"
    if not isinstance(value, dict):
        raise CIError(f"{where} config should be a hash")
    _keys(value, RELEASE_KEYS, where)
    if not isinstance(value.get("tag_name"), str):
        raise CIError(f"{where} tag name can't be blank (a string)")
    _typed(value, where, tag_message=str, name=str, description=str, ref=str,
           released_at=str, assets=dict)
    if "milestones" in value and not (isinstance(value["milestones"], str)
                                      or _strings(value["milestones"])):
        raise CIError(f"{where}:milestones config should be an array of strings or a string")


def _pages(value: Any, where: str) -> None:
    if isinstance(value, bool):
        return
    if not isinstance(value, dict):
        raise CIError(f"{where}:pages config should be a hash or a boolean value")
    _keys(value, PAGES_KEYS, f"{where}:pages")
    _typed(value, f"{where}:pages", path_prefix=str, expire_in=str, publish=str)


def _secrets(value: Any, where: str) -> None:
    if not isinstance(value, dict) or not all(isinstance(s, dict) for s in value.values()):
        raise CIError(f"{where}:secrets config should be a hash of hashes")


def _run(value: Any, where: str) -> None:
    if not isinstance(value, list) or not all(isinstance(step, dict) for step in value):
        raise CIError(f"{where}:run config should be an array of hashes")


def _string(key: str) -> Callable[[Any, str], None]:
    def check(value: Any, where: str) -> None:
        if not isinstance(value, str):
            raise CIError(f"{where}:{key} config should be a string")
    return check


def _hash(key: str) -> Callable[[Any, str], None]:
    def check(value: Any, where: str) -> None:
        if not isinstance(value, dict):
            raise CIError(f"{where}:{key} config should be a hash")
    return check


JOB_ONLY_CHECKS: dict[str, Callable[[Any, str], None]] = {
    "environment": _environment, "trigger": _trigger, "release": _release, "pages": _pages,
    "secrets": _secrets, "run": _run, "identity": _string("identity"),
    "dast_configuration": _hash("dast_configuration"),
}


def check_job_extras(body: dict[str, Any], where: str) -> None:
    """The job-only keywords above, each in a shape GitLab accepts."""
    for key, check in JOB_ONLY_CHECKS.items():
        if key in body:
            check(body[key], where)
