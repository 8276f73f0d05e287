"""Running GitHub workflow jobs: each job in a fresh VM, its steps one after another in it.

As on GitHub's runner: each step is its own process in its shell (bash: `bash --noprofile
--norc -eo pipefail {0}`); `$GITHUB_ENV`, `$GITHUB_PATH`, `$GITHUB_OUTPUT` and
`$GITHUB_STEP_SUMMARY` are files the host reads back after every step; a step's `if` defaults
to `success()`; `continue-on-error` keeps the job going; job `outputs` are evaluated at the
end. `uses: actions/checkout` is the mounted checkout; other actions cannot be fetched and
are skipped with a warning.
"""

from __future__ import annotations

import hashlib
import re
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from kata_ci.errors import SystemFailure
from kata_ci.executors.base import VM, VMSpec
from kata_ci.executors.qemu.backend import QemuBackend
from kata_ci.runner.github_expr import evaluate, render, truthy, uses_status_function
from kata_ci.runner.github_wf import GHJob, Step, Workflow
from kata_ci.runner.job import JobRequest, OutcomeKind, run_job
from kata_ci.runner.pipeline import CallbackSink, Emit, JobResult

FILES = "/tmp/kata-ci-gh"
# $GITHUB_ENV, $GITHUB_PATH, $GITHUB_OUTPUT, $GITHUB_STEP_SUMMARY: emptied before each step,
# read back after it, in this order.
STEP_FILES = ("env", "path", "output", "summary")
SHELLS = {"bash": "bash --noprofile --norc -eo pipefail {0}", "sh": "sh -e {0}",
          "python": "python3 {0}", "pwsh": "", "powershell": "", "cmd": ""}
_SEP = "\x1e"
GUEST_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


@dataclass
class JobState:
    status: str = "success"  # job.status: success | failure | cancelled
    steps: dict[str, dict[str, Any]] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)  # from $GITHUB_ENV
    path: list[str] = field(default_factory=list)  # from $GITHUB_PATH, newest first


def parse_env_file(text: str) -> dict[str, str]:
    """NAME=value lines and NAME<<DELIM ... DELIM blocks (multiline values)."""
    out: dict[str, str] = {}
    lines = text.split("\n")
    i = 0
    while i < len(lines):
        line = lines[i]
        i += 1
        heredoc = re.fullmatch(r"([^=<]+)<<(.+)", line)
        if heredoc:
            body = []
            while i < len(lines) and lines[i] != heredoc.group(2):
                body.append(lines[i])
                i += 1
            i += 1
            out[heredoc.group(1)] = "\n".join(body)
        elif "=" in line:
            key, _, value = line.partition("=")
            out[key] = value
    return out


def hash_files(workspace: Path) -> Callable[..., str]:
    def compute(*patterns: Any) -> str:
        files = sorted({p for pattern in patterns for p in workspace.glob(str(pattern))
                        if p.is_file()})
        if not files:
            return ""
        digest = hashlib.sha256()
        for path in files:
            digest.update(hashlib.sha256(path.read_bytes()).digest())
        return digest.hexdigest()
    return compute


@dataclass
class RunContext:
    workflow: Workflow
    workspace: Path
    github: dict[str, Any]
    needs: dict[str, dict[str, Any]]  # finished jobs: result and outputs
    emit: Emit
    cancelled: threading.Event
    grace: float
    boot_timeout: float


def _expression_body(text: str) -> str:
    """The expression of a field that may be written with or without ${{ }}."""
    body = text.strip()
    return body[3:-2] if body.startswith("${{") and body.endswith("}}") else body


def _flag(value: Any, ctx: Mapping[str, Any]) -> bool:
    """A boolean field such as continue-on-error: a literal, or an expression
    (`continue-on-error: ${{ matrix.experimental }}`)."""
    if isinstance(value, str):
        return truthy(evaluate(_expression_body(value), ctx))
    return bool(value)


def _condition(text: str | None, ctx: Mapping[str, Any], functions: Mapping[str, Any]) -> bool:
    body = _expression_body(text or "")
    if not body:
        body = "success()"
    elif not uses_status_function(body):
        body = f"success() && ({body})"
    return truthy(evaluate(body, ctx, functions))


def run_gh_job(job: GHJob, backend: QemuBackend, base: VMSpec, rc: RunContext) -> JobResult:
    started = time.monotonic()
    for key in job.unsupported:
        rc.emit("stderr", f"kata-ci: {key}: needs a registry; the job runs in the kata-ci VM "
                          "image\n".encode())
    state = JobState()
    with backend.create(replace(base, workspace=rc.workspace)) as vm:
        try:
            vm.start(rc.boot_timeout)
        except SystemFailure as exc:
            return JobResult(job.name, "system failure", time.monotonic() - started,
                             message=str(exc.args[0]))
        deadline = time.monotonic() + job.timeout_minutes * 60
        for step in job.steps:
            result = _step(vm, job, step, state, rc, deadline)
            if result is not None:
                return replace(result, duration=time.monotonic() - started)
        vm.stop()
    ctx = _contexts(job, state, rc)
    outputs = {k: render(v, ctx) for k, v in job.outputs.items()}
    status = {"success": "success", "failure": "failed", "cancelled": "cancelled"}[state.status]
    if status == "failed" and _flag(job.continue_on_error, ctx):
        status = "warning"
    return JobResult(job.name, status, time.monotonic() - started, outputs=outputs)


