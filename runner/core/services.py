"""Service containers (GitLab ``services:``, GitHub's job ``services:``) in the job's own VM.

Each service is an OCI image with a root of its own (agent.proto PrepareRoot) and a process
group of its own, started before the job's script and gone with the VM. All share the VM's
network stack, as the pods of GitLab's Kubernetes executor do: every alias resolves to
127.0.0.1 in every root (and in kata-ci's own root, for jobs without an image), and a
service is reached at ``alias:port`` with the port it listens on. Health is GitLab's: each
TCP port the image exposes must accept a connection within ``HEALTH_TIMEOUT``; a service
that does not is a warning with its output, and the job runs anyway (as on GitLab).
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from kata_ci.errors import SystemFailure
from kata_ci.executors.base import VM
from kata_ci.images.oci.store import Image
from kata_ci.runner.core.images import ROOT_TIMEOUT, ImageUse, image_env

HEALTH_TIMEOUT = 30.0  # GitLab's wait_for_services_timeout default
OUTPUT_KEPT = 64 * 1024  # of each service's output, shown when it is unhealthy
LOCALHOST = "127.0.0.1"
_ALIAS = re.compile(r"[A-Za-z0-9]([A-Za-z0-9_.-]{0,62})")
# From kata-ci's own root (it has bash): until every port accepts, or the bound passes.
PROBE = ('deadline=$((SECONDS + {timeout})); for port in {ports}; do '
         'until (exec 3<>/dev/tcp/127.0.0.1/$port) 2>/dev/null; do '
         '[ $SECONDS -ge $deadline ] && {{ echo "$port"; exit 1; }}; sleep 0.2; done; done')


@dataclass(frozen=True)
class ServiceUse:
    """One service as a CI file or GitLab's payload describes it."""

    image: ImageUse
    aliases: tuple[str, ...]
    command: tuple[str, ...] | None = None  # None: the image's Cmd
    variables: Mapping[str, str] = field(default_factory=dict)
    ports: tuple[int, ...] = ()  # () : the image's ExposedPorts (tcp)


def gitlab_aliases(name: str, alias: str = "") -> tuple[str, ...]:
    """GitLab's default hostnames of a service image (docs "Accessing the services"):
    registry.example.com/group/tutum-wordpress:latest is reachable as
    registry.example.com__group__tutum-wordpress and registry.example.com-group-tutum-wordpress;
    an ``alias`` (comma or space separated: several) comes first."""
    base = name.split("@", 1)[0]
    last = base.rsplit("/", 1)[-1]
    if ":" in last:
        base = base[: len(base) - len(last)] + last.split(":", 1)[0]
    names = [a for a in re.split(r"[,\s]+", alias) if a]
    names += [base.replace("/", "__"), base.replace("/", "-")]
    return tuple(dict.fromkeys(n for n in names if _ALIAS.fullmatch(n)))


def hosts_for(services: tuple[ServiceUse, ...]) -> dict[str, str]:
    return {alias: LOCALHOST for service in services for alias in service.aliases}


class Running:
    """A started service: its output kept (bounded) by a thread reading its stream."""

    def __init__(self) -> None:
        self.output = bytearray()
        self.exit = ""  # why it ended, once it has

    def keep(self, data: bytes) -> None:
        self.output.extend(data)
        del self.output[:-OUTPUT_KEPT]

    def tail(self) -> str:
        return self.output.decode(errors="replace").strip()[-4000:]


def start(vm: VM, index: int, service: ServiceUse, image: Image, job_env: Mapping[str, str],
          hosts: Mapping[str, str]) -> Running:
    """Attach the service's image as disk ``index``, make its root, start its process."""
    name = f"svc{index}"
    vm.attach_image(image.disk, index)
    vm.agent.prepare_root(name, index, "", hosts, ROOT_TIMEOUT)
    config = image.config
    command = config.cmd if service.command is None else service.command
    argv = [*service.image.entrypoint_in(image), *command]
    if not argv:
        raise SystemFailure(f"service {service.image.name} has neither an entrypoint nor a "
                            "command to run")
    # GitLab passes the job's variables to services, the service's own over them.
    env = image_env(image, {**job_env, **service.variables}, service.image)
    stream = vm.agent.exec(argv, env, config.working_dir or "/", root=name,
                           user=service.image.user_in(image))
    running = Running()

    def pump() -> None:
        try:
            for chunk in stream:
                running.keep(chunk.data)
            if stream.exit is not None:
                running.exit = stream.exit.error or f"exited with status {stream.exit.exit_code}"
        except SystemFailure as exc:  # the VM went away under it: the job has ended
            running.exit = str(exc)

    threading.Thread(target=pump, name=f"kata-ci-service-{index}", daemon=True).start()
    return running


def wait_healthy(vm: VM, services: list[tuple[ServiceUse, Image, Running]],
                 note: Callable[[str], None], timeout: float = HEALTH_TIMEOUT) -> None:
    """GitLab's wait-for-services: each exposed TCP port accepts, else a warning."""
    for service, image, running in services:
        ports = service.ports or image.config.exposed_ports
        if not ports:
            continue
        script = PROBE.format(timeout=int(timeout), ports=" ".join(str(p) for p in ports))
        stream = vm.agent.exec(["bash", "-c", script], {"PATH": "/usr/bin:/bin"})
        seen = b"".join(chunk.data for chunk in stream)
        if stream.exit is not None and stream.exit.exit_code == 0:
            continue
        why = running.exit or f"port {seen.decode(errors='replace').strip()} not open " \
                              f"after {timeout:g}s"
        note(f"warning: service {service.image.name} probably did not start properly "
             f"({why})" + (f"\n{running.tail()}" if running.tail() else ""))
