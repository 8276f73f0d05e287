"""ansible/site.yml against a real target: a fresh Debian 12 host booted in systemd-nspawn
(tests/deploy/target.py). Slow (the first playbook run installs kata-ci's packages and
venv): runs only with KATA_CI_ANSIBLE_TEST=1, as scripts/test-ansible.sh sets it."""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from tests.deploy import target as target_mod

ROOT = Path(__file__).resolve().parents[2]
PLAYBOOK_BIN = Path(sys.executable).with_name("ansible-playbook")
RECAP = re.compile(r"^(\S+)\s*:\s*ok=(\d+)\s+changed=(\d+)\s+unreachable=(\d+)\s+failed=(\d+)"
                   r"\s+skipped=(\d+)\s+rescued=(\d+)\s+ignored=(\d+)", re.M)
UNREACHABLE = "http://127.0.0.1:9"  # nothing listens: GitLab's and GitHub's APIs fail fast
SERVICES = ("redis-server", "kata-ci-worker", "kata-ci-status", "kata-ci-gitlab",
            "kata-ci-github")
ENDPOINTS = {"kata-ci-status": "http://127.0.0.1:8480/",
             "kata-ci-worker": "http://127.0.0.1:9470/metrics",
             "kata-ci-gitlab": "http://127.0.0.1:9471/metrics",
             "kata-ci-github": "http://127.0.0.1:9472/metrics"}
UNPACK = "Unpack it as /opt/kata-ci when its content changed"
SETUP = "Packages, venv and guest images (scripts/setup.sh) for this source"
WORKER_READY = 900.0  # s: the worker builds its VM templates (TCG) before it announces itself
STATUS_TOKEN = secrets.token_hex(16)
# GET argv[1] (with argv[2] as bearer token), print the HTTP status: run in the target.
FETCH = ("import sys, urllib.request as u; print(u.urlopen(u.Request(sys.argv[1], headers="
         "{\"Authorization\": \"Bearer \" + sys.argv[2]}), timeout=10).status)")

pytestmark = [
    pytest.mark.skipif(os.environ.get("KATA_CI_ANSIBLE_TEST") != "1",
                       reason="boots a Debian container and deploys into it (minutes): "
                              "scripts/test-ansible.sh"),
    pytest.mark.timeout(5400),
]


class Log:
    """Progress on stdout, as it happens (pytest -s), stamped with the time since the start."""

    def __init__(self) -> None:
        self.started = time.monotonic()

    def __call__(self, text: str) -> None:
        self.raw(f"[{time.monotonic() - self.started:7.1f}s] {text}\n")

    def raw(self, text: str) -> None:
        print(text, end="", flush=True)


def snapshot(dest: Path) -> Path:
    """This checkout as the playbook would deploy it, frozen: others may edit the tree while
    the test runs, and the second run must see the same source as the first."""
    made = subprocess.run([sys.executable, str(ROOT / "ansible/files/source_tarball.py"),
                           str(ROOT), str(dest / "archives")],
                          check=True, capture_output=True, text=True)
    checkout = dest / "checkout"
    checkout.mkdir()
    with tarfile.open(json.loads(made.stdout)["path"]) as tar:
        tar.extractall(checkout, filter="tar")
    return checkout


