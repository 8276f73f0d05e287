"""The nftables ruleset of one VM's network namespace, rendered from its policy. Pure.

Interfaces in the namespace: ``tap0`` (the guest's NIC, QEMU's end), ``up0`` (pasta's end:
its traffic leaves as ordinary sockets of the host), ``lo``. The guest's packets are
*forwarded* from tap0 to up0, so the policy sits in the forward hook, outside the guest and
outside QEMU. Locally generated traffic (QEMU lives in this namespace: a QEMU escape lands
here) may go nowhere but back to the guest. Denied destinations are rejected, not dropped,
so that a job fails fast (connection refused) instead of hanging on a timeout.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

from kata_ci.executors.network.policy import (
    DENIED_V4,
    DENIED_V6,
    GATEWAY_V4,
    GATEWAY_V6,
    Destination,
    NetworkPolicy,
)

TABLE = "kata_ci"
GUEST_IF = "tap0"
UPLINK_IF = "up0"
REJECT = "reject with icmpx type admin-prohibited"
ND_TYPES = "nd-neighbor-solicit, nd-neighbor-advert, nd-router-solicit, nd-router-advert"


def ruleset(policy: NetworkPolicy, host_addresses: Iterable[str] = ()) -> str:
    """``host_addresses``: every address of the host's own network namespace, denied like
    the private ranges (a public address of the host reaches its services too)."""
    hosts = [ipaddress.ip_address(a) for a in host_addresses]
    deny4 = [*map(str, DENIED_V4), *(str(a) for a in hosts if a.version == 4)]
    deny6 = [*map(str, DENIED_V6), *(str(a) for a in hosts if a.version == 6)]
    lines = [
        f"table inet {TABLE} {{",
        _set("denied4", "ipv4_addr", deny4, interval=True),
        _set("denied6", "ipv6_addr", deny6, interval=True),
        *_port_sets("hole", policy.holes),
        *_port_sets("allow", [d for d in policy.allow if d.network is not None]),
        # Filled by the resolver with the addresses of allowlisted names (and of the operator's
        # named holes), for their TTL: checked before the denied ranges, since the resolver
        # admits a denied address only for a named hole.
        "  set named4 { type ipv4_addr . inet_proto . inet_service; flags timeout; }",
        "  set named6 { type ipv6_addr . inet_proto . inet_service; flags timeout; }",
        "  set namedany4 { type ipv4_addr; flags timeout; }",
        "  set namedany6 { type ipv6_addr; flags timeout; }",
        "  chain egress {",
        "    meta l4proto { tcp, udp } ip daddr . meta l4proto . th dport @hole4 accept",
        "    meta l4proto { tcp, udp } ip6 daddr . meta l4proto . th dport @hole6 accept",
        "    meta l4proto { tcp, udp } ip daddr . meta l4proto . th dport @named4 accept",
        "    meta l4proto { tcp, udp } ip6 daddr . meta l4proto . th dport @named6 accept",
        "    ip daddr @namedany4 accept",
        "    ip6 daddr @namedany6 accept",
        f"    ip daddr @denied4 counter {REJECT}",
        f"    ip6 daddr @denied6 counter {REJECT}",
    ]
    if policy.mode == "egress":
        lines.append("    accept")
    else:
        lines += [
            "    meta l4proto { tcp, udp } ip daddr . meta l4proto . th dport @allow4 accept",
            "    meta l4proto { tcp, udp } ip6 daddr . meta l4proto . th dport @allow6 accept",
            f"    counter {REJECT}",
        ]
    lines += [
        "  }",
        "  chain forward {",
        "    type filter hook forward priority filter; policy drop;",
        "    ct state established,related accept",
        "    ct state invalid drop",
        f'    iifname "{GUEST_IF}" oifname "{UPLINK_IF}" jump egress',
        f'    iifname "{GUEST_IF}" {REJECT}',
        "  }",
        "  chain input {",
        "    type filter hook input priority filter; policy drop;",
        '    iif "lo" accept',
        "    ct state established,related accept",
        f"    icmpv6 type {{ {ND_TYPES} }} accept",
        # The resolver, and nothing else of kata-ci's end of the link.
        f'    iifname "{GUEST_IF}" ip daddr {GATEWAY_V4} meta l4proto {{ tcp, udp }} '
        "th dport 53 accept",
        f'    iifname "{GUEST_IF}" ip6 daddr {GATEWAY_V6} meta l4proto {{ tcp, udp }} '
        "th dport 53 accept",
        f'    iifname "{GUEST_IF}" {REJECT}',
        "  }",
        "  chain output {",
        "    type filter hook output priority filter; policy drop;",
        '    oif "lo" accept',
        "    ct state established,related accept",
        f"    icmpv6 type {{ {ND_TYPES} }} accept",
        f'    oifname "{GUEST_IF}" accept',
        "  }",
        "  chain postrouting {",
        "    type nat hook postrouting priority srcnat;",
        f'    oifname "{UPLINK_IF}" masquerade',
        "  }",
        "}",
    ]
    return "\n".join(line for line in lines if line) + "\n"


def named_elements(addresses: Iterable[str], dest: Destination, ttl: int) -> str:
    """nft commands admitting the resolved ``addresses`` of a named destination for ``ttl``
    seconds (the answer's TTL, bounded). Names take single ports (policy.py checks)."""
    elements: dict[str, list[str]] = {}
    for text in addresses:
        address = ipaddress.ip_address(text)
        if not dest.ports:
            elements.setdefault(f"namedany{address.version}", []).append(
                f"{address} timeout {ttl}s")
        for low, _high in dest.ports:
            elements.setdefault(f"named{address.version}", []).extend(
                f"{address} . {proto} . {low} timeout {ttl}s" for proto in ("tcp", "udp"))
    return "".join(f"add element inet {TABLE} {name} {{ {', '.join(items)} }}\n"
                   for name, items in elements.items())


def _set(name: str, kind: str, elements: list[str], interval: bool = False) -> str:
    flags = " flags interval; auto-merge;" if interval else ""
    body = f" elements = {{ {', '.join(elements)} }};" if elements else ""
    return f"  set {name} {{ type {kind};{flags}{body} }}"


def _port_sets(prefix: str, dests: Iterable[Destination]) -> list[str]:
    """Sets of (network . protocol . port range) for the destinations given as networks."""
    elements: dict[int, list[str]] = {4: [], 6: []}
    for dest in dests:
        if dest.network is None:
            continue
        for proto in ("tcp", "udp"):
            for low, high in dest.ports or ((1, 65535),):
                port = str(low) if low == high else f"{low}-{high}"
                elements[dest.network.version].append(f"{dest.network} . {proto} . {port}")
    return [_set(f"{prefix}4", "ipv4_addr . inet_proto . inet_service", elements[4], True),
            _set(f"{prefix}6", "ipv6_addr . inet_proto . inet_service", elements[6], True)]
