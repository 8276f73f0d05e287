"""kata-ci as a GitLab runner end to end: a contract FAKE of GitLab (tests/fakes/gitlab.py,
built from GitLab's documented runner API; GitLab itself cannot be reached here) serving a
real git repository over smart HTTP, a real `kata-ci gitlab run` poller, a real Redis, a
real `kata-ci worker` and real VMs. Tests assert the protocol the fake recorded, not just
the outcome.
"""

from __future__ import annotations

import base64
import io
import signal
import subprocess
import sys
import time
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from kata_ci.runner.queue.store import JobStore
from tests.e2e.conftest import KATA_CI, stop_process
from tests.e2e.test_daemon import Worker, wait_until
from tests.fakes.git_http import make_repo
from tests.fakes.gitlab import FakeGitLab, FakeJob
from tests.integration.redis_server import RedisServer
from tests.oci_images import Entry, File, Symlink, build_image
from tests.oci_registry import RegistryFixture

SECRET = "s3cr3t-Value-0xC0FFEE"



class Poller:
    """A `kata-ci gitlab run` process with its own log."""

    def __init__(self, config: Path, log: Path) -> None:
        self.config, self.log = config, log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log.open("ab") as sink:
            self.proc = subprocess.Popen(
                [*KATA_CI, "gitlab", "run", "--config", str(self.config),
                 "--check-interval", "0.2"], stdout=sink, stderr=sink)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        stop_process(self.proc, 30, sig)


@pytest.fixture
def gitlab(tmp_path: Path) -> Iterator[FakeGitLab]:
    repo = make_repo(tmp_path, {"hello.txt": "hello from the repository\n",
                                "tracked.txt": "tracked\n"})
    fake = FakeGitLab(repo, long_poll=2.0, trace_interval=1)
    fake.start()
    yield fake
    fake.stop()


@pytest.fixture
def runner(request: pytest.FixtureRequest, gitlab: FakeGitLab, redis_server: RedisServer,
           run_root: Path, tmp_path: Path) -> Iterator[Callable[[], tuple[Worker, Poller]]]:
    import redis

    redis.Redis.from_url(redis_server.url).flushdb()
    config = tmp_path / "config.toml"
    config.write_text(
        f'[queue]\nbroker = "{redis_server.url}"\nlease_ttl = 6\n'
        f'[vm]\ngrace = 2\nnetwork = "none"\n'
        f'[gitlab]\ncache_dir = "{tmp_path / "cache"}"\n'
        f'[[gitlab.runners]]\nurl = "{gitlab.url}"\ntoken = "{gitlab.runner_token}"\n'
        f'system_id = "s_0123456789ab"\nid = 1\nlabel = "default"\n')
    made: list[tuple[Worker, Poller]] = []

    def make() -> tuple[Worker, Poller]:
        worker = Worker(config, ["default"], run_root)
        worker.start()
        poller = Poller(config, tmp_path / "poller.log")
        poller.start()
        made.append((worker, poller))
        return worker, poller

    yield make
    for worker, poller in made:
        poller.stop()
        worker.stop()
    if getattr(request.node, "rep_call", None) and request.node.rep_call.failed:
        for worker, poller in made:
            for log in (worker.log, poller.log):
                print(f"\n=== {log} ===\n{log.read_text()[-5000:]}", file=sys.stderr)


def _paths(gitlab: FakeGitLab, job: FakeJob, method: str) -> list[str]:
    return [r.path for r in gitlab.requests if r.method == method and f"/{job.id}" in r.path]


def test_a_job_runs_with_sources_cache_artifacts_and_after_script(
        gitlab: FakeGitLab, runner: Callable[[], tuple[Worker, Poller]]) -> None:
    """Two jobs: the first sees the checked-out commit, writes a cache and artifacts, fails
    its script (after_script still runs with CI_JOB_STATUS=failed, the failure carries its
    exit code); the second gets the first's artifacts and its cache. The protocol: commit
    before anything, trace PATCHes in order with Content-Range, final PUT with checksum."""
    cache = [{"key": "deps-non_protected", "paths": ["vendor/"], "policy": "pull-push",
              "when": "always"}]
    first = gitlab.add_job(
        ["cat hello.txt", "mkdir -p vendor out", "echo cached > vendor/lib.txt",
         "echo built > out/result.txt", "echo $CI_PROJECT_DIR", "exit 3"],
        ["echo after status=$CI_JOB_STATUS"],
        cache=cache,
        artifacts=[{"name": "build", "paths": ["out/"], "when": "always",
                    "artifact_type": "archive", "artifact_format": "zip", "expire_in": "1d"}])
    runner()
    done = gitlab.wait_final(first.id, 300)
    trace = bytes(done.trace)
    assert b"hello from the repository" in trace
    assert b"after status=failed" in trace
    assert b"/builds/group/project" in trace
    assert done.final is not None and done.final["state"] == "failed"
    assert done.final["failure_reason"] == "script_failure" and done.final["exit_code"] == 3
    assert done.checksum_ok
    puts = [r for r in gitlab.requests if r.method == "PUT" and r.path.endswith(f"/{first.id}")]
    assert puts[0].body and b'"running"' in puts[0].body  # the two-phase commit comes first
    patches = [r for r in gitlab.requests if r.method == "PATCH" and f"/{first.id}/" in r.path]
    offset = 0
    for patch in patches:
        if patch.status == 202:
            assert patch.headers["content-range"] == f"{offset}-{offset + len(patch.body) - 1}"
            offset += len(patch.body)
    upload = done.artifacts[0]
    assert upload.query["artifact_format"] == "zip" and upload.query["expire_in"] == "1d"
    assert zipfile.ZipFile(io.BytesIO(upload.data)).read("out/result.txt") == b"built\n"

    second = gitlab.add_job(["cat out/result.txt", "cat vendor/lib.txt"], cache=cache,
                            dependencies=[done])
    again = gitlab.wait_final(second.id, 300)
    assert again.final is not None and again.final["state"] == "success", bytes(again.trace)
    assert b"built" in again.trace and b"cached" in again.trace
    downloads = [r for r in gitlab.requests if r.method == "GET" and
                 r.path.endswith(f"/jobs/{first.id}/artifacts")]
    assert downloads and downloads[0].headers["job-token"] == first.token


