"""`kata-ci run [JOB...]` / `--pipeline`: a repository's GitLab CI jobs, each in a fresh VM."""

from __future__ import annotations

import dataclasses
import re
import signal
import sys
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from kata_ci.errors import UserError
from kata_ci.executors.agent_client import StreamName
from kata_ci.runner.config import Config
from kata_ci.runner.github_run import RunContext, run_gh_job, run_workflow_jobs
from kata_ci.runner.github_wf import GHJob, Workflow, load_workflow
from kata_ci.runner.gitlab_ci import CIJob, Pipeline, load
from kata_ci.runner.job import EXIT_CANCELLED
from kata_ci.runner.local import TerminalSink, acquire
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


# GitHub event names and GitLab's CI_PIPELINE_SOURCE for the same occasion.
GITLAB_SOURCE = {"pull_request": "merge_request_event", "workflow_dispatch": "web",
                 "schedule": "schedule", "push": "push"}


@dataclass
class Found:
    """The CI files of a workspace: a GitLab pipeline and/or GitHub workflows."""

    gitlab: Pipeline | None
    workflows: list[Workflow]
    predefined: dict[str, str]
    event: str


def discover(workspace: Path, gitlab_ci: Path | None, workflow: Path | None,
             user: Mapping[str, str], event: str) -> Found:
    predefined = predefined_variables(workspace, GITLAB_SOURCE.get(event, event))
    gitlab_path = gitlab_ci or (None if workflow else workspace / GITLAB_FILE)
    if gitlab_ci is not None and not gitlab_ci.is_file():
        raise UserError(f"--gitlab-ci {gitlab_ci} does not exist")
    gitlab = load(gitlab_path, workspace, {**predefined, **user}) \
        if gitlab_path is not None and gitlab_path.is_file() else None
    if workflow is not None:
        if not workflow.is_file():
            raise UserError(f"--workflow {workflow} does not exist")
        paths = [workflow]
    elif gitlab_ci is None:
        paths = sorted([*(workspace / ".github/workflows").glob("*.yml"),
                        *(workspace / ".github/workflows").glob("*.yaml")])
    else:
        paths = []
    workflows = [load_workflow(p) for p in paths]
    if gitlab is None and not workflows:
        raise UserError(f"no CI file in {workspace} (.gitlab-ci.yml or .github/workflows); "
                        "to run a command, use kata-ci run -- COMMAND")
    return Found(gitlab, workflows, predefined, event)


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


def list_jobs(found: Found, console: Console) -> None:
    if found.gitlab is not None:
        table = Table("job", "stage", "when", "needs", "allow failure",
                      title=str(found.gitlab.path))
        for job in found.gitlab.jobs:
            needs = "(earlier stages)" if job.needs is None else ", ".join(job.needs) or "-"
            table.add_row(escape(job.name), job.stage, job.when, escape(needs),
                          "yes" if job.allow_failure else "")
        console.print(table)
    for workflow in found.workflows:
        runs = found.event in workflow.events
        title = f"{workflow.path} (on: {', '.join(workflow.events)})" + (
            "" if runs else f" — not triggered by {found.event}")
        table = Table("job", "needs", "if", title=escape(title))
        for gh in workflow.jobs:
            table.add_row(escape(gh.name), escape(", ".join(gh.needs) or "-"),
                          escape(gh.if_ or ""))
        console.print(table)
    console.print("run one: kata-ci run JOB   all: kata-ci run --pipeline   "
                  "a command: kata-ci run -- CMD")


def choose(found: Found, names: list[str], pipeline: bool) -> Pipeline | Workflow:
    """Which file the run is about: the one that has the named jobs, or the only one."""
    triggered = [w for w in found.workflows if found.event in w.events]
    if pipeline:
        options: list[Pipeline | Workflow] = [*([found.gitlab] if found.gitlab else []),
                                              *triggered]
        if len(options) != 1:
            what = ", ".join(str(o.path) for o in options) or "nothing"
            raise UserError(f"--pipeline needs one CI file, found: {what}; "
                            "pick one with --gitlab-ci or --workflow")
        return options[0]
    holders: list[Pipeline | Workflow] = []
    if found.gitlab is not None and all(_has_gitlab(found.gitlab, n) for n in names):
        holders.append(found.gitlab)
    holders += [w for w in triggered if all(_has_gh(w, n) for n in names)]
    if len(holders) != 1:
        where = ", ".join(str(h.path) for h in holders)
        known = [*(j.name for j in (found.gitlab.jobs if found.gitlab else [])),
                 *(j.name for w in triggered for j in w.jobs)]
        raise UserError(f"job(s) {', '.join(names)}: " + (
            f"found in several files ({where}); pick one with --gitlab-ci or --workflow"
            if holders else f"not found in any CI file triggered by {found.event} "
            f"(jobs: {', '.join(known) or 'none'})"))
    return holders[0]


def _has_gitlab(pipeline: Pipeline, name: str) -> bool:
    try:
        pipeline.named(name)
    except UserError:
        return False
    return True


def _has_gh(workflow: Workflow, name: str) -> bool:
    return any(name in (j.key, j.name) for j in workflow.jobs)


