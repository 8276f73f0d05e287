"""The contract FAKE of GitLab (tests/fakes/gitlab.py) against the contract it is built from
(tests/fixtures/gitlab/PROTOCOL.md and the fixtures beside it): plain HTTP with httpx and a real
git client, no kata-ci code, so that what other tests learn from the fake is GitLab's rules."""

from __future__ import annotations

import base64
import io
import json
import subprocess
import threading
import time
import zipfile
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.fakes.git_http import make_repo
from tests.fakes.gitlab import ANOTHER_RUNNER, FAILURE_REASONS, FakeGitLab, FakeJob

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "gitlab"
REQUEST = json.loads((FIXTURES / "jobs_request.request.reconstructed.json").read_text())
SYSTEM_ID = "s_0123456789ab"
GIT_ENV = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@e", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@e", "PATH": "/usr/bin:/bin", "GIT_TERMINAL_PROMPT": "0",
           "GIT_CONFIG_NOSYSTEM": "1", "GIT_CONFIG_GLOBAL": "/dev/null"}


def _git(*args: str, cwd: Path, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["git", *args], cwd=cwd, env={**GIT_ENV, "HOME": str(cwd)},
                          capture_output=True, text=True, check=check)


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    return make_repo(tmp_path, {"a.txt": "from git\n"}, "one")


@pytest.fixture
def fake(repo: Path) -> Iterator[FakeGitLab]:
    with FakeGitLab(repo, long_poll=0.3) as gitlab:
        yield gitlab


@pytest.fixture
def api(fake: FakeGitLab) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=f"{fake.url}/api/v4", timeout=10) as client:
        yield client


def _request(api: httpx.Client, fake: FakeGitLab, **features: bool) -> httpx.Response:
    body = {**REQUEST, "token": fake.runner_token, "system_id": SYSTEM_ID, "last_update": "",
            "info": {**REQUEST["info"], "features": {**REQUEST["info"]["features"], **features}}}
    return api.post("/jobs/request", json=body, headers={"RUNNER-TOKEN": fake.runner_token})


def _put(api: httpx.Client, job: FakeJob, **body: Any) -> httpx.Response:
    return api.put(f"/jobs/{job.id}", json={"token": job.token, **body},
                   headers={"JOB-TOKEN": job.token})


def _patch(api: httpx.Client, job: FakeJob, start: int, chunk: bytes) -> httpx.Response:
    return api.patch(f"/jobs/{job.id}/trace", content=chunk,
                     headers={"JOB-TOKEN": job.token, "Content-Type": "text/plain",
                              "Content-Range": f"{start}-{start + len(chunk) - 1}"})


def _take(api: httpx.Client, fake: FakeGitLab, job: FakeJob) -> dict[str, Any]:
    """jobs/request (201) and the two-phase commit (PUT running, 200): the job runs."""
    got = _request(api, fake)
    assert got.status_code == 201 and got.json()["id"] == job.id
    assert _put(api, job, state="running").status_code == 200
    return dict(got.json())


def _checksum(data: bytes) -> str:
    return f"crc32:{zlib.crc32(data) & 0xffffffff:08x}"


def test_verify_answers_the_docs_json_and_reset_retires_the_old_token(
        fake: FakeGitLab, api: httpx.Client) -> None:
    """/runners/verify: 200 {id, token, token_expires_at}, 403 for a wrong token, 400 for a glrt-
    token without system_id; reset_authentication_token hands a new token, the old one is 403."""
    fake.token_expires_in = 3600
    body = {"token": fake.runner_token, "system_id": SYSTEM_ID, "info": REQUEST["info"]}
    ok = api.post("/runners/verify", json=body)
    assert ok.status_code == 200 and set(ok.json()) == {"id", "token", "token_expires_at"}
    assert ok.json()["id"] > 0 and ok.json()["token"] == fake.runner_token
    assert ok.json()["token_expires_at"].endswith("Z") and fake.verify_calls == [body]
    assert api.post("/runners/verify", json={**body, "token": "glrt-wrong"}).status_code == 403
    assert api.post("/runners/verify", json={"token": fake.runner_token}).status_code == 400
    old = fake.runner_token
    reset = api.post("/runners/reset_authentication_token", json={"token": old})
    assert reset.status_code == 201 and reset.json()["token"].startswith("glrt-")
    assert reset.json()["token"] != old == body["token"]
    assert api.post("/runners/verify", json=body).status_code == 403
    assert _request(api, fake).status_code == 204  # the new token works


