"""A contract FAKE of GitHub (REST API, job hand-out and workflow_job webhooks), not GitHub:
what kata-ci's GitHub runner provider talks to in tests, since GitHub cannot be reached here.

Built from the documented contract: tests/fixtures/github/ (REST examples and INDEX.json from
github/rest-api-description, webhook payloads from octokit/webhooks; PROVENANCE.md) and the
research notes (peers-research.md, section 2). Served over plain HTTP:

- REST, with an installation token (``Authorization: token|Bearer <token>``, else 401):
  JIT configs, runners (list, get, delete), registration/remove tokens and runner groups, for
  the org and its repositories; workflow runs and jobs of a repository. The App's installation
  token from ``POST /app/installations/{id}/access_tokens`` with an RS256 JWT (PyJWT).
- ``/_fake_actions/``: a FAKE protocol of our own, standing in for GitHub's internal Actions
  service that the real runner speaks (which is not public): ``sessions`` (long poll for a
  job), ``jobs/{id}/logs``, ``jobs/{id}/complete``, each with ``Authorization: Bearer <the
  runner's secret>`` from its JIT config. The FAKE actions runner
  (tests/fakes/actions_runner.py) speaks it.
- webhooks: every job state change as a signed ``workflow_job`` delivery (github_hooks.py).
Shapes and records are in github_payloads.py, the HTTP plumbing in github_http.py.

GitHub's rules kept: a job goes to any idle runner whose labels include all of the job's
(oldest queued job first): a runner made for job A may take job B. A JIT runner takes one job
and GitHub removes it afterwards. A busy runner cannot be deleted (422). Simplifications: one
job per workflow run; repositories of the org share its runners; ``runner_group_id`` needs a
known group but groups restrict nothing. Every request is recorded in ``requests``.
"""

from __future__ import annotations

import json
import re
import secrets
import socket
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from http.server import ThreadingHTTPServer

from tests.fakes.github_hooks import Hooks, post, sign
from tests.fakes.github_http import Reply, check_app_jwt, make_handler, msg, parse_json, reply
from tests.fakes.github_payloads import (
    CONCLUSIONS,
    Delivery,
    FakeJob,
    FakeRunner,
    Labels,
    Recorded,
    expiry,
    jit_config,
    job_json,
    page,
    run_json,
    runner_json,
    runner_labels,
    token,
    webhook_body,
)

__all__ = ["Delivery", "FakeGitHub", "FakeJob", "FakeRunner", "Recorded"]
SCOPED = re.compile(r"/(?:orgs/(?P<org>[^/]+)|repos/(?P<repo>[^/]+/[^/]+))/actions/(?P<rest>.+)")


