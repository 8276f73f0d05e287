"""Every CI source's image as the ImageUse of its JobSpec (GitLab CI file `image:`, GitLab
payload image + credentials + DOCKER_AUTH_CONFIG, GitHub `container:`), and the shell an
image's scripts run with, run for real on the host under dash, busybox sh and bash."""

from __future__ import annotations

import base64
import copy
import json
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, cast

import pytest

from kata_ci.errors import UserError
from kata_ci.images.oci.registry import Credentials, normalise_registry
from kata_ci.runner.core.command import Cancel
from kata_ci.runner.core.images import ImageUse
from kata_ci.runner.core.lifecycle import Session
from kata_ci.runner.core.outcome import Outcome, OutcomeKind
from kata_ci.runner.core.registry_auth import docker_auths
from kata_ci.runner.core.secrets import GITLAB_MASK, Masker, MaskingSink
from kata_ci.runner.core.shell import DETECT, DETECT_FILE, file_argv, script_argv
from kata_ci.runner.core.sinks import Stream
from kata_ci.runner.core.spec import Command, JobSpec, RunSettings
from kata_ci.runner.github.jobs import GitHubPlan
from kata_ci.runner.github.steps import RunContext
from kata_ci.runner.github.workflow import WorkflowError, load_workflow
from kata_ci.runner.gitlab.ci_file import CIError, load
from kata_ci.runner.gitlab.jobs import GitLabPlan, GitLabScript, job_script
from kata_ci.runner.gitlab_runner import execute
from kata_ci.runner.gitlab_runner.payload import parse_job
from kata_ci.runner.gitlab_runner.steps import variables

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "gitlab"
MAIN = {"CI_COMMIT_BRANCH": "main", "CI_DEFAULT_BRANCH": "main", "CI_COMMIT_REF_NAME": "main",
        "CI_PIPELINE_SOURCE": "push", "CI_COMMIT_SHA": "a" * 40, "CI_PIPELINE_ID": "7"}
PASSWORD = "s3cret-registry-password"


class Collect:
    def __init__(self) -> None:
        self.out = b""

    def write(self, stream: Stream, data: bytes) -> None:
        self.out += data


class FakeSession:
    """What a job script uses of a Session, recording the commands it runs."""

    def __init__(self, spec: JobSpec) -> None:
        self.spec = spec
        self.sink = Collect()
        self.cancel = Cancel()
        self.expired = False
        self.commands: list[Command] = []
        self.notes: list[str] = []

    def run(self, command: Command, sink: Any = None, cancel: Cancel | None = None) -> Outcome:
        self.commands.append(command)
        return Outcome(OutcomeKind.SUCCESS, 0)

    def note(self, text: str) -> None:
        self.notes.append(text)

    def put_files(self, files: Mapping[str, bytes], mode: int = 0o644) -> None:
        pass

    def get_files(self, paths: Sequence[str], max_bytes: int) -> dict[str, bytes | None]:
        return {p: b"" for p in paths}

    def add_mask(self, value: str) -> bool:
        return True


# --- GitLab CI file -------------------------------------------------------------------------

def gitlab_plan(tmp_path: Path, text: str, user_vars: Mapping[str, str] | None = None
                ) -> tuple[GitLabPlan, dict[str, JobSpec]]:
    path = tmp_path / ".gitlab-ci.yml"
    path.write_text(text)
    pipeline = load(path, tmp_path, MAIN)
    plan = GitLabPlan(pipeline, pipeline.jobs, tmp_path, MAIN, user_vars or {}, RunSettings())
    return plan, {job.name: plan.spec(job) for job in pipeline.jobs}


def test_gitlab_image_string_and_object_forms(tmp_path: Path) -> None:
    """CI file image: as a name, and as {name, entrypoint [""], docker.user, pull_policy list}."""
    _, specs = gitlab_plan(tmp_path, """
a: {image: "python:3.12", script: [true]}
b:
  image:
    name: registry.example.com/team/tool:1
    entrypoint: [""]
    docker: {user: "1000:1000", platform: arm64}
    pull_policy: [if-not-present, always]
  services: [postgres]
  script: [true]
""")
    assert specs["a"].image == ImageUse("python:3.12")
    b = specs["b"].image
    assert b == ImageUse("registry.example.com/team/tool:1", entrypoint=(), user="1000:1000",
                         pull_policy="if-not-present")
    job = cast(GitLabScript, specs["b"].script).job
    assert job.unsupported == []
    assert [s.image.name for s in specs["b"].services] == ["postgres"]
    assert any("kata-ci uses the first, if-not-present" in n for n in job.notes)
    assert any("platform arm64" in n for n in job.notes)


