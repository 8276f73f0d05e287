"""One job lifecycle under every source: what used to differ between `run -- CMD`, GitLab
jobs, GitHub jobs and queued jobs now behaves the same (issue 7's four bugs and its seams)."""

from __future__ import annotations

import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

from kata_ci.runner.core.env import GUEST_PATH
from tests.e2e.conftest import KATA_CI, kata_ci_run, leftovers

STATUSES = "success|warning|failed|timeout|skipped|manual|cancelled|system failure"


def summary(stderr: bytes) -> dict[str, str]:
    """job -> status from the summary table."""
    rows = re.findall(rf"│ (\S.*?) +│ \S.*? +│ ({STATUSES})\b", stderr.decode())
    return {name.strip(): status for name, status in rows}


def workflow(project: Path, text: str) -> Path:
    path = project / ".github" / "workflows" / "ci.yml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_github_step_that_cannot_start_fails_its_job_and_the_run_reports(
        tmp_path: Path, cli_env: dict[str, str]) -> None:
    """A step whose shell does not exist (`shell: ${{ env.MY_SHELL }}`) fails that step:
    its job fails (an `if: always()` step still runs), the other job runs, the summary is
    printed and the run exits 1: no traceback."""
    workflow(tmp_path, """\
on: push
jobs:
  bad:
    env: {MY_SHELL: fish}
    steps:
      - run: echo never-printed
        shell: ${{ env.MY_SHELL }}
      - if: always()
        run: echo cleanup-ran
  good:
    steps:
      - run: echo good-ran
""")
    result = kata_ci_run(["--pipeline"], cli_env, tmp_path)
    err = result.stderr.decode()
    assert result.returncode == 1, err
    assert "Traceback" not in err
    assert summary(result.stderr) == {"bad": "failed", "good": "success"}, err
    assert "is not available in the guest" in err
    lines = result.stdout.decode().splitlines()  # step headers echo the command: whole lines
    assert "[bad] cleanup-ran" in lines and "[good] good-ran" in lines
    assert "[bad] never-printed" not in lines
    assert leftovers(cli_env) == []


@pytest.mark.parametrize("how", ["flag", "config"])
def test_timeout_applies_to_github_jobs(tmp_path: Path, cli_env: dict[str, str],
                                        how: str) -> None:
    """--timeout and [vm] timeout stop a GitHub job that has no timeout-minutes of its own:
    it ends as `timeout`, the rest of its steps do not run, the run exits 1."""
    workflow(tmp_path, "on: push\njobs:\n  slow:\n    steps:\n"
                       "      - run: sleep 120; echo woke\n      - run: echo next-step\n")
    config = tmp_path / "config.toml"
    config.write_text("[vm]\ngrace = 1\n" + ("timeout = 3\n" if how == "config" else ""))
    args = ["--config", str(config), *(["--timeout", "3"] if how == "flag" else []), "slow"]
    result = kata_ci_run(args, cli_env, tmp_path, timeout=120)
    assert result.returncode == 1, result.stderr
    assert summary(result.stderr) == {"slow": "timeout"}, result.stderr.decode()
    assert b"timed out after 3s" in result.stderr
    lines = result.stdout.splitlines()  # step headers echo the command: whole lines
    assert b"woke" not in lines and b"next-step" not in lines


def test_env_flag_term_and_path_are_the_same_for_every_format(
        tmp_path: Path, cli_env: dict[str, str]) -> None:
    """`-e` reaches the job in CI-file mode for both formats (winning over the file's own
    value), and GitLab jobs, GitHub jobs and `run -- CMD` all see the user's TERM and the
    same PATH."""
    show = 'echo "X=$X TERM=$TERM PATH=$PATH"'
    (tmp_path / ".gitlab-ci.yml").write_text(
        f"variables: {{X: from-file}}\nshow:\n  script:\n    - '{show}'\n")
    workflow(tmp_path, f"on: push\nenv: {{X: from-file}}\njobs:\n  show:\n    steps:\n"
                       f"      - run: '{show}'\n")
    env = {**cli_env, "TERM": "kata-test-term"}
    expected = f"X=from-e TERM=kata-test-term PATH={GUEST_PATH}"
    for fmt in (["--gitlab-ci", ".gitlab-ci.yml"], ["--workflow", ".github/workflows/ci.yml"]):
        result = kata_ci_run([*fmt, "-e", "X=from-e", "show"], env, tmp_path)
        assert result.returncode == 0, result.stderr
        assert expected in result.stdout.decode(), (fmt, result.stdout)
    result = kata_ci_run(["-e", "X=from-e", "--", "sh", "-c", show], env, tmp_path)
    assert result.stdout.decode().strip() == expected


@pytest.mark.parametrize("fmt", ["gitlab", "github"])
def test_boot_failure_reaches_the_job_log_in_every_format(
        tmp_path: Path, cli_env: dict[str, str], fmt: str) -> None:
    """A VM that does not come up is a system failure named in the job's own output, for
    GitLab and GitHub jobs alike; nothing is left behind."""
    if fmt == "gitlab":
        (tmp_path / ".gitlab-ci.yml").write_text("j:\n  script: [echo hi]\n")
    else:
        workflow(tmp_path, "on: push\njobs:\n  j:\n    steps:\n      - run: echo hi\n")
    config = tmp_path / "config.toml"
    config.write_text("[vm]\nboot_timeout = 0.05\n")  # below a restore, too
    result = kata_ci_run(["--config", str(config), "j"], cli_env, tmp_path)
    assert result.returncode == 1, result.stderr
    assert summary(result.stderr) == {"j": "system failure"}, result.stderr.decode()
    assert b"kata-ci: system failure:" in result.stderr and b"within 0.05s" in result.stderr
    assert leftovers(cli_env) == []


def test_ctrl_c_during_boot_cancels_a_pipeline_job_before_it_runs(
        tmp_path: Path, cli_env: dict[str, str]) -> None:
    """Ctrl-C while a pipeline's VM boots kills that VM: the job never starts (its first
    command does not run), the run exits 130 and leaves nothing behind."""
    (tmp_path / ".gitlab-ci.yml").write_text("j:\n  script: [touch started, sleep 100]\n")
    run_dir = Path(cli_env["KATA_CI_RUN_DIR"])
    proc = subprocess.Popen([*KATA_CI, "run", "j"], env=cli_env, cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while not (run_dir.is_dir() and any(run_dir.iterdir())):  # QEMU is starting
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert summary(err) == {"j": "cancelled"}, err.decode()
    assert not (tmp_path / "started").exists()
    assert leftovers(cli_env) == []

