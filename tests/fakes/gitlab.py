"""A contract FAKE of GitLab's runner API, not GitLab: what kata-ci's GitLab runner talks to in
tests, since no GitLab can be reached here.

Everything it does comes from the documented contract: tests/fixtures/gitlab/PROTOCOL.md (each
fact with its source in GitLab's or gitlab-runner's code), the JSON fixtures beside it, and the
research notes on gitlab-runner (peers-research.md, section 1). On 127.0.0.1 at an ephemeral
port, under /api/v4: runners/verify, runners/reset_authentication_token, DELETE
runners/managers, user/runners, jobs/request, PUT jobs/:id, PATCH jobs/:id/trace, artifacts up
and down; and the project's repository over git smart HTTP (git_http.py) at /<project>.git.

Deliberate simplifications:
- One pipeline per job: the pipeline id is the job id (CI_PIPELINE_ID, refs/pipelines/<id>).
- jobs/request is answered at once only when a job can be handed out; otherwise it is held up
  to ``long_poll`` seconds (woken early by add_job), then 204 with the current
  X-GitLab-Last-Update. (Workhorse also answers at once when ``last_update`` is stale.)
- Stricter than GitLab where a runner bug would otherwise go unseen: jobs/request needs the
  RUNNER-TOKEN header equal to the body token (gitlab-runner's test server insists),
  ``info.features`` (booleans) and ``system_id``.
- A checksum mismatch on the final PUT is answered 200 (GitLab only logs it) and recorded as
  ``FakeJob.checksum_ok = False``; 202 and 412 happen only when a test injects them.
Every request is recorded in ``requests``, in the order received.
"""

from __future__ import annotations

import base64
import contextlib
import email.parser
import io
import json
import re
import secrets
import tempfile
import threading
import time
import uuid
import zlib
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit

from tests.fakes.git_http import GitServer

FIXTURE = (Path(__file__).resolve().parents[1] / "fixtures" / "gitlab"
           / "jobs_request.201.gitlab-spec-reconstructed.json")
FAILURE_REASONS: list[str] = json.loads(FIXTURE.read_text())["features"]["failure_reasons"]
PROJECT_ID = 7  # as in the fixture
ON_RUNNER = ("running", "canceling")  # GitLab's "processing on a runner": the job token works
ANOTHER_RUNNER = "s_another-runner-manager"
Reply = tuple[int, dict[str, str], bytes]


@dataclass
class Recorded:
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]  # names lower-cased
    body: bytes
    status: int = 0  # what the fake answered (0 while the request is still in hand)
    at: float = 0.0  # time.monotonic() when received


@dataclass
class Upload:
    query: dict[str, str]
    filename: str
    data: bytes
    content_type: str


@dataclass(eq=False)
class FakeJob:
    id: int
    token: str
    payload: dict[str, Any]  # the 201 body (its dependencies are filled in when handed out)
    requires: set[str]  # runner features the job needs, else it is dropped (runner_unsupported)
    state: str = "pending"  # pending-commit | running | canceling | canceled | success | failed
    trace: bytearray = field(default_factory=bytearray)
    final: dict[str, Any] | None = None  # body of the final PUT that got 200
    runner_system_id: str | None = None  # the runner manager that committed it
    artifacts: list[Upload] = field(default_factory=list)
    artifact_zip: bytes | None = None  # what GET /jobs/:id/artifacts serves
    first_trace_at: float | None = None  # monotonic time of the first non-empty PATCH accepted
    handed_at: float | None = None  # monotonic time of the 201
    checksum_ok: bool | None = None  # final PUT's output.checksum and bytesize match the trace
    failure_reason: str | None = None  # as GitLab stores it (unknown values: unknown_failure)
    told_canceled: bool = False  # a request of its runner got 403 with Job-Status: canceled
    offered_to: str | None = None  # system_id the 201 went to
    runner_features: dict[str, Any] = field(default_factory=dict)  # what that runner announced
    depends_on: list[FakeJob] = field(default_factory=list, repr=False)


