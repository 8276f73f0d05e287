"""`kata-ci run` on real .gitlab-ci.yml files: each job in its own VM, GitLab's statuses."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from tests.e2e.conftest import kata_ci_run, leftovers
from tests.oci_images import File, build_image
from tests.oci_registry import RegistryFixture

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
    both = kata_ci_run(["--pipeline"], cli_env, project)
    assert both.returncode == 2 and b"pick one with --gitlab-ci or --workflow" in both.stderr
    result = kata_ci_run(["--gitlab-ci", ".gitlab-ci.yml", "--pipeline", "-j", "2"], cli_env,
                         project, timeout=600)
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


@pytest.fixture
def hub_env(tmp_path: Path, cli_env: dict[str, str],
            oci_registry: RegistryFixture) -> dict[str, str]:
    """`kata-ci` env whose Docker Hub is a registry mirror on loopback holding busybox-based
    stand-ins for busybox:latest and alpine:latest (the shared fixtures' images)."""
    for name in ("busybox", "alpine"):
        build_image(oci_registry, f"library/{name}", "latest",
                    {"etc/stand-in": File(f"{name}\n".encode())}, {"Cmd": ["/bin/sh"]})
    return with_mirror(cli_env, tmp_path, oci_registry.host)


def test_shared_fixture_pipelines_run(tmp_path: Path, hub_env: dict[str, str]) -> None:
    """GitLab's Bash and Getting-Started templates and the needs DAG doc example run green,
    the first two in the images they name (busybox, alpine: pulled through the mirror)."""
    for name in ("bash-template.gitlab-ci.yml", "needs-dag.gitlab-ci.yml",
                 "getting-started-template.gitlab-ci.yml"):
        project = tmp_path / name
        project.mkdir()
        shutil.copy(FIXTURES / name, project / ".gitlab-ci.yml")
        result = kata_ci_run(["--pipeline", "-j", "2"], hub_env, project, timeout=600)
        assert result.returncode == 0, (name, result.stderr)
        statuses = summary(result.stderr)
        assert statuses and set(statuses.values()) == {"success"}, (name, statuses)
        if name != "getting-started-template.gitlab-ci.yml":  # the one without image:
            assert b"running in image" in result.stderr, result.stderr


def with_mirror(env: dict[str, str], where: Path, mirror: str) -> dict[str, str]:
    """``env`` with a config that adds [images] registry_mirrors (docker.io -> ``mirror``)
    to whatever config the run already had (the test command's network = none)."""
    base = Path(env["KATA_CI_CONFIG"]).read_text() if env.get("KATA_CI_CONFIG") else ""
    config = where / "mirror.toml"
    config.write_text(f'{base}\n[images]\nregistry_mirrors = {{"docker.io" = "{mirror}"}}\n')
    return {**env, "KATA_CI_CONFIG": str(config)}


def test_one_job_with_what_it_needs(tmp_path: Path, hub_env: dict[str, str]) -> None:
    """`kata-ci run deploy_a` runs deploy_a after test_a and build_a (its needs), nothing else."""
    shutil.copy(FIXTURES / "needs-dag.gitlab-ci.yml", tmp_path / ".gitlab-ci.yml")
    result = kata_ci_run(["deploy_a"], hub_env, tmp_path, timeout=600)
    assert result.returncode == 0, result.stderr
    assert list(summary(result.stderr)) == ["build_a", "test_a", "deploy_a"]


def test_bad_ci_files_fail_before_any_vm(tmp_path: Path, cli_env: dict[str, str]) -> None:
    """Malformed YAML, an unknown key, an unknown job and a needs cycle: exit 2 naming the
    file (and line and job), and no VM was started."""
    cases = {
        "job: {script: [x]\n": "invalid YAML",
        "job: {scrpit: [x]}\n": ".gitlab-ci.yml:1: jobs:job config contains unknown keys",
        "a: {script: [x], needs: [b]}\nb: {script: [x], needs: [a]}\n": "needs form a cycle",
    }
    for text, message in cases.items():
        (tmp_path / ".gitlab-ci.yml").write_text(text)
        result = kata_ci_run(["--pipeline"], cli_env, tmp_path)
        assert result.returncode == 2 and message.encode() in result.stderr, result.stderr
    (tmp_path / ".gitlab-ci.yml").write_text("a: {script: [x]}\n")
    result = kata_ci_run(["nosuch"], cli_env, tmp_path)
    assert result.returncode == 2 and b"nosuch: not found" in result.stderr
    assert b"(jobs: a)" in result.stderr
    listing = kata_ci_run([], cli_env, tmp_path)
    assert listing.returncode == 0 and b"a" in listing.stdout
    assert leftovers(cli_env) == []
    assert not any(Path(cli_env["KATA_CI_RUN_DIR"]).iterdir())


WORKFLOWS = Path(__file__).resolve().parents[3] / "shared" / "fixtures" / "workflows"


def test_example_workflow_as_github_reports_it(tmp_path: Path, cli_env: dict[str, str]) -> None:
    """The example workflow with -j 2: step and job outputs, GITHUB_ENV/PATH, a matrix with
    include, continue-on-error, a python step, if: failure(), a failing job and an always()
    job that sees both results; exit 1."""
    project = tmp_path / "ci-demo"
    shutil.copytree(EXAMPLE, project)
    result = kata_ci_run(["--workflow", ".github/workflows/ci.yml", "--pipeline", "-j", "2"],
                         cli_env, project, timeout=600)
    assert result.returncode == 1, result.stderr
    assert summary(result.stderr) == {
        "build": "success", "test (3.10)": "success", "test (3.11, lint)": "success",
        "broken": "failed", "report": "success"}, result.stderr.decode()
    out = result.stdout.decode()
    for line in ("[build] mode=release version=1.2.3", "[build] tool ran",
                 "[test (3.11, lint)] testing 1.2.3 on 3.11 lint",
                 "[test (3.10)] python step sees hello",
                 "[broken] cleanup after the failure",
                 "[report] test=success broken=failure"):
        assert line in out, line
    assert "never printed" not in out
    assert leftovers(cli_env) == []


def test_workflow_events_and_one_job(tmp_path: Path, cli_env: dict[str, str]) -> None:
    """--event filters workflows by `on:`; --var wins over the workflow's env; naming a job
    runs it after the jobs it needs; a real starter workflow runs green with checkout
    satisfied by the mount."""
    project = tmp_path / "p"
    (project / ".github/workflows").mkdir(parents=True)
    shutil.copy(WORKFLOWS / "starter-blank.yml", project / ".github/workflows/blank.yml")
    result = kata_ci_run(["build", "--event", "schedule"], cli_env, project)
    assert result.returncode == 2 and b"not found in any CI file triggered by schedule" \
        in result.stderr
    (project / ".github/workflows/vars.yml").write_text(
        "on: workflow_dispatch\nenv: {WHO: file}\n"
        "jobs: {greet: {steps: [{run: 'echo \"who=$WHO\"'}]}}\n")
    result = kata_ci_run(["greet", "--event", "workflow_dispatch", "--var", "WHO=cli"], cli_env,
                         project, timeout=300)
    assert result.returncode == 0 and b"who=cli" in result.stdout, result.stderr
    result = kata_ci_run(["build", "--event", "workflow_dispatch"], cli_env, project,
                         timeout=300)
    assert result.returncode == 0, result.stderr
    assert b"Hello, world!" in result.stdout
    assert b"the checkout is already mounted" in result.stdout
    shutil.copytree(EXAMPLE, tmp_path / "demo")
    result = kata_ci_run(["report", "--workflow", ".github/workflows/ci.yml", "-j", "2"],
                         cli_env, tmp_path / "demo", timeout=600)
    assert list(summary(result.stderr)) == ["build", "test (3.10)", "test (3.11, lint)",
                                            "broken", "report"]