def run_selected(found: Found, target: Pipeline | Workflow, names: list[str], only: bool,
                 parallel: int, config: Config, workspace: Path, user: Mapping[str, str],
                 console: Console) -> int:
    """Run the chosen jobs of a GitLab pipeline or a GitHub workflow; the exit status."""
    if isinstance(target, Pipeline):
        gl_jobs = select(target, names, only)
        job_names, groups = [j.name for j in gl_jobs], {j.name: j.stage for j in gl_jobs}
    else:
        gh_jobs = select_gh(target, names, only)
        job_names, groups = [j.name for j in gh_jobs], {j.name: target.name for j in gh_jobs}
    backend, base = acquire(config, lambda m: console.print(f"[yellow]kata-ci:[/] {m}"))
    colour = {name: COLOURS[i % len(COLOURS)] for i, name in enumerate(job_names)}
    tty = sys.stdout.isatty()
    terminal = TerminalSink()

    def write(job: str, stream: StreamName, line: bytes) -> None:
        prefix = f"[{job}] "
        if tty:
            prefix = f"\x1b[{ANSI[colour[job]]}m{prefix}\x1b[0m"
        terminal.write(stream, prefix.encode() + line if len(job_names) > 1 else line)

    output = PrefixedOutput(write)
    cancelled = threading.Event()
    previous = signal.signal(signal.SIGTERM, lambda *_: cancelled.set())
    try:
        if isinstance(target, Pipeline):
            def run_gl(job: CIJob) -> JobResult:
                env = {**found.predefined, **expand(job.variables, found.predefined), **user}
                try:
                    return run_one(job, backend, base, workspace, env, output.sink(job.name),
                                   config.vm.timeout, config.vm.grace, config.vm.boot_timeout,
                                   cancelled)
                finally:
                    output.flush(job.name)

            results = schedule(target, gl_jobs, parallel, run_gl, cancelled)
        else:
            # --var / --env-file: like workflow-level env, winning over the file's.
            target = dataclasses.replace(target, env={**target.env, **user})
            rc = RunContext(target, workspace, github_context(found, target, workspace), {},
                            output.sink(""), cancelled, config.vm.grace,
                            config.vm.boot_timeout)

            def run_gh(job: GHJob) -> JobResult:
                try:
                    return run_gh_job(job, backend, base,
                                      dataclasses.replace(rc, emit=output.sink(job.name)))
                finally:
                    output.flush(job.name)

            results = run_workflow_jobs(target, gh_jobs, parallel, run_gh, rc)
    finally:
        signal.signal(signal.SIGTERM, previous)
    _summary(results, groups, console)
    if cancelled.is_set():
        return EXIT_CANCELLED
    return 0 if all(r.ok for r in results) else 1


def select_gh(workflow: Workflow, names: list[str], only: bool) -> list[GHJob]:
    """Named jobs plus what they need. A job id selects all its matrix variants; a shown
    name like `test (3.11)` selects that one."""
    if not names:
        return list(workflow.jobs)
    chosen: set[str] = set()
    keys: set[str] = set()
    for name in names:
        matches = [j for j in workflow.jobs if name in (j.key, j.name)]
        chosen.update(j.name for j in matches)
        keys.update(j.key for j in matches)
    pending = [] if only else list(keys)
    while pending:
        key = pending.pop()
        for need in next(j for j in workflow.jobs if j.key == key).needs:
            if need not in keys:
                keys.add(need)
                pending.append(need)
                chosen.update(j.name for j in workflow.jobs if j.key == need)
    return [j for j in workflow.jobs if j.name in chosen]


def github_context(found: Found, workflow: Workflow, workspace: Path) -> dict[str, Any]:
    p = found.predefined
    ref_name = p["CI_COMMIT_REF_NAME"]
    ref = f"refs/tags/{ref_name}" if "CI_COMMIT_TAG" in p else f"refs/heads/{ref_name}"
    return {"event_name": found.event, "ref": ref, "ref_name": ref_name,
            "sha": p["CI_COMMIT_SHA"], "repository": f"local/{workspace.name}",
            "repository_owner": "local", "workspace": str(workspace), "actor": "kata-ci",
            "run_id": p["CI_PIPELINE_ID"], "run_number": "1", "run_attempt": "1",
            "workflow": workflow.name, "event": {}, "head_ref": "", "base_ref": "",
            "server_url": "https://github.com", "action": "", "ref_type":
            "tag" if "CI_COMMIT_TAG" in p else "branch"}


def _summary(results: list[JobResult], stage: Mapping[str, str], console: Console) -> None:
    styles = {"success": "green", "warning": "yellow", "failed": "red", "skipped": "dim",
              "manual": "dim", "cancelled": "yellow", "system failure": "bold red"}
    table = Table("job", "stage/workflow", "status", "duration", "")
    for result in results:
        status = result.status + (" (allowed to fail)" if result.status == "warning" else "")
        table.add_row(escape(result.name), stage.get(result.name, ""),
                      f"[{styles[result.status]}]{status}[/]",
                      f"{result.duration:.1f}s" if result.duration else "",
                      escape(result.message) if result.status != "success" else "")
    console.print(table)
