"""kata-ci's GitLab runner against the contract FAKE of GitLab (tests/fakes/gitlab.py)
with a real Redis and real git, no VMs: registration, taking jobs only with a free slot, the
two-phase commit, following a job's trace and ending, cancel relays, the host-side fetch."""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from kata_ci.errors import UserError
from kata_ci.runner.core import config as config_mod
from kata_ci.runner.core.sinks import Stream
from kata_ci.runner.gitlab_runner import sources
from kata_ci.runner.gitlab_runner.api import FEATURES
from kata_ci.runner.gitlab_runner.follow import INFLIGHT
from kata_ci.runner.gitlab_runner.payload import parse_job
from kata_ci.runner.gitlab_runner.poller import Poller
from kata_ci.runner.queue import capacity
from kata_ci.runner.queue.app import queue_name, sender
from kata_ci.runner.queue.store import JobStore
from tests.e2e.conftest import KATA_CI
from tests.fakes.git_http import make_repo
from tests.fakes.gitlab import FakeGitLab
from tests.integration.redis_server import RedisServer


@pytest.fixture
def fake(tmp_path: Path) -> Iterator[FakeGitLab]:
    with FakeGitLab(make_repo(tmp_path, {"a.txt": "from git\n"}), long_poll=0.5) as gitlab:
        yield gitlab


@pytest.fixture
def store(redis_server: RedisServer) -> JobStore:
    redis.Redis.from_url(redis_server.url).flushdb()
    return JobStore.connect(redis_server.url)


def _config(tmp_path: Path, fake: FakeGitLab, broker: str) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(f'[queue]\nbroker = "{broker}"\n'
                    f'[[gitlab.runners]]\nurl = "{fake.url}"\ntoken = "{fake.runner_token}"\n'
                    'system_id = "s_0123456789ab"\nid = 1\nlabel = "default"\n')
    return path


@contextlib.contextmanager
def polling(poller: Poller) -> Iterator[None]:
    """The poller running in a thread for the block, stopped after it however it ends."""
    thread = threading.Thread(target=poller.run, daemon=True)
    thread.start()
    try:
        yield
    finally:
        poller.stop.set()
        thread.join(10)


