"""`kata-ci run [JOB...]` / `--pipeline`: a repository's CI jobs (GitLab CI or GitHub
workflows), each in a fresh VM, with prefixed live output and a summary table."""

from __future__ import annotations

import dataclasses
import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from kata_ci.errors import UserError
from kata_ci.executors.provider import VMProvider
from kata_ci.runner.core import beneath
from kata_ci.runner.core.command import Cancel
from kata_ci.runner.core.outcome import EXIT_CANCELLED, JobStatus
from kata_ci.runner.core.plan import Plan, run_plan
from kata_ci.runner.core.repo import RepoSnapshot, read_repo
from kata_ci.runner.core.schedule import JobResult
from kata_ci.runner.core.sinks import PrefixedOutput, Stream, TerminalSink
from kata_ci.runner.core.spec import RunSettings
from kata_ci.runner.github import jobs as gh
from kata_ci.runner.github.expr import render
from kata_ci.runner.github.steps import RunContext
from kata_ci.runner.github.workflow import Workflow, load_workflow
from kata_ci.runner.gitlab import jobs as gl
from kata_ci.runner.gitlab.ci_file import Pipeline, load

GITLAB_FILE = ".gitlab-ci.yml"
WORKFLOWS = ".github/workflows"
COLOURS = {"cyan": 36, "magenta": 35, "green": 32, "yellow": 33, "blue": 34, "red": 31}
STYLES = {JobStatus.SUCCESS: "green", JobStatus.WARNING: "yellow", JobStatus.FAILED: "red",
          JobStatus.TIMEOUT: "red", JobStatus.SKIPPED: "dim", JobStatus.MANUAL: "dim",
          JobStatus.CANCELLED: "yellow", JobStatus.SYSTEM_FAILURE: "bold red"}

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
    repo: RepoSnapshot  # git facts read once, before any job of the run touched the checkout


def discover(workspace: Path, gitlab_ci: Path | None, workflow: Path | None,
             user: Mapping[str, str], event: str) -> Found:
    # The run's one look at git (hardened: see runner/core/repo.py). Everything after this,
    # predefined variables, rules:changes, the github context, uses this snapshot, so jobs
    # that rewrite .git change nothing for the later jobs of the run.
    repo = read_repo(workspace, changes=workflow is None)
    predefined = gl.predefined_variables(workspace, GITLAB_SOURCE.get(event, event), repo)
    gitlab_path = gitlab_ci or (None if workflow else workspace / GITLAB_FILE)
    if gitlab_ci is not None and not gitlab_ci.is_file():
        raise UserError(f"--gitlab-ci {gitlab_ci} does not exist")
    # The default file is looked up beneath the workspace: a job may have made it a link
    # to a host file, or a fifo (beneath refuses both, with the path in the message).
    present = gitlab_ci is not None or (gitlab_path is not None
                                         and beneath.exists(workspace, GITLAB_FILE))
    if gitlab_path is not None:
        rel = beneath.relative(workspace, gitlab_path)
        predefined["CI_CONFIG_PATH"] = str(rel) if rel is not None else str(gitlab_path)
    gitlab = load(gitlab_path, workspace, {**predefined, **user}, repo.changed, user) \
        if gitlab_path is not None and present else None
    if workflow is not None:
        if not workflow.is_file():
            raise UserError(f"--workflow {workflow} does not exist")
        paths = [workflow]
    elif gitlab_ci is None:
        paths = [workspace / WORKFLOWS / name for name in beneath.listdir(workspace, WORKFLOWS)
                 if name.endswith((".yml", ".yaml"))]
    else:
        paths = []
    workflows = [load_workflow(p, workspace) for p in paths]
    if gitlab is not None and gitlab.empty and not workflows:
        raise UserError(f"{gitlab.path}: {gitlab.empty}")
    if gitlab is None and not workflows:
        raise UserError(f"no CI file in {workspace} (.gitlab-ci.yml or .github/workflows); "
                        "to run a command, use kata-ci run -- COMMAND")
    return Found(gitlab, workflows, predefined, event, repo)


def list_jobs(found: Found, console: Console) -> None:
    if found.gitlab is not None and found.gitlab.empty:
        console.print(f"{escape(str(found.gitlab.path))}: {found.gitlab.empty}")
    elif found.gitlab is not None:
        table = Table("job", "stage", "when", "needs", "allow failure",
                      title=escape(" ".join(filter(None, [str(found.gitlab.path),
                                                          found.gitlab.name]))))
        for job in found.gitlab.jobs:
            needs = "(earlier stages)" if job.needs is None else ", ".join(job.needs) or "-"
            when = job.when + (" (--manual to run)" if job.when == "manual" else "")
            table.add_row(escape(job.name), job.stage, when, escape(needs),
                          "yes" if job.allow_failure else "")
        console.print(table)
        for job in found.gitlab.jobs:
            for note in job.notes:
                console.print(f"[yellow]{escape(job.name)}:[/] {escape(note)}")
    for workflow in found.workflows:
        runs = found.event in workflow.events
        title = f"{workflow.path} (on: {', '.join(workflow.events)})" + (
            "" if runs else f" — not triggered by {found.event}")
        table = Table("job", "needs", "if", title=escape(title))
        for gh_job in workflow.jobs:
            deferred = " (matrix when its needs end)" if gh_job.matrix_source is not None else ""
            table.add_row(escape(gh_job.name + deferred), escape(", ".join(gh_job.needs) or "-"),
                          escape(gh_job.if_ or ""))
        console.print(table)
    console.print("run one: kata-ci run JOB   all: kata-ci run --pipeline   "
                  "a command: kata-ci run -- CMD")


