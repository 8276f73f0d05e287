"""A GitLab job payload (the 201 body of `POST /jobs/request`) as typed, checked values.

Field names follow gitlab-runner's ``spec.Job`` (common/spec/spec.go); the shape is in
shared/fixtures/gitlab. The payload is GitLab's, but most of it is written by whoever pushes
to the project (scripts, variables, artifact paths, cache keys): every field is checked for
its type here, and what later reaches a host command (refspecs, the sha, the repository URL)
is checked for its form, so that nothing in it can become an option or another protocol.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from kata_ci.errors import UserError
from kata_ci.images.oci.registry import Credentials, normalise_registry
from kata_ci.runner.core.images import POLICIES, ImageUse
from kata_ci.runner.core.services import ServiceUse, gitlab_aliases
from kata_ci.runner.gitlab.image import entrypoint_of, platform_notes, policy_notes

SHA = re.compile(r"[0-9a-f]{7,64}")  # hex only: never an option; full ids from GitLab
# A refspec GitLab sends: +<sha or refs/...>:refs/...; nothing that could start an option.
REFSPEC = re.compile(r"\+?(?:[0-9a-f]{40}|[0-9a-f]{64}|refs/[A-Za-z0-9._/@-]+)"
                     r":refs/[A-Za-z0-9._/@-]+")
STEP_NAMES = re.compile(r"[a-z_][a-z0-9_]{0,62}")


def _get(raw: dict[str, Any], key: str, kind: type | tuple[type, ...], default: Any,
         where: str) -> Any:
    value = raw.get(key, default)
    if value is None:
        return default
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise UserError(f"GitLab job payload: {where}{key} has the wrong type "
                        f"({type(value).__name__})")
    return value


def _strings(raw: dict[str, Any], key: str, where: str) -> list[str]:
    items = _get(raw, key, list, [], where)
    if not all(isinstance(i, str) for i in items):
        raise UserError(f"GitLab job payload: {where}{key} must be a list of strings")
    return list(items)


def _objects(raw: dict[str, Any], key: str) -> list[dict[str, Any]]:
    items = _get(raw, key, list, [], "")
    if not all(isinstance(i, dict) for i in items):
        raise UserError(f"GitLab job payload: {key} must be a list of objects")
    return list(items)


@dataclass(frozen=True)
class Variable:
    key: str
    value: str
    public: bool = True
    masked: bool = False
    file: bool = False
    raw: bool = False


@dataclass(frozen=True)
class Step:
    name: str
    script: list[str]
    timeout: int
    when: str  # on_success | on_failure | always
    allow_failure: bool


@dataclass(frozen=True)
class Artifact:
    name: str
    paths: list[str]
    exclude: list[str]
    untracked: bool
    when: str  # on_success | on_failure | always
    expire_in: str
    artifact_type: str
    artifact_format: str


@dataclass(frozen=True)
class Cache:
    key: str
    paths: list[str]
    untracked: bool
    policy: str  # pull | push | pull-push
    when: str
    fallback_keys: list[str]


@dataclass(frozen=True)
class Dependency:
    id: int
    token: str
    name: str
    filename: str  # "" when the dependency has no artifacts


@dataclass(frozen=True)
class GitInfo:
    repo_url: str  # without credentials
    ref: str
    sha: str
    ref_type: str
    refspecs: list[str]
    depth: int


@dataclass(frozen=True)
class GitLabJob:
    id: int
    token: str
    name: str
    stage: str
    project_id: int
    project_path: str
    git: GitInfo
    timeout: int
    variables: list[Variable]
    steps: list[Step]
    artifacts: list[Artifact]
    caches: list[Cache]
    dependencies: list[Dependency]
    mask_prefixes: list[str]
    failure_reasons: list[str]
    image: str = ""  # the image's name as GitLab sent it ("": none)
    # entrypoint, user, pull policy; its name expanded and credentials added by execute
    image_use: ImageUse | None = None
    image_notes: list[str] = field(default_factory=list)  # what of it kata-ci ignores
    credentials: list[Credentials] = field(default_factory=list)  # type registry, in order
    services: list[ServiceUse] = field(default_factory=list)  # names not yet expanded
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @property
    def variable_map(self) -> dict[str, Variable]:
        return {v.key: v for v in self.variables}


def _clean_url(url: str) -> str:
    """The repository URL without the credentials GitLab puts in it (they travel in a
    header instead); only http(s), which is all GitLab hands out."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:  # a bad port, an unclosed [
        raise UserError("GitLab job payload: git_info.repo_url is not a URL") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise UserError("GitLab job payload: git_info.repo_url is not an http(s) URL")
    netloc = parts.hostname if ":" not in parts.hostname else f"[{parts.hostname}]"
    if port:
        netloc += f":{port}"
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def _git(raw: dict[str, Any]) -> GitInfo:
    info = _get(raw, "git_info", dict, {}, "")
    sha = _get(info, "sha", str, "", "git_info.")
    if not SHA.fullmatch(sha):
        raise UserError("GitLab job payload: git_info.sha is not a commit id")
    refspecs = _strings(info, "refspecs", "git_info.")
    for spec in refspecs:
        if not REFSPEC.fullmatch(spec):
            raise UserError(f"GitLab job payload: refspec {spec[:80]!r} is not one GitLab sends")
    depth = _get(info, "depth", int, 0, "git_info.")
    return GitInfo(repo_url=_clean_url(_get(info, "repo_url", str, "", "git_info.")),
                   ref=_get(info, "ref", str, "", "git_info."), sha=sha,
                   ref_type=_get(info, "ref_type", str, "branch", "git_info."),
                   refspecs=refspecs, depth=max(0, depth))


