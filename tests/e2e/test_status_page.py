"""The status page end to end: headless Chromium (Debian's, through Debian's chromedriver)
on a real `kata-ci status` (with a token), over a real Redis, a real `kata-ci worker` running
the job in a real VM, and the job coming from the contract fake of GitLab through a real
`kata-ci gitlab run`, with a masked variable the script echoes.

The masked value reaches the job's environment through the GitLab payload (stored in the job
hash's ``gitlab`` field) and the job prints it every second: the page must show the output
live, masked, and never the value, neither from the log nor from the job's record."""

from __future__ import annotations

import json
import socket
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import pytest
import redis

from kata_ci.runner.queue.store import JobStore
from tests.e2e.test_daemon import Worker
from tests.e2e.test_gitlab_runner import Poller
from tests.fakes.git_http import make_repo
from tests.fakes.gitlab import FakeGitLab
from tests.integration.redis_server import RedisServer
from tests.integration.test_status_web import StatusServer, artifact, chromium, sse

if TYPE_CHECKING:
    from selenium.webdriver.remote.webdriver import WebDriver

pytestmark = pytest.mark.vm
SECRET = "st4tus-Page-Secret-0xBADC0DE"
TOKEN = "e2e-status-token-0123456789abcdef"
TICKS = 8


@pytest.fixture
def gitlab(tmp_path: Path) -> Iterator[FakeGitLab]:
    fake = FakeGitLab(make_repo(tmp_path, {"hello.txt": "hello\n"}), long_poll=2.0,
                      trace_interval=1)
    fake.start()
    yield fake
    fake.stop()


@pytest.fixture
def stack(request: pytest.FixtureRequest, gitlab: FakeGitLab, redis_server: RedisServer,
          run_root: Path, tmp_path: Path) -> Iterator[StatusServer]:
    """A worker, a `gitlab run` poller and `kata-ci status` (token required) on one config."""
    redis.Redis.from_url(redis_server.url).flushdb()
    config = tmp_path / "config.toml"
    config.write_text(
        f'[queue]\nbroker = "{redis_server.url}"\n[vm]\ngrace = 2\nnetwork = "none"\n'
        f'[gitlab]\ncache_dir = "{tmp_path / "cache"}"\n'
        f'[[gitlab.runners]]\nurl = "{gitlab.url}"\ntoken = "{gitlab.runner_token}"\n'
        f'system_id = "s_0123456789ab"\nid = 1\nlabel = "default"\n')
    worker = Worker(config, ["default"], run_root)
    poller = Poller(config, tmp_path / "poller.log")
    server: StatusServer | None = None
    try:
        worker.start()
        poller.start()
        server = StatusServer(config, tmp_path / "status.log", token=TOKEN)
        yield server
    finally:
        if server is not None:
            server.stop()
        poller.stop()
        worker.stop()
        if getattr(request.node, "rep_call", None) and request.node.rep_call.failed:
            for log in (worker.log, poller.log, tmp_path / "status.log"):
                if log.exists():
                    print(f"\n=== {log} ===\n{log.read_text()[-5000:]}", file=sys.stderr)


def _clean(driver: WebDriver, *values: str) -> None:
    """None of ``values`` is anywhere in the page: its DOM (markup and text) or its text."""
    from selenium.webdriver.common.by import By

    source, text = driver.page_source, driver.find_element(By.TAG_NAME, "body").text
    for value in values:
        assert value not in source and value not in text


def test_the_page_follows_a_running_gitlab_job_live_and_never_shows_its_secret(
        stack: StatusServer, gitlab: FakeGitLab, redis_server: RedisServer) -> None:
    """Chromium opens the page with the token link (cookie set, token dropped from the
    address), sees a GitLab job appear, its VM under this host, and its log lines arrive
    one by one while it runs with the masked variable shown as [MASKED]; at the end the
    job's timings and state are shown. The variable's value and the GitLab job token are
    never in the page, nor in any API answer. Screenshots are kept as test artifacts."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    store = JobStore.connect(redis_server.url)
    script = f'for i in $(seq {TICKS}); do echo "tick $i of {TICKS}: $MY_SECRET"; sleep 1; done'
    with chromium() as driver:
        driver.get(f"{stack.url}/?token={TOKEN}")
        assert driver.current_url == f"{stack.url}/"
        fake = gitlab.add_job([script], name="status page", variables=[
            {"key": "MY_SECRET", "value": SECRET, "masked": True, "public": False}])
        secrets = (SECRET, fake.token)
        wait = WebDriverWait(driver, 300, poll_frequency=0.2)

        def row_of_job(d: WebDriver) -> str | None:
            _clean(d, *secrets)
            for row in d.find_elements(By.CSS_SELECTOR, "#jobs tbody tr"):
                if row.find_element(By.CSS_SELECTOR, "td.cmd").text == "status page":
                    return row.get_attribute("data-id")
            return None

        job_id = wait.until(row_of_job)
        assert job_id is not None
        driver.find_element(By.CSS_SELECTOR, f'#jobs tr[data-id="{job_id}"] button').click()
        log = driver.find_element(By.ID, "log")

        def log_has(line: str) -> Callable[[WebDriver], bool]:
            def check(d: WebDriver) -> bool:
                _clean(d, *secrets)
                return line in log.text
            return check

        wait.until(log_has(f"tick 1 of {TICKS}: [MASKED]"))
        first_seen = store.get(job_id)
        assert first_seen.state == "running", "the first line must arrive while it runs"
        assert f"tick {TICKS} of" not in log.text
        wait.until(log_has(f"tick 3 of {TICKS}: [MASKED]"))
        assert store.get(job_id).state == "running"  # lines keep arriving, no reload
        host = driver.find_element(By.ID, "hosts").text
        assert socket.gethostname() in host and job_id in host
        driver.save_screenshot(str(artifact("status_page_live.png")))

        def ended(d: WebDriver) -> bool:
            _clean(d, *secrets)
            return bool(d.find_element(By.ID, "log-state").text == "success")

        wait.until(ended)
        done = gitlab.wait_final(fake.id, 60)
        assert done.final is not None and done.final["state"] == "success", bytes(done.trace)
        lines = [line for line in log.text.splitlines() if line.startswith("tick ")]
        assert lines == [f"tick {i} of {TICKS}: [MASKED]" for i in range(1, TICKS + 1)]

        def timings_shown(d: WebDriver) -> bool:
            row = d.find_element(By.CSS_SELECTOR, f'#jobs tr[data-id="{job_id}"]')
            cells = [c.text for c in row.find_elements(By.CSS_SELECTOR, "td.num")]
            return "success" in row.text and all(c and c[0].isdigit() and "…" not in c
                                                 for c in cells)

        wait.until(timings_shown)
        row = driver.find_element(By.CSS_SELECTOR, f'#jobs tr[data-id="{job_id}"]')
        assert "gitlab" in row.text and socket.gethostname() in row.text
        _clean(driver, *secrets)
        driver.save_screenshot(str(artifact("status_page_done.png")))

    bearer = {"Authorization": f"Bearer {TOKEN}"}
    bodies = [httpx.get(f"{stack.url}{path}", headers=bearer, timeout=30).text for path in (
        "/api/jobs", f"/api/jobs/{job_id}", "/api/hosts", f"/api/jobs/{job_id}/log")]
    events = sse(bodies[3])
    assert events[-1]["event"] == "end" and json.loads(events[-1]["data"])["state"] == "success"
    for body in bodies:
        for value in secrets:
            assert value not in body
