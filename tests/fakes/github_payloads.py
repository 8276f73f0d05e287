"""The data and the JSON shapes of the contract FAKE of GitHub (tests/fakes/github.py), not
GitHub: its records (runners, jobs, webhook deliveries, requests) and every body it answers or
sends, each built on the shape of GitHub's own examples in tests/fixtures/github/ (see
PROVENANCE.md there): REST responses from github/rest-api-description, workflow_job webhook
payloads from octokit/webhooks. A payload keeps every key of its fixture; only the values that
describe this fake's job, runner and repository are substituted.

The JIT config is the real one's three-file structure (.runner, .credentials,
.credentials_rsaparams, each base64 JSON, the whole base64 JSON). Its contents are the fake's:
the runner's secret for the fake's job hand-out protocol (/_fake_actions/) is kept in the
rsaparams file, where the real runner keeps its RSA key.
"""

from __future__ import annotations

import base64
import copy
import json
import secrets
import string
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "github"
READ_ONLY = ("self-hosted", "Linux", "X64")  # the labels GitHub gives a Linux x64 runner
# label ids as in the fixtures (self-hosted 5, X64 7, Linux 11); custom labels get new ones
LABEL_IDS = {"self-hosted": 5, "x64": 7, "linux": 11}
CONCLUSIONS = ("success", "failure", "cancelled")


def fixture(name: str) -> Any:
    """A fixture as JSON: ``rest/<name>`` or ``webhooks/<name>``."""
    return json.loads((FIXTURES / name).read_text())


WEBHOOKS = {action: fixture(f"webhooks/workflow_job.{name}.payload.json") for action, name in (
    ("queued", "queued"), ("in_progress", "in_progress"),
    ("completed", "completed.success.with-organization"),
    ("completed/failure", "completed.failure.with-organization"))}


@dataclass
class Recorded:
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]  # names lower-cased
    body: bytes
    status: int = 0  # what the fake answered (0 while the request is still in hand)
    at: float = 0.0  # time.monotonic() when received


@dataclass(eq=False)
class FakeRunner:
    """A self-hosted runner registered at the fake GitHub through a JIT config."""

    id: int
    name: str
    labels: list[str]  # every label: the read-only ones first, then the custom ones
    scope: str  # "org:<org>" or "repo:<owner>/<repo>": where it was registered
    secret: str  # what its runner presents on /_fake_actions/ (in .credentials_rsaparams)
    group_id: int = 1
    group_name: str = "Default"
    work_folder: str = "_work"
    status: str = "offline"  # online once its runner opened a session
    busy: bool = False  # while it runs a job
    os: str = "unknown"  # as the JIT answer says; "linux" once its runner connected
    version: str = ""  # what its runner said when it connected
    created_at: float = field(default_factory=time.time)
    got_job: int | None = None  # the id of the one job it was given (JIT: one job)


@dataclass(eq=False)
class FakeJob:
    """A workflow job at the fake GitHub; each is alone in a workflow run of its own."""

    id: int
    run_id: int
    repo: str  # owner/name
    labels: list[str]  # runs-on
    name: str
    steps: list[dict[str, str]]  # {"name", "run"}
    env: dict[str, str]
    workflow_name: str = "CI"
    head_sha: str = field(default_factory=lambda: secrets.token_hex(20))
    head_branch: str = "main"
    status: str = "queued"  # queued | in_progress | completed
    conclusion: str | None = None  # success | failure | cancelled once completed
    runner_id: int | None = None
    runner_name: str | None = None
    runner_group_id: int | None = None
    runner_group_name: str | None = None
    created_at: float = field(default_factory=time.time)
    started_at: float | None = None
    completed_at: float | None = None
    log: list[str] = field(default_factory=list)  # lines its runner posted


@dataclass
class Delivery:
    """One webhook delivery attempt (a manual redelivery is one more, with the same guid)."""

    guid: str
    action: str
    job_id: int | None  # None for deliver_raw
    body: bytes
    headers: dict[str, str]
    status: int | None = None  # the receiver's HTTP status
    error: str | None = None  # why there was none (connection refused, timeout, ...)
    redelivery: bool = False
    at: float = field(default_factory=time.time)


