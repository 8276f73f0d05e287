"""The HTTP side of `kata-ci github serve`: ``POST /webhook`` and ``GET /healthz``.

Standard library HTTP, bounded: a client gets 10 s per read (a slow sender cannot hold a
thread), at most ``MAX_CONCURRENT`` requests are served at once (the rest get 503, which
GitHub records as a failed delivery and the reconcile loop covers), a body is refused by its
Content-Length before a byte of it is read (413; no length: 411), and nothing a client sends
reaches a log but a truncated, escaped line.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from kata_ci.runner.github_runner.webhook import Answer, Webhooks

log = logging.getLogger("kata_ci.github.server")
MAX_CONCURRENT = 32
READ_TIMEOUT = 10.0


class WebhookServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 64

    def __init__(self, address: tuple[str, int], hooks: Webhooks,
                 healthy: Callable[[], str | None]) -> None:
        self.hooks = hooks
        self.healthy = healthy  # None when fine, else why not
        self.slots = threading.BoundedSemaphore(MAX_CONCURRENT)
        super().__init__(address, _Handler)


class _Handler(BaseHTTPRequestHandler):
    server: WebhookServer
    timeout = READ_TIMEOUT
    server_version = "kata-ci"
    sys_version = ""

    def do_GET(self) -> None:
        if self.path != "/healthz":
            self._answer(Answer(404, "not found"))
            return
        why = self.server.healthy()
        self._answer(Answer(200, "ok") if why is None else Answer(503, why))

    def do_POST(self) -> None:
        if self.path != "/webhook":
            self._answer(Answer(404, "not found"))
            return
        if not self.server.slots.acquire(blocking=False):
            self._answer(Answer(503, "busy"))
            return
        try:
            self._answer(self._delivery())
        finally:
            self.server.slots.release()

    def _delivery(self) -> Answer:
        if self.headers.get("Transfer-Encoding"):
            return Answer(411, "a Content-Length is required")
        length_text = self.headers.get("Content-Length", "")
        if not length_text.isdigit():
            return Answer(411, "a Content-Length is required")
        length = int(length_text)
        if length > self.server.hooks.max_body:
            self.close_connection = True  # the body is never read
            return Answer(413, f"body over {self.server.hooks.max_body} bytes")
        body = self.rfile.read(length)
        if len(body) != length:
            return Answer(400, "body shorter than its Content-Length")
        headers = {k.lower(): v for k, v in self.headers.items()}
        try:
            return self.server.hooks.handle(headers, body)
        except Exception:  # Redis or the broker down: GitHub sees a failure, reconcile covers
            log.exception("webhook delivery %r could not be handled",
                          headers.get("x-github-delivery", "")[:64])
            return Answer(500, "could not record the delivery")

    def _answer(self, answer: Answer) -> None:
        data = json.dumps({"message": answer.message}).encode()
        self.send_response(answer.status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: object) -> None:
        log.info("%s %s", self.address_string(), (format % args)[:200].encode(
            "unicode_escape").decode())
