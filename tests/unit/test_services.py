"""Service containers without a VM: GitLab's default hostnames for a service image, and the
health probe kata-ci runs in the VM (bash's /dev/tcp), run here against real sockets."""

from __future__ import annotations

import socket
import subprocess

from kata_ci.runner.core.images import ImageUse
from kata_ci.runner.core.services import PROBE, ServiceUse, gitlab_aliases, hosts_for


def probe(ports: list[int], timeout: int) -> subprocess.CompletedProcess[str]:
    script = PROBE.format(timeout=timeout, ports=" ".join(map(str, ports)))
    return subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=30)


def test_gitlab_default_hostnames() -> None:
    """GitLab's docs ("Accessing the services"): a registry path gets both spellings; tags
    and digests are not part of the name; an alias list comes first; names that are no
    hostname (a registry port) are dropped."""
    assert gitlab_aliases("registry.example.com/group/tutum-wordpress:latest") == (
        "registry.example.com__group__tutum-wordpress",
        "registry.example.com-group-tutum-wordpress")
    assert gitlab_aliases("postgres@sha256:" + "a" * 64, "db, pg") == ("db", "pg", "postgres")
    assert gitlab_aliases("localhost:5000/x:1") == ()  # a port makes no hostname: alias it


def test_every_alias_resolves_to_the_vms_loopback() -> None:
    """All services share the VM's network: each alias maps to 127.0.0.1."""
    use = ServiceUse(ImageUse("redis:7"), ("cache", "redis"))
    assert hosts_for((use,)) == {"cache": "127.0.0.1", "redis": "127.0.0.1"}


def test_probe_passes_on_an_open_port_and_names_a_closed_one() -> None:
    """The probe returns at once when every port accepts, and fails naming the first port
    that stayed closed past the bound."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    open_port = listener.getsockname()[1]
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    closed_port = closed.getsockname()[1]  # bound, never listening: refused
    try:
        assert probe([open_port], 5).returncode == 0
        failed = probe([open_port, closed_port], 1)
        assert failed.returncode == 1 and failed.stdout.strip() == str(closed_port)
    finally:
        listener.close()
        closed.close()