def iso(at: float | None) -> str | None:
    """GitHub's timestamps: ``2021-09-13T02:21:13Z``."""
    return None if at is None else time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(at))


def token(prefix: str = "") -> str:
    """A registration/remove token shaped like the fixtures' (29 upper-case alphanumerics)."""
    alphabet = string.ascii_uppercase + string.digits
    return prefix + "".join(secrets.choice(alphabet) for _ in range(29 - len(prefix)))


def expiry(seconds: float) -> str:
    """``expires_at`` as the fixtures write it, with milliseconds and an offset."""
    return time.strftime("%Y-%m-%dT%H:%M:%S.000+00:00", time.gmtime(time.time() + seconds))


class Labels:
    """Label ids: stable per name (case-insensitive, as GitHub compares labels)."""

    def __init__(self) -> None:
        self.ids = dict(LABEL_IDS)
        self.next_id = 20

    def id(self, name: str) -> int:
        if name.lower() not in self.ids:
            self.next_id += 1
            self.ids[name.lower()] = self.next_id
        return self.ids[name.lower()]


def runner_labels(custom: list[str]) -> list[str]:
    """What a JIT runner registered with ``custom`` labels carries: the read-only labels, then
    the others (a name that is already there, in any case, once)."""
    out = list(READ_ONLY)
    for name in custom:
        if name.lower() not in {label.lower() for label in out}:
            out.append(name)
    return out


def runner_json(runner: FakeRunner, ids: Labels, *, listed: bool = True) -> dict[str, Any]:
    """A runner as the list/get endpoints show it (``listed``), or as the JIT answer does
    (without ``ephemeral`` and ``version``, as the fixture)."""
    labels = [{"id": ids.id(name), "name": name,
               "type": "read-only" if name in READ_ONLY else "custom"} for name in runner.labels]
    out: dict[str, Any] = {"id": runner.id, "name": runner.name, "os": runner.os,
                           "status": runner.status, "busy": runner.busy}
    if listed:
        out.update(ephemeral=True, version=runner.version)
    out["labels"] = labels
    return out


def _b64(value: Any) -> str:
    return base64.b64encode(json.dumps(value).encode()).decode()


def jit_config(runner: FakeRunner, guest_url: str) -> str:
    """The encoded_jit_config: base64 JSON of the runner's three config files."""
    where = runner.scope.partition(":")[2]
    files = {
        ".runner": _b64({"agentId": runner.id, "agentName": runner.name,
                         "poolId": runner.group_id, "poolName": runner.group_name,
                         "serverUrl": guest_url, "gitHubUrl": f"{guest_url}/{where}",
                         "workFolder": runner.work_folder, "ephemeral": True,
                         "disableUpdate": True}),
        ".credentials": _b64({"scheme": "OAuth", "data": {
            "clientId": str(uuid.uuid4()),
            "authorizationUrl": f"{guest_url}/_fake_actions/token"}}),
        ".credentials_rsaparams": _b64({"secret": runner.secret}),
    }
    return _b64(files)


def job_json(job: FakeJob, api: str) -> dict[str, Any]:
    """A workflow job as the REST API and the webhook's ``workflow_job`` show it: the keys of
    the fixture, the values of this job. Per-step results are the job's (the fake runner only
    reports the job's conclusion)."""
    out: dict[str, Any] = copy.deepcopy(WEBHOOKS["queued"]["workflow_job"])
    repo_api = f"{api}/repos/{job.repo}"
    steps = [] if job.status == "queued" else [
        {"name": step["name"], "status": job.status, "conclusion": job.conclusion,
         "number": number, "started_at": iso(job.started_at),
         "completed_at": iso(job.completed_at)}
        for number, step in enumerate(job.steps, 1)]
    out.update(
        id=job.id, run_id=job.run_id, run_url=f"{repo_api}/actions/runs/{job.run_id}",
        node_id=base64.b64encode(f"CR_{job.id}".encode()).decode(), head_sha=job.head_sha,
        head_branch=job.head_branch, url=f"{repo_api}/actions/jobs/{job.id}",
        html_url=f"https://github.com/{job.repo}/actions/runs/{job.run_id}/job/{job.id}",
        status=job.status, conclusion=job.conclusion, started_at=iso(job.started_at or
                                                                     job.created_at),
        created_at=iso(job.created_at), completed_at=iso(job.completed_at), name=job.name,
        steps=steps, check_run_url=f"{repo_api}/check-runs/{job.id}", labels=list(job.labels),
        runner_id=job.runner_id, runner_name=job.runner_name,
        runner_group_id=job.runner_group_id, runner_group_name=job.runner_group_name,
        workflow_name=job.workflow_name)
    return out


