"""Git smart HTTP for the contract FAKE of GitLab (tests/fakes/gitlab.py), not GitLab: git's own
``git-http-backend`` run as a CGI per request, so a clone or fetch from the fake is a real one.

What is served is a bare mirror of the test's repository in a temporary GIT_PROJECT_ROOT, at
``<root>/<project_path>.git`` (GitLab serves bare repositories too). A mirror, not a symlink to
the test's repository: the fake adds refs GitLab would have (``refs/pipelines/<id>``) and must
not write into the caller's repository. Commits made in the test's repository after the fake
started are fetched into the mirror by :meth:`GitServer.refresh` (the fake calls it per job).
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

HTTP_BACKEND = "/usr/lib/git-core/git-http-backend"


class GitServer:
    def __init__(self, repo: Path, root: Path, project_path: str) -> None:
        self.repo = repo
        self.root = root
        self.bare = root / f"{project_path}.git"
        self.bare.parent.mkdir(parents=True, exist_ok=True)
        _git(["clone", "-q", "--mirror", str(repo), str(self.bare)], root)

    def refresh(self) -> None:
        """Branches and tags as they are now in the test's repository. No --prune: that would
        also drop the refs/pipelines/* the fake made."""
        _git(["fetch", "-q", str(self.repo), "+refs/heads/*:refs/heads/*",
              "+refs/tags/*:refs/tags/*"], self.bare)

    def sha(self, rev: str) -> str:
        """The commit ``rev`` (a branch name first, else any revision) names in the served
        repository; ValueError if none."""
        for name in (f"refs/heads/{rev}", rev):
            done = subprocess.run(["git", "rev-parse", "-q", "--verify", f"{name}^{{commit}}"],
                                  cwd=self.bare, capture_output=True, text=True, env=_env())
            if done.returncode == 0:
                return done.stdout.strip()
        raise ValueError(f"no commit {rev!r} in {self.repo}")

    def pipeline_ref(self, pipeline: int, sha: str) -> None:
        """refs/pipelines/<id>, which GitLab keeps per pipeline so that the payload's refspec
        ``+<sha>:refs/pipelines/<id>`` can be fetched (peers-research 1.4, "Ref specs")."""
        _git(["update-ref", f"refs/pipelines/{pipeline}", sha], self.bare)

    def serve(self, method: str, path: str, query: str, headers: dict[str, str], body: bytes,
              user: str) -> tuple[int, dict[str, str], bytes]:
        """One request for ``/<project_path>.git/...`` (headers lower-cased), answered by
        git-http-backend: (status, headers, body) parsed from its CGI output."""
        env = {**_env(), "GIT_PROJECT_ROOT": str(self.root), "GIT_HTTP_EXPORT_ALL": "1",
               "PATH_INFO": path, "REQUEST_METHOD": method, "QUERY_STRING": query,
               "CONTENT_TYPE": headers.get("content-type", ""),
               "CONTENT_LENGTH": str(len(body)), "REMOTE_USER": user,
               "REMOTE_ADDR": "127.0.0.1", "GATEWAY_INTERFACE": "CGI/1.1",
               # git's client gzips big upload-pack requests, and asks for protocol v2 here
               "HTTP_CONTENT_ENCODING": headers.get("content-encoding", ""),
               "HTTP_GIT_PROTOCOL": headers.get("git-protocol", "")}
        done = subprocess.run([HTTP_BACKEND], input=body, capture_output=True, env=env,
                              timeout=120)
        head, sep, payload = done.stdout.partition(b"\r\n\r\n")
        if not sep:
            head, sep, payload = done.stdout.partition(b"\n\n")
        if not sep:
            return 500, {"Content-Type": "text/plain"}, done.stderr
        status, out = 200, {}
        for line in head.decode("latin-1").splitlines():
            name, _, value = line.partition(":")
            if name.lower() == "status":
                status = int(value.split()[0])
            elif name and name.lower() != "content-length":  # the fake's server sets its own
                out[name.strip()] = value.strip()
        return status, out, payload


def _git(args: list[str], cwd: Path) -> None:
    subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, env=_env())


def _env() -> dict[str, str]:
    # no user or system git config: the fake serves the same whoever runs the tests
    return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": "/nonexistent",
            "GIT_CONFIG_NOSYSTEM": "1", "GIT_CONFIG_GLOBAL": "/dev/null"}


def make_repo(root: Path, files: dict[str, str], message: str = "first") -> Path:
    """A project repository for a fake GitLab to serve: ``root``/repo with ``files``
    committed on branch main by a test identity (no user or system git config)."""
    repo = root / "repo"
    repo.mkdir()
    for name, text in files.items():
        (repo / name).write_text(text)
    env = {**_env(), "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@e",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@e"}
    for args in (["init", "-q", "-b", "main"], ["add", "."], ["commit", "-qm", message]):
        subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True, env=env)
    return repo