def test_masked_values_never_reach_gitlab_in_any_form(
        gitlab: FakeGitLab, runner: Callable[[], tuple[Worker, Poller]]) -> None:
    """A masked variable printed whole, split across writes, and in base64, and a glpat-
    token the job was never given: none of them is in any request GitLab received. A file
    variable is a file in the guest, a raw one is not expanded."""
    encoded = base64.b64encode(SECRET.encode()).decode()
    job = gitlab.add_job(
        ['printf "%s" "$MY_SECRET"; echo',
         'printf "%s" "${MY_SECRET:0:9}"; sleep 0.3; printf "%s\\n" "${MY_SECRET:9}"',
         'printf "%s" "$MY_SECRET" | base64', "echo glpat-abcdefghij0123456789",
         'echo "file at $SETTINGS"; cat "$SETTINGS"', 'echo "raw is $RAWV"'],
        variables=[{"key": "MY_SECRET", "value": SECRET, "masked": True, "public": False},
                   {"key": "SETTINGS", "value": "[server]\nport=8080\n", "file": True},
                   {"key": "RAWV", "value": "$CI_JOB_ID-x", "raw": True}])
    runner()
    done = gitlab.wait_final(job.id, 300)
    assert done.final is not None and done.final["state"] == "success", bytes(done.trace)
    assert b"file at /run/kata-ci/variables/SETTINGS\n[server]\nport=8080" in done.trace
    assert b"raw is $CI_JOB_ID-x" in done.trace
    assert b"[MASKED]" in done.trace and b"glpat-[MASKED]" in done.trace
    for request in gitlab.requests:
        for form in (SECRET, encoded, "abcdefghij0123456789"):
            assert form.encode() not in request.body, request.path
    for raw in (SECRET.encode(), job.token.encode()):
        assert raw not in bytes(done.trace)


def test_a_graceful_cancel_runs_after_script_and_a_hard_one_does_not(
        gitlab: FakeGitLab, runner: Callable[[], tuple[Worker, Poller]],
        redis_server: RedisServer) -> None:
    """GitLab's canceling stops the script and still runs after_script (CI_JOB_STATUS=
    canceled), and the ending reaches GitLab; canceled stops the job at once: no
    after_script runs, and the runner stops sending (GitLab answers 403)."""
    soft = gitlab.add_job(["echo started", "sleep 300"], ["echo after $CI_JOB_STATUS"])
    runner()
    wait_until(lambda: b"started" in gitlab.job(soft.id).trace, 300, "the job to start")
    began = time.monotonic()
    gitlab.cancel(soft.id, graceful=True)
    done = gitlab.wait_final(soft.id, 120)
    assert b"after canceled" in done.trace and done.final is not None
    assert done.state == "canceled" and time.monotonic() - began < 30
    store = JobStore.connect(redis_server.url)
    hard = gitlab.add_job(["echo started", "sleep 300"], ["echo after $CI_JOB_STATUS"])
    wait_until(lambda: b"started" in gitlab.job(hard.id).trace, 300, "the job to start")
    ours = store.recent(1)[0]
    began = time.monotonic()
    gitlab.cancel(hard.id, graceful=False)
    wait_until(lambda: store.get(ours.id).state == "cancelled", 60, "the job to be cancelled")
    assert time.monotonic() - began < 30
    assert gitlab.wait_final(hard.id, 30).told_canceled
    log = b"".join(data for _, data in store.read_log(ours.id))
    assert b"started" in log and b"after" not in log


