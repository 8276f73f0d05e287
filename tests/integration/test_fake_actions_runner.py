"""The FAKE actions runner (tests/fakes/actions_runner.py) run as a process on the host (no
VM) against the contract FAKE of GitHub (tests/fakes/github.py): the tarball's shape, one job
run to its end, a failing step, fungibility, SIGTERM, refused starts. No kata-ci code."""

from __future__ import annotations

import os
import signal
import subprocess
import tarfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.fakes.actions_runner import build_runner_tarball
from tests.fakes.github import FakeGitHub
from tests.integration.test_fake_github import LABELS, ORG, REPO, TOKEN, make_jit


@pytest.fixture
def fake() -> Iterator[FakeGitHub]:
    with FakeGitHub(org=ORG, repos=(REPO,), token=TOKEN, long_poll=0.5) as gh:
        yield gh


@pytest.fixture
def api(fake: FakeGitHub) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=fake.url, timeout=15,
                      headers={"Authorization": f"token {TOKEN}"}) as client:
        yield client


@pytest.fixture
def runner_dir(tmp_path: Path) -> Path:
    tarball = build_runner_tarball(tmp_path / "dl")
    with tarfile.open(tarball, "r:gz") as archive:
        archive.extractall(tmp_path / "actions-runner", filter="data")
    return tmp_path / "actions-runner"


def _start(runner_dir: Path, encoded: str, **env: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [str(runner_dir / "run.sh")], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, env={"PATH": os.environ["PATH"], "HOME": str(runner_dir),
                        "ACTIONS_RUNNER_INPUT_JITCONFIG": encoded,
                        "RUNNER_ALLOW_RUNASROOT": "1", **env})


def test_runner_tarball_has_the_real_shape(tmp_path: Path) -> None:
    """The tarball has GitHub's name and layout, README.FAKE, is reproducible; config.sh exits 1."""
    one = build_runner_tarball(tmp_path / "a", "2.330.1")
    assert one.name == "actions-runner-linux-x64-2.330.1.tar.gz"
    assert one.read_bytes() == build_runner_tarball(tmp_path / "b", "2.330.1").read_bytes()
    with tarfile.open(one, "r:gz") as archive:
        members = {m.name: m for m in archive.getmembers()}
        assert {"run.sh", "config.sh", "env.sh", "bin/Runner.Listener", "bin/Runner.Worker",
                "README.FAKE"} <= set(members)
        assert all(members[n].mode & 0o111 for n in ("run.sh", "config.sh",
                                                     "bin/Runner.Listener"))
        listener = archive.extractfile("bin/Runner.Listener")
        assert listener is not None
        text = listener.read().decode()
        assert text.startswith("#!/usr/bin/env python3") and 'VERSION = "2.330.1"' in text
        readme = archive.extractfile("README.FAKE")
        assert readme is not None and b"FAKE" in readme.read()
        archive.extractall(tmp_path / "x", filter="data")
    refused = subprocess.run([str(tmp_path / "x" / "config.sh"), "--url", "x"],
                             capture_output=True, text=True)
    assert refused.returncode == 1 and "JIT" in refused.stderr


def test_fake_runner_runs_a_job_and_no_step_sees_the_config(
        fake: FakeGitHub, api: httpx.Client, runner_dir: Path) -> None:
    """run.sh runs a 2-step job to success, logs it, exits 0; no step env has the JIT config."""
    job = fake.queue_job(steps=({"name": "hello", "run": "echo hello from $GITHUB_REPOSITORY"},
                                {"name": "env", "run": "env; pwd"}))
    encoded = make_jit(api, "host-runner").json()["encoded_jit_config"]
    proc = _start(runner_dir, encoded)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    done = fake.jobs[job.id]
    assert (done.status, done.conclusion, done.runner_name) == ("completed", "success",
                                                                "host-runner")
    log = "\n".join(done.log)
    assert f"hello from {REPO}" in log and "GITHUB_ACTIONS=true" in log
    assert f"{runner_dir}/_work/hello-world/hello-world" in log
    assert "RUNNER_ALLOW_RUNASROOT=1" in log  # steps inherit the runner's environment...
    assert "ACTIONS_RUNNER_INPUT" not in log and encoded not in log  # ...but not its input
    assert "ACTIONS_RUNNER_INPUT" not in out and encoded not in out
    assert fake.removed_by_github == ["host-runner"] and fake.runners == {}
    lines = out.splitlines()
    assert lines[0] == "\u221a Connected to GitHub" and "Current runner version: '2.329.0'" in out
    assert any(x.endswith(": Listening for Jobs") for x in lines)
    assert any(x.endswith(": Running job: build") for x in lines)
    assert lines[-1].endswith(": Job build completed with result: Succeeded")