def _when(value: str, where: str) -> str:
    if value not in ("on_success", "on_failure", "always"):
        raise UserError(f"GitLab job payload: {where} when: {value!r} is not one GitLab sends")
    return value


def _image(raw: dict[str, Any]) -> tuple[ImageUse | None, list[str]]:
    """image {name, entrypoint, executor_opts {docker {user, platform}}, pull_policy []}."""
    image = _get(raw, "image", dict, {}, "")
    name = _get(image, "name", str, "", "image.")
    entrypoint = _strings(image, "entrypoint", "image.")
    docker = _get(_get(image, "executor_opts", dict, {}, "image."), "docker", dict, {},
                  "image.executor_opts.")
    user = _get(docker, "user", str, "", "image.executor_opts.docker.")
    platform = _get(docker, "platform", str, "", "image.executor_opts.docker.")
    policies = _strings(image, "pull_policy", "image.")
    for policy in policies:
        if policy not in POLICIES:
            raise UserError(f"GitLab job payload: image.pull_policy {policy[:40]!r} is not "
                            f"one of {', '.join(POLICIES)}")
    if not name.strip():
        return None, []
    return ImageUse(name=name.strip(), entrypoint=entrypoint_of(entrypoint), user=user,
                    pull_policy=policies[0] if policies else ""), \
        platform_notes(platform) + policy_notes(policies)


def _services(raw: dict[str, Any]) -> list[ServiceUse]:
    """services[] {name, alias, entrypoint, command, ports [{number}], variables [{key,
    value}], pull_policy}: names not yet expanded (execute does, with the job's variables)."""
    found = []
    for item in _objects(raw, "services"):
        use, _ = _image({"image": item})
        if use is None:
            continue
        ports = [_get(p, "number", int, 0, "services[].ports[].")
                 for p in _objects(item, "ports")]
        variables = {_get(v, "key", str, "", "services[].variables[]."):
                     _get(v, "value", str, "", "services[].variables[].")
                     for v in _objects(item, "variables")}
        command = _strings(item, "command", "services[].")
        found.append(ServiceUse(use, gitlab_aliases(use.name,
                                                    _get(item, "alias", str, "", "services[].")),
                                tuple(command) if command else None,
                                {k: v for k, v in variables.items() if k},
                                tuple(p for p in ports if 0 < p < 65536)))
    return found


def _credentials(raw: dict[str, Any]) -> list[Credentials]:
    """credentials[] of type registry (GitLab's own registry, with the job's token)."""
    found = []
    for item in _objects(raw, "credentials"):
        if _get(item, "type", str, "", "credentials[].").lower() != "registry":
            continue
        url = _get(item, "url", str, "", "credentials[].")
        user = _get(item, "username", str, "", "credentials[].")
        if url.strip() and user:
            found.append(Credentials(registry=normalise_registry(url), username=user,
                                     password=_get(item, "password", str, "",
                                                   "credentials[].")))
    return found


