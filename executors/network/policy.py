"""What a job's VM may reach: the policy, its destinations, and the ranges always denied.

Pure data and parsing; no I/O. ``firewall.py`` renders a policy into the nftables ruleset of
the VM's network namespace, ``dns.py`` applies it to names.

Modes (README, "Network"):
- ``none``: no NIC at all; QEMU itself sits in an empty network namespace.
- ``egress`` (default): outbound to the public internet through NAT; everything private denied.
- ``allowlist``: only the named destinations (CIDRs, DNS names, with ports).

Denied in every mode, IPv4 and IPv6: the host's own addresses, loopback, RFC 1918, CGNAT,
link-local (cloud metadata endpoints), ULA, multicast, broadcast and reserved ranges. Only the
operator's ``holes`` ([network] in the config) let chosen private destinations through; a job's
allowlist never can.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from typing import Literal, get_args

from kata_ci.errors import UserError

Mode = Literal["none", "egress", "allowlist"]
MODES: tuple[str, ...] = get_args(Mode)
# Wider modes reach more; a job may only ask for a mode at most as wide as its label's.
WIDTH = {"none": 0, "allowlist": 1, "egress": 2}

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

DENIED_V4 = tuple(ipaddress.IPv4Network(n) for n in (
    "0.0.0.0/8",        # "this network"
    "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16",  # RFC 1918
    "100.64.0.0/10",    # CGNAT (RFC 6598)
    "127.0.0.0/8",      # loopback
    "169.254.0.0/16",   # link-local: cloud metadata endpoints (169.254.169.254)
    "192.0.0.0/24",     # IETF protocol assignments
    "198.18.0.0/15",    # benchmarking
    "224.0.0.0/4",      # multicast
    "240.0.0.0/4",      # reserved, and 255.255.255.255 broadcast
))
DENIED_V6 = tuple(ipaddress.IPv6Network(n) for n in (
    "::/127",           # unspecified and loopback
    "::ffff:0:0/96",    # IPv4-mapped: would reach the IPv4 ranges above
    "64:ff9b:1::/48",   # local-use NAT64 (RFC 8215)
    "100::/64",         # discard
    "fc00::/7",         # ULA
    "fe80::/10",        # link-local
    "fec0::/10",        # site-local (deprecated, still routed by some)
    "ff00::/8",         # multicast
))

# The link between the guest and kata-ci, the same in every VM: each VM has a network
# namespace of its own, and fixed addresses survive a snapshot restore. The gateway is
# kata-ci's end, where the resolver answers (and nothing else).
GUEST_V4 = ipaddress.IPv4Interface("10.0.2.15/24")
GATEWAY_V4 = ipaddress.IPv4Address("10.0.2.2")
GUEST_V6 = ipaddress.IPv6Interface("fd6b:6369::15/64")
GATEWAY_V6 = ipaddress.IPv6Address("fd6b:6369::2")
GUEST_MAC = "52:54:00:6b:63:0f"
GATEWAY_MAC = "52:54:00:6b:63:02"

_NAME = re.compile(r"^(\*\.)?([a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?\.)*"
                   r"[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?\.?$")


@dataclass(frozen=True)
class Destination:
    """A network or a DNS name (``*.example.org``: any name below it), and its ports
    (TCP and UDP; empty: every port)."""

    network: IPNetwork | None = None
    name: str | None = None
    ports: tuple[tuple[int, int], ...] = ()

    def matches_name(self, qname: str) -> bool:
        if self.name is None:
            return False
        qname = qname.lower().rstrip(".")
        if self.name.startswith("*."):
            return qname.endswith(self.name[1:])
        return qname == self.name

    def __str__(self) -> str:
        where = self.name or str(self.network)
        if self.network is not None and self.network.version == 6 and self.ports:
            where = f"[{where}]"
        ports = ",".join(str(a) if a == b else f"{a}-{b}" for a, b in self.ports)
        return f"{where}:{ports}" if ports else where


def parse_destination(text: str, source: str) -> Destination:
    """``host[:ports]``, ``cidr[:ports]``, ``[v6]:ports``, ``*.domain:ports``; ports are
    ``443`` or ``80,443`` or ``8000-8100``. A clear UserError otherwise."""
    raw = text.strip()
    where, ports_text = raw, ""
    if raw.startswith("["):
        end = raw.find("]")
        if end < 0:
            raise UserError(f"{source}: {text!r}: missing ']'")
        where, rest = raw[1:end], raw[end + 1:]
        if rest and not rest.startswith(":"):
            raise UserError(f"{source}: {text!r}: expected ':PORTS' after ']'")
        ports_text = rest[1:]
    elif raw.count(":") == 1:
        where, ports_text = raw.split(":")
    ports = _ports(ports_text, text, source) if ports_text or raw.endswith(":") else ()
    try:
        network: IPNetwork = ipaddress.ip_network(where, strict=False)
    except ValueError:
        return _named(where, ports, text, source)
    return Destination(network=network, ports=ports)


def _named(where: str, ports: tuple[tuple[int, int], ...], text: str,
           source: str) -> Destination:
    name = where.lower().rstrip(".")
    if not name or not _NAME.match(name) or name.replace(".", "").isdigit():
        raise UserError(f"{source}: {text!r} is neither an address, a network nor a DNS "
                        f"name (IPv6 with ports: [2001:db8::1]:443)")
    if any(low != high for low, high in ports):
        raise UserError(f"{source}: {text!r}: a DNS name takes single ports (80,443), "
                        f"not ranges")
    return Destination(name=name, ports=ports)


def _ports(text: str, whole: str, source: str) -> tuple[tuple[int, int], ...]:
    spans = []
    for part in text.split(","):
        low, _, high = part.strip().partition("-")
        try:
            a, b = int(low), int(high or low)
        except ValueError:
            raise UserError(f"{source}: {whole!r}: ports must be numbers like 443, 80,443 "
                            f"or 8000-8100") from None
        if not 1 <= a <= b <= 65535:
            raise UserError(f"{source}: {whole!r}: ports must be between 1 and 65535")
        spans.append((a, b))
    return tuple(spans)


@dataclass(frozen=True)
class NetworkPolicy:
    """One VM's network. ``allow``: the allowlist (mode allowlist only). ``holes``: the
    operator's private destinations, reachable in every mode but none. ``dns``: upstream
    resolvers of kata-ci's resolver (empty: the host's /etc/resolv.conf)."""

    mode: Mode = "none"
    allow: tuple[Destination, ...] = ()
    holes: tuple[Destination, ...] = ()
    dns: tuple[str, ...] = ()

    @property
    def nic(self) -> bool:
        return self.mode != "none"

    def allows_name(self, qname: str) -> bool:
        """Whether the resolver answers for ``qname`` (allowlist: named destinations and the
        operator's named holes; other modes: every name)."""
        if self.mode != "allowlist":
            return True
        return any(d.matches_name(qname) for d in (*self.allow, *self.holes))

    def describe(self) -> str:
        if self.mode != "allowlist":
            return self.mode
        return "allowlist " + " ".join(map(str, self.allow)) if self.allow else "allowlist (empty)"


NONE = NetworkPolicy()


def denied(address: ipaddress.IPv4Address | ipaddress.IPv6Address,
           host_addresses: tuple[str, ...] = ()) -> bool:
    """Whether an address is in the always-denied ranges (or is one of the host's own)."""
    ranges: tuple[IPNetwork, ...] = DENIED_V4 if address.version == 4 else DENIED_V6
    return any(address in net for net in ranges) or str(address) in host_addresses


def parse_mode(value: str, source: str) -> Mode:
    if value not in MODES:
        raise UserError(f"{source}: network must be one of {', '.join(MODES)}, not {value!r}")
    return value  # type: ignore[return-value]


def build_policy(mode: str, allow: list[str] | tuple[str, ...], holes: list[str] | tuple[str, ...],
                 dns: list[str] | tuple[str, ...], source: str) -> NetworkPolicy:
    """A policy from configuration values; every problem is a UserError naming ``source``."""
    checked = parse_mode(mode, source)
    allowed = tuple(parse_destination(a, f"{source}: allow") for a in allow)
    if allowed and checked != "allowlist":
        raise UserError(f"{source}: allow entries need network = \"allowlist\" (it is {mode!r})")
    servers = []
    for server in dns:
        try:
            servers.append(str(ipaddress.ip_address(server)))
        except ValueError:
            raise UserError(f"{source}: dns: {server!r} is not an IP address") from None
    return NetworkPolicy(mode=checked, allow=allowed,
                         holes=tuple(parse_destination(h, f"{source}: holes") for h in holes),
                         dns=tuple(servers))


def narrow(ceiling: NetworkPolicy, mode: str | None, allow: tuple[str, ...],
           source: str) -> NetworkPolicy:
    """A job's own request within its label's policy: it may narrow, never widen. A job under
    an egress label may ask for an allowlist of its own; under an allowlist label only for
    none (its names could otherwise reach what the operator did not list)."""
    if mode is None and not allow:
        return ceiling
    wanted = parse_mode(mode or "allowlist", source)
    if WIDTH[wanted] > WIDTH[ceiling.mode] or (
            wanted == "allowlist" and ceiling.mode == "allowlist"):
        if wanted == ceiling.mode and not allow:
            return ceiling
        raise UserError(f"{source}: network {wanted!r} is wider than this runner allows "
                        f"({ceiling.describe()})")
    dests = tuple(parse_destination(a, f"{source}: allow") for a in allow)
    return NetworkPolicy(mode=wanted, allow=dests if wanted == "allowlist" else (),
                         holes=ceiling.holes, dns=ceiling.dns)
