"""GitHub's ``jobs.<id>.container`` (doc: workflow-syntax#jobsjob_idcontainer) as the
ImageUse the job's steps run in.

``container: IMAGE`` or ``{image, env, credentials {username, password}, options, ports,
volumes}``. Its form is checked when the workflow loads (file:line, job); its strings may
hold expressions (``node:${{ matrix.node }}``, ``${{ secrets.REGISTRY_TOKEN }}``), rendered
when the job is built. As on GitHub, the image's entrypoint does not run (GitHub starts the
container with its own command), and a step without ``shell:`` runs with bash when the
image has it, else with sh. Of ``options`` (docker create flags) ``--user`` is honoured,
``--env`` adds to the environment; the rest describe a container, not a VM, and are noted
as ignored; ``ports`` and ``volumes`` are noted as not supported yet.
"""

from __future__ import annotations

import dataclasses
import shlex
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from kata_ci.errors import ImagePullFailure, UserError
from kata_ci.images.oci.reference import parse_reference
from kata_ci.images.oci.registry import Credentials
from kata_ci.runner.core.images import ImageUse
from kata_ci.runner.core.secrets import secret_problem
from kata_ci.runner.core.services import ServiceUse

CONTAINER_KEYS = {"image", "env", "credentials", "options", "ports", "volumes"}
# docker create flags that size or wire a container: a VM has its own (vcpus, memory_mib,
# its network policy), so they are ignored with a note
VM_FLAGS = {"--cpus", "--cpu-shares", "-c", "--cpuset-cpus", "--memory", "-m",
            "--memory-swap", "--memory-reservation", "--shm-size", "--network", "--net",
            "--network-alias", "--privileged", "--cap-add", "--cap-drop", "--security-opt",
            "--ulimit", "--pids-limit", "--init", "--ipc", "--pid", "--device", "--gpus",
            "--add-host", "--dns", "--hostname", "-h", "--rm", "--tmpfs", "--sysctl"}
NO_VALUE = {"--privileged", "--init", "--rm", "--read-only", "-t", "--tty", "-i",
            "--interactive", "--no-healthcheck"}


@dataclass(frozen=True)
class Container:
    """A job's container as written; its strings may hold ${{ }} expressions."""

    image: str
    env: dict[str, str] = field(default_factory=dict)
    username: str = ""
    password: str = ""
    options: str = ""
    notes: tuple[str, ...] = ()  # what kata-ci does not honour, known when the file loads


def parse_container(raw: Any, where: str, job: str) -> Container | None:
    """The ``container:`` of a job, its form checked; WorkflowError-like UserError naming
    the file, line and job when it is not one."""
    if raw is None:
        return None
    what = f"{where}: job {job!r}: container"
    if isinstance(raw, str):
        return Container(image=raw.strip()) if raw.strip() else None
    if not isinstance(raw, dict):
        raise UserError(f"{what} must be an image name or a mapping with an image")
    unknown = set(map(str, raw)) - CONTAINER_KEYS
    if unknown:
        raise UserError(f"{what} has unknown keys: {', '.join(sorted(unknown))}")
    image = raw.get("image")
    if not isinstance(image, str) or not image.strip():
        raise UserError(f"{what}: image must be a non-empty string")
    env = raw.get("env") or {}
    if not isinstance(env, dict) or any(isinstance(v, dict | list) for v in env.values()):
        raise UserError(f"{what}: env must be a mapping of names to values")
    credentials = raw.get("credentials") or {}
    if not isinstance(credentials, dict) or set(credentials) - {"username", "password"} or \
            not all(isinstance(v, str) for v in credentials.values()):
        raise UserError(f"{what}: credentials must be a mapping of username and password")
    options = raw.get("options") or ""
    if not isinstance(options, str):
        raise UserError(f"{what}: options must be a string")
    notes = []
    for key in ("ports", "volumes"):
        value = raw.get(key)
        if value is not None and not isinstance(value, list):
            raise UserError(f"{what}: {key} must be a list")
        if value:
            notes.append(f"container: {key} are not supported yet: ignored")
    return Container(image=image.strip(),
                     env={str(k): "" if v is None else str(v).lower() if isinstance(v, bool)
                          else str(v) for k, v in env.items()},
                     username=credentials.get("username", ""),
                     password=credentials.get("password", ""), options=options,
                     notes=tuple(notes))


