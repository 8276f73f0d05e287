"""The Celery app both sides share: `submit` sends through it, `worker` consumes from it.

JSON only; one queue per label; the task carries a job id and nothing else (the job itself
lives in the job store).
"""

from __future__ import annotations

from celery import Celery

TASK = "kata_ci.run_job"


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
