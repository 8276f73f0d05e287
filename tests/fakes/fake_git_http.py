"""Git's smart HTTP for the FAKE GitLab: git's own http-backend run as CGI, so a fetch from
it is a real git fetch. The served repository is a bare mirror of the test's repository
(GitLab serves bare repositories too), with the refs GitLab makes per pipeline."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

HTTP_BACKEND = "/usr/lib/git-core/git-http-backend"


class GitServer:
    def __init__(self, repo: Path, root: Path, project_path: str) -> None:
        self.root = root
        self.project_path = project_path
        self.bare = root / f"{project_path}.git"
        self.bare.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run(["git", "clone", "-q", "--mirror", str(repo), str(self.bare)],
                       check=True, env=_env())

    def sha(self, ref: str) -> str:
        return subprocess.run(["git", "rev-parse", ref], cwd=self.bare, check=True,
                              capture_output=True, text=True, env=_env()).stdout.strip()

    def pipeline_ref(self, pipeline: int, sha: str) -> None:
        """refs/pipelines/<id>, as GitLab keeps for each pipeline."""
        subprocess.run(["git", "update-ref", f"refs/pipelines/{pipeline}", sha],
                       cwd=self.bare, check=True, env=_env())

    def serve(self, method: str, path: str, query: str, content_type: str, body: bytes,
              user: str, encoding: str = "") -> tuple[int, list[tuple[str, str]], bytes]:
        """One request for ``/<project>.git/...``: (status, headers, body) from the CGI."""
        env = {**_env(), "GIT_PROJECT_ROOT": str(self.root), "GIT_HTTP_EXPORT_ALL": "1",
               "PATH_INFO": path, "REQUEST_METHOD": method, "QUERY_STRING": query,
               "CONTENT_TYPE": content_type, "CONTENT_LENGTH": str(len(body)),
               "REMOTE_USER": user, "HTTP_CONTENT_ENCODING": encoding,
               "REMOTE_ADDR": "127.0.0.1", "GATEWAY_INTERFACE": "CGI/1.1"}
        done = subprocess.run([HTTP_BACKEND], input=body, capture_output=True, env=env,
                              timeout=120)
        head, _, payload = done.stdout.partition(b"\r\n\r\n")
        if not _:
            head, _, payload = done.stdout.partition(b"\n\n")
        status, headers = 200, []
        for line in head.decode("latin-1").splitlines():
            name, _, value = line.partition(":")
            if name.lower() == "status":
                status = int(value.strip().split()[0])
            elif name:
                headers.append((name.strip(), value.strip()))
        return status, headers, payload


def _env() -> dict[str, str]:
    return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": "/nonexistent",
            "GIT_CONFIG_NOSYSTEM": "1", "GIT_CONFIG_GLOBAL": "/dev/null"}
