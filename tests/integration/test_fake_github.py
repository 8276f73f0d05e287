"""The contract FAKE of GitHub (tests/fakes/github.py) and the FAKE actions runner
(tests/fakes/actions_runner.py) against the contract they are built from: GitHub's own examples
in tests/fixtures/github/ (REST responses, workflow_job webhooks, the signature test vector)
and PyGithub 2.10 as a real client. The runner as a process: test_fake_actions_runner.py. No
kata-ci code: what other tests learn from the fakes is GitHub's rules."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from github import Auth, Github, GithubException

from tests.fakes.github import FakeGitHub
from tests.fakes.github_payloads import fixture

TOKEN = "ghs_test_installation_token_0123456789"
SECRET = "webhook-secret-0123456789abcdef"
ORG, REPO = "octo-org", "octo-org/hello-world"
LABELS = ["self-hosted", "kata-ci"]


@pytest.fixture
def fake() -> Iterator[FakeGitHub]:
    with FakeGitHub(org=ORG, repos=(REPO, "octo-org/other"), token=TOKEN, long_poll=0.5) as gh:
        yield gh


@pytest.fixture
def api(fake: FakeGitHub) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=fake.url, timeout=15,
                      headers={"Authorization": f"token {TOKEN}"}) as client:
        yield client


def make_jit(api: httpx.Client, name: str, labels: list[str] | None = None,
         where: str = f"orgs/{ORG}", **body: Any) -> httpx.Response:
    return api.post(f"/{where}/actions/runners/generate-jitconfig",
                    json={"name": name, "runner_group_id": 1, "labels": labels or LABELS,
                          **body})


def _files(encoded: str) -> dict[str, Any]:
    files = json.loads(base64.b64decode(encoded))
    return {name: json.loads(base64.b64decode(value)) for name, value in files.items()}


def _session(fake: FakeGitHub, encoded: str) -> httpx.Response:
    secret = _files(encoded)[".credentials_rsaparams"]["secret"]
    return httpx.post(f"{fake.url}/_fake_actions/sessions", json={"version": "2.329.0"},
                      headers={"Authorization": f"Bearer {secret}"}, timeout=15)


def _keys(value: Any) -> Any:
    """The key structure of a JSON value (lists by their first item)."""
    if isinstance(value, dict):
        return {k: _keys(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_keys(value[0])] if value else []
    return None


# -- REST against the fixtures ---------------------------------------------------------------
def test_jitconfig_answer_has_the_fixtures_shape_and_the_three_file_config() -> None:
    """generate-jitconfig: the fixture's keys, read-only+custom labels, a 3-file config."""
    request = fixture("rest/actions.generate-runner-jitconfig-for-org.request.json")
    with FakeGitHub(token=TOKEN, guest_url="http://10.0.2.2:8443") as fake:
        got = httpx.post(f"{fake.url}/orgs/{ORG}/actions/runners/generate-jitconfig",
                         json={**request, "labels": ["kata-ci", "self-hosted"]},
                         headers={"Authorization": f"Bearer {TOKEN}"})
        assert got.status_code == 201
        body = got.json()
        expected = fixture("rest/actions.generate-runner-jitconfig-for-org.201.json")
        assert _keys(body) == _keys(expected)
        assert body["runner"]["status"] == "offline" and body["runner"]["os"] == "unknown"
        assert [(x["name"], x["type"]) for x in body["runner"]["labels"]] == [
            ("self-hosted", "read-only"), ("Linux", "read-only"), ("X64", "read-only"),
            ("kata-ci", "custom")]
        files = _files(body["encoded_jit_config"])
        assert sorted(files) == [".credentials", ".credentials_rsaparams", ".runner"]
        assert files[".runner"] == {
            "agentId": body["runner"]["id"], "agentName": "New runner", "poolId": 1,
            "poolName": "Default", "serverUrl": "http://10.0.2.2:8443",
            "gitHubUrl": f"http://10.0.2.2:8443/{ORG}", "workFolder": "_work",
            "ephemeral": True, "disableUpdate": True}
        assert files[".credentials"]["data"]["authorizationUrl"].startswith("http://10.0.2.2")
        runner = fake.runners[body["runner"]["id"]]
        assert runner.scope == f"org:{ORG}" and fake.jit_configs == [body["encoded_jit_config"]]
        assert files[".credentials_rsaparams"]["secret"] == runner.secret


