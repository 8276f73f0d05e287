"""The runner daemon: a Celery worker (Redis broker) that runs each job in a fresh microVM.

The Celery task stays thin: it receives a job id (JSON, nothing else; ``Daemon.task`` drops
anything else) and hands it to ``Daemon.execute``. Job state lives in ``JobStore`` (Redis),
which makes a job run at most once however often Celery delivers its message; a running job
holds a lease its heartbeat renews (lease.py), so a lost worker's job ends within a bounded
time wherever it ran. Operator logs go to the worker's log; job output
goes to the job's log stream only. The job itself runs through the same lifecycle as
`kata-ci run`; the workspace, unpacked into a private directory, appears at /workspace.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from celery.signals import worker_shutting_down

from kata_ci.errors import KataCIError, SystemFailure, UserError
from kata_ci.executors.network.netns import available as netns_unavailable
from kata_ci.executors.network.policy import NONE, NetworkPolicy
from kata_ci.executors.provider import VMProvider, open_provider
from kata_ci.procs import pid_alive
from kata_ci.runner.core.command import Cancel
from kata_ci.runner.core.config import Config, vm_sizes
from kata_ci.runner.core.env import job_env
from kata_ci.runner.core.lifecycle import run_job
from kata_ci.runner.core.outcome import JobStatus, Outcome, OutcomeKind
from kata_ci.runner.core.sinks import Stream, note
from kata_ci.runner.core.spec import Command, Commands, JobSpec, job_network
from kata_ci.runner.ops import context
from kata_ci.runner.ops.metrics import SOURCES, WORKER_SLOTS, JobMeter, VMMeter, bounded
from kata_ci.runner.queue import capacity, quota
from kata_ci.runner.queue.app import TASK, make_app, queue_name, sender
from kata_ci.runner.queue.lease import Heartbeat, Reaper
from kata_ci.runner.queue.store import Job, JobStore
from kata_ci.runner.queue.transport import shown
from kata_ci.runner.queue.workspace import Bounds, hand_over, unpack

log = logging.getLogger("kata_ci.worker")
GUEST_WORKDIR = "/workspace"
JOB_ID = re.compile(r"[0-9a-f]{16}")  # what JobStore.create hands out


class RedisSink:
    """Job output into the job's Redis log stream, as it arrives; with the claim's fencing
    token, dropped once the job is no longer this worker's (ended while it was cut off).
    The first byte the job writes is its first-output milestone; every byte is metered."""

    def __init__(self, store: JobStore, job_id: str, token: str = "",
                 meter: JobMeter | None = None) -> None:
        self.store = store
        self.job_id = job_id
        self.token = token
        self.meter = meter
        self._quiet = True

    def write(self, stream: Stream, data: bytes) -> None:
        if self._quiet and stream != "kata-ci" and data and self.token:
            self._quiet = False
            self.store.milestone(self.job_id, self.token, first_output_at=str(time.time()))
        self.store.append_log(self.job_id, stream, data, self.token)
        if self.meter is not None:
            self.meter.output(len(data))


class Daemon:
    def __init__(self, config: Config, store: JobStore, name: str,
                 provider: VMProvider) -> None:
        self.config = config
        self.store = store
        self.name = name
        self.host = socket.gethostname()
        self.provider = provider
        self.ttl = config.queue.lease_ttl
        # Set when the worker is asked to stop (SIGTERM, systemctl stop): running jobs are
        # cancelled (SIGTERM in the guest, grace, kill) and handed back (retry) or ended.
        self.stopping = threading.Event()
        self._warned_network: set[str] = set()
        self.busy = 0
        self._busy_lock = threading.Lock()
        self._slots: tuple[list[str], int] | None = None  # labels, concurrency once announced
        self.labels: list[str] = list(config.queue.labels)  # what metrics may name
        self._tokens: dict[str, str] = {}  # job id -> fencing token, while it runs here
        provider.listen(VMMeter(self._vm_ready))

    def _vm_ready(self, job_id: str, mode: str) -> None:
        token = self._tokens.get(job_id)
        if token:
            self.store.milestone(job_id, token, vm_ready_at=str(time.time()), vm_start=mode)

    @contextlib.contextmanager
    def _busy(self) -> Iterator[None]:
        self._count(+1)
        try:
            yield
        finally:
            self._count(-1)

    def _count(self, change: int) -> None:
        """A slot taken or freed, told at once (a poller must not see a stale free slot)."""
        with self._busy_lock:
            self.busy += change
            WORKER_SLOTS.labels("busy").set(self.busy)
            if self._slots:
                with contextlib.suppress(Exception):
                    capacity.announce(self.store.r, self.name, *self._slots, self.busy, self.ttl)

    def announce(self, labels: list[str], concurrency: int) -> None:
        """Tell Redis this worker's free slots, every lease_ttl/3 until it stops: `gitlab
        run` takes a job from GitLab only while a worker of its label has one free."""
        def loop() -> None:
            while not self.stopping.wait(self.ttl / 3):
                with contextlib.suppress(Exception), self._busy_lock:  # never a stale count
                    capacity.announce(self.store.r, self.name, labels, concurrency, self.busy,
                                      self.ttl)
            with contextlib.suppress(Exception):
                capacity.withdraw(self.store.r, self.name)

        self._slots = (labels, concurrency)
        WORKER_SLOTS.labels("total").set(concurrency)
        WORKER_SLOTS.labels("busy").set(self.busy)
        self.labels = list(labels)
        capacity.announce(self.store.r, self.name, labels, concurrency, self.busy, self.ttl)
        threading.Thread(target=loop, name="kata-ci-announce", daemon=True).start()

    def reap(self) -> list[str]:
        """At start: workspaces and jobs left by a worker on this host that died mid-job
        (its VMs were reaped when the provider opened). Its jobs still running end at once
        rather than when their lease runs out: queued again once if they allow it, else
        system_failure. Jobs a lease expiry already ended get their workspace removed."""
        ended = []
        for job_id, owner in self.store.running_on_host(self.host).items():
            if pid_alive(owner.get("pid")):
                continue
            for leftover in Path(tempfile.gettempdir()).glob(f"kata-ci-{job_id}-*"):
                quota.discard(leftover)  # unmounted first if its quota was still mounted
            token = str(owner.get("token", ""))  # '' (an older entry): only once expired
            state = self.store.end_stranded(job_id, "the worker running this job died", token)
            self.store.forget(job_id, self.host)
            if state:
                ended.append(job_id)
                log.warning("job %s: its worker died; %s", job_id, state)
        return ended

    def task(self, *args: object, **kwargs: object) -> None:
        """The Celery task. A message is anyone's who can write to Redis: its arguments are
        checked before use, and a bad one is logged and dropped."""
        if kwargs or len(args) != 1 or not isinstance(args[0], str) \
                or not JOB_ID.fullmatch(args[0]):
            log.error("rejected malformed job message: args=%s kwargs=%s", shown(args),
                      shown(kwargs))
            return
        self.execute(args[0])

    def execute(self, job_id: str) -> None:
        try:
            job = self.store.get(job_id)
        except KataCIError:
            log.error("rejected message for unknown job %s", job_id)
            return
        except (KeyError, ValueError, TypeError) as exc:  # a record not written by `submit`
            log.error("rejected message for job %s: unreadable record (%r)", job_id, exc)
            return
        with context.job(job_id, bounded(job.source, SOURCES), bounded(job.label, self.labels)):
            self._execute(job)

    def _execute(self, job: Job) -> None:
        job_id = job.id
        if self.stopping.is_set() and job.state == "queued" and self.store.requeue is not None:
            # Handed to the pool as the stop came: not started here, its message sent anew
            # for the next worker (this one no longer consumes). The job stays queued.
            self.store.requeue(job_id, job.label)
            log.info("job %s: worker stopping; message sent back to the queue", job_id)
            return
        token = self.store.claim(job_id, self.name, self.host, os.getpid(), self.ttl)
        if token is None:
            log.info("job %s is %s: duplicate delivery ignored", job_id, job.state)
            return
        log.info("job %s: running %s (attempt %s)", job_id, shown(job.argv),
                 token.rsplit(":", 1)[1])
        meter = JobMeter(job.source, job.label, self.labels, job.created_at, time.time())
        self._tokens[job_id] = token
        with Heartbeat(self.store, job_id, token, self.ttl) as beat:
            try:
                outcome = self._run(job, token, beat, meter)
            except Exception as exc:
                log.exception("job %s: unexpected error", job_id)
                outcome = Outcome.system_failure(SystemFailure(f"worker error: {exc!r}"))
            finally:
                self._tokens.pop(job_id, None)
        meter.finished(JobStatus.of(outcome).value)
        if beat.lost.is_set():
            self.store.forget(job_id, self.host)
            log.warning("job %s: its lease was lost; whoever ended it recorded the ending", job_id)
            return
        if self.stopping.is_set() and outcome.kind is OutcomeKind.CANCELLED:
            state = self.store.end_stranded(job_id, "the worker running it was stopped", token)
            self.store.forget(job_id, self.host)
            log.warning("job %s: stopped with its worker: %s", job_id, state)
            return
        status = JobStatus.of(outcome)
        code = outcome.exit_code if outcome.ran_to_end else None
        if not self.store.finish(job_id, token, status.value, code, outcome.message,
                                 outcome.reason):
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
                       memory_mib=size.get("memory_mib", vm.memory_mib),
                       network=job_network(self.network(job.label), env, f"job {job.id}"))

    def network(self, label: str) -> NetworkPolicy:
        """The label's policy; without root (no namespaces) only ``none``, said once."""
        policy = self.config.policy(label)
        why_not = netns_unavailable()
        if policy.nic and why_not:
            if label not in self._warned_network:
                self._warned_network.add(label)
                log.warning("label %s: network %s is not possible (%s); jobs run without "
                            "a NIC", label, policy.mode, why_not)
            return NONE
        return policy

    @contextlib.contextmanager
    def _workdir(self, job: Job) -> Iterator[Path]:
        """The job's empty, private workspace under the worker's quota, removed after."""
        workdir = Path(tempfile.mkdtemp(prefix=f"kata-ci-{job.id}-"))
        try:
            with quota.limited(workdir, self.config.queue.workspace_quota_mib):
                yield workdir
        finally:
            quota.discard(workdir)

    def _run(self, job: Job, token: str, beat: Heartbeat, meter: JobMeter) -> Outcome:
        sink = RedisSink(self.store, job.id, token, meter)
        with self._busy():
            if job.source == "gitlab":
                return self._run_gitlab(job, sink, beat)
            if job.source == "github":
                return self._run_github(job, sink, beat)
            return self._run_queued(job, sink, beat)

    def _run_github(self, job: Job, sink: RedisSink, beat: Heartbeat) -> Outcome:
        """A unit of GitHub demand: one JIT runner in one VM, its workspace empty."""
        from kata_ci.runner.github_runner import execute
        from kata_ci.runner.github_runner.state import GitHubState

        entry = self.store.github(job.id)
        if entry is None:
            note(sink, "system failure: the job's GitHub entry is gone from Redis")
            return Outcome.system_failure(SystemFailure("the GitHub entry is gone"))
        with self._workdir(job) as workdir:
            hand_over(workdir)
            ctx = execute.Context(
                config=self.config, provider=self.provider, network=self.network(job.label),
                workdir=workdir,
                cancel=Cancel(poll=lambda: beat.lost.is_set() or self.stopping.is_set()
                              or self.store.cancel_requested(job.id)),
                state=GitHubState(self.store.r))
            return execute.run(job, entry, sink, ctx)

    def _run_gitlab(self, job: Job, sink: RedisSink, beat: Heartbeat) -> Outcome:
        """A job GitLab handed to `gitlab run`: its workspace is made from the payload."""
        from kata_ci.runner.gitlab_runner import execute

        entry = self.store.gitlab(job.id)
        if entry is None:
            note(sink, "system failure: the job's GitLab payload is gone from Redis")
            return Outcome.system_failure(SystemFailure("the GitLab payload is gone"))
        with self._workdir(job) as workdir:
            def stop() -> bool:
                return beat.lost.is_set() or self.stopping.is_set()

            ctx = execute.Context(
                config=self.config, provider=self.provider, label=job.label,
                network=self.network(job.label), workdir=workdir,
                cancel=Cancel(poll=lambda: stop() or self.store.cancel_requested(
                    job.id, hard_only=True)),
                graceful=Cancel(poll=lambda: self.store.cancel_requested(job.id)))
            return execute.run(entry, sink, ctx)

    def _run_queued(self, job: Job, sink: RedisSink, beat: Heartbeat) -> Outcome:
        packed = self.store.workspace(job.id)
        if packed is None:
            outcome = Outcome.system_failure(SystemFailure("the job's workspace is gone "
                                                           "from Redis"))
            note(sink, f"system failure: {outcome.message}")
            return outcome
        with self._workdir(job) as workdir:
            try:
                unpack(packed, workdir, Bounds.of(self.config.queue))
                hand_over(workdir)
                spec = self.spec(job, workdir)
            except UserError as exc:  # a hostile archive, a wider network: the submitter's
                note(sink, f"job failed: {exc}")
                return Outcome.job_failure(str(exc))
            cancel = Cancel(poll=lambda: beat.lost.is_set() or self.stopping.is_set()
                            or self.store.cancel_requested(job.id))
            return run_job(spec, self.provider, sink, cancel)


def start_worker(config: Config, labels: list[str], concurrency: int,
                 quiet: bool = False) -> None:
    """Run the Celery worker in this process until it is stopped (blocks). ``quiet``: no
    banner on stdout (JSON operator logs are lines of JSON only)."""
    quota.check(config.queue.workspace_quota_mib)  # refuse to start without enforcing it
    store = JobStore.connect(config.queue.broker, config.queue.log_limit_mib << 20,
                             retention=config.queue.retention,
                             requeue=sender(config.queue.broker, config.queue.max_job_timeout))
    name = f"kata-ci-{socket.gethostname()}-{os.getpid()}"
    # Images and acceleration once per worker, not per job: a worker without images refuses
    # to start instead of failing every job it takes.
    provider = open_provider(config.vm.accel, lambda m: log.warning("%s", m),
                             config.vm.max_file_size, config.vm.start,
                             config.images.registries(), config.images.pull_policy)
    # Templates before the first job, so that it starts as fast as the rest.
    try:
        for key in provider.prepare(vm_sizes(config, labels)):
            log.info("VM template %s ready", key)
    except KataCIError as exc:  # jobs try again, and boot cold if it keeps failing
        log.warning("VM templates not built: %s", exc)
    if provider.why:
        log.warning("VMs boot cold: %s", provider.why)
    daemon = Daemon(config, store, name, provider)
    app = make_app(config.queue.broker, config.queue.max_job_timeout)
    for job_id in daemon.reap():
        log.warning("reaped job %s", job_id)
    Reaper(store, config.queue.lease_ttl).start()  # other workers' lost jobs, all along
    daemon.announce(labels, concurrency)
    app.task(name=TASK, acks_late=True)(daemon.task)
    worker_shutting_down.connect(lambda **_: daemon.stopping.set(), weak=False)
    with contextlib.suppress(KeyboardInterrupt):
        app.worker_main([*(["--quiet"] if quiet else []),  # celery's option, before `worker`
                         "worker", "--pool=threads", f"--concurrency={concurrency}",
                         "-Q", ",".join(queue_name(lbl) for lbl in labels),
                         "-n", f"{name}@%h", "--without-gossip", "--without-mingle",
                         "--loglevel=INFO"])

