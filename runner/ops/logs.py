"""Operator logs: what kata-ci did, never what a job printed (that goes to the job's own
log stream only).

``text`` (the default) is one human line per record; ``json`` is JSON lines, one object per
record: ``time`` (RFC 3339, UTC), ``level``, ``logger``, ``message``, ``process``,
``thread``, and ``job_id``, ``source``, ``label`` whenever the line is about a job (the
thread's job context, context.py), or what the record names with ``extra=``. A traceback
rides in ``exc_info`` as one string, so that a line stays a line.
"""

from __future__ import annotations

import datetime
import json
import logging
import sys
from typing import Literal

from kata_ci.runner.ops import context

LogFormat = Literal["text", "json"]
FORMATS: tuple[LogFormat, ...] = ("text", "json")
JOB_FIELDS = ("job_id", "source", "label")


class JobFilter(logging.Filter):
    """Stamps the thread's job on each record, unless the record names one itself."""

    def filter(self, record: logging.LogRecord) -> bool:
        ctx = context.current()
        for field in JOB_FIELDS:
            if not hasattr(record, field):
                setattr(record, field, getattr(ctx, field) if ctx else "")
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        stamp = datetime.datetime.fromtimestamp(record.created, datetime.UTC)
        line: dict[str, object] = {
            "time": stamp.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
            "process": record.process,
            "thread": record.threadName,
        }
        for field in JOB_FIELDS:
            value = getattr(record, field, "")
            if value:
                line[field] = value
        if record.exc_info:
            line["exc_info"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=False, default=str)


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        job_id = getattr(record, "job_id", "")
        if job_id:
            head, _, rest = text.partition(f" {record.name} ")
            source, label = getattr(record, "source", ""), getattr(record, "label", "")
            text = f"{head} {record.name} [{source} {label} {job_id}] {rest}"
        return text


def configure(fmt: LogFormat = "text", level: int = logging.INFO) -> None:
    """The process's operator log on stderr (journald takes it from there under systemd),
    replacing any handler set before."""
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(JobFilter())
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    logging.captureWarnings(True)  # Python warnings as records: a JSON log stays JSON
    # Celery's and the HTTP libraries' chatter: warnings only (each request would be a line).
    for noisy in ("httpx", "httpcore", "urllib3", "uvicorn.access"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