def test_list_get_and_token_answers_have_the_fixtures_keys(api: httpx.Client) -> None:
    """Runner list/get and runner tokens have the fixtures' keys; list filters name and scope."""
    assert make_jit(api, "org-one").status_code == 201
    assert make_jit(api, "repo-one", where=f"repos/{REPO}").status_code == 201
    listed = api.get(f"/orgs/{ORG}/actions/runners").json()
    rest = "rest/actions.{}-self-hosted-runner{}-for-repo.200.json"
    assert _keys(listed) == _keys(fixture(rest.format("list", "s")))
    assert [r["name"] for r in listed["runners"]] == ["org-one"]
    repo_list = api.get(f"/repos/{REPO}/actions/runners", params={"name": "repo-one"}).json()
    assert repo_list["total_count"] == 1 and repo_list["runners"][0]["name"] == "repo-one"
    assert api.get(f"/repos/{REPO}/actions/runners", params={"name": "repo"}).json()[
        "total_count"] == 0
    one = api.get(f"/repos/{REPO}/actions/runners/{repo_list['runners'][0]['id']}")
    assert _keys(one.json()) == _keys(fixture(rest.format("get", "")))
    for where in (f"orgs/{ORG}", f"repos/{REPO}"):
        for kind in ("registration", "remove"):
            got = api.post(f"/{where}/actions/runners/{kind}-token")
            example = fixture(f"rest/actions.create-{kind}-token-for-repo.201.json")
            assert got.status_code == 201 and _keys(got.json()) == _keys(example)
            assert len(got.json()["token"]) == len(example["token"])
    groups = api.get(f"/orgs/{ORG}/actions/runner-groups").json()
    assert groups["runner_groups"][0]["id"] == 1 and groups["runner_groups"][0]["default"]


@pytest.mark.parametrize(("body", "status"), [
    ({"name": None}, 422), ({"runner_group_id": None}, 422), ({"labels": None}, 422),
    ({"labels": []}, 422), ({"labels": [f"l{i}" for i in range(101)]}, 422),
    ({"runner_group_id": "1"}, 422), ({"runner_group_id": 7}, 422), ({"labels": [""]}, 422),
    ({"labels": [f"l{i}" for i in range(100)]}, 201)])
def test_jitconfig_refuses_bad_requests(api: httpx.Client, body: dict[str, Any],
                                        status: int) -> None:
    """Missing/invalid name, runner_group_id or labels (0 or >100) get 422; 100 labels do not."""
    full = {"name": "r", "runner_group_id": 1, "labels": LABELS, **body}
    sent = {k: v for k, v in full.items() if v is not None}
    got = api.post(f"/orgs/{ORG}/actions/runners/generate-jitconfig", json=sent)
    assert got.status_code == status, got.text