def _wait(check: object, seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not check():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def test_register_verifies_with_the_full_feature_list_and_writes_the_runner(
        fake: FakeGitLab, tmp_path: Path) -> None:
    """`kata-ci gitlab register` sends token, system_id and every feature to /runners/verify
    and stores the runner (0600); a wrong token is one clear line, exit 2, nothing written."""
    path = tmp_path / "config.toml"
    bad = subprocess.run([*KATA_CI, "gitlab", "register", "--url", fake.url, "--token",
                          "glrt-wrong", "--config", str(path)], capture_output=True, text=True)
    assert bad.returncode == 2 and "refused the token" in bad.stderr
    assert "Traceback" not in bad.stderr and not path.exists()
    fake.token_expires_in = 3600
    good = subprocess.run([*KATA_CI, "gitlab", "register", "--url", fake.url, "--token",
                           fake.runner_token, "--label", "default", "--config", str(path)],
                          capture_output=True, text=True)
    assert good.returncode == 0, good.stderr
    sent = fake.verify_calls[-1]
    assert sent["info"]["features"] == FEATURES and sent["system_id"].startswith(("s_", "r_"))
    runner = config_mod.load(path).gitlab.runners[0]
    assert runner.token == fake.runner_token and runner.id == 1
    assert runner.token_expires_at > time.time() and path.stat().st_mode & 0o077 == 0


def test_register_create_makes_the_runner_with_python_gitlab(fake: FakeGitLab,
                                                            tmp_path: Path) -> None:
    """--create project: the runner is created through POST /user/runners with the personal
    token (python-gitlab), then verified and stored; the personal token is stored nowhere."""
    secret = tmp_path / "pat"
    secret.write_text(fake.personal_token + "\n")
    path = tmp_path / "config.toml"
    done = subprocess.run([*KATA_CI, "gitlab", "register", "--url", fake.url, "--create",
                           "project", "--target-id", "7", "--tag", "kata-ci",
                           "--personal-token-file", str(secret), "--config", str(path)],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert fake.created_runners == [{"runner_type": "project_type", "project_id": 7,
                                     "tag_list": ["kata-ci"], "run_untagged": False,
                                     "description": "kata-ci"}]
    assert config_mod.load(path).gitlab.runners[0].token == fake.runner_token
    assert fake.personal_token not in path.read_text()
    secret.write_text("glpat-wrong")
    refused = subprocess.run([*KATA_CI, "gitlab", "register", "--url", fake.url, "--create",
                              "instance", "--personal-token-file", str(secret), "--config",
                              str(tmp_path / "other.toml")], capture_output=True, text=True)
    assert refused.returncode == 2 and "Traceback" not in refused.stderr, refused.stderr


def test_no_job_is_taken_without_a_free_worker_slot(fake: FakeGitLab, store: JobStore,
                                                    redis_server: RedisServer,
                                                    tmp_path: Path) -> None:
    """With no worker announced, jobs/request is never called; once a worker of the label
    has a slot, the job is requested, committed (PUT running) and queued in Celery."""
    config = config_mod.load(_config(tmp_path, fake, redis_server.url))
    poller = Poller(config, None, store, sender(redis_server.url, 3600), check_interval=0.1)
    job = fake.add_job(["echo hi"])
    with polling(poller):
        time.sleep(1.5)
        assert not any(r.path.endswith("/jobs/request") for r in fake.requests)
        capacity.announce(store.r, "w1", ["default"], 1, 0, 30)
        _wait(lambda: store.r.llen(queue_name("default")) == 1, 10, "the job to be queued")
        committed = [r for r in fake.requests if r.method == "PUT"]
        assert committed and b'"running"' in committed[0].body
        assert committed[0].headers["job-token"] == job.token
        queued = store.recent(1)[0]
        assert queued.source == "gitlab" and queued.state == "queued"
        entry = store.gitlab(queued.id)
        assert entry is not None and parse_job(entry["payload"]).id == job.id
        time.sleep(1.0)  # the one slot is taken by the queued message: nothing more asked
        asked = sum(r.path.endswith("/jobs/request") for r in fake.requests)
        fake.add_job(["echo two"])
        time.sleep(1.0)
        assert sum(r.path.endswith("/jobs/request") for r in fake.requests) == asked


def test_a_job_another_runner_committed_is_dropped(fake: FakeGitLab, store: JobStore,
                                                   redis_server: RedisServer,
                                                   tmp_path: Path) -> None:
    """A 409 on the two-phase commit: the job is not queued and nothing else is sent."""
    config = config_mod.load(_config(tmp_path, fake, redis_server.url))
    poller = Poller(config, None, store, sender(redis_server.url, 3600), check_interval=0.1)
    fake.conflict_next_commit = True
    job = fake.add_job(["echo hi"])
    capacity.announce(store.r, "w1", ["default"], 1, 0, 30)
    with polling(poller):
        _wait(lambda: any(r.status == 409 for r in fake.requests), 10, "the 409")
        time.sleep(0.5)
        assert store.r.llen(queue_name("default")) == 0 and not store.recent(1)
        assert not any(f"/{job.id}/trace" in r.path for r in fake.requests)


def test_the_follower_ships_the_trace_relays_cancel_and_reports_once(
        fake: FakeGitLab, store: JobStore, redis_server: RedisServer, tmp_path: Path) -> None:
    """Output a worker writes reaches GitLab in order through Content-Range PATCHes (a 416
    realigned); GitLab's canceling becomes a graceful cancel in Redis; the job's ending goes
    once with a checksum GitLab verifies, and the job leaves the in-flight set."""
    config = config_mod.load(_config(tmp_path, fake, redis_server.url))
    poller = Poller(config, None, store, lambda job_id, label: None, check_interval=0.1)
    capacity.announce(store.r, "w1", ["default"], 1, 0, 30)
    job = fake.add_job(["echo hi"])
    fake.trace_416_once.add(job.id)
    with polling(poller):
        _wait(lambda: store.recent(1), 10, "the job in Redis")
        ours = store.recent(1)[0]
        token = store.claim(ours.id, "w", "h", 1, 30)
        assert token is not None
        store.append_log(ours.id, "stdout", b"line one\n", token)
        _wait(lambda: b"line one" in fake.job(job.id).trace, 10, "the first line")
        fake.cancel(job.id, graceful=True)
        store.append_log(ours.id, "stdout", b"line two\n", token)
        _wait(lambda: store.cancel_requested(ours.id), 10, "the cancel relayed")
        assert not store.cancel_requested(ours.id, hard_only=True)
        store.append_log(ours.id, "stderr", b"after_script ran\n", token)
        assert store.finish(ours.id, token, "cancelled", None, "cancelled")
        done = fake.wait_final(job.id, 20)
        assert bytes(done.trace) == b"line one\nline two\nafter_script ran\n"
        assert done.checksum_ok and done.state == "canceled"
        _wait(lambda: not store.r.sismember(INFLIGHT, ours.id), 10, "the job to be reported")
        assert store.gitlab(ours.id) is None  # its payload and job token are gone from Redis
        assert any(r.status == 416 for r in fake.requests)


class Collect:
    def __init__(self) -> None:
        self.out = b""

    def write(self, stream: Stream, data: bytes) -> None:
        self.out += data


def test_sources_are_fetched_with_the_token_kept_out_of_config_and_remote(
        fake: FakeGitLab, tmp_path: Path) -> None:
    """Host git fetches the pipeline's commit over smart HTTP with the job token, and leaves
    it nowhere: not in .git/config, not in the remote URL, not in the log."""
    job = fake.add_job(["true"])
    fake.job(job.id).state = "running"  # committed: the fake's git answers its token
    parsed = parse_job(fake.job(job.id).payload)
    into = Path(tempfile.mkdtemp(prefix="kci-src-"))  # as the worker's: the VMs' user enters
    log = Collect()
    tracked = sources.fetch(parsed, into, {}, log)
    assert (into / "a.txt").read_text() == "from git\n" and tracked == frozenset({"a.txt"})
    config = (into / ".git" / "config").read_text()
    assert job.token not in config and "gitlab-ci-token" not in config
    assert job.token.encode() not in log.out
    shutil.rmtree(into)


def test_a_job_token_that_git_refuses_fails_the_fetch_clearly(fake: FakeGitLab,
                                                              tmp_path: Path) -> None:
    """A job GitLab no longer runs: its token is refused (401) and the job fails with git's
    own exit, never a prompt for a password."""
    job = fake.add_job(["true"])
    parsed = parse_job(fake.job(job.id).payload)
    into = Path(tempfile.mkdtemp(prefix="kci-src-"))
    try:
        with pytest.raises(UserError, match="git fetch failed"):
            sources.fetch(parsed, into, {}, Collect())
    finally:
        shutil.rmtree(into)


def test_a_job_whose_worker_died_is_failed_towards_gitlab(
        fake: FakeGitLab, store: JobStore, redis_server: RedisServer, tmp_path: Path) -> None:
    """A worker that dies mid-job: the lease ends the job in Redis, and GitLab gets failed
    with runner_system_failure and the trace so far, instead of waiting for its stuck-job
    timeout."""
    config = config_mod.load(_config(tmp_path, fake, redis_server.url))
    poller = Poller(config, None, store, lambda job_id, label: None, check_interval=0.1)
    capacity.announce(store.r, "w1", ["default"], 1, 0, 30)
    job = fake.add_job(["sleep 100"])
    with polling(poller):
        _wait(lambda: store.recent(1), 10, "the job in Redis")
        ours = store.recent(1)[0]
        token = store.claim(ours.id, "w", "h", 1, 30)
        assert token is not None
        store.append_log(ours.id, "stdout", b"working\n", token)
        assert store.end_stranded(ours.id, "the worker running this job died", token)
        done = fake.wait_final(job.id, 20)
        assert done.final is not None and done.final["state"] == "failed"
        assert done.final["failure_reason"] == "runner_system_failure"
        assert bytes(done.trace).startswith(b"working\n") and b"worker" in done.trace
        assert done.checksum_ok


def test_a_token_near_its_expiry_is_rotated_and_written_back(
        fake: FakeGitLab, store: JobStore, redis_server: RedisServer, tmp_path: Path) -> None:
    """At 75 % of its lifetime the runner token is reset through GitLab; the new one is in
    the config file (still 0600) and is what jobs/request carries from then on."""
    path = _config(tmp_path, fake, redis_server.url)
    now = time.time()
    path.write_text(path.read_text() + f"token_obtained_at = {now - 80}\n"
                                       f"token_expires_at = {now + 20}\n")
    old = fake.runner_token
    fake.token_expires_in = 3600
    poller = Poller(config_mod.load(path), path, store, lambda job_id, label: None,
                    check_interval=0.1)
    capacity.announce(store.r, "w1", ["default"], 1, 0, 30)
    with polling(poller):
        _wait(lambda: fake.runner_token != old, 10, "the token reset")
        _wait(lambda: any(r.path.endswith("/jobs/request") and
                          r.headers.get("runner-token") == fake.runner_token
                          for r in fake.requests), 10, "a request with the new token")
        runner = config_mod.load(path).gitlab.runners[0]
        assert runner.token == fake.runner_token and runner.token_expires_at > now + 3000
        assert path.stat().st_mode & 0o077 == 0