def choose(found: Found, names: list[str], pipeline: bool) -> Pipeline | Workflow:
    """Which file the run is about: the one that has the named jobs, or the only one."""
    triggered = [w for w in found.workflows if found.event in w.events]
    if pipeline:
        options: list[Pipeline | Workflow] = [*([found.gitlab] if found.gitlab else []),
                                              *triggered]
        if len(options) == 1 and isinstance(options[0], Pipeline) and options[0].empty:
            raise UserError(f"{options[0].path}: {options[0].empty}")
        if len(options) != 1:
            what = ", ".join(str(o.path) for o in options) or "nothing"
            raise UserError(f"--pipeline needs one CI file, found: {what}; "
                            "pick one with --gitlab-ci or --workflow")
        return options[0]
    holders: list[Pipeline | Workflow] = []
    if found.gitlab is not None and found.gitlab.jobs and \
            all(_has_gitlab(found.gitlab, n) for n in names):
        holders.append(found.gitlab)
    holders += [w for w in triggered
                if all(any(n in (j.key, j.name) for j in w.jobs) for n in names)]
    if len(holders) != 1:
        where = ", ".join(str(h.path) for h in holders)
        known = [*(j.name for j in (found.gitlab.jobs if found.gitlab else [])),
                 *(j.name for w in triggered for j in w.jobs)]
        empty = f"; {found.gitlab.path}: {found.gitlab.empty}" if found.gitlab is not None \
            and found.gitlab.empty else ""
        raise UserError(f"job(s) {', '.join(names)}: " + (
            f"found in several files ({where}); pick one with --gitlab-ci or --workflow"
            if holders else f"not found in any CI file triggered by {found.event} "
            f"(jobs: {', '.join(known) or 'none'}){empty}"))
    return holders[0]


def _has_gitlab(pipeline: Pipeline, name: str) -> bool:
    try:
        pipeline.named(name)
    except UserError:
        return False
    return True


def plan_for(found: Found, target: Pipeline | Workflow, names: list[str], only: bool,
             workspace: Path, user: Mapping[str, str], settings: RunSettings,
             cancel: Cancel, manual: Sequence[str] = ()) -> Plan[Any]:
    """The chosen jobs of a GitLab pipeline or a GitHub workflow, ready to run."""
    if isinstance(target, Pipeline):
        return gl.GitLabPlan(target, gl.select(target, names, only, manual), workspace,
                             found.predefined, user, settings)
    if manual:
        raise UserError("--manual is for GitLab's manual jobs; GitHub workflows have none")
    # --var / --env-file: like workflow-level env, winning over the file's.
    github = gh.github_context(found.predefined, found.event, target, workspace)
    # workflow-level env may use the github, secrets, vars and inputs contexts
    early = {"github": github, "secrets": dict(settings.secrets), "vars": {}, "inputs": {}}
    env = {name: render(value, early) for name, value in target.env.items()}
    # strategies and names that wait only for `github` are built now (named, selectable)
    workflow = gh.prepare(dataclasses.replace(target, env={**env, **user}), github)
    rc = RunContext(workflow, workspace, github, {}, cancel, settings.secrets)
    return gh.GitHubPlan(workflow, gh.select(workflow, names, only), rc, settings)


def run_selected(plan: Plan[Any], provider: VMProvider, parallel: int, cancel: Cancel,
                 console: Console) -> int:
    """Run the plan's jobs; print the summary; the exit status."""
    names = [job.name for job in plan.jobs]
    colour = {name: list(COLOURS.values())[i % len(COLOURS)] for i, name in enumerate(names)}
    tty = sys.stdout.isatty()
    terminal = TerminalSink()

    def write(job: str, stream: Stream, line: bytes) -> None:
        prefix = f"[{job}] "
        if tty:
            # instances made during the run (a matrix from needs) get the first colour
            prefix = f"\x1b[{colour.get(job, 36)}m{prefix}\x1b[0m"
        terminal.write(stream, prefix.encode() + line if len(names) > 1 else line)

    results = run_plan(plan, provider, PrefixedOutput(write), parallel, cancel)
    summary(results, {job.name: plan.group(job) for job in plan.jobs}, console)
    if cancel.is_set():
        return EXIT_CANCELLED
    return 0 if all(r.ok for r in results) else 1


def summary(results: Sequence[JobResult], group: Mapping[str, str], console: Console) -> None:
    table = Table("job", "stage/workflow", "status", "duration", "")
    for result in results:
        status = result.status.label + (
            " (allowed to fail)" if result.status is JobStatus.WARNING else "")
        table.add_row(escape(result.name), escape(group.get(result.name, "")),
                      f"[{STYLES[result.status]}]{status}[/]",
                      f"{result.duration:.1f}s" if result.duration else "",
                      "" if result.status is JobStatus.SUCCESS else escape(result.message))
    console.print(table)
    annotations = [(r.name, a) for r in results for a in r.annotations]
    if annotations:
        console.print("Annotations")
        for name, text in annotations:  # the job wrote them: no control characters here
            shown = re.sub(r"[\x00-\x1f\x7f-\x9f]", "?", text)
            style = "red" if shown.startswith("Error") else "yellow" \
                if shown.startswith("Warning") else "cyan"
            console.print(f"  [{style}]{escape(name)}: {escape(shown)}[/]", soft_wrap=True)