def test_jitconfig_conflict_not_found_unauthorized_and_groups(fake: FakeGitHub,
                                                              api: httpx.Client) -> None:
    """A taken name in the pool is 409, other org/repo 404, bad token 401; added groups work."""
    assert make_jit(api, "twice").status_code == 201
    assert make_jit(api, "twice", where=f"repos/{REPO}").status_code == 201  # another pool
    again = make_jit(api, "TWICE")
    assert again.status_code == 409
    assert again.json()["message"] == \
        "Already exists - A runner with the name TWICE already exists."
    assert make_jit(api, "x", where="orgs/other-org").status_code == 404
    assert make_jit(api, "x", where="repos/octo-org/nope").status_code == 404
    assert api.get("/orgs/other-org/actions/runners").json()["message"] == "Not Found"
    for auth in ({}, {"Authorization": "token wrong"}, {"Authorization": TOKEN}):
        got = httpx.get(f"{fake.url}/orgs/{ORG}/actions/runners", headers=auth)
        assert got.status_code == 401 and got.json()["message"] == "Bad credentials"
    assert make_jit(api, "grouped", runner_group_id=7).status_code == 422
    fake.add_runner_group(7, "kata")
    assert make_jit(api, "grouped", runner_group_id=7).status_code == 201


def test_delete_runner_busy_unknown_and_long_poll(fake: FakeGitHub, api: httpx.Client) -> None:
    """DELETE runner: 204 no body, 404 unknown, 422 busy; a deleted runner's long poll gets 401."""
    idle = make_jit(api, "idle").json()
    result: list[int] = []
    polling = threading.Thread(target=lambda: result.append(
        _session(fake, idle["encoded_jit_config"]).status_code))
    fake.long_poll = 10.0
    polling.start()
    assert fake.wait_for(lambda: fake.runners[idle["runner"]["id"]].status == "online", 5)
    gone = api.delete(f"/orgs/{ORG}/actions/runners/{idle['runner']['id']}")
    assert gone.status_code == 204 and gone.content == b""
    polling.join(5)
    assert result == [401] and fake.deleted_runners == ["idle"]
    assert api.delete(f"/orgs/{ORG}/actions/runners/{idle['runner']['id']}").status_code == 404
    busy = make_jit(api, "busy").json()
    fake.queue_job()
    assert _session(fake, busy["encoded_jit_config"]).status_code == 200
    refused = api.delete(f"/orgs/{ORG}/actions/runners/{busy['runner']['id']}")
    assert refused.status_code == 422
    assert refused.json()["message"] == 'Bad request - Runner "busy" is still running a job"'
    assert api.get(f"/orgs/{ORG}/actions/runners/{busy['runner']['id']}").json()["busy"]


def test_runner_list_pagination_link_header(api: httpx.Client) -> None:
    """per_page/page slice runner lists with a Link header (next/last, prev/first), max 100."""
    for i in range(5):
        make_jit(api, f"p{i}")
    first = api.get(f"/orgs/{ORG}/actions/runners", params={"per_page": 2})
    assert [r["name"] for r in first.json()["runners"]] == ["p0", "p1"]
    assert first.json()["total_count"] == 5
    links = first.headers["Link"]
    assert 'page=2>; rel="next"' in links and 'page=3>; rel="last"' in links
    last = api.get(f"/orgs/{ORG}/actions/runners", params={"per_page": 2, "page": 3})
    assert [r["name"] for r in last.json()["runners"]] == ["p4"]
    assert 'rel="next"' not in last.headers["Link"] and 'rel="prev"' in last.headers["Link"]
    assert "Link" not in api.get(f"/orgs/{ORG}/actions/runners").headers
    named = api.get(f"/orgs/{ORG}/actions/runners", params={"per_page": 1, "name": "p3"})
    assert "Link" not in named.headers and named.json()["total_count"] == 1
    assert len(api.get(f"/orgs/{ORG}/actions/runners",
                       params={"per_page": 500}).json()["runners"]) == 5