def test_gitlab_image_default_inheritance_and_override(tmp_path: Path) -> None:
    """CI file image: from default:, the global form, a job's own, inherit: default: false."""
    _, specs = gitlab_plan(tmp_path, """
default:
  image: {name: "alpine:3.20", entrypoint: ["/bin/sh", "-c"]}
plain: {script: [true]}
own: {image: "debian:12", script: [true]}
none: {inherit: {default: false}, script: [true]}
""")
    assert specs["plain"].image == ImageUse("alpine:3.20", entrypoint=("/bin/sh", "-c"))
    assert specs["own"].image == ImageUse("debian:12")
    assert specs["none"].image is None
    _, specs = gitlab_plan(tmp_path, "image: busybox\nx: {script: [true]}\n")
    assert specs["x"].image == ImageUse("busybox")
    _, specs = gitlab_plan(tmp_path, "image: busybox\ndefault: {image: alpine}\n"
                                     "x: {script: [true]}\n")
    assert specs["x"].image == ImageUse("alpine")


def test_gitlab_image_name_expands_the_jobs_variables(tmp_path: Path) -> None:
    """CI file image: $VAR/${VAR} in the name expand from the job's variables."""
    _, specs = gitlab_plan(tmp_path, """
variables: {REGISTRY: registry.example.com}
a:
  variables: {TAG: "1.2"}
  image: $REGISTRY/team/${NAME}:${TAG}$UNKNOWN
  script: [true]
b: {image: $NOTHING, script: [true]}
""", user_vars={"NAME": "tool"})
    assert specs["a"].image == ImageUse("registry.example.com/team/tool:1.2")
    assert specs["b"].image is None


@pytest.mark.parametrize(("image", "message"), [
    ("[a, b]", "image must be a name or a mapping with a name"),
    ("{entrypoint: [x]}", "image: name must be a non-empty string"),
    ("{name: x, entrypoint: /bin/sh}", "entrypoint must be a list of strings"),
    ("{name: x, docker: {user: [1]}}", "docker.user must be a user name or id"),
    ("{name: x, docker: {memory: 1g}}", "docker must be a mapping of user and platform"),
    ("{name: x, pull_policy: sometimes}", "pull_policy must be one of always"),
    ("{name: x, pull_policy: [always, 3]}", "pull_policy must be one of always"),
    ("{name: x, alias: y}", "image config contains unknown keys: alias"),
])
def test_gitlab_image_bad_types_name_file_line_and_job(tmp_path: Path, image: str,
                                                       message: str) -> None:
    """A wrongly typed image: is refused before any VM, with file:line and the job."""
    path = tmp_path / ".gitlab-ci.yml"
    path.write_text(f"stages: [test]\n\nbuild:\n  image: {image}\n  script: [true]\n")
    with pytest.raises(CIError, match=rf"\.gitlab-ci\.yml:3: job 'build': .*{message}"):
        load(path, tmp_path, MAIN)


def test_gitlab_script_shell_with_and_without_image(tmp_path: Path) -> None:
    """CI file scripts: bash -c as before without image; bash-else-sh detection with one."""
    _, specs = gitlab_plan(tmp_path, """
plain: {script: [echo hi], after_script: [echo bye]}
boxed: {image: busybox, script: [echo hi], after_script: [echo bye]}
""")
    plain = FakeSession(specs["plain"])
    specs["plain"].script.run(cast(Session, plain))
    assert [list(c.argv) for c in plain.commands] == [
        ["bash", "-c", job_script(["echo hi"])], ["bash", "-c", job_script(["echo bye"])]]
    assert job_script(["x"]).startswith("set -eo pipefail\n")
    boxed = FakeSession(specs["boxed"])
    specs["boxed"].script.run(cast(Session, boxed))
    main, after = (list(c.argv) for c in boxed.commands)
    assert main[:4] == ["sh", "-c", DETECT, "sh"] and after[:4] == main[:4]
    assert main[4].startswith("set -e\nif (set -o pipefail) 2>/dev/null; then set -o pipefail")
    assert "echo bye" in after[4]