def parse_job(raw: object) -> GitLabJob:
    """The payload as a GitLabJob; UserError naming the field when it is not one."""
    if not isinstance(raw, dict):
        raise UserError("GitLab job payload is not a JSON object")
    job_id = _get(raw, "id", int, 0, "")
    token = _get(raw, "token", str, "", "")
    if job_id <= 0 or not token:
        raise UserError("GitLab job payload has no id or token")
    info = _get(raw, "job_info", dict, {}, "")
    variables = []
    for item in _objects(raw, "variables"):
        key = _get(item, "key", str, "", "variables[].")
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
            raise UserError(f"GitLab job payload: variable name {key[:40]!r} is not valid")
        variables.append(Variable(key, _get(item, "value", str, "", f"variables.{key}."),
                                  *(bool(_get(item, k, bool, d, f"variables.{key}."))
                                    for k, d in (("public", True), ("masked", False),
                                                 ("file", False), ("raw", False)))))
    steps = []
    for item in _objects(raw, "steps"):
        name = _get(item, "name", str, "", "steps[].")
        if not STEP_NAMES.fullmatch(name):
            raise UserError(f"GitLab job payload: step name {name[:40]!r} is not valid")
        steps.append(Step(name, _strings(item, "script", f"steps.{name}."),
                          _get(item, "timeout", int, 0, f"steps.{name}."),
                          _when(_get(item, "when", str, "on_success", ""), f"step {name}"),
                          bool(_get(item, "allow_failure", bool, False, ""))))
    artifacts = [Artifact(name=_get(a, "name", str, "", "artifacts[]."),
                          paths=_strings(a, "paths", "artifacts[]."),
                          exclude=_strings(a, "exclude", "artifacts[]."),
                          untracked=bool(_get(a, "untracked", bool, False, "artifacts[].")),
                          when=_when(_get(a, "when", str, "on_success", ""), "artifacts"),
                          expire_in=_get(a, "expire_in", str, "", "artifacts[]."),
                          artifact_type=_get(a, "artifact_type", str, "archive", "artifacts[]."),
                          artifact_format=_get(a, "artifact_format", str, "zip", "artifacts[]."))
                 for a in _objects(raw, "artifacts")]
    caches = [Cache(key=_get(c, "key", str, "default", "cache[]."),
                    paths=_strings(c, "paths", "cache[]."),
                    untracked=bool(_get(c, "untracked", bool, False, "cache[].")),
                    policy=_get(c, "policy", str, "pull-push", "cache[]."),
                    when=_when(_get(c, "when", str, "on_success", ""), "cache"),
                    fallback_keys=_strings(c, "fallback_keys", "cache[]."))
              for c in _objects(raw, "cache")]
    for cache in caches:
        if cache.policy not in ("pull", "push", "pull-push"):
            raise UserError(f"GitLab job payload: cache policy {cache.policy!r} is not valid")
    dependencies = []
    for d in _objects(raw, "dependencies"):
        file = _get(d, "artifacts_file", dict, {}, "dependencies[].")
        dependencies.append(Dependency(_get(d, "id", int, 0, "dependencies[]."),
                                       _get(d, "token", str, "", "dependencies[]."),
                                       _get(d, "name", str, "", "dependencies[]."),
                                       _get(file, "filename", str, "", "artifacts_file.")))
    features = _get(raw, "features", dict, {}, "")
    image, notes = _image(raw)
    return GitLabJob(
        id=job_id, token=token, name=_get(info, "name", str, "", "job_info."),
        stage=_get(info, "stage", str, "", "job_info."),
        project_id=_get(info, "project_id", int, 0, "job_info."),
        project_path=_get(info, "project_full_path", str, "", "job_info.")
        or _get(info, "project_name", str, "project", "job_info."),
        git=_git(raw), timeout=_get(_get(raw, "runner_info", dict, {}, ""), "timeout", int,
                                    3600, "runner_info."),
        variables=variables, steps=steps, artifacts=artifacts, caches=caches,
        dependencies=dependencies,
        mask_prefixes=_strings(features, "token_mask_prefixes", "features."),
        failure_reasons=_strings(features, "failure_reasons", "features."),
        image=image.name if image else "", image_use=image, image_notes=notes,
        credentials=_credentials(raw),
        services=_services(raw),
        raw=raw)
