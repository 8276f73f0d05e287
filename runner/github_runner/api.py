"""The GitHub REST calls kata-ci makes, through PyGithub (raw REST through its requester where
PyGithub has no method: the repository-level JIT config).

A scope is ``org:<org>`` (org-level runners) or ``repo:<owner>/<name>``. Credentials are a
GitHub App installation (PyGithub mints and renews the installation token) or a token; both
are read from files or the environment (settings.py) and never logged.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import requests
from github import Auth, Github, GithubException

from kata_ci.errors import SystemFailure, UserError
from kata_ci.runner.github_runner.settings import GitHubConfig

log = logging.getLogger("kata_ci.github")
TIMEOUT = 15


@dataclass(frozen=True)
class RunnerInfo:
    id: int
    name: str
    status: str  # online | offline
    busy: bool


@dataclass(frozen=True)
class QueuedJob:
    id: int
    repo: str
    labels: list[str]
    name: str
    workflow: str


class RunnerExists(SystemFailure):
    """GitHub already has a runner of this name (a JIT config made before a retry)."""


class GitHubAPI:
    def __init__(self, config: GitHubConfig) -> None:
        self.config = config
        # No client-side pacing (PyGithub waits 1 s between writes by default: a JIT config
        # is a write, on every job's critical path) and few retries: the caller retries.
        self.gh = Github(auth=_auth(config), base_url=config.api_url.rstrip("/"), lazy=True,
                         timeout=TIMEOUT, per_page=100, retry=2, seconds_between_requests=None,
                         seconds_between_writes=None)

    def _base(self, scope: str) -> Any:
        kind, _, name = scope.partition(":")
        if kind == "org":
            return self.gh.get_organization(name)
        if kind == "repo":
            return self.gh.get_repo(name)
        raise UserError(f"unknown runner scope {scope!r}")

    def jit_config(self, scope: str, name: str, labels: list[str],
                   work_folder: str = "_work") -> tuple[int, str]:
        """(runner id, encoded JIT config) for an ephemeral runner that takes one job."""
        base = self._base(scope)
        body = {"name": name, "runner_group_id": self.config.runner_group_id,
                "labels": labels, "work_folder": work_folder}
        try:
            _, data = base._requester.requestJsonAndCheck(
                "POST", f"{base.url}/actions/runners/generate-jitconfig", input=body)
        except GithubException as exc:
            if exc.status == 409:
                raise RunnerExists(f"GitHub already has a runner named {name}") from None
            raise SystemFailure(f"GitHub refused a JIT config for {scope}: "
                                f"{_why(exc)}") from None
        except requests.RequestException as exc:
            raise _unreachable(f"JIT config for {scope}", exc) from None
        runner, encoded = data.get("runner"), data.get("encoded_jit_config")
        if not isinstance(runner, dict) or not isinstance(runner.get("id"), int) \
                or not isinstance(encoded, str) or not encoded:
            raise SystemFailure("GitHub's JIT config answer lacks runner.id or "
                                "encoded_jit_config")
        return runner["id"], encoded

    def runner(self, scope: str, runner_id: int) -> RunnerInfo | None:
        """The runner as GitHub sees it; None when GitHub has no such runner (any more)."""
        try:
            found = self._base(scope).get_self_hosted_runner(runner_id)
        except GithubException as exc:
            if exc.status == 404:
                return None
            raise SystemFailure(f"GitHub runner {runner_id}: {_why(exc)}") from None
        except requests.RequestException as exc:
            raise _unreachable(f"GitHub runner {runner_id}", exc) from None
        return RunnerInfo(found.id, found.name, found.status, bool(found.busy))

    def runners(self, scope: str, prefix: str) -> list[RunnerInfo]:
        """Every runner of the scope whose name starts with ``prefix`` (kata-ci's own)."""
        try:
            listed = self._base(scope).get_self_hosted_runners()
            return [RunnerInfo(r.id, r.name, r.status, bool(r.busy)) for r in listed
                    if r.name.startswith(prefix)]
        except GithubException as exc:
            raise SystemFailure(f"listing runners of {scope}: {_why(exc)}") from None
        except requests.RequestException as exc:
            raise _unreachable(f"listing runners of {scope}", exc) from None

    def delete_runner(self, scope: str, runner_id: int) -> bool:
        """Deregister; True when GitHub no longer has it, False when it is busy (422)."""
        base = self._base(scope)
        try:
            base._requester.requestJsonAndCheck("DELETE", f"{base.url}/actions/runners/"
                                                f"{runner_id}")
        except GithubException as exc:
            if exc.status == 404:
                return True
            if exc.status == 422:
                return False
            raise SystemFailure(f"deleting runner {runner_id}: {_why(exc)}") from None
        except requests.RequestException as exc:
            raise _unreachable(f"deleting runner {runner_id}", exc) from None
        return True

    def queued_jobs(self, repo: str, limit: int = 200) -> list[QueuedJob]:
        """Queued workflow jobs of a repository (the first ``limit``): what a lost webhook
        would have told."""
        found: list[QueuedJob] = []
        try:
            for run in self.gh.get_repo(repo).get_workflow_runs(status="queued"):
                for job in run.jobs():
                    if job.status == "queued":
                        found.append(QueuedJob(job.id, repo, list(job.labels or []),
                                               job.name, run.name or ""))
                if len(found) >= limit:
                    break
        except GithubException as exc:
            raise SystemFailure(f"listing queued jobs of {repo}: {_why(exc)}") from None
        except requests.RequestException as exc:
            raise _unreachable(f"listing queued jobs of {repo}", exc) from None
        return found[:limit]


def _auth(config: GitHubConfig) -> Auth.Auth:
    if config.app_id:
        key = config.private_key()
        if not key:
            raise UserError("github.private_key_file is empty")
        return Auth.AppAuth(config.app_id, key).get_installation_auth(config.installation_id)
    token = config.token()
    if not token:
        raise UserError("no GitHub credentials: set [github] app_id/installation_id/"
                        "private_key_file, or token_file, or KATA_CI_GITHUB_TOKEN")
    return Auth.Token(token)


def _unreachable(what: str, exc: Exception) -> SystemFailure:
    return SystemFailure(f"{what}: GitHub unreachable ({type(exc).__name__})")


def _why(exc: GithubException) -> str:
    data = exc.data if isinstance(exc.data, dict) else {}
    message = data.get("message") if isinstance(data.get("message"), str) else ""
    return f"HTTP {exc.status}" + (f": {message[:200]}" if message else "")
