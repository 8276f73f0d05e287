"""Options every long-running process takes (`worker`, `gitlab run`, `github serve`):
where its Prometheus metrics are served and how its operator log is written; and the one
parser of HOST:PORT options (also `github serve --listen`, `status --listen`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import click

from kata_ci.errors import UserError
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


def parse_listen(text: str, option: str, empty_host: str | None = None) -> tuple[str, int]:
    """An address option, ``HOST:PORT`` (``[::1]:PORT`` for IPv6), as (host, port); with
    ``empty_host``, ``:PORT`` or ``PORT`` means that host. A UserError naming the option
    otherwise."""
    host, _, port = text.rpartition(":")
    host = host.strip("[]") or (empty_host or "")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise UserError(f"{option} wants HOST:PORT (e.g. 127.0.0.1:8480), not {text!r}")
    return host, int(port)


def start_daemon(log_format: str, metrics_listen: str | None, broker: str) -> None:
    """Logging first (so that a bad --metrics-listen is told in the chosen format), then
    the metrics endpoint with the broker's reachability."""
    logs.configure("json" if log_format == "json" else "text")
    metrics.serve(None if metrics_listen is None
                  else parse_listen(metrics_listen, "--metrics-listen"), broker)
