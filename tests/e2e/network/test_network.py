"""Per-job networking against the lab's hosts: egress, allowlist, none, isolation between
VMs, no leftovers, and CI-file jobs using the network."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from pathlib import Path

from tests import netlab
from tests.e2e.conftest import KATA_CI, kata_ci_run, leftovers
from tests.e2e.network.conftest import NetVM, run

CURL = "curl -sS --max-time 5"


def test_egress_reaches_the_internet_host_by_name_and_address_over_both_families(
        lab: netlab.Lab, net_env: dict[str, str], workspace: Path) -> None:
    """`kata-ci run` (default egress) fetches from the "internet" host by name and by
    address, over IPv4 and IPv6, through kata-ci's resolver."""
    script = (f"{CURL} -4 http://internet.test/hello && {CURL} -6 http://internet.test/hello && "
              f"{CURL} http://{netlab.INTERNET_V4}/hello && "
              f"{CURL} 'http://[{netlab.INTERNET_V6}]/hello' && cat /etc/resolv.conf")
    result = kata_ci_run(["-C", str(workspace), "--", "sh", "-c", script], net_env, workspace)
    out = result.stdout.decode()
    assert result.returncode == 0, result.stderr.decode()[-2000:]
    assert out.count(netlab.BODY) == 4
    assert "nameserver 10.0.2.2" in out
    assert leftovers(net_env) == [] and netlab.kata_netns() == []


def test_allowlist_admits_only_the_named_host_and_port(net_vm: NetVM) -> None:
    """allowlist internet.test:80 and 198.51.100.20:8080: exactly those work; the same hosts
    on other ports, and names not listed, do not."""
    vm = net_vm("allowlist", allow=("internet.test:80", f"{netlab.OTHER_V4}:8080"))
    out, code = run(vm, f"{CURL} http://internet.test/hello && "
                        f"{CURL} http://{netlab.OTHER_V4}:8080/x")
    assert code == 0 and netlab.BODY in out and f"{netlab.OTHER_V4} /x" in out, out
    for target in ("http://internet.test:8080/", f"http://{netlab.OTHER_V4}/",
                   f"http://{netlab.INTERNET_V4}:8080/"):
        out, code = run(vm, f"{CURL} {target}")
        assert code == 7, (target, out)  # refused at once, not a timeout (28)
    out, code = run(vm, f"{CURL} http://other.test:8080/")
    assert code == 6, out  # the resolver refuses names not listed


def test_network_none_has_only_a_loopback(lab: netlab.Lab, net_env: dict[str, str],
                                          workspace: Path) -> None:
    """--network none: the guest has no interface but lo, and no packet gets out."""
    script = (f"tail -n +3 /proc/net/dev | cut -d: -f1 | tr -d ' '; "
              f"{CURL} http://{netlab.INTERNET_V4}/hello; echo rc=$?")
    result = kata_ci_run(["-C", str(workspace), "--network", "none", "--", "sh", "-c", script],
                         net_env, workspace)
    lines = result.stdout.decode().split()
    assert result.returncode == 0, result.stderr.decode()[-2000:]
    assert lines == ["lo", "rc=7"], lines


def test_two_concurrent_vms_cannot_reach_each_other(net_vm: NetVM) -> None:
    """VM one serves on port 8000; VM two, running at the same time, reaches it by no
    address: its own guest address is its own, the host's and the gateway's are denied."""
    one, two = net_vm(), net_vm()
    serving = threading.Thread(target=run, args=(
        one, "timeout 20 python3 -m http.server 8000 --bind :: >/dev/null 2>&1; true"))
    serving.start()
    try:
        out, code = run(one, "for i in $(seq 50); do curl -s -o /dev/null "
                             "http://127.0.0.1:8000/ && break; sleep 0.2; done; "
                             f"{CURL} -o /dev/null -w '%{{http_code}}' http://10.0.2.15:8000/")
        assert out.endswith("200"), out  # the server is up, on the guest address too
        for target in ("10.0.2.15", "10.0.2.2", netlab.HOST_V4, f"[{netlab.HOST_V6}]",
                       "[fd6b:6369::15]"):
            out, code = run(two, f"{CURL} http://{target}:8000/")
            assert code == 7, (target, out)
    finally:
        run(one, "pkill -f http.server; true")
        serving.join()


