"""The job the current thread works for: job id, source and label, on every operator log
line and metric a worker writes while running it (logs.py, metrics.py).

A ``ContextVar``: each worker thread runs one job at a time, and a thread a job starts
(heartbeat, log pumps) is given the context with ``spawn`` so that its lines carry the job
too. Nothing here comes from the job: the id is ours, the source one of three words, the
label a configured one.
"""

from __future__ import annotations

import contextlib
import contextvars
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass


@dataclass(frozen=True)
class JobContext:
    job_id: str
    source: str  # queue | gitlab | github | local
    label: str


_current: contextvars.ContextVar[JobContext | None] = contextvars.ContextVar(
    "kata_ci_job", default=None)


def current() -> JobContext | None:
    return _current.get()


@contextlib.contextmanager
def job(job_id: str, source: str, label: str) -> Iterator[JobContext]:
    """Within: this thread works for that job."""
    ctx = JobContext(job_id, source, label)
    token = _current.set(ctx)
    try:
        yield ctx
    finally:
        _current.reset(token)


def spawn(target: Callable[[], None], name: str) -> threading.Thread:
    """A daemon thread that runs in a copy of the caller's context (its job, if any)."""
    copied = contextvars.copy_context()
    thread = threading.Thread(target=lambda: copied.run(target), name=name, daemon=True)
    thread.start()
    return thread