def _contexts(job: GHJob, state: JobState, rc: RunContext) -> dict[str, Any]:
    env = {**rc.workflow.env, **job.env, **state.env}
    return {"github": {**rc.github, "job": job.key}, "env": env, "matrix": job.matrix,
            "steps": state.steps, "needs": {n: rc.needs.get(n, {}) for n in job.needs},
            "job": {"status": state.status}, "runner": {"os": "Linux", "arch": "X64",
                                                        "temp": "/tmp", "name": "kata-ci"},
            "strategy": {"fail-fast": job.fail_fast}, "inputs": {}, "vars": {},
            "secrets": {}}


def _step(vm: VM, job: GHJob, step: Step, state: JobState, rc: RunContext,
          deadline: float) -> JobResult | None:
    """Run one step; a JobResult only when the job must end now (system failure)."""
    functions: dict[str, Callable[..., Any]] = {
                 "success": lambda: state.status == "success",
                 "failure": lambda: state.status == "failure",
                 "cancelled": lambda: state.status == "cancelled" or rc.cancelled.is_set(),
                 "always": lambda: True, "hashFiles": hash_files(rc.workspace)}
    ctx = _contexts(job, state, rc)
    record = {"outputs": {}, "outcome": "skipped", "conclusion": "skipped"}
    state.steps[step.id] = record
    if rc.cancelled.is_set() and state.status != "cancelled":
        state.status = "cancelled"
    if not _condition(step.if_, ctx, functions):
        return None
    rc.emit("stdout", f"\x1b[1m▶ {step.name}\x1b[0m\n".encode())
    if step.uses is not None:
        if re.match(r"actions/checkout@", step.uses):
            rc.emit("stdout", b"kata-ci: actions/checkout: the checkout is already mounted\n")
            record.update(outcome="success", conclusion="success")
        else:
            rc.emit("stderr", f"kata-ci: warning: step skipped: action {step.uses} cannot be "
                              "fetched here (no network)\n".encode())
        return None
    env = {**ctx["env"], **{k: render(v, ctx, functions) for k, v in step.env.items()}}
    shell = step.shell or job.shell or "bash"
    template = SHELLS.get(shell, shell)
    if not template or "{0}" not in template:
        raise SystemFailure(f"job {job.name}: shell {shell!r} is not available in the guest")
    workdir = render(step.working_directory or job.working_directory or "", ctx, functions)
    cwd = str(rc.workspace / workdir) if workdir else str(rc.workspace)
    script = f"{FILES}/step{step.index}"
    empty = " && ".join(f": > {FILES}/{name}" for name in STEP_FILES)
    write = ["sh", "-c", f'mkdir -p {FILES} && printf %s "$1" > "$2" && {empty}', "sh",
             render(step.run or "", ctx, functions), script]
    _quiet(vm, write)
    full_env = {**_github_env(rc, job), **env,
                "PATH": ":".join([*state.path, env.get("PATH", GUEST_PATH)])}
    timeout = min(step.timeout_minutes * 60 if step.timeout_minutes else 1e9,
                  max(1.0, deadline - time.monotonic()))
    request = JobRequest(template.replace("{0}", script).split(), full_env, cwd, timeout,
                         rc.grace)
    outcome = run_job(vm, request, CallbackSink(rc.emit), rc.cancelled.is_set)
    if outcome.kind is OutcomeKind.SYSTEM_FAILURE:
        rc.emit("stderr", f"kata-ci: system failure: {outcome.message}\n".encode())
        return JobResult(job.name, "system failure", message=outcome.message)
    summary = _collect_files(vm, state, record)
    if summary.strip():
        rc.emit("stdout", f"── step summary ──\n{summary.rstrip()}\n".encode())
    ok = outcome.kind is OutcomeKind.SUCCESS
    record["outcome"] = "success" if ok else "failure"
    record["conclusion"] = "success" if ok or _flag(step.continue_on_error, ctx) \
        else "failure"
    if outcome.kind is OutcomeKind.CANCELLED:
        state.status = "cancelled"
    elif record["conclusion"] == "failure":
        state.status = "failure"
        rc.emit("stderr", f"✗ {step.name}: {outcome.message}\n".encode())
    return None


def _github_env(rc: RunContext, job: GHJob) -> dict[str, str]:
    g = rc.github
    return {"CI": "true", "GITHUB_ACTIONS": "true", "KATA_CI": "true", "HOME": "/root",
            "GITHUB_WORKSPACE": str(rc.workspace), "GITHUB_SHA": g["sha"],
            "GITHUB_REF": g["ref"], "GITHUB_REF_NAME": g["ref_name"],
            "GITHUB_EVENT_NAME": g["event_name"], "GITHUB_REPOSITORY": g["repository"],
            "GITHUB_JOB": job.key, "GITHUB_RUN_ID": g["run_id"], "GITHUB_ACTOR": g["actor"],
            "RUNNER_OS": "Linux", "RUNNER_TEMP": "/tmp", "GITHUB_ENV": f"{FILES}/env",
            "GITHUB_PATH": f"{FILES}/path", "GITHUB_OUTPUT": f"{FILES}/output",
            "GITHUB_STEP_SUMMARY": f"{FILES}/summary", "LANG": "C.UTF-8"}


