"""Queue commands: ``kata-ci worker``, ``submit``, ``jobs``, ``logs``, ``cancel``.

``submit`` exits like ``run``: the job's status, 124 timeout, 125 system failure, 130
cancelled (Ctrl-C while following cancels the job), 2 bad input (nothing was queued).
"""

from __future__ import annotations

import datetime
import sys
import time
from pathlib import Path

import click
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from kata_ci.errors import UserError
from kata_ci.runner.cli.daemon_options import daemon_options, start_daemon
from kata_ci.runner.core import config as config_mod
from kata_ci.runner.core.env import parse_env, user_term
from kata_ci.runner.core.outcome import EXIT_CANCELLED, FINAL, JobStatus, exit_status
from kata_ci.runner.core.sinks import TerminalSink, stream_named
from kata_ci.runner.core.spec import check_workspace
from kata_ci.runner.github_runner.state import GitHubState
from kata_ci.runner.queue.store import JobStore

err = Console(stderr=True, highlight=False)
EXIT_USAGE = 2
TERMINAL = TerminalSink()  # stored "kata-ci" notes go to stderr, like the job's stderr
config_option = click.option("--config", "config_path", type=click.Path(path_type=Path),
                             help="TOML config file (default: ~/.config/kata-ci/config.toml).")


def _store(config_path: Path | None) -> tuple[config_mod.Config, JobStore]:
    """The job store, able to queue again a lost job that allows a retry: `logs -f` and
    `cancel` end a job whose worker is gone the way a worker's reaper would."""
    from kata_ci.runner.queue.app import sender

    cfg = config_mod.load(config_path)
    return cfg, JobStore.connect(cfg.queue.broker, cfg.queue.log_limit_mib << 20,
                                 retention=cfg.queue.retention,
                                 requeue=sender(cfg.queue.broker, cfg.queue.max_job_timeout))


def _usage_errors(func: click.decorators.FC) -> click.decorators.FC:
    """UserError -> one red line and exit 2, for every queue command."""
    import functools

    @functools.wraps(func)
    def wrapper(*args: object, **kwargs: object) -> object:
        try:
            return func(*args, **kwargs)
        except UserError as exc:
            err.print(f"[bold red]kata-ci:[/] {escape(str(exc))}", soft_wrap=True)
            sys.exit(EXIT_USAGE)

    return wrapper  # type: ignore[return-value]


@click.command()
@click.option("-l", "--label", "labels", multiple=True, help="Label to serve (repeatable).")
@click.option("-c", "--concurrency", type=int, help="VMs this host may run at once.")
@config_option
@daemon_options
@_usage_errors
def worker(labels: tuple[str, ...], concurrency: int | None, config_path: Path | None,
           metrics_listen: str | None, log_format: str) -> None:
    """Consume jobs from the queue and run each in a fresh microVM."""
    from kata_ci.runner.queue.worker import start_worker

    cfg = config_mod.load(config_path)
    count = concurrency or cfg.queue.concurrency
    if count < 1:
        raise UserError(f"concurrency must be >= 1, not {count}")
    start_daemon(log_format, metrics_listen, cfg.queue.broker)
    start_worker(cfg, list(labels) or cfg.queue.labels, count, quiet=log_format == "json")


@click.command()
@click.option("-C", "--workspace", type=click.Path(path_type=Path), default=".",
              show_default=True, help="Directory packed and shipped with the job.")
@click.option("--label", default="default", show_default=True, help="Route to workers of it.")
@click.option("--timeout", type=float, help="Seconds before the job is stopped.")
@click.option("--detach", is_flag=True, help="Print the job id and return at once.")
@click.option("--retry", is_flag=True,
              help="Run again once if its worker is lost mid-job (killed, host gone, "
                   "stopped); else such a job ends as system failure.")
@click.option("-e", "--env", "env_items", multiple=True, metavar="NAME[=VALUE]",
              help="Set a variable in the job (NAME alone passes this host's value).")
