"""The worker's side of leases (store.py holds the rules): a heartbeat per running job, and a
reaper per worker that ends the jobs of workers that are gone.

Timing, with ``ttl`` = ``[queue] lease_ttl``: a heartbeat every ttl/3 s, so two can be missed
(a busy host, a Redis blip) before the lease runs out; every live worker scans for passed
leases every ttl/3 s. A job whose worker dies is therefore ended at most 4/3 x ttl after its
last heartbeat (40 s with the default 30 s), by any worker still serving the queue, or sooner
by `logs -f` / `cancel` of that job. A Redis outage longer than ttl can end jobs that were
running fine: their heartbeats could not land either.
"""

from __future__ import annotations

import contextvars
import logging
import threading

from kata_ci.runner.queue.store import JobStore

log = logging.getLogger("kata_ci.worker")


def interval(ttl: float) -> float:
    return ttl / 3


class Heartbeat:
    """Renews one job's lease until stopped. ``lost`` is set once the store refuses the
    renewal: the job was ended or given to another attempt, and its VM must be stopped."""

    def __init__(self, store: JobStore, job_id: str, token: str, ttl: float) -> None:
        self.store = store
        self.job_id = job_id
        self.token = token
        self.ttl = ttl
        self.lost = threading.Event()
        self._stop = threading.Event()
        # In the job's context (ops/context.py): its log lines name the job like the rest.
        self._thread = threading.Thread(target=contextvars.copy_context().run,
                                        args=(self._run,), name=f"lease-{job_id}", daemon=True)

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(interval(self.ttl)):
            try:
                if not self.store.renew(self.job_id, self.token, self.ttl):
                    log.warning("job %s: lease lost (ended by someone else): stopping it",
                                self.job_id)
                    self.lost.set()
                    return
            except Exception:  # Redis gone past the client's retries: try again next beat
                log.exception("job %s: lease renewal failed", self.job_id)


class Reaper:
    """Every ttl/3 s, ends the running jobs whose lease has passed (any worker's)."""

    def __init__(self, store: JobStore, ttl: float) -> None:
        self.store = store
        self.ttl = ttl
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="lease-reaper", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.wait(interval(self.ttl)):
            try:
                for job_id, state in self.store.reap_expired():
                    log.warning("job %s: its worker stopped renewing its lease: %s", job_id,
                                state if state != "queued" else "queued again (retry)")
            except Exception:  # Redis down: the next round tries again
                log.exception("lease reaper: scan failed")
