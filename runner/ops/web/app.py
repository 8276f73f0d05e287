"""The status page: a read-only view of the job store over HTTP (Starlette).

What leaves Redis through it, and nothing else: each job's public fields (``public``: never
its ``env``, which `submit -e` may fill with anything, nor the ``gitlab``/``github`` fields,
which hold a GitLab job token and variables), running jobs grouped by host, the workers'
announced slots (capacity.py), and a job's stored log. The log is masked by the worker
before it is stored, so the page can only show what every other sink shows.

Endpoints (GET; HEAD too):
  /                     the page; with a token, ``/?token=T`` sets the cookie and redirects
                        to ``/`` so that the token leaves the address bar and the history
  /static/...           app.js, style.css
  /api/jobs?count=N     recent jobs, newest first, and the server's clock (``now``)
  /api/jobs/<id>        one job
  /api/hosts            running jobs by host; live workers
  /api/jobs/<id>/log    server-sent events: ``chunk`` ({s: stream, d: text}, id = the log
                        stream's entry id, so a reconnecting EventSource resumes after what it
                        has via Last-Event-ID), then one ``end`` ({state, exit_code, message})

Access: with a token, every request needs it (``Authorization: Bearer`` or the cookie), both
compared in constant time. Without one (the CLI allows that on loopback only), only loopback
Host names are answered: a DNS-rebinding page in the operator's browser must not read it.
Redis is only reached from worker threads (``run_in_threadpool``): the event loop never waits
on it, and a live log is polled without blocking reads, so a follower holds no thread.
"""

from __future__ import annotations

import asyncio
import codecs
import hashlib
import hmac
import ipaddress
import json
import re
import time
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import redis
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import MutableHeaders
from starlette.requests import Request
from starlette.responses import (
    FileResponse,
    JSONResponse,
    PlainTextResponse,
    RedirectResponse,
    Response,
    StreamingResponse,
)
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from kata_ci.runner.queue.store import LEASES, PREFIX, Job, JobStore

STATIC = Path(__file__).parent / "static"
COOKIE = "kataci_status"
LIVE = ("queued", "running")  # a job in any other state has written its whole log
JOB_ID = re.compile(r"[0-9a-f]{1,32}")  # JobStore ids are 16 hex digits
ENTRY_ID = re.compile(r"[0-9]{1,20}-[0-9]{1,20}")  # a Redis stream entry id
HEADERS = {
    # Only our own files: no inline script or style, so an injected string cannot run even
    # if some path ever rendered it as markup.
    "content-security-policy": "default-src 'self'; base-uri 'none'; form-action 'none'; "
                               "frame-ancestors 'none'; object-src 'none'",
    "x-content-type-options": "nosniff",
    "x-frame-options": "DENY",  # frame-ancestors for browsers that predate it
    "referrer-policy": "no-referrer",
    "cross-origin-opener-policy": "same-origin",
    "cross-origin-resource-policy": "same-origin",
    "cache-control": "no-store",  # job data (and, with a token, protected data) stays uncached
}


@dataclass(frozen=True)
class WebSettings:
    token: str = ""  # empty: no token, loopback Host names only
    job_count: int = 50  # jobs listed when the page does not ask for a number
    poll: float = 0.5  # s between reads of a running job's log
    keepalive: float = 15.0  # s of silence before a comment line keeps proxies from closing
    max_streams: int = 64  # live logs followed at once; more are told to come back later


def public(job: Job) -> dict[str, Any]:
    """What the page may show of a job: an allowlist, so that a field added to the job hash
    later is private until it is added here."""
    return {"id": job.id, "state": job.state, "source": job.source, "label": job.label,
            "argv": [str(a) for a in job.argv] if isinstance(job.argv, list) else [],
            "message": job.message, "exit_code": job.exit_code, "reason": job.reason,
            "worker": job.worker, "host": job.host, "attempt": job.attempt,
            "timeout": job.timeout, "created_at": job.created_at,
            "started_at": job.started_at, "vm_ready_at": job.vm_ready_at,
            "vm_start": job.vm_start, "first_output_at": job.first_output_at,
            "finished_at": job.finished_at}


def _parse(raw: dict[bytes, bytes]) -> Job | None:
    """A job hash, or None when it is gone or malformed: anyone who can write to Redis can
    put anything there, and one bad entry must not take the page down."""
    try:
        return Job.from_hash(raw) if raw else None
    except (KeyError, ValueError, TypeError, UnicodeDecodeError):
        return None


def _key(job_id: str) -> str:
    return f"{PREFIX}job:{job_id}"


def loopback_name(host_header: str) -> bool:
    """The Host header names this machine's loopback: localhost, 127/8 or ::1 (any port)."""
    value = host_header.strip().lower()
    if value.startswith("["):
        name = value[1:value.find("]")] if "]" in value else ""
    else:
        name = value.rsplit(":", 1)[0] if value.count(":") == 1 else value
    if name in ("localhost", "localhost."):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


