"""HTTP plumbing of the contract FAKE of GitHub (tests/fakes/github.py), not GitHub: the
request handler (records each request, answers with GitHub's headers: X-GitHub-Request-Id,
X-RateLimit-*), JSON replies and errors shaped as GitHub's (``message``,
``documentation_url``), and the check of a GitHub App's JWT (RS256 with PyJWT, as GitHub
documents: ``iss`` the App id, ``iat``, ``exp`` in the future and at most 10 minutes ahead).
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler
from typing import Any, Protocol
from urllib.parse import parse_qsl, urlsplit

import jwt

from tests.fakes.github_payloads import Recorded

Reply = tuple[int, dict[str, str], bytes]
RATE_LIMIT = 5000
DOCS = "https://docs.github.com/rest/actions/self-hosted-runners"


class Served(Protocol):
    cond: threading.Condition
    requests: list[Recorded]
    rate_used: int

    def handle(self, rec: Recorded) -> Reply: ...


def reply(status: int, value: Any, headers: dict[str, str] | None = None) -> Reply:
    return status, {"Content-Type": "application/json; charset=utf-8", **(headers or {})}, \
        json.dumps(value).encode()


def msg(status: int, message: str) -> Reply:
    return reply(status, {"message": message, "documentation_url": DOCS})


def parse_json(body: bytes) -> dict[str, Any] | None:
    """A JSON object body (an empty body is ``{}``); None when it is not one."""
    try:
        value = json.loads(body or b"{}")
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def check_app_jwt(authorization: str, public_key: bytes, app_id: int) -> str | None:
    """None when ``Authorization: Bearer <JWT>`` is the App's, else GitHub's message."""
    scheme, _, given = authorization.partition(" ")
    try:
        if scheme.lower() != "bearer":
            raise jwt.InvalidTokenError("not a bearer JWT")
        claims = jwt.decode(given.strip(), public_key, algorithms=["RS256"],
                            options={"require": ["exp", "iat", "iss"]}, leeway=30)
        if str(claims["iss"]) != str(app_id):
            raise jwt.InvalidTokenError("iss is not the App's id")
        if float(claims["exp"]) > time.time() + 600 + 30:
            return "'Expiration time' claim ('exp') is too far in the future"
    except (jwt.InvalidTokenError, ValueError, TypeError):
        return "A JSON web token could not be decoded"
    return None


def request_id() -> str:
    raw = uuid.uuid4().hex.upper()  # like C2A4:3E2F1:1B2C3D4:1C2D3E4:65A1B2C3
    return f"{raw[:4]}:{raw[4:9]}:{raw[9:16]}:{raw[16:23]}:{raw[23:31]}"


def make_handler(fake: Served) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as PyGithub's session expects

        def _serve(self) -> None:
            parts = urlsplit(self.path)
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            rec = Recorded(self.command, parts.path,
                           dict(parse_qsl(parts.query, keep_blank_values=True)),
                           {k.lower(): v for k, v in self.headers.items()}, body,
                           at=time.monotonic())
            with fake.cond:
                fake.requests.append(rec)
            try:
                status, headers, payload = fake.handle(rec)
            except Exception as exc:  # a bug in the fake: tell the test, do not hang it
                status, headers, payload = 500, {}, repr(exc).encode()
            with fake.cond:
                rec.status = status
                fake.rate_used += 1
                used = fake.rate_used
            reset = (int(time.time()) // 3600 + 1) * 3600
            headers = {"X-GitHub-Request-Id": request_id(), "X-GitHub-Media-Type":
                       "github.v3; format=json", "X-RateLimit-Limit": str(RATE_LIMIT),
                       "X-RateLimit-Remaining": str(max(0, RATE_LIMIT - used)),
                       "X-RateLimit-Reset": str(reset), "X-RateLimit-Used": str(used),
                       "X-RateLimit-Resource": "core", **headers}
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # client gone
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                if status != 204:  # 204 has no body, hence no length
                    self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                if status != 204:
                    self.wfile.write(payload)

        do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _serve

        def log_message(self, format: str, *args: Any) -> None:
            pass

    return Handler
