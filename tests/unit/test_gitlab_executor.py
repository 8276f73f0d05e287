"""`kata-ci gitlab-executor` without VMs: what gitlab-runner hands the driver (hostile job
variables included) is validated, the local protocol is strict, and every refusal is one
line with the exit code gitlab-runner asked for."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from kata_ci.runner.core.config import Config, VMConfig, load
from kata_ci.runner.gitlab_runner.custom import protocol as proto
from kata_ci.runner.gitlab_runner.custom.holder import vm_settings
from kata_ci.runner.gitlab_runner.custom.job import (
    DEFAULT_TIMEOUT,
    MAX_TIMEOUT,
    ExitCodes,
    StageError,
    StatePaths,
    UsageError,
    check_stage,
    exit_codes,
    job_key,
    job_timeout,
    job_variables,
)
from kata_ci.runner.gitlab_runner.custom.procs import is_holder, parent_gone, start_time

KATA_CI = [sys.executable, "-m", "kata_ci.runner.cli", "gitlab-executor"]
CODES = {"BUILD_FAILURE_EXIT_CODE": "37", "SYSTEM_FAILURE_EXIT_CODE": "38"}


def test_exit_codes_are_read_from_the_environment() -> None:
    """The failure codes are gitlab-runner's to choose: read, never assumed."""
    assert exit_codes(CODES) == ExitCodes(37, 38)
    assert ExitCodes(37, 38).of("build") == 37 and ExitCodes(37, 38).of("system") == 38


@pytest.mark.parametrize("value", ["", "0", "256", "x", "-1", "1.5", "٣"])
def test_exit_codes_missing_or_malformed_are_refused(value: str) -> None:
    """Without usable exit codes the driver was not started by gitlab-runner: refused."""
    with pytest.raises(UsageError, match="BUILD_FAILURE_EXIT_CODE"):
        exit_codes({**CODES, "BUILD_FAILURE_EXIT_CODE": value})


def test_job_variables_strip_the_prefix_and_drop_unusable_names() -> None:
    """CUSTOM_ENV_NAME becomes NAME; host variables and names no environment holds stay out."""
    environ = {"CUSTOM_ENV_CI_JOB_ID": "1", "CUSTOM_ENV_A_B": "$(id)", "PATH": "/host",
               "CUSTOM_ENV_": "x", "CUSTOM_ENV_1BAD": "x", "CUSTOM_ENV_BAD-NAME": "x",
               "HOST_SECRET": "s"}
    assert job_variables(environ) == {"CI_JOB_ID": "1", "A_B": "$(id)"}


def test_job_key_from_runner_id_or_short_token() -> None:
    """The state directory is named by validated numbers (or a plain short token) only."""
    assert job_key({"CI_JOB_ID": "123", "CI_RUNNER_ID": "45"}) == "45-123"
    assert job_key({"CI_JOB_ID": "123", "CI_RUNNER_SHORT_TOKEN": "aB_-9"}) == "taB_-9-123"
    assert job_key({"CI_JOB_ID": "1", "CI_RUNNER_ID": "../2",
                    "CI_RUNNER_SHORT_TOKEN": "x"}) == "tx-1"


@pytest.mark.parametrize("job", ["", "../1", "1/2", "1 2", "12a", "1" * 21, "١٢", "1\n"])
def test_hostile_job_ids_are_refused(job: str) -> None:
    """A job id that is not a plain number never names a host path."""
    with pytest.raises(StageError, match="CI_JOB_ID"):
        job_key({"CI_JOB_ID": job, "CI_RUNNER_ID": "1"})


@pytest.mark.parametrize("runner", [{}, {"CI_RUNNER_ID": "../x"},
                                    {"CI_RUNNER_SHORT_TOKEN": "a/b"},
                                    {"CI_RUNNER_SHORT_TOKEN": "x" * 65}])
def test_hostile_runner_names_are_refused(runner: dict[str, str]) -> None:
    """Neither a runner id nor a short token that could leave the run directory."""
    with pytest.raises(StageError, match="runner"):
        job_key({"CI_JOB_ID": "1", **runner})


@pytest.mark.parametrize(("value", "seconds"), [
    ("600", 600), ("", DEFAULT_TIMEOUT), ("0", DEFAULT_TIMEOUT), ("-5", DEFAULT_TIMEOUT),
    ("1e9", DEFAULT_TIMEOUT), ("٣", DEFAULT_TIMEOUT), ("9" * 30, DEFAULT_TIMEOUT),
    ("99999999", MAX_TIMEOUT)])
