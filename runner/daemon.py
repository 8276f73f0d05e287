"""The runner daemon: a Celery worker (Redis broker) that runs each job in a fresh microVM.

The Celery task stays thin: it receives a job id (JSON, nothing else) and hands it to
``Daemon.execute``. Job state lives in ``JobStore`` (Redis), which makes a job run at most once
however often Celery delivers its message. Operator logs go to the worker's log; job output
goes to the job's log stream only.

Workspaces travel with the job: ``kata-ci submit`` packs the checkout as a tar.gz into Redis,
and the worker unpacks it into a private directory that becomes the VM's virtio-fs share at
/workspace. This needs no git server and ships uncommitted changes, as `kata-ci run` sees them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import logging
import os
import shutil
import socket
import tarfile
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from celery import Celery

from kata_ci import paths
from kata_ci.errors import KataCIError, SystemFailure, UserError
from kata_ci.executors.agent_client import StreamName
from kata_ci.executors.base import VMSpec
from kata_ci.executors.qemu.backend import QemuBackend, pid_alive, reap_orphans
from kata_ci.runner.config import Config
from kata_ci.runner.job import JobRequest, Outcome, OutcomeKind, run_job
from kata_ci.runner.jobstore import JobStore
from kata_ci.runner.local import acquire, guest_env

log = logging.getLogger("kata_ci.worker")
TASK = "kata_ci.run_job"
GUEST_WORKDIR = "/workspace"
MAX_WORKSPACE = 256 << 20
STATES = {OutcomeKind.SUCCESS: "success", OutcomeKind.JOB_FAILURE: "failed",
          OutcomeKind.TIMEOUT: "timeout", OutcomeKind.CANCELLED: "cancelled",
          OutcomeKind.SYSTEM_FAILURE: "system_failure"}


def queue_name(label: str) -> str:
    return f"kata-ci.{label}"


def make_app(broker_url: str, max_job_timeout: float) -> Celery:
    app = Celery("kata_ci", broker=broker_url, set_as_current=False)
    app.conf.update(
        task_serializer="json", accept_content=["json"], result_serializer="json",
        task_ignore_result=True,
        # Acked after the job ran: a worker lost mid-job leaves the message to come back, and
        # JobStore.claim turns that redelivery into a no-op.
        task_acks_late=True,
        worker_prefetch_multiplier=1,
        # Redis redelivers unacked messages after this: it must outlast the longest job.
        broker_transport_options={"visibility_timeout": int(max_job_timeout) + 3600},
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
        task_default_queue=queue_name("default"),
    )
    return app


class RedisSink:
    """Job output into the job's Redis log stream, as it arrives."""

    def __init__(self, store: JobStore, job_id: str) -> None:
        self.store = store
        self.job_id = job_id

    def write(self, stream: StreamName, data: bytes) -> None:
        self.store.append_log(self.job_id, stream, data)


class Daemon:
    def __init__(self, config: Config, store: JobStore, name: str, backend: QemuBackend,
                 base: VMSpec) -> None:
        self.config = config
        self.store = store
        self.name = name
        self.host = socket.gethostname()
        self.backend = backend
        self.base = base

    def reap(self, requeue: Callable[[str, str], None]) -> list[str]:
        """At start: VMs, workspaces and jobs left by a worker on this host that died
        mid-job. A job that allows it is queued again (once); others end as system_failure."""
        for vm_id in reap_orphans(paths.run_dir()):
            log.warning("removed VM %s left by a dead worker", vm_id)
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
            if self.store.finish(job_id, token, "system_failure", None,
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
            outcome = self._run(job_id, job.argv, job.timeout, job.label)
        except Exception as exc:
            log.exception("job %s: unexpected error", job_id)
            outcome = Outcome.system_failure(SystemFailure(f"worker error: {exc!r}"))
        if outcome.kind is OutcomeKind.SYSTEM_FAILURE:
            note = f"\n[kata-ci: system failure: {outcome.message}]\n{outcome.diagnostics}\n"
            self.store.append_log(job_id, "kata-ci", note.encode())
        code = outcome.exit_code if outcome.kind in (OutcomeKind.SUCCESS,
                                                     OutcomeKind.JOB_FAILURE) else None
        if not self.store.finish(job_id, token, STATES[outcome.kind], code, outcome.message):
            log.warning("job %s: lease lost before the ending could be recorded", job_id)
        log.info("job %s: %s %s", job_id, STATES[outcome.kind], outcome.message)

    def _run(self, job_id: str, argv: list[str], timeout: float, label: str) -> Outcome:
        packed = self.store.workspace(job_id)
        if packed is None:
            raise SystemFailure("the job's workspace is gone from Redis")
        workdir = Path(tempfile.mkdtemp(prefix=f"kata-ci-{job_id}-"))
        try:
            unpack(packed, workdir)
            base = self.base
            size = self.config.labels.get(label, {})
            spec = dataclasses.replace(base, workspace=workdir, guest_workdir=GUEST_WORKDIR,
                                       vcpus=size.get("vcpus", base.vcpus),
                                       memory_mib=size.get("memory_mib", base.memory_mib))
            limit = self.config.queue.max_job_timeout
            request = JobRequest(argv=argv, env=guest_env({}), cwd=GUEST_WORKDIR,
                                 timeout=min(timeout or limit, limit), grace=self.config.vm.grace)
            with self.backend.create(spec) as vm:
                try:
                    vm.start(self.config.vm.boot_timeout)
                except SystemFailure as exc:
                    return Outcome.system_failure(exc)
                outcome = run_job(vm, request, RedisSink(self.store, job_id),
                                  lambda: self.store.cancel_requested(job_id))
                if outcome.kind in (OutcomeKind.SUCCESS, OutcomeKind.JOB_FAILURE):
                    vm.stop()
                return outcome
        finally:
            shutil.rmtree(workdir, ignore_errors=True)


def pack(directory: Path) -> bytes:
    """The workspace as tar.gz; refused over MAX_WORKSPACE so Redis is not flooded."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz", compresslevel=3) as tar:
        tar.add(directory, arcname=".")
    data = buffer.getvalue()
    if len(data) > MAX_WORKSPACE:
        raise UserError(f"workspace {directory} packs to {len(data) >> 20} MiB, over the "
                        f"{MAX_WORKSPACE >> 20} MiB limit")
    return data


def unpack(data: bytes, into: Path) -> None:
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
        tar.extractall(into, filter="data")  # no absolute paths, no escaping links


def start_worker(config: Config, labels: list[str], concurrency: int) -> None:
    """Run the Celery worker in this process until it is stopped (blocks)."""
    store = JobStore.connect(config.queue.broker, config.queue.log_limit_mib << 20)
    name = f"kata-ci-{socket.gethostname()}-{os.getpid()}"
    # Images and acceleration once per worker, not per job: a worker without images refuses
    # to start instead of failing every job it takes.
    backend, base = acquire(config, lambda m: log.warning("%s", m))
    daemon = Daemon(config, store, name, backend, base)
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