# --- GitLab payload -------------------------------------------------------------------------

def _payload(name: str = "jobs_request.201.runner-network-test.json") -> dict[str, Any]:
    return dict(json.loads((FIXTURES / name).read_text()))


def _with_vars(payload: dict[str, Any], *items: dict[str, Any]) -> dict[str, Any]:
    payload = copy.deepcopy(payload)
    payload["variables"] = [*payload.get("variables", []), *items]
    return payload


def test_payload_image_and_registry_credentials() -> None:
    """Payload: GitLab's runner test payload's image, platform note and Registry credential."""
    job = parse_job(_payload())
    assert job.image == "ruby:3.3"
    assert job.image_use == ImageUse("ruby:3.3", entrypoint=("/bin/sh",))
    assert any("platform arm64/v8" in n for n in job.image_notes)
    assert job.credentials == [Credentials("registry.gitlab.example.com", "gitlab-ci-token",
                                           "job-token")]


def test_payload_image_user_entrypoint_and_pull_policy() -> None:
    """executor_opts.docker.user, entrypoint [""] (none) and a pull_policy list (the first)."""
    raw = _payload()
    raw["image"] = {"name": "alpine:3.20", "entrypoint": [""], "pull_policy":
                    ["never", "if-not-present"], "executor_opts": {"docker": {"user": "nobody"}}}
    job = parse_job(raw)
    assert job.image_use == ImageUse("alpine:3.20", entrypoint=(), user="nobody",
                                     pull_policy="never")
    raw["image"]["pull_policy"] = ["sometimes"]
    with pytest.raises(UserError, match=r"image\.pull_policy 'sometimes' is not one of"):
        parse_job(raw)


def test_payload_docker_auth_config_credentials_are_used_and_masked() -> None:
    """Payload: DOCKER_AUTH_CONFIG credentials come first, expand the name, and are masked."""
    auth = base64.b64encode(f"hubuser:{PASSWORD}".encode()).decode()
    config = {"auths": {"https://index.docker.io/v1/": {"auth": auth},
                        "registry.gitlab.example.com": {"username": "me",
                                                        "password": "another-long-secret"}}}
    raw = _with_vars(_payload(), {"key": "DOCKER_AUTH_CONFIG", "value": json.dumps(config)},
                     {"key": "TAG", "value": "3.3"})
    raw["image"]["name"] = "ruby:$TAG"
    job = parse_job(raw)
    out = Collect()
    sink = MaskingSink(out, Masker([], GITLAB_MASK))
    use = execute.job_image(job, variables(job, {}), sink)
    assert use is not None and use.name == "ruby:3.3"
    assert use.credentials == (Credentials("docker.io", "hubuser", PASSWORD),
                               Credentials("registry.gitlab.example.com", "me",
                                           "another-long-secret"))
    sink.write("stdout", f"{PASSWORD} {auth} another-long-secret job-token\n".encode())
    sink.flush()
    assert PASSWORD.encode() not in out.out and auth.encode() not in out.out
    assert b"another-long-secret" not in out.out
    assert out.out.count(GITLAB_MASK.encode()) >= 3


def test_payload_docker_auth_config_as_a_file_variable() -> None:
    """DOCKER_AUTH_CONFIG given as a file variable is read from its content."""
    config = {"auths": {"quay.io": {"username": "robot", "password": PASSWORD}}}
    raw = _with_vars(_payload(), {"key": "DOCKER_AUTH_CONFIG", "value": json.dumps(config),
                                  "file": True})
    job = parse_job(raw)
    use = execute.job_image(job, variables(job, {}), MaskingSink(Collect(), Masker()))
    assert use is not None and use.credentials[0] == Credentials("quay.io", "robot", PASSWORD)