class FakeGitLab:
    """``with FakeGitLab(repo) as gitlab: job = gitlab.add_job(["make test"])``."""

    def __init__(self, repo: Path, project_path: str = "group/project",
                 runner_token: str = "glrt-fake-runner-0123456789", long_poll: float = 2.0,
                 trace_interval: int = 1) -> None:
        self.project_path = project_path
        self.runner_token = runner_token
        self.runner_id = 1  # gitlab-runner refuses a verify answer with id 0
        self.long_poll = long_poll
        self.trace_interval = trace_interval
        self.requests: list[Recorded] = []
        self.jobs: dict[int, FakeJob] = {}
        self.cond = threading.Condition()  # the one lock around all state
        self.last_update = uuid.uuid4().hex  # opaque; changes whenever a job is added
        # fault injection, each consumed once
        self.conflict_next_commit = False
        self.trace_416_once: set[int] = set()
        self.put_202_times: dict[int, int] = {}
        self.put_412_once: set[int] = set()
        self.verify_calls: list[dict[str, Any]] = []
        self.token_expires_in: float | None = None
        self.forgotten_managers: list[str] = []  # system_ids of DELETE /runners/managers
        self.personal_token = "glpat-fake-personal-0123456789"  # for /user, /user/runners
        self.created_runners: list[dict[str, Any]] = []  # bodies of POST /user/runners
        self._next_id = 1000  # job ids from 1001, as in the fixture
        self._closing = False
        self._dir = tempfile.TemporaryDirectory(prefix="kci-fake-gitlab-")
        self.git = GitServer(repo, Path(self._dir.name), project_path)
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def start(self) -> None:
        # a short poll interval: stop() waits for the serving loop to notice, once per test
        threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True,
                         name="fake-gitlab").start()

    def stop(self) -> None:
        with self.cond:  # long polls in hand answer now
            self._closing = True
            self.cond.notify_all()
        self.server.shutdown()
        self.server.server_close()
        self._dir.cleanup()

    def __enter__(self) -> FakeGitLab:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- what tests do ----------------------------------------------------------------------
    def add_job(self, script: list[str], after_script: list[str] | None = None, *,
                name: str = "test", stage: str = "test",
                variables: list[dict[str, Any]] | None = None,
                artifacts: list[dict[str, Any]] | None = None,
                cache: list[dict[str, Any]] | None = None,
                dependencies: list[FakeJob] | None = None, timeout: int = 3600,
                requires: set[str] | None = None, ref: str = "main", sha: str | None = None,
                **extra: Any) -> FakeJob:
        """Queue a job. ``script`` is the script step (before_script already folded in, as
        GitLab does); ``extra`` keys go into the payload as they are (e.g. hooks, image)."""
        self.git.refresh()
        sha = self.git.sha(sha or ref)
        with self.cond:
            job_id = self._next_id = self._next_id + 1
        job = FakeJob(job_id, f"glcbt-fake{secrets.token_hex(16)}", {}, set(requires or ()),
                      depends_on=list(dependencies or ()))
        self.git.pipeline_ref(job_id, sha)
        repo_url = (f"http://gitlab-ci-token:{job.token}@{self.url.removeprefix('http://')}/"
                    f"{self.project_path}.git")
        predefined = {"CI_JOB_ID": str(job_id), "CI_JOB_TOKEN": job.token, "CI_JOB_NAME": name,
                      "CI_JOB_STAGE": stage, "CI_PROJECT_ID": str(PROJECT_ID),
                      "CI_PROJECT_PATH": self.project_path, "CI_SERVER_URL": self.url,
                      "CI_REPOSITORY_URL": repo_url, "CI_COMMIT_SHA": sha,
                      "CI_COMMIT_REF_NAME": ref, "CI_PIPELINE_ID": str(job_id)}
        secret = ("CI_JOB_TOKEN", "CI_REPOSITORY_URL")  # both carry the job token
        steps = [{"name": "script", "script": script, "timeout": timeout, "when": "on_success",
                  "allow_failure": False}]
        if after_script:
            steps.append({"name": "after_script", "script": after_script, "timeout": timeout,
                          "when": "always", "allow_failure": True})
        job.payload = {
            "id": job_id, "token": job.token, "allow_git_fetch": True,
            "job_info": {"id": job_id, "name": name, "stage": stage, "project_id": PROJECT_ID,
                         "project_name": self.project_path.rsplit("/", 1)[-1],
                         "project_full_path": self.project_path},
            "git_info": {"repo_url": repo_url, "ref": ref, "sha": sha, "before_sha": "0" * 40,
                         "ref_type": "branch",
                         "refspecs": [f"+{sha}:refs/pipelines/{job_id}",
                                      f"+refs/heads/{ref}:refs/remotes/origin/{ref}"],
                         "depth": 20},
            "runner_info": {"timeout": timeout},
            "variables": [{"key": k, "value": v, "public": k not in secret,
                           "masked": k == "CI_JOB_TOKEN"} for k, v in predefined.items()]
            + list(variables or []),
            "steps": steps, "artifacts": list(artifacts or []), "cache": list(cache or []),
            "credentials": [], "dependencies": [],
            "features": {"trace_sections": True, "token_mask_prefixes": ["glpat-", "gldt-"],
                         "failure_reasons": list(FAILURE_REASONS)},
            **extra,
        }
        with self.cond:
            self.jobs[job_id] = job
            self.last_update = uuid.uuid4().hex
            self.cond.notify_all()
        return job

    def job(self, job_id: int) -> FakeJob:
        with self.cond:
            return self.jobs[job_id]

    def cancel(self, job_id: int, graceful: bool = True) -> None:
        """A user's Cancel. A job no runner runs yet is canceled at once; a running one becomes
        canceling (after_script still runs) only if its runner announced cancel_gracefully
        (peers-research 1.2), else canceled (its runner aborts)."""
        with self.cond:
            job = self.jobs[job_id]
            if job.state in ("pending", "pending-commit"):
                job.state = "canceled"
            elif job.state == "running" and graceful and \
                    job.runner_features.get("cancel_gracefully") is True:
                job.state = "canceling"
            elif job.state in ON_RUNNER:
                job.state = "canceled"
            self.cond.notify_all()

    def wait_final(self, job_id: int, timeout: float) -> FakeJob:
        """Until the job is over as far as GitLab knows: a final PUT got 200, or it was
        canceled and its runner was told so (or it never had one), or it was dropped."""
        deadline = time.monotonic() + timeout
        with self.cond:
            job = self.jobs[job_id]
            while not (job.final is not None or job.failure_reason == "runner_unsupported"
                       or (job.state == "canceled"
                           and (job.told_canceled or job.handed_at is None))):
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"job {job_id} not final after {timeout}s: {job.state}")
                self.cond.wait(left)
            return job

    # -- the API ----------------------------------------------------------------------------
    def handle(self, rec: Recorded) -> Reply:
        if rec.path.startswith(f"/{self.project_path}.git/"):
            return self._git(rec)
        route = rec.path.removeprefix("/api/v4/") if rec.path.startswith("/api/v4/") else ""
        body = _json(rec.body) if "json" in rec.headers.get("content-type", "") else {}
        other = {("POST", "runners/verify"): self._verify,
                 ("POST", "runners/reset_authentication_token"): self._reset,
                 ("DELETE", "runners/managers"): self._forget_manager,
                 ("POST", "jobs/request"): self._request,
                 ("GET", "user"): self._user, ("POST", "user/runners"): self._user,
                 }.get((rec.method, route))
        if other is not None:
            return other(rec, body)
        match = re.fullmatch(r"jobs/(\d+)(/trace|/artifacts)?", route)
        job_call = {("PUT", ""): self._update, ("PATCH", "/trace"): self._trace,
                    ("POST", "/artifacts"): self._upload, ("GET", "/artifacts"): self._download,
                    }.get((rec.method, match.group(2) or "")) if match else None
        if match is None or job_call is None:
            return _error(404, "Not Found")
        with self.cond:
            job = self.jobs.get(int(match.group(1)))
            # the job token: the ``token`` param (body or query) first, then JOB-TOKEN
            token = body.get("token") or rec.query.get("token") or rec.headers.get("job-token")
            if job is None or token != job.token:  # not 404: GitLab wants the runner to abort
                return _error(403, "Forbidden")
            return job_call(job, rec, body)

    def _expires(self) -> str | None:
        if self.token_expires_in is None:
            return None  # as user_runners.201.json: a token that does not expire
        return time.strftime("%Y-%m-%dT%H:%M:%S.000Z",
                             time.gmtime(time.time() + self.token_expires_in))

    def _verify(self, rec: Recorded, body: dict[str, Any]) -> Reply:
        with self.cond:
            self.verify_calls.append(body)
            token = body.get("token")
            if not isinstance(token, str) or not token:
                return _error(400, "token is missing")
            if token.startswith("glrt-") and not body.get("system_id"):
                return _error(400, "system_id is missing")  # docs: required for glrt- tokens
            if token != self.runner_token:
                return _error(403, "Forbidden")
            return _reply(200, {"id": self.runner_id, "token": token,
                                "token_expires_at": self._expires()})

    def _reset(self, rec: Recorded, body: dict[str, Any]) -> Reply:
        with self.cond:
            if not body.get("token") or body["token"] != self.runner_token:
                return _error(403, "Forbidden")
            self.runner_token = f"glrt-fake-{secrets.token_hex(12)}"  # the old one is dead
            return _reply(201, {"token": self.runner_token, "token_expires_at": self._expires()})

    def _forget_manager(self, rec: Recorded, body: dict[str, Any]) -> Reply:
        with self.cond:
            if not body.get("token") or body["token"] != self.runner_token:
                return _error(403, "Forbidden")
            self.forgotten_managers.append(str(body.get("system_id", "")))
            return 204, {}, b""

    def _user(self, rec: Recorded, body: dict[str, Any]) -> Reply:
        """GET /user and POST /user/runners (docs api/users.md) with a PRIVATE-TOKEN; the new
        runner's token (shape of user_runners.201.json) becomes the runner token."""
        with self.cond:
            if rec.headers.get("private-token") != self.personal_token:
                return _error(401, "Unauthorized")
            if rec.method == "GET":
                return _reply(200, {"id": 1, "username": "fake-admin"})
            if body.get("runner_type") not in ("instance_type", "group_type", "project_type"):
                return _error(400, "runner_type does not have a valid value")
            self.created_runners.append(body)
            self.runner_token = f"glrt-fake-{secrets.token_hex(12)}"
            return _reply(201, {"id": self.runner_id, "token": self.runner_token,
                                "token_expires_at": self._expires()})

    def _request(self, rec: Recorded, body: dict[str, Any]) -> Reply:
        token = body.get("token")
        if not isinstance(token, str) or not token:
            return _error(400, "token is missing")
        info = body.get("info")
        features = info.get("features") if isinstance(info, dict) else None
        if not isinstance(features, dict) or not all(
                isinstance(v, bool) for v in features.values()):
            return _error(400, "info.features (booleans) is missing")
        system_id = body.get("system_id")
        if not isinstance(system_id, str) or not system_id:
            return _error(400, "system_id is missing")
        deadline = time.monotonic() + self.long_poll
        with self.cond:
            if token != self.runner_token or rec.headers.get("runner-token") != token:
                return _error(403, "Forbidden")
            while True:
                job = self._next_job(features)
                if job is not None:
                    return self._hand_out(job, system_id, features)
                left = deadline - time.monotonic()
                if left <= 0 or self._closing:
                    return 204, {"X-GitLab-Last-Update": self.last_update}, b""
                self.cond.wait(left)

    def _next_job(self, features: dict[str, Any]) -> FakeJob | None:
        for job in sorted(self.jobs.values(), key=lambda j: j.id):
            if job.state != "pending":
                continue
            if all(features.get(need) is True for need in job.requires):
                return job
            # Ci::RegisterJobService#assign_runner!: a job the runner cannot run is dropped
            job.state, job.failure_reason = "failed", "runner_unsupported"
            self.cond.notify_all()
        return None

    def _hand_out(self, job: FakeJob, system_id: str, features: dict[str, Any]) -> Reply:
        job.handed_at, job.offered_to = time.monotonic(), system_id
        job.runner_features = dict(features)
        # GitLab builds the payload when the job is picked: dependencies' artifacts as now
        job.payload["dependencies"] = [
            {"id": dep.id, "token": dep.token, "name": dep.payload["job_info"]["name"],
             **({"artifacts_file": {"filename": "artifacts.zip", "size": len(dep.artifact_zip)}}
                if dep.artifact_zip is not None else {})}
            for dep in job.depends_on]
        if features.get("two_phase_job_commit") is True:
            job.state = "pending-commit"  # until the runner's PUT state=running
        else:  # a legacy runner's job runs at once (two-phase commit doc, confirmation spec)
            job.state, job.runner_system_id = "running", system_id
        return 201, {"Content-Type": "application/json"}, json.dumps(job.payload).encode()

    def _not_running(self, job: FakeJob) -> Reply:
        if job.state == "canceled":
            job.told_canceled = True
            self.cond.notify_all()
        return _error(403, "Forbidden - Job is not running", {"Job-Status": job.state})

    def _update(self, job: FakeJob, rec: Recorded, body: dict[str, Any]) -> Reply:
        if not body.get("token"):
            return _error(400, "token is missing")  # PUT requires the token param
        state = body.get("state")
        if job.state == "pending-commit":  # UpdateBuildStateService#handle_runner_ack_workflow
            if state == "pending":
                return 200, {"Job-Status": "pending"}, b"200"  # keep-alive while preparing
            if state != "running":
                return _error(400, "Bad Request")
            if self.conflict_next_commit:  # another runner manager holds it
                self.conflict_next_commit = False
                job.state, job.runner_system_id = "running", ANOTHER_RUNNER
                self.cond.notify_all()
                return _error(409, "Conflict")
            job.state, job.runner_system_id = "running", job.offered_to
            self.cond.notify_all()
            return 200, {"Job-Status": "running"}, b"200"
        if job.state not in ON_RUNNER:
            return self._not_running(job)
        if state == "running":  # keep-alive / touch: tells a canceling runner to cancel
            return 200, {"Job-Status": job.state}, b"200"
        if state not in ("success", "failed"):
            return _error(400, "Bad Request")  # incl. pending on a running job
        sent = body.get("output")
        output: dict[str, Any] = sent if isinstance(sent, dict) else {}
        checksum = output.get("checksum") or body.get("checksum")
        if job.id in self.put_412_once:  # as if GitLab lost the live trace: resend it all
            self.put_412_once.discard(job.id)
            job.trace.clear()
            return _error(412, "Precondition Failed")
        if checksum and self.put_202_times.get(job.id, 0) > 0:  # 202 needs a checksum sent
            self.put_202_times[job.id] -= 1
            return 202, {"Job-Status": "running", "X-GitLab-Trace-Update-Interval": "1"}, b"202"
        job.checksum_ok = (checksum == f"crc32:{zlib.crc32(job.trace) & 0xffffffff:08x}"
                           and output.get("bytesize") == len(job.trace))
        job.final = body
        if state == "failed":
            reason = body.get("failure_reason")
            job.failure_reason = reason if reason in FAILURE_REASONS else "unknown_failure"
        # a job canceled gracefully ends as canceled, whatever its runner reports (in final)
        job.state = "canceled" if job.state == "canceling" else str(state)
        self.cond.notify_all()
        return 200, {"Job-Status": job.state}, b"200"

    def _trace(self, job: FakeJob, rec: Recorded, body: dict[str, Any]) -> Reply:
        if job.state not in ON_RUNNER:
            return self._not_running(job)
        span = rec.headers.get("content-range")
        if span is None:
            return _error(400, "Missing header Content-Range")
        start = re.match(r"(\d+)-\d+$", span)  # "<start>-<end>", no "bytes " prefix
        size = len(job.trace)
        if job.id in self.trace_416_once or start is None or int(start.group(1)) != size:
            self.trace_416_once.discard(job.id)
            return _error(416, "Range Not Satisfiable", {"Range": f"0-{size}"})
        job.trace += rec.body
        if rec.body and job.first_trace_at is None:
            job.first_trace_at = rec.at
        self.cond.notify_all()
        return 202, {"Range": f"0-{len(job.trace)}", "Job-Status": job.state,
                     "X-GitLab-Trace-Update-Interval": str(self.trace_interval)}, b""

    def _upload(self, job: FakeJob, rec: Recorded, body: dict[str, Any]) -> Reply:
        if job.state not in ON_RUNNER:
            return self._not_running(job)
        head = f"Content-Type: {rec.headers.get('content-type', '')}\r\n\r\n".encode()
        for part in email.parser.BytesParser().parsebytes(head + rec.body).walk():
            if part.get_param("name", header="content-disposition") != "file":
                continue
            data = part.get_payload(decode=True)
            upload = Upload(rec.query, part.get_filename() or "",
                            data if isinstance(data, bytes) else b"", part.get_content_type())
            job.artifacts.append(upload)
            if rec.query.get("artifact_type", "archive") == "archive":
                job.artifact_zip = upload.data
            return 201, {}, b"201"
        return _error(400, "file is missing")

    def _download(self, job: FakeJob, rec: Recorded, body: dict[str, Any]) -> Reply:
        # the token was checked against this job (a dependency's token); any state will do
        if job.artifact_zip is None:
            return _error(404, "Not Found")
        return 200, {"Content-Type": "application/zip"}, job.artifact_zip

    def _git(self, rec: Recorded) -> Reply:
        auth = rec.headers.get("authorization", "")
        user, password = "", ""
        if auth.startswith("Basic "):
            with contextlib.suppress(ValueError):  # not base64 / not UTF-8: no credentials
                user, _, password = base64.b64decode(auth[6:]).decode().partition(":")
        with self.cond:  # GitLab takes a job token for git only while the job runs
            allowed = user == "gitlab-ci-token" and any(
                j.token == password and j.state in ON_RUNNER for j in self.jobs.values())
        if not allowed:
            return 401, {"WWW-Authenticate": 'Basic realm="GitLab"'}, b"HTTP Basic: Access denied"
        if "git-receive-pack" in rec.path or rec.query.get("service") == "git-receive-pack":
            return _error(403, "Forbidden")  # a job token cannot push
        return self.git.serve(rec.method, rec.path, urlencode(rec.query), rec.headers, rec.body,
                              user)


