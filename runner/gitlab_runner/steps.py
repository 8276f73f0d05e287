"""A GitLab job's steps in its VM, and the variables they see.

GitLab folds before_script into the ``script`` step and sends ``after_script`` as a step of
its own (``when: always``, ``allow_failure: true``); a ``release`` or other named step runs
where GitLab put it. Each step is one bash with ``set -eo pipefail``, each command echoed as
gitlab-runner does (in a job's image without bash: sh, core/shell.py). after_script runs
last in a fresh shell, with CI_JOB_STATUS (success, failed or canceled) and its own 5
minutes, unless the job was stopped hard.

Cancel is two-level, as GitLab's is: ``canceling`` (graceful) stops the running step and
still runs after_script; ``canceled``/``failed``/403 (hard) is the lifecycle's own cancel and
stops everything. Variables: ``raw`` values are used as they are, others have $VAR and
${VAR} expanded from the variables before them; ``file`` variables become files in the
guest (0600) whose path is the variable's value; ``masked`` values are the job's secrets.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from kata_ci import __version__
from kata_ci.errors import UserError
from kata_ci.runner.core.command import Cancel
from kata_ci.runner.core.lifecycle import Session
from kata_ci.runner.core.outcome import Outcome, OutcomeKind
from kata_ci.runner.core.spec import Command
from kata_ci.runner.gitlab.jobs import run_after_script, script_command
from kata_ci.runner.gitlab_runner.payload import GitLabJob, Step

FILE_VARS_DIR = "/run/kata-ci/variables"
_REF = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)\}|\$([A-Za-z_][A-Za-z0-9_]*)")


def guest_project_dir(job: GitLabJob) -> str:
    """/builds/<project path>, as GitLab's runners place it; /builds/project when the path
    holds anything that is not a plain name."""
    parts = job.project_path.split("/")
    if parts and all(re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,99}", p) for p in parts) \
            and len(parts) <= 8:
        return "/builds/" + "/".join(parts)
    return "/builds/project"


@dataclass(frozen=True)
class Variables:
    env: dict[str, str]
    files: dict[str, bytes]  # guest path -> content
    masked: dict[str, str]  # name -> value


def expand(value: str, known: Mapping[str, str]) -> str:
    """$VAR and ${VAR} from ``known`` (unknown: empty, as a shell would), $$ for a dollar.
    One pass over ``value``: what a variable holds is not expanded again."""
    if len(value) > MAX_VALUE:
        raise UserError(f"a value of more than {MAX_VALUE >> 20} MiB")
    return _REF.sub(lambda m: "$" if m.group(0) == "$$" else
                    known.get(m.group(1) or m.group(2), "")[:MAX_VALUE + 1], value)


MAX_VALUE = 1 << 20  # one expanded variable
MAX_TOTAL = 16 << 20  # all of them: `V2: $V1$V1`, `V3: $V2$V2`... doubles at each step


def variables(job: GitLabJob, extra: Mapping[str, str]) -> Variables:
    """The job's variables in GitLab's order (payload, then the runner's own ``extra``, which
    the job cannot override), expanded and placed. UserError when expansion grows past
    MAX_VALUE for one or MAX_TOTAL for all (the worker's memory is not the job's)."""
    known: dict[str, str] = {}
    files: dict[str, bytes] = {}
    masked: dict[str, str] = {}
    total = 0
    for var in job.variables:
        value = var.value if var.raw else expand(var.value, known)
        total += len(value)
        if len(value) > MAX_VALUE or total > MAX_TOTAL:
            raise UserError(f"variable {var.key} expands to more than "
                            f"{(MAX_VALUE if len(value) > MAX_VALUE else MAX_TOTAL) >> 20} MiB")
        if var.masked and value:
            masked[var.key] = value
        if var.file:
            path = f"{FILE_VARS_DIR}/{var.key}"
            files[path] = value.encode()
            value = path
        known[var.key] = value
    known.update(extra)
    return Variables(known, files, masked)


def runner_variables(job: GitLabJob, project_dir: str, runner_id: int) -> dict[str, str]:
    """What the runner itself sets (gitlab-runner: common/build.go GetDefaultVariables)."""
    return {"CI_BUILDS_DIR": "/builds", "CI_PROJECT_DIR": project_dir, "CI_SERVER": "yes",
            "CI_RUNNER_ID": str(runner_id), "CI_RUNNER_VERSION": __version__,
            "CI_RUNNER_REVISION": "", "CI_RUNNER_EXECUTABLE_ARCH": "linux/amd64",
            "CI_JOB_TIMEOUT": str(job.timeout), "CI_CONCURRENT_ID": "0",
            "CI_CONCURRENT_PROJECT_ID": "0", "CI_DISPOSABLE_ENVIRONMENT": "true",
            "FF_KATA_CI": "true"}


@dataclass(frozen=True)
class GitLabSteps:
    """The JobScript of a job GitLab handed us. ``graceful`` is set on ``canceling``."""

    steps: list[Step]
    files: dict[str, bytes] = field(default_factory=dict)
    graceful: Cancel = field(default_factory=Cancel)

    def run(self, session: Session) -> Outcome:
        if self.files:
            session.put_files(self.files, 0o600)
        outcome = Outcome(OutcomeKind.SUCCESS, 0, "job succeeded")
        if self._stopped(session):  # GitLab's canceling came while the VM started
            outcome = Outcome.cancelled()
        after: list[Step] = []
        for step in self.steps:
            if step.name == "after_script":
                after.append(step)
                continue
            if self._stopped(session) and outcome.kind is OutcomeKind.SUCCESS:
                outcome = Outcome.cancelled()  # between steps: the job is cancelled, not done
            failed = outcome.kind is not OutcomeKind.SUCCESS
            if not _due(step.when, failed) or \
                    outcome.kind in (OutcomeKind.SYSTEM_FAILURE, OutcomeKind.CANCELLED):
                continue
            result = session.run(Command(script_command(session, step.script)),
                                 cancel=self.graceful)
            if result.kind is OutcomeKind.SUCCESS:
                continue
            if result.kind is OutcomeKind.JOB_FAILURE and step.allow_failure:
                session.note(f"step {step.name} failed and is allowed to: {result.message}")
                continue
            outcome = result
        for step in after:
            if outcome.kind is OutcomeKind.SYSTEM_FAILURE or session.cancel.check_now():
                break  # a hard stop, or a VM that is gone: nothing more runs
            status = {OutcomeKind.SUCCESS: "success",
                      OutcomeKind.CANCELLED: "canceled"}.get(outcome.kind, "failed")
            session.note("Running after_script...")
            run_after_script(session, step.script, status)
        return outcome

    def _stopped(self, session: Session) -> bool:
        return self.graceful.is_set() or session.cancel.is_set()


def _due(when: str, failed: bool) -> bool:
    return when == "always" or (when == "on_failure") == failed