@pytest.mark.parametrize(("value", "message"), [
    ("{not json", "DOCKER_AUTH_CONFIG is not valid JSON"),
    ('["auths"]', "must be a JSON object"),
    ('{"auths": []}', '"auths" must be an object'),
    ('{"auths": {"quay.io": "x"}}', "auths['quay.io'] must be an object"),
    ('{"auths": {"quay.io": {"auth": "%%%"}}}', "is not base64 of user:password"),
    ('{"auths": {"quay.io": {"auth": "' + base64.b64encode(PASSWORD.encode()).decode() + '"}}}',
     "is not base64 of user:password"),
])
def test_payload_malformed_docker_auth_config_fails_the_job_clearly(value: str,
                                                                   message: str) -> None:
    """Payload: a malformed DOCKER_AUTH_CONFIG is a clear job failure, no traceback, no secret."""
    raw = _with_vars(_payload(), {"key": "DOCKER_AUTH_CONFIG", "value": value})
    out = Collect()
    outcome = execute.run({"payload": raw, "url": "https://gitlab.invalid", "runner_id": 1},
                          out, cast(execute.Context, None))
    assert outcome.kind is OutcomeKind.JOB_FAILURE and message in outcome.message
    assert b"Traceback" not in out.out and PASSWORD.encode() not in out.out
    assert b"ERROR: DOCKER_AUTH_CONFIG" in out.out


def test_registry_names_as_references_name_them() -> None:
    """URLs, ports and Docker Hub's names become what an image reference calls the registry."""
    assert normalise_registry("http://registry.gitlab.example.com/") == \
        "registry.gitlab.example.com"
    assert normalise_registry("Registry.Example.com:5000/v2/") == "registry.example.com:5000"
    assert normalise_registry("https://index.docker.io/v1/") == "docker.io"
    creds, notes = docker_auths('{"auths": {}, "credsStore": "desktop"}', "X")
    assert creds == [] and notes and "credential helpers" in notes[0]


# --- GitHub container -----------------------------------------------------------------------

def github_spec(tmp_path: Path, container: str, secrets: Mapping[str, str] | None = None,
                steps: str = "[{run: echo hi}]") -> JobSpec:
    path = tmp_path / "ci.yml"
    path.write_text(f"on: push\njobs:\n  build:\n    strategy: {{matrix: {{node: [22]}}}}\n"
                    f"    container: {container}\n    steps: {steps}\n")
    wf = load_workflow(path)
    github = {"event_name": "push", "ref": "refs/heads/main", "ref_name": "main",
              "sha": "a" * 40, "repository": "local/x", "repository_owner": "local",
              "workspace": str(tmp_path), "actor": "kata-ci", "run_id": "7",
              "run_number": "1", "run_attempt": "1", "workflow": wf.name, "event": {}}
    rc = RunContext(wf, tmp_path, github, {}, Cancel(), secrets or {})
    return GitHubPlan(wf, wf.jobs, rc, RunSettings()).spec(wf.jobs[0])


def test_github_container_as_an_image_name(tmp_path: Path) -> None:
    """GitHub container: a name with a matrix expression, no entrypoint."""
    spec = github_spec(tmp_path, "node:${{ matrix.node }}")
    assert spec.image == ImageUse("node:22", entrypoint=())
    assert cast(Any, spec.script).job.unsupported == []


def test_github_container_object_options_and_credentials(tmp_path: Path) -> None:
    """GitHub container: env, credentials, --user/--env, ignored options, ports/volumes noted."""
    spec = github_spec(tmp_path, """
      image: ghcr.io/acme/build:${{ matrix.node }}
      env: {NODE_ENV: "v${{ matrix.node }}", DEBUG: true}
      credentials: {username: acme, password: "${{ secrets.GHCR_TOKEN }}"}
      options: --cpus 2 --user 1000:1000 -e EXTRA=1 --network=host --privileged --foo
      ports: [80]
      volumes: [/data:/data]""", secrets={"GHCR_TOKEN": PASSWORD})
    assert spec.image == ImageUse(
        "ghcr.io/acme/build:22", entrypoint=(), user="1000:1000",
        credentials=(Credentials("ghcr.io", "acme", PASSWORD),),
        env={"NODE_ENV": "v22", "DEBUG": "true", "EXTRA": "1"})
    assert PASSWORD in spec.secrets.values()
    notes = cast(Any, spec.script).notes
    assert any("--cpus --network --privileged have no meaning" in n for n in notes)
    assert any("--foo are not supported" in n for n in notes)
    assert any("ports are not supported yet" in n for n in notes)
    assert any("volumes are not supported yet" in n for n in notes)


