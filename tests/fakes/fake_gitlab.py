"""A contract FAKE of GitLab's runner API, not GitLab: what kata-ci's GitLab runner talks to
in tests, since no GitLab can be reached here.

Built from the documented contract and real payloads in tests/fixtures/gitlab (PROTOCOL.md,
with each fact's source in GitLab's and gitlab-runner's code): /runners/verify, token reset,
jobs/request (201/204, long poll, X-GitLab-Last-Update, RUNNER-TOKEN checked against the
body, feature gating that drops a job as runner_unsupported), the two-phase commit (409 for
the loser), PATCH trace (Content-Range, 416 with Range, Job-Status, the update interval),
the final PUT (checksum/bytesize checked, 202, 412), artifacts upload (multipart ``file``)
and download (the dependency's job token), and the project's repository over real smart
HTTP (fake_git_http.py) for ``gitlab-ci-token:<job token>``. Every request is recorded.
"""

from __future__ import annotations

import base64
import email.parser
import json
import secrets
import tempfile
import threading
import time
import zlib
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from tests.fakes.fake_git_http import GitServer

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "gitlab" / \
    "jobs_request.201.gitlab-spec-reconstructed.json"
FINISHED = ("success", "failed", "canceled")


@dataclass
class Recorded:
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]  # names lower-cased
    body: bytes
    status: int = 0
    at: float = 0.0  # time.monotonic() when received


@dataclass
class Upload:
    query: dict[str, str]
    filename: str
    data: bytes
    content_type: str


@dataclass
class FakeJob:
    id: int
    token: str
    payload: dict[str, Any]
    requires: set[str]
    state: str = "pending"  # pending | committing | running | canceling | canceled | ...
    trace: bytearray = field(default_factory=bytearray)
    final: dict[str, Any] | None = None
    checksum_ok: bool = False
    runner_system_id: str | None = None
    artifacts: list[Upload] = field(default_factory=list)
    artifact_zip: bytes | None = None
    first_trace_at: float | None = None
    handed_at: float | None = None
    told_canceled: bool = False  # a request of the runner was answered 403 canceled


