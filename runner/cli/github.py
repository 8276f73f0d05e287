"""``kata-ci github serve|reconcile|status``: kata-ci as a provider of GitHub Actions runners.

``serve`` answers GitHub's ``workflow_job`` webhooks on ``/webhook`` (and ``/healthz``) and
runs the reconcile loop beside it; the runners themselves run on the workers of each label
set's kata-ci label (`kata-ci worker`). ``reconcile`` runs one round and says what it did;
``status`` shows kata-ci's runners and the workflow jobs it has seen.
"""

from __future__ import annotations

import datetime
import logging
import signal
import sys
import threading
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING

import click
from rich.console import Console
from rich.table import Table

from kata_ci.errors import UserError
from kata_ci.runner.cli.daemon_options import daemon_options, parse_listen, start_daemon
from kata_ci.runner.cli.queue import _usage_errors, config_option
from kata_ci.runner.core import config as config_mod

if TYPE_CHECKING:
    from kata_ci.runner.github_runner.state import GitHubState, Send
    from kata_ci.runner.queue.store import JobStore

out = Console(highlight=False)
log = logging.getLogger("kata_ci.github")


@click.group()
def github() -> None:
    """kata-ci as GitHub Actions runners: one ephemeral JIT runner per job, each in a VM."""


def _parts(config_path: Path | None) -> tuple[config_mod.Config, JobStore, GitHubState, Send]:
    from kata_ci.runner.github_runner.state import GitHubState
    from kata_ci.runner.queue.app import sender
    from kata_ci.runner.queue.store import JobStore

    cfg = config_mod.load(config_path)
    if not cfg.github.enabled:
        raise UserError(f"{cfg.source or 'the config'}: no [[github.label_sets]]: kata-ci "
                        "serves no GitHub runs-on labels")
    store = JobStore.connect(cfg.queue.broker, cfg.queue.log_limit_mib << 20,
                             retention=cfg.queue.retention,
                             requeue=sender(cfg.queue.broker, cfg.queue.max_job_timeout))
    return cfg, store, GitHubState(store.r), sender(cfg.queue.broker,
                                                    cfg.queue.max_job_timeout)


@github.command()
@click.option("--listen", default="127.0.0.1:8470", show_default=True,
              help="HOST:PORT of the webhook endpoint (put TLS in front of it).")
@click.option("--no-reconcile", is_flag=True, help="Only the webhook endpoint.")
@config_option
@daemon_options
@_usage_errors
def serve(listen: str, no_reconcile: bool, config_path: Path | None,
          metrics_listen: str | None, log_format: str) -> None:
    """Answer workflow_job webhooks and reconcile with GitHub (blocks)."""
    from kata_ci.runner.github_runner.api import GitHubAPI
    from kata_ci.runner.github_runner.reconcile import Reconciler, loop
    from kata_ci.runner.github_runner.server import WebhookServer
    from kata_ci.runner.github_runner.webhook import Webhooks

    cfg, store, state, send = _parts(config_path)
    start_daemon(log_format, metrics_listen, cfg.queue.broker)
    logging.getLogger("github").setLevel(logging.WARNING)
    hooks = Webhooks(cfg.github, cfg.github.webhook_secret(), store, state,
                     send, cfg.queue.max_job_timeout)

    def healthy() -> str | None:
        try:
            store.r.ping()
        except Exception as exc:
            return f"redis: {type(exc).__name__}"
        return None

    try:
        server = WebhookServer(parse_listen(listen, "--listen", empty_host="0.0.0.0"),
                               hooks, healthy)
    except OSError as exc:
        raise UserError(f"cannot listen on {listen}: {exc.strerror or exc}") from None
    stop = threading.Event()
    if not no_reconcile:
        reconciler = Reconciler(cfg, store, state, send, GitHubAPI(cfg.github))
        threading.Thread(target=loop, args=(reconciler, stop, lambda e: log.warning(
            "reconcile failed: %s", e)), name="kata-ci-reconcile", daemon=True).start()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    host, port = server.server_address[:2]
    log.info("serving GitHub webhooks on http://%s:%s/webhook (label sets: %s)", host, port,
             "; ".join(f"{s.key} -> {s.label}" for s in cfg.github.label_sets))
    server.serve_forever(poll_interval=0.2)
    server.server_close()
    sys.exit(0)


@github.command()
@config_option
@_usage_errors
def reconcile(config_path: Path | None) -> None:
    """One reconcile round: ask for missing runners, deregister orphans."""
    from kata_ci.errors import KataCIError
    from kata_ci.runner.github_runner.api import GitHubAPI
    from kata_ci.runner.github_runner.reconcile import Reconciler

    cfg, store, state, send = _parts(config_path)
    try:
        report = Reconciler(cfg, store, state, send, GitHubAPI(cfg.github)).once()
    except KataCIError as exc:
        raise UserError(f"reconcile: {exc}") from None
    if report.skipped:
        out.print("another kata-ci is reconciling right now; nothing done")
        return
    for key, count in report.queued.items():
        out.print(f"queued at GitHub: {count} for {key}")
    out.print(f"runners asked for: {len(report.created)}; deregistered: "
              f"{', '.join(report.deleted) or 'none'}; records closed: "
              f"{', '.join(report.closed) or 'none'}")


def _when(stamp: str) -> str:
    try:
        return datetime.datetime.fromtimestamp(float(stamp)).strftime("%H:%M:%S")
    except ValueError:
        return ""


@github.command()
@click.option("-n", "count", default=20, show_default=True, help="How many workflow jobs.")
@config_option
@_usage_errors
def status(count: int, config_path: Path | None) -> None:
    """kata-ci's live runners and the workflow jobs it has seen."""
    _, _, state, _ = _parts(config_path)
    runners = Table("runner", "id", "state", "label set", "kata-ci job", "created", "job",
                    title="runners")
    for r in state.live_runners():
        runners.add_row(r.get("name", ""), r.get("id", ""), r.get("state", ""),
                        r.get("label_set", ""), r.get("kata_job", ""),
                        _when(r.get("created_at", "")), r.get("github_job", ""))
    out.print(runners)
    jobs = Table("job", "repository", "workflow", "name", "status", "runner", "kata-ci job",
                 title="workflow jobs")
    for j in state.recent_jobs(count):
        jobs.add_row(j.get("id", ""), j.get("repo", ""), j.get("workflow", ""),
                     j.get("name", ""), j.get("status", "") + (
                         f" ({j['conclusion']})" if j.get("conclusion") else ""),
                     j.get("runner_name", ""), j.get("kata_job", ""))
    out.print(jobs)
