"""GitLab's ``image:`` and ``services:`` (doc: ci/yaml#image, #services) as what a job runs
in and beside.

The forms: a name, or ``{name, entrypoint, docker: {user, platform}, kubernetes: {...},
pull_policy}`` where pull_policy is one policy or a list of them. GitLab's precedence (the
job's own, else ``default:``, else the deprecated global ``image:``) is ci_file's; the
name may use the job's variables (``image: $REGISTRY/tool:$VERSION``), expanded as
gitlab-runner does when the job is built: an unknown variable is empty.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from typing import Any

from kata_ci.errors import UserError
from kata_ci.runner.core.images import POLICIES, ImageUse
from kata_ci.runner.core.services import ServiceUse, gitlab_aliases

IMAGE_KEYS = {"name", "entrypoint", "docker", "kubernetes", "pull_policy"}
_REF = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)\}|\$([A-Za-z_][A-Za-z0-9_]*)")


def parse_image(raw: Any, what: str) -> tuple[ImageUse | None, list[str]]:
    """A CI file's ``image:`` value as an ImageUse (its name not yet expanded), with notes on
    what kata-ci does not honour; UserError starting with ``what`` (file:line: job 'x':
    image) when a field has the wrong form."""
    if raw is None:
        return None, []
    if isinstance(raw, str):
        raw = {"name": raw}
    if not isinstance(raw, dict):
        raise UserError(f"{what} must be a name or a mapping with a name")
    unknown = set(map(str, raw)) - IMAGE_KEYS
    if unknown:
        raise UserError(f"{what} config contains unknown keys: {', '.join(sorted(unknown))}")
    name = raw.get("name")
    if not isinstance(name, str) or not name.strip():
        raise UserError(f"{what}: name must be a non-empty string")
    entrypoint = raw.get("entrypoint")
    if entrypoint is not None and (not isinstance(entrypoint, list) or
                                   not all(isinstance(w, str) for w in entrypoint)):
        raise UserError(f"{what}: entrypoint must be a list of strings")
    docker = raw.get("docker") or {}
    if not isinstance(docker, dict) or set(docker) - {"user", "platform"}:
        raise UserError(f"{what}: docker must be a mapping of user and platform")
    user = docker.get("user", "")
    if isinstance(user, bool) or not isinstance(user, str | int):
        raise UserError(f"{what}: docker.user must be a user name or id")
    platform = docker.get("platform")
    if platform is not None and not isinstance(platform, str):
        raise UserError(f"{what}: docker.platform must be a string")
    notes = platform_notes(platform)
    if "kubernetes" in raw:
        notes.append("image: kubernetes options do not apply to kata-ci's VMs: ignored")
    policy = raw.get("pull_policy")
    policies = [policy] if isinstance(policy, str) else policy or []
    if not isinstance(policies, list) or not all(p in POLICIES for p in policies):
        raise UserError(f"{what}: pull_policy must be one of {', '.join(POLICIES)}, or a "
                        "list of them")
    notes += policy_notes(policies)
    return ImageUse(name=name.strip(), entrypoint=entrypoint_of(entrypoint), user=str(user),
                    pull_policy=policies[0] if policies else ""), notes


def entrypoint_of(words: list[str] | None) -> tuple[str, ...] | None:
    """GitLab's entrypoint: none (or []) keeps the image's; [""] overrides it with none,
    as Docker reads an empty entrypoint."""
    if not words:
        return None
    return tuple(w for w in words if w)


def policy_notes(policies: list[str]) -> list[str]:
    """GitLab tries a list of pull policies in turn; kata-ci uses the first."""
    if len(policies) < 2:
        return []
    return [f"image: pull_policy {policies}: kata-ci uses the first, {policies[0]}"]


def platform_notes(platform: str | None) -> list[str]:
    if not platform:
        return []
    return [f"image: platform {platform} is not honoured: the image's linux/amd64 variant runs"]


def expand_image(use: ImageUse | None, env: Mapping[str, str]) -> ImageUse | None:
    """The image with $VAR and ${VAR} in its name and user taken from ``env`` (an unknown
    one is empty, $$ is a dollar); None when the name expands to nothing."""
    if use is None:
        return None
    name = _expand(use.name, env).strip()
    if not name:
        return None
    return dataclasses.replace(use, name=name, user=_expand(use.user, env))


def _expand(text: str, env: Mapping[str, str]) -> str:
    return _REF.sub(lambda m: "$" if m.group(0) == "$$" else
                    env.get(m.group(1) or m.group(2), ""), text)


SERVICE_KEYS = {"name", "alias", "entrypoint", "command", "variables", "pull_policy", "docker",
                "kubernetes", "ports"}


def parse_services(raw: Any, what: str) -> tuple[tuple[ServiceUse, ...], list[str]]:
    """A CI file's ``services:`` (doc: ci/yaml#services): names, or mappings of name, alias
    (several: comma or space separated), entrypoint, command, variables, pull_policy,
    docker.user. Names are expanded later, with the job's variables (expand_services)."""
    if raw is None:
        return (), []
    if not isinstance(raw, list):
        raise UserError(f"{what} must be a list")
    found: list[ServiceUse] = []
    notes: list[str] = []
    for index, item in enumerate(raw):
        where = f"{what}[{index}]"
        if isinstance(item, dict) and set(map(str, item)) - SERVICE_KEYS:
            unknown = set(map(str, item)) - SERVICE_KEYS
            raise UserError(f"{where} config contains unknown keys: "
                            f"{', '.join(sorted(unknown))}")
        body = item if isinstance(item, dict) else {"name": item}
        image, more = parse_image({k: v for k, v in body.items()
                                   if k in IMAGE_KEYS}, where)
        assert image is not None
        notes += more
        alias, command = body.get("alias", ""), body.get("command")
        variables = body.get("variables") or {}
        if not isinstance(alias, str):
            raise UserError(f"{where}: alias must be a string")
        if command is not None and (not isinstance(command, list) or
                                    not all(isinstance(w, str) for w in command)):
            raise UserError(f"{where}: command must be a list of strings")
        if not isinstance(variables, dict):
            raise UserError(f"{where}: variables must be a mapping")
        ports = [p.get("number") if isinstance(p, dict) else p for p in body.get("ports") or []]
        if not all(isinstance(p, int) and 0 < p < 65536 for p in ports):
            raise UserError(f"{where}: ports must be port numbers or {{number: N}}")
        found.append(ServiceUse(image, gitlab_aliases(image.name, alias),
                                None if command is None else tuple(command),
                                {str(k): str(v) for k, v in variables.items()},
                                tuple(p for p in ports if isinstance(p, int))))
    return tuple(found), notes


def expand_services(services: tuple[ServiceUse, ...],
                    env: Mapping[str, str]) -> tuple[ServiceUse, ...]:
    """Service names expanded with the job's variables (aliases follow the expanded name)."""
    out = []
    for service in services:
        image = expand_image(service.image, env)
        if image is None:
            continue
        aliases = service.aliases if image.name == service.image.name else \
            gitlab_aliases(image.name, ",".join(
                a for a in service.aliases if a not in gitlab_aliases(service.image.name)))
        out.append(dataclasses.replace(service, image=image, aliases=aliases))
    return tuple(out)
