"""Workers' free slots in Redis: how `gitlab run` (and later the GitHub runner) knows
whether a label can start a job now, so that a job is taken from a platform only when a
worker will start it at once.

  kataci:worker:<name>  hash: labels (JSON), concurrency, busy; expires unless its worker
                        renews it (a dead worker has no free slots)
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import cast

import redis

from kata_ci.runner.queue.store import PREFIX


def announce(r: redis.Redis, worker: str, labels: Sequence[str], concurrency: int, busy: int,
             ttl: float) -> None:
    """``worker`` serves ``labels`` with ``concurrency`` slots, ``busy`` of them taken;
    forgotten unless renewed within ``ttl`` s."""
    key = f"{PREFIX}worker:{worker}"
    pipe = r.pipeline()
    pipe.hset(key, mapping={"labels": json.dumps(list(labels)),
                            "concurrency": str(concurrency), "busy": str(busy)})
    pipe.pexpire(key, max(1, int(ttl * 1000)))
    pipe.execute()


def withdraw(r: redis.Redis, worker: str) -> None:
    r.delete(f"{PREFIX}worker:{worker}")


def free_slots(r: redis.Redis, label: str, queue_key: str) -> int:
    """Slots of the live workers serving ``label`` not taken by a running job or by a
    message still waiting in its Celery queue (the Redis list ``queue_key``)."""
    free = 0
    for key in r.scan_iter(f"{PREFIX}worker:*", count=200):
        raw = cast(dict[bytes, bytes], r.hgetall(key))
        try:
            if label in json.loads(raw.get(b"labels", b"[]")):
                free += int(raw.get(b"concurrency", b"0")) - int(raw.get(b"busy", b"0"))
        except (ValueError, TypeError):
            continue
    return free - int(r.llen(queue_key))
