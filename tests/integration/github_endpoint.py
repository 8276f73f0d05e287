"""The webhook endpoint of `kata-ci github serve` for tests: the real WebhookServer on a free
port, a real Redis and the real Celery sender (messages land in the label's Redis list), and
GitHub's real workflow_job payloads (tests/unit/test_github_runner.py's fixtures) signed with
a test secret. Used by tests/integration and tests/security."""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import http.client
import json
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

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


@contextlib.contextmanager
def serving(redis_server: RedisServer, **server_args: Any) -> Iterator[Endpoint]:
    client = redis.Redis.from_url(redis_server.url)
    client.flushdb()
    store = JobStore(client)
    state = GitHubState(client)
    config = GitHubConfig(org="octo-org", max_body_kib=64, label_sets=(
        LabelSet(("kata-ci",), "default", max_runners=500),
        LabelSet(("kata-ci", "big"), "big", max_runners=2)))
    hooks = Webhooks(config, SECRET, store, state, sender(redis_server.url, 3600), 3600)
    server = WebhookServer(("127.0.0.1", 0), hooks, lambda: None, **server_args)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                              daemon=True)
    thread.start()
    try:
        yield Endpoint(server, store, state, server.server_address[1])
    finally:
        server.shutdown()
        server.server_close()
