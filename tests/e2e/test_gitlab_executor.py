"""`kata-ci gitlab-executor` driven the way gitlab-runner's custom executor drives a driver.

The real gitlab-runner binary cannot be fetched here, so ``Runner`` stands in for it and does
exactly what docs/executors/custom.md says gitlab-runner does: config_exec (its stdout parsed
as JSON; builds_dir gives CI_BUILDS_DIR and CI_PROJECT_DIR), prepare_exec, run_exec
``<script_path> <stage_name>`` once per stage with a bash script it generated (shebang,
``set -eo pipefail``, the commands through ``: | eval $'...'``), after a failed build
after_script and the *_on_failure stages, cleanup_exec always. Every stage gets gitlab-runner's
environment: the job's variables as CUSTOM_ENV_*, BUILD_FAILURE_EXIT_CODE and
SYSTEM_FAILURE_EXIT_CODE (37 and 38 here, not gitlab-runner's 1 and 2, to prove they are
read), BUILD_EXIT_CODE_FILE for run_exec, JOB_RESPONSE_FILE. Each stage runs in a process
group of its own, and a cancel is SIGTERM to that group, as gitlab-runner does.

Run: KATA_CI_CONFIG=<a toml with [vm] network = "none"> pytest tests/e2e/test_gitlab_executor.py
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.e2e.conftest import KATA_CI, leftovers

BUILD, SYSTEM = 37, 38
PROJECT = "group/project"
FAILURE_STAGES = ["after_script", "archive_cache_on_failure", "upload_artifacts_on_failure",
                  "cleanup_file_variables"]


def bash_script(commands: str) -> str:
    """A stage script as gitlab-runner's bash shell writes it (ANSI-C quoted eval)."""
    quoted = commands.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n")
    return (f"#!/usr/bin/env bash\n\nset -eo pipefail\nset +o noclobber\n"
            f": | eval $'{quoted}'\nexit 0\n")


class Runner:
    """gitlab-runner's side of the custom executor contract, for one job."""

    def __init__(self, folder: Path, env: dict[str, str], job_id: str,
                 variables: dict[str, str], label: str | None = None) -> None:
        self.dir = folder
        response = self.dir / "job-response.json"
        response.write_text(json.dumps({"id": int(job_id), "variables": []}))
        self.label = ["--label", label] if label else []
        self.variables = {"CI": "true", "GITLAB_CI": "true", "CI_SERVER": "yes",
                          "CI_JOB_ID": job_id, "CI_RUNNER_ID": "4242",
                          "CI_RUNNER_SHORT_TOKEN": "t0kEn_42", "CI_JOB_TIMEOUT": "3600",
                          "CI_JOB_NAME": "test", "CI_PROJECT_PATH": PROJECT, **variables}
        self.env = {**env, "BUILD_FAILURE_EXIT_CODE": str(BUILD),
                    "SYSTEM_FAILURE_EXIT_CODE": str(SYSTEM), "JOB_RESPONSE_FILE": str(response)}
        self.stages = 0

    def stage_env(self) -> dict[str, str]:
        return {**self.env, **{f"CUSTOM_ENV_{k}": v for k, v in self.variables.items()}}

    def call(self, args: list[str], env: dict[str, str] | None = None,
             timeout: float = 300) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run([*KATA_CI, "gitlab-executor", *args], env=env or self.stage_env(),
                              capture_output=True, timeout=timeout, process_group=0)

    def config(self) -> dict[str, object]:
        result = self.call(["config", *self.label])
        assert result.returncode == 0, result.stderr
        config: dict[str, object] = json.loads(result.stdout)
        builds = str(config["builds_dir"])
        # builds_dir_is_shared false: no runner token / concurrency id in the path.
        self.variables.update({"CI_BUILDS_DIR": builds,
                               "CI_PROJECT_DIR": f"{builds}/{PROJECT}"})
        return config

    def prepare(self) -> subprocess.CompletedProcess[bytes]:
        return self.call(["prepare", *self.label])

    def script(self, stage: str, commands: str) -> tuple[Path, Path]:
        self.stages += 1
        folder = self.dir / f"stage-{self.stages}"
        folder.mkdir()
        script = folder / f"script.{stage}"
        script.write_text(bash_script(commands))
        return script, folder / "exit-code"

    def start(self, stage: str, commands: str) -> tuple[subprocess.Popen[bytes], Path]:
        script, code_file = self.script(stage, commands)
        env = {**self.stage_env(), "BUILD_EXIT_CODE_FILE": str(code_file)}
        proc = subprocess.Popen([*KATA_CI, "gitlab-executor", "run", str(script), stage],
                                env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                process_group=0)
        return proc, code_file

    def run(self, stage: str, commands: str) -> tuple[int, bytes, bytes, str | None]:
        """(exit status, stdout, stderr, BUILD_EXIT_CODE_FILE's content)."""
        proc, code_file = self.start(stage, commands)
        out, err = proc.communicate(timeout=300)
        code = code_file.read_text().strip() if code_file.exists() else None
        return proc.returncode, out, err, code

    def cleanup(self) -> subprocess.CompletedProcess[bytes]:
        return self.call(["cleanup", *self.label])