def test_request_long_polls_then_204_with_a_last_update_that_changes(
        fake: FakeGitLab, api: httpx.Client) -> None:
    """No job: 204 after the long poll with X-GitLab-Last-Update; add_job wakes a held request
    (201, no X-GitLab-Last-Update) and changes the value; bad tokens 403, no system_id 400."""
    began = time.monotonic()
    idle = _request(api, fake)
    assert idle.status_code == 204 and time.monotonic() - began >= 0.3
    before = idle.headers["X-GitLab-Last-Update"]
    fake.long_poll = 5.0  # read per request: this one is held until add_job
    got: list[httpx.Response] = []
    held = threading.Thread(target=lambda: got.append(_request(api, fake)))
    began = time.monotonic()
    held.start()
    time.sleep(0.1)
    job = fake.add_job(["true"])
    held.join(5)
    assert got[0].status_code == 201 and got[0].json()["id"] == job.id
    assert time.monotonic() - began < 3 and "X-GitLab-Last-Update" not in got[0].headers
    fake.long_poll = 0.1
    assert _request(api, fake).headers["X-GitLab-Last-Update"] != before
    body = {"token": fake.runner_token, "system_id": SYSTEM_ID, "info": REQUEST["info"]}
    assert api.post("/jobs/request", json=body).status_code == 403  # no RUNNER-TOKEN header
    assert api.post("/jobs/request", json={**body, "token": "glrt-x"},
                    headers={"RUNNER-TOKEN": "glrt-x"}).status_code == 403
    assert api.post("/jobs/request", json={**body, "system_id": ""},
                    headers={"RUNNER-TOKEN": fake.runner_token}).status_code == 400


def test_the_201_payload_has_the_fixture_shape_and_waits_for_the_commit(
        fake: FakeGitLab, api: httpx.Client) -> None:
    """201 carries the fixture's shape (steps with after_script, git_info refspecs, masked job
    token, features); the job stays pending-commit through PUT pending until PUT running."""
    job = fake.add_job(["make test"], ["echo after"], name="unit", variables=[
        {"key": "DB_NAME", "value": "postgres", "public": True, "masked": False}])
    got = _request(api, fake)
    assert got.status_code == 201 and got.headers["content-type"] == "application/json"
    payload = got.json()
    spec = json.loads((FIXTURES / "jobs_request.201.gitlab-spec-reconstructed.json").read_text())
    assert set(spec) - set(payload) == {"hooks", "image", "services"}
    assert payload["token"] == job.token and job.token.startswith("glcbt-")
    assert [s["name"] for s in payload["steps"]] == ["script", "after_script"]
    assert payload["steps"][1] == {"name": "after_script", "script": ["echo after"],
                                   "timeout": 3600, "when": "always", "allow_failure": True}
    git = payload["git_info"]
    assert git["repo_url"] == (f"http://gitlab-ci-token:{job.token}@"
                               f"{fake.url.removeprefix('http://')}/group/project.git")
    assert git["refspecs"] == [f"+{git['sha']}:refs/pipelines/{job.id}",
                               "+refs/heads/main:refs/remotes/origin/main"]
    variables = {v["key"]: v for v in payload["variables"]}
    assert variables["CI_JOB_TOKEN"]["masked"] and variables["DB_NAME"]["value"] == "postgres"
    assert variables["CI_COMMIT_SHA"]["value"] == git["sha"]
    assert payload["features"]["failure_reasons"] == FAILURE_REASONS == \
        spec["features"]["failure_reasons"]
    assert fake.job(job.id).state == "pending-commit"
    assert _patch(api, job, 0, b"early").status_code == 403  # not running yet
    keep_alive = _put(api, job, state="pending")
    assert keep_alive.status_code == 200 and fake.job(job.id).state == "pending-commit"
    assert _put(api, job, state="running").status_code == 200
    assert fake.job(job.id).state == "running" and job.runner_system_id == SYSTEM_ID
    assert _put(api, job, state="pending").status_code == 400  # no keep-alive once running