def run_json(job: FakeJob, api: str) -> dict[str, Any]:
    """The job's workflow run, as GET /repos/{owner}/{repo}/actions/runs lists it."""
    owner, name = job.repo.split("/", 1)
    run_api = f"{api}/repos/{job.repo}/actions/runs/{job.run_id}"
    return {
        "id": job.run_id, "name": job.workflow_name, "node_id": f"WFR_{job.run_id}",
        "head_branch": job.head_branch, "head_sha": job.head_sha,
        "path": ".github/workflows/ci.yml", "display_title": job.workflow_name,
        "run_number": job.run_id % 1000, "event": "push", "status": job.status,
        "conclusion": job.conclusion, "workflow_id": 1, "check_suite_id": job.run_id,
        "url": run_api, "html_url": f"https://github.com/{job.repo}/actions/runs/{job.run_id}",
        "jobs_url": f"{run_api}/jobs", "logs_url": f"{run_api}/logs",
        "cancel_url": f"{run_api}/cancel", "rerun_url": f"{run_api}/rerun",
        "workflow_url": f"{api}/repos/{job.repo}/actions/workflows/1",
        "created_at": iso(job.created_at), "updated_at": iso(job.completed_at or job.started_at
                                                             or job.created_at),
        "run_attempt": 1, "run_started_at": iso(job.created_at),
        "repository": {"id": 1, "name": name, "full_name": job.repo,
                       "owner": {"login": owner}, "url": f"{api}/repos/{job.repo}"},
    }


def webhook_body(action: str, job: FakeJob, api: str, installation_id: int) -> bytes:
    """The ``workflow_job`` webhook for ``action``: the fixture of that action with this job,
    its repository and the installation substituted."""
    key = "completed/failure" if job.conclusion == "failure" else action
    out = copy.deepcopy(WEBHOOKS[key])
    out["action"] = action
    out["workflow_job"] = {k: v for k, v in job_json(job, api).items()
                           if k in out["workflow_job"]}
    owner, name = job.repo.split("/", 1)
    out["repository"].update(full_name=job.repo, name=name)
    out["repository"]["owner"]["login"] = owner
    if "installation" in out:
        out["installation"]["id"] = installation_id
    if "organization" in out:
        out["organization"]["login"] = owner
    return json.dumps(out).encode()


def page(items: list[Any], query: dict[str, str], url: str) -> tuple[list[Any], dict[str, str]]:
    """GitHub's pagination: ``per_page`` (default 30, at most 100) and ``page`` (from 1); a
    Link header with next/last (and first/prev past the first page) when there is more."""
    def number(name: str, default: int) -> int:
        try:
            return max(1, int(query.get(name, default)))
        except ValueError:
            return default

    per_page, at = min(number("per_page", 30), 100), number("page", 1)
    last = max(1, -(-len(items) // per_page))
    links = {"first": 1, "prev": at - 1} if at > 1 else {}
    if at < last:
        links.update(next=at + 1, last=last)
    header = ", ".join(f'<{url}?{urlencode({**query, "per_page": per_page, "page": n})}>; '
                       f'rel="{rel}"' for rel, n in links.items())
    return items[(at - 1) * per_page: at * per_page], ({"Link": header} if header else {})
