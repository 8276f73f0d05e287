"""Running a GitLab pipeline locally: every job in its own fresh microVM over the checkout.

Scheduling follows GitLab: a job with `needs` waits for exactly those jobs; one without waits
for every job of the earlier stages. `when: on_success` needs no failure before it,
`on_failure` needs one, `always` runs regardless, `manual` runs only when named. Up to
``parallel`` VMs run at once. Each job runs before_script + script in one bash with
`set -eo pipefail` (commands echoed with `$ `, as GitLab's runner does), then after_script in
a fresh shell whose failure does not fail the job.
"""

from __future__ import annotations

import re
import shlex
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field, replace
from pathlib import Path

from kata_ci.errors import SystemFailure
from kata_ci.executors.agent_client import StreamName
from kata_ci.executors.base import VMSpec
from kata_ci.executors.qemu.backend import QemuBackend
from kata_ci.runner.gitlab_ci import CIJob, Pipeline, git
from kata_ci.runner.job import JobRequest, Outcome, OutcomeKind, run_job
from kata_ci.runner.local import guest_env

AFTER_SCRIPT_TIMEOUT = 300.0  # GitLab's fixed after_script limit
COLOURS = ["cyan", "magenta", "green", "yellow", "blue", "red"]
Emit = Callable[[StreamName, bytes], None]  # one job's output, chunk by chunk


def _git(project: Path, *args: str) -> str:
    return git(project, *args) or ""


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:63]


def predefined_variables(project: Path, source: str = "push") -> dict[str, str]:
    """CI_* variables from the local checkout (doc: ci/variables/predefined_variables.md)."""
    sha = _git(project, "rev-parse", "HEAD") or "0" * 40
    branch = _git(project, "rev-parse", "--abbrev-ref", "HEAD") or "main"
    tag = _git(project, "describe", "--tags", "--exact-match") if branch == "HEAD" else ""
    default = _git(project, "symbolic-ref", "--short", "refs/remotes/origin/HEAD")
    default = default.split("/", 1)[-1] if default else next(
        (b for b in ("main", "master") if _git(project, "rev-parse", "--verify", b)), branch)
    ref = tag or branch
    variables = {
        "CI": "true", "GITLAB_CI": "true", "CI_SERVER": "yes", "KATA_CI": "true",
        "CI_PROJECT_DIR": str(project), "CI_BUILDS_DIR": str(project.parent),
        "CI_PROJECT_NAME": project.name, "CI_PROJECT_PATH": project.name,
        "CI_COMMIT_SHA": sha, "CI_COMMIT_SHORT_SHA": sha[:8], "CI_COMMIT_REF_NAME": ref,
        "CI_COMMIT_REF_SLUG": slug(ref), "CI_DEFAULT_BRANCH": default,
        "CI_PIPELINE_SOURCE": source, "CI_PIPELINE_ID": str(int(time.time())),
        "CI_COMMIT_TITLE": _git(project, "log", "-1", "--format=%s"),
    }
    if tag:
        variables["CI_COMMIT_TAG"] = tag
    else:
        variables["CI_COMMIT_BRANCH"] = branch
    return variables


def job_script(lines: list[str], echo: bool = True) -> str:
    parts = ["set -eo pipefail"]
    for line in lines:
        if echo:
            parts.append(f"printf '\\033[32m%s\\033[0m\\n' {shlex.quote('$ ' + line)}")
        parts.append(line)
    return "\n".join(parts) + "\n"


@dataclass
class JobResult:
    name: str
    status: str  # success | failed | warning | skipped | manual | cancelled | system failure
    duration: float = 0.0
    exit_code: int | None = None
    message: str = ""
    outputs: dict[str, str] = field(default_factory=dict)  # GitHub job outputs

    @property
    def ok(self) -> bool:
        return self.status in ("success", "warning", "skipped", "manual")


class PrefixedOutput:
    """Whole lines, each prefixed with its job's name (and colour when on a terminal)."""

    def __init__(self, write: Callable[[str, StreamName, bytes], None]) -> None:
        self.write = write
        self.partial: dict[tuple[str, StreamName], bytes] = {}
        self.lock = threading.Lock()

    def sink(self, job: str) -> Emit:
        def emit(stream: StreamName, data: bytes) -> None:
            with self.lock:
                buffered = self.partial.pop((job, stream), b"") + data
                *lines, rest = buffered.split(b"\n")
                for line in lines:
                    self.write(job, stream, line + b"\n")
                if rest:
                    self.partial[(job, stream)] = rest
        return emit

    def flush(self, job: str) -> None:
        with self.lock:
            streams: tuple[StreamName, ...] = ("stdout", "stderr")
            for stream in streams:
                rest = self.partial.pop((job, stream), b"")
                if rest:
                    self.write(job, stream, rest + b"\n")


class CallbackSink:
    """A LogSink that hands each chunk to a function (the per-job prefixer)."""

    def __init__(self, emit: Emit) -> None:
        self.emit = emit

    def write(self, stream: StreamName, data: bytes) -> None:
        self.emit(stream, data)


