"""Options every long-running process takes (`worker`, `gitlab run`, `github serve`):
where its Prometheus metrics are served and how its operator log is written."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import click

from kata_ci.runner.ops import logs, metrics

F = TypeVar("F", bound=Callable[..., object])


def daemon_options(func: F) -> F:
    func = click.option(
        "--metrics-listen", metavar="HOST:PORT",
        help="Serve Prometheus metrics on http://HOST:PORT/metrics (default: not served). "
             "They hold no job data; bind where only the scraper reaches.")(func)
    func = click.option(
        "--log-format", type=click.Choice(logs.FORMATS), default="text", show_default=True,
        help="Operator log on stderr: text lines, or JSON lines with job_id/source/label "
             "on every line about a job. Job output never goes there.")(func)
    return func


def start_daemon(log_format: str, metrics_listen: str | None, broker: str) -> None:
    """Logging first (so that a bad --metrics-listen is told in the chosen format), then
    the metrics endpoint with the broker's reachability."""
    logs.configure("json" if log_format == "json" else "text")
    if metrics_listen is not None:
        metrics.parse_listen(metrics_listen)  # a bad value is refused before anything starts
    metrics.serve(metrics_listen, broker)