class FakeGitLab:
    def __init__(self, repo: Path, project_path: str = "group/project",
                 runner_token: str = "glrt-fake-runner-0123456789", long_poll: float = 2.0,
                 trace_interval: int = 1) -> None:
        self.runner_token = runner_token
        self.project_path = project_path
        self.long_poll = long_poll
        self.trace_interval = trace_interval
        self.requests: list[Recorded] = []
        self.jobs: dict[int, FakeJob] = {}
        self.cond = threading.Condition()
        self.last_update = "0"
        self.conflict_next_commit = False
        self.trace_416_once: set[int] = set()
        self.put_202_times: dict[int, int] = {}
        self.put_412_once: set[int] = set()
        self.verify_calls: list[dict[str, Any]] = []
        self.token_expires_in: float | None = None
        self.personal_token = "glpat-fake-personal-0123456789"
        self.created_runners: list[dict[str, Any]] = []
        self._dir = tempfile.TemporaryDirectory(prefix="kci-fake-gitlab-")
        self.git = GitServer(repo, Path(self._dir.name), project_path)
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def start(self) -> None:
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self._dir.cleanup()

    def __enter__(self) -> FakeGitLab:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- what tests do ---------------------------------------------------------------------
    def add_job(self, script: list[str], after_script: list[str] | None = None, *,
                name: str = "test", stage: str = "test",
                variables: list[dict[str, Any]] | None = None,
                artifacts: list[dict[str, Any]] | None = None,
                cache: list[dict[str, Any]] | None = None,
                dependencies: list[FakeJob] | None = None, timeout: int = 3600,
                requires: set[str] | None = None, ref: str = "main",
                sha: str | None = None) -> FakeJob:
        with self.cond:
            job_id = 1000 + len(self.jobs) + 1
        token = f"glcbt-fake{secrets.token_hex(12)}"
        sha = sha or self.git.sha(ref)
        self.git.pipeline_ref(job_id, sha)
        payload = json.loads(FIXTURE.read_text())
        for key in ("image", "services", "hooks"):  # not what these tests are about
            payload.pop(key, None)
        predefined = {"CI_JOB_ID": str(job_id), "CI_JOB_TOKEN": token, "CI_JOB_NAME": name,
                      "CI_JOB_STAGE": stage, "CI_PROJECT_ID": "7",
                      "CI_PROJECT_PATH": self.project_path, "CI_SERVER_URL": self.url,
                      "CI_REPOSITORY_URL": f"{self._repo_url(token)}", "CI_COMMIT_SHA": sha,
                      "CI_COMMIT_REF_NAME": ref, "CI_PIPELINE_ID": str(job_id)}
        steps = [{"name": "script", "script": script, "timeout": timeout, "when": "on_success",
                  "allow_failure": False}]
        if after_script:
            steps.append({"name": "after_script", "script": after_script, "timeout": timeout,
                          "when": "always", "allow_failure": True})
        payload.update({
            "id": job_id, "token": token,
            "job_info": {"id": job_id, "name": name, "stage": stage, "project_id": 7,
                         "project_name": self.project_path.rsplit("/", 1)[-1],
                         "project_full_path": self.project_path},
            "git_info": {"repo_url": self._repo_url(token), "ref": ref, "sha": sha,
                         "before_sha": "0" * 40, "ref_type": "branch", "depth": 20,
                         "refspecs": [f"+{sha}:refs/pipelines/{job_id}",
                                      f"+refs/heads/{ref}:refs/remotes/origin/{ref}"]},
            "runner_info": {"timeout": timeout},
            "variables": [{"key": k, "value": v, "public": k != "CI_JOB_TOKEN",
                           "masked": k == "CI_JOB_TOKEN"} for k, v in predefined.items()]
            + (variables or []),
            "steps": steps, "artifacts": artifacts or [], "cache": cache or [],
            "dependencies": [{"id": d.id, "token": d.token, "name": "dep",
                              "artifacts_file": {"filename": "artifacts.zip",
                                                 "size": len(d.artifact_zip or b"")}}
                             for d in dependencies or [] if d.artifact_zip],
        })
        payload["features"]["token_mask_prefixes"] = ["glpat-", "gldt-"]
        job = FakeJob(job_id, token, payload, set(requires or ()))
        with self.cond:
            self.jobs[job_id] = job
            self.last_update = str(time.monotonic_ns())
            self.cond.notify_all()
        return job

    def job(self, job_id: int) -> FakeJob:
        with self.cond:
            return self.jobs[job_id]

    def cancel(self, job_id: int, graceful: bool = True) -> None:
        with self.cond:
            job = self.jobs[job_id]
            if job.state not in FINISHED:
                job.state = "canceling" if graceful else "canceled"
            self.cond.notify_all()

    def wait_final(self, job_id: int, timeout: float) -> FakeJob:
        deadline = time.monotonic() + timeout
        with self.cond:
            while self.jobs[job_id].final is None and not self.jobs[job_id].told_canceled:
                if not self.cond.wait(max(0.0, deadline - time.monotonic())) and \
                        time.monotonic() >= deadline:
                    raise AssertionError(f"job {job_id} got no final update in {timeout}s: "
                                         f"{self.jobs[job_id].state}")
            return self.jobs[job_id]

    def _repo_url(self, token: str) -> str:
        return (f"http://gitlab-ci-token:{token}@{self.url.removeprefix('http://')}/"
                f"{self.project_path}.git")

    # -- the API ---------------------------------------------------------------------------
    def handle(self, rec: Recorded) -> tuple[int, dict[str, str], bytes]:
        path = rec.path
        if path.startswith(f"/{self.project_path}.git/"):
            return self._git(rec)
        if not path.startswith("/api/v4/"):
            return 404, {}, b""
        route = path.removeprefix("/api/v4/")
        body = _json(rec.body) if rec.headers.get("content-type", "").startswith(
            "application/json") else {}
        if route in ("user", "user/runners"):
            return self._user(rec, route, body)
        if route == "runners/verify" and rec.method == "POST":
            return self._verify(body)
        if route == "runners/reset_authentication_token" and rec.method == "POST":
            return self._reset(body)
        if route == "jobs/request" and rec.method == "POST":
            return self._request(rec, body)
        parts = route.split("/")
        if len(parts) >= 2 and parts[0] == "jobs" and parts[1].isdigit():
            with self.cond:
                job = self.jobs.get(int(parts[1]))
            if job is None:
                return 404, {}, b'{"message":"404 Not found"}'
            token = rec.headers.get("job-token", "") or str(body.get("token", ""))
            if token != job.token:
                return 403, {}, b'{"message":"403 Forbidden"}'
            tail = "/".join(parts[2:])
            if tail == "" and rec.method == "PUT":
                return self._update(job, body)
            if tail == "trace" and rec.method == "PATCH":
                return self._trace(job, rec)
            if tail == "artifacts" and rec.method == "POST":
                return self._upload(job, rec)
            if tail == "artifacts" and rec.method == "GET":
                if job.artifact_zip is None:
                    return 404, {}, b""
                return 200, {"Content-Type": "application/zip"}, job.artifact_zip
        return 404, {}, b""

    def _token_body(self, token: str) -> dict[str, Any]:
        expires = None
        if self.token_expires_in is not None:
            expires = time.strftime("%Y-%m-%dT%H:%M:%S.000Z",
                                    time.gmtime(time.time() + self.token_expires_in))
        return {"id": 1, "token": token, "token_expires_at": expires}

    def _user(self, rec: Recorded, route: str,
              body: dict[str, Any]) -> tuple[int, dict[str, str], bytes]:
        """GET /user and POST /user/runners (docs: api/users.md), with a personal token:
        the created runner's token (fixture user_runners.201.json) is the runner token."""
        if rec.headers.get("private-token") != self.personal_token:
            return 401, {}, b'{"message":"401 Unauthorized"}'
        if route == "user" and rec.method == "GET":
            return 200, {"Content-Type": "application/json"}, \
                b'{"id": 1, "username": "fake-admin"}'
        if route == "user/runners" and rec.method == "POST":
            if body.get("runner_type") not in ("instance_type", "group_type", "project_type"):
                return 400, {}, b'{"error":"runner_type does not have a valid value"}'
            self.created_runners.append(body)
            self.runner_token = f"glrt-fake-{secrets.token_hex(8)}"
            return 201, {"Content-Type": "application/json"}, json.dumps(
                {"id": 9171, "token": self.runner_token, "token_expires_at": None}).encode()
        return 404, {}, b""

    def _verify(self, body: dict[str, Any]) -> tuple[int, dict[str, str], bytes]:
        self.verify_calls.append(body)
        if body.get("token") != self.runner_token:
            return 403, {}, b'{"message":"403 Forbidden"}'
        if str(body.get("token")).startswith("glrt-") and not body.get("system_id"):
            return 400, {}, b'{"error":"system_id is missing"}'
        return 200, {}, json.dumps(self._token_body(self.runner_token)).encode()

    def _reset(self, body: dict[str, Any]) -> tuple[int, dict[str, str], bytes]:
        if body.get("token") != self.runner_token:
            return 403, {}, b""
        self.runner_token = f"glrt-fake-{secrets.token_hex(8)}"
        return 201, {}, json.dumps(self._token_body(self.runner_token)).encode()

    def _request(self, rec: Recorded, body: dict[str, Any]) -> tuple[int, dict[str, str], bytes]:
        if not body.get("token") or "system_id" not in body:
            return 400, {}, b""
        if body["token"] != self.runner_token or rec.headers.get("runner-token") != body["token"]:
            return 403, {}, b""
        features = body.get("info", {}).get("features", {})
        deadline = time.monotonic() + self.long_poll
        with self.cond:
            while True:
                for job in self.jobs.values():
                    if job.state != "pending":
                        continue
                    if not all(features.get(f) is True for f in job.requires):
                        job.state = "failed"  # Ci::RegisterJobService: runner_unsupported
                        job.final = {"state": "failed", "failure_reason": "runner_unsupported"}
                        self.cond.notify_all()
                        continue
                    job.state, job.handed_at = "committing", time.monotonic()
                    return 201, {"Content-Type": "application/json"}, \
                        json.dumps(job.payload).encode()
                left = deadline - time.monotonic()
                if left <= 0:
                    return 204, {"X-GitLab-Last-Update": self.last_update}, b""
                self.cond.wait(left)

    def _update(self, job: FakeJob, body: dict[str, Any]) -> tuple[int, dict[str, str], bytes]:
        state = body.get("state")
        with self.cond:
            if state not in ("pending", "running", "success", "failed"):
                return 400, {}, b""
            if job.state == "committing" and state == "running":
                if self.conflict_next_commit:
                    self.conflict_next_commit = False
                    job.state, job.runner_system_id = "running", "s_anotherrunner"
                    return 409, {}, b'{"message":"409 Conflict"}'
                job.state, job.runner_system_id = "running", str(body.get("system_id", "ours"))
                return 200, {"Job-Status": "running"}, b"200"
            if job.state not in ("running", "canceling"):
                job.told_canceled = job.state == "canceled"
                self.cond.notify_all()
                return 403, {"Job-Status": job.state}, b""
            if state in ("running", "pending"):
                return 200, {"Job-Status": job.state}, b"200"
            if job.id in self.put_412_once:
                self.put_412_once.discard(job.id)
                job.trace.clear()  # as if GitLab lost the live trace: all of it again
                return 412, {}, b""
            if self.put_202_times.get(job.id, 0) > 0:
                self.put_202_times[job.id] -= 1
                return 202, {"Job-Status": "running", "X-GitLab-Trace-Update-Interval": "1"}, b""
            output = body.get("output") or {}
            job.checksum_ok = (output.get("checksum") ==
                               f"crc32:{zlib.crc32(bytes(job.trace)) & 0xffffffff:08x}"
                               and output.get("bytesize") == len(job.trace))
            job.final = body
            job.state = "canceled" if job.state == "canceling" else str(state)
            self.cond.notify_all()
            return 200, {"Job-Status": job.state}, b"200"

    def _trace(self, job: FakeJob, rec: Recorded) -> tuple[int, dict[str, str], bytes]:
        span = rec.headers.get("content-range")
        if not span:
            return 400, {}, b""
        with self.cond:
            if job.state not in ("running", "canceling"):
                job.told_canceled = job.state == "canceled"
                self.cond.notify_all()
                return 403, {"Job-Status": job.state}, b""
            start = int(span.split("-")[0])
            if job.id in self.trace_416_once or start != len(job.trace):
                self.trace_416_once.discard(job.id)
                return 416, {"Range": f"0-{len(job.trace)}"}, b""
            job.trace += rec.body
            if rec.body and job.first_trace_at is None:
                job.first_trace_at = rec.at
            self.cond.notify_all()
            return 202, {"Range": f"0-{len(job.trace)}", "Job-Status": job.state,
                         "X-GitLab-Trace-Update-Interval": str(self.trace_interval)}, b""

    def _upload(self, job: FakeJob, rec: Recorded) -> tuple[int, dict[str, str], bytes]:
        head = f"Content-Type: {rec.headers.get('content-type', '')}\r\n\r\n".encode()
        message = email.parser.BytesParser().parsebytes(head + rec.body)
        for part in message.walk():
            if part.get_param("name", header="content-disposition") == "file":
                data = part.get_payload(decode=True)
                assert isinstance(data, bytes)
                upload = Upload(rec.query, part.get_filename() or "", data,
                                part.get_content_type())
                with self.cond:
                    job.artifacts.append(upload)
                    if rec.query.get("artifact_type", "archive") == "archive":
                        job.artifact_zip = data
                return 201, {}, b"{}"
        return 400, {}, b'{"message":"file is missing"}'

    def _git(self, rec: Recorded) -> tuple[int, dict[str, str], bytes]:
        auth = rec.headers.get("authorization", "")
        user, _, password = base64.b64decode(auth.removeprefix("Basic ") or "Og==").decode(
            errors="replace").partition(":")
        with self.cond:
            allowed = user == "gitlab-ci-token" and any(
                j.token == password and j.state in ("running", "canceling")
                for j in self.jobs.values())
        if not allowed:
            return 401, {"WWW-Authenticate": 'Basic realm="GitLab"'}, b""
        path = rec.path.removeprefix("/")
        query = "&".join(f"{k}={v}" for k, v in rec.query.items())
        status, headers, body = self.git.serve(
            rec.method, "/" + path, query, rec.headers.get("content-type", ""), rec.body, user,
            rec.headers.get("content-encoding", ""))
        return status, dict(headers), body


def _json(body: bytes) -> dict[str, Any]:
    try:
        value = json.loads(body or b"{}")
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def _handler(fake: FakeGitLab) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _serve(self) -> None:
            at = time.monotonic()
            parts = urlsplit(self.path)
            length = int(self.headers.get("Content-Length") or 0)
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                body = _read_chunked(self.rfile)
            else:
                body = self.rfile.read(length) if length else b""
            rec = Recorded(self.command, parts.path, dict(parse_qsl(parts.query)),
                           {k.lower(): v for k, v in self.headers.items()}, body, at=at)
            status, headers, payload = fake.handle(rec)
            rec.status = status
            with fake.cond:
                fake.requests.append(rec)
            try:
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the runner went away mid-request (killed in a test): as GitLab sees it

        do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _serve

        def log_message(self, format: str, *args: Any) -> None:
            pass

    return Handler


def _read_chunked(stream: Any) -> bytes:
    out = b""
    while True:
        size = int(stream.readline().strip().split(b";")[0], 16)
        if size == 0:
            stream.readline()
            return out
        out += stream.read(size)
        stream.readline()
