"""The network policy: destinations, modes, narrowing, the nftables ruleset and the
resolver's answer filtering (pure parts; the suite in tests/*/network runs them for real)."""

from __future__ import annotations

import ipaddress
import shutil
import subprocess
from pathlib import Path

import dns.message
import dns.rcode
import dns.rrset
import pytest

from kata_ci.errors import UserError
from kata_ci.executors.network.dns import Resolver
from kata_ci.executors.network.firewall import named_elements, ruleset
from kata_ci.executors.network.policy import (
    NONE,
    Destination,
    build_policy,
    denied,
    narrow,
    parse_destination,
)
from kata_ci.runner.core import config as config_mod


@pytest.mark.parametrize(("text", "expected"), [
    ("pypi.org:443", Destination(name="pypi.org", ports=((443, 443),))),
    ("*.PythonHosted.org.", Destination(name="*.pythonhosted.org")),
    ("198.51.100.0/24:80,8000-8100", Destination(
        network=ipaddress.ip_network("198.51.100.0/24"), ports=((80, 80), (8000, 8100)))),
    ("[2001:db8::1]:443", Destination(network=ipaddress.ip_network("2001:db8::1/128"),
                                      ports=((443, 443),))),
    ("2001:db8::/32", Destination(network=ipaddress.ip_network("2001:db8::/32"))),
])
def test_destinations_parse(text: str, expected: Destination) -> None:
    """Names, wildcards, CIDRs, bracketed IPv6 and port lists and ranges parse as written."""
    assert parse_destination(text, "cfg") == expected


@pytest.mark.parametrize("text", ["pypi.org:0", "pypi.org:70000", "pypi.org:https",
                                  "bad_name!.org", "[2001:db8::1:443", "pypi.org:80-90", ""])
def test_bad_destinations_are_user_errors(text: str) -> None:
    """Bad ports, names, brackets and name port ranges are refused with the source named."""
    with pytest.raises(UserError, match=r"^cfg"):
        parse_destination(text, "cfg")


def test_denied_ranges_cover_metadata_private_and_mapped_addresses() -> None:
    """Metadata, RFC 1918, CGNAT, loopback, ULA, link-local, IPv4-mapped and the host's own
    addresses are denied; documentation and public addresses are not."""
    for text in ("169.254.169.254", "10.1.2.3", "172.20.0.1", "192.168.1.1", "100.64.0.1",
                 "127.0.0.1", "255.255.255.255", "224.0.0.1", "fd00::1", "fe80::1", "::1",
                 "::ffff:127.0.0.1", "ff02::1"):
        assert denied(ipaddress.ip_address(text)), text
    for text in ("198.51.100.10", "8.8.8.8", "2001:db8::10", "2606:4700::1111"):
        assert not denied(ipaddress.ip_address(text)), text
    assert denied(ipaddress.ip_address("203.0.113.5"), ("203.0.113.5",))


def test_allow_entries_need_allowlist_mode() -> None:
    """allow with egress is a configuration error, not silently ignored."""
    with pytest.raises(UserError, match="allowlist"):
        build_policy("egress", ["pypi.org:443"], [], [], "cfg")
    with pytest.raises(UserError, match="network must be one of"):
        build_policy("open", [], [], [], "cfg")


def test_a_job_may_narrow_but_never_widen_its_network() -> None:
    """Under egress a job may pick allowlist or none; under allowlist only none; never
    egress under a narrower label, and holes stay the operator's."""
    egress = build_policy("egress", [], ["10.1.2.3:3128"], ["198.51.100.10"], "cfg")
    own = narrow(egress, "allowlist", ("pypi.org:443",), "job")
    assert own.mode == "allowlist" and own.holes == egress.holes and own.dns == egress.dns
    assert narrow(egress, "none", (), "job").mode == "none"
    locked = build_policy("allowlist", ["pypi.org:443"], [], [], "cfg")
    assert narrow(locked, "none", (), "job").mode == "none"
    assert narrow(locked, "allowlist", (), "job") == locked
    for mode, allow in (("egress", ()), ("allowlist", ("evil.example:443",))):
        with pytest.raises(UserError, match="wider"):
            narrow(locked, mode, allow, "job")
    with pytest.raises(UserError, match="wider"):
        narrow(NONE, "egress", (), "job")