@config_option
@click.argument("command", nargs=-1, required=True)
@_usage_errors
def submit(workspace: Path, label: str, timeout: float | None, detach: bool, retry: bool,
           env_items: tuple[str, ...], config_path: Path | None,
           command: tuple[str, ...]) -> None:
    """Queue COMMAND as a job and follow its log: kata-ci submit -- make test"""
    from kata_ci.runner.queue.app import TASK, make_app, queue_name
    from kata_ci.runner.queue.workspace import Bounds, pack

    env = parse_env(env_items)
    term = user_term()  # the log is followed here: the job sees this terminal's TERM
    if term and "TERM" not in env:
        env["TERM"] = term
    cfg, store = _store(config_path)
    limit = cfg.queue.max_job_timeout
    timeout = cfg.vm.timeout if timeout is None else timeout
    if not 0 <= timeout <= limit:
        raise UserError(f"--timeout must be between 0 and the max job timeout {limit:g}s")
    packed = pack(check_workspace(workspace), Bounds.of(cfg.queue))
    job = store.create(command, label, timeout or limit, packed, retry=retry, env=env)
    make_app(cfg.queue.broker, limit).send_task(TASK, args=[job.id], queue=queue_name(label))
    if detach:
        click.echo(job.id)
        return
    err.print(f"[dim]kata-ci: job {job.id} queued for label {label!r}[/]")
    sys.exit(_follow(store, job.id, cancel_on_interrupt=True))


@click.command()
@click.option("-n", "--count", type=int, default=20, show_default=True)
@config_option
@_usage_errors
def jobs(count: int, config_path: Path | None) -> None:
    """Recent jobs with their state."""
    cfg, store = _store(config_path)
    github = GitHubState(store.r)
    table = Table("id", "state", "label", "created", "duration", "command")
    for job in store.recent(count):
        created = datetime.datetime.fromtimestamp(job.created_at).strftime("%Y-%m-%d %H:%M:%S")
        end = job.finished_at or (time.time() if job.started_at else None)
        took = f"{end - job.started_at:.1f}s" if end and job.started_at else ""
        state = job.state + (f" ({job.exit_code})" if job.exit_code not in (None, 0) else "")
        what = " ".join(job.argv)
        if job.source == "github":
            what = github_line(github, f"{cfg.github.name_prefix}{job.id}")
        table.add_row(job.id, state, job.label, created, took, escape(what))
    Console().print(table)


def github_line(state: GitHubState, runner: str) -> str:
    """What a GitHub runner job is: its runner, and the workflow job GitHub gave it."""
    record = state.runner(runner)
    taken = state.job(record["github_job"]) if record.get("github_job") else {}
    if not taken:
        return f"GitHub runner {runner} ({record.get('state', 'gone')}): no job yet"
    return (f"GitHub runner {runner} ({record.get('state', '')}): {taken.get('repo', '')} "
            f"{taken.get('workflow', '')} / {taken.get('name', '')}")


@click.command()
@click.argument("job_id")
@click.option("-f", "--follow", is_flag=True, help="Keep printing until the job ends.")
@config_option
@_usage_errors
def logs(job_id: str, follow: bool, config_path: Path | None) -> None:
    """Print a job's log (stdout to stdout, stderr and kata-ci notes to stderr)."""
    _, store = _store(config_path)
    store.get(job_id)
    if follow:
        sys.exit(_follow(store, job_id, cancel_on_interrupt=False))
    for stream, data in store.read_log(job_id):
        TERMINAL.write(stream_named(stream), data)


@click.command()
@click.argument("job_id")
@config_option
@_usage_errors
def cancel(job_id: str, config_path: Path | None) -> None:
    """Cancel a job: SIGTERM in the guest, grace period, then the VM is killed. A job whose
    worker is gone (its lease passed) is ended here, as cancelled."""
    _, store = _store(config_path)
    click.echo(f"{job_id}: {store.request_cancel(job_id)}")


def _follow(store: JobStore, job_id: str, cancel_on_interrupt: bool,
            cancel_wait: float = 60.0) -> int:
    try:
        for stream, data in store.read_log(job_id, follow=True):
            TERMINAL.write(stream_named(stream), data)
    except KeyboardInterrupt:
        if not cancel_on_interrupt:
            return EXIT_CANCELLED
        err.print(f"kata-ci: cancelling job {job_id}")
        store.request_cancel(job_id)
        deadline = time.monotonic() + cancel_wait  # a dead worker never confirms...
        while store.get(job_id).state not in FINAL:
            if store.end_stranded(job_id):  # ...but its lease runs out: ended here
                continue
            if time.monotonic() > deadline:
                err.print(f"kata-ci: job {job_id} has not confirmed the cancel; its worker "
                          "will end it (see kata-ci jobs)")
                return EXIT_CANCELLED
            time.sleep(0.2)
    job = store.get(job_id)
    if job.state != JobStatus.SUCCESS.value:
        err.print(f"[bold yellow]kata-ci:[/] job {job_id} {job.state}: {escape(job.message)}")
    return exit_status(JobStatus(job.state), job.exit_code)


COMMANDS = (worker, submit, jobs, logs, cancel)