def test_a_job_needing_an_unannounced_feature_is_dropped_as_runner_unsupported(
        fake: FakeGitLab, api: httpx.Client) -> None:
    """A pending job whose required feature the runner lacks is failed (runner_unsupported)
    and never handed out; the next job is; a runner without two_phase_job_commit runs at once."""
    needy = fake.add_job(["true"], requires={"multi_build_steps"})
    plain = fake.add_job(["true"])
    got = _request(api, fake, multi_build_steps=False, two_phase_job_commit=False)
    assert got.status_code == 201 and got.json()["id"] == plain.id
    assert fake.wait_final(needy.id, 1).failure_reason == "runner_unsupported"
    assert needy.state == "failed" and needy.handed_at is None
    assert plain.state == "running" and plain.runner_system_id == SYSTEM_ID


def test_a_commit_another_runner_won_is_409(fake: FakeGitLab, api: httpx.Client) -> None:
    """Two-phase commit: the injected conflict answers PUT running with 409, the job stays
    with the other runner manager and is not handed out again."""
    job = fake.add_job(["true"])
    fake.conflict_next_commit = True
    assert _request(api, fake).status_code == 201
    assert _put(api, job, state="running").status_code == 409
    assert job.runner_system_id == ANOTHER_RUNNER and not fake.conflict_next_commit
    assert _request(api, fake).status_code == 204


def test_trace_416_gives_the_offset_to_resume_from(fake: FakeGitLab,
                                                   api: httpx.Client) -> None:
    """PATCH trace: an injected 416 and a misaligned start both answer Range 0-<size>; the
    resent chunk is appended (202 with Range, Job-Status, interval); no Content-Range is 400."""
    job = fake.add_job(["true"])
    _take(api, fake, job)
    fake.trace_416_once.add(job.id)
    refused = _patch(api, job, 0, b"hello\n")
    assert refused.status_code == 416 and refused.headers["Range"] == "0-0"
    ok = _patch(api, job, 0, b"hello\n")
    assert ok.status_code == 202 and ok.headers["Range"] == "0-6"
    assert ok.headers["Job-Status"] == "running"
    assert ok.headers["X-GitLab-Trace-Update-Interval"] == "1"
    assert _patch(api, job, 3, b"again").headers["Range"] == "0-6"
    assert _patch(api, job, 6, b"world\n").status_code == 202
    assert bytes(job.trace) == b"hello\nworld\n" and job.first_trace_at is not None
    bare = api.patch(f"/jobs/{job.id}/trace", content=b"x", headers={"JOB-TOKEN": job.token})
    assert bare.status_code == 400
    assert _patch(api, FakeJob(job.id, "glcbt-wrong", {}, set()), 12, b"x").status_code == 403


def test_final_put_202_until_the_trace_is_in_then_200(fake: FakeGitLab,
                                                      api: httpx.Client) -> None:
    """The final PUT answers 202 (Job-Status running, an interval) as often as injected, then
    200: final stored, checksum verified; afterwards the finished job is 403 with Job-Status."""
    job = fake.add_job(["true"])
    _take(api, fake, job)
    _patch(api, job, 0, b"all done\n")
    fake.put_202_times[job.id] = 2
    final = {"state": "failed", "failure_reason": "script_failure", "exit_code": 3,
             "output": {"checksum": _checksum(b"all done\n"), "bytesize": 9}}
    for _ in range(2):
        accepted = _put(api, job, **final)
        assert accepted.status_code == 202 and accepted.headers["Job-Status"] == "running"
        assert int(accepted.headers["X-GitLab-Trace-Update-Interval"]) > 0
        assert job.final is None
    assert _put(api, job, **final).status_code == 200
    done = fake.wait_final(job.id, 1)
    assert done.state == "failed" and done.failure_reason == "script_failure"
    assert done.checksum_ok and done.final is not None and done.final["exit_code"] == 3
    late = _put(api, job, state="success")
    assert late.status_code == 403 and late.headers["Job-Status"] == "failed"
    assert _patch(api, job, 9, b"more").headers["Job-Status"] == "failed"