# -- PyGithub as the client ------------------------------------------------------------------
def test_pygithub_org_runner_lifecycle_and_repo_jitconfig(fake: FakeGitHub) -> None:
    """PyGithub: org JIT config, list, delete, 409, repo JIT config via requester, token auth."""
    gh = Github(auth=Auth.Token(TOKEN), base_url=fake.url, lazy=True)
    org = gh.get_organization(ORG)
    made = org.create_self_hosted_runner_jitconfig("py-org", 1, LABELS)
    assert made.runner.name == "py-org" and made.runner.id in fake.runners
    assert made.encoded_jit_config == fake.jit_configs[0]
    repo = gh.get_repo(REPO)
    _, data = repo._requester.requestJsonAndCheck(
        "POST", f"{repo.url}/actions/runners/generate-jitconfig",
        input={"name": "py-repo", "runner_group_id": 1, "labels": LABELS})
    assert fake.runners[data["runner"]["id"]].scope == f"repo:{REPO}"
    listed = list(org.get_self_hosted_runners())
    assert [(r.name, r.status, r.busy) for r in listed] == [("py-org", "offline", False)]
    assert [x["name"] for x in listed[0].labels] == ["self-hosted", "Linux", "X64", "kata-ci"]
    org.delete_self_hosted_runner(listed[0].id)
    assert list(org.get_self_hosted_runners()) == [] and fake.deleted_runners == ["py-org"]
    org.create_self_hosted_runner_jitconfig("py-repo", 1, LABELS)  # another pool
    with pytest.raises(GithubException) as conflict:
        org.create_self_hosted_runner_jitconfig("py-repo", 1, LABELS)
    assert conflict.value.status == 409
    assert all(r.headers["authorization"] == f"token {TOKEN}" for r in fake.requests)


def test_pygithub_reads_queued_runs_and_their_jobs(fake: FakeGitHub, api: httpx.Client) -> None:
    """PyGithub get_workflow_runs(status=queued) and run.jobs() parse ids, labels, runner_name."""
    taken = fake.queue_job(labels=LABELS)
    waiting = fake.queue_job(labels=[*LABELS, "big"], name="test")
    fake.queue_job(repo="octo-org/other")
    assert _session(fake, make_jit(api, "r1").json()["encoded_jit_config"]).json()["job"][
        "id"] == taken.id
    gh = Github(auth=Auth.Token(TOKEN), base_url=fake.url, lazy=True)
    repo = gh.get_repo(REPO)
    queued = list(repo.get_workflow_runs(status="queued"))
    assert [run.id for run in queued] == [waiting.run_id] and queued[0].name == "CI"
    jobs = list(queued[0].jobs())
    assert [(j.id, j.labels, j.status, j.name) for j in jobs] == [
        (waiting.id, [*LABELS, "big"], "queued", "test")]
    assert jobs[0].runner_name is None
    running = [run for run in repo.get_workflow_runs() if run.id == taken.run_id]
    assert [(j.status, j.runner_name) for j in running[0].jobs()] == [("in_progress", "r1")]
    assert repo.get_workflow_runs(status="in_progress").totalCount == 1
    single = api.get(f"/repos/{REPO}/actions/jobs/{waiting.id}").json()
    assert _keys(single) == _keys(fixture("webhooks/workflow_job.queued.payload.json")[
        "workflow_job"]) | {"steps": []}


