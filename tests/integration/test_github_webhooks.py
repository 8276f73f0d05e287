"""`kata-ci github serve`'s webhook endpoint over real HTTP with a real Redis and the real
Celery sender, fed GitHub's real workflow_job payloads: what a delivery does. What a hostile
one cannot do is in tests/security/test_github_webhooks.py."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.integration.github_endpoint import REPO, Endpoint, payload, serving
from tests.integration.redis_server import RedisServer


@pytest.fixture
def endpoint(redis_server: RedisServer) -> Iterator[Endpoint]:
    with serving(redis_server) as served:
        yield served


def test_signed_queued_job_becomes_one_unit_of_demand(endpoint: Endpoint) -> None:
    """A correctly signed `queued` delivery for served labels: 201, one kata-ci job (source
    github) on the set's label, its Celery message in the label's Redis list, the workflow
    job recorded with repo, workflow and name."""
    status, _ = endpoint.post(payload())
    assert status == 201
    demand = endpoint.demand_jobs()
    assert len(demand) == 1 and endpoint.queued_messages() == 1
    entry = endpoint.store.github(demand[0])
    assert entry is not None and entry["scope"] == "org:octo-org"
    assert entry["label_set"] == "kata-ci"
    record = endpoint.state.job(1001)
    assert record["repo"] == REPO and record["workflow"] == "CodeQL" and record["name"]


def test_other_events_labels_and_repositories_are_ignored(endpoint: Endpoint) -> None:
    """ping answers pong; other events, unserved labels and other orgs' repositories are
    accepted (202) and change nothing; a signed but malformed payload is 400."""
    assert endpoint.post(b"{}", {"X-GitHub-Event": "ping"})[0] == 200
    assert endpoint.post(b"{}", {"X-GitHub-Event": "push"})[0] == 202
    assert endpoint.post(payload(labels=("ubuntu-latest",)))[0] == 202
    assert endpoint.post(payload(repo="evil-org/x"))[0] == 202
    assert endpoint.post(b'{"action": "queued"}')[0] == 400
    assert endpoint.post(payload(), {"X-GitHub-Delivery": "../../x"})[0] == 400
    assert endpoint.demand_jobs() == []


def test_burst_of_200_deliveries_with_duplicates(endpoint: Endpoint) -> None:
    """200 concurrent deliveries: 120 distinct queued jobs, 50 redeliveries of them (same
    guid) and 30 replays under new guids. Every delivery answered 2xx, exactly 120 runners
    asked for, and every key kata-ci wrote expires (bounded memory)."""
    deliveries = [(payload(job_id=5000 + i), str(uuid.uuid4())) for i in range(120)]
    burst = deliveries + deliveries[:50] + [(body, str(uuid.uuid4()))
                                            for body, _ in deliveries[50:80]]
    with ThreadPoolExecutor(max_workers=16) as pool:
        answers = list(pool.map(lambda d: endpoint.post(d[0], guid=d[1])[0], burst))
    assert len(answers) == 200 and all(200 <= a < 300 for a in answers), answers
    assert len(endpoint.demand_jobs()) == 120 and endpoint.queued_messages() == 120
    keys = [k.decode() for k in endpoint.store.r.scan_iter("kataci:gh:*")]
    for key in keys:
        if key.startswith(("kataci:gh:delivery:", "kataci:gh:job:", "kataci:gh:demanded:")):
            assert endpoint.store.r.ttl(key) > 0, key
    assert endpoint.store.r.zcard("kataci:gh:jobs") <= 1000


def test_max_runners_bounds_demand(endpoint: Endpoint) -> None:
    """A set at max_runners asks for no more (202): the third `big` job waits for
    reconcile, and its job id stays claimable for it."""
    answers = [endpoint.post(payload(job_id=7000 + i, labels=("kata-ci", "big")))[0]
               for i in range(3)]
    assert answers == [201, 201, 202]
    assert endpoint.queued_messages("big") == 2
    assert not endpoint.state.demanded(7002)


def test_in_progress_marks_our_runner_busy_and_unassigned_completion_withdraws_demand(
        endpoint: Endpoint) -> None:
    """in_progress naming a kata-ci runner moves it to busy (no longer waiting capacity);
    a job cancelled before any runner took it withdraws one queued demand unit."""
    endpoint.post(payload(job_id=1))
    endpoint.post(payload(job_id=2))
    first, second = sorted(endpoint.demand_jobs())
    endpoint.state.add_runner("kata-ci-abc", {"name": "kata-ci-abc", "scope": "org:octo-org",
                                              "label_set": "kata-ci", "kata_job": first,
                                              "state": "idle"})
    endpoint.post(payload("in_progress", job_id=1, runner_name="kata-ci-abc"))
    assert endpoint.state.runner("kata-ci-abc")["state"] == "busy"
    assert endpoint.state.pending(endpoint.store, "org:octo-org", "kata-ci") == [second]
    endpoint.post(payload("completed", job_id=2, runner_name=None))
    assert endpoint.store.get(second).state == "cancelled"
    assert endpoint.state.pending(endpoint.store, "org:octo-org", "kata-ci") == []


def test_jobs_listing_names_the_workflow_job_a_runner_took(endpoint: Endpoint) -> None:
    """`kata-ci jobs` shows a GitHub runner job as its runner, then, once GitHub gave it a
    job (in_progress naming it), that job's repository, workflow and name."""
    from kata_ci.runner.cli.queue import github_line

    endpoint.post(payload(job_id=77))
    kata_job = endpoint.demand_jobs()[0]
    name = f"kata-ci-{kata_job}"
    endpoint.state.add_runner(name, {"name": name, "scope": "org:octo-org",
                                     "label_set": "kata-ci", "kata_job": kata_job,
                                     "state": "idle"})
    assert github_line(endpoint.state, name).endswith("(idle): no job yet")
    endpoint.post(payload("in_progress", job_id=77, runner_name=name))
    line = github_line(endpoint.state, name)
    assert f"{REPO} CodeQL / " in line and "(busy)" in line, line
