"""The HTTP side of `kata-ci github serve`: ``POST /webhook`` and ``GET /healthz``.

Standard library HTTP, bounded: a connection has ``READ_DEADLINE`` in all to send its
request, headers and body (GitHub's own budget is 10 s; a sender trickling a byte at a time
is cut off at the deadline, not after each slow read), at most ``MAX_CONNECTIONS`` are open at
once (more are closed unread) and ``MAX_CONCURRENT`` deliveries handled (the rest get 503,
which GitHub records as a failed delivery and the reconcile loop covers), a body is refused by
its Content-Length before a byte of it is read (413; no length: 411), and nothing a client
sends reaches a log but a truncated, escaped line.
"""

from __future__ import annotations

import contextlib
import json
import logging
import socket
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from kata_ci.runner.github_runner.webhook import Answer, Webhooks
from kata_ci.runner.ops.metrics import VERDICTS, WEBHOOK_DELIVERIES, bounded

log = logging.getLogger("kata_ci.github.server")
MAX_CONCURRENT = 32
MAX_CONNECTIONS = 128
READ_DEADLINE = 10.0


class WebhookServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 64

    def __init__(self, address: tuple[str, int], hooks: Webhooks,
                 healthy: Callable[[], str | None], read_deadline: float = READ_DEADLINE,
                 max_connections: int = MAX_CONNECTIONS) -> None:
        self.hooks = hooks
        self.healthy = healthy  # None when fine, else why not
        self.read_deadline = read_deadline
        self.slots = threading.BoundedSemaphore(MAX_CONCURRENT)
        self.connections = threading.BoundedSemaphore(max_connections)
        super().__init__(address, _Handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        # One thread per connection is the standard library's model: bound it, or idle
        # connections alone would exhaust the host's threads.
        if not self.connections.acquire(blocking=False):
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self.connections.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.connections.release()

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A connection cut at its deadline or dropped by the client: one line, no traceback
        # (anyone can cause this, and the standard library would print one to stderr).
        log.info("connection from %s ended before its answer", client_address[0])


class _Handler(BaseHTTPRequestHandler):
    server: WebhookServer
    timeout = READ_DEADLINE  # per read; the deadline below bounds the whole request
    server_version = "kata-ci"
    sys_version = ""

    def setup(self) -> None:
        super().setup()
        self._cutter = threading.Timer(self.server.read_deadline, self._cut)
        self._cutter.daemon = True
        self._cutter.start()

    def finish(self) -> None:
        self._cutter.cancel()
        super().finish()

    def _cut(self) -> None:
        """The request was not in within the deadline: end the connection (its reads fail)."""
        with contextlib.suppress(OSError):  # already gone
            self.connection.shutdown(socket.SHUT_RDWR)

    def do_GET(self) -> None:
        self._cutter.cancel()
        if self.path != "/healthz":
            self._answer(Answer(404, "not found"))
            return
        why = self.server.healthy()
        self._answer(Answer(200, "ok") if why is None else Answer(503, why))

    def do_POST(self) -> None:
        if self.path != "/webhook":
            self._answer(Answer(404, "not found", "malformed"))
            return
        if not self.server.slots.acquire(blocking=False):
            self._answer(Answer(503, "busy", "busy"))
            return
        try:
            self._answer(self._delivery())
        finally:
            self.server.slots.release()

    def _delivery(self) -> Answer:
        if self.headers.get("Transfer-Encoding"):
            return Answer(411, "a Content-Length is required", "malformed")
        length_text = self.headers.get("Content-Length", "")
        if not length_text.isdigit():
            return Answer(411, "a Content-Length is required", "malformed")
        length = int(length_text)
        if length > self.server.hooks.max_body:
            self.close_connection = True  # the body is never read
            return Answer(413, f"body over {self.server.hooks.max_body} bytes", "too_large")
        body = self.rfile.read(length)
        self._cutter.cancel()  # all in: handling it is ours to finish
        if len(body) != length:
            return Answer(400, "body shorter than its Content-Length", "malformed")
        headers = {k.lower(): v for k, v in self.headers.items()}
        try:
            return self.server.hooks.handle(headers, body)
        except Exception:  # Redis or the broker down: GitHub sees a failure, reconcile covers
            log.exception("webhook delivery %r could not be handled",
                          headers.get("x-github-delivery", "")[:64])
            return Answer(500, "could not record the delivery")

    def _answer(self, answer: Answer) -> None:
        if self.command == "POST":
            WEBHOOK_DELIVERIES.labels(bounded(answer.verdict, VERDICTS)).inc()
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
