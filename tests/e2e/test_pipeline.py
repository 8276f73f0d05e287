"""`kata-ci run` on real .gitlab-ci.yml files: each job in its own VM, GitLab's statuses."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

from tests.e2e.conftest import kata_ci_run, leftovers

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "ci-demo"
FIXTURES = Path(__file__).resolve().parents[3] / "shared" / "fixtures" / "gitlab-ci"


def summary(stderr: bytes) -> dict[str, str]:
    """job -> status from the summary table."""
    statuses = "success|warning|failed|skipped|manual|cancelled|system failure"
    rows = re.findall(rf"│ (\S.*?) +│ \S+ +│ ({statuses})\b", stderr.decode())
    return {name.strip(): status for name, status in rows}


def test_example_pipeline_statuses_logs_and_exit(tmp_path: Path, cli_env: dict[str, str]) -> None:
    """The example pipeline with -j 2: needs, matrix, allowed exit code, after_script after a
    failure, a skipped stage and an on_failure job, reported as GitLab would; exit 1."""
    project = tmp_path / "ci-demo"
    shutil.copytree(EXAMPLE, project)
    result = kata_ci_run(["--pipeline", "-j", "2"], cli_env, project, timeout=600)
    assert result.returncode == 1, result.stderr
    assert summary(result.stderr) == {
        "build": "success", "test: [alpha]": "success", "test: [beta]": "success",
        "lint": "warning", "integration": "failed", "deploy": "skipped", "cleanup": "success"}, \
        result.stderr.decode()
    out = result.stdout.decode()
    assert "[test: [beta]] testing hello from build on beta" in out
    assert "[integration] after_script ran, job status failed" in out
    assert "[deploy]" not in out
    assert (project / "out" / "app").read_text() == "hello from build\n"
    assert leftovers(cli_env) == []


def test_two_jobs_run_in_two_vms_at_once(tmp_path: Path, cli_env: dict[str, str]) -> None:
    """-j 2: two independent jobs overlap in time (each records when it ran, in the guest)."""
    (tmp_path / ".gitlab-ci.yml").write_text(
        "a: {script: ['date +%s.%N > a.start', 'sleep 3', 'date +%s.%N > a.end']}\n"
        "b: {script: ['date +%s.%N > b.start', 'sleep 3', 'date +%s.%N > b.end']}\n")
    result = kata_ci_run(["--pipeline", "--jobs", "2"], cli_env, tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr
    assert summary(result.stderr) == {"a": "success", "b": "success"}
    t = {n: float((tmp_path / n).read_text()) for n in ("a.start", "a.end", "b.start", "b.end")}
    assert t["a.start"] < t["b.end"] and t["b.start"] < t["a.end"]  # the intervals overlap


def test_shared_fixture_pipelines_run(tmp_path: Path, cli_env: dict[str, str]) -> None:
    """GitLab's Bash template and the needs DAG doc example run green; image: is reported as
    not honoured rather than ignored silently."""
    for name in ("bash-template.gitlab-ci.yml", "needs-dag.gitlab-ci.yml"):
        project = tmp_path / name
        project.mkdir()
        shutil.copy(FIXTURES / name, project / ".gitlab-ci.yml")
        result = kata_ci_run(["--pipeline", "-j", "2"], cli_env, project, timeout=600)
        assert result.returncode == 0, (name, result.stderr)
        statuses = summary(result.stderr)
        assert statuses and set(statuses.values()) == {"success"}, (name, statuses)
        assert b"image: is not honoured without a registry" in result.stderr


def test_one_job_with_what_it_needs(tmp_path: Path, cli_env: dict[str, str]) -> None:
    """`kata-ci run deploy_a` runs deploy_a after test_a and build_a (its needs), nothing else."""
    shutil.copy(FIXTURES / "needs-dag.gitlab-ci.yml", tmp_path / ".gitlab-ci.yml")
    result = kata_ci_run(["deploy_a"], cli_env, tmp_path, timeout=600)
    assert result.returncode == 0, result.stderr
    assert list(summary(result.stderr)) == ["build_a", "test_a", "deploy_a"]


def test_bad_ci_files_fail_before_any_vm(tmp_path: Path, cli_env: dict[str, str]) -> None:
    """Malformed YAML, an unknown key, an unknown job and a needs cycle: exit 2 naming the
    file (and line and job), and no VM was started."""
    cases = {
        "job: {script: [x]\n": "invalid YAML",
        "job: {scrpit: [x]}\n": ".gitlab-ci.yml:1: job 'job' config contains unknown keys",
        "a: {script: [x], needs: [b]}\nb: {script: [x], needs: [a]}\n": "needs form a cycle",
    }
    for text, message in cases.items():
        (tmp_path / ".gitlab-ci.yml").write_text(text)
        result = kata_ci_run(["--pipeline"], cli_env, tmp_path)
        assert result.returncode == 2 and message.encode() in result.stderr, result.stderr
    (tmp_path / ".gitlab-ci.yml").write_text("a: {script: [x]}\n")
    result = kata_ci_run(["nosuch"], cli_env, tmp_path)
    assert result.returncode == 2 and b"no job named 'nosuch'" in result.stderr
    listing = kata_ci_run([], cli_env, tmp_path)
    assert listing.returncode == 0 and b"a" in listing.stdout
    assert leftovers(cli_env) == []
    assert not any(Path(cli_env["KATA_CI_RUN_DIR"]).iterdir())
