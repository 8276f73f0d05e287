"""Registry credentials a job brings: GitLab's ``credentials[]`` and ``DOCKER_AUTH_CONFIG``,
GitHub's ``container.credentials``.

A registry is named as an image reference names it (images/oci/reference.py): host[:port],
lowercase, Docker Hub as ``docker.io`` whichever of its names or its v1 URL a docker
config.json uses. Every password, and the base64 ``auth`` that carries it, is a secret: the
caller masks what ``masks`` returns in the job's output. Nothing here ever puts a credential
into an error message.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Iterable

from kata_ci.errors import UserError
from kata_ci.images.oci.registry import Credentials, normalise_registry


def docker_auths(text: str, source: str) -> tuple[list[Credentials], list[str]]:
    """A docker config.json's ``auths`` ({registry: {auth: base64(user:password)} or
    {username, password}}) as Credentials, with notes on what is not used (credential
    helpers, identity tokens); UserError naming ``source`` and the registry when it is not
    one, never quoting a value."""
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise UserError(f"{source} is not valid JSON ({exc.__class__.__name__} at "
                        f"position {getattr(exc, 'pos', '?')})") from None
    if not isinstance(data, dict):
        raise UserError(f"{source} must be a JSON object with an \"auths\" object")
    auths = data.get("auths", {})
    if not isinstance(auths, dict):
        raise UserError(f"{source}: \"auths\" must be an object of registries")
    notes = [f"{source}: {key} (credential helpers) cannot run here: ignored"
             for key in ("credsStore", "credHelpers") if data.get(key)]
    found: list[Credentials] = []
    for registry, entry in auths.items():
        where = f"{source}: auths[{str(registry)[:100]!r}]"
        if not isinstance(entry, dict):
            raise UserError(f"{where} must be an object")
        user, password = _entry(entry, where)
        if user:
            found.append(Credentials(registry=normalise_registry(registry), username=user,
                                     password=password))
        elif entry.get("identitytoken") or entry.get("registrytoken"):
            notes.append(f"{where}: identity and registry tokens are not supported: ignored")
    return found, notes


def _entry(entry: dict[str, object], where: str) -> tuple[str, str]:
    auth = entry.get("auth")
    if auth:
        if not isinstance(auth, str):
            raise UserError(f"{where}: \"auth\" must be a base64 string")
        try:
            decoded = base64.b64decode(auth.strip(), validate=True).decode()
        except (binascii.Error, ValueError):
            raise UserError(f"{where}: \"auth\" is not base64 of user:password") from None
        user, colon, password = decoded.partition(":")
        if not colon or not user:
            raise UserError(f"{where}: \"auth\" is not base64 of user:password")
        return user, password
    name, secret = entry.get("username", ""), entry.get("password", "")
    if not isinstance(name, str) or not isinstance(secret, str):
        raise UserError(f"{where}: \"username\" and \"password\" must be strings")
    return name, secret


def first_per_registry(credentials: Iterable[Credentials]) -> tuple[Credentials, ...]:
    """One set per registry, the first given (the order is the source's precedence)."""
    seen: dict[str, Credentials] = {}
    for item in credentials:
        seen.setdefault(item.registry, item)
    return tuple(seen.values())


def masks(credentials: Iterable[Credentials]) -> list[str]:
    """What to mask in the job's output: each password, and its docker ``auth`` form."""
    out: list[str] = []
    for item in credentials:
        if item.password:
            out.append(item.password)
            out.append(base64.b64encode(f"{item.username}:{item.password}".encode()).decode())
    return out
