"""Escape 3: the host follows links a job made in its workspace. A previous job (guest root,
through the share) left links to host files or fifos; the next `kata-ci run` on the host must
refuse them with a clear error, never print, parse, hash or block on what they point to.

Listing the jobs (`kata-ci run` without names) reads every CI file and starts no VM, so most
attacks go through the real CLI without one."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from kata_ci.runner.github.steps import hash_files

KATA_CI = [sys.executable, "-m", "kata_ci.runner.cli"]
SECRET = "host-secret-9f1c: [never shown"  # invalid YAML: a parser error would quote it
SHADOW = Path("/etc/shadow")


@pytest.fixture
def host_file(tmp_path: Path) -> Path:
    """A host file outside the workspace whose first line must never be seen."""
    path = tmp_path / "host" / "private.txt"
    path.parent.mkdir()
    path.write_text(f"{SECRET}\nsecond: line\n")
    return path


@pytest.fixture
def ws(tmp_path: Path) -> Path:
    path = tmp_path / "ws"
    path.mkdir()
    return path


def kata_ci(ws: Path, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    config = ws.parent / "config.toml"
    config.touch()
    env = {**os.environ, "KATA_CI_CONFIG": str(config),
           "KATA_CI_RUN_DIR": str(ws.parent / "run")}
    return subprocess.run([*KATA_CI, "run", "-C", str(ws), *args], capture_output=True,
                          text=True, env=env, timeout=timeout)


def assert_refused(result: subprocess.CompletedProcess[str], message: str,
                   target: Path) -> None:
    output = result.stdout + result.stderr
    assert result.returncode == 2, output
    assert message in result.stderr, output
    assert "Traceback" not in output
    for line in target.read_text().splitlines():
        if line.strip():
            assert line not in output, f"a line of {target} was printed"


def test_gitlab_ci_link_to_host_file(ws: Path, host_file: Path) -> None:
    """`.gitlab-ci.yml` made a link to a host file (absolute, relative, to /etc/shadow):
    exit 2 naming the link, no line of the target printed."""
    link = ws / ".gitlab-ci.yml"
    for target in (host_file, Path(os.path.relpath(host_file, ws)), SHADOW):
        link.unlink(missing_ok=True)
        link.symlink_to(target)
        result = kata_ci(ws)
        shown = host_file if target != SHADOW else SHADOW
        assert_refused(result, ".gitlab-ci.yml: a symbolic link leaving the workspace", shown)


def test_include_local_link_out(ws: Path, host_file: Path) -> None:
    """`include: local` of a file the job made a link to a host file: refused, not parsed."""
    (ws / "ci").mkdir()
    (ws / "ci" / "extra.yml").symlink_to(host_file)
    (ws / ".gitlab-ci.yml").write_text("include:\n  - local: ci/*.yml\n"
                                       "build:\n  script: [make]\n")
    result = kata_ci(ws)
    assert_refused(result, "ci/extra.yml: a symbolic link leaving the workspace", host_file)
    (ws / ".gitlab-ci.yml").write_text("include: /ci/extra.yml\nbuild:\n  script: [make]\n")
    assert_refused(kata_ci(ws), "ci/extra.yml: a symbolic link leaving", host_file)


def test_rules_exists_is_no_host_oracle(ws: Path, host_file: Path) -> None:
    """`rules: exists` through a link to a host path: refused, so whether the job is listed
    never tells if a host file exists."""
    (ws / "probe").symlink_to(host_file)
    (ws / ".gitlab-ci.yml").write_text(
        "seen:\n  script: [make]\n  rules:\n    - exists: [probe]\n")
    assert_refused(kata_ci(ws), "probe: a symbolic link leaving the workspace", host_file)


def test_env_file_link_out(ws: Path, host_file: Path) -> None:
    """`--env-file .env` that the job made a link to a host file: its lines never become
    variables (here a rule on the value would list the job)."""
    host_file.write_text("TOKEN=host-secret-9f1c\n")
    (ws / ".env").symlink_to(host_file)
    (ws / ".gitlab-ci.yml").write_text(
        "leaked:\n  script: [make]\n  rules:\n    - if: $TOKEN == \"host-secret-9f1c\"\n"
        "other:\n  script: [make]\n")
    result = kata_ci(ws, "--env-file", str(ws / ".env"))
    assert "leaked" not in result.stdout
    assert_refused(result, ".env: a symbolic link leaving the workspace", host_file)


def test_workflow_link_out(ws: Path, host_file: Path) -> None:
    """`.github/workflows/x.yml` made a link to a host file: refused with its path."""
    (ws / ".github" / "workflows").mkdir(parents=True)
    (ws / ".github" / "workflows" / "x.yml").symlink_to(host_file)
    assert_refused(kata_ci(ws), ".github/workflows/x.yml: a symbolic link leaving the "
                   "workspace", host_file)
    (ws / ".github" / "workflows" / "x.yml").unlink()
    (ws / ".github" / "workflows").rmdir()
    (ws / ".github" / "workflows").symlink_to(host_file.parent)
    assert_refused(kata_ci(ws), ".github/workflows: a symbolic link leaving the workspace",
                   host_file)


def test_fifo_ci_files_do_not_hang(ws: Path, tmp_path: Path) -> None:
    """A fifo as `.gitlab-ci.yml`, as a workflow file or as an include: a clear error at
    once, the host never blocks opening it."""
    os.mkfifo(ws / ".gitlab-ci.yml")
    result = kata_ci(ws, timeout=30)
    assert result.returncode == 2 and ".gitlab-ci.yml: not a regular file" in result.stderr
    (ws / ".gitlab-ci.yml").unlink()
    (ws / ".github" / "workflows").mkdir(parents=True)
    os.mkfifo(ws / ".github" / "workflows" / "ci.yml")
    result = kata_ci(ws, timeout=30)
    assert result.returncode == 2
    assert ".github/workflows/ci.yml: not a regular file" in result.stderr
    (ws / ".github" / "workflows" / "ci.yml").unlink()
    os.mkfifo(ws / "inc.yml")
    (ws / ".gitlab-ci.yml").write_text("include: inc.yml\nbuild:\n  script: [make]\n")
    result = kata_ci(ws, timeout=30)
    assert result.returncode == 2 and "inc.yml: not a regular file" in result.stderr


def test_hash_files_is_no_host_oracle(ws: Path, host_file: Path) -> None:
    """hashFiles('**') and hashFiles of the link itself do not depend on a host file the
    workspace links to (absolute or relative link, or a directory link)."""
    (ws / "package-lock.json").write_text("{}\n")
    (ws / "abs").symlink_to(host_file)
    (ws / "rel").symlink_to(os.path.relpath(host_file, ws))
    (ws / "dir").symlink_to(host_file.parent)
    compute = hash_files(ws)
    patterns = [("**",), ("abs",), ("rel",), ("dir/*",), ("**/*.txt",), ("*",)]
    before = [compute(*p) for p in patterns]
    host_file.write_text("something else entirely\n")
    after = [compute(*p) for p in patterns]
    assert before == after
    assert compute("**") == compute("package-lock.json") != ""
    assert compute("abs") == compute("dir/*") == ""
