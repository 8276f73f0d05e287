"""`kata-ci run [JOB...]` / `--pipeline`: a repository's GitLab CI jobs, each in a fresh VM."""

from __future__ import annotations

import re
import signal
import sys
import threading
from collections.abc import Mapping
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from kata_ci.errors import UserError
from kata_ci.executors.agent_client import StreamName
from kata_ci.runner.config import Config
from kata_ci.runner.gitlab_ci import CIJob, Pipeline, load
from kata_ci.runner.local import acquire
from kata_ci.runner.pipeline import (
    COLOURS,
    JobResult,
    PrefixedOutput,
    predefined_variables,
    run_one,
    schedule,
    select,
)

GITLAB_FILE = ".gitlab-ci.yml"
ANSI = {"cyan": 36, "magenta": 35, "green": 32, "yellow": 33, "blue": 34, "red": 31}


def find_file(workspace: Path, explicit: Path | None) -> Path:
    path = explicit or workspace / GITLAB_FILE
    if not path.is_file():
        hint = "" if explicit else (" (GitHub workflows are not run yet)"
                                    if (workspace / ".github/workflows").is_dir() else "")
        raise UserError(f"no CI file: {path} does not exist{hint}; "
                        "to run a command, use kata-ci run -- COMMAND")
    return path


def parse_vars(items: tuple[str, ...], env_file: Path | None) -> dict[str, str]:
    out: dict[str, str] = {}
    if env_file is not None:
        try:
            lines = env_file.read_text().splitlines()
        except OSError as exc:
            raise UserError(f"--env-file {env_file}: {exc}") from None
        for number, line in enumerate(lines, 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            key, sep, value = line.removeprefix("export ").partition("=")
            if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key.strip()):
                raise UserError(f"{env_file}:{number}: expected NAME=VALUE")
            out[key.strip()] = value.strip().strip("'\"")
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
            raise UserError(f"--var {item!r}: expected NAME=VALUE")
        out[key] = value
    return out


def expand(variables: Mapping[str, str], base: Mapping[str, str]) -> dict[str, str]:
    """$VAR and ${VAR} inside variable values, from earlier definitions (GitLab expands)."""
    known = dict(base)
    for key, value in variables.items():
        known[key] = re.sub(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)\}?",
                            lambda m: known.get(m.group(1), m.group(0)), value)
    return {k: known[k] for k in variables}


def load_pipeline(workspace: Path, explicit: Path | None, user: Mapping[str, str],
                  event: str) -> tuple[Pipeline, dict[str, str]]:
    predefined = predefined_variables(workspace, event)
    pipeline = load(find_file(workspace, explicit), workspace, {**predefined, **user})
    return pipeline, predefined


def list_jobs(pipeline: Pipeline, console: Console) -> None:
    table = Table("job", "stage", "when", "needs", "allow failure", title=str(pipeline.path))
    for job in pipeline.jobs:
        needs = "(earlier stages)" if job.needs is None else ", ".join(job.needs) or "-"
        table.add_row(escape(job.name), job.stage, job.when, escape(needs),
                      "yes" if job.allow_failure else "")
    console.print(table)
    console.print("run one: kata-ci run JOB   all: kata-ci run --pipeline   "
                  "a command: kata-ci run -- CMD")


def run_pipeline(pipeline: Pipeline, predefined: dict[str, str], user: Mapping[str, str],
                 names: list[str], only: bool, parallel: int, config: Config,
                 workspace: Path, console: Console) -> int:
    jobs = select(pipeline, names, only)
    backend, base = acquire(config, lambda m: console.print(f"[yellow]kata-ci:[/] {m}"))
    colour = {j.name: COLOURS[i % len(COLOURS)] for i, j in enumerate(jobs)}
    tty = sys.stdout.isatty()

    def write(job: str, stream: StreamName, line: bytes) -> None:
        prefix = f"[{job}] "
        if tty:
            prefix = f"\x1b[{ANSI[colour[job]]}m{prefix}\x1b[0m"
        target = sys.stdout.buffer if stream == "stdout" else sys.stderr.buffer
        target.write(prefix.encode() + line if len(jobs) > 1 else line)
        target.flush()

    output = PrefixedOutput(write)
    cancelled = threading.Event()

    def run(job: CIJob) -> JobResult:
        env = expand(job.variables, predefined)
        try:
            return run_one(job, backend, base, workspace, {**predefined, **env, **user},
                           output.sink(job.name), config.vm.timeout, config.vm.grace,
                           config.vm.boot_timeout, cancelled)
        finally:
            output.flush(job.name)

    previous = signal.signal(signal.SIGTERM, lambda *_: cancelled.set())
    try:
        results = schedule(pipeline, jobs, parallel, run, cancelled)
    finally:
        signal.signal(signal.SIGTERM, previous)
    _summary(results, jobs, console)
    if cancelled.is_set():
        return 130
    return 0 if all(r.ok for r in results) else 1


def _summary(results: list[JobResult], jobs: list[CIJob], console: Console) -> None:
    stage = {j.name: j.stage for j in jobs}
    styles = {"success": "green", "warning": "yellow", "failed": "red", "skipped": "dim",
              "manual": "dim", "cancelled": "yellow", "system failure": "bold red"}
    table = Table("job", "stage", "status", "duration", "")
    for result in results:
        status = result.status + (" (allowed to fail)" if result.status == "warning" else "")
        table.add_row(escape(result.name), stage.get(result.name, ""),
                      f"[{styles[result.status]}]{status}[/]",
                      f"{result.duration:.1f}s" if result.duration else "",
                      escape(result.message) if result.status != "success" else "")
    console.print(table)