def _state_after(args: list[str], env: dict[str, str], cwd: Path,
                 before: tuple[str, str, str]) -> None:
    result = kata_ci_run(args, env, cwd)
    assert result.returncode != 0 or b"ok" in result.stdout, result.stderr[-1000:]
    assert netlab.kata_netns() == []
    assert netlab.host_state() == before
    assert leftovers(env) == []
    assert subprocess.run(["pgrep", "-f", "bin/pasta"], capture_output=True).stdout == b""


def test_nothing_is_left_after_success_failure_and_timeout(
        lab: netlab.Lab, net_env: dict[str, str], workspace: Path) -> None:
    """After a job that succeeds, fails or times out: no namespace, tap, pasta, nft table
    or route is left, and the host's links, routes and ruleset are as before."""
    before = netlab.host_state()
    base = ["-C", str(workspace), "--"]
    _state_after([*base, "sh", "-c", f"{CURL} -o /dev/null http://internet.test/ && echo ok"],
                 net_env, workspace, before)
    _state_after([*base, "sh", "-c", "exit 3"], net_env, workspace, before)
    _state_after(["--timeout", "3", *base, "sleep", "60"], net_env, workspace, before)


def test_sigkill_of_kata_ci_leaves_a_namespace_the_reaper_removes(
        lab: netlab.Lab, net_env: dict[str, str], workspace: Path) -> None:
    """SIGKILL of `kata-ci run` mid-job: QEMU and pasta die with it; the namespace it made
    is removed by the next kata-ci's reaper."""
    before = netlab.host_state()
    proc = subprocess.Popen([*KATA_CI, "run", "-C", str(workspace), "--", "sh", "-c",
                             "echo started; sleep 120"], env=net_env, stdout=subprocess.PIPE)
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == b"started"
    pids = [int(p) for p in subprocess.run(["pgrep", "-f", "bin/pasta"], capture_output=True,
                                           text=True).stdout.split()]
    assert pids and len(netlab.kata_netns()) == 1
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert netlab.wait_gone(pids) == []
    assert len(netlab.kata_netns()) == 1  # a dead owner's namespace, until the reaper
    result = kata_ci_run(["-C", str(workspace), "--network", "none", "--", "true"], net_env,
                         workspace)
    assert result.returncode == 0 and b"removed VM" in result.stderr
    assert netlab.kata_netns() == [] and netlab.host_state() == before
    time.sleep(0.1)
    assert leftovers(net_env) == []


def test_gitlab_and_github_jobs_curl_the_internet_host(
        lab: netlab.Lab, net_env: dict[str, str], workspace: Path) -> None:
    """A .gitlab-ci.yml job and a GitHub workflow job each fetch from the "internet" host."""
    (workspace / ".gitlab-ci.yml").write_text(
        "fetch:\n  script:\n    - curl -sS --max-time 5 http://internet.test/hello\n")
    flows = workspace / ".github" / "workflows"
    flows.mkdir(parents=True)
    (flows / "ci.yml").write_text(
        "on: push\njobs:\n  fetch:\n    runs-on: ubuntu-latest\n    steps:\n"
        "      - run: curl -sS --max-time 5 http://internet.test/hello\n")
    gitlab = kata_ci_run(["-C", str(workspace), "--gitlab-ci", ".gitlab-ci.yml", "fetch"],
                         net_env, workspace)
    assert gitlab.returncode == 0, gitlab.stderr.decode()[-2000:]
    assert netlab.BODY in gitlab.stdout.decode()
    github = kata_ci_run(["-C", str(workspace), "--workflow", ".github/workflows/ci.yml",
                          "fetch"], net_env, workspace)
    assert github.returncode == 0, github.stderr.decode()[-2000:]
    assert netlab.BODY in github.stdout.decode()
