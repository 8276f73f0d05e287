"""The Redis transport the worker consumes through: kombu's, made to survive poison entries.

Anyone who can reach Redis can LPUSH anything onto a queue's list. Stock kombu 5.7 pops the
entry and then parses it inside the consumer's event loop: a non-JSON entry, a JSON value
that is not a message object, or a message whose fields have the wrong types stops the
Celery worker ("Unrecoverable error", exit status 0) or throws it into a reconnect; a
well-formed envelope with a malformed Celery body (a task name that is a list, a time limit
that is a string...) does the same from inside Celery's task strategy. One entry then takes a
worker off the queue, and the jobs behind it wait for nobody.

Here every entry is checked once where it is taken off the list: whatever is not a message
this worker can take, or whatever makes the handling of one message raise, is logged and
dropped, and the worker goes on to the next entry. Broker (connection) errors still
propagate: Celery's reconnect logic owns those.
"""

from __future__ import annotations

import base64
import binascii
import functools
import logging
from collections.abc import Callable
from queue import Empty
from typing import Any

import redis
from kombu.transport import redis as kombu_redis

log = logging.getLogger("kata_ci.queue")
SHOWN = 160  # bytes of a dropped entry shown in the log: enough to find its sender


def shown(value: object) -> str:
    """A value for the log, cut to SHOWN characters."""
    text = repr(value)
    return text if len(text) <= SHOWN else text[:SHOWN] + "..."


def problem(raw: object) -> str | None:
    """Why a decoded queue entry is not a kombu message (the shape kombu itself publishes:
    body, content type and encoding, headers, properties with a delivery tag and info), or
    None when it is one."""
    if not isinstance(raw, dict):
        return f"a JSON {type(raw).__name__}, not a message object"
    props = raw.get("properties")
    if not isinstance(props, dict):
        return "no properties object"
    if not isinstance(props.get("delivery_tag"), str):
        return "no string delivery_tag"
    info = props.get("delivery_info")
    if not isinstance(info, dict) or not all(isinstance(info.get(k), str)
                                             for k in ("exchange", "routing_key")):
        return "no delivery_info with exchange and routing_key"
    for key in ("content-type", "content-encoding"):
        if raw.get(key) is not None and not isinstance(raw[key], str):
            return f"{key} is not a string"
    if raw.get("headers") is not None and not isinstance(raw["headers"], dict):
        return "headers is not an object"
    body, encoding = raw.get("body"), props.get("body_encoding")
    if body is not None and not isinstance(body, str):
        return "body is not a string"
    if encoding not in (None, "base64"):
        return f"unknown body_encoding {shown(encoding)}"
    if encoding == "base64" and body:
        try:
            base64.b64decode(body, validate=True)
        except (binascii.Error, ValueError):
            return "body is not base64"
    return None


class QoS(kombu_redis.QoS):
    def restore_by_tag(self, tag: Any, client: Any = None, leftmost: bool = False) -> None:
        """A live worker moves unacked messages of a lost one back to their queue: an entry
        planted in the unacked hash that is not a [message, exchange, key] triple is dropped
        instead of failing every restore pass (and the real messages after it)."""
        try:
            super().restore_by_tag(tag, client, leftmost)  # type: ignore[no-untyped-call]
        except (redis.RedisError, *self.channel.connection_errors):
            raise
        except Exception as exc:
            log.error("dropped unacked entry %s that is not a message: %s", shown(tag), exc)
            self._remove_from_indices(tag).execute()  # type: ignore[no-untyped-call]


class Channel(kombu_redis.Channel):
    QoS = QoS

    def _brpop_read(self, **options: Any) -> bool:
        # kombu decodes the popped entry here, before any consumer sees it: an entry that is
        # not JSON (or whose JSON its type hooks refuse) is already off the list; skip it.
        try:
            return bool(super()._brpop_read(**options))  # type: ignore[no-untyped-call]
        except (Empty, redis.RedisError, *self.connection_errors):  # Empty: nothing popped
            raise
        except Exception as exc:
            log.error("skipped queue entry: not a message (%s)", exc)
            return True

    def basic_consume(self, queue: str, *args: Any, **kwargs: Any) -> Any:
        if "callback" in kwargs:
            kwargs["callback"] = functools.partial(self._handle, kwargs["callback"], queue)
        ret = super().basic_consume(queue, *args, **kwargs)  # type: ignore[no-untyped-call]
        deliver = self.connection._callbacks[queue]
        self.connection._callbacks[queue] = functools.partial(self._check, deliver, queue)
        return ret

    def _check(self, deliver: Callable[[Any], Any], queue: str, raw: Any) -> None:
        """Before kombu builds a Message of the entry: only message-shaped ones go on."""
        why = problem(raw)
        if why is not None:
            log.error("skipped queue entry on %s: %s: %s", queue, why, shown(raw))
            return
        try:
            deliver(raw)
        except (redis.RedisError, *self.connection_errors):
            raise
        except Exception as exc:  # building the Message; the consumer's own errors are below
            log.error("skipped queue entry on %s: %r: %s", queue, exc, shown(raw))

    def _handle(self, callback: Callable[[Any], Any], queue: str, message: Any) -> Any:
        """Celery's handling of one message (decode, task strategy): if it raises, the message
        is rejected (dropped, not requeued) and logged, and the worker consumes on."""
        try:
            return callback(message)
        except (redis.RedisError, *self.connection_errors):
            raise
        except Exception as exc:
            log.error("skipped message on %s that the worker cannot handle: %r: %s", queue,
                      exc, shown(getattr(message, "_raw", message)))
            if not message.acknowledged:
                message.reject(requeue=False)
            return None


class Transport(kombu_redis.Transport):
    Channel = Channel
