"""A GitHub workflow job's steps, run one after another in the job's VM.

As on GitHub's runner: each step is its own process in its shell (bash: `bash --noprofile
--norc -eo pipefail {0}`); `$GITHUB_ENV`, `$GITHUB_PATH`, `$GITHUB_OUTPUT` and
`$GITHUB_STEP_SUMMARY` are files the host empties before and reads back after every step
(agent PutFiles/GetFiles), read as the runner reads them (a malformed one fails the step in
its words; NODE_OPTIONS is refused with an error annotation); a step's `if` defaults to
`success()`; `continue-on-error` keeps the job going. A step that cannot start (unknown
shell, a bad expression) fails as a step, like any other failing step. In a job's container
(its OCI image) a step without `shell:` runs with `bash -e` if the image has bash, else `sh
-e`, as GitHub's runner falls back. `uses: actions/checkout` is the mounted checkout; other
actions cannot be fetched and are skipped with a warning. Workflow commands on a step's
output (`::add-mask::`, `::set-output`, `::error::`, `::group::`...) are acted upon as
commands.py describes.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kata_ci.errors import UserError
from kata_ci.runner.core import beneath
from kata_ci.runner.core.command import Cancel
from kata_ci.runner.core.env import job_env
from kata_ci.runner.core.lifecycle import Session
from kata_ci.runner.core.outcome import Outcome, OutcomeKind
from kata_ci.runner.core.shell import file_argv
from kata_ci.runner.core.spec import Command
from kata_ci.runner.github.commands import RESERVED_ENV, StepCommands, WorkflowCommands
from kata_ci.runner.github.expr import (
    evaluate,
    render,
    to_number,
    truthy,
    uses_status_function,
)
from kata_ci.runner.github.workflow import GHJob, Step, Workflow, strategy_context

FILES = "/tmp/kata-ci-gh"
# $GITHUB_ENV, $GITHUB_PATH, $GITHUB_OUTPUT, $GITHUB_STEP_SUMMARY: emptied before each step,
# read back after it.
STEP_FILES = {"env": "GITHUB_ENV", "path": "GITHUB_PATH", "output": "GITHUB_OUTPUT",
              "summary": "GITHUB_STEP_SUMMARY"}
STEP_FILE_LIMIT = 1 << 20  # GitHub caps $GITHUB_STEP_SUMMARY at 1 MiB; the others likewise
SHELLS = {"bash": "bash --noprofile --norc -eo pipefail {0}", "sh": "sh -e {0}",
          "python": "python3 {0}", "pwsh": "", "powershell": "", "cmd": ""}


@dataclass
class RunContext:
    """What all jobs of one workflow run share."""

    workflow: Workflow
    workspace: Path
    github: dict[str, Any]
    needs: dict[str, dict[str, Any]]  # finished jobs: result and outputs
    cancelled: Cancel
    secrets: Mapping[str, str] = field(default_factory=dict)  # --secret: ${{ secrets.NAME }}


@dataclass
class JobState:
    status: str = "success"  # job.status: success | failure | cancelled
    steps: dict[str, dict[str, Any]] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)  # from $GITHUB_ENV
    path: list[str] = field(default_factory=list)  # from $GITHUB_PATH, newest first
    annotations: list[str] = field(default_factory=list)  # ::error:: etc., masked


class FileCommandError(UserError):
    """A $GITHUB_ENV / $GITHUB_OUTPUT file the runner would not accept: the step fails."""


def parse_env_file(text: str) -> dict[str, str]:
    """NAME=value lines and NAME<<DELIM ... DELIM blocks (multiline values), read as the
    runner does: whichever of `=` and `<<` comes first decides the form; empty lines are
    skipped; anything else (no name, no delimiter, a block never closed, a line of neither
    form) is refused with the runner's message (FileCommandError)."""
    out: dict[str, str] = {}
    lines = text.split("\n")
    i = 0
    while i < len(lines):
        line = lines[i]
        i += 1
        if not line:
            continue
        equals, heredoc = line.find("="), line.find("<<")
        if equals >= 0 and (heredoc < 0 or equals < heredoc):
            key, _, value = line.partition("=")
            if not key:
                raise FileCommandError(f"Invalid format '{line[:200]}'. Name must not be "
                                       "empty")
            out[key] = value
        elif heredoc >= 0:
            key, _, delimiter = line.partition("<<")
            if not key or not delimiter:
                raise FileCommandError(f"Invalid format '{line[:200]}'. "
                                       f"{'Delimiter' if key else 'Name'} must not be empty")
            body = []
            while i < len(lines) and lines[i] != delimiter:
                body.append(lines[i])
                i += 1
            if i >= len(lines):  # a value without its delimiter is not cut short
                raise FileCommandError("Invalid value. Matching delimiter not found "
                                       f"'{delimiter[:200]}'")
            i += 1
            out[key] = "\n".join(body)
        else:
            # the runner quotes the whole line; a hostile one is cut for the message
            raise FileCommandError(f"Invalid format '{line[:200]}'")
    return out


