"""GitLab's runner API over HTTP (httpx), as gitlab-runner's network/gitlab.go speaks it.

python-gitlab covers the user-facing API (creating a runner with a personal token) but not
the runner's side (jobs/request, trace, job updates, artifacts): those are plain HTTP here.
Runner calls carry the runner token in the body and a ``RUNNER-TOKEN`` header, job calls the
job token in ``JOB-TOKEN``; every request has an ``X-Request-Id``. Tokens never appear in a
URL, so they stay out of any log of one. Nothing here retries: the callers decide (the poller
backs off, the trace shipper honours GitLab's intervals).
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import urlsplit

import httpx

from kata_ci import __version__
from kata_ci.errors import UserError
from kata_ci.runner.ops.metrics import GITLAB_REQUESTS

# Exactly what kata-ci implements: GitLab drops a job that needs a feature a runner does not
# announce (runner_unsupported) instead of handing it over, so this list is a contract.
FEATURES: dict[str, bool] = {
    "variables": True, "artifacts": True, "upload_multiple_artifacts": True,
    "upload_raw_artifacts": True, "cache": True, "fallback_cache_keys": True,
    "refspecs": True, "masking": True, "raw_variables": True, "artifacts_exclude": True,
    "multi_build_steps": True, "return_exit_code": True, "trace_reset": True,
    "trace_checksum": True, "trace_size": True, "cancelable": True, "cancel_gracefully": True,
    "two_phase_job_commit": True,
    # image: the job runs in its OCI image's root (core/images.py); of executor_opts, docker
    # user is honoured, platform is noted (the image's linux/amd64 variant runs)
    "image": True, "image_executor_opts": True,
    # services: each in its own root in the job's VM, aliases in /etc/hosts (core/services.py)
    "services": True, "service_variables": True, "service_multiple_aliases": True,
    # Not (yet) implemented: announcing them would take jobs kata-ci cannot run as asked.
    "shared": False, "session": False, "terminal": False,
    "proxy": False, "vault_secrets": False,
    "service_executor_opts": False, "native_steps_integration": False, "job_inputs": False,
}
LONG_POLL = 60.0  # Workhorse holds jobs/request up to 50 s by default


def info() -> dict[str, Any]:
    return {"name": "kata-ci", "version": __version__, "revision": "", "platform": "linux",
            "architecture": "amd64", "executor": "kata-ci", "shell": "bash",
            "features": dict(FEATURES), "config": {"gpus": ""}}


@dataclass(frozen=True)
class Reply:
    status: int
    headers: Mapping[str, str]
    body: bytes

    def json(self) -> Any:
        import json
        try:
            return json.loads(self.body)
        except ValueError:
            return None

    @property
    def job_status(self) -> str:
        return self.headers.get("job-status", "")

    @property
    def interval(self) -> float | None:
        try:
            return float(self.headers["x-gitlab-trace-update-interval"])
        except (KeyError, ValueError):
            return None

    @property
    def range_end(self) -> int | None:
        """The size GitLab holds, from ``Range: 0-<size>``."""
        try:
            return int(self.headers["range"].rsplit("-", 1)[1])
        except (KeyError, ValueError, IndexError):
            return None


def check_url(url: str) -> str:
    try:
        parts = urlsplit(url)
        _ = parts.port  # a bad port raises here, not in the middle of a request
    except ValueError:
        raise UserError(f"GitLab URL {url!r} is not a URL") from None
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.query:
        raise UserError(f"GitLab URL {url!r} must be http(s)://host[:port][/path]")
    return url.rstrip("/")


class GitLabAPI:
    """One GitLab instance. Transport errors become ``httpx.HTTPError`` for the caller."""

    def __init__(self, url: str, timeout: float = 30.0, verify: bool | str = True) -> None:
        self.url = check_url(url)
        self.client = httpx.Client(base_url=f"{self.url}/api/v4/", timeout=timeout,
                                   verify=verify, follow_redirects=False,
                                   headers={"User-Agent": f"kata-ci/{__version__}"})

    def close(self) -> None:
        self.client.close()

    def _send(self, endpoint: str, method: str, path: str,
              token_header: tuple[str, str] | None = None, timeout: float | None = None,
              **kwargs: Any) -> Reply:
        """One request; counted by ``endpoint`` (a name of ours, never the path: the path
        holds a job id) and HTTP status, or ``error`` when no answer came."""
        headers = {"X-Request-Id": uuid.uuid4().hex, **kwargs.pop("headers", {})}
        if token_header:
            headers[token_header[0]] = token_header[1]
        if timeout is not None:
            kwargs["timeout"] = timeout
        try:
            response = self.client.request(method, path, headers=headers, **kwargs)
        except httpx.HTTPError:
            GITLAB_REQUESTS.labels(endpoint, "error").inc()
            raise
        GITLAB_REQUESTS.labels(endpoint, str(response.status_code)).inc()
        return Reply(response.status_code, {k.lower(): v for k, v in response.headers.items()},
                     response.content)

    # -- the runner ---------------------------------------------------------------------
    def verify(self, token: str, system_id: str) -> Reply:
        """POST /runners/verify with the full info block: GitLab records the runner
        manager's features from it (without them it cancels jobs without after_script)."""
        return self._send("verify", "POST", "runners/verify", ("RUNNER-TOKEN", token),
                          json={"token": token, "system_id": system_id, "info": info()})

    def reset_token(self, token: str) -> Reply:
        return self._send("reset_token", "POST", "runners/reset_authentication_token",
                          ("RUNNER-TOKEN", token), json={"token": token})

    def unregister_manager(self, token: str, system_id: str) -> Reply:
        return self._send("unregister_manager", "DELETE", "runners/managers",
                          ("RUNNER-TOKEN", token), json={"token": token, "system_id": system_id})

    def request_job(self, token: str, system_id: str, last_update: str) -> Reply:
        return self._send("request_job", "POST", "jobs/request", ("RUNNER-TOKEN", token),
                          timeout=LONG_POLL + 15,
                          json={"token": token, "system_id": system_id,
                                "last_update": last_update, "info": info()})

    # -- a job ----------------------------------------------------------------------------
    def update_job(self, job_id: int, job_token: str, body: Mapping[str, Any]) -> Reply:
        return self._send("update_job", "PUT", f"jobs/{job_id}", ("JOB-TOKEN", job_token),
                          json={"token": job_token, "info": info(), **body})

    def patch_trace(self, job_id: int, job_token: str, start: int, chunk: bytes) -> Reply:
        # Content-Range without a "bytes " prefix and with an inclusive end, as GitLab reads it
        return self._send("patch_trace", "PATCH", f"jobs/{job_id}/trace", ("JOB-TOKEN", job_token),
                          params={"debug_trace": "false"}, content=chunk,
                          headers={"Content-Type": "text/plain",
                                   "Content-Range": f"{start}-{start + len(chunk) - 1}"})

    def upload_artifact(self, job_id: int, job_token: str, file: Path, filename: str,
                        query: Mapping[str, str]) -> Reply:
        """One artifacts entry: multipart with a single part named ``file``."""
        with file.open("rb") as data:
            return self._send("upload_artifact", "POST", f"jobs/{job_id}/artifacts",
                              ("JOB-TOKEN", job_token), params=dict(query), timeout=600.0,
                              files={"file": (filename, data, "application/octet-stream")})

    def download_artifact(self, job_id: int, job_token: str, out: BinaryIO,
                          limit: int) -> Reply:
        """GET the job's archive into ``out`` (at most ``limit`` bytes). A redirect (object
        storage) is followed once, without the job token when it leaves this GitLab."""
        url: str = f"jobs/{job_id}/artifacts"
        headers = {"JOB-TOKEN": job_token, "X-Request-Id": uuid.uuid4().hex}
        for _ in range(2):
            request = self.client.build_request("GET", url, headers=headers, timeout=600.0)
            try:
                response = self.client.send(request, stream=True)
            except httpx.HTTPError:
                GITLAB_REQUESTS.labels("download_artifact", "error").inc()
                raise
            GITLAB_REQUESTS.labels("download_artifact", str(response.status_code)).inc()
            with contextlib.closing(response):
                if response.status_code in (301, 302, 303, 307, 308):
                    target = httpx.URL(response.headers.get("location", ""))
                    target = response.url.join(target)
                    if target.scheme not in ("http", "https"):
                        break
                    if (target.scheme, target.host, target.port) != \
                            (response.url.scheme, response.url.host, response.url.port):
                        headers = {"X-Request-Id": headers["X-Request-Id"]}
                    url = str(target)
                    continue
                if response.status_code == 200:
                    _copy_limited(response.iter_bytes(), out, limit)
                return Reply(response.status_code, {}, b"")
        return Reply(599, {}, b"too many redirects")


def _copy_limited(chunks: Iterator[bytes], out: BinaryIO, limit: int) -> None:
    total = 0
    for chunk in chunks:
        total += len(chunk)
        if total > limit:
            raise UserError(f"artifacts download is larger than {limit >> 20} MiB")
        out.write(chunk)