def test_pygithub_app_installation_auth(tmp_path: Path) -> None:
    """PyGithub AppAuth's JWT gets the installation token; a JWT from another key gets 401."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    private = key.private_bytes(serialization.Encoding.PEM,
                                serialization.PrivateFormat.TraditionalOpenSSL,
                                serialization.NoEncryption()).decode()
    public = key.public_key().public_bytes(serialization.Encoding.PEM,
                                           serialization.PublicFormat.SubjectPublicKeyInfo)
    with FakeGitHub(token=TOKEN, app_id=31337, app_public_key=public,
                    installation_id=77) as fake:
        auth = Auth.AppAuth(31337, private).get_installation_auth(77)
        gh = Github(auth=auth, base_url=fake.url, lazy=True)
        assert list(gh.get_organization(ORG).get_self_hosted_runners()) == []
        minted = [r for r in fake.requests if r.path.startswith("/app/")]
        assert [(r.path, r.status) for r in minted] == [("/app/installations/77/access_tokens",
                                                         201)]
        assert minted[0].headers["authorization"].startswith("Bearer ey")
        assert fake.requests[-1].headers["authorization"] == f"token {TOKEN}"
        other = rsa.generate_private_key(public_exponent=65537, key_size=2048).private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption()).decode()
        stranger = Github(auth=Auth.AppAuth(31337, other).get_installation_auth(77),
                          base_url=fake.url, lazy=True)
        with pytest.raises(GithubException) as refused:
            list(stranger.get_organization(ORG).get_self_hosted_runners())
        assert refused.value.status == 401


# -- webhooks --------------------------------------------------------------------------------
class Receiver:
    """A webhook receiver: records each POST (headers, body) and answers ``status``."""

    def __init__(self, status: int = 202) -> None:
        self.got: list[tuple[dict[str, str], bytes]] = []
        self.status = status
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                outer.got.append(({k.lower(): v for k, v in self.headers.items()}, body))
                self.send_response(outer.status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/webhook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def hooked() -> Iterator[tuple[FakeGitHub, Receiver]]:
    receiver = Receiver()
    with FakeGitHub(token=TOKEN, webhook_url=receiver.url, webhook_secret=SECRET,
                    long_poll=0.5, installation_id=99) as fake:
        yield fake, receiver
    receiver.close()


def _verified(headers: dict[str, str], body: bytes) -> bool:
    want = "sha256=" + hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
    return hmac.compare_digest(want, headers["x-hub-signature-256"])


def test_job_states_arrive_as_signed_workflow_job_webhooks(
        hooked: tuple[FakeGitHub, Receiver]) -> None:
    """queued/in_progress/completed webhooks arrive in order, signed, with the fixtures' keys."""
    fake, receiver = hooked
    job = fake.queue_job(labels=LABELS)
    with httpx.Client(base_url=fake.url, headers={"Authorization": f"token {TOKEN}"}) as api:
        encoded = make_jit(api, "hooked").json()["encoded_jit_config"]
    assert _session(fake, encoded).status_code == 200
    secret = _files(encoded)[".credentials_rsaparams"]["secret"]
    done = httpx.post(f"{fake.url}/_fake_actions/jobs/{job.id}/complete",
                      json={"conclusion": "failure"}, headers={"Authorization": f"Bearer {secret}"})
    assert done.status_code == 200
    assert fake.wait_for(lambda: len(fake.deliveries) == 3, 10)
    assert [d.status for d in fake.deliveries] == [202] * 3
    examples = {"queued": "queued", "in_progress": "in_progress",
                "completed": "completed.failure.with-organization"}
    seen = []
    for (headers, body), delivery in zip(receiver.got, fake.deliveries, strict=True):
        assert _verified(headers, body) and body == delivery.body
        assert headers["x-hub-signature"] == "sha1=" + hmac.new(
            SECRET.encode(), body, hashlib.sha1).hexdigest()
        assert headers["x-github-event"] == "workflow_job"
        assert headers["user-agent"].startswith("GitHub-Hookshot/")
        assert headers["x-github-delivery"] == delivery.guid and headers["x-github-hook-id"]
        payload = json.loads(body)
        example = fixture(f"webhooks/workflow_job.{examples[payload['action']]}.payload.json")
        assert set(payload) == set(example)
        assert all(_keys(payload[k]) == _keys(example[k]) for k in example if k != "workflow_job")
        assert set(payload["workflow_job"]) == set(example["workflow_job"])
        wj = payload["workflow_job"]
        assert (wj["id"], wj["run_id"], wj["labels"]) == (job.id, job.run_id, LABELS)
        assert payload["repository"]["full_name"] == REPO
        seen.append((payload["action"], wj["status"], wj["conclusion"], wj["runner_name"]))
    assert seen == [("queued", "queued", None, None), ("in_progress", "in_progress", None,
                                                        "hooked"),
                    ("completed", "completed", "failure", "hooked")]
    assert json.loads(receiver.got[0][1])["installation"]["id"] == 99
    assert fake.removed_by_github == ["hooked"] and fake.runners == {}


