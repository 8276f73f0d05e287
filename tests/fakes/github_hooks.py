"""Webhook deliveries of the contract FAKE of GitHub (tests/fakes/github.py), not GitHub.

As GitHub delivers (docs: "Validating webhook deliveries", "Handling failed webhook
deliveries"; peers-research.md 2.1): a POST of the raw JSON body with ``X-GitHub-Event``,
``X-GitHub-Delivery`` (a uuid4), ``X-GitHub-Hook-ID``, ``User-Agent: GitHub-Hookshot/...``,
``X-Hub-Signature-256: sha256=<hex HMAC-SHA256 of the raw body with the secret>`` (and the
legacy ``X-Hub-Signature: sha1=...``); a receiver has 10 s; a failed delivery is not retried.
A manual redelivery sends the same body with the same ``X-GitHub-Delivery`` guid.
Deliveries leave in order, one at a time, from one background thread.
"""

from __future__ import annotations

import hashlib
import hmac
import http.client
import queue
import threading
import uuid
from collections.abc import Mapping
from urllib.parse import urlsplit

from tests.fakes.github_payloads import Delivery

TIMEOUT = 10.0  # GitHub's budget for a receiver
HOOK_ID = 424242


def sign(secret: str, body: bytes) -> str:
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def post(url: str, body: bytes, headers: Mapping[str, str], timeout: float = TIMEOUT) -> int:
    """POST ``body`` to ``url``; the status, or an OSError when there was none."""
    parts = urlsplit(url)
    conn_type = (http.client.HTTPSConnection if parts.scheme == "https"
                 else http.client.HTTPConnection)
    conn = conn_type(parts.hostname or "127.0.0.1", parts.port, timeout=timeout)
    try:
        target = parts.path or "/"
        conn.request("POST", f"{target}?{parts.query}" if parts.query else target, body=body,
                     headers=dict(headers))
        response = conn.getresponse()
        response.read()
        return response.status
    finally:
        conn.close()


class Hooks:
    """The delivery queue and its thread. Each attempt is recorded in ``deliveries`` under
    the fake's ``lock``, which is notified (wait_for wakes up)."""

    def __init__(self, url: str | None, secret: str, app_id: int | None,
                 deliveries: list[Delivery], lock: threading.Condition) -> None:
        self.url, self.secret, self.app_id = url, secret, app_id
        self.deliveries = deliveries
        self.lock = lock
        self.queue: queue.Queue[Delivery | None] = queue.Queue()
        self.thread: threading.Thread | None = None
        self.closing = False

    def headers(self, guid: str, body: bytes) -> dict[str, str]:
        return {
            "Content-Type": "application/json", "User-Agent": "GitHub-Hookshot/fake",
            "X-GitHub-Event": "workflow_job", "X-GitHub-Delivery": guid,
            "X-GitHub-Hook-ID": str(HOOK_ID),
            "X-GitHub-Hook-Installation-Target-Type": "integration",
            "X-GitHub-Hook-Installation-Target-ID": str(self.app_id or 1),
            "X-Hub-Signature-256": sign(self.secret, body),
            "X-Hub-Signature": "sha1=" + hmac.new(self.secret.encode(), body,
                                                  hashlib.sha1).hexdigest(),
        }

    def start(self) -> None:
        if self.url is not None:
            self.thread = threading.Thread(target=self._run, daemon=True,
                                           name="fake-github-hooks")
            self.thread.start()

    def stop(self) -> None:
        self.closing = True
        if self.thread is not None:
            self.queue.put(None)
            self.thread.join(TIMEOUT + 2)

    def enqueue(self, action: str, job_id: int, body: bytes) -> None:
        """A state change to tell (called with the fake's lock held: the order is kept)."""
        if self.url is None:
            return
        guid = str(uuid.uuid4())
        self.queue.put(Delivery(guid, action, job_id, body, self.headers(guid, body)))

    def redeliver(self, guid: str) -> Delivery:
        """GitHub's manual redelivery: the same body, the same guid, sent now."""
        with self.lock:
            first = next((d for d in self.deliveries if d.guid == guid), None)
        if first is None or self.url is None:
            raise KeyError(f"no delivery {guid}")
        again = Delivery(guid, first.action, first.job_id, first.body, dict(first.headers),
                         redelivery=True)
        self._send(again)
        return again

    def _run(self) -> None:
        while (delivery := self.queue.get()) is not None:
            if not self.closing:
                self._send(delivery)

    def _send(self, delivery: Delivery) -> None:
        assert self.url is not None
        try:
            delivery.status = post(self.url, delivery.body, delivery.headers)
        except (OSError, http.client.HTTPException) as exc:  # refused, reset, timed out
            delivery.error = f"{type(exc).__name__}: {exc}"
        with self.lock:
            self.deliveries.append(delivery)
            self.lock.notify_all()
