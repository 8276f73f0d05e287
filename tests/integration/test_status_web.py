"""The status page over a real Redis: the JSON and server-sent-event endpoints (Starlette's
TestClient), the real `kata-ci status` process (uvicorn on loopback: a live log, the token,
the refusal to listen beyond loopback without one), and headless Chromium rendering
job-controlled markup as text.

The helpers (``StatusServer``, ``chromium``, ``artifact``, ``sse``) serve the real-VM test
too (tests/e2e/test_status_page.py)."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import httpx
import pytest
import redis
from starlette.exceptions import StarletteDeprecationWarning

from kata_ci.runner.ops.web import WebSettings, create_app
from kata_ci.runner.queue import capacity
from kata_ci.runner.queue.store import Job, JobStore
from tests.e2e.conftest import KATA_CI, stop_process
from tests.integration.redis_server import RedisServer, free_port

with warnings.catch_warnings():  # Starlette would rather have httpx2, which is not packaged
    warnings.simplefilter("ignore", StarletteDeprecationWarning)
    from starlette.testclient import TestClient

if TYPE_CHECKING:  # selenium is imported where a browser is started
    from selenium.webdriver.remote.webdriver import WebDriver

ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts"
TOKEN = "status-token-0123456789abcdef"
ENV_SECRET = "env-value-that-must-stay-private"
PAYLOAD_TOKEN = "glcbt-payload-token-that-must-stay-private"
LOCAL = "http://127.0.0.1:8480"  # TestClient's base: a loopback Host header


# -- helpers, shared with the real-VM test ------------------------------------------------------
def sse(text: str) -> list[dict[str, str]]:
    """Server-sent events as dicts of their fields (comments and retry-only blocks dropped)."""
    events = []
    for block in text.split("\n\n"):
        fields: dict[str, str] = {}
        for line in block.splitlines():
            if line and not line.startswith(":"):
                name, _, value = line.partition(": ")
                fields[name] = value
        if "event" in fields:
            events.append(fields)
    return events


def artifact(name: str) -> Path:
    """A file kept after the run under tests/artifacts/ (git-ignored), its path printed."""
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / name
    print(f"test artifact: {path}", file=sys.stderr)
    return path


@contextlib.contextmanager
def chromium() -> Iterator[WebDriver]:
    """Debian's headless Chromium through Debian's chromedriver (no driver download)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for arg in ("--headless=new", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1500,1100"):
        options.add_argument(arg)
    if os.geteuid() == 0:  # Chromium's sandbox refuses to run as root
        options.add_argument("--no-sandbox")
    driver = webdriver.Chrome(options=options, service=Service("/usr/bin/chromedriver"))
    try:
        yield driver
    finally:
        driver.quit()


class StatusServer:
    """A real `kata-ci status` process on a free loopback port."""

    def __init__(self, config: Path, log: Path, token: str = "",
                 host: str = "127.0.0.1") -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        env = {k: v for k, v in os.environ.items() if k != "KATA_CI_STATUS_TOKEN"}
        if token:
            env["KATA_CI_STATUS_TOKEN"] = token
        with log.open("ab") as sink:
            self.proc = subprocess.Popen(
                [*KATA_CI, "status", "--config", str(config), "--listen", f"{host}:{self.port}"],
                env=env, stdout=sink, stderr=sink)
        deadline = time.monotonic() + 30
        while True:
            try:
                httpx.get(self.url + "/", timeout=2)
                return
            except httpx.TransportError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(f"kata-ci status did not start: "
                                         f"{log.read_text()[-2000:]}") from None
                time.sleep(0.1)

    def stop(self) -> None:
        stop_process(self.proc, 15)


# -- fixtures -------------------------------------------------------------------------------------
@pytest.fixture
def store(redis_server: RedisServer) -> JobStore:
    client = redis.Redis.from_url(redis_server.url)
    client.flushdb()
    return JobStore(client)


@pytest.fixture
def config(redis_server: RedisServer, tmp_path: Path) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(f'[queue]\nbroker = "{redis_server.url}"\n')
    return path


def page(store: JobStore, token: str = "") -> TestClient:
    return TestClient(create_app(store, WebSettings(token=token, poll=0.05)), base_url=LOCAL)


def ended(store: JobStore, chunks: list[tuple[str, bytes]], state: str = "success",
          code: int | None = 0, message: str = "", **create: Any) -> Job:
    """A job claimed on host-a that wrote ``chunks`` and ended."""
    job = store.create(create.pop("argv", ["make", "test"]), create.pop("label", "default"),
                       60, None, **create)
    token = store.claim(job.id, "w1", "host-a", 1)
    assert token
    store.milestone(job.id, token, vm_ready_at=str(time.time()), vm_start="restore")
    for stream, data in chunks:
        store.append_log(job.id, stream, data, token)
    assert store.finish(job.id, token, state, code, message)
    return store.get(job.id)


# -- the JSON endpoints --------------------------------------------------------------------------
def test_jobs_are_listed_newest_first_with_source_label_state_and_milestones(
        store: JobStore) -> None:
    """/api/jobs: each job's source, label, state, argv, host and the milestone times the
    store holds (queued, claimed, VM ready and how, first output, ended)."""
    old = ended(store, [("stdout", b"x\n")], "failed", 3, "exit status 3", label="big")
    fresh = store.create(["sleep", "9"], "default", 60, None)
    r = store.r
    r.hset(f"kataci:job:{old.id}", mapping={"created_at": "1000.0", "started_at": "1002.0",
                                            "vm_ready_at": "1003.5",
                                            "first_output_at": "1004.0",
                                            "finished_at": "1010.0"})
    answer = page(store).get("/api/jobs")
    assert answer.status_code == 200 and answer.headers["content-type"] == "application/json"
    jobs = answer.json()["jobs"]
    assert [j["id"] for j in jobs] == [fresh.id, old.id]
    shown = jobs[1]
    assert (shown["source"], shown["label"], shown["state"], shown["exit_code"]) == (
        "queue", "big", "failed", 3)
    assert shown["argv"] == ["make", "test"] and shown["host"] == "host-a"
    assert shown["message"] == "exit status 3" and shown["vm_start"] == "restore"
    assert [shown[k] for k in ("created_at", "started_at", "vm_ready_at", "first_output_at",
                               "finished_at")] == [1000.0, 1002.0, 1003.5, 1004.0, 1010.0]
    assert jobs[0]["state"] == "queued" and jobs[0]["started_at"] is None
    assert page(store).get(f"/api/jobs/{old.id}").json()["job"]["id"] == old.id
    assert page(store).get("/api/jobs/0123456789abcdef").status_code == 404


def test_running_vms_are_grouped_by_host_beside_the_workers_slots(store: JobStore) -> None:
    """/api/hosts: running jobs under the host of the worker that claimed them (ended and
    queued jobs are not there), and each live worker's labels and busy/concurrency."""
    running: dict[str, list[str]] = {}
    for host in ("host-a", "host-b", "host-a"):
        job = store.create(["sleep", "60"], "default", 60, None)
        assert store.claim(job.id, f"w@{host}", host, 1)
        running.setdefault(host, []).append(job.id)
    ended(store, [])
    store.create(["queued"], "default", 60, None)
    capacity.announce(store.r, "w@host-a", ["default", "big"], 2, 2, 30)
    answer = page(store).get("/api/hosts").json()
    assert {h["host"]: [j["id"] for j in h["jobs"]] for h in answer["hosts"]} == running
    assert answer["workers"] == [{"name": "w@host-a", "labels": ["default", "big"],
                                  "concurrency": 2, "busy": 2}]


def test_a_jobs_env_and_gitlab_payload_are_never_served(store: JobStore) -> None:
    """A job with a private `-e` value and a GitLab payload (job token, variables): no
    endpoint's answer holds either, nor the names of those fields."""
    payload = {"token": PAYLOAD_TOKEN, "variables": [{"key": "K", "value": PAYLOAD_TOKEN}]}
    job = ended(store, [("stdout", b"ok\n")], env={"API_KEY": ENV_SECRET},
                gitlab={"url": "https://gitlab.example", "payload": payload})
    running = store.create(["x"], "default", 60, None, env={"API_KEY": ENV_SECRET},
                           gitlab={"payload": payload})
    assert store.claim(running.id, "w", "host-a", 1)
    client = page(store)
    bodies = [client.get(path).text for path in (
        "/api/jobs", f"/api/jobs/{job.id}", "/api/hosts", f"/api/jobs/{job.id}/log",
        f"/api/jobs/{running.id}")]
    assert job.id in bodies[0] and running.id in bodies[2] and "ok\\n" in bodies[3]
    for body in bodies:
        for private in (ENV_SECRET, PAYLOAD_TOKEN, "API_KEY", "gitlab.example", '"env":',
                        '"gitlab":', '"payload":'):
            assert private not in body


# -- the log stream ------------------------------------------------------------------------------
def test_the_log_stream_sends_the_stored_chunks_then_an_end_event(store: JobStore) -> None:
    """/api/jobs/<id>/log of an ended job: every stored chunk in order with its stream and
    the stream entry id, a UTF-8 character split across two chunks decoded whole, then one
    `end` event with the state, exit code and message; then the stream closes."""
    job = ended(store, [("stdout", b"caf\xc3"), ("stdout", b"\xa9 open\n"),
                        ("stderr", b"warning\n"), ("stdout", b"<b>done</b>\n")],
                "failed", 2, "exit status 2")
    answer = page(store).get(f"/api/jobs/{job.id}/log")
    assert answer.headers["content-type"].startswith("text/event-stream")
    events = sse(answer.text)
    chunks = [json.loads(e["data"]) for e in events if e["event"] == "chunk"]
    assert chunks == [{"s": "stdout", "d": "caf"}, {"s": "stdout", "d": "é open\n"},
                      {"s": "stderr", "d": "warning\n"}, {"s": "stdout", "d": "<b>done</b>\n"}]
    ids = [e["id"] for e in events if e["event"] == "chunk"]
    stored = cast(list[tuple[bytes, Any]], store.r.xrange(f"kataci:log:{job.id}"))
    assert ids == [entry_id.decode() for entry_id, _ in stored]
    assert events[-1]["event"] == "end" and len([e for e in events if e["event"] == "end"]) == 1
    assert json.loads(events[-1]["data"]) == {"state": "failed", "exit_code": 2,
                                              "message": "exit status 2"}


def test_a_reconnecting_stream_resumes_after_its_last_event_id(store: JobStore) -> None:
    """EventSource's Last-Event-ID: the chunks after that entry, none again."""
    job = ended(store, [("stdout", b"one\n"), ("stdout", b"two\n"), ("stdout", b"three\n")])
    first = [e for e in sse(page(store).get(f"/api/jobs/{job.id}/log").text)
             if e["event"] == "chunk"]
    again = sse(page(store).get(f"/api/jobs/{job.id}/log",
                                headers={"Last-Event-ID": first[0]["id"]}).text)
    assert [json.loads(e["data"])["d"] for e in again if e["event"] == "chunk"] == [
        "two\n", "three\n"]
    assert again[-1]["event"] == "end"


def test_a_followed_log_arrives_live_and_ends_with_the_job(
        store: JobStore, config: Path, tmp_path: Path) -> None:
    """The real server: a chunk written while the job runs reaches an open stream before the
    next is written, and the job's ending closes the stream with an `end` event."""
    job = store.create(["tick"], "default", 60, None)
    token = store.claim(job.id, "w", "host-a", 1)
    assert token
    server = StatusServer(config, tmp_path / "status.log", token=TOKEN)
    got: list[dict[str, str]] = []
    try:
        with httpx.stream("GET", f"{server.url}/api/jobs/{job.id}/log", timeout=30,
                          headers={"Authorization": f"Bearer {TOKEN}"}) as answer:
            assert answer.status_code == 200
            buffer = ""
            store.append_log(job.id, "stdout", b"tick 1\n", token)
            for text in answer.iter_text():
                buffer += text
                got = sse(buffer)
                chunks = [json.loads(e["data"])["d"] for e in got if e["event"] == "chunk"]
                if chunks == ["tick 1\n"]:
                    assert store.get(job.id).state == "running"
                    store.append_log(job.id, "stdout", b"tick 2\n", token)
                elif chunks == ["tick 1\n", "tick 2\n"] and store.get(job.id).state == "running":
                    store.finish(job.id, token, "success", 0, "")
    finally:
        server.stop()
    assert [json.loads(e["data"])["d"] for e in got if e["event"] == "chunk"] == [
        "tick 1\n", "tick 2\n"]
    assert got[-1]["event"] == "end" and json.loads(got[-1]["data"])["state"] == "success"



def test_stopping_the_server_ends_open_log_streams_at_once(
        store: JobStore, config: Path, tmp_path: Path) -> None:
    """SIGTERM while a running job's log is followed: the stream ends without an `end`
    event (the job goes on; the browser reconnects later) and the server is gone within
    a few seconds, not when the job ends."""
    job = store.create(["sleep"], "default", 60, None)
    assert store.claim(job.id, "w", "host-a", 1)
    server = StatusServer(config, tmp_path / "status.log")
    received, began = "", 0.0
    with httpx.stream("GET", f"{server.url}/api/jobs/{job.id}/log", timeout=30) as answer:
        for text in answer.iter_text():
            received += text
            if "retry:" in received:
                began = time.monotonic()
                server.proc.terminate()
        server.proc.wait(10)
    assert time.monotonic() - began < 4
    assert "event: end" not in received and store.get(job.id).state == "running"


# -- access --------------------------------------------------------------------------------------
def test_with_a_token_every_request_needs_it(store: JobStore) -> None:
    """No token or a wrong one: 401 on the page, its files, the API and the log stream;
    the right bearer token: 200."""
    job = ended(store, [("stdout", b"hi\n")])
    client = page(store, TOKEN)
    paths = ["/", "/static/app.js", "/static/style.css", "/api/jobs", "/api/hosts",
             f"/api/jobs/{job.id}", f"/api/jobs/{job.id}/log"]
    for path in paths:
        assert client.get(path).status_code == 401, path
        assert client.get(path, headers={"Authorization": "Bearer " + TOKEN[:-1] + "X"}
                          ).status_code == 401, path
        assert client.get(path, headers={"Authorization": f"Bearer {TOKEN}"}
                          ).status_code == 200, path
    assert client.get("/api/jobs").headers["www-authenticate"].startswith("Bearer")


def test_the_token_link_sets_a_strict_http_only_cookie_and_leaves_the_address(
        store: JobStore) -> None:
    """/?token=T: a redirect to / that sets an HttpOnly, SameSite=Strict cookie (not the
    token itself) with which the API answers; a wrong token or cookie gets 401."""
    client = page(store, TOKEN)
    wrong = client.get("/?token=not-the-token", follow_redirects=False)
    assert wrong.status_code == 401 and "set-cookie" not in wrong.headers
    answer = client.get(f"/?token={TOKEN}", follow_redirects=False)
    assert answer.status_code == 303 and answer.headers["location"] == "/"
    cookie = answer.headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie and "Path=/" in cookie
    assert TOKEN not in cookie
    assert client.get("/api/jobs").status_code == 200  # the client keeps the cookie
    assert client.get("/").status_code == 200
    stranger = page(store, TOKEN)
    stranger.cookies.set("kataci_status", "0" * 64)
    assert stranger.get("/api/jobs").status_code == 401


def test_every_answer_carries_the_security_headers(store: JobStore) -> None:
    """CSP default-src 'self' with frame-ancestors 'none', nosniff, no-referrer and no-store
    on the page, its files, the API, a 404 and a 401; the page has no inline script or
    style for the CSP to block."""
    answers = [page(store).get(p) for p in ("/", "/static/app.js", "/static/style.css",
                                            "/api/jobs", "/api/jobs/ffff")]
    answers.append(page(store, TOKEN).get("/api/jobs"))
    assert [a.status_code for a in answers] == [200, 200, 200, 200, 404, 401]
    for answer in answers:
        csp = answer.headers["content-security-policy"]
        assert "default-src 'self'" in csp and "frame-ancestors 'none'" in csp
        assert "unsafe-inline" not in csp
        assert answer.headers["x-content-type-options"] == "nosniff"
        assert answer.headers["referrer-policy"] == "no-referrer"
        assert answer.headers["cache-control"] == "no-store"
    html = answers[0].text
    assert html.count("<script") == 1 and '<script src="/static/app.js"' in html
    assert "<style" not in html and " style=" not in html and " on" not in html.lower()


def test_without_a_token_only_loopback_host_names_are_answered(store: JobStore) -> None:
    """A DNS-rebinding page (Host: its own name) gets 400; loopback names get the page."""
    client = page(store)
    assert client.get("/api/jobs", headers={"Host": "evil.example:8480"}).status_code == 400
    assert client.get("/", headers={"Host": "10.0.0.5:8480"}).status_code == 400
    for host in ("127.0.0.1:8480", "localhost:8480", "[::1]:8480", "127.0.0.2"):
        assert client.get("/api/jobs", headers={"Host": host}).status_code == 200, host


def test_status_refuses_to_listen_beyond_loopback_without_a_token(
        config: Path, tmp_path: Path) -> None:
    """`kata-ci status --listen 0.0.0.0:P` without a token: one line, exit 2, nothing
    listens; a too short token is refused too; with $KATA_CI_STATUS_TOKEN it serves, and
    asks for the token."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "KATA_CI_STATUS_TOKEN"}
    refused = subprocess.run([*KATA_CI, "status", "--config", str(config), "--listen",
                              f"0.0.0.0:{port}"], env=env, capture_output=True, timeout=60)
    assert refused.returncode == 2
    assert refused.stderr.decode().strip().splitlines() == [
        "kata-ci: refusing to serve the status page on 0.0.0.0 without a token: give "
        "--token-file or $KATA_CI_STATUS_TOKEN, or listen on loopback"]
    with pytest.raises(httpx.TransportError):
        httpx.get(f"http://127.0.0.1:{port}/", timeout=2)
    short = tmp_path / "short"
    short.write_text("abc\n")
    too_short = subprocess.run([*KATA_CI, "status", "--config", str(config), "--listen",
                                f"0.0.0.0:{port}", "--token-file", str(short)], env=env,
                               capture_output=True, timeout=60)
    assert too_short.returncode == 2 and b"at least 16 characters" in too_short.stderr
    server = StatusServer(config, tmp_path / "status.log", token=TOKEN, host="0.0.0.0")
    try:
        assert httpx.get(server.url + "/api/jobs", timeout=5).status_code == 401
        assert httpx.get(server.url + "/api/jobs", timeout=5,
                         headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200
    finally:
        server.stop()


# -- the page in a browser -----------------------------------------------------------------------
def test_job_controlled_markup_is_shown_as_text_in_chromium(
        store: JobStore, config: Path, tmp_path: Path) -> None:
    """Headless Chromium: a job whose command, label, message and log hold HTML and script
    shows them as literal text (no element is made from them, no script runs), and its
    timings show as durations between the stored milestones."""
    evil = '<img src=x onerror="window.pwned=1">'
    job = ended(store, [("stdout", f"{evil}\n<script>window.pwned=2</script>\n".encode())],
                "failed", 1, "<b>broke</b>", argv=["echo", evil], label="<i>lbl</i>")
    store.r.hset(f"kataci:job:{job.id}", mapping={
        "created_at": "1000.0", "started_at": "1002.0", "vm_ready_at": "1003.5",
        "first_output_at": "1004.0", "finished_at": "1016.0"})
    server = StatusServer(config, tmp_path / "status.log")
    try:
        with chromium() as driver:
            from selenium.webdriver.common.by import By
            from selenium.webdriver.support.ui import WebDriverWait

            driver.get(server.url + "/")
            wait = WebDriverWait(driver, 30)
            row = wait.until(lambda d: d.find_element(By.CSS_SELECTOR,
                                                      f'#jobs tr[data-id="{job.id}"]'))
            assert f"echo {evil}" in row.text and "<i>lbl</i>" in row.text
            assert "<b>broke</b>" in row.text
            cells = [c.text for c in row.find_elements(By.CSS_SELECTOR, "td.num")]
            assert cells == ["2.0s", "1.5s restore", "0.5s", "12s", "16s"]
            row.click()
            log = driver.find_element(By.ID, "log")
            wait.until(lambda d: "window.pwned=2" in log.text)
            wait.until(lambda d: d.find_element(By.ID, "log-state").text == "failed (1)")
            assert evil in log.text and "<script>window.pwned=2</script>" in log.text
            for tag in ("img", "i", "b", "script"):
                found = driver.find_elements(By.CSS_SELECTOR, f"main {tag}")
                assert found == [], tag
            assert driver.execute_script("return window.pwned === undefined")
            driver.save_screenshot(str(artifact("status_page_markup.png")))
    finally:
        server.stop()