def test_job_timeout(value: str, seconds: int) -> None:
    """CI_JOB_TIMEOUT bounds the holder's life; anything but a plain number is the default."""
    assert job_timeout({"CI_JOB_TIMEOUT": value} if value else {}) == seconds


@pytest.mark.parametrize("stage", ["prepare_script", "get_sources", "step_script",
                                   "build_script", "after_script", "archive_cache_on_failure",
                                   "upload_artifacts_on_success", "cleanup_file_variables",
                                   "step_release"])
def test_gitlab_stage_names_are_accepted(stage: str) -> None:
    """Every stage name gitlab-runner passes to run_exec."""
    assert check_stage(stage) == stage


@pytest.mark.parametrize("stage", ["", "../x", "a/b", "a b", "-x", "x" * 200, "a\n"])
def test_odd_stage_names_are_refused(stage: str) -> None:
    """A stage name only ever names a guest file, and only a plain one."""
    with pytest.raises(StageError, match="stage name"):
        check_stage(stage)


def test_state_paths_stay_in_the_run_dir(tmp_path: Path) -> None:
    """The job's directory and socket are under kata-ci's run dir; too long a run dir for a
    unix socket is said, not failed on later."""
    state = StatePaths.of(tmp_path, "1-2")
    assert state.root == tmp_path / "gitlab-1-2" and state.socket.parent == state.root
    with pytest.raises(StageError, match="KATA_CI_RUN_DIR"):
        StatePaths.of(tmp_path / ("x" * 100), "1-2")


def _config(tmp_path: Path, text: str) -> Config:
    path = tmp_path / "config.toml"
    path.write_text(text)
    return load(path)


def test_label_sets_size_and_network(tmp_path: Path) -> None:
    """--label takes [labels.X]'s size and policy; a job may narrow it."""
    cfg = _config(tmp_path, '[vm]\nnetwork = "none"\n[labels.big]\nvcpus = 1\n'
                  'memory_mib = 512\nnetwork = "none"\n')
    settings = vm_settings(cfg, "big", {})
    assert (settings.vcpus, settings.memory_mib, settings.network.mode) == (1, 512, "none")
    assert vm_settings(cfg, None, {"KATA_CI_NETWORK": "none"}).network.mode == "none"


@pytest.mark.parametrize("request_", [{"KATA_CI_NETWORK": "egress"},
                                      {"KATA_CI_NETWORK": "allowlist"},
                                      {"KATA_CI_NETWORK_ALLOW": "pypi.org:443"}])
def test_a_job_cannot_widen_its_labels_network(tmp_path: Path,
                                               request_: dict[str, str]) -> None:
    """A job variable never widens the network: the job's own failure (build), no VM."""
    cfg = _config(tmp_path, '[labels.locked]\nnetwork = "none"\n')
    with pytest.raises(StageError, match="wider") as raised:
        vm_settings(cfg, "locked", request_)
    assert raised.value.kind == "build"


def test_unknown_label_is_the_operators_error() -> None:
    """A label the config does not define is refused (a typo must not fall back to [vm])."""
    with pytest.raises(StageError, match=r"no \[labels\.typo\]") as raised:
        vm_settings(Config(vm=VMConfig(network="none")), "typo", {})
    assert raised.value.kind == "system"


def test_frames_round_trip_and_peer_is_checked() -> None:
    """Frames come back as sent, a clean close is None, and the peer is our own user."""
    left, right = socket.socketpair()
    with left, right:
        proto.check_peer(right)
        proto.send_json(left, proto.REQUEST, {"stage": "get_sources", "env": {"A": "1"}})
        proto.send(left, proto.SCRIPT, b"echo hi\n")
        proto.send(left, proto.CANCEL)
        frame = proto.recv(right)
        assert frame is not None and frame[0] == proto.REQUEST
        assert proto.parse_request(frame[1]) == ("get_sources", {"A": "1"})
        assert proto.recv(right) == (proto.SCRIPT, b"echo hi\n")
        assert proto.recv(right) == (proto.CANCEL, b"")
        left.close()
        assert proto.recv(right) is None


@pytest.mark.parametrize("raw", [b"Z\0\0\0\0", b"1\xff\xff\xff\xff", b"1\0\0\0\x05ab"])
def test_malformed_frames_are_refused(raw: bytes) -> None:
    """Unknown kinds, oversized lengths and truncated frames are protocol errors."""
    left, right = socket.socketpair()
    with left, right:
        left.sendall(raw)
        left.shutdown(socket.SHUT_WR)
        with pytest.raises(proto.ProtocolError):
            proto.recv(right)


