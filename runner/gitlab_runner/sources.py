"""A GitLab job's sources, fetched on the host as gitlab-runner fetches them: an empty
repository, ``git fetch origin <refspecs> --depth N --prune``, a detached checkout of the sha.

Before the VM starts, into a fresh directory, as the VMs' unprivileged identity: the commit
is the project's (hostile), the refspecs and sha are checked in payload.py. Git's own threat
model covers fetching and checking out an untrusted repository; on top of it: no system or
global config, no hooks, no fsmonitor, no submodules, only http(s), and every received
object fsck'ed (trees naming ``.git`` or ``..`` are refused). The job token travels in an
``http.extraHeader`` passed through git's environment: never in argv, ``.git/config``, the
remote URL or the trace. Git never runs on the workspace again once the job has touched it
(a planted ``.git/config`` would run commands on the host): the tracked files are listed here,
for ``untracked:`` artifacts and caches later.
"""

from __future__ import annotations

import base64
import os
import pwd
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path

from kata_ci.errors import SystemFailure, UserError
from kata_ci.runner.core.sinks import LogSink, note
from kata_ci.runner.gitlab_runner.payload import GitLabJob
from kata_ci.runner.queue.workspace import SERVICE_USER

HARDENING = ("core.hooksPath=/dev/null", "core.fsmonitor=false", "protocol.allow=never",
             "protocol.http.allow=always", "protocol.https.allow=always",
             "submodule.recurse=false", "transfer.fsckObjects=true", "fetch.fsckObjects=true",
             "core.askPass=true", "credential.helper=", "advice.detachedHead=false",
             "init.defaultBranch=main", "gc.auto=0")


def _identity() -> tuple[int, int] | None:
    if os.geteuid() != 0:
        return None
    try:
        entry = pwd.getpwnam(SERVICE_USER)
    except KeyError:
        return None
    return entry.pw_uid, entry.pw_gid


def _env(token: str) -> dict[str, str]:
    basic = base64.b64encode(f"gitlab-ci-token:{token}".encode()).decode()
    return {"PATH": "/usr/bin:/bin", "HOME": "/nonexistent", "LC_ALL": "C.UTF-8",
            "GIT_CONFIG_NOSYSTEM": "1", "GIT_CONFIG_GLOBAL": "/dev/null",
            "GIT_TERMINAL_PROMPT": "0", "GIT_ALLOW_PROTOCOL": "http:https",
            "GIT_CONFIG_COUNT": "1", "GIT_CONFIG_KEY_0": "http.extraHeader",
            "GIT_CONFIG_VALUE_0": f"Authorization: Basic {basic}"}


def _git(args: Sequence[str], cwd: Path, env: Mapping[str, str], timeout: float,
         sink: LogSink | None) -> bytes:
    argv = ["git", *(a for c in HARDENING for a in ("-c", c)), *args]
    ids = _identity()
    try:
        done = subprocess.run(argv, cwd=cwd, env=dict(env), capture_output=True,
                              timeout=timeout, user=ids[0] if ids else None,
                              group=ids[1] if ids else None, extra_groups=[] if ids else None,
                              stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise UserError(f"git {args[0]} took longer than {timeout:g}s") from None
    if sink is not None and done.stderr:
        sink.write("stderr", done.stderr[-8192:])
    if done.returncode != 0:
        raise UserError(f"git {args[0]} failed with exit code {done.returncode}")
    return done.stdout


def fetch(job: GitLabJob, into: Path, variables: Mapping[str, str], sink: LogSink,
          timeout: float = 900.0) -> frozenset[str]:
    """Fetch and check out the job's commit into the empty ``into``; the tracked files.
    UserError (the job fails) when git cannot; honours GIT_STRATEGY (none/empty: nothing),
    GIT_DEPTH and GIT_CHECKOUT as gitlab-runner does."""
    strategy = variables.get("GIT_STRATEGY", "fetch")
    if strategy in ("none", "empty"):
        note(sink, f"Skipping Git repository setup (GIT_STRATEGY={strategy})")
        return frozenset()
    if strategy not in ("fetch", "clone"):
        raise UserError(f"GIT_STRATEGY={strategy[:40]!r} is not one of clone, fetch, none, empty")
    depth = job.git.depth
    if variables.get("GIT_DEPTH", "").strip():
        try:
            depth = max(0, int(variables["GIT_DEPTH"]))
        except ValueError:
            raise UserError(f"GIT_DEPTH={variables['GIT_DEPTH'][:20]!r} is not a number") from None
    if variables.get("GIT_SUBMODULE_STRATEGY", "none") not in ("none", ""):
        note(sink, "GIT_SUBMODULE_STRATEGY is not supported: submodules are not fetched")
    ids = _identity()
    if ids:
        os.chown(into, *ids)
    env = _env(job.token)
    note(sink, f"Fetching changes{f' with git depth set to {depth}' if depth else ''}...")
    _git(["init", "-q", "."], into, env, 60, sink)
    _git(["remote", "add", "origin", job.git.repo_url], into, env, 60, sink)
    refspecs = job.git.refspecs or [f"+{job.git.sha}:refs/pipelines/{job.id}"]
    _git(["fetch", "--prune", "--quiet", "--no-recurse-submodules",
          *([f"--depth={depth}"] if depth else []), "origin", *refspecs],
         into, env, timeout, sink)
    if variables.get("GIT_CHECKOUT", "true").lower() == "false":
        note(sink, "Skipping Git checkout (GIT_CHECKOUT=false)")
        return frozenset()
    note(sink, f"Checking out {job.git.sha[:8]} as detached HEAD (ref is {job.git.ref})...")
    try:
        _git(["checkout", "-f", "-q", "--detach", job.git.sha], into, env, timeout, sink)
    except UserError:
        raise UserError(f"commit {job.git.sha[:12]} was not fetched by the job's "
                        "refspecs") from None
    listed = _git(["ls-files", "-z"], into, env, 120, None)
    return frozenset(p.decode("utf-8", "surrogateescape") for p in listed.split(b"\0") if p)


def check_git() -> None:
    """SystemFailure when the host has no git: a runner problem, not the job's."""
    try:
        subprocess.run(["git", "--version"], capture_output=True, check=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        raise SystemFailure("git is not installed on the runner host") from None
