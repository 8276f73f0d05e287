"""kata-ci's resolver for one VM, on the gateway addresses of its link (port 53, UDP and TCP).

The guest's /etc/resolv.conf names only this resolver, and in ``allowlist`` mode it is the
only DNS server the guest can reach. It forwards queries to the upstream resolvers (the
policy's ``dns``, else the host's /etc/resolv.conf) from kata-ci's own network namespace, so
a host resolver on 127.0.0.53 works while staying unreachable to the guest. Then it applies
the policy to the answer:

- allowlist: a name not allowlisted gets REFUSED; the addresses of an allowlisted one are
  admitted into the VM's firewall (named sets), with the listed ports, for the answer's TTL.
- every mode: an answer pointing into a denied range (the host, RFC 1918, metadata...) is
  removed (DNS rebinding), unless the operator opened that hole.

Every byte of a query is hostile: malformed ones get no answer, sizes are bounded, a slow TCP
client is dropped after a short timeout, and nothing of a query reaches a log.
"""

from __future__ import annotations

import contextlib
import ipaddress
import selectors
import socket
import threading
from collections.abc import Callable

import dns.exception
import dns.flags
import dns.message
import dns.opcode
import dns.query
import dns.rcode
import dns.rdatatype
import dns.resolver
import dns.rrset

from kata_ci.executors.network.firewall import named_elements
from kata_ci.executors.network.policy import Destination, NetworkPolicy, denied

UPSTREAM_TIMEOUT = 2.0
TCP_CLIENT_TIMEOUT = 2.0
MIN_TTL, MAX_TTL = 60, 86400


def upstreams(policy: NetworkPolicy) -> list[str]:
    if policy.dns:
        return list(policy.dns)
    try:
        return [str(s) for s in dns.resolver.Resolver(configure=True).nameservers]
    except (dns.exception.DNSException, OSError):
        return []


class Resolver:
    """One thread serving the listening sockets (made in the VM's namespace) until ``close``.
    ``admit``: applies nft commands in the VM's namespace."""

    def __init__(self, policy: NetworkPolicy, listeners: list[socket.socket],
                 host_addresses: tuple[str, ...], admit: Callable[[str], None]) -> None:
        self.policy = policy
        self.listeners = listeners
        self.host_addresses = host_addresses
        self.admit = admit
        self.servers = upstreams(policy)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="kata-ci-dns", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(TCP_CLIENT_TIMEOUT + UPSTREAM_TIMEOUT * 2)

    def _serve(self) -> None:
        with selectors.DefaultSelector() as selector:
            for sock in self.listeners:
                sock.setblocking(False)
                selector.register(sock, selectors.EVENT_READ)
            while not self._stop.is_set():
                for key, _ in selector.select(timeout=0.2):
                    ready = key.fileobj
                    assert isinstance(ready, socket.socket)
                    with contextlib.suppress(OSError):
                        if ready.type == socket.SOCK_DGRAM:
                            self._udp(ready)
                        else:
                            self._tcp(ready)

    def _udp(self, sock: socket.socket) -> None:
        wire, client = sock.recvfrom(4096)
        reply = self.answer(wire, tcp=False)
        if reply is not None:
            sock.sendto(reply, client)

    def _tcp(self, listener: socket.socket) -> None:
        conn, _ = listener.accept()
        with conn:
            conn.settimeout(TCP_CLIENT_TIMEOUT)
            head = _recv_exact(conn, 2)
            wire = _recv_exact(conn, int.from_bytes(head, "big"))
            reply = self.answer(wire, tcp=True)
            if reply is not None:
                conn.sendall(len(reply).to_bytes(2, "big") + reply)

    def answer(self, wire: bytes, tcp: bool) -> bytes | None:
        """The reply to one query in wire format; None for what is not a DNS query."""
        try:
            query = dns.message.from_wire(wire)
        except Exception:
            return None
        if query.flags & dns.flags.QR:
            return None
        if query.opcode() != dns.opcode.QUERY or len(query.question) != 1:
            return _reply(query, dns.rcode.NOTIMP if len(query.question) == 1
                          else dns.rcode.FORMERR)
        qname = query.question[0].name.to_text(omit_final_dot=True)
        if not self.policy.allows_name(qname):
            return _reply(query, dns.rcode.REFUSED)
        response = self._forward(query)
        if response is None:
            return _reply(query, dns.rcode.SERVFAIL)
        self._apply_policy(qname, response)
        try:
            return response.to_wire(max_size=65535 if tcp else _udp_size(query))
        except dns.exception.TooBig:
            response.flags |= dns.flags.TC
            response.answer.clear()
            response.additional.clear()
            return response.to_wire()

    def _forward(self, query: dns.message.Message) -> dns.message.Message | None:
        for server in self.servers:
            try:
                response = dns.query.udp(query, server, timeout=UPSTREAM_TIMEOUT,
                                         ignore_unexpected=True)
                if response.flags & dns.flags.TC:
                    response = dns.query.tcp(query, server, timeout=UPSTREAM_TIMEOUT)
                return response
            except (dns.exception.DNSException, OSError, ValueError):
                continue
        return None

    def _apply_policy(self, qname: str, response: dns.message.Message) -> None:
        """Drop denied addresses (unless a hole allows them); admit allowlisted ones."""
        named_hole = _first(self.policy.holes, qname)
        allowed = _first(self.policy.allow, qname) if self.policy.mode == "allowlist" else None
        admitted: list[tuple[list[str], Destination, int]] = []
        for section in (response.answer, response.additional):
            for rrset in list(section):
                if rrset.rdtype not in (dns.rdatatype.A, dns.rdatatype.AAAA):
                    continue
                if section is response.additional:
                    section.remove(rrset)  # glue is not ours to vet: the guest asks again
                    continue
                ttl = min(max(rrset.ttl, MIN_TTL), MAX_TTL)
                keep, hole_addrs, allow_addrs = [], [], []
                for rdata in rrset:
                    address = ipaddress.ip_address(rdata.address)
                    if denied(address, self.host_addresses):
                        if any(h.network is not None and address in h.network
                               for h in self.policy.holes):
                            keep.append(rdata)
                        elif named_hole is not None:
                            keep.append(rdata)
                            hole_addrs.append(str(address))
                        continue
                    keep.append(rdata)
                    if allowed is not None:
                        allow_addrs.append(str(address))
                if named_hole is not None and hole_addrs:
                    admitted.append((hole_addrs, named_hole, ttl))
                if allowed is not None and allow_addrs:
                    admitted.append((allow_addrs, allowed, ttl))
                if not keep:
                    section.remove(rrset)
                elif len(keep) != len(rrset):
                    section[section.index(rrset)] = dns.rrset.from_rdata_list(
                        rrset.name, rrset.ttl, keep)
        commands = "".join(named_elements(a, d, t) for a, d, t in admitted)
        if commands:
            with contextlib.suppress(Exception):  # the namespace may be going away
                self.admit(commands)


def _first(dests: tuple[Destination, ...], qname: str) -> Destination | None:
    return next((d for d in dests if d.matches_name(qname)), None)


def _reply(query: dns.message.Message, rcode: dns.rcode.Rcode) -> bytes:
    response = dns.message.make_response(query)
    response.set_rcode(rcode)
    return response.to_wire()


def _udp_size(query: dns.message.Message) -> int:
    return max(512, min(query.payload, 4096)) if query.edns >= 0 else 512


def _recv_exact(conn: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = conn.recv(size - len(data))
        if not chunk:
            raise OSError("short read")
        data += chunk
    return data