def test_fake_runner_failing_step_and_jitconfig_argument(
        fake: FakeGitHub, api: httpx.Client, runner_dir: Path) -> None:
    """With --jitconfig, a failing step (pipefail) ends the job as failure, later steps skipped."""
    job = fake.queue_job(steps=({"name": "bad", "run": "false | true; echo never-printed"},
                                {"name": "after", "run": "echo after-ran"}))
    encoded = make_jit(api, "failing").json()["encoded_jit_config"]
    proc = subprocess.run([str(runner_dir / "run.sh"), "--jitconfig", encoded],
                          capture_output=True, text=True, timeout=60,
                          env={"PATH": os.environ["PATH"], "RUNNER_ALLOW_RUNASROOT": "1"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert fake.jobs[job.id].conclusion == "failure"
    log = "\n".join(fake.jobs[job.id].log)
    assert "Process completed with exit code 1." in log
    assert "never-printed" not in log and "after-ran" not in log
    assert proc.stdout.rstrip().endswith("completed with result: Failed")


def test_fake_runner_takes_an_older_job_than_its_own(
        fake: FakeGitHub, api: httpx.Client, runner_dir: Path) -> None:
    """Fungibility: a [.., big] runner runs an older [self-hosted, kata-ci] job, not its own."""
    older = fake.queue_job(labels=LABELS, steps=({"name": "o", "run": "echo older"},))
    own = fake.queue_job(labels=[*LABELS, "big"], steps=({"name": "b", "run": "echo own"},))
    encoded = make_jit(api, "for-big", [*LABELS, "big"]).json()["encoded_jit_config"]
    proc = _start(runner_dir, encoded)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    assert fake.jobs[older.id].runner_name == "for-big" and "older" in fake.jobs[older.id].log
    assert fake.jobs[own.id].status == "queued"


def test_fake_runner_sigterm_cancels_the_running_step(
        fake: FakeGitHub, api: httpx.Client, runner_dir: Path, tmp_path: Path) -> None:
    """SIGTERM mid-step kills the step's process group, job cancelled, runner exits 1."""
    pidfile = tmp_path / "step.pid"
    job = fake.queue_job(steps=({"name": "slow", "run": f"echo $$ > {pidfile}; sleep 300; "
                                 "echo woke"},))
    proc = _start(runner_dir, make_jit(api, "stopped").json()["encoded_jit_config"])
    assert fake.wait_for(lambda: pidfile.exists() and pidfile.read_text().strip() != "", 30)
    group = int(pidfile.read_text())
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 1, out
    assert (fake.jobs[job.id].status, fake.jobs[job.id].conclusion) == ("completed",
                                                                        "cancelled")
    assert "woke" not in out and "completed with result: Canceled" in out
    assert _members(group) == []


def test_fake_runner_refuses_bad_starts(fake: FakeGitHub, runner_dir: Path) -> None:
    """No/bad config, root, a deleted runner, SIGTERM while listening: exit 1, no job taken."""
    job = fake.queue_job(labels=["nobody-has-this"])
    for encoded, message in (("", "No JIT configuration"), ("bm90IGpzb24=", "JIT configuration")):
        proc = _start(runner_dir, encoded)
        out, _ = proc.communicate(timeout=30)
        assert proc.returncode == 1 and message in out, out
    with httpx.Client(base_url=fake.url, headers={"Authorization": f"token {TOKEN}"}) as api:
        made = make_jit(api, "refused").json()
        if os.geteuid() == 0:
            proc = _start(runner_dir, made["encoded_jit_config"], RUNNER_ALLOW_RUNASROOT="")
            out, _ = proc.communicate(timeout=30)
            assert proc.returncode == 1 and "Must not run with sudo" in out, out
        listening = _start(runner_dir, made["encoded_jit_config"])
        assert fake.wait_for(lambda: fake.runners[made["runner"]["id"]].status == "online", 30)
        listening.send_signal(signal.SIGTERM)
        assert listening.wait(30) == 1
        api.delete(f"/orgs/{ORG}/actions/runners/{made['runner']['id']}")
    proc = _start(runner_dir, made["encoded_jit_config"])
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 1 and "deleted from the server" in out, out
    assert fake.jobs[job.id].status == "queued"


def _members(group: int) -> list[int]:
    """Live processes of a process group."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[2]) == group and fields[0] != "Z":
                found.append(int(entry.name))
    return found
