"""kata-ci as GitHub Actions runners end to end, in the network lab: the contract FAKE of
GitHub (tests/fakes/github.py) on the lab's "internet" host delivers signed workflow_job
webhooks to a real `kata-ci github serve`; a real `kata-ci worker` makes JIT runners whose
FAKE actions runner (tests/fakes/actions_runner.py; GitHub's real runner cannot be fetched
here) boots from the runner image layer in a real VM, reaches the fake over the VM's real
network path, runs its job's steps and exits."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis

from kata_ci.runner.core import config as config_mod
from kata_ci.runner.github_runner.state import GitHubState, create_demand
from kata_ci.runner.queue.app import sender
from kata_ci.runner.queue.store import JobStore
from tests import netlab
from tests.e2e.network import github_lab as lab_gh
from tests.e2e.test_daemon import Worker, wait_until
from tests.fakes.github import FakeGitHub
from tests.integration.redis_server import RedisServer

STEPS = ({"name": "hello", "run": "echo hello from the VM; uname -r"},
         {"name": "leaks", "run": "cat /proc/cmdline; env | sort; "
                                  'echo "jit=${ACTIONS_RUNNER_INPUT_JITCONFIG:-none}"'})


@dataclass
class Stack:
    fake: FakeGitHub
    store: JobStore
    state: GitHubState
    worker: Worker
    serve: lab_gh.Serve
    config: Path


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return lab_gh.layer_cache(tmp_path_factory.mktemp("gh-cache"))


@pytest.fixture
def stack(request: pytest.FixtureRequest, lab: netlab.Lab, redis_server: RedisServer,
          run_root: Path, tmp_path: Path, cache: Path) -> Iterator[Stack]:
    client = redis.Redis.from_url(redis_server.url)
    client.flushdb()
    api_url = f"http://{netlab.INTERNET_V4}:{lab_gh.API_PORT}"
    marker = getattr(request, "param", {})
    config = lab_gh.write_config(tmp_path / "config.toml", redis_server.url, api_url,
                                 idle_timeout=marker.get("idle_timeout", 300.0),
                                 reconcile_interval=marker.get("reconcile", 60.0))
    serve = lab_gh.Serve(config, tmp_path / "serve.log", 18470)
    fake = FakeGitHub(org="octo-org", repos=("octo-org/hello-world",), token=lab_gh.TOKEN,
                      webhook_url=serve.url, webhook_secret=lab_gh.SECRET,
                      sock=lab_gh.bind_in_world(lab_gh.API_PORT), long_poll=2.0)
    fake.start()
    worker = lab_gh.worker(config, run_root, cache)
    worker.start()
    serve.start()
    yield Stack(fake, JobStore(client), GitHubState(client), worker, serve, config)
    serve.stop()
    worker.stop()
    fake.stop()
    if getattr(request.node, "rep_call", None) and request.node.rep_call.failed:
        print(lab_gh.dump(worker.log, serve.log), file=sys.stderr)


def _runner_done(stack: Stack) -> bool:
    return any(r.get("state") == "done" for r in (stack.state.runner(n) for n in
               [f"kata-ci-{j.id}" for j in stack.store.recent(50)]))


def test_queued_webhook_runs_the_job_in_a_vm_and_leaves_nothing(stack: Stack) -> None:
    """queued webhook -> demand -> JIT config -> VM -> the runner takes the job over the
    VM's network and completes it -> VM gone -> runner deregistered; the JIT config is in no
    host argv, not in the guest's /proc/cmdline or the steps' environment, not in the job log
    and not in the workspace."""
    argvs = lab_gh.process_argvs()
    job = stack.fake.queue_job(labels=("self-hosted", "kata-ci"), steps=STEPS)
    seen: list[str] = []
    deadline = time.monotonic() + 300
    while stack.fake.jobs[job.id].status != "completed" and time.monotonic() < deadline:
        seen.extend(argvs())
        time.sleep(0.5)
    done = stack.fake.jobs[job.id]
    assert done.status == "completed" and done.conclusion == "success", \
        lab_gh.dump(stack.worker.log, stack.serve.log)
    log_text = "\n".join(done.log) if isinstance(done.log, list) else str(done.log)
    assert "hello from the VM" in log_text and "jit=none" in log_text
    wait_until(lambda: _runner_done(stack), 120, "the runner's VM gone")
    kata = [j for j in stack.store.recent(10) if j.source == "github"]
    assert len(kata) == 1 and kata[0].state == "success", kata
    record = stack.state.runner(f"kata-ci-{kata[0].id}")
    assert record["state"] == "done" and record["deregistered"] == "1"
    assert not any(r.name == record["name"] for r in stack.fake.runners.values())
    jit = stack.fake.jit_configs[0]
    assert all(jit not in argv for argv in seen)
    assert jit not in log_text  # the guest's /proc/cmdline and env, as the steps saw them
    job_log = b"".join(data for _, data in stack.store.read_log(kata[0].id)).decode()
    assert jit not in job_log and "Listening for Jobs" in job_log
    assert not list(Path("/tmp").glob(f"kata-ci-{kata[0].id}-*"))  # workspace removed
    assert stack.worker.leftovers() == [] and netlab.kata_netns() == []


@pytest.mark.parametrize("stack", [{"reconcile": 2.0}], indirect=True)
def test_lost_webhook_is_recovered_by_reconcile(stack: Stack) -> None:
    """A job whose queued webhook never arrives still gets a runner: reconcile sees it
    queued (REST) with no runner waiting, asks for one, and the job completes."""
    job = stack.fake.queue_job(labels=("self-hosted", "kata-ci"), steps=STEPS[:1],
                               deliver=False)
    assert stack.fake.wait_for(lambda: stack.fake.jobs[job.id].status == "completed", 300), \
        lab_gh.dump(stack.worker.log, stack.serve.log)
    assert stack.fake.jobs[job.id].conclusion == "success"
    assert stack.state.job(job.id).get("seen_by") == "reconcile"


@pytest.mark.parametrize("stack", [{"idle_timeout": 10.0}], indirect=True)
def test_a_runner_that_gets_no_job_is_deregistered_and_stopped(stack: Stack) -> None:
    """A runner asked for with no job queued at GitHub: after idle_timeout it is
    deregistered (DELETE at GitHub) and its VM stopped; the kata-ci job says why."""
    cfg = config_mod.load(stack.config)
    kata_id = create_demand(stack.store, stack.state, sender(cfg.queue.broker, 3600),
                            cfg.github, cfg.github.label_sets[0], "org:octo-org", "test", 3600)
    assert kata_id is not None
    wait_until(lambda: stack.store.get(kata_id).state not in ("queued", "running"), 240,
               "the idle runner stopped")
    ended = stack.store.get(kata_id)
    assert ended.state == "cancelled" and "got no job" in ended.message
    assert f"kata-ci-{kata_id}" in stack.fake.deleted_runners
    assert stack.worker.leftovers() == [] and netlab.kata_netns() == []