def container_image(container: Container | None,
                    render: Callable[[str], str]) -> tuple[ImageUse | None, dict[str, str],
                                                          list[str]]:
    """The ImageUse of a job's container, its expressions rendered; with the secrets to mask
    (the registry password) and notes. None when the image renders empty (GitHub then runs
    the job without a container). UserError for a bad expression or options."""
    if container is None:
        return None, {}, []
    image = render(container.image).strip()
    if not image:
        return None, {}, []
    notes = list(container.notes)
    user, extra = _options(render(container.options), notes)
    env = {**{k: render(v) for k, v in container.env.items()}, **extra}
    username, password = render(container.username), render(container.password)
    secrets: dict[str, str] = {}
    credentials: tuple[Credentials, ...] = ()
    if username or password:
        if not (username and password):
            raise UserError("container: credentials need both username and password")
        if secret_problem(password) is None:
            secrets["container.credentials.password"] = password
        try:
            registry = parse_reference(image).registry
        except ImagePullFailure:
            registry = ""  # the pull says what is wrong with the name
        if registry:
            credentials = (Credentials(registry=registry, username=username,
                                       password=password),)
    return ImageUse(name=image, entrypoint=(), user=user, credentials=credentials,
                    env=env), secrets, notes


def _options(text: str, notes: list[str]) -> tuple[str, dict[str, str]]:
    """docker create flags: (the --user, --env pairs); notes for what is ignored."""
    try:
        words = shlex.split(text)
    except ValueError as exc:
        raise UserError(f"container: options {text[:200]!r}: {exc}") from None
    user, env, ignored, unknown = "", {}, [], []
    i = 0
    while i < len(words):
        flag, eq, value = words[i].partition("=")
        i += 1
        if not eq and flag.startswith("-") and flag not in NO_VALUE and i < len(words) \
                and not words[i].startswith("-"):
            value = words[i]
            i += 1
        if flag in ("--user", "-u"):
            user = value
        elif flag in ("--env", "-e"):
            key, has, val = value.partition("=")
            if key and has:  # `-e NAME` alone takes the host's value: none here
                env[key] = val
        elif flag in VM_FLAGS:
            ignored.append(flag)
        else:
            unknown.append(flag)
    if ignored:
        notes.append(f"container: options {' '.join(ignored)} have no meaning for a kata-ci "
                     "VM (its size and network are the runner's): ignored")
    if unknown:
        notes.append(f"container: options {' '.join(unknown)} are not supported: ignored")
    return user, env


def parse_services(raw: Any, where: str, job: str) -> dict[str, Container]:
    """A job's ``services:``: service id (its hostname) -> the container as written, each of
    the ``container:`` form; UserError naming the file, line and job otherwise."""
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise UserError(f"{where}: job {job!r}: services must be a mapping of service ids")
    found = {}
    for key, value in raw.items():
        container = parse_container(value, where, f"{job}.services.{key}")
        if container is not None:
            found[str(key)] = container
    return found


def service_uses(services: dict[str, Container],
                 render: Callable[[str], str]) -> tuple[tuple[ServiceUse, ...], dict[str, str],
                                                         list[str]]:
    """The job's services as ServiceUses (each reachable by its id, running its image's own
    entrypoint and command, as GitHub starts service containers), secrets and notes."""
    found: list[ServiceUse] = []
    secrets: dict[str, str] = {}
    notes: list[str] = []
    for key, container in services.items():
        use, more_secrets, more_notes = container_image(container, render)
        secrets.update({f"services.{key}.{k}": v for k, v in more_secrets.items()})
        notes += [n.replace("container:", f"services.{key}:", 1) for n in more_notes]
        if use is not None:
            found.append(ServiceUse(dataclasses.replace(use, entrypoint=None), (key,)))
    return tuple(found), secrets, notes
