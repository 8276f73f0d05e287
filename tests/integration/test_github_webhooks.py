"""`kata-ci github serve`'s webhook endpoint over real HTTP with a real Redis and the real
Celery sender (messages land in the label's Redis list), fed GitHub's real workflow_job
payloads (tests/unit/test_github_runner.py's fixtures) signed with a test secret."""

from __future__ import annotations

import hashlib
import hmac
import http.client
import json
import threading
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import pytest
import redis

from kata_ci.runner.github_runner.server import WebhookServer
from kata_ci.runner.github_runner.settings import GitHubConfig, LabelSet
from kata_ci.runner.github_runner.state import GitHubState
from kata_ci.runner.github_runner.webhook import Webhooks
from kata_ci.runner.queue.app import queue_name, sender
from kata_ci.runner.queue.store import JobStore
from tests.integration.redis_server import RedisServer
from tests.unit.test_github_runner import fixture

SECRET = b"webhook-secret-for-tests-0123456789"
REPO = "octo-org/hello-world"


@dataclass
class Endpoint:
    server: WebhookServer
    store: JobStore
    state: GitHubState
    port: int

    def post(self, body: bytes, headers: dict[str, str] | None = None,
             sign: bool = True, guid: str | None = None) -> tuple[int, str]:
        hdrs = {"X-GitHub-Event": "workflow_job", "Content-Type": "application/json",
                "X-GitHub-Delivery": guid or str(uuid.uuid4())}
        if sign:
            hdrs["X-Hub-Signature-256"] = "sha256=" + hmac.new(SECRET, body,
                                                                hashlib.sha256).hexdigest()
        hdrs.update(headers or {})
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=15)
        try:
            conn.request("POST", "/webhook", body=body, headers=hdrs)
            reply = conn.getresponse()
            return reply.status, reply.read().decode()
        finally:
            conn.close()

    def queued_messages(self, label: str = "default") -> int:
        return int(self.store.r.llen(queue_name(label)))

    def demand_jobs(self) -> list[str]:
        return [j.id for j in self.store.recent(10_000) if j.source == "github"]


def payload(action: str = "queued", job_id: int = 1001, labels: tuple[str, ...] = (
        "self-hosted", "kata-ci"), runner_name: str | None = None,
        repo: str = REPO) -> bytes:
    name = {"queued": "workflow_job.queued.payload.json",
            "in_progress": "workflow_job.in_progress.payload.json",
            "completed": "workflow_job.completed.success.with-organization.payload.json"}[action]
    raw: dict[str, Any] = json.loads(fixture(name))
    raw["workflow_job"].update(id=job_id, labels=list(labels), runner_name=runner_name,
                               status=action)
    raw["repository"]["full_name"] = repo
    return json.dumps(raw).encode()


@pytest.fixture
def endpoint(redis_server: RedisServer) -> Iterator[Endpoint]:
    client = redis.Redis.from_url(redis_server.url)
    client.flushdb()
    store = JobStore(client)
    state = GitHubState(client)
    config = GitHubConfig(org="octo-org", max_body_kib=64, label_sets=(
        LabelSet(("kata-ci",), "default", max_runners=500),
        LabelSet(("kata-ci", "big"), "big", max_runners=2)))
    hooks = Webhooks(config, SECRET, store, state, sender(redis_server.url, 3600), 3600)
    server = WebhookServer(("127.0.0.1", 0), hooks, lambda: None)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                              daemon=True)
    thread.start()
    yield Endpoint(server, store, state, server.server_address[1])
    server.shutdown()
    server.server_close()


def test_signed_queued_job_becomes_one_unit_of_demand(endpoint: Endpoint) -> None:
    """A correctly signed `queued` delivery for served labels: 201, one kata-ci job (source
    github) on the set's label, its Celery message in the label's Redis list, the workflow
    job recorded with repo, workflow and name."""
    status, _ = endpoint.post(payload())
    assert status == 201
    demand = endpoint.demand_jobs()
    assert len(demand) == 1 and endpoint.queued_messages() == 1
    entry = endpoint.store.github(demand[0])
    assert entry is not None and entry["scope"] == "org:octo-org"
    assert entry["label_set"] == "kata-ci"
    record = endpoint.state.job(1001)
    assert record["repo"] == REPO and record["workflow"] == "CodeQL" and record["name"]


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
    assert endpoint.demand_jobs() == [] and endpoint.queued_messages() == 0
    assert endpoint.state.job(1001) == {}


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
    assert endpoint.demand_jobs() == []