class FakeGitHub:
    """``fake = FakeGitHub(); fake.start(); job = fake.queue_job()``; ``fake.url`` is the
    base_url for PyGithub."""

    def __init__(self, *, org: str = "octo-org", repos: Sequence[str] = ("octo-org/hello-world",),
                 token: str = "ghs_fake_installation_token", webhook_url: str | None = None,
                 webhook_secret: str = "", sock: socket.socket | None = None,
                 guest_url: str | None = None, long_poll: float = 5.0,
                 app_id: int | None = None, app_public_key: bytes | None = None,
                 installation_id: int = 4242) -> None:
        self.org, self.repos, self.token = org, list(repos), token
        self.webhook_url, self.webhook_secret = webhook_url, webhook_secret
        self.long_poll = long_poll
        self.app_id, self.app_public_key = app_id, app_public_key
        self.installation_id = installation_id
        self.cond = threading.Condition()  # the one lock around all state
        self.requests: list[Recorded] = []
        self.runners: dict[int, FakeRunner] = {}
        self.jobs: dict[int, FakeJob] = {}
        self.groups: dict[int, str] = {1: "Default"}
        self.deleted_runners: list[str] = []  # names, deleted through the REST API
        self.removed_by_github: list[str] = []  # names, removed after their one job
        self.jit_configs: list[str] = []  # every encoded_jit_config handed out
        self.deliveries: list[Delivery] = []
        self.rate_used = 0
        self.labels = Labels()
        self._next_runner, self._next_job, self._next_run = 100, 1_000_000_000, 2_000_000_000
        self._closing = False
        self.hooks = Hooks(webhook_url, webhook_secret, app_id, self.deliveries, self.cond)
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), make_handler(self),
                                          bind_and_activate=sock is None)
        if sock is not None:  # bound elsewhere (another network namespace): serve on it
            self.server.socket.close()
            self.server.socket = sock
            self.server.server_address = sock.getsockname()[:2]
            self.server.server_activate()
        self.server.daemon_threads = True
        host, port = self.server.server_address[:2]
        self.url = f"http://{host!s}:{port}"
        self.guest_url = guest_url or self.url

    def start(self) -> None:
        threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True,
                         name="fake-github").start()
        self.hooks.start()

    def stop(self) -> None:
        with self.cond:  # long polls in hand answer now
            self._closing = True
            self.cond.notify_all()
        self.server.shutdown()
        self.server.server_close()
        self.hooks.stop()

    def __enter__(self) -> FakeGitHub:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- what tests do ----------------------------------------------------------------------
    def queue_job(self, repo: str | None = None,
                  labels: Sequence[str] = ("self-hosted", "kata-ci"),
                  steps: Sequence[Mapping[str, str]] = ({"name": "hello", "run": "echo hello"},),
                  name: str = "build", deliver: bool = True,
                  env: Mapping[str, str] | None = None) -> FakeJob:
        """A new workflow run with one queued job; its ``queued`` webhook is sent unless
        ``deliver`` is False (a lost webhook)."""
        repo = repo or self.repos[0]
        if repo not in self.repos:
            raise ValueError(f"{repo} is not one of the fake's repositories")
        with self.cond:
            self._next_job += 1
            self._next_run += 1
            job = FakeJob(self._next_job, self._next_run, repo, list(labels), name,
                          [dict(step) for step in steps], {})
            job.env = {"GITHUB_SHA": job.head_sha, "GITHUB_REF": f"refs/heads/{job.head_branch}",
                       "GITHUB_REF_NAME": job.head_branch, "GITHUB_WORKFLOW": job.workflow_name,
                       "GITHUB_RUN_ATTEMPT": "1", "GITHUB_SERVER_URL": self.guest_url,
                       "GITHUB_API_URL": self.guest_url, **(env or {})}
            self.jobs[job.id] = job
            if deliver:
                self._tell("queued", job)
            self.cond.notify_all()
            return job

    def cancel_job(self, job_id: int) -> None:
        """A user cancels a job no runner has taken yet: completed, cancelled."""
        with self.cond:
            job = self.jobs[job_id]
            if job.status != "queued":
                raise ValueError(f"job {job_id} is {job.status}, not queued")
            job.status, job.conclusion, job.completed_at = "completed", "cancelled", time.time()
            self._tell("completed", job)
            self.cond.notify_all()

    def add_runner_group(self, group_id: int, name: str) -> None:
        with self.cond:
            self.groups[group_id] = name

    def sign(self, body: bytes) -> str:
        """``sha256=<hex>``: the X-Hub-Signature-256 GitHub would send for ``body``."""
        return sign(self.webhook_secret, body)

    def deliver_raw(self, body: bytes, headers: Mapping[str, str]) -> int:
        """POST arbitrary bytes and headers to the webhook URL; the receiver's status."""
        if self.webhook_url is None:
            raise ValueError("no webhook_url")
        return post(self.webhook_url, body, headers)

    def redeliver(self, guid: str) -> Delivery:
        """GitHub's manual redelivery of a delivery: same body, same X-GitHub-Delivery."""
        return self.hooks.redeliver(guid)

    def wait_for(self, predicate: Callable[[], bool], timeout: float) -> bool:
        """Until ``predicate()`` (called with the fake's lock held) is true; False after
        ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        with self.cond:
            while not predicate():
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self.cond.wait(min(left, 0.2))
            return True

    def _tell(self, action: str, job: FakeJob) -> None:
        self.hooks.enqueue(action, job.id, webhook_body(action, job, self.url,
                                                        self.installation_id))

    # -- REST -------------------------------------------------------------------------------
    def handle(self, rec: Recorded) -> Reply:
        if rec.path.startswith("/_fake_actions/"):
            return self._actions(rec)
        if re.fullmatch(r"/app/installations/\d+/access_tokens", rec.path):
            return self._access_token(rec)
        auth = rec.headers.get("authorization", "")
        scheme, _, given = auth.partition(" ")
        if scheme.lower() not in ("token", "bearer") or not secrets.compare_digest(
                given.strip().encode(), self.token.encode()):
            return msg(401, "Bad credentials")
        match = SCOPED.fullmatch(rec.path)
        if match is None:
            return msg(404, "Not Found")
        org, repo, rest = match["org"], match["repo"], match["rest"]
        if (org is not None and org != self.org) or (repo is not None
                                                     and repo not in self.repos):
            return msg(404, "Not Found")
        scope = f"org:{org}" if org is not None else f"repo:{repo}"
        api = f"http://{rec.headers.get('host') or self.url.removeprefix('http://')}"
        routes: list[tuple[str, str, Callable[..., Reply]]] = [
            ("POST", r"runners/generate-jitconfig", self._jit),
            ("GET", r"runners", self._list_runners),
            ("GET", r"runners/(\d+)", self._get_runner),
            ("DELETE", r"runners/(\d+)", self._delete_runner),
            ("POST", r"runners/(registration|remove)-token", self._runner_token),
        ]
        routes += [("GET", r"runner-groups", self._groups)] if org else [
            ("GET", r"runs", self._runs), ("GET", r"runs/(\d+)", self._run),
            ("GET", r"runs/(\d+)/jobs", self._run_jobs), ("GET", r"jobs/(\d+)", self._job)]
        for method, pattern, call in routes:
            found = re.fullmatch(pattern, rest)
            if found and method == rec.method:
                with self.cond:
                    return call(rec, scope, api, *found.groups())
        return msg(404, "Not Found")

    def _jit(self, rec: Recorded, scope: str, api: str) -> Reply:
        body = parse_json(rec.body)
        if body is None:
            return msg(400, "Problems parsing JSON")
        name, group, labels = body.get("name"), body.get("runner_group_id"), body.get("labels")
        folder = body.get("work_folder", "_work")
        for key, ok in (("name", isinstance(name, str) and name.strip() != ""),
                        ("runner_group_id", isinstance(group, int)
                         and not isinstance(group, bool)),
                        ("labels", isinstance(labels, list) and 1 <= len(labels) <= 100
                         and all(isinstance(x, str) and x.strip() for x in labels)),
                        ("work_folder", isinstance(folder, str) and folder != "")):
            if not ok and key not in body:
                return msg(422, f'Invalid request.\n\n"{key}" wasn\'t supplied.')
            if not ok:
                return msg(422, f"Invalid request.\n\nInvalid property /{key}: "
                            f"{json.dumps(body[key])[:100]} is not valid.")
        assert isinstance(name, str) and isinstance(group, int) and isinstance(labels, list)
        if group not in self.groups:
            return msg(422, f"Invalid request.\n\nRunner group {group} does not exist.")
        if any(r.name.lower() == name.lower() and r.scope == scope  # unique in its pool
               for r in self.runners.values()):
            return msg(409, f"Already exists - A runner with the name {name} already exists.")
        self._next_runner += 1
        runner = FakeRunner(self._next_runner, name, runner_labels(labels), scope,
                            secrets.token_urlsafe(32), group, self.groups[group], str(folder))
        self.runners[runner.id] = runner
        encoded = jit_config(runner, self.guest_url)
        self.jit_configs.append(encoded)
        self.cond.notify_all()
        return reply(201, {"runner": runner_json(runner, self.labels, listed=False),
                            "encoded_jit_config": encoded})

    def _list_runners(self, rec: Recorded, scope: str, api: str) -> Reply:
        mine = [r for _, r in sorted(self.runners.items()) if r.scope == scope
                and ("name" not in rec.query or r.name == rec.query["name"])]
        shown, link = page(mine, rec.query, f"{api}{rec.path}")
        return reply(200, {"total_count": len(mine),
                            "runners": [runner_json(r, self.labels) for r in shown]}, link)

    def _runner(self, scope: str, runner_id: str) -> FakeRunner | None:
        runner = self.runners.get(int(runner_id))
        return runner if runner is not None and runner.scope == scope else None

    def _get_runner(self, rec: Recorded, scope: str, api: str, runner_id: str) -> Reply:
        runner = self._runner(scope, runner_id)
        if runner is None:
            return msg(404, "Not Found")
        return reply(200, runner_json(runner, self.labels))

    def _delete_runner(self, rec: Recorded, scope: str, api: str, runner_id: str) -> Reply:
        runner = self._runner(scope, runner_id)
        if runner is None:
            return msg(404, "Not Found")
        if runner.busy:
            return msg(422, f'Bad request - Runner "{runner.name}" is still running a job"')
        del self.runners[runner.id]
        runner.status = "offline"
        self.deleted_runners.append(runner.name)
        self.cond.notify_all()  # its long poll, if any, ends
        return 204, {}, b""

    def _runner_token(self, rec: Recorded, scope: str, api: str, kind: str) -> Reply:
        return reply(201, {"token": token("AA" if kind == "remove" else ""),
                            "expires_at": expiry(3600)})

    def _groups(self, rec: Recorded, scope: str, api: str) -> Reply:
        groups = [{"id": gid, "name": name, "visibility": "all", "default": gid == 1,
                   "runners_url": f"{api}/orgs/{self.org}/actions/runner-groups/{gid}/runners",
                   "inherited": False, "allows_public_repositories": False,
                   "restricted_to_workflows": False, "selected_workflows": [],
                   "workflow_restrictions_read_only": False}
                  for gid, name in sorted(self.groups.items())]
        shown, link = page(groups, rec.query, f"{api}{rec.path}")
        return reply(200, {"total_count": len(groups), "runner_groups": shown}, link)

    def _runs(self, rec: Recorded, scope: str, api: str) -> Reply:
        want = rec.query.get("status")
        runs = [job for _, job in sorted(self.jobs.items(), reverse=True)  # newest first
                if f"repo:{job.repo}" == scope
                and want in (None, job.status, job.conclusion)]
        shown, link = page(runs, rec.query, f"{api}{rec.path}")
        return reply(200, {"total_count": len(runs),
                            "workflow_runs": [run_json(job, api) for job in shown]}, link)

    def _by_run(self, scope: str, run_id: str) -> FakeJob | None:
        return next((j for j in self.jobs.values()
                     if j.run_id == int(run_id) and f"repo:{j.repo}" == scope), None)

    def _run(self, rec: Recorded, scope: str, api: str, run_id: str) -> Reply:
        job = self._by_run(scope, run_id)
        return msg(404, "Not Found") if job is None else reply(200, run_json(job, api))

    def _run_jobs(self, rec: Recorded, scope: str, api: str, run_id: str) -> Reply:
        job = self._by_run(scope, run_id)  # ``filter`` (latest|all): one attempt, one job
        if job is None:
            return msg(404, "Not Found")
        return reply(200, {"total_count": 1, "jobs": [job_json(job, api)]})

    def _job(self, rec: Recorded, scope: str, api: str, job_id: str) -> Reply:
        job = self.jobs.get(int(job_id))
        if job is None or f"repo:{job.repo}" != scope:
            return msg(404, "Not Found")
        return reply(200, job_json(job, api))

    def _access_token(self, rec: Recorded) -> Reply:
        """The App's installation token, for a JWT signed with the App's key."""
        if self.app_id is None or self.app_public_key is None:
            return msg(404, "Not Found")
        refused = check_app_jwt(rec.headers.get("authorization", ""), self.app_public_key,
                                self.app_id)
        if refused is not None:
            return msg(401, refused)
        if rec.path != f"/app/installations/{self.installation_id}/access_tokens":
            return msg(404, "Not Found")
        return reply(201, {"token": self.token, "expires_at": time.strftime(
            "%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + 3600)),
            "permissions": {"organization_self_hosted_runners": "write",
                            "administration": "write", "actions": "read", "metadata": "read"},
            "repository_selection": "all"})

    # -- the FAKE job hand-out protocol (/_fake_actions/) -----------------------------------
    def _actions(self, rec: Recorded) -> Reply:
        scheme, _, given = rec.headers.get("authorization", "").partition(" ")
        with self.cond:
            runner = next((r for r in self.runners.values() if scheme.lower() == "bearer"
                           and secrets.compare_digest(r.secret.encode(),
                                                      given.strip().encode())), None)
            if runner is None:
                return msg(401, "Bad credentials (no such runner: deleted or removed?)")
            if rec.method == "POST" and rec.path == "/_fake_actions/sessions":
                return self._session(rec, runner)
            found = re.fullmatch(r"/_fake_actions/jobs/(\d+)/(logs|complete)", rec.path)
            job = self.jobs.get(int(found[1])) if found and rec.method == "POST" else None
            if found is None or job is None or job.runner_id != runner.id:
                return msg(404, "Not Found")
            if job.status != "in_progress":
                return msg(409, f"job {job.id} is {job.status}")
            if found[2] == "logs":
                job.log.extend(rec.body.decode(errors="replace").splitlines())
                self.cond.notify_all()
                return 204, {}, b""
            conclusion = (parse_json(rec.body) or {}).get("conclusion")
            if conclusion not in CONCLUSIONS:
                return msg(422, f"conclusion must be one of {', '.join(CONCLUSIONS)}")
            job.status, job.conclusion, job.completed_at = "completed", conclusion, time.time()
            self._tell("completed", job)
            runner.busy, runner.status = False, "offline"
            self.runners.pop(runner.id, None)  # a JIT runner is gone after its one job
            self.removed_by_github.append(runner.name)
            self.cond.notify_all()
            return reply(200, {"id": job.id, "status": job.status,
                                "conclusion": job.conclusion})

    def _session(self, rec: Recorded, runner: FakeRunner) -> Reply:
        """Long poll for a job (lock held): the oldest queued job the runner can take."""
        if runner.got_job is not None:
            return msg(409, f"runner {runner.name} already ran job {runner.got_job} "
                        "(a JIT runner takes one job)")
        hello = parse_json(rec.body) or {}
        runner.status, runner.os = "online", "linux"
        runner.version = str(hello.get("version", runner.version))
        self.cond.notify_all()
        deadline = time.monotonic() + self.long_poll
        while True:
            if self.runners.get(runner.id) is not runner:
                return msg(401, "Bad credentials (the runner was deleted)")
            job = self._match(runner)
            if job is not None:
                break
            left = deadline - time.monotonic()
            if left <= 0 or self._closing:
                return 204, {}, b""
            self.cond.wait(left)
        job.status, job.started_at = "in_progress", time.time()
        job.runner_id, job.runner_name = runner.id, runner.name
        job.runner_group_id, job.runner_group_name = runner.group_id, runner.group_name
        runner.busy, runner.got_job = True, job.id
        self._tell("in_progress", job)
        self.cond.notify_all()
        return reply(200, {"job": {"id": job.id, "run_id": job.run_id, "name": job.name,
                                    "repository": job.repo, "steps": job.steps,
                                    "env": job.env}})

    def _match(self, runner: FakeRunner) -> FakeJob | None:
        has = {label.lower() for label in runner.labels}
        kind, _, where = runner.scope.partition(":")
        for _, job in sorted(self.jobs.items()):
            if job.status == "queued" and all(x.lower() in has for x in job.labels) and (
                    job.repo == where if kind == "repo" else job.repo.split("/")[0] == where):
                return job
        return None