def test_github_container_on_docker_hub_gets_docker_io_credentials(tmp_path: Path) -> None:
    """A Docker Hub image's credentials are for docker.io, as its reference names it."""
    spec = github_spec(tmp_path, "{image: node:22, credentials: {username: u, password: "
                                 f"{PASSWORD}}}}}")
    assert spec.image is not None
    assert spec.image.credentials == (Credentials("docker.io", "u", PASSWORD),)


@pytest.mark.parametrize(("container", "message"), [
    ("[node]", "container must be an image name or a mapping with an image"),
    ("{env: {A: b}}", "image must be a non-empty string"),
    ("{image: x, env: [A]}", "env must be a mapping"),
    ("{image: x, credentials: {user: a}}", "credentials must be a mapping of username"),
    ("{image: x, options: [--cpus]}", "options must be a string"),
    ("{image: x, ports: 80}", "ports must be a list"),
    ("{image: x, network: y}", "container has unknown keys: network"),
])
def test_github_container_bad_types_name_file_line_and_job(tmp_path: Path, container: str,
                                                           message: str) -> None:
    """A wrongly typed container: is refused when the workflow loads, with file:line, job."""
    with pytest.raises(WorkflowError, match=rf"ci\.yml:3: job 'build': .*{message}"):
        github_spec(tmp_path, container)


def test_github_steps_in_a_container_detect_their_shell(tmp_path: Path) -> None:
    """GitHub steps: bash -e else sh -e in a container; explicit and non-container shells kept."""
    steps = "[{run: echo a}, {run: echo b, shell: sh}]"
    boxed = FakeSession(github_spec(tmp_path, "alpine", steps=steps))
    boxed.spec.script.run(cast(Session, boxed))
    first, second = (list(c.argv) for c in boxed.commands)
    assert first == file_argv("/tmp/kata-ci-gh/step0") and first[2] == DETECT_FILE
    assert second == ["sh", "-e", "/tmp/kata-ci-gh/step1"]
    path = tmp_path / "plain.yml"
    path.write_text("on: push\njobs: {a: {steps: [{run: echo a}]}}\n")
    wf = load_workflow(path)
    rc = RunContext(wf, tmp_path, {"sha": "a" * 40, "ref": "r", "ref_name": "r",
                                   "event_name": "push", "repository": "x", "run_id": "1",
                                   "actor": "me"}, {}, Cancel())
    plain = FakeSession(GitHubPlan(wf, wf.jobs, rc, RunSettings()).spec(wf.jobs[0]))
    plain.spec.script.run(cast(Session, plain))
    assert list(plain.commands[0].argv) == ["bash", "--noprofile", "--norc", "-eo", "pipefail",
                                            "/tmp/kata-ci-gh/step0"]


# --- the shell, for real on the host --------------------------------------------------------

def _shell_dir(tmp_path: Path, sh: str, bash: bool) -> dict[str, str]:
    """A PATH with `sh` (dash or busybox) and, if asked, bash: an image's shells."""
    bin_dir = tmp_path / ("with-bash" if bash else "no-bash")
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "sh").symlink_to(sh)
    if bash:
        (bin_dir / "bash").symlink_to(shutil.which("bash") or "/bin/bash")
    return {"PATH": str(bin_dir)}


SCRIPT = ["echo start", "false | true", "echo after-pipe", "false", "echo not-reached"]


def _run(argv: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(Path(env["PATH"]) / "sh"), *argv[1:]], env=env,
                          capture_output=True, text=True, timeout=30, check=False)


@pytest.mark.parametrize("sh", ["/bin/dash", "/bin/busybox"])
def test_image_script_runs_under_sh_with_set_e(tmp_path: Path, sh: str) -> None:
    """Shell: without bash, sh runs the script with set -e and pipefail only where known."""
    if not Path(sh).exists():
        pytest.skip(f"{sh} is not installed")
    env = _shell_dir(tmp_path, sh, bash=False)
    got = _run(script_argv(job_script(SCRIPT, echo=False, image=True), True), env)
    assert got.returncode == 1 and "not-reached" not in got.stdout
    has_pipefail = subprocess.run([str(Path(env["PATH"]) / "sh"), "-c", "set -o pipefail"],
                                  capture_output=True, check=False).returncode == 0
    assert got.stdout.split() == (["start"] if has_pipefail else ["start", "after-pipe"])
    assert "Illegal option" not in got.stderr and "pipefail" not in got.stderr