def test_412_makes_the_runner_resend_the_whole_trace(fake: FakeGitLab,
                                                     api: httpx.Client) -> None:
    """An injected 412 on the final PUT drops the trace the fake held; the trace resent from 0
    and the PUT again end in 200; a wrong checksum is still 200 but checksum_ok is False."""
    job = fake.add_job(["true"])
    _take(api, fake, job)
    _patch(api, job, 0, b"line\n")
    fake.put_412_once.add(job.id)
    final = {"state": "success", "output": {"checksum": _checksum(b"line\n"), "bytesize": 5}}
    assert _put(api, job, **final).status_code == 412 and job.trace == b""
    assert _patch(api, job, 5, b"x").headers["Range"] == "0-0"
    assert _patch(api, job, 0, b"line\n").status_code == 202
    assert _put(api, job, **final).status_code == 200 and job.checksum_ok
    other = fake.add_job(["true"])
    _take(api, fake, other)
    _patch(api, other, 0, b"abc")
    bad = {"state": "success", "output": {"checksum": _checksum(b"abd"), "bytesize": 3}}
    assert _put(api, other, **bad).status_code == 200
    assert other.state == "success" and other.checksum_ok is False


def test_artifacts_uploaded_are_downloaded_with_the_dependency_token(
        fake: FakeGitLab, api: httpx.Client) -> None:
    """A multipart ``file`` upload is 201 and becomes the job's archive (a junit report does
    not); a later job lists it in dependencies, and GET artifacts wants that job's token."""
    build = fake.add_job(["make"], name="build")
    _take(api, fake, build)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("out/bin", "binary")
    zipped = buffer.getvalue()
    query = {"artifact_format": "zip", "artifact_type": "archive", "expire_in": "1 day"}
    form = api.build_request("POST", "/", files={"file": ("artifacts.zip", zipped,
                                                          "application/zip")})
    body = form.read()  # sent in chunks, as gitlab-runner streams an archive
    up = api.post(f"/jobs/{build.id}/artifacts", params=query,
                  content=iter([body[:100], body[100:]]),
                  headers={"JOB-TOKEN": build.token,
                           "Content-Type": form.headers["Content-Type"]})
    assert up.status_code == 201 and build.artifact_zip == zipped
    assert fake.requests[-1].headers["transfer-encoding"] == "chunked"
    report = api.post(f"/jobs/{build.id}/artifacts", headers={"JOB-TOKEN": build.token},
                      params={"artifact_format": "gzip", "artifact_type": "junit"},
                      files={"file": ("junit.xml.gz", b"gz", "application/gzip")})
    assert report.status_code == 201 and build.artifact_zip == zipped
    assert [(u.filename, u.query["artifact_type"]) for u in build.artifacts] == \
        [("artifacts.zip", "archive"), ("junit.xml.gz", "junit")]
    _put(api, build, state="success", output={"checksum": _checksum(b""), "bytesize": 0})
    test = fake.add_job(["make test"], dependencies=[build])
    payload = _take(api, fake, test)
    assert payload["dependencies"] == [{"id": build.id, "token": build.token, "name": "build",
                                        "artifacts_file": {"filename": "artifacts.zip",
                                                           "size": len(zipped)}}]
    down = api.get(f"/jobs/{build.id}/artifacts", headers={"JOB-TOKEN": build.token})
    assert down.status_code == 200 and down.content == zipped
    assert down.headers["content-type"] == "application/zip"
    assert api.get(f"/jobs/{build.id}/artifacts",
                   headers={"JOB-TOKEN": "glcbt-wrong"}).status_code == 403
    assert api.get(f"/jobs/{test.id}/artifacts",
                   headers={"JOB-TOKEN": test.token}).status_code == 404


