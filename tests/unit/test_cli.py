"""Bad input to the CLI: a clear one-line error, exit 2, and no VM started."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

KATA_CI = [sys.executable, "-m", "kata_ci.runner.cli"]


def run(args: list[str], tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    run_dir = tmp_path / "run"
    full_env = {**os.environ, "KATA_CI_RUN_DIR": str(run_dir), **env}
    return subprocess.run([*KATA_CI, *args], capture_output=True, text=True, env=full_env,
                          cwd=tmp_path, timeout=60)


def test_missing_workspace(tmp_path: Path) -> None:
    """A workspace that does not exist is refused before anything starts."""
    result = run(["run", "-C", str(tmp_path / "nope"), "--", "true"], tmp_path)
    assert result.returncode == 2
    assert "is not a directory" in result.stderr
    assert not (tmp_path / "run").exists()


def test_bad_flag_values(tmp_path: Path) -> None:
    """Out-of-range flags are refused with the reason; nothing starts."""
    result = run(["run", "--vcpus", "0", "--memory", "16", "--", "true"], tmp_path)
    assert result.returncode == 2
    assert "vcpus must be between" in result.stderr and "memory_mib" in result.stderr
    assert not (tmp_path / "run").exists()


def test_images_missing_names_the_fix(tmp_path: Path) -> None:
    """With no images built, the error is one line naming `kata-ci images build`."""
    result = run(["run", "--", "true"], tmp_path, KATA_CI_CACHE=str(tmp_path / "cache"))
    assert result.returncode == 2
    assert "kata-ci images build" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_no_command(tmp_path: Path) -> None:
    """`kata-ci run` with no CI file and no command, or `run --` with nothing after it, is a
    usage error that says how to run a command."""
    result = run(["run"], tmp_path)
    assert result.returncode == 2 and "no CI file" in result.stderr
    assert "kata-ci run -- COMMAND" in result.stderr
    result = run(["run", "--"], tmp_path)
    assert result.returncode == 2 and "no command after --" in result.stderr


def test_malformed_config(tmp_path: Path) -> None:
    """A broken config file is reported with its path; nothing starts."""
    config = tmp_path / "bad.toml"
    config.write_text("[vm]\nvcpus = 'many'\n")
    result = run(["run", "--config", str(config), "--", "true"], tmp_path)
    assert result.returncode == 2
    assert str(config) in result.stderr and "vm.vcpus must be int" in result.stderr


def test_doctor_names_what_to_install(tmp_path: Path) -> None:
    """Without QEMU on PATH, doctor fails and says which Debian package to install."""
    bin_dir = Path(sys.executable).parent
    result = run(["doctor"], tmp_path, PATH=str(bin_dir), KATA_CI_CACHE=str(tmp_path / "c"),
                 COLUMNS="200")
    assert result.returncode == 1
    assert "apt-get install qemu-system-x86" in result.stdout
    assert "kata-ci images build" in result.stdout