def _reply(status: int, value: Any, headers: dict[str, str] | None = None) -> Reply:
    return status, {"Content-Type": "application/json", **(headers or {})}, \
        json.dumps(value).encode()


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> Reply:
    return _reply(status, {"message": f"{status} {message}"}, headers)


def _json(body: bytes) -> dict[str, Any]:
    try:
        value = json.loads(body or b"{}")
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def _handler(fake: FakeGitLab) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as clients expect of GitLab

        def _serve(self) -> None:
            at = time.monotonic()
            parts = urlsplit(self.path)
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                body = _read_chunked(self.rfile)  # git and streamed artifact uploads
            else:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            rec = Recorded(self.command, parts.path,
                           dict(parse_qsl(parts.query, keep_blank_values=True)),
                           {k.lower(): v for k, v in self.headers.items()}, body, at=at)
            with fake.cond:
                fake.requests.append(rec)
            try:
                status, headers, payload = fake.handle(rec)
            except Exception as exc:  # a bug in the fake: tell the test, do not hang it
                status, headers, payload = 500, {}, repr(exc).encode()
            rec.status = status
            try:
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                if status != 204:  # 204 has no body, hence no length
                    self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                if status != 204:
                    self.wfile.write(payload)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client went away mid-request (e.g. a runner killed by a test)

        do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _serve

        def log_message(self, format: str, *args: Any) -> None:
            pass

    return Handler


def _read_chunked(stream: io.BufferedIOBase) -> bytes:
    out = bytearray()
    while size := int(stream.readline().split(b";")[0].strip() or b"0", 16):
        out += stream.read(size)
        stream.readline()
    while stream.readline().strip():  # trailers, up to the blank line
        pass
    return bytes(out)