def test_ruleset_denies_before_it_accepts_and_names_the_host() -> None:
    """Holes and admitted names come before the denied ranges, which come before the
    mode's verdict; the host's addresses are in the denied sets."""
    text = ruleset(build_policy("egress", [], [], [], "cfg"), ["203.0.113.7", "2001:db8::7"])
    chain = text[text.index("chain egress"):text.index("chain forward")]
    assert chain.index("@hole4") < chain.index("@named4") < chain.index("@denied4") \
        < chain.index("    accept")
    assert "203.0.113.7" in text and "2001:db8::7" in text
    locked = ruleset(build_policy("allowlist", ["198.51.100.0/24:80"], [], [], "cfg"))
    assert "198.51.100.0/24 . tcp . 80" in locked
    assert locked.rstrip().endswith("}") and "\n    accept\n" not in locked


@pytest.mark.skipif(shutil.which("nft") is None, reason="nftables not installed")
def test_ruleset_and_admitted_names_are_valid_nftables() -> None:
    """nft accepts the rendered ruleset and the resolver's element commands (check mode)."""
    policy = build_policy("allowlist", ["internet.test:80", "*.x.org", "198.51.100.0/24"],
                          ["10.9.0.9:3128"], [], "cfg")
    text = ruleset(policy, ["198.51.100.1"]) + named_elements(
        ["198.51.100.10", "2001:db8::10"], policy.allow[0], 60) + named_elements(
        ["1.2.3.4"], policy.allow[1], 60)
    checked = subprocess.run(["nft", "-c", "-f", "-"], input=text, text=True,
                             capture_output=True)
    assert checked.returncode == 0, checked.stderr


def _answer(qname: str, *addresses: str) -> dns.message.Message:
    query = dns.message.make_query(qname, "A")
    response = dns.message.make_response(query)
    response.answer.append(dns.rrset.from_text(qname, 30, "IN", "A", *addresses))
    return response


def test_resolver_drops_private_answers_and_admits_allowlisted_ones() -> None:
    """Rebinding: private addresses vanish from answers; an allowlisted name's public
    addresses are admitted into the firewall with its ports, for at least a minute."""
    admitted: list[str] = []
    policy = build_policy("allowlist", ["pypi.org:443"], ["mirror.lan:80"], [], "cfg")
    resolver = Resolver(policy, [], ("203.0.113.7",), admitted.append)
    response = _answer("pypi.org", "151.101.0.223", "10.0.0.5", "203.0.113.7")
    resolver._apply_policy("pypi.org", response)
    assert [r.address for r in response.answer[0]] == ["151.101.0.223"]
    assert admitted == [named_elements(["151.101.0.223"], policy.allow[0], 60)]
    hole = _answer("mirror.lan", "10.0.0.5")
    resolver._apply_policy("mirror.lan", hole)
    assert [r.address for r in hole.answer[0]] == ["10.0.0.5"]
    assert "10.0.0.5 . tcp . 80" in admitted[-1]


def test_resolver_refuses_unlisted_names_and_ignores_garbage() -> None:
    """allowlist: a name not listed gets REFUSED without any upstream; junk gets nothing."""
    resolver = Resolver(build_policy("allowlist", ["pypi.org:443"], [], [], "cfg"), [], (),
                        lambda _: None)
    reply = resolver.answer(dns.message.make_query("evil.example", "A").to_wire(), tcp=False)
    assert reply is not None and dns.message.from_wire(reply).rcode() == dns.rcode.REFUSED
    assert resolver.answer(b"\x00" * 5, tcp=False) is None
    assert resolver.answer(bytes(range(256)) * 4, tcp=True) is None


def test_config_network_per_vm_label_and_holes(tmp_path: Path) -> None:
    """[vm] network/allow, [labels.X] network/allow and [network] holes/dns combine; a
    wrong value names the file."""
    path = tmp_path / "config.toml"
    path.write_text('[vm]\nnetwork = "egress"\n[network]\nholes = ["10.1.2.3:3128"]\n'
                    'dns = ["198.51.100.10"]\n[labels.locked]\nnetwork = "allowlist"\n'
                    'allow = ["pypi.org:443"]\n[labels.offline]\nnetwork = "none"\n')
    cfg = config_mod.load(path)
    assert cfg.policy().mode == "egress" and cfg.policy().dns == ("198.51.100.10",)
    locked = cfg.policy("locked")
    assert locked.mode == "allowlist" and str(locked.allow[0]) == "pypi.org:443"
    assert str(locked.holes[0]) == "10.1.2.3/32:3128"
    assert config_mod.vm_sizes(cfg) == [(2, 1024, True), (2, 1024, False)]
    path.write_text('[labels.x]\nallow = ["pypi.org:99999"]\nnetwork = "allowlist"\n')
    with pytest.raises(UserError, match=str(path)):
        config_mod.load(path)
    path.write_text('[network]\ndns = ["resolver.lan"]\n')
    with pytest.raises(UserError, match="not an IP address"):
        config_mod.load(path)
