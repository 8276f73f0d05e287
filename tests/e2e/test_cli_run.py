"""`kata-ci run` as a user runs it: exit statuses, live output, cancel, timeout, a VM killed
under the job, concurrency, throw-away rootfs, and nothing left behind after any of them."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

from tests.e2e.conftest import KATA_CI, kata_ci_run, leftovers


def start(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen([*KATA_CI, "run", *args], env=env, cwd=cwd,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def wait_for_line(proc: subprocess.Popen[bytes], wanted: bytes) -> list[bytes]:
    assert proc.stdout is not None
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if line.strip() == wanted:
            return seen
    raise AssertionError(f"never saw {wanted!r}: {seen!r}; stderr: {proc.stderr.read()!r}")  # type: ignore[union-attr]


def test_success_writes_workspace_and_cleans_up(tmp_path: Path, cli_env: dict[str, str]) -> None:
    """A successful job exits 0, its file lands in the workspace, and nothing is left behind."""
    result = kata_ci_run(["--", "sh", "-c", "echo made > out.txt; echo done"], cli_env, tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout == b"done\n"
    assert (tmp_path / "out.txt").read_text() == "made\n"
    assert leftovers(cli_env) == []


def test_failure_status_is_the_commands(tmp_path: Path, cli_env: dict[str, str]) -> None:
    """A failing command's status (42) is kata-ci's status, and teardown is still complete."""
    result = kata_ci_run(["--", "sh", "-c", "echo oops >&2; exit 42"], cli_env, tmp_path)
    assert result.returncode == 42
    assert result.stderr.startswith(b"oops\n")
    assert leftovers(cli_env) == []


def test_output_streams_live(tmp_path: Path, cli_env: dict[str, str]) -> None:
    """The first line reaches the terminal while kata-ci (and the command) still run."""
    proc = start(["--", "sh", "-c", "echo first; sleep 3; echo second"], cli_env, tmp_path)
    wait_for_line(proc, b"first")
    assert proc.poll() is None
    out, _ = proc.communicate(timeout=120)
    assert out == b"second\n" and proc.returncode == 0


def test_ctrl_c_terms_the_job_then_exits_130(tmp_path: Path, cli_env: dict[str, str]) -> None:
    """Ctrl-C sends SIGTERM to the guest command (it can clean up), exits 130, leaves nothing."""
    script = "trap 'echo got-term; exit 143' TERM; echo ready; sleep 600 & wait"
    proc = start(["--", "sh", "-c", script], cli_env, tmp_path)
    wait_for_line(proc, b"ready")
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert b"got-term" in out
    assert leftovers(cli_env) == []


def test_ctrl_c_kills_a_job_ignoring_sigterm_after_grace(
        tmp_path: Path, cli_env: dict[str, str]) -> None:
    """A job that ignores SIGTERM is killed with its VM once the grace period is over."""
    script = "trap '' TERM; echo ready; while :; do sleep 1; done"
    proc = start(["--grace", "1", "--", "sh", "-c", script], cli_env, tmp_path)
    wait_for_line(proc, b"ready")
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert leftovers(cli_env) == []


def test_timeout_stops_the_job_with_124(tmp_path: Path, cli_env: dict[str, str]) -> None:
    """--timeout stops a job the same way as cancel and reports it as timed out (124)."""
    result = kata_ci_run(["--timeout", "3", "--grace", "1", "--", "sleep", "600"],
                         cli_env, tmp_path)
    assert result.returncode == 124, result.stderr
    assert b"timed out after 3s" in result.stderr
    assert leftovers(cli_env) == []


def test_vm_killed_mid_job_is_a_system_failure(tmp_path: Path, cli_env: dict[str, str]) -> None:
    """SIGKILL of QEMU under a running job: exit 125, the console tail is shown, no leftovers."""
    proc = start(["--", "sh", "-c", "echo ready; sleep 600"], cli_env, tmp_path)
    wait_for_line(proc, b"ready")
    records = list(Path(cli_env["KATA_CI_RUN_DIR"]).glob("*/vm.json"))
    assert len(records) == 1
    os.kill(json.loads(records[0].read_text())["qemu"], signal.SIGKILL)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 125, err
    assert b"system failure" in err
    assert b"kata-ci-agent: " in err  # the guest console tail is part of the report
    assert leftovers(cli_env) == []


def test_two_runs_at_once_do_not_collide(tmp_path: Path, cli_env: dict[str, str]) -> None:
    """Two concurrent runs in different directories each see and write only their own."""
    dirs = [tmp_path / "a", tmp_path / "b"]
    procs = []
    for d in dirs:
        d.mkdir()
        (d / "name").write_text(d.name)
        procs.append(start(["--", "sh", "-c", "sleep 2; cp name copy; ls"], cli_env, d))
    results = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err for _, err in results]
    for d, (out, _) in zip(dirs, results, strict=True):
        assert (d / "copy").read_text() == d.name
        assert sorted(out.split()) == [b"copy", b"name"]
    assert leftovers(cli_env) == []


def test_rootfs_writes_do_not_survive_the_vm(tmp_path: Path, cli_env: dict[str, str]) -> None:
    """A job writing into /usr leaves nothing for the next VM (throw-away overlay)."""
    write = "echo x > /usr/kata-ci-marker && cat /usr/kata-ci-marker"
    first = kata_ci_run(["--", "sh", "-c", write], cli_env, tmp_path)
    assert first.returncode == 0 and first.stdout == b"x\n", first.stderr
    second = kata_ci_run(["--", "test", "!", "-e", "/usr/kata-ci-marker"], cli_env, tmp_path)
    assert second.returncode == 0, second.stderr


def test_100mb_of_output_arrives_complete_with_bounded_memory(
        tmp_path: Path, cli_env: dict[str, str]) -> None:
    """100 MB of stdout arrives byte-exact (sha256) while kata-ci's own RSS stays bounded."""
    size = 100_000_000
    line = b"0123456789abcdef\n"
    expected = hashlib.sha256((line * (size // len(line) + 1))[:size]).hexdigest()
    proc = subprocess.Popen(
        [*KATA_CI, "run", "--", "sh", "-c", f"yes 0123456789abcdef | head -c {size}"],
        env=cli_env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    peak = [0]

    def sample() -> None:
        while proc.poll() is None:
            try:
                status = Path(f"/proc/{proc.pid}/status").read_text()
            except OSError:
                return
            rss = [int(x.split()[1]) for x in status.splitlines() if x.startswith("VmRSS")]
            if not rss:  # exited: a zombie has no memory left to measure
                return
            peak[0] = max(peak[0], rss[0])
            time.sleep(0.05)

    sampler = threading.Thread(target=sample)
    sampler.start()
    digest, total = hashlib.sha256(), 0
    assert proc.stdout is not None
    for block in iter(lambda: proc.stdout.read(1 << 20), b""):  # type: ignore[union-attr]
        digest.update(block)
        total += len(block)
    proc.wait(timeout=600)
    sampler.join()
    assert proc.returncode == 0, proc.stderr.read()  # type: ignore[union-attr]
    assert (total, digest.hexdigest()) == (size, expected)
    assert 0 < peak[0] < 200 * 1024, f"kata-ci peak RSS {peak[0]} KiB"  # far below 100 MB + base
    assert leftovers(cli_env) == []


def test_virtiofsd_dying_is_a_system_failure(tmp_path: Path, cli_env: dict[str, str]) -> None:
    """The workspace file server dying under a job ends it as a system failure (125), cleanly."""
    proc = start(["--", "sh", "-c", "echo ready; sleep 600"], cli_env, tmp_path)
    wait_for_line(proc, b"ready")
    record = next(Path(cli_env["KATA_CI_RUN_DIR"]).glob("*/vm.json"))
    os.kill(json.loads(record.read_text())["virtiofsd"], signal.SIGKILL)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 125, err
    assert b"system failure" in err
    assert leftovers(cli_env) == []


def test_agent_missing_its_deadline_is_a_system_failure(
        tmp_path: Path, cli_env: dict[str, str]) -> None:
    """A guest agent that does not answer within boot_timeout: 125, console tail, no leftovers."""
    config = tmp_path / "config.toml"
    config.write_text("[vm]\nboot_timeout = 0.05\n")  # below a restore, too
    result = kata_ci_run(["--config", str(config), "--", "true"], cli_env, tmp_path)
    assert result.returncode == 125, result.stderr
    assert b"system failure" in result.stderr and b"within 0.05s" in result.stderr
    assert leftovers(cli_env) == []