def hash_files(workspace: Path) -> Callable[..., str]:
    """hashFiles(): regular files beneath the workspace only. A link leaving it, a fifo or a
    device is skipped, never read (GitHub likewise ignores files outside the workspace)."""
    def compute(*patterns: Any) -> str:
        files: set[str] = set()
        for pattern in patterns:
            try:
                files.update(beneath.glob(workspace, str(pattern)))
            except beneath.Escape:
                continue
        digest, hashed = hashlib.sha256(), False
        with beneath.opened_root(workspace) as root:
            for rel in sorted(files, key=lambda rel: rel.split("/")):
                try:
                    fd = beneath.open_read(root, rel)
                except UserError:
                    continue
                one = hashlib.sha256()
                with open(fd, "rb") as handle:
                    while chunk := handle.read(1 << 20):
                        one.update(chunk)
                digest.update(one.digest())
                hashed = True
        return digest.hexdigest() if hashed else ""
    return compute


def expression_body(text: str) -> str:
    """The expression of a field that may be written with or without ${{ }}."""
    body = text.strip()
    return body[3:-2] if body.startswith("${{") and body.endswith("}}") else body


def flag(value: Any, ctx: Mapping[str, Any]) -> bool:
    """A boolean field such as continue-on-error: a literal, or an expression
    (`continue-on-error: ${{ matrix.experimental }}`)."""
    if isinstance(value, str):
        return truthy(evaluate(expression_body(value), ctx))
    return bool(value)


def minutes(value: float | str | None, ctx: Mapping[str, Any]) -> float | None:
    """timeout-minutes as a number: a literal, or an expression's value
    (`timeout-minutes: ${{ matrix.slow && 60 || 10 }}`); UserError if not positive."""
    if value is None or isinstance(value, float):
        return value
    number = to_number(evaluate(expression_body(value), ctx))
    if not 0 < number < 1e9:
        raise UserError(f"timeout-minutes: {value} is {number:g}, not a positive number")
    return number


def condition(text: str | None, ctx: Mapping[str, Any], functions: Mapping[str, Any]) -> bool:
    body = expression_body(text or "")
    if not body:
        body = "success()"
    elif not uses_status_function(body):
        body = f"success() && ({body})"
    return truthy(evaluate(body, ctx, functions))


def contexts(job: GHJob, state: JobState, rc: RunContext) -> dict[str, Any]:
    env = {**rc.workflow.env, **job.env, **state.env}
    return {"github": {**rc.github, "job": job.key}, "env": env, "matrix": job.matrix,
            "steps": state.steps, "needs": {n: rc.needs.get(n, {}) for n in job.needs},
            "job": {"status": state.status}, "runner": {"os": "Linux", "arch": "X64",
                                                        "temp": "/tmp", "name": "kata-ci"},
            "strategy": strategy_context(job), "inputs": {}, "vars": {},
            "secrets": dict(rc.secrets)}


def github_env(rc: RunContext, job: GHJob) -> dict[str, str]:
    """The GITHUB_* and RUNNER_* variables every step sees."""
    g = rc.github
    return {"GITHUB_ACTIONS": "true", "GITHUB_WORKSPACE": str(rc.workspace),
            "GITHUB_SHA": g["sha"], "GITHUB_REF": g["ref"], "GITHUB_REF_NAME": g["ref_name"],
            "GITHUB_EVENT_NAME": g["event_name"], "GITHUB_REPOSITORY": g["repository"],
            "GITHUB_JOB": job.key, "GITHUB_RUN_ID": g["run_id"], "GITHUB_ACTOR": g["actor"],
            "RUNNER_OS": "Linux", "RUNNER_TEMP": "/tmp",
            **{var: f"{FILES}/{name}" for name, var in STEP_FILES.items()}}