@pytest.mark.parametrize("payload", [b"[]", b"nope", b'{"stage": 1, "env": {}}',
                                     b'{"stage": "s", "env": {"A=B": "x"}}',
                                     b'{"stage": "s", "env": {"A": 1}}'])
def test_malformed_requests_are_refused(payload: bytes) -> None:
    with pytest.raises(proto.ProtocolError):
        proto.parse_request(payload)


def test_parent_liveness_and_holder_identity() -> None:
    """gitlab-runner is followed by pid and start time; a pid is a holder only by its
    command line (module, state directory, token) and owner."""
    me = os.getpid()
    assert not parent_gone(me, start_time(me))
    assert parent_gone(me, (start_time(me) or 0) + 1)  # the pid now names another process
    assert not parent_gone(0, None)
    dead = subprocess.Popen(["true"])
    dead.wait()
    assert parent_gone(dead.pid, None)
    assert not is_holder(me, StatePaths(Path("/run/kata-ci/gitlab-1-2")))


def _stage(args: list[str], tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    full = {**os.environ, "KATA_CI_RUN_DIR": str(tmp_path / "run"), **env}
    return subprocess.run([*KATA_CI, *args], capture_output=True, text=True, env=full,
                          cwd=tmp_path, timeout=60)


def _one_line(result: subprocess.CompletedProcess[str]) -> str:
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    return lines[0]


def test_run_without_prepare_is_a_system_failure(tmp_path: Path) -> None:
    """run before (or without) prepare: SYSTEM_FAILURE_EXIT_CODE, one line."""
    script = tmp_path / "script"
    script.write_text("true\n")
    result = _stage(["run", str(script), "build_script"], tmp_path, **CODES,
                    CUSTOM_ENV_CI_JOB_ID="5", CUSTOM_ENV_CI_RUNNER_ID="6")
    assert result.returncode == 38
    assert "no VM for job 5" in _one_line(result)


def test_hostile_job_id_names_no_path(tmp_path: Path) -> None:
    """A traversal in CI_JOB_ID fails every stage as a system failure and makes nothing."""
    env = {**CODES, "CUSTOM_ENV_CI_JOB_ID": "../../etc", "CUSTOM_ENV_CI_RUNNER_ID": "6"}
    result = _stage(["prepare"], tmp_path, **env)
    assert result.returncode == 38 and "CI_JOB_ID" in _one_line(result)
    assert not (tmp_path / "run").exists()
    assert _stage(["cleanup"], tmp_path, **env).returncode == 0


def test_wider_network_fails_prepare_as_the_jobs_failure(tmp_path: Path) -> None:
    """KATA_CI_NETWORK wider than the label: BUILD_FAILURE_EXIT_CODE, nothing started."""
    config = tmp_path / "config.toml"
    config.write_text('[vm]\nnetwork = "none"\n')
    result = _stage(["prepare", "--config", str(config)], tmp_path, **CODES,
                    CUSTOM_ENV_CI_JOB_ID="5", CUSTOM_ENV_CI_RUNNER_ID="6",
                    CUSTOM_ENV_KATA_CI_NETWORK="egress")
    assert result.returncode == 37
    assert "wider" in _one_line(result)
    assert not (tmp_path / "run").exists()


def test_missing_exit_codes_is_a_usage_error(tmp_path: Path) -> None:
    """Run by hand, not by gitlab-runner: exit 2 with the reason."""
    result = _stage(["prepare"], tmp_path, CUSTOM_ENV_CI_JOB_ID="5")
    assert result.returncode == 2 and "gitlab-runner" in _one_line(result)


def test_cleanup_without_prepare_succeeds(tmp_path: Path) -> None:
    """cleanup_exec is always called: with nothing prepared it has nothing to do, and says 0."""
    result = _stage(["cleanup"], tmp_path, **CODES, CUSTOM_ENV_CI_JOB_ID="5",
                    CUSTOM_ENV_CI_RUNNER_ID="6")
    assert result.returncode == 0 and result.stderr == ""


def test_config_prints_the_driver_json(tmp_path: Path) -> None:
    """config_exec's JSON: builds and cache inside the VM, not shared, driver kata-ci."""
    import json

    config = tmp_path / "config.toml"
    config.write_text('[vm]\nnetwork = "none"\n')
    result = _stage(["config", "--config", str(config)], tmp_path, **CODES)
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["builds_dir"] == "/builds" and out["cache_dir"] == "/cache"
    assert out["builds_dir_is_shared"] is False and out["driver"]["name"] == "kata-ci"
    bad = _stage(["config", "--config", str(config), "--label", "nope"], tmp_path, **CODES)
    assert bad.returncode == 38 and "labels.nope" in _one_line(bad)
