"""Jobs in OCI images, end to end: `kata-ci run --image` against a real registry on
loopback (Debian's docker-registry, seeded with busybox images the tests build), real VMs.
The image's root is the job's, kata-ci's agent stays beside it."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.conftest import kata_ci_run, leftovers
from tests.oci_images import Entry, File, Symlink, build_image
from tests.oci_registry import RegistryFixture

PLAIN = {"Env": ["PATH=/usr/local/bin:/bin", "GREETING=from-image"],
         "Cmd": ["/bin/sh"]}


@pytest.fixture(scope="module")
def images(oci_registry: RegistryFixture) -> Iterator[dict[str, str]]:
    """Three images: plain busybox, one whose Entrypoint breaks commands (GitLab's case for
    `entrypoint: [""]`), one whose User is `builder` (uid 1000)."""
    host = oci_registry.host
    stamp = str(time.time_ns())  # a fresh tag each run: `always` must ask the registry
    plain = build_image(oci_registry, "kata-ci/plain", stamp,
                        {"etc/image-release": File(b"plain-1\n")}, PLAIN)
    build_image(oci_registry, "kata-ci/entry", stamp, None,
                {**PLAIN, "Entrypoint": ["/bin/false"]})
    build_image(oci_registry, "kata-ci/user", stamp, None, {**PLAIN, "User": "builder"})
    tools: dict[str, Entry] = {f"bin/{applet}": Symlink("/bin/busybox")
                               for applet in ("wget", "httpd", "nc")}
    tools["www/index.html"] = File(b"served\n")
    build_image(oci_registry, "kata-ci/web", stamp, tools,
                {**PLAIN, "Cmd": ["httpd", "-f", "-p", "8080", "-h", "/www"],
                 "ExposedPorts": {"8080/tcp": {}}})
    yield {"plain": f"{host}/kata-ci/plain:{stamp}", "digest": f"{host}/kata-ci/plain@{plain}",
           "entry": f"{host}/kata-ci/entry:{stamp}", "user": f"{host}/kata-ci/user:{stamp}",
           "web": f"{host}/kata-ci/web:{stamp}"}


def test_job_runs_in_an_image_without_python(tmp_path: Path, cli_env: dict[str, str],
                                             images: dict[str, str]) -> None:
    """The image's files are /, it has no python and no glibc, the workspace is at its usual
    path and writable, the image's Env is under the job's -e, and nothing is left behind."""
    script = ("cat /etc/image-release; test ! -e /usr/bin/python3 && echo no-python; "
              "echo $GREETING $EXTRA; pwd; echo made > out.txt")
    result = kata_ci_run(["--image", images["plain"], "-e", "EXTRA=from-job", "--",
                          "sh", "-c", script], cli_env, tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.decode().splitlines() == [
        "plain-1", "no-python", "from-image from-job", str(tmp_path)]
    assert (tmp_path / "out.txt").read_text() == "made\n"
    assert leftovers(cli_env) == []


def test_image_writes_stay_in_the_vm(tmp_path: Path, cli_env: dict[str, str],
                                     images: dict[str, str]) -> None:
    """A job changing the image's files changes its own overlay only: the next job (pulled
    by digest) sees the image as it was."""
    first = kata_ci_run(["--image", images["plain"], "--", "sh", "-c",
                         "echo changed > /etc/image-release; rm /bin/ls; cat /etc/image-release"],
                        cli_env, tmp_path)
    assert first.returncode == 0 and first.stdout == b"changed\n", first.stderr
    second = kata_ci_run(["--image", images["digest"], "--", "sh", "-c",
                          "cat /etc/image-release; test -e /bin/ls && echo ls-back"],
                         cli_env, tmp_path)
    assert second.returncode == 0, second.stderr
    assert second.stdout == b"plain-1\nls-back\n"


def test_entrypoint_applies_unless_overridden(tmp_path: Path, cli_env: dict[str, str],
                                              images: dict[str, str]) -> None:
    """An image whose Entrypoint is /bin/false fails every command, as under GitLab; an empty
    --entrypoint (GitLab's `entrypoint: [""]`) runs the command itself."""
    broken = kata_ci_run(["--image", images["entry"], "--", "echo", "hello"], cli_env,
                         tmp_path)
    assert broken.returncode == 1 and broken.stdout == b""
    fixed = kata_ci_run(["--image", images["entry"], "--entrypoint", "", "--", "echo",
                         "hello"], cli_env, tmp_path)
    assert fixed.returncode == 0 and fixed.stdout == b"hello\n", fixed.stderr


def test_image_user_and_override(tmp_path: Path, cli_env: dict[str, str],
                                 images: dict[str, str]) -> None:
    """The image's User runs the command with the HOME of its passwd entry; --user overrides
    it; a file that user writes in the workspace is the workspace owner's on the host."""
    as_image = kata_ci_run(["--image", images["user"], "--", "sh", "-c",
                            "id -u; id -g; echo $HOME; echo x > by-builder"], cli_env, tmp_path)
    assert as_image.returncode == 0, as_image.stderr
    assert as_image.stdout.decode().split() == ["1000", "1000", "/home/builder"]
    assert (tmp_path / "by-builder").stat().st_uid == os.stat(tmp_path).st_uid
    as_root = kata_ci_run(["--image", images["user"], "--user", "0", "--", "id", "-u"],
                          cli_env, tmp_path)
    assert as_root.returncode == 0 and as_root.stdout == b"0\n", as_root.stderr
    unknown = kata_ci_run(["--image", images["user"], "--user", "ghost", "--", "id"],
                          cli_env, tmp_path)
    assert unknown.returncode != 0 and b"unable to find user ghost" in unknown.stderr


def test_unknown_image_fails_before_any_vm(tmp_path: Path, cli_env: dict[str, str],
                                           oci_registry: RegistryFixture) -> None:
    """An image the registry does not have: a system failure naming it, before a VM starts
    (nothing in the run dir), with no traceback."""
    result = kata_ci_run(["--image", f"{oci_registry.host}/kata-ci/absent:1", "--", "true"],
                         cli_env, tmp_path)
    assert result.returncode == 125, result.stderr
    assert b"not found" in result.stderr and b"Traceback" not in result.stderr
    assert leftovers(cli_env) == []


def test_gitlab_job_in_an_image_with_a_service(tmp_path: Path, cli_env: dict[str, str],
                                              images: dict[str, str]) -> None:
    """A .gitlab-ci.yml job with `image:` and `services:`: its script runs in the image (sh,
    no bash there), the service (busybox httpd, its own root in the same VM) answers at its
    alias before the script starts."""
    (tmp_path / ".gitlab-ci.yml").write_text(
        "test:\n"
        f"  image: {images['plain']}\n"
        "  services:\n"
        f"    - name: {images['web']}\n"
        "      alias: web\n"
        "  script:\n"
        "    - cat /etc/image-release\n"
        "    - wget -qO- http://web:8080/index.html > got.txt\n")
    result = kata_ci_run(["test"], cli_env, tmp_path, timeout=600)
    assert result.returncode == 0, result.stderr
    assert b"plain-1" in result.stdout + result.stderr
    assert (tmp_path / "got.txt").read_text() == "served\n"


def run_build_job(workspace: Path, env: dict[str, str], job_body: str) -> None:
    """Write a workflow whose job `build` (runs-on ubuntu-latest) has ``job_body``, run the
    job with `kata-ci run`, and require it to succeed."""
    workflows = workspace / ".github" / "workflows"
    workflows.mkdir(parents=True)
    (workflows / "ci.yml").write_text(
        "on: push\njobs:\n  build:\n    runs-on: ubuntu-latest\n" + job_body)
    result = kata_ci_run(["--workflow", ".github/workflows/ci.yml", "build"], env, workspace,
                         timeout=600)
    assert result.returncode == 0, result.stderr


def test_github_container_job(tmp_path: Path, cli_env: dict[str, str],
                              images: dict[str, str]) -> None:
    """A workflow job with `runs-on` and `container:` (act's usual combination): its steps run
    in the container's image with its env, the image's entrypoint unused, sh as the shell."""
    run_build_job(tmp_path, cli_env, (
        "    container:\n"
        f"      image: {images['entry']}\n"
        "      env: {FROM_CONTAINER: present}\n"
        "    steps:\n"
        "      - run: cat /etc/image-release 2>/dev/null || echo no-release; "
        "echo $FROM_CONTAINER $GREETING > step.txt\n"))
    assert (tmp_path / "step.txt").read_text() == "present from-image\n"


def test_github_job_with_a_service(tmp_path: Path, cli_env: dict[str, str],
                                   images: dict[str, str]) -> None:
    """A workflow job (no container) with `services:`: the service runs its image's own
    command in the job's VM and answers at its id as hostname from the job's steps."""
    run_build_job(tmp_path, cli_env, (
        "    services:\n"
        "      web:\n"
        f"        image: {images['web']}\n"
        "    steps:\n"
        "      - run: curl -s http://web:8080/index.html > got.txt\n"))
    assert (tmp_path / "got.txt").read_text() == "served\n"