def _quiet(vm: VM, argv: list[str]) -> bytes:
    """A helper command of ours in the guest (not the job's): output not shown."""
    stream = vm.agent.exec(argv, {"PATH": GUEST_PATH})
    out = b"".join(chunk.data for chunk in stream if chunk.stream == "stdout")
    if stream.exit is None or stream.exit.exit_code != 0:
        raise SystemFailure(f"guest helper {argv[:3]} failed")
    return out


def _collect_files(vm: VM, state: JobState, record: dict[str, Any]) -> str:
    """Read back the step's GITHUB_* files; returns the step summary (markdown)."""
    script = "; ".join(f"cat {FILES}/{n} 2>/dev/null; printf '{_SEP}'" for n in STEP_FILES)
    parts = _quiet(vm, ["sh", "-c", script]).decode(errors="replace").split(_SEP)
    env, path, output, summary = [*parts, "", "", "", ""][:4]
    state.env.update(parse_env_file(env))
    state.path[:0] = [p for p in reversed(path.splitlines()) if p.strip()]
    record["outputs"] = parse_env_file(output)
    return summary


def run_workflow_jobs(workflow: Workflow, jobs: list[GHJob], parallel: int,
                      run: Callable[[GHJob], JobResult], rc: RunContext) -> list[JobResult]:
    """needs-ordered scheduling; a job's `if` is evaluated once its needs are done; with
    fail-fast, a failed matrix job cancels its siblings that have not started."""
    from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait

    results: dict[str, JobResult] = {}
    by_key: dict[str, list[GHJob]] = {}
    for job in jobs:
        by_key.setdefault(job.key, []).append(job)
    waiting = list(jobs)
    running: dict[Future[JobResult], GHJob] = {}
    failed_groups: set[str] = set()

    def key_done(key: str) -> bool:
        return all(j.name in results for j in by_key.get(key, []))

    def need(key: str) -> dict[str, Any]:
        """needs.<key>, aggregated over its variants once all are done; a job outside the
        selection (--only) counts as succeeded."""
        if key not in rc.needs and key in by_key and key_done(key):
            rc.needs[key] = _aggregate([results[v.name] for v in by_key[key]])
        return rc.needs.get(key, {"result": "success", "outputs": {}})

    with ThreadPoolExecutor(max_workers=parallel) as pool:
        while waiting or running:
            for job in list(waiting):
                if len(running) >= parallel:
                    break  # taken only when a VM slot is free: fail-fast and cancel stop it
                if not all(key_done(n) for n in job.needs if n in by_key):
                    continue
                waiting.remove(job)
                needs_ok = all(need(n)["result"] == "success" for n in job.needs)
                ctx = {"github": rc.github, "needs": {n: need(n) for n in job.needs},
                       "matrix": job.matrix, "env": workflow.env}
                functions = _job_status_functions(needs_ok, rc.cancelled)
                if rc.cancelled.is_set() or (job.key in failed_groups and job.fail_fast):
                    results[job.name] = JobResult(job.name, "cancelled")
                elif _condition(job.if_, ctx, functions):
                    running[pool.submit(run, job)] = job
                else:
                    results[job.name] = JobResult(job.name, "skipped",
                                                  message="if: condition not met")
            if running:
                try:
                    done, _ = wait(running, timeout=0.2, return_when=FIRST_COMPLETED)
                except KeyboardInterrupt:
                    rc.cancelled.set()
                    continue
                for future in done:
                    job = running.pop(future)
                    results[job.name] = future.result()
                    if results[job.name].status == "failed":
                        failed_groups.add(job.key)
    for key in by_key:
        need(key)  # every finished job's result for the caller
    return [results[j.name] for j in jobs]


def _job_status_functions(needs_ok: bool,
                          cancelled: threading.Event) -> dict[str, Callable[..., Any]]:
    """Status functions for a job-level `if`: about the jobs it needs."""
    return {"success": lambda: needs_ok and not cancelled.is_set(), "always": lambda: True,
            "failure": lambda: not needs_ok, "cancelled": cancelled.is_set}


def _aggregate(results: list[JobResult]) -> dict[str, Any]:
    """needs.<job> of a matrix job: failure if any variant failed; outputs merged."""
    statuses = {r.status for r in results}
    result = ("failure" if statuses & {"failed", "system failure"} else
              "cancelled" if "cancelled" in statuses else
              "skipped" if statuses == {"skipped"} else "success")
    outputs: dict[str, str] = {}
    for r in results:
        outputs.update({k: v for k, v in r.outputs.items() if v})
    return {"result": result, "outputs": outputs}
