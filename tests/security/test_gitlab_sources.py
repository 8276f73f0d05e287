"""A GitLab project whose commit is built to attack the host's git during kata-ci's fetch
(the fake GitLab serves it over real smart HTTP; the fetch is kata-ci's own, as a worker
runs it): its tree plants `.git/config` with an fsmonitor command."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from kata_ci.errors import UserError
from kata_ci.runner.core.sinks import Stream
from kata_ci.runner.gitlab_runner import sources
from kata_ci.runner.gitlab_runner.payload import parse_job
from tests.fakes.git_http import make_repo
from tests.fakes.gitlab import FakeGitLab


class Collect:
    def __init__(self) -> None:
        self.out = b""

    def write(self, stream: Stream, data: bytes) -> None:
        self.out += data


def _git(repo: Path, *args: str, data: bytes | None = None) -> str:
    env = {"PATH": "/usr/bin:/bin", "HOME": "/nonexistent", "GIT_CONFIG_NOSYSTEM": "1",
           "GIT_CONFIG_GLOBAL": "/dev/null", "GIT_AUTHOR_NAME": "x", "GIT_AUTHOR_EMAIL": "x@e",
           "GIT_COMMITTER_NAME": "x", "GIT_COMMITTER_EMAIL": "x@e"}
    return subprocess.run(["git", *args], cwd=repo, input=data, check=True,
                          capture_output=True, env=env).stdout.decode().strip()


def test_a_commit_that_plants_git_config_runs_nothing_on_the_host(tmp_path: Path) -> None:
    """A tree with `.git/config` (core.fsmonitor = a command): the fetch's object check
    refuses it on receipt, the job fails clearly, the command never runs and the workspace's
    .git/config is the one kata-ci's git wrote."""
    repo = make_repo(tmp_path, {"a.txt": "fine\n"})
    marker = tmp_path / "pwned"
    blob = _git(repo, "hash-object", "-w", "--stdin",
                data=f"[core]\n\tfsmonitor = touch {marker}\n".encode())
    inner = _git(repo, "mktree", data=f"100644 blob {blob}\tconfig\n".encode())
    tree = _git(repo, "mktree", data=f"040000 tree {inner}\t.git\n".encode())
    commit = _git(repo, "commit-tree", tree, "-p", "HEAD", "-m", "evil")
    _git(repo, "update-ref", "refs/heads/main", commit)
    into = Path(tempfile.mkdtemp(prefix="kci-src-"))  # as the worker's: the VMs' user enters
    try:
        with FakeGitLab(repo, long_poll=0.3) as gitlab:
            job = gitlab.add_job(["true"])
            gitlab.job(job.id).state = "running"  # committed: git accepts its token
            log = Collect()
            with pytest.raises(UserError, match="git fetch failed"):
                sources.fetch(parse_job(gitlab.job(job.id).payload), into, {}, log)
        assert b"hasDotgit" in log.out  # refused on receipt: fetch.fsckObjects
        assert not marker.exists()
        assert "fsmonitor" not in (into / ".git" / "config").read_text()
    finally:
        shutil.rmtree(into)
