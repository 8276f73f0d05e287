"""Secrets reach the job's environment and no log, process list or host file: `kata-ci run
--secret`, GitLab `masked: true`, GitHub `${{ secrets.* }}` and `::add-mask::`, and the Redis
job log (through the one lifecycle). Real VMs; one per scenario."""

from __future__ import annotations

import base64
import os
import subprocess
import uuid
from pathlib import Path
from urllib.parse import quote

import pytest

from kata_ci.executors.provider import open_provider
from kata_ci.runner.core.command import Cancel
from kata_ci.runner.core.env import job_env
from kata_ci.runner.core.lifecycle import run_job
from kata_ci.runner.core.outcome import OutcomeKind
from kata_ci.runner.core.spec import Command, Commands, JobSpec
from kata_ci.runner.queue.store import JobStore
from kata_ci.runner.queue.worker import RedisSink
from tests.e2e.conftest import KATA_CI, kata_ci_run, leftovers
from tests.integration.redis_server import RedisServer


def new_secret(tag: str) -> str:
    """Random each run; `/`, `+`, `@`, `=` and `!` all change under URL encoding."""
    return f"{tag}/{uuid.uuid4().hex[:12]}+v@l=!"


def base64_cores(value: str) -> list[bytes]:
    """8-character runs of the value's base64 that hold only the value's own bits, for each
    byte alignment inside a longer base64 text: none of them may be shown."""
    raw = value.encode()
    runs = []
    for p in range(3):
        encoded = base64.b64encode(b"\0" * p + raw)
        core = encoded[-(-8 * p // 6):8 * (p + len(raw)) // 6]
        runs += [core[i:i + 8] for i in range(len(core) - 7)]
    return runs


def assert_hidden(output: bytes, value: str, halves: bool = False) -> None:
    """Neither the value nor its base64 shows; with ``halves``, nor either part of it that
    the job wrote a second apart."""
    raw = value.encode()
    for shown in (raw, *([raw[:10], raw[10:]] if halves else []), *base64_cores(value)):
        assert shown not in output, (shown, output)


def host_holders(value: str, run_dir: Path) -> list[str]:
    """Host processes whose argv holds the value; files under the run dir that do; and the
    VMM and file server (processes naming the run dir) if their environment holds it."""
    raw = value.encode()
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            if raw in cmdline:
                found.append(f"argv of {pid}: {cmdline[:80]!r}")
            environ = Path(f"/proc/{pid}/environ").read_bytes()
            if str(run_dir).encode() in cmdline and raw in environ:
                found.append(f"environment of {pid}: {cmdline[:80]!r}")
        except OSError:
            continue
    for path in run_dir.rglob("*"):
        try:
            if path.is_file() and not path.is_symlink() and raw in path.read_bytes():
                found.append(f"file {path}")
        except OSError:
            continue
    return found


def test_run_secret_masked_everywhere_and_absent_from_host(
        tmp_path: Path, cli_env: dict[str, str]) -> None:
    """`kata-ci run --secret` (from the environment and from a file): the job sees both, but
    its terminal output shows neither plain, base64'd at any alignment, URL-encoded, on
    stderr, nor split across two writes a second apart; while it runs, no host process's
    argv, no file under the run dir and not the guest's /proc/cmdline holds the value, and
    the VMM does not inherit it."""
    secret, from_file = new_secret("env"), new_secret("file")
    (tmp_path / "key.txt").write_text(from_file + "\n")
    script = r"""
echo "plain:$S"
printf %s "$S" | base64
printf 'user:%s' "$S" | base64
printf 'ab%s\n' "$S" | base64
python3 -c 'import os, urllib.parse; print("url:" + urllib.parse.quote(os.environ["S"], safe=""))'
echo "file:$F"
echo "stderr:$S" >&2
printf 'split:%s' "$(printf %s "$S" | cut -c1-10)"
sleep 1
printf '%s\n' "$(printf %s "$S" | cut -c11-)"
if grep -qF -e "$S" /proc/cmdline; then echo guest-cmdline-holds-it
else echo guest-cmdline-clean; fi
echo "lengths:${#S}:${#F}"
echo ready
sleep 4
"""
    env = {**cli_env, "S": secret}
    proc = subprocess.Popen([*KATA_CI, "run", "--secret", "S", "--secret", "F=@key.txt", "--",
                             "sh", "-c", script], env=env, cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stderr is not None
    out = b""
    for line in proc.stdout:
        out += line
        if line == b"ready\n":
            break
    else:
        raise AssertionError(f"never saw ready: {out!r} {proc.stderr.read()!r}")
    during = host_holders(secret, Path(cli_env["KATA_CI_RUN_DIR"])) + \
        host_holders(from_file, Path(cli_env["KATA_CI_RUN_DIR"]))
    rest, err = proc.communicate(timeout=120)
    out += rest
    assert proc.returncode == 0, err
    assert during == []
    assert b"plain:[MASKED]\n" in out and b"file:[MASKED]\n" in out
    assert b"url:[MASKED]\n" in out and b"split:[MASKED]\n" in out
    assert b"guest-cmdline-clean\n" in out
    assert f"lengths:{len(secret)}:{len(from_file)}\n".encode() in out  # the job had both
    assert b"[MASKED]\n" in out.split(b"url:")[0]  # base64 of the value alone, padding too
    assert b"stderr:[MASKED]\n" in err
    for value in (secret, from_file):
        assert_hidden(out + err, value, halves=True)
        assert quote(value, safe="").encode() not in out
    assert leftovers(cli_env) == []


def test_gitlab_masked_variable_and_secret_are_masked(
        tmp_path: Path, cli_env: dict[str, str]) -> None:
    """A GitLab job's `masked: true` variable and a --secret (a variable for GitLab jobs)
    are in its environment and shown as [MASKED], also base64'd."""
    masked, token = new_secret("gl"), new_secret("tok")
    (tmp_path / ".gitlab-ci.yml").write_text(f"""\
variables:
  DB_PASS: {{value: "{masked}", masked: true}}
job:
  script:
    - echo "pass=$DB_PASS token=$TOKEN"
    - printf %s "$DB_PASS" | base64
    - printf 'u:%s' "$TOKEN" | base64
""")
    result = kata_ci_run(["--secret", "TOKEN", "job"], {**cli_env, "TOKEN": token}, tmp_path)
    assert result.returncode == 0, result.stderr
    assert b"pass=[MASKED] token=[MASKED]\n" in result.stdout
    for value in (masked, token):
        assert_hidden(result.stdout + result.stderr, value)


def test_github_secrets_and_add_mask_are_masked(
        tmp_path: Path, cli_env: dict[str, str]) -> None:
    """A GitHub job: `${{ secrets.TOKEN }}` is the --secret, shown as ***, and not in the
    environment unasked; `::add-mask::` of a value made at run time masks it (plain and
    base64) in later steps, and the command line itself is never shown."""
    token = new_secret("gh")
    later = "made-at-run-time-" + uuid.uuid4().hex[:8]
    built = f"made-at-run-time-$(printf %s {later[-8:]})"  # the file never holds `later`
    workflow = tmp_path / ".github" / "workflows" / "ci.yml"
    workflow.parent.mkdir(parents=True)
    workflow.write_text(f"""\
on: push
jobs:
  j:
    runs-on: ubuntu-latest
    steps:
      - run: |
          echo "token=${{{{ secrets.TOKEN }}}} env=${{TOKEN:-unset}}"
          V="{built}"
          echo "::add-mask::$V"
          echo "same step: $V"
      - run: |
          V="{built}"
          echo "next step: $V"
          printf %s "$V" | base64
""")
    result = kata_ci_run(["--secret", "TOKEN", "j"], {**cli_env, "TOKEN": token}, tmp_path)
    assert result.returncode == 0, result.stderr
    out = result.stdout + result.stderr
    assert b"token=*** env=unset\n" in result.stdout
    assert b"same step: ***\n" in result.stdout and b"next step: ***\n" in result.stdout
    assert b"::add-mask::" not in out
    for value in (token, later):
        assert_hidden(out, value)


def test_redis_log_is_masked_and_flushed_at_timeout(
        tmp_path: Path, redis_server: RedisServer, cli_env: dict[str, str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Through run_job into the Redis job log (the queue's sink): the secret is masked plain
    and split across writes, and a tail held back as a possible secret start is released
    when the job ends by timeout, before the timeout note."""
    monkeypatch.setenv("KATA_CI_RUN_DIR", cli_env["KATA_CI_RUN_DIR"])
    secret = new_secret("redis")
    store = JobStore.connect(redis_server.url)
    job = store.create(["sh"], "default", 60, b"")
    script = (f'echo "plain:$S"; printf "split:%s" "{secret[:9]}"; sleep 1; '
              f'printf "%s\\n" "{secret[9:]}"; printf "end:%s" "{secret[:6]}"; sleep 60')
    spec = JobSpec(name="redis", script=Commands([Command(["sh", "-c", script])]),
                   env=job_env({"S": secret}), workspace=tmp_path, timeout=8, grace=1,
                   secrets={"S": secret})
    provider = open_provider("auto", lambda message: None)
    outcome = run_job(spec, provider, RedisSink(store, job.id), Cancel())
    assert outcome.kind is OutcomeKind.TIMEOUT
    logged = b"".join(data for _, data in store.read_log(job.id))
    assert logged.startswith(b"plain:[MASKED]\nsplit:[MASKED]\nend:")
    assert secret[:6].encode() + b"kata-ci: job timed out" in logged, logged
    assert_hidden(logged, secret, halves=True)
