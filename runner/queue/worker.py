"""The runner daemon: a Celery worker (Redis broker) that runs each job in a fresh microVM.

The Celery task stays thin: it receives a job id (JSON, nothing else) and hands it to
``Daemon.execute``. Job state lives in ``JobStore`` (Redis), which makes a job run at most once
however often Celery delivers its message. Operator logs go to the worker's log; job output
goes to the job's log stream only. The job itself runs through the same lifecycle as
`kata-ci run`; the workspace, unpacked into a private directory, appears at /workspace.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import socket
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kata_ci.errors import KataCIError, SystemFailure
from kata_ci.executors.provider import VMProvider, open_provider
from kata_ci.procs import pid_alive
from kata_ci.runner.core.command import Cancel
from kata_ci.runner.core.config import Config
from kata_ci.runner.core.env import job_env
from kata_ci.runner.core.lifecycle import run_job
from kata_ci.runner.core.outcome import JobStatus, Outcome
from kata_ci.runner.core.sinks import Stream, note
from kata_ci.runner.core.spec import Command, Commands, JobSpec
from kata_ci.runner.queue.app import TASK, make_app, queue_name
from kata_ci.runner.queue.store import Job, JobStore
from kata_ci.runner.queue.workspace import unpack

log = logging.getLogger("kata_ci.worker")
GUEST_WORKDIR = "/workspace"


class RedisSink:
    """Job output into the job's Redis log stream, as it arrives."""

    def __init__(self, store: JobStore, job_id: str) -> None:
        self.store = store
        self.job_id = job_id

    def write(self, stream: Stream, data: bytes) -> None:
        self.store.append_log(self.job_id, stream, data)


class Daemon:
    def __init__(self, config: Config, store: JobStore, name: str,
                 provider: VMProvider) -> None:
        self.config = config
        self.store = store
        self.name = name
        self.host = socket.gethostname()
        self.provider = provider

    def reap(self, requeue: Callable[[str, str], None]) -> list[str]:
        """At start: workspaces and jobs left by a worker on this host that died mid-job
        (its VMs were reaped when the provider opened). A job that allows it is queued again
        (once); others end as system_failure."""
        ended = []
        for job_id, owner in self.store.running_on_host(self.host).items():
            if pid_alive(owner.get("pid")):
                continue
            for leftover in Path(tempfile.gettempdir()).glob(f"kata-ci-{job_id}-*"):
                shutil.rmtree(leftover, ignore_errors=True)
            token = self.store.lease(job_id)
            if self.store.requeue_once(job_id, token, "retried: its first worker died"):
                self.store.append_log(job_id, "kata-ci", b"\n[kata-ci: the worker running this "
                                      b"job died; retrying once]\n")
                requeue(job_id, self.store.get(job_id).label)
                log.warning("job %s: its worker died; queued again (retry allowed)", job_id)
                continue
            if self.store.finish(job_id, token, JobStatus.SYSTEM_FAILURE.value, None,
                                 "the worker running this job died"):
                self.store.append_log(job_id, "kata-ci", b"\n[kata-ci: the worker running this "
                                      b"job died; its VM was removed]\n")
                ended.append(job_id)
                log.warning("job %s: its worker died; marked system_failure", job_id)
        return ended

    def execute(self, job_id: Any) -> None:
        if not isinstance(job_id, str) or not job_id.isalnum():
            log.error("rejected malformed job message: %r", job_id)
            return
        try:
            job = self.store.get(job_id)
        except KataCIError:
            log.error("rejected message for unknown job %s", job_id)
            return
        token = self.store.claim(job_id, self.name, self.host, os.getpid())
        if token is None:
            log.info("job %s is %s: duplicate delivery ignored", job_id, job.state)
            return
        log.info("job %s: running %s (attempt %s)", job_id, job.argv, token.rsplit(":", 1)[1])
        try:
            outcome = self._run(job)
        except Exception as exc:
            log.exception("job %s: unexpected error", job_id)
            outcome = Outcome.system_failure(SystemFailure(f"worker error: {exc!r}"))
        status = JobStatus.of(outcome)
        code = outcome.exit_code if outcome.ran_to_end else None
        if not self.store.finish(job_id, token, status.value, code, outcome.message):
            log.warning("job %s: lease lost before the ending could be recorded", job_id)
        log.info("job %s: %s %s", job_id, status.value, outcome.message)

    def spec(self, job: Job, workdir: Path) -> JobSpec:
        """The queued job as the lifecycle runs it: its label's VM size, its own timeout
        within the queue's maximum, and only the environment its submitter gave."""
        vm, size = self.config.vm, self.config.labels.get(job.label, {})
        limit = self.config.queue.max_job_timeout
        env = {str(k): str(v) for k, v in job.env.items()} if isinstance(job.env, dict) else {}
        return JobSpec(name=job.id, script=Commands([Command(job.argv)]), env=job_env(env),
                       workspace=workdir, guest_workdir=GUEST_WORKDIR,
                       timeout=min(job.timeout or limit, limit), grace=vm.grace,
                       boot_timeout=vm.boot_timeout, vcpus=size.get("vcpus", vm.vcpus),
                       memory_mib=size.get("memory_mib", vm.memory_mib))

    def _run(self, job: Job) -> Outcome:
        sink = RedisSink(self.store, job.id)
        packed = self.store.workspace(job.id)
        if packed is None:
            outcome = Outcome.system_failure(SystemFailure("the job's workspace is gone "
                                                           "from Redis"))
            note(sink, f"system failure: {outcome.message}")
            return outcome
        workdir = Path(tempfile.mkdtemp(prefix=f"kata-ci-{job.id}-"))
        try:
            unpack(packed, workdir)
            cancel = Cancel(poll=lambda: self.store.cancel_requested(job.id))
            return run_job(self.spec(job, workdir), self.provider, sink, cancel)
        finally:
            shutil.rmtree(workdir, ignore_errors=True)


def start_worker(config: Config, labels: list[str], concurrency: int) -> None:
    """Run the Celery worker in this process until it is stopped (blocks)."""
    store = JobStore.connect(config.queue.broker, config.queue.log_limit_mib << 20)
    name = f"kata-ci-{socket.gethostname()}-{os.getpid()}"
    # Images and acceleration once per worker, not per job: a worker without images refuses
    # to start instead of failing every job it takes.
    provider = open_provider(config.vm.accel, lambda m: log.warning("%s", m))
    daemon = Daemon(config, store, name, provider)
    app = make_app(config.queue.broker, config.queue.max_job_timeout)
    for job_id in daemon.reap(lambda job, label: app.send_task(TASK, args=[job],
                                                                queue=queue_name(label))):
        log.warning("reaped job %s", job_id)
    app.task(name=TASK, acks_late=True)(daemon.execute)
    with contextlib.suppress(KeyboardInterrupt):
        app.worker_main(["worker", "--pool=threads", f"--concurrency={concurrency}",
                         "-Q", ",".join(queue_name(lbl) for lbl in labels),
                         "-n", f"{name}@%h", "--without-gossip", "--without-mingle",
                         "--loglevel=INFO"])