def test_git_clone_needs_the_token_of_a_running_job(fake: FakeGitLab, tmp_path: Path) -> None:
    """Smart HTTP by git-http-backend: git clones with gitlab-ci-token:<job token> of a running
    job and fetches the pipeline ref; without credentials, or once the job ended, 401."""
    job = fake.add_job(["true"])
    with httpx.Client(base_url=f"{fake.url}/api/v4", timeout=10) as api:
        payload = _take(api, fake, job)
    url = f"{fake.url}/group/project.git"
    auth = base64.b64encode(f"gitlab-ci-token:{job.token}".encode()).decode()
    header = f"http.extraHeader=Authorization: Basic {auth}"
    _git("-c", header, "clone", "-q", url, "clone", cwd=tmp_path)
    sha = payload["git_info"]["sha"]
    _git("-c", header, "fetch", "-q", "origin", *payload["git_info"]["refspecs"], "--depth",
         "20", cwd=tmp_path / "clone")
    _git("checkout", "-q", sha, cwd=tmp_path / "clone")
    assert (tmp_path / "clone" / "a.txt").read_text() == "from git\n"
    assert _git("rev-parse", f"refs/pipelines/{job.id}", cwd=tmp_path / "clone").stdout.strip() \
        == sha
    anonymous = _git("clone", "-q", url, "anonymous", cwd=tmp_path, check=False)
    assert anonymous.returncode != 0 and not (tmp_path / "anonymous").exists()
    assert any(r.status == 401 and r.path.endswith("/info/refs") for r in fake.requests)
    fake.cancel(job.id, graceful=False)
    late = _git("-c", header, "clone", "-q", url, "late", cwd=tmp_path, check=False)
    assert late.returncode != 0


def test_cancel_is_said_in_job_status(fake: FakeGitLab, api: httpx.Client) -> None:
    """A graceful cancel is Job-Status: canceling and ends as canceled after the final PUT; a
    hard cancel is a 403 with Job-Status: canceled, which wait_final waits for."""
    soft = fake.add_job(["sleep 60"], ["echo after"])
    _take(api, fake, soft)
    fake.cancel(soft.id, graceful=True)
    assert _patch(api, soft, 0, b"x").headers["Job-Status"] == "canceling"
    assert _put(api, soft, state="running").headers["Job-Status"] == "canceling"
    _put(api, soft, state="failed", output={"checksum": _checksum(b"x"), "bytesize": 1})
    assert fake.wait_final(soft.id, 1).state == "canceled" and soft.checksum_ok
    hard = fake.add_job(["sleep 60"])
    _take(api, fake, hard)
    fake.cancel(hard.id, graceful=False)
    told = _patch(api, hard, 0, b"x")
    assert told.status_code == 403 and told.headers["Job-Status"] == "canceled"
    assert fake.wait_final(hard.id, 1).told_canceled and hard.final is None


def test_unknown_paths_and_jobs(fake: FakeGitLab, api: httpx.Client) -> None:
    """An unknown path is 404; an unknown job id or a wrong job token is 403 (GitLab wants the
    runner to stop, not to wonder); every request is recorded with its answer, in order."""
    assert api.get("/nothing/here").status_code == 404
    assert api.put("/jobs/99999", json={"token": "x", "state": "success"}).status_code == 403
    job = fake.add_job(["true"])
    assert api.put(f"/jobs/{job.id}", json={"token": "glcbt-x", "state": "running"},
                   headers={"JOB-TOKEN": "glcbt-x"}).status_code == 403
    assert [(r.method, r.path, r.status) for r in fake.requests] == [
        ("GET", "/api/v4/nothing/here", 404), ("PUT", "/api/v4/jobs/99999", 403),
        ("PUT", f"/api/v4/jobs/{job.id}", 403)]
    assert fake.requests[-1].headers["job-token"] == "glcbt-x"
    assert fake.requests[0].at <= fake.requests[-1].at