def test_lost_webhook_cancel_redelivery_and_failed_delivery(
        hooked: tuple[FakeGitHub, Receiver]) -> None:
    """deliver=False sends none; cancel sends completed; redelivery keeps guid; no retry on 500."""
    fake, receiver = hooked
    lost = fake.queue_job(deliver=False)
    fake.cancel_job(lost.id)
    assert fake.wait_for(lambda: len(fake.deliveries) == 1, 10)
    cancelled = json.loads(fake.deliveries[0].body)
    assert cancelled["action"] == "completed" and fake.deliveries[0].job_id == lost.id
    assert cancelled["workflow_job"]["conclusion"] == "cancelled"
    again = fake.redeliver(fake.deliveries[0].guid)
    assert again.status == 202 and again.redelivery
    assert receiver.got[1][0]["x-github-delivery"] == receiver.got[0][0]["x-github-delivery"]
    assert receiver.got[1][1] == receiver.got[0][1]
    receiver.status = 500
    fake.queue_job()
    assert fake.wait_for(lambda: len(fake.deliveries) == 3, 10)
    time.sleep(0.5)
    assert fake.deliveries[2].status == 500 and len(receiver.got) == 3
    with pytest.raises(ValueError):
        fake.cancel_job(lost.id)


def test_sign_and_raw_deliveries() -> None:
    """sign() matches GitHub's test vector; deliver_raw posts raw bytes; a down receiver: error."""
    receiver = Receiver(status=401)
    with FakeGitHub(webhook_url=receiver.url, webhook_secret="It's a Secret to Everybody") as f:
        assert f.sign(b"Hello, World!") == ("sha256=757107ea0eb2509fc211221cce984b8a37570b6d"
                                            "7586c22c46f4379c8b043e17")
        assert f.deliver_raw(b"\xff not json", {"X-GitHub-Event": "workflow_job"}) == 401
        assert receiver.got[0][1] == b"\xff not json"
    receiver.close()
    with FakeGitHub(webhook_url=receiver.url, webhook_secret="s") as down:
        down.queue_job()
        assert down.wait_for(lambda: len(down.deliveries) == 1, 10)
        assert down.deliveries[0].status is None and down.deliveries[0].error


# -- the job hand-out protocol ---------------------------------------------------------------
def test_hand_out_oldest_matching_job_one_job_per_runner(fake: FakeGitHub,
                                                         api: httpx.Client) -> None:
    """Sessions hand out the oldest matching job (any runner), 409 on reuse, 401, 204 when idle."""
    older = fake.queue_job(labels=LABELS)
    mine = fake.queue_job(labels=[*LABELS, "big"])
    fake.queue_job(labels=[*LABELS, "gpu"])
    encoded = make_jit(api, "big-one", [*LABELS, "big"]).json()["encoded_jit_config"]
    got = _session(fake, encoded)
    assert got.status_code == 200 and got.json()["job"]["id"] == older.id
    assert set(got.json()["job"]) == {"id", "run_id", "name", "repository", "steps", "env"}
    assert fake.jobs[older.id].runner_name == "big-one" and fake.jobs[mine.id].status == "queued"
    runner = next(iter(fake.runners.values()))
    assert (runner.status, runner.busy, runner.got_job) == ("online", True, older.id)
    assert _session(fake, encoded).status_code == 409
    other = make_jit(api, "small", LABELS).json()["encoded_jit_config"]
    started = time.monotonic()
    assert _session(fake, other).status_code == 204  # the jobs left need big or gpu
    assert time.monotonic() - started >= 0.4
    wrong = httpx.post(f"{fake.url}/_fake_actions/sessions",
                       headers={"Authorization": "Bearer not-a-runner"})
    assert wrong.status_code == 401
