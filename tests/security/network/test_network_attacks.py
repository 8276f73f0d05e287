"""A hostile job against the network policy (egress mode unless named): each attack a test,
against the lab's hosts (tests/netlab.py). Refusals must be fast (curl exit 7: refused), not
timeouts, and the host's own listener must never see a connection."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from kata_ci.executors.qemu.backend import QemuVM
from tests import netlab
from tests.e2e.network.conftest import NetVM, run

CURL = "curl -sS --max-time 3"


@pytest.fixture
def egress(net_vm: NetVM) -> QemuVM:
    return net_vm("egress")


def refused(vm: QemuVM, url: str) -> None:
    out, code = run(vm, f"{CURL} {url}")
    assert code == 7, (url, code, out)


def test_cloud_metadata_endpoint_is_unreachable(egress: QemuVM) -> None:
    """169.254.169.254 (credentials on a cloud host) is refused."""
    refused(egress, f"http://{netlab.METADATA_V4}/latest/meta-data/")


def test_lan_hosts_are_unreachable_over_ipv4_and_ipv6(egress: QemuVM) -> None:
    """RFC 1918 and ULA hosts on the host's network are refused."""
    refused(egress, f"http://{netlab.LAN_V4}/")
    refused(egress, f"http://[{netlab.LAN_V6}]/")


def test_the_hosts_own_services_are_unreachable(lab: netlab.Lab, egress: QemuVM) -> None:
    """The host's listener, by the host's addresses, the gateway, loopback and an
    IPv4-mapped loopback: refused, and the listener never sees a connection."""
    hits = lab.host_hits
    for url in (f"http://{netlab.HOST_V4}:{netlab.HOST_PORT}/",
                f"http://[{netlab.HOST_V6}]:{netlab.HOST_PORT}/",
                f"http://10.0.2.2:{netlab.HOST_PORT}/", f"http://127.0.0.1:{netlab.HOST_PORT}/",
                f"http://[::ffff:127.0.0.1]:{netlab.HOST_PORT}/",
                f"http://[fd6b:6369::2]:{netlab.HOST_PORT}/"):
        refused(egress, url)
    assert lab.host_hits == hits


def test_dns_rebinding_to_private_addresses_is_removed(egress: QemuVM) -> None:
    """A public name whose answer points into the LAN resolves to nothing."""
    out, _code = run(egress, "getent ahosts lan.test metadata.test; echo rc=$?")
    assert out.strip() == "rc=2", out


def test_operator_hole_opens_exactly_one_private_destination(net_vm: NetVM) -> None:
    """[network] holes = ["10.9.0.9:80"]: that LAN host on that port only."""
    vm = net_vm("egress", holes=(f"{netlab.LAN_V4}:80",))
    out, code = run(vm, f"{CURL} http://{netlab.LAN_V4}/x")
    assert code == 0 and f"{netlab.LAN_V4} /x" in out, out
    refused(vm, f"http://{netlab.LAN_V4}:8080/")
    refused(vm, f"http://{netlab.METADATA_V4}/")


def test_allowlist_cannot_bypass_the_resolver(net_vm: NetVM) -> None:
    """In allowlist mode the guest cannot ask another DNS server (the upstream itself) nor
    reach an allowlisted name's host on another address."""
    vm = net_vm("allowlist", allow=("internet.test:80",))
    out, code = run(vm, f"python3 -c \"import socket; s = socket.socket(socket.AF_INET, "
                        f"socket.SOCK_DGRAM); s.settimeout(2); "
                        f"s.sendto(bytes(12), ('{netlab.INTERNET_V4}', 53)); s.recv(512)\"")
    assert code != 0 and ("refused" in out or "timed out" in out), out
    refused(vm, f"http://{netlab.OTHER_V4}/")


def test_qemu_runs_in_the_vms_namespace_not_the_hosts(egress: QemuVM) -> None:
    """QEMU (and a QEMU escape) sits in the VM's network namespace: not the host's."""
    pid = egress.processes()["qemu"]
    assert os.readlink(f"/proc/{pid}/ns/net") != os.readlink("/proc/self/ns/net")
    links = subprocess.run(["nsenter", f"--net=/proc/{pid}/ns/net", "ip", "-br", "link"],
                           capture_output=True, text=True).stdout
    assert sorted(line.split()[0].split("@")[0] for line in links.splitlines()) == \
        ["lo", "tap0", "up0"], links


def test_host_network_is_unchanged_by_a_vm(lab: netlab.Lab, net_vm: NetVM,
                                            workspace: Path) -> None:
    """A running VM adds no link, route, forwarding switch or ruleset to the host."""
    before = netlab.host_state()
    forward = Path("/proc/sys/net/ipv4/ip_forward").read_text()
    vm = net_vm("egress")
    assert run(vm, "true")[1] == 0
    assert netlab.host_state() == before
    assert Path("/proc/sys/net/ipv4/ip_forward").read_text() == forward
