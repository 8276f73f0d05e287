"""The Celery app both sides share: `submit` sends through it, `worker` consumes from it.

JSON only; one queue per label; the task carries a job id and nothing else (the job itself
lives in the job store). Redis brokers go through ``transport.Transport``: a poison entry on a
queue's list is logged and skipped instead of stopping the worker.
"""

from __future__ import annotations

import ssl
from collections.abc import Callable
from urllib.parse import urlsplit

from celery import Celery

TASK = "kata_ci.run_job"
GUARDED_TRANSPORT = "kata_ci.runner.queue.transport:Transport"


def queue_name(label: str) -> str:
    return f"kata-ci.{label}"


def make_app(broker_url: str, max_job_timeout: float) -> Celery:
    app = Celery("kata_ci", broker=broker_url, set_as_current=False)
    app.conf.update(
        task_serializer="json", accept_content=["json"], result_serializer="json",
        task_ignore_result=True,
        # Acked after the job ran: a worker lost mid-job leaves the message to come back, and
        # JobStore.claim turns that redelivery into a no-op. Jobs of a lost worker are ended
        # by their lease (store.py), not by this redelivery.
        task_acks_late=True,
        worker_prefetch_multiplier=1,
        # Redis redelivers unacked messages after this: it must outlast the longest job.
        broker_transport_options={"visibility_timeout": int(max_job_timeout) + 3600},
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
        task_default_queue=queue_name("default"),
    )
    scheme = urlsplit(broker_url).scheme
    if scheme in ("redis", "rediss"):
        # An explicit transport overrides the URL's scheme, and kombu turns TLS on for the
        # scheme name only: say it for rediss, verifying the server as redis-py does.
        app.conf.broker_transport = GUARDED_TRANSPORT
        if scheme == "rediss":
            app.conf.broker_use_ssl = {"ssl_cert_reqs": ssl.CERT_REQUIRED}
    return app


def sender(broker_url: str, max_job_timeout: float) -> Callable[[str, str], None]:
    """Queue a job's message again (a lost job re-queued for its one retry); the app is made
    on first use, so commands that never re-queue never build it."""
    apps: list[Celery] = []

    def send(job_id: str, label: str) -> None:
        if not apps:
            apps.append(make_app(broker_url, max_job_timeout))
        apps[0].send_task(TASK, args=[job_id], queue=queue_name(label))

    return send
