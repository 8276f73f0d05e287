"""The reconcile loop and the GitHub API client against the contract FAKE of GitHub
(tests/fakes/github.py; GitHub cannot be reached here), through PyGithub, with a real Redis
and the real Celery sender: lost webhooks recovered, orphans removed, busy runners kept."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, replace

import pytest
import redis

from kata_ci.runner.core.config import Config
from kata_ci.runner.github_runner.api import GitHubAPI
from kata_ci.runner.github_runner.reconcile import LOCK, Reconciler
from kata_ci.runner.github_runner.settings import GitHubConfig, LabelSet
from kata_ci.runner.github_runner.state import GitHubState
from kata_ci.runner.queue.app import queue_name, sender
from kata_ci.runner.queue.store import JobStore
from tests.fakes.github import FakeGitHub
from tests.integration.redis_server import RedisServer

TOKEN = "ghs_reconcile_token_0123456789"


@dataclass
class World:
    fake: FakeGitHub
    store: JobStore
    state: GitHubState
    api: GitHubAPI
    config: Config

    def reconciler(self) -> Reconciler:
        """A fresh one each time: everything it knows comes from Redis and GitHub."""
        return Reconciler(self.config, self.store, self.state, sender(self.broker, 3600),
                          self.api)

    broker: str = ""


@pytest.fixture
def world(redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch) -> Iterator[World]:
    client = redis.Redis.from_url(redis_server.url)
    client.flushdb()
    monkeypatch.setenv("KATA_CI_GITHUB_TOKEN", TOKEN)
    with FakeGitHub(token=TOKEN, long_poll=0.2) as fake:
        gh = GitHubConfig(api_url=fake.url, org="octo-org",
                          repositories=("octo-org/hello-world",),
                          label_sets=(LabelSet(("kata-ci",), "default", 5),))
        config = replace(Config(), github=gh)
        yield World(fake, JobStore(client), GitHubState(client), GitHubAPI(gh), config,
                    broker=redis_server.url)


def test_lost_webhooks_become_demand_once(world: World) -> None:
    """Two queued jobs whose webhooks never came: one round asks for two runners (two
    Celery messages), a second round (a restarted serve) asks for none more; a job with
    labels no set serves is left alone."""
    for _ in range(2):
        world.fake.queue_job(labels=("self-hosted", "kata-ci"), deliver=False)
    world.fake.queue_job(labels=("self-hosted", "gpu"), deliver=False)
    report = world.reconciler().once()
    assert len(report.created) == 2 and report.queued == {"org:octo-org|kata-ci": 2}
    assert world.store.r.llen(queue_name("default")) == 2
    again = world.reconciler().once()
    assert again.created == [] and world.store.r.llen(queue_name("default")) == 2


def test_a_runner_that_took_another_job_leaves_no_job_waiting(world: World) -> None:
    """Job A's demand was used by a runner that took job B (fungible runners): with A still
    queued and no runner waiting, reconcile asks for one more."""
    first = world.fake.queue_job(deliver=False)
    world.fake.queue_job(deliver=False)
    world.reconciler().once()
    kata_ids = world.state.pending(world.store, "org:octo-org", "kata-ci")
    world.state.add_runner("kata-ci-x", {"name": "kata-ci-x", "scope": "org:octo-org",
                                         "label_set": "kata-ci", "kata_job": kata_ids[0],
                                         "state": "idle"})
    world.state.mark_busy("kata-ci-x", first.id)  # it got a job: one less waiting
    world.fake.jobs[first.id].status = "in_progress"
    report = world.reconciler().once()
    assert report.queued == {"org:octo-org|kata-ci": 1} and report.created == []
    world.store.request_cancel(kata_ids[1])  # the other unit is gone too (worker lost)
    report = world.reconciler().once()
    assert len(report.created) == 1


def test_orphans_are_deregistered_but_busy_live_and_foreign_runners_are_kept(
        world: World) -> None:
    """kata-ci's offline runner with no live job is deleted; a busy one, one whose kata-ci
    job is still running, and another tool's runner are not; a record whose kata-ci job
    ended is closed."""
    ids = {name: world.api.jit_config("org:octo-org", name, ["kata-ci"])[0]
           for name in ("kata-ci-orphan", "kata-ci-busy", "kata-ci-live", "someone-else")}
    busy = world.fake.runners[ids["kata-ci-busy"]]
    busy.busy, busy.status = True, "online"
    live_job = world.store.create(["github-runner"], "default", 60, None, github={"x": 1})
    world.state.add_runner("kata-ci-live", {"name": "kata-ci-live", "id": ids["kata-ci-live"],
                                            "scope": "org:octo-org", "label_set": "kata-ci",
                                            "kata_job": live_job.id, "state": "starting"})
    dead_job = world.store.create(["github-runner"], "default", 60, None, github={"x": 1})
    world.store.request_cancel(dead_job.id)
    world.state.add_runner("kata-ci-orphan", {"name": "kata-ci-orphan",
                                              "id": ids["kata-ci-orphan"],
                                              "scope": "org:octo-org", "label_set": "kata-ci",
                                              "kata_job": dead_job.id, "state": "idle"})
    report = world.reconciler().once()
    assert report.closed == ["kata-ci-orphan"]
    assert world.fake.deleted_runners == ["kata-ci-orphan"]
    remaining = {r.name for r in world.fake.runners.values()}
    assert remaining == {"kata-ci-busy", "kata-ci-live", "someone-else"}
    assert world.state.runner("kata-ci-orphan")["state"] == "done"


def test_only_one_reconciler_at_a_time(world: World) -> None:
    """While another instance holds the lock, a round does nothing and says so."""
    world.fake.queue_job(deliver=False)
    world.store.r.set(LOCK, b"1", ex=30)
    assert world.reconciler().once().skipped
    assert world.store.r.llen(queue_name("default")) == 0


def test_api_client_jit_config_and_delete_through_pygithub(world: World) -> None:
    """The client gets a JIT config at org and repo scope, sees a taken name as
    RunnerExists, reads a runner back, and deletes it (a second delete is fine)."""
    from kata_ci.runner.github_runner.api import RunnerExists

    runner_id, jit = world.api.jit_config("org:octo-org", "kata-ci-a", ["kata-ci"])
    assert jit in world.fake.jit_configs
    repo_id, _ = world.api.jit_config("repo:octo-org/hello-world", "kata-ci-b", ["kata-ci"])
    with pytest.raises(RunnerExists):
        world.api.jit_config("org:octo-org", "kata-ci-a", ["kata-ci"])
    seen = world.api.runner("org:octo-org", runner_id)
    assert seen is not None and seen.name == "kata-ci-a" and not seen.busy
    assert world.api.delete_runner("org:octo-org", runner_id)
    assert world.api.delete_runner("org:octo-org", runner_id)  # already gone: fine
    assert world.api.runner("org:octo-org", runner_id) is None
    assert world.api.delete_runner("repo:octo-org/hello-world", repo_id)


def test_reconcile_rounds_are_counted_as_metrics(world: World) -> None:
    """One loop round that asks for two runners counts `requested` twice; a round while
    another instance holds the lock counts `skipped` (read back through the client's
    exposition and parser)."""
    import threading

    from prometheus_client import REGISTRY, generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    from kata_ci.runner.github_runner.reconcile import loop

    def actions() -> dict[str, float]:
        text = generate_latest(REGISTRY).decode()
        return {s.labels["action"]: s.value for f in text_string_to_metric_families(text)
                if f.name == "kata_ci_github_reconcile_actions" for s in f.samples
                if s.name.endswith("_total")}

    before = actions()
    for _ in range(2):
        world.fake.queue_job(labels=("self-hosted", "kata-ci"), deliver=False)
    done = threading.Event()
    done.set()  # one round, then the loop returns
    loop(world.reconciler(), done, lambda exc: None)
    world.store.r.set(LOCK, b"1", ex=30)
    loop(world.reconciler(), done, lambda exc: None)
    after = actions()
    assert after.get("requested", 0) - before.get("requested", 0) == 2
    assert after.get("skipped", 0) - before.get("skipped", 0) == 1