def test_a_timeout_is_reported_as_job_execution_timeout(
        gitlab: FakeGitLab, runner: Callable[[], tuple[Worker, Poller]]) -> None:
    """runner_info.timeout bounds the job: failed with job_execution_timeout."""
    job = gitlab.add_job(["sleep 300"], timeout=5)
    runner()
    done = gitlab.wait_final(job.id, 300)
    assert done.final is not None and done.final["failure_reason"] == "job_execution_timeout"


def test_a_poller_restart_mid_job_loses_nothing(
        gitlab: FakeGitLab, runner: Callable[[], tuple[Worker, Poller]]) -> None:
    """SIGKILL the poller while its job runs: the restarted poller adopts the job, the trace
    arrives whole and in order (416 realigns it), and GitLab gets the ending once."""
    job = gitlab.add_job(["echo one", "sleep 6", "echo two"])
    _, poller = runner()
    wait_until(lambda: b"one" in gitlab.job(job.id).trace, 300, "the first line")
    poller.stop(signal.SIGKILL)
    gitlab.trace_416_once.add(job.id)
    poller.start()
    done = gitlab.wait_final(job.id, 300)
    assert done.final is not None and done.final["state"] == "success"
    assert done.trace.count(b"\none\n") == 1
    assert done.trace.index(b"\none\n") < done.trace.index(b"\ntwo\n")
    assert done.checksum_ok
    finals = [r for r in gitlab.requests if r.method == "PUT" and
              r.path.endswith(f"/{job.id}") and b'"success"' in r.body and r.status == 200]
    assert len(finals) == 1


def test_the_protocol_edges_409_202_412_and_feature_gating(
        gitlab: FakeGitLab, runner: Callable[[], tuple[Worker, Poller]]) -> None:
    """A commit answered 409 is dropped (another runner has it); a job needing a feature
    kata-ci does not announce never reaches it (runner_unsupported); a final PUT answered 202
    is repeated, one answered 412 makes the whole trace go again."""
    gitlab.conflict_next_commit = True
    taken = gitlab.add_job(["echo should not run"])
    unsupported = gitlab.add_job(["echo needs a terminal"], requires={"terminal"})
    runner()
    wait_until(lambda: any(r.status == 409 for r in gitlab.requests), 60, "the 409")
    ours = gitlab.add_job(["echo payload"])
    gitlab.put_202_times[ours.id] = 2
    gitlab.put_412_once.add(ours.id)
    done = gitlab.wait_final(ours.id, 300)
    assert done.final is not None and done.checksum_ok and b"payload" in done.trace
    finals = [r.status for r in gitlab.requests if r.method == "PUT" and
              r.path.endswith(f"/{ours.id}") and b'"success"' in r.body]
    assert 202 in finals and 412 in finals and finals[-1] == 200
    assert gitlab.job(unsupported.id).state == "failed"
    assert not any(r.path.endswith(f"/{unsupported.id}") for r in gitlab.requests)
    assert b"should not run" not in gitlab.job(taken.id).trace


def test_a_job_with_image_and_service_and_one_whose_image_is_missing(
        gitlab: FakeGitLab, runner: Callable[[], tuple[Worker, Poller]],
        oci_registry: RegistryFixture) -> None:
    """GitLab hands over `image` (entrypoint [""], docker user) and `services` (alias, a
    port): the script runs in the image as that user, on the fetched sources, and reaches the
    service by its alias. A job whose image the registry lacks fails before its script, the
    trace saying why; GitLab (whose failure_reasons list here predates image_pull_failure)
    gets unknown_failure, as gitlab-runner's compatibility rule says."""
    web: dict[str, Entry] = {f"bin/{a}": Symlink("/bin/busybox") for a in ("wget", "httpd")}
    web["www/index.html"] = File(b"served by the service\n")
    build_image(oci_registry, "kata-ci/gl-web", "1", web,
                {"Entrypoint": ["/bin/false"], "User": "builder",
                 "Cmd": ["httpd", "-f", "-p", "8080", "-h", "/www"],
                 "ExposedPorts": {"8080/tcp": {}}})
    image = f"{oci_registry.host}/kata-ci/gl-web:1"
    ours = gitlab.add_job(
        ["cat hello.txt", "id -u", "wget -qO- http://web:8080/index.html"],
        image={"name": image, "entrypoint": [""],
               "executor_opts": {"docker": {"user": "0"}}},
        services=[{"name": image, "alias": "web", "entrypoint": [""],
                   "ports": [{"number": 8080}]}])
    missing = gitlab.add_job(["echo never"],
                             image={"name": f"{oci_registry.host}/kata-ci/absent:1"})
    runner()
    done = gitlab.wait_final(ours.id, 300)
    trace = bytes(done.trace)
    assert done.final is not None and done.final["state"] == "success", trace
    assert b"hello from the repository" in trace and b"served by the service" in trace
    assert b"\n0\n" in trace.replace(b"\r", b"")
    failed = gitlab.wait_final(missing.id, 300)
    assert failed.final is not None and failed.final["state"] == "failed"
    assert failed.final["failure_reason"] == "unknown_failure"
    assert b"not found" in failed.trace and b"never" not in failed.trace