def wait_for_line(stream: object, wanted: bytes, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    seen = []
    for line in stream:  # type: ignore[attr-defined]
        seen.append(line)
        if line.strip() == wanted:
            return
        assert time.monotonic() < deadline, seen
    raise AssertionError(f"never saw {wanted!r}: {seen!r}")


def test_a_job_runs_its_stages_in_one_vm_and_leaves_nothing(
        tmp_path: Path, cli_env: dict[str, str]) -> None:
    """One VM serves every stage: files persist, exit codes from env, after_script, no leftovers."""
    marker = tmp_path / "pwned"
    hostile = f"$(touch {marker}); `touch {marker}`; ../../etc"
    runner = Runner(tmp_path, {**cli_env, "HOST_ONLY": "host-secret"}, "9001",
                    {"MY_VAR": hostile, "KATA_CI_NETWORK": "none"})
    config = runner.config()
    assert config["builds_dir"] == "/builds" and config["cache_dir"] == "/cache"
    assert config["builds_dir_is_shared"] is False
    assert config["driver"] == {"name": "kata-ci", "version": config["driver"]["version"]}  # type: ignore[index]
    started = time.monotonic()
    prepared = runner.prepare()
    prepare_s = time.monotonic() - started
    assert prepared.returncode == 0, prepared.stderr
    assert b"ready" in prepared.stdout
    code, out, err, _ = runner.run("prepare_script", 'echo "Running on $(hostname)"')
    assert code == 0 and out.startswith(b"Running on "), err
    started = time.monotonic()
    code, out, err, _ = runner.run("get_sources", 'mkdir -p "$CI_PROJECT_DIR"\n'
                                   'echo fetched > "$CI_PROJECT_DIR/src.txt"\necho got sources')
    stage_s = time.monotonic() - started
    assert (code, out) == (0, b"got sources\n"), err
    code, out, err, written = runner.run("step_script", 'cd "$CI_PROJECT_DIR"\ncat src.txt\n'
                                         'printf "%s\\n" "$MY_VAR"\n'
                                         'echo "host=${HOST_ONLY-unset}"\necho oops >&2\nexit 3')
    assert code == BUILD, err
    assert written == "3"
    assert out == f"fetched\n{hostile}\nhost=unset\n".encode()
    assert err == b"oops\n"
    code, out, err, _ = runner.run("after_script", 'cat "$CI_PROJECT_DIR/src.txt"; echo after')
    assert (code, out) == (0, b"fetched\nafter\n"), err
    for stage in FAILURE_STAGES[1:]:
        code, _, err, _ = runner.run(stage, "true")
        assert code == 0, err
    assert runner.cleanup().returncode == 0
    assert leftovers(cli_env) == []
    assert not marker.exists()
    print(f"\nprepare {prepare_s:.1f}s, one run stage {stage_s:.2f}s")


def test_stage_sigterm_cancels_the_script_in_the_guest(
        tmp_path: Path, cli_env: dict[str, str]) -> None:
    """SIGTERM to a stage reaches the guest script; exits BUILD_FAILURE_EXIT_CODE; VM lives on."""
    runner = Runner(tmp_path, cli_env, "9002", {})
    runner.config()
    assert runner.prepare().returncode == 0
    proc, _ = runner.start("step_script", "trap 'echo got-term; exit 143' TERM\necho ready\n"
                           "sleep 600 & wait")
    wait_for_line(proc.stdout, b"ready")
    started = time.monotonic()
    os.killpg(proc.pid, signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    print(f"\ncancel to exit {time.monotonic() - started:.2f}s")
    assert proc.returncode == BUILD, err
    assert b"got-term" in out
    code, out, err, _ = runner.run("after_script", "echo after")
    assert (code, out) == (0, b"after\n"), err
    assert runner.cleanup().returncode == 0
    assert leftovers(cli_env) == []


HARNESS = """
import json, os, time
from pathlib import Path
from tests.e2e.test_gitlab_executor import Runner
spec = json.loads(os.environ.pop("GX_HARNESS"))
runner = Runner(Path(spec["dir"]), dict(os.environ), spec["job"], {})
runner.config()
assert runner.prepare().returncode == 0
proc, _ = runner.start("step_script", "echo started; sleep 600")
assert proc.stdout.readline().strip() == b"started"
print(proc.pid, flush=True)
time.sleep(600)
"""


def test_runner_and_stage_killed_leave_no_vm(tmp_path: Path, cli_env: dict[str, str]) -> None:
    """SIGKILL of gitlab-runner and its running stage: within 15 s no VM process or dir is left."""
    env = {**cli_env, "GX_HARNESS": json.dumps({"job": "9003", "dir": str(tmp_path)})}
    harness = subprocess.Popen([sys.executable, "-c", HARNESS], env=env,
                               stdout=subprocess.PIPE, cwd=Path(__file__).parents[2])
    assert harness.stdout is not None
    stage_pid = int(harness.stdout.readline())
    run_dir = Path(cli_env["KATA_CI_RUN_DIR"])
    assert (run_dir / "gitlab-4242-9003" / "holder.sock").exists(), "prepare did not run"
    harness.kill()
    os.killpg(stage_pid, signal.SIGKILL)
    harness.wait()
    killed = time.monotonic()
    while leftovers(cli_env) and time.monotonic() - killed < 15:
        time.sleep(0.2)
    print(f"\nnothing left {time.monotonic() - killed:.1f}s after the kill")
    assert leftovers(cli_env) == []


def test_prepare_failure_is_a_system_failure_and_leaves_nothing(
        tmp_path: Path, cli_env: dict[str, str]) -> None:
    """A VM that does not boot: prepare exits SYSTEM_FAILURE_EXIT_CODE, one line, nothing left."""
    config = tmp_path / "config.toml"
    config.write_text('[vm]\nnetwork = "none"\nboot_timeout = 0.05\n')
    runner = Runner(tmp_path, {**cli_env, "KATA_CI_CONFIG": str(config)}, "9004", {})
    runner.config()
    result = runner.prepare()
    assert result.returncode == SYSTEM, result.stderr
    lines = result.stderr.decode().strip().splitlines()
    assert len(lines) == 1 and "within 0.05s" in lines[0], lines
    assert leftovers(cli_env) == []
    assert runner.cleanup().returncode == 0