class _Guard:
    """Security headers on every answer, and access control before any route runs (a pure
    ASGI middleware: streamed answers pass through untouched)."""

    def __init__(self, app: ASGIApp, token: str) -> None:
        self.app = app
        self.token = token.encode()
        # The cookie holds a value derived from the token, not the token: Set-Cookie headers
        # and cookie jars then never carry the token itself.
        self.cookie = hmac.new(self.token, b"kata-ci status cookie",
                               hashlib.sha256).hexdigest() if token else ""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_secured(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                for name, value in HEADERS.items():
                    headers[name] = value
            await send(message)

        refusal = self._refusal(Request(scope))
        if refusal is not None:
            await refusal(scope, receive, send_secured)
            return
        await self.app(scope, receive, send_secured)

    def _refusal(self, request: Request) -> Response | None:
        if not self.token:
            if loopback_name(request.headers.get("host", "")):
                return None
            return PlainTextResponse("this page answers to loopback names only "
                                     "(serve it with a token to reach it otherwise)\n", 400)
        given = request.query_params.get("token")
        if given is not None and request.url.path == "/":
            if not self._same(given, self.token):
                return self._unauthorized()
            answer = RedirectResponse("/", 303)
            answer.set_cookie(COOKIE, self.cookie, path="/", httponly=True, samesite="strict")
            return answer
        scheme, _, bearer = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() == "bearer" and self._same(bearer.strip(), self.token):
            return None
        if self._same(request.cookies.get(COOKIE, ""), self.cookie.encode()):
            return None
        return self._unauthorized()

    @staticmethod
    def _same(given: str, expected: bytes) -> bool:
        return hmac.compare_digest(given.encode("utf-8", "replace"), expected)

    @staticmethod
    def _unauthorized() -> Response:
        return PlainTextResponse(
            "a token is needed: open /?token=... once, or send Authorization: Bearer ...\n",
            401, headers={"www-authenticate": 'Bearer realm="kata-ci status"'})


class _Views:
    """The routes' work; every Redis call here runs in a worker thread."""

    def __init__(self, store: JobStore, settings: WebSettings) -> None:
        self.store = store
        self.settings = settings
        self.streams = 0  # live logs being followed (touched on the event loop only)
        self.closing = False  # the server is stopping: streams end, their clients come back

    # -- reads (worker threads) ---------------------------------------------------------------
    def _jobs(self, ids: Iterable[bytes | str]) -> list[Job]:
        pipe = self.store.r.pipeline(transaction=False)
        for job_id in ids:
            pipe.hgetall(_key(job_id.decode() if isinstance(job_id, bytes) else job_id))
        return [j for j in map(_parse, cast(list[dict[bytes, bytes]], pipe.execute())) if j]

    def recent(self, count: int) -> list[dict[str, Any]]:
        ids = cast(list[bytes], self.store.r.zrevrange(f"{PREFIX}jobs", 0, count - 1))
        return [public(j) for j in self._jobs(ids)]

    def one(self, job_id: str) -> Job | None:
        return _parse(cast(dict[bytes, bytes], self.store.r.hgetall(_key(job_id))))

    def hosts(self) -> dict[str, Any]:
        running = [j for j in self._jobs(cast(list[bytes], self.store.r.zrange(LEASES, 0, -1)))
                   if j.state == "running"]
        by_host: dict[str, list[dict[str, Any]]] = {}
        for job in sorted(running, key=lambda j: j.started_at or 0.0):
            by_host.setdefault(job.host, []).append(public(job))
        workers = []
        for key in sorted(self.store.r.scan_iter(f"{PREFIX}worker:*", count=200)):
            raw = cast(dict[bytes, bytes], self.store.r.hgetall(key))
            try:
                labels = json.loads(raw.get(b"labels", b"[]"))
                workers.append({
                    "name": key.decode().removeprefix(f"{PREFIX}worker:"),
                    "labels": [str(x) for x in labels] if isinstance(labels, list) else [],
                    "concurrency": int(raw.get(b"concurrency", b"0")),
                    "busy": int(raw.get(b"busy", b"0"))})
            except (ValueError, TypeError):
                continue  # expired between scan and read, or not ours to understand
        return {"hosts": [{"host": h, "jobs": j} for h, j in sorted(by_host.items())],
                "workers": workers}

    def read_log(self, job_id: str, last: str) -> tuple[list[tuple[str, str, bytes]],
                                                         Job | None]:
        """Entries after ``last``, and the job as it was *before* they were read: a job seen
        over before an empty read has nothing more to write."""
        job = self.one(job_id)
        batch = cast(list[Any], self.store.r.xread({f"{PREFIX}log:{job_id}": last},
                                                   count=256))
        entries = [(entry_id.decode(), fields.get(b"s", b"").decode(errors="replace"),
                    fields.get(b"d", b""))
                   for _, items in batch for entry_id, fields in items]
        return entries, job

    # -- routes (event loop) ------------------------------------------------------------------
    async def index(self, request: Request) -> Response:
        return FileResponse(STATIC / "index.html", media_type="text/html; charset=utf-8")

    async def list_jobs(self, request: Request) -> Response:
        try:
            count = int(request.query_params.get("count", self.settings.job_count))
        except ValueError:
            count = self.settings.job_count
        jobs = await run_in_threadpool(self.recent, min(max(count, 1), 500))
        return JSONResponse({"now": time.time(), "jobs": jobs})

    async def get_job(self, request: Request) -> Response:
        job_id = request.path_params["job_id"]
        job = await run_in_threadpool(self.one, job_id) if JOB_ID.fullmatch(job_id) else None
        if job is None:
            return JSONResponse({"error": "no such job"}, 404)
        return JSONResponse({"now": time.time(), "job": public(job)})

    async def list_hosts(self, request: Request) -> Response:
        return JSONResponse({"now": time.time(), **await run_in_threadpool(self.hosts)})

    async def log(self, request: Request) -> Response:
        job_id = request.path_params["job_id"]
        job = await run_in_threadpool(self.one, job_id) if JOB_ID.fullmatch(job_id) else None
        if job is None:
            return JSONResponse({"error": "no such job"}, 404)
        last = request.headers.get("last-event-id", "")
        return StreamingResponse(
            self._follow(job_id, last if ENTRY_ID.fullmatch(last) else "0-0"),
            media_type="text/event-stream",
            headers={"x-accel-buffering": "no"})  # a proxy must pass events on at once

    async def _follow(self, job_id: str, last: str) -> AsyncIterator[str]:
        if self.streams >= self.settings.max_streams:
            yield "retry: 10000\nevent: busy\ndata: {}\n\n"
            return
        self.streams += 1
        try:
            async for event in self._events(job_id, last):
                yield event
        finally:
            self.streams -= 1

    async def _events(self, job_id: str, last: str) -> AsyncIterator[str]:
        # Per stream, so that a character split across two chunks is decoded whole.
        decoders: dict[str, codecs.IncrementalDecoder] = {}
        yield "retry: 2000\n\n"
        quiet_since = time.monotonic()
        while True:
            try:
                entries, job = await run_in_threadpool(self.read_log, job_id, last)
            except redis.RedisError:
                # EventSource reconnects by itself, resuming after `last` (Last-Event-ID).
                yield "event: problem\ndata: {\"error\": \"store unreachable\"}\n\n"
                return
            for entry_id, stream, data in entries:
                last = entry_id
                decoder = decoders.setdefault(
                    stream, codecs.getincrementaldecoder("utf-8")(errors="replace"))
                text = json.dumps({"s": stream, "d": decoder.decode(data)})
                yield f"id: {entry_id}\nevent: chunk\ndata: {text}\n\n"
            if entries:
                quiet_since = time.monotonic()
                continue
            if job is None or job.state not in LIVE:
                end = {"state": job.state if job else "gone",
                       "exit_code": job.exit_code if job else None,
                       "message": job.message if job else "the job's record is gone"}
                yield f"event: end\ndata: {json.dumps(end)}\n\n"
                return
            if self.closing:
                return  # no `end`: the job goes on, and EventSource reconnects later
            if time.monotonic() - quiet_since >= self.settings.keepalive:
                quiet_since = time.monotonic()
                yield ": keepalive\n\n"
            await asyncio.sleep(self.settings.poll)


async def _store_down(request: Request, exc: Exception) -> Response:
    return JSONResponse({"error": "the job store is unreachable"}, 503)


def create_app(store: JobStore, settings: WebSettings | None = None) -> Starlette:
    """The status page's ASGI app over ``store`` (read only: no write to Redis is made)."""
    settings = settings or WebSettings()
    views = _Views(store, settings)
    app = Starlette(routes=[
        Route("/", views.index),
        Route("/api/jobs", views.list_jobs),
        Route("/api/hosts", views.list_hosts),
        Route("/api/jobs/{job_id}", views.get_job),
        Route("/api/jobs/{job_id}/log", views.log),
        Mount("/static", StaticFiles(directory=STATIC), name="static"),
    ], exception_handlers={redis.RedisError: _store_down})
    app.add_middleware(_Guard, token=settings.token)
    app.state.views = views
    return app


def close_streams(app: Starlette) -> None:
    """The server is stopping: followed logs end within one poll, so that shutdown need not
    wait for jobs to end (or cut the streams off)."""
    cast(_Views, app.state.views).closing = True