class GitHubSteps:
    """The job's script: its steps, in order. ``state`` holds what they produced."""

    def __init__(self, job: GHJob, rc: RunContext, base_env: Mapping[str, str],
                 user_env: Mapping[str, str]) -> None:
        self.job = job
        self.rc = rc
        self.base_env = base_env  # job_env defaults + TERM + GITHUB_*
        self.user_env = user_env  # -e: over everything the workflow sets
        self.state = JobState()
        self.notes: list[str] = []  # what of the job's container kata-ci does not honour

    def run(self, session: Session) -> Outcome:
        for key in self.job.unsupported:
            session.note(f"{key}: is not supported by kata-ci; ignored")
        for text in self.notes:
            session.note(text)
        for step in self.job.steps:
            ended = self._step(session, step)
            if ended is not None:
                return ended
        if self.state.status == "cancelled":
            return Outcome.cancelled()
        if self.state.status == "failure":
            return Outcome.job_failure("a step failed")
        return Outcome(OutcomeKind.SUCCESS, 0)

    def _step(self, session: Session, step: Step) -> Outcome | None:
        """Run one step; an Outcome only when the job must end now (timeout, system)."""
        state, rc = self.state, self.rc
        functions: dict[str, Callable[..., Any]] = {
            "success": lambda: state.status == "success",
            "failure": lambda: state.status == "failure",
            "cancelled": lambda: state.status == "cancelled" or rc.cancelled.is_set(),
            "always": lambda: True, "hashFiles": hash_files(rc.workspace)}
        ctx = contexts(self.job, state, rc)
        record: dict[str, Any] = {"outputs": {}, "outcome": "skipped", "conclusion": "skipped"}
        state.steps[step.id] = record
        if rc.cancelled.is_set() and state.status != "cancelled":
            state.status = "cancelled"
        try:
            if not condition(step.if_, ctx, functions):
                return None
        except UserError as exc:
            self._failed(session, step, record, ctx, f"if: {exc}")
            return None
        session.sink.write("stdout", f"\x1b[1m▶ {step.name}\x1b[0m\n".encode())
        if step.uses is not None:
            if re.match(r"actions/checkout@", step.uses):
                session.sink.write("stdout", b"kata-ci: actions/checkout: the checkout is "
                                             b"already mounted\n")
                record.update(outcome="success", conclusion="success")
            else:
                session.note(f"warning: step skipped: action {step.uses} cannot be fetched "
                             "here (no network)")
            return None
        try:
            command = self._command(session, step, ctx, functions)
        except UserError as exc:
            self._failed(session, step, record, ctx, str(exc))
            return None
        commands = WorkflowCommands(session, command.env, self._debug())
        try:
            outcome = session.run(command, commands)
        finally:
            produced = commands.flush()
        if outcome.kind is OutcomeKind.SYSTEM_FAILURE:
            return outcome
        summary = self._collect(session, record, produced)
        if summary.strip():
            session.sink.write("stdout", f"── step summary ──\n{summary.rstrip()}\n".encode())
        if outcome.kind is OutcomeKind.TIMEOUT and session.expired:
            return outcome  # the job's own deadline: nothing more runs
        if outcome.kind is OutcomeKind.SUCCESS and produced.failure:
            self._failed(session, step, record, ctx, produced.failure)
        elif outcome.kind is OutcomeKind.SUCCESS:
            record.update(outcome="success", conclusion="success")
        elif outcome.kind is OutcomeKind.CANCELLED:
            record.update(outcome="failure", conclusion="failure")
            state.status = "cancelled"
        else:
            self._failed(session, step, record, ctx, outcome.message)
        return None

    def _failed(self, session: Session, step: Step, record: dict[str, Any],
                ctx: Mapping[str, Any], message: str) -> None:
        record["outcome"] = "failure"
        try:
            tolerated = flag(step.continue_on_error, ctx)
        except UserError as exc:
            tolerated, message = False, f"{message}; continue-on-error: {exc}"
        record["conclusion"] = "success" if tolerated else "failure"
        if not tolerated:
            self.state.status = "failure"
            session.sink.write("stderr", f"✗ {step.name}: {message}\n".encode())

    def _command(self, session: Session, step: Step, ctx: Mapping[str, Any],
                 functions: Mapping[str, Callable[..., Any]]) -> Command:
        """The step's process, its script written into the guest; UserError if the step
        cannot start (unknown shell, bad expression)."""
        shell = render(step.shell or self.job.shell or "", ctx, functions)
        detect = not shell and session.spec.image is not None  # bash, else sh (container)
        template = SHELLS.get(shell or "bash", shell or "bash")
        if not template or "{0}" not in template:
            raise UserError(f"shell {shell!r} is not available in the guest")
        step_env = {k: render(v, ctx, functions) for k, v in step.env.items()}
        workdir = render(step.working_directory or self.job.working_directory or "", ctx,
                         functions)
        script = f"{FILES}/step{step.index}"
        files = {f"{FILES}/{name}": b"" for name in STEP_FILES}
        files[script] = render(step.run or "", ctx, functions).encode()
        session.put_files(files)
        env = job_env(self.base_env, ctx["env"], step_env, self.defaults(), self.user_env,
                      path_prepend=self.state.path)
        step_minutes = minutes(step.timeout_minutes, ctx)
        timeout = step_minutes * 60 if step_minutes else 0.0
        argv = file_argv(script) if detect else template.replace("{0}", script).split()
        return Command(argv, env,
                       str(self.rc.workspace / workdir) if workdir else "", timeout,
                       timeout_message=f"step timed out after {timeout:g}s" if timeout else "")

    def defaults(self) -> dict[str, str]:
        """GitHub's default GITHUB_* and RUNNER_* variables: env, $GITHUB_ENV and set-env
        cannot overwrite them ("You can't overwrite the value of the default environment
        variables named GITHUB_* and RUNNER_*", variables reference)."""
        return {k: v for k, v in self.base_env.items() if k.startswith(("GITHUB_", "RUNNER_"))}

    def _debug(self) -> bool:
        """ACTIONS_STEP_DEBUG, as a secret or a variable, turns ::debug:: lines on."""
        value = self.rc.secrets.get("ACTIONS_STEP_DEBUG") or {
            **self.rc.workflow.env, **self.job.env}.get("ACTIONS_STEP_DEBUG", "")
        return value.lower() == "true"

    def _collect(self, session: Session, record: dict[str, Any],
                 produced: StepCommands) -> str:
        """Read back the step's GITHUB_* files (after what its commands set); returns the
        step summary (markdown)."""
        self.state.env.update(produced.env)
        self.state.path[:0] = produced.path
        self.state.annotations += produced.annotations
        paths = [f"{FILES}/{name}" for name in STEP_FILES]
        got = session.get_files(paths, STEP_FILE_LIMIT)
        env, path, output, summary = (
            (got[p] or b"").decode(errors="replace") for p in paths)
        added = self._file_command(session, "env", env, produced)
        for name in sorted(RESERVED_ENV & {n.upper() for n in added}):
            # the runner's error annotation; the step goes on, the variable unchanged
            shown = f"Error: Can't store {name} output parameter using '$GITHUB_ENV' command."
            session.sink.write("stderr", f"{shown}\n".encode())
            self.state.annotations.append(shown)
        self.state.env.update({k: v for k, v in added.items() if k.upper() not in RESERVED_ENV})
        self.state.path[:0] = [p for p in reversed(path.splitlines()) if p.strip()]
        record["outputs"] = {**produced.outputs,
                             **self._file_command(session, "output", output, produced)}
        return summary

    def _file_command(self, session: Session, name: str, text: str,
                      produced: StepCommands) -> dict[str, str]:
        """One file command's pairs; a file the runner refuses fails the step, in its words
        (what the other files hold still counts, as each is processed on its own)."""
        try:
            return parse_env_file(text)
        except FileCommandError as exc:
            for line in (f"Unable to process file command '{name}' successfully.", str(exc)):
                session.sink.write("stderr", f"Error: {line}\n".encode())
            produced.failure = produced.failure or str(exc)
            return {}
