"""Attacks on `kata-ci github serve`'s webhook endpoint (it faces the internet): forged,
replayed, oversized, trickled and flooding deliveries. Real HTTP server, real Redis, the real
Celery sender; GitHub's real payloads (tests/integration/github_endpoint.py)."""

from __future__ import annotations

import hashlib
import hmac
import http.client
import select
import socket
import time
import uuid
from collections.abc import Iterator

import pytest

from tests.integration.github_endpoint import SECRET, Endpoint, payload, serving
from tests.integration.redis_server import RedisServer


@pytest.fixture
def endpoint(redis_server: RedisServer) -> Iterator[Endpoint]:
    with serving(redis_server) as served:
        yield served


def _closed(sock: socket.socket, within: float) -> bool:
    """Whether the server ended this connection (EOF or reset) within ``within`` seconds."""
    ready, _, _ = select.select([sock], [], [], within)
    if not ready:
        return False
    try:
        return sock.recv(4096) == b""
    except OSError:
        return True


def _nothing_recorded(endpoint: Endpoint) -> None:
    assert endpoint.demand_jobs() == [] and endpoint.queued_messages() == 0
    assert list(endpoint.store.r.scan_iter("kataci:gh:*")) == []


@pytest.mark.parametrize("headers, sign", [
    ({}, False),  # missing
    ({"X-Hub-Signature-256": "sha256=" + "0" * 64}, False),  # bad
    ({"X-Hub-Signature": "sha1=" + hmac.new(SECRET, payload(), hashlib.sha1).hexdigest()},
     False),  # only the legacy algorithm
    ({"X-Hub-Signature-256": "sha1=" + hmac.new(SECRET, payload(),
                                                 hashlib.sha1).hexdigest()}, False),
])
def test_unsigned_or_badly_signed_deliveries_are_refused(
        endpoint: Endpoint, headers: dict[str, str], sign: bool) -> None:
    """Missing, wrong, and wrong-algorithm signatures: 401, nothing recorded or queued."""
    status, _ = endpoint.post(payload(), headers, sign=sign)
    assert status == 401
    _nothing_recorded(endpoint)


def test_body_changed_after_signing_is_refused(endpoint: Endpoint) -> None:
    """A captured, correctly signed delivery with its labels edited in transit: 401."""
    signed = payload()
    signature = "sha256=" + hmac.new(SECRET, signed, hashlib.sha256).hexdigest()
    edited = signed.replace(b'"kata-ci"', b'"kata-cj"')
    assert edited != signed
    assert endpoint.post(edited, {"X-Hub-Signature-256": signature}, sign=False)[0] == 401
    _nothing_recorded(endpoint)


def test_replayed_delivery_changes_nothing(endpoint: Endpoint) -> None:
    """The same delivery again (GitHub's redelivery keeps the guid; an attacker replaying a
    captured one): answered, no second runner. A replay under a new guid: still none (one
    runner per workflow job)."""
    guid = str(uuid.uuid4())
    assert endpoint.post(payload(), guid=guid)[0] == 201
    status, text = endpoint.post(payload(), guid=guid)
    assert status == 200 and "duplicate" in text
    status, text = endpoint.post(payload())
    assert status == 200 and "already" in text
    assert len(endpoint.demand_jobs()) == 1 and endpoint.queued_messages() == 1


def test_oversized_body_is_refused_before_it_is_read(endpoint: Endpoint) -> None:
    """A Content-Length over max_body_kib: 413 at once (the server never reads the body);
    no Content-Length: 411."""
    conn = http.client.HTTPConnection("127.0.0.1", endpoint.port, timeout=10)
    conn.putrequest("POST", "/webhook")
    conn.putheader("Content-Length", str(65 * 1024))
    conn.putheader("X-GitHub-Event", "workflow_job")
    conn.endheaders()  # no body sent at all: an answer proves it was not waited for
    assert conn.getresponse().status == 413
    conn.close()
    conn = http.client.HTTPConnection("127.0.0.1", endpoint.port, timeout=10)
    conn.putrequest("POST", "/webhook")
    conn.putheader("Transfer-Encoding", "chunked")
    conn.endheaders()
    conn.send(b"0\r\n\r\n")
    assert conn.getresponse().status == 411
    conn.close()
    _nothing_recorded(endpoint)


def test_signed_hostile_shapes_are_refused_cleanly(endpoint: Endpoint) -> None:
    """Signed yet hostile bodies (JSON nested 30,000 deep, not UTF-8, ids that are not
    integers, a label list of 2,000) and a path-like delivery id: 400 each, nothing kept."""
    deep = b"[" * 30_000 + b"]" * 30_000
    for body in (deep, b"\xff\xfe{", payload().replace(b'"id": 1001', b'"id": "1001"'),
                 payload(labels=("kata-ci",) * 2_000)):
        assert endpoint.post(body)[0] == 400, body[:40]
    assert endpoint.post(payload(), {"X-GitHub-Delivery": "../../x"})[0] == 400
    _nothing_recorded(endpoint)


def test_trickled_request_is_cut_at_the_deadline(redis_server: RedisServer) -> None:
    """A sender trickling its body a byte every 0.1 s (each read is quick, the request never
    ends) is cut at the whole-request deadline, not served when it is done; a good delivery
    is served meanwhile."""
    with serving(redis_server, read_deadline=1.0) as endpoint:
        sock = socket.create_connection(("127.0.0.1", endpoint.port), timeout=10)
        sock.sendall(b"POST /webhook HTTP/1.1\r\nHost: x\r\nX-GitHub-Event: workflow_job\r\n"
                     b"Content-Length: 100\r\n\r\n")
        sent = 0
        while sent < 100 and not _closed(sock, 0.1):
            try:
                sock.send(b"x")
            except OSError:
                break
            sent += 1
        sock.close()
        assert sent < 100, "the server waited for the whole trickled body"
        assert endpoint.post(payload())[0] == 201


def test_connection_flood_is_bounded_and_recovers(redis_server: RedisServer) -> None:
    """20 idle connections against a bound of 8: the 12 over it are closed unread at once,
    the 8 within it at the deadline; then a real delivery is served."""
    with serving(redis_server, read_deadline=6.0, max_connections=8) as endpoint:
        socks = [socket.create_connection(("127.0.0.1", endpoint.port), timeout=10)
                 for _ in range(20)]
        try:
            early = [s for s in socks if _closed(s, 0.2)]
            deadline = time.monotonic() + 2.0
            while len(early) < 12 and time.monotonic() < deadline:
                early += [s for s in socks if s not in early and _closed(s, 0.1)]
            assert len(early) == 12, f"{len(early)} closed before the deadline"
            held = [s for s in socks if s not in early]
            assert all(_closed(s, 15.0) for s in held), "held connections outlived the deadline"
        finally:
            for sock in socks:
                sock.close()
        assert endpoint.post(payload())[0] == 201