def inventory_vars(tmp: Path) -> dict[str, object]:
    """Every daemon on: a GitLab runner and a GitHub App whose APIs are an unreachable
    loopback port (both keep retrying, as through an outage), a throwaway App key, a status
    page token."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption()).decode()
    return {
        "kata_ci_labels": ["default"],
        "kata_ci_gitlab_runners": [{"url": UNREACHABLE, "token": "glrt-test-token",
                                    "system_id": "s_0123456789ab", "id": 1,
                                    "label": "default"}],
        "kata_ci_github": {"api_url": UNREACHABLE, "org": "kata-ci-test", "app_id": 1,
                           "installation_id": 1, "label_sets": [{"labels": ["kata-ci"]}]},
        "kata_ci_github_private_key": pem,
        "kata_ci_github_webhook_secret": secrets.token_hex(16),
        "kata_ci_status_token": STATUS_TOKEN,
        "kata_ci_source_cache": str(tmp / "controller-cache"),
    }


def run_playbook(checkout: Path, inventory: Path, tmp: Path, log: Log) -> tuple[int, str]:
    env = {**os.environ, "ANSIBLE_NOCOLOR": "1", "ANSIBLE_FORCE_COLOR": "0",
           "ANSIBLE_HOME": str(tmp / "ansible-home"), "ANSIBLE_PIPELINING": "1",
           "ANSIBLE_RETRY_FILES_ENABLED": "0", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([str(PLAYBOOK_BIN), "-i", str(inventory),
                             str(checkout / "ansible/site.yml")],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env, cwd=tmp)
    assert proc.stdout is not None
    out = []
    for line in proc.stdout:
        out.append(line)
        log.raw(line)
    return proc.wait(), "".join(out)


def recap(output: str) -> dict[str, int]:
    found = RECAP.findall(output)
    assert len(found) == 1, f"one PLAY RECAP line expected:\n{output[-3000:]}"
    names = ("ok", "changed", "unreachable", "failed", "skipped", "rescued", "ignored")
    return dict(zip(names, (int(v) for v in found[0][1:]), strict=True))


def wait_for(what: str, check: Callable[[], bool], timeout: float, log: Log) -> None:
    started = time.monotonic()
    while not check():
        if time.monotonic() - started > timeout:
            raise AssertionError(f"{what}: not after {timeout:.0f}s")
        time.sleep(5)
    log(f"{what}: after {time.monotonic() - started:.0f}s")


@dataclass
class Deployed:
    target: target_mod.Target
    log: Log
    statuses: list[int] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)
    recaps: list[dict[str, int]] = field(default_factory=list)
    durations: list[float] = field(default_factory=list)
    active: list[list[str]] = field(default_factory=list)  # systemctl is-active after each


def task_results(output: str, task: str) -> list[str]:
    """The result words (ok, changed, skipping, ...) of a task in ansible-playbook output."""
    results, current = [], ""
    for line in output.splitlines():
        if line.startswith("TASK ["):
            current = line[6:].split("]")[0]
        elif current == task and ": [" in line:
            results.append(line.split(":")[0])
    return results


@pytest.fixture(scope="module")
def deployed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployed]:
    """A fresh target (broker and worker at once), the playbook run on it three times: on
    the fresh host, again as it is, and once more after the source changed."""
    for tool in ("debootstrap", "systemd-nspawn", "nsenter", "ssh", "ssh-keygen"):
        assert shutil.which(tool), f"{tool} is needed (scripts/setup.sh installs it)"
    assert os.geteuid() == 0, "debootstrap and systemd-nspawn need root"
    tmp = tmp_path_factory.mktemp("ansible")
    log = Log()
    base = target_mod.base_tree(log)
    checkout = snapshot(tmp)
    with target_mod.Target(base, log) as target:
        done = Deployed(target, log)
        inventory = target.inventory(tmp / "inventory.yml", inventory_vars(tmp))
        for attempt, why in ((1, "fresh host"), (2, "nothing changed"),
                             (3, "the source changed")):
            if attempt == 3:
                with (checkout / "README.md").open("a") as readme:
                    readme.write("\n")
            log(f"ansible-playbook, run {attempt} ({why})")
            started = time.monotonic()
            status, output = run_playbook(checkout, inventory, tmp, log)
            done.durations.append(time.monotonic() - started)
            done.statuses.append(status)
            done.outputs.append(output)
            if status == 0:
                done.recaps.append(recap(output))
            log(f"run {attempt}: exit {status} after {done.durations[-1]:.0f}s"
                + (f", {done.recaps[-1]}" if status == 0 else ""))
            if status != 0:
                break
            done.active.append(target.ssh(f"systemctl is-active {' '.join(SERVICES)}",
                                          check=False).stdout.split())
        yield done
        log("worker journal (last lines):\n" + target.ssh(
            "journalctl -u kata-ci-worker --no-pager -n 20", check=False).stdout)
    log(f"playbook runs: {', '.join(f'{d:.0f}s' for d in done.durations)}; "
        f"whole fixture {time.monotonic() - log.started:.0f}s (teardown included)")


def test_playbook_deploys_a_fresh_debian_host_and_a_second_run_changes_nothing(
        deployed: Deployed) -> None:
    """A fresh Debian 12 broker+worker host: deployed, all services run, a rerun changes nothing."""
    assert deployed.statuses == [0, 0, 0], f"playbook exit statuses {deployed.statuses}"
    assert deployed.recaps[1]["changed"] == 0, f"the second run changed: {deployed.recaps[1]}"
    assert deployed.recaps[1]["failed"] == deployed.recaps[1]["unreachable"] == 0
    everything = ["active"] * len(SERVICES)
    assert deployed.active[:2] == [everything, everything], dict(zip(
        SERVICES, deployed.active[1], strict=True))
    # A changed source is deployed again, set up again, and every daemon restarted on it.
    for task in (UNPACK, SETUP):
        assert task_results(deployed.outputs[2], task) == ["changed"], task
    assert deployed.active[2] == everything
    target, log = deployed.target, deployed.log

    def announced() -> bool:
        keys = target.ssh("redis-cli --scan --pattern 'kataci:worker:*'", check=False)
        return bool(keys.stdout.strip())

    wait_for("the worker announced its slots in Redis", announced, WORKER_READY, log)
    for unit, url in ENDPOINTS.items():
        got = target.ssh(f"python3 -c '{FETCH}' {url} {STATUS_TOKEN}", check=False)
        assert got.stdout.strip() == "200", f"{unit} at {url}: {got.stdout}{got.stderr}"
        log(f"{unit}: {url} answers 200")
    restarts = target.ssh("systemctl show -p NRestarts --value " + " ".join(SERVICES))
    assert restarts.stdout.split() == ["0"] * len(SERVICES), \
        f"restarts: {dict(zip(SERVICES, restarts.stdout.split(), strict=True))}"
    assert target.ssh("redis-cli config get appendonly").stdout.split() == [
        "appendonly", "yes"]


def test_a_job_submitted_on_the_deployed_host_runs_in_a_vm(deployed: Deployed) -> None:
    """The deployed worker takes a submitted job and runs it in a microVM."""
    assert deployed.statuses == [0, 0, 0], "not deployed"
    target, log = deployed.target, deployed.log
    started = time.monotonic()
    done = target.ssh("mkdir -p /tmp/job && cd /tmp/job && echo hello >greeting && "
                      "timeout 600 /opt/kata-ci/.venv/bin/kata-ci submit --config "
                      "/etc/kata-ci/config.toml -- cat greeting", timeout=660, check=False)
    log(f"kata-ci submit: exit {done.returncode} after {time.monotonic() - started:.0f}s\n"
        f"{done.stdout}{done.stderr}")
    assert done.returncode == 0 and done.stdout.strip() == "hello"
