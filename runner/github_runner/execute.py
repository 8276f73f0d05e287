"""The worker's side of one unit of GitHub demand: one ephemeral JIT runner in one VM.

JIT config (GitHub API) -> VM -> GitHub's runner started in the guest with the config in its
environment, sent over the agent channel (never argv, the kernel command line or a file;
masked in the job log like every secret) -> the runner takes one job, runs it, exits -> VM
gone -> the runner deregistered (GitHub removes a JIT runner after its job; we make sure).
A runner that got no job within ``idle_timeout`` is deregistered first (so GitHub cannot give
it a job any more), then stopped. The runner's own log is the job's log in Redis.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from kata_ci.errors import SystemFailure
from kata_ci.executors.network.policy import NetworkPolicy
from kata_ci.executors.provider import VMProvider
from kata_ci.runner.core.command import Cancel
from kata_ci.runner.core.config import Config
from kata_ci.runner.core.env import job_env
from kata_ci.runner.core.lifecycle import Session, run_job
from kata_ci.runner.core.outcome import Outcome, OutcomeKind
from kata_ci.runner.core.secrets import GITHUB_MASK
from kata_ci.runner.core.sinks import LogSink, Stream, note
from kata_ci.runner.core.spec import Command, JobSpec
from kata_ci.runner.github_runner.api import GitHubAPI, RunnerExists
from kata_ci.runner.github_runner.state import GitHubState
from kata_ci.runner.queue.store import Job

log = logging.getLogger("kata_ci.github")
RUNNER_DIR = "/opt/actions-runner"  # the runner image layer (images/runner_layer.py)
JIT_ENV = "ACTIONS_RUNNER_INPUT_JITCONFIG"  # the runner's documented input for --jitconfig
# The runner's work folder is the VM's workspace: the job's files go to the host's disk,
# under the worker's quota, not to the guest's RAM.
LAUNCH = f"""set -eu
ln -sfn "$KATA_CI_WORK" {RUNNER_DIR}/_work
cd {RUNNER_DIR}
exec ./run.sh
"""
MISSING = 3


@dataclass(frozen=True)
class Context:
    config: Config
    provider: VMProvider
    network: NetworkPolicy  # the label's
    workdir: Path
    cancel: Cancel  # hard: worker stopping, lease lost, `kata-ci cancel`
    state: GitHubState


def run(job: Job, entry: dict[str, object], sink: LogSink, ctx: Context) -> Outcome:
    """Run the runner to its Outcome; never raises for what GitHub or the guest did."""
    gh = ctx.config.github
    scope, set_key = str(entry.get("scope", "")), str(entry.get("label_set", ""))
    label_set = gh.label_set(set_key)
    if label_set is None:
        note(sink, f"job failed: label set {set_key!r} is no longer configured")
        return Outcome.job_failure("label set no longer configured")
    name = f"{gh.name_prefix}{job.id}"
    # Recorded before GitHub knows it: reconcile never takes it for an orphan.
    ctx.state.add_runner(name, {"name": name, "id": "", "scope": scope, "label_set": set_key,
                                "kata_job": job.id, "state": "registering",
                                "created_at": time.time(), "label": label_set.label})
    try:
        api = GitHubAPI(gh)
        runner_id, jit = _jit(api, scope, name, list(label_set.labels))
    except Exception as exc:  # no runner: GitHub's or the config's fault
        ctx.state.drop_pending(scope, set_key, job.id)
        ctx.state.runner_done(name, deregistered=1)
        note(sink, f"system failure: no runner could be registered: {exc}")
        return Outcome.system_failure(SystemFailure(f"no JIT config: {exc}"))
    ctx.state.set_runner(name, id=runner_id, state="starting")
    note(sink, f"runner {name} (id {runner_id}, labels {', '.join(label_set.labels)}) "
               f"registered for {scope}; starting its VM")
    script = RunnerScript(api, ctx, name, runner_id, scope, jit)
    size = ctx.config.labels.get(label_set.label, {})
    vm, limit = ctx.config.vm, ctx.config.queue.max_job_timeout
    spec = JobSpec(name=job.id, script=script, env=job_env(), workspace=ctx.workdir,
                   guest_workdir="/workspace", timeout=limit, grace=vm.grace,
                   boot_timeout=vm.boot_timeout, vcpus=size.get("vcpus", vm.vcpus),
                   memory_mib=size.get("memory_mib", vm.memory_mib), network=ctx.network,
                   secrets={JIT_ENV: jit}, mask=GITHUB_MASK)
    cancel = Cancel(poll=lambda: ctx.cancel.is_set() or script.idle_stop.is_set())
    try:
        outcome = run_job(spec, ctx.provider, sink, cancel)
    finally:
        script.stop_watch.set()
        gone = _deregister(api, scope, runner_id, name)
        ctx.state.drop_pending(scope, set_key, job.id)
        ctx.state.runner_done(name, deregistered=int(gone))
    # Deregistering an idle runner races its stop: GitHub's runner may notice first that its
    # registration is gone and exit 1. Either way this runner ran no job: cancelled, not failed.
    if script.idle_stop.is_set() and outcome.kind in (OutcomeKind.CANCELLED,
                                                      OutcomeKind.JOB_FAILURE):
        return Outcome.cancelled(f"runner {name} got no job within {gh.idle_timeout:g}s: "
                                 "deregistered and stopped")
    return outcome


def _jit(api: GitHubAPI, scope: str, name: str, labels: list[str]) -> tuple[int, str]:
    """A JIT config; a runner of the same name left by an earlier attempt of this job is
    removed first (unless busy: then this attempt gives up)."""
    try:
        return api.jit_config(scope, name, labels)
    except RunnerExists:
        for old in api.runners(scope, name):
            if old.name == name and not api.delete_runner(scope, old.id):
                raise SystemFailure(f"runner {name} exists and is busy") from None
        return api.jit_config(scope, name, labels)


def _deregister(api: GitHubAPI, scope: str, runner_id: int, name: str) -> bool:
    try:
        if api.delete_runner(scope, runner_id):
            return True
        log.warning("runner %s still busy at GitHub after its VM ended; reconcile removes it "
                    "once it is offline", name)
    except SystemFailure as exc:
        log.warning("runner %s not deregistered (%s); reconcile removes it", name, exc)
    return False


class _FirstOutput:
    """The runner's output into the job's log; its first byte says the runner is up."""

    def __init__(self, sink: LogSink, started: threading.Event) -> None:
        self.sink, self.started = sink, started

    def write(self, stream: Stream, data: bytes) -> None:
        self.started.set()
        self.sink.write(stream, data)


class RunnerScript:
    """The job script: start GitHub's runner in the VM and wait for it to end."""

    def __init__(self, api: GitHubAPI, ctx: Context, name: str, runner_id: int, scope: str,
                 jit: str) -> None:
        self.api, self.ctx, self.name, self.runner_id, self.scope = api, ctx, name, \
            runner_id, scope
        self.jit = jit
        self.idle_stop = threading.Event()
        self.stop_watch = threading.Event()
        self.started = threading.Event()

    def run(self, session: Session) -> Outcome:
        check = session.run(Command(["test", "-x", f"{RUNNER_DIR}/run.sh"]))
        if check.kind is not OutcomeKind.SUCCESS:
            raise SystemFailure(f"this host's VM images have no actions runner at {RUNNER_DIR}: "
                                "set [github] runner_tarball and run `kata-ci images build`")
        env = {**session.spec.env, JIT_ENV: self.jit, "RUNNER_ALLOW_RUNASROOT": "1",
               "KATA_CI_WORK": session.workdir}
        threading.Thread(target=self._watch, name=f"kata-ci-idle-{self.name}",
                         daemon=True).start()
        threading.Thread(target=self._up, daemon=True).start()
        return session.run(Command(["/bin/sh", "-c", LAUNCH], env=env),
                           sink=_FirstOutput(session.sink, self.started))

    def _up(self) -> None:
        if self.started.wait(self.ctx.config.queue.max_job_timeout) and \
                not self.stop_watch.is_set():
            self.ctx.state.set_runner(self.name, state="idle", started_at=time.time())

    def _watch(self) -> None:
        """After idle_timeout without a job: deregister (GitHub then gives it none), stop."""
        bound = self.ctx.config.github.idle_timeout
        if self.stop_watch.wait(bound):
            return
        if self.ctx.state.runner(self.name).get("state") == "busy":
            return
        try:
            seen = self.api.runner(self.scope, self.runner_id)
            if seen is not None and seen.busy:
                self.ctx.state.mark_busy(self.name, "")
                return
            if not self.api.delete_runner(self.scope, self.runner_id):
                self.ctx.state.mark_busy(self.name, "")  # took a job just now
                return
        except SystemFailure as exc:
            log.warning("runner %s idle past %ss, GitHub unreachable (%s): stopping it; "
                        "reconcile deregisters it", self.name, bound, exc)
        log.info("runner %s got no job within %ss: deregistered, stopping its VM", self.name,
                 bound)
        self.idle_stop.set()