def test_image_script_runs_under_bash_with_pipefail(tmp_path: Path) -> None:
    """Shell: with bash in the image, bash runs the script with pipefail on."""
    env = _shell_dir(tmp_path, "/bin/dash", bash=True)
    script = job_script(['echo "shell=${BASH_VERSION:+bash}"', *SCRIPT], image=True)
    got = _run(script_argv(script, True), env)
    assert got.returncode == 1
    assert "shell=bash" in got.stdout and "after-pipe" not in got.stdout
    assert "$ false | true" in got.stdout and "not-reached" not in got.stdout


def test_github_file_wrapper_prefers_bash_then_sh(tmp_path: Path) -> None:
    """Shell: GitHub's container default runs bash -e FILE, else sh -e FILE."""
    script = tmp_path / "step.sh"
    script.write_text('echo "shell=${BASH_VERSION:+bash}"\nfalse\necho not-reached\n')
    for bash, shell in ((True, "shell=bash"), (False, "shell=")):
        env = _shell_dir(tmp_path, "/bin/dash", bash=bash)
        got = _run(file_argv(str(script)), env)
        assert got.returncode == 1 and got.stdout.split() == [shell]


def test_gitlab_services_forms_and_aliases(tmp_path: Path) -> None:
    """CI file services: names and mappings (alias list, command, variables, ports); GitLab's
    default hostnames from the image name; $VARS expanded with the job's variables."""
    _, specs = gitlab_plan(tmp_path, """
variables: {PG: "postgres:16"}
a:
  services:
    - registry.example.com/group/tutum-wordpress:latest
    - name: $PG
      alias: db,pg
      command: ["postgres", "-c", "fsync=off"]
      variables: {POSTGRES_PASSWORD: secret-enough}
      ports: [5432, {number: 5433}]
  script: [true]
""")
    first, second = specs["a"].services
    assert first.aliases == ("registry.example.com__group__tutum-wordpress",
                             "registry.example.com-group-tutum-wordpress")
    assert second.image.name == "postgres:16"
    assert second.aliases[:2] == ("db", "pg") and "postgres" in second.aliases
    assert second.command == ("postgres", "-c", "fsync=off")
    assert second.variables == {"POSTGRES_PASSWORD": "secret-enough"} and second.ports == (
        5432, 5433)


def test_gitlab_services_bad_forms_name_the_line(tmp_path: Path) -> None:
    """A service with an unknown key or a command that is not a list: an error with file:line."""
    for body in ("services: [{name: x, bogus: 1}]", "services: [{name: x, command: run}]"):
        path = tmp_path / ".gitlab-ci.yml"
        path.write_text(f"a:\n  {body}\n  script: [true]\n")
        with pytest.raises(UserError, match=r"\.gitlab-ci\.yml:1: job 'a': services"):
            load(path, tmp_path, MAIN)


def test_github_services_by_id_with_their_own_entrypoint(tmp_path: Path) -> None:
    """GitHub job services: each id is its hostname, the image's entrypoint is kept (GitHub
    starts service containers as they are), env and credentials as for container:."""
    spec = github_spec(tmp_path, "node:22\n    services:\n      db:\n"
                                 "        image: postgres:${{ matrix.node }}\n"
                                 "        env: {POSTGRES_PASSWORD: secret-enough}\n"
                                 "        credentials: {username: u, password: "
                                 "\"${{ secrets.HUB }}\"}\n"
                                 "      cache: redis:7", secrets={"HUB": PASSWORD})
    db, cache = spec.services
    assert (db.aliases, db.image.name, db.image.entrypoint) == (("db",), "postgres:22", None)
    assert db.image.env == {"POSTGRES_PASSWORD": "secret-enough"}
    assert db.image.credentials == (Credentials("docker.io", "u", PASSWORD),)
    assert cache.aliases == ("cache",) and PASSWORD in spec.secrets.values()