def test_other_events_labels_and_repositories_are_ignored(endpoint: Endpoint) -> None:
    """ping answers pong; other events, unserved labels and other orgs' repositories are
    accepted (202) and change nothing; a signed but malformed payload is 400."""
    assert endpoint.post(b"{}", {"X-GitHub-Event": "ping"})[0] == 200
    assert endpoint.post(b"{}", {"X-GitHub-Event": "push"})[0] == 202
    assert endpoint.post(payload(labels=("ubuntu-latest",)))[0] == 202
    assert endpoint.post(payload(repo="evil-org/x"))[0] == 202
    assert endpoint.post(b'{"action": "queued"}')[0] == 400
    assert endpoint.post(payload(), {"X-GitHub-Delivery": "../../x"})[0] == 400
    assert endpoint.demand_jobs() == []


def test_burst_of_200_deliveries_with_duplicates(endpoint: Endpoint) -> None:
    """200 concurrent deliveries: 120 distinct queued jobs, 50 redeliveries of them (same
    guid) and 30 replays under new guids. Every delivery answered 2xx, exactly 120 runners
    asked for, and every key kata-ci wrote expires (bounded memory)."""
    deliveries = [(payload(job_id=5000 + i), str(uuid.uuid4())) for i in range(120)]
    burst = deliveries + deliveries[:50] + [(body, str(uuid.uuid4()))
                                            for body, _ in deliveries[50:80]]
    with ThreadPoolExecutor(max_workers=16) as pool:
        answers = list(pool.map(lambda d: endpoint.post(d[0], guid=d[1])[0], burst))
    assert len(answers) == 200 and all(200 <= a < 300 for a in answers), answers
    assert len(endpoint.demand_jobs()) == 120 and endpoint.queued_messages() == 120
    keys = [k.decode() for k in endpoint.store.r.scan_iter("kataci:gh:*")]
    for key in keys:
        if key.startswith(("kataci:gh:delivery:", "kataci:gh:job:", "kataci:gh:demanded:")):
            assert endpoint.store.r.ttl(key) > 0, key
    assert endpoint.store.r.zcard("kataci:gh:jobs") <= 1000


def test_max_runners_bounds_demand(endpoint: Endpoint) -> None:
    """A set at max_runners asks for no more (202): the third `big` job waits for
    reconcile, and its job id stays claimable for it."""
    answers = [endpoint.post(payload(job_id=7000 + i, labels=("kata-ci", "big")))[0]
               for i in range(3)]
    assert answers == [201, 201, 202]
    assert endpoint.queued_messages("big") == 2
    assert not endpoint.state.demanded(7002)


def test_in_progress_marks_our_runner_busy_and_unassigned_completion_withdraws_demand(
        endpoint: Endpoint) -> None:
    """in_progress naming a kata-ci runner moves it to busy (no longer waiting capacity);
    a job cancelled before any runner took it withdraws one queued demand unit."""
    endpoint.post(payload(job_id=1))
    endpoint.post(payload(job_id=2))
    first, second = sorted(endpoint.demand_jobs())
    endpoint.state.add_runner("kata-ci-abc", {"name": "kata-ci-abc", "scope": "org:octo-org",
                                              "label_set": "kata-ci", "kata_job": first,
                                              "state": "idle"})
    endpoint.post(payload("in_progress", job_id=1, runner_name="kata-ci-abc"))
    assert endpoint.state.runner("kata-ci-abc")["state"] == "busy"
    assert endpoint.state.pending(endpoint.store, "org:octo-org", "kata-ci") == [second]
    endpoint.post(payload("completed", job_id=2, runner_name=None))
    assert endpoint.store.get(second).state == "cancelled"
    assert endpoint.state.pending(endpoint.store, "org:octo-org", "kata-ci") == []