def run_one(job: CIJob, backend: QemuBackend, base: VMSpec, project: Path,
            env: Mapping[str, str], emit: Emit,
            default_timeout: float, grace: float, boot_timeout: float,
            cancelled: threading.Event) -> JobResult:
    started = time.monotonic()
    for key in job.unsupported:
        emit("stderr", f"kata-ci: {key}: is not honoured without a registry; the job runs in "
                       f"the kata-ci VM image\n".encode())
    sink = CallbackSink(emit)
    full_env = guest_env(env)  # already merged: predefined < global < job < --var
    with backend.create(replace(base, workspace=project)) as vm:
        try:
            vm.start(boot_timeout)
        except SystemFailure as exc:
            emit("stderr", f"kata-ci: system failure: {exc}\n".encode())
            return JobResult(job.name, "system failure", time.monotonic() - started,
                             message=str(exc.args[0]))
        request = JobRequest(["bash", "-c", job_script(job.before_script + job.script)],
                             full_env, str(project), job.timeout or default_timeout, grace)
        outcome = run_job(vm, request, sink, cancelled.is_set)
        if job.after_script and outcome.kind is not OutcomeKind.SYSTEM_FAILURE \
                and not cancelled.is_set():
            status = "success" if outcome.kind is OutcomeKind.SUCCESS else "failed"
            after = JobRequest(["bash", "-c", job_script(job.after_script)],
                               {**full_env, "CI_JOB_STATUS": status}, str(project),
                               AFTER_SCRIPT_TIMEOUT, grace)
            after_outcome = run_job(vm, after, sink, cancelled.is_set)
            if after_outcome.kind is not OutcomeKind.SUCCESS:
                emit("stderr", f"kata-ci: after_script failed ({after_outcome.message}); "
                               "the job's status is unchanged\n".encode())
        vm.stop()
    return _result(job, outcome, time.monotonic() - started)


def _result(job: CIJob, outcome: Outcome, took: float) -> JobResult:
    kinds = {OutcomeKind.SUCCESS: "success", OutcomeKind.CANCELLED: "cancelled",
             OutcomeKind.SYSTEM_FAILURE: "system failure"}
    if outcome.kind in kinds:
        return JobResult(job.name, kinds[outcome.kind], took, outcome.exit_code, outcome.message)
    allowed = job.allow_failure or (outcome.kind is OutcomeKind.JOB_FAILURE
                                    and outcome.exit_code in job.allow_exit_codes)
    return JobResult(job.name, "warning" if allowed else "failed", took, outcome.exit_code,
                     outcome.message)


def select(pipeline: Pipeline, names: list[str], only: bool) -> list[CIJob]:
    """The named jobs (all but manual ones when none is named), plus what they need."""
    if not names:
        return [j for j in pipeline.jobs if j.when != "manual"]
    wanted = {job.name for n in names for job in pipeline.named(n)}
    if not only:
        pending = list(wanted)
        while pending:
            for need in pipeline.job(pending.pop()).needs or []:
                if need not in wanted:
                    wanted.add(need)
                    pending.append(need)
    chosen = [j for j in pipeline.jobs if j.name in wanted]
    named = {job.name for n in names for job in pipeline.named(n)}
    for job in chosen:  # named explicitly: a manual job runs
        if job.name in named and job.when == "manual":
            job.when = "on_success"
    return chosen


def schedule(pipeline: Pipeline, jobs: list[CIJob], parallel: int,
             run: Callable[[CIJob], JobResult], cancelled: threading.Event) -> list[JobResult]:
    order = {s: i for i, s in enumerate(pipeline.stages)}
    chosen = {j.name for j in jobs}
    results: dict[str, JobResult] = {}
    running: dict[Future[JobResult], CIJob] = {}
    waiting = [j for j in jobs if j.when != "manual"]
    for job in jobs:
        if job.when == "manual":
            results[job.name] = JobResult(job.name, "manual", message="manual: name it to run")

    def deps(job: CIJob) -> list[str]:
        if job.needs is not None:
            return [n for n in job.needs if n in chosen]
        return [j.name for j in jobs if order[j.stage] < order[job.stage] and j.when != "manual"]

    with ThreadPoolExecutor(max_workers=parallel) as pool:
        while waiting or running:
            for job in list(waiting):
                if len(running) >= parallel:
                    break  # a job is taken only when a VM slot is free, so cancel stops it
                before = deps(job)
                if not all(d in results for d in before):
                    continue
                waiting.remove(job)
                failed = any(not results[d].ok for d in before)
                if cancelled.is_set():
                    results[job.name] = JobResult(job.name, "cancelled")
                elif job.when == "always" or (job.when == "on_failure") == failed:
                    running[pool.submit(run, job)] = job
                else:
                    why = "an earlier job failed" if failed else "no earlier job failed"
                    results[job.name] = JobResult(job.name, "skipped",
                                                  message=f"when: {job.when}, and {why}")
            if running:
                try:
                    done, _ = wait(running, timeout=0.2, return_when=FIRST_COMPLETED)
                except KeyboardInterrupt:
                    # Running jobs see the flag (SIGTERM, grace, kill); waiting ones never start.
                    cancelled.set()
                    continue
                for future in done:
                    results[running.pop(future).name] = future.result()
    return [results[j.name] for j in jobs]
