"""Prometheus metrics of the long-running processes (`worker`, `gitlab run`, `github serve`),
served at ``--metrics-listen HOST:PORT`` on ``/metrics``.

Names follow Prometheus' conventions (``kata_ci_`` prefix, base units, ``_total`` counters).
Cardinality is bounded by construction: no job ids, runner names or repositories as label
values; ``label`` is one the process was configured to serve (else ``other``: a job record
names its label, and whoever can write to Redis could invent them), ``source`` one of
queue/gitlab/github, ``outcome`` a job status, ``endpoint`` one of the GitLab API calls we
make, ``verdict``/``action`` words of ours. Every process has its own registry contents:
each exports what it does, plus the client's process and Python collectors (open fds,
memory, CPU), and ``kata_ci_redis_up``, judged at scrape time with a 1 s budget.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING

import redis
from prometheus_client import Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import REGISTRY, Collector
from redis.backoff import NoBackoff
from redis.retry import Retry

from kata_ci.errors import UserError
from kata_ci.runner.ops import context

if TYPE_CHECKING:
    from kata_ci.executors.base import VM

# Seconds: a job is a few seconds to hours; a restore a fraction of a second (KVM) to a few
# (TCG); a queue wait anything from nothing to a backlog of minutes.
JOB_BUCKETS = (1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600, 7200, 21600)
WAIT_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600)
VM_BUCKETS = (0.1, 0.25, 0.5, 0.75, 1, 1.5, 2, 3, 5, 7.5, 10, 20, 60)

JOBS_STARTED = Counter("kata_ci_jobs_started_total", "Jobs a worker began to run.",
                       ["source", "label"])
JOBS_FINISHED = Counter("kata_ci_jobs_finished_total",
                        "Jobs a worker ended, by outcome (a job status).",
                        ["source", "label", "outcome"])
JOB_DURATION = Histogram("kata_ci_job_duration_seconds",
                         "From the worker's claim to the job's ending.",
                         ["source", "label", "outcome"], buckets=JOB_BUCKETS)
QUEUE_WAIT = Histogram("kata_ci_job_queue_wait_seconds",
                       "From the job's creation (queued) to a worker's claim.",
                       ["source", "label"], buckets=WAIT_BUCKETS)
VM_START = Histogram("kata_ci_vm_start_seconds",
                     "From the VMM process start to the guest agent's answer.",
                     ["mode"], buckets=VM_BUCKETS)
VMS_RUNNING = Gauge("kata_ci_vms_running", "Job VMs running now in this process.")
WORKER_SLOTS = Gauge("kata_ci_worker_slots", "The worker's job slots: all of them, and busy.",
                     ["state"])
LOG_BYTES = Counter("kata_ci_job_log_bytes_total",
                    "Job output bytes stored (after masking), by source and label.",
                    ["source", "label"])
GITLAB_REQUESTS = Counter("kata_ci_gitlab_requests_total",
                          "Requests to GitLab's runner API, by endpoint and HTTP status "
                          "(`error`: no answer).", ["endpoint", "status"])
GITLAB_JOBS_TAKEN = Counter("kata_ci_gitlab_jobs_taken_total",
                            "Jobs GitLab handed to `gitlab run` and it queued.", ["label"])
WEBHOOK_DELIVERIES = Counter("kata_ci_github_webhook_deliveries_total",
                             "Webhook deliveries by verdict.", ["verdict"])
RECONCILE_ACTIONS = Counter("kata_ci_github_reconcile_actions_total",
                            "What reconcile rounds did: runners asked for, deregistered, "
                            "records closed, rounds failed or skipped (lock held).",
                            ["action"])
# Label values each metric may take, kept as constants so that callers cannot invent them.
SOURCES = ("queue", "gitlab", "github")
VERDICTS = ("accepted", "bad_signature", "duplicate", "ignored_label", "ignored_repo",
            "ignored_event", "ping", "updated", "already_requested", "deferred", "malformed",
            "too_large", "busy", "error")


def bounded(value: str, allowed: Iterable[str]) -> str:
    """``value`` if it is one of ``allowed``, else ``other``."""
    return value if value in set(allowed) else "other"


class RedisUp(Collector):
    """``kata_ci_redis_up``: 1 if the broker answered a PING within 1 s at scrape time.

    Its own client without retries: the process's client rides out outages by retrying for
    minutes, which is right for job state and wrong for a scrape."""

    def __init__(self, url: str) -> None:
        self.client = redis.Redis.from_url(url, socket_timeout=1, socket_connect_timeout=1,
                                           retry=Retry(NoBackoff(), 0))

    def collect(self) -> Iterator[Metric]:
        family = GaugeMetricFamily("kata_ci_redis_up",
                                   "1 if the Redis broker answered a PING within 1 s.")
        try:
            up = 1.0 if self.client.ping() else 0.0
        except (redis.RedisError, OSError):
            up = 0.0
        family.add_metric([], up)
        yield family


_redis_watched: set[str] = set()


def serve(listen: tuple[str, int] | None, broker: str | None = None) -> None:
    """Start the /metrics endpoint on (host, port) in a background thread (nothing when
    ``listen`` is None), with ``kata_ci_redis_up`` for ``broker``. Metrics carry no job
    data (no ids, no output, no names a job chooses), so they are served without a token;
    bind them where only the scraper reaches (loopback by default in the ansible units)."""
    if broker and broker not in _redis_watched:
        _redis_watched.add(broker)
        REGISTRY.register(RedisUp(broker))
    if listen is None:
        return
    host, port = listen
    try:
        start_http_server(port, addr=host)
    except OSError as exc:
        raise UserError(f"--metrics-listen {host}:{port}: {exc.strerror or exc}") from None


class JobMeter:
    """One job's metrics in the worker: started now, its output counted, ended once."""

    def __init__(self, source: str, label: str, labels: Iterable[str], created_at: float,
                 started_at: float) -> None:
        self.source = bounded(source, SOURCES)
        self.label = bounded(label, labels)
        self.started = time.monotonic()
        JOBS_STARTED.labels(self.source, self.label).inc()
        QUEUE_WAIT.labels(self.source, self.label).observe(max(0.0, started_at - created_at))
        self._bytes = LOG_BYTES.labels(self.source, self.label)

    def output(self, size: int) -> None:
        self._bytes.inc(size)

    def finished(self, outcome: str) -> None:
        JOBS_FINISHED.labels(self.source, self.label, outcome).inc()
        JOB_DURATION.labels(self.source, self.label, outcome).observe(
            time.monotonic() - self.started)


class VMMeter:
    """The provider's listener (executors/provider.py): VM start times by how the VM came to
    be, VMs running; and the VM-ready milestone of the job the thread works for."""

    def __init__(self, ready: Callable[[str, str], None] | None = None) -> None:
        self.ready = ready  # (job id, restore | cold): record the job's milestone

    def started(self, vm: VM) -> None:
        VMS_RUNNING.inc()
        times = vm.boot_times
        mode = "restore" if times is not None and times.restored else "cold"
        if times is not None:
            VM_START.labels(mode).observe(times.agent_healthy)
        job = context.current()
        if job is not None and self.ready is not None:
            self.ready(job.job_id, mode)

    def released(self, vm: VM) -> None:
        VMS_RUNNING.dec()
