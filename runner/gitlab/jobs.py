"""GitLab CI jobs as kata-ci runs them: the job graph, the script, the predefined variables.

Scheduling follows GitLab: a job with `needs` waits for exactly those jobs; one without waits
for every job of the earlier stages. `when: on_success` needs no failure before it,
`on_failure` needs one, `always` runs regardless, `manual` runs only when named. Each job
runs before_script + script in one bash with `set -eo pipefail` (commands echoed with `$ `,
as GitLab's runner does), then after_script in a fresh shell whose failure does not fail the
job. A job with an ``image:`` runs in that image's root, with bash if the image has it, else
with sh (core/shell.py).
"""

from __future__ import annotations

import dataclasses
import re
import shlex
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from kata_ci.errors import UserError
from kata_ci.runner.core.command import Cancel
from kata_ci.runner.core.env import job_env
from kata_ci.runner.core.lifecycle import Session
from kata_ci.runner.core.outcome import JobStatus, Outcome, OutcomeKind
from kata_ci.runner.core.repo import RepoSnapshot, read_repo
from kata_ci.runner.core.schedule import JobResult, run_dag, with_needs
from kata_ci.runner.core.secrets import GITLAB_MASK
from kata_ci.runner.core.shell import preamble, script_argv
from kata_ci.runner.core.spec import Command, JobSpec, RunSettings
from kata_ci.runner.gitlab.ci_file import CIJob, Pipeline, slug
from kata_ci.runner.gitlab.image import expand_image, expand_services

AFTER_SCRIPT_TIMEOUT = 300.0  # GitLab's fixed after_script limit


def predefined_variables(project: Path, source: str = "push",
                         repo: RepoSnapshot | None = None) -> dict[str, str]:
    """CI_* variables from the local checkout (doc: ci/variables/predefined_variables.md),
    from the run's one RepoSnapshot (read here when not given)."""
    repo = repo if repo is not None else read_repo(project, changes=False)
    sha = repo.sha or "0" * 40
    branch = repo.branch or "main"
    tag = repo.tag if branch == "HEAD" else ""
    default = repo.default_branch or branch
    ref = tag or branch
    pipeline_id = str(int(time.time()))
    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    message = repo.message or repo.title
    first, _, rest = message.partition("\n")
    path = f"local/{project.name}"
    variables = {
        "CI": "true", "GITLAB_CI": "true", "CI_SERVER": "yes", "KATA_CI": "true",
        "CI_PROJECT_DIR": str(project), "CI_BUILDS_DIR": str(project.parent),
        "CI_PROJECT_NAME": project.name, "CI_PROJECT_PATH": path,
        "CI_COMMIT_SHA": sha, "CI_COMMIT_SHORT_SHA": sha[:8], "CI_COMMIT_REF_NAME": ref,
        "CI_COMMIT_REF_SLUG": slug(ref), "CI_DEFAULT_BRANCH": default,
        "CI_PIPELINE_SOURCE": source, "CI_PIPELINE_ID": pipeline_id,
        # TITLE: the full first line; DESCRIPTION: the message without it when the title is
        # under 100 characters, else the whole message (predefined_variables.md)
        "CI_COMMIT_TITLE": first, "CI_COMMIT_MESSAGE": message,
        "CI_COMMIT_DESCRIPTION": rest if len(first) < 100 else message,
        "CI_COMMIT_AUTHOR": repo.author, "CI_COMMIT_TIMESTAMP": repo.timestamp,
        "CI_COMMIT_BEFORE_SHA": "0" * 40,  # what GitLab sets for a new branch's first push
        # GitLab protects the default branch of a new project (protected_branches.md)
        "CI_COMMIT_REF_PROTECTED": "true" if not tag and branch == default else "false",
        "CI_PIPELINE_IID": "1", "CI_PIPELINE_CREATED_AT": started,
        "CI_JOB_STARTED_AT": started, "CI_JOB_ID": pipeline_id, "CI_PIPELINE_URL": "",
        "CI_JOB_URL": "", "CI_PROJECT_NAMESPACE": "local",
        "CI_PROJECT_ROOT_NAMESPACE": "local", "CI_PROJECT_TITLE": project.name,
        "CI_PROJECT_PATH_SLUG": slug(path), "CI_PROJECT_VISIBILITY": "private",
        "CI_CONFIG_PATH": ".gitlab-ci.yml", "CI_SERVER_NAME": "GitLab",
        "CI_RUNNER_DESCRIPTION": "kata-ci run (local)", "CI_RUNNER_TAGS": "[]",
        "CI_JOB_TRIGGERED": "false",
        # "set to 1 if the job does not use parallel"; a parallel job's instances override it
        "CI_NODE_TOTAL": "1",
        # every job has a VM of its own, destroyed after it
        "CI_DISPOSABLE_ENVIRONMENT": "true",
    }
    if tag:
        variables["CI_COMMIT_TAG"] = tag
    else:
        variables["CI_COMMIT_BRANCH"] = branch
    return variables


def expand(variables: Mapping[str, str], base: Mapping[str, str]) -> dict[str, str]:
    """$VAR and ${VAR} inside variable values, from earlier definitions (GitLab expands)."""
    known = dict(base)
    for key, value in variables.items():
        known[key] = re.sub(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)\}?",
                            lambda m: known.get(m.group(1), m.group(0)), value)
    return {k: known[k] for k in variables}


def job_script(lines: list[str], echo: bool = True, image: bool = False) -> str:
    """The script of a step: `set -eo pipefail`, each line echoed then run. ``image``: for
    whatever shell the job's image has (pipefail only where it is known)."""
    parts = [preamble(image)]
    for line in lines:
        if echo:
            parts.append(f"printf '\\033[32m%s\\033[0m\\n' {shlex.quote('$ ' + line)}")
        parts.append(line)
    return "\n".join(parts) + "\n"


def script_command(session: Session, lines: list[str]) -> list[str]:
    """argv running ``lines`` as GitLab does: bash in kata-ci's root (as ever); in the job's
    image, bash if it has one, else sh."""
    image = session.spec.image is not None
    return script_argv(job_script(lines, image=image), image)


@dataclass(frozen=True)
class GitLabScript:
    """before_script + script, then after_script with CI_JOB_STATUS."""

    job: CIJob

    def run(self, session: Session) -> Outcome:
        for key in self.job.unsupported:
            session.note(f"{key}: is not supported by kata-ci; ignored")
        for text in self.job.notes:
            session.note(text)
        if self.job.image is not None and session.spec.image is None:
            session.note(f"image: {self.job.image.name} expands to nothing: the job runs in "
                         "kata-ci's own root")
        outcome = session.run(Command(  # GitLab sets CI_JOB_STATUS=running for script too
            script_command(session, self.job.before_script + self.job.script),
            env={**session.spec.env, "CI_JOB_STATUS": "running"}))
        if self.job.after_script and outcome.kind is not OutcomeKind.SYSTEM_FAILURE \
                and not session.cancel.is_set():
            run_after_script(session, self.job.after_script,
                             "success" if outcome.kind is OutcomeKind.SUCCESS else "failed")
        return outcome


def run_after_script(session: Session, lines: list[str], status: str) -> None:
    """after_script as GitLab runs it: a fresh shell with CI_JOB_STATUS, 5 minutes of its
    own outside the job's timeout; its failure is noted and changes nothing."""
    after = session.run(Command(
        script_command(session, lines), env={**session.spec.env, "CI_JOB_STATUS": status},
        timeout=AFTER_SCRIPT_TIMEOUT, within_job_timeout=False,
        timeout_message=f"after_script timed out after {AFTER_SCRIPT_TIMEOUT:g}s"))
    if after.kind is not OutcomeKind.SUCCESS:
        session.note(f"after_script failed ({after.message}); the job's status is unchanged")


def select(pipeline: Pipeline, names: list[str], only: bool,
           manual: Sequence[str] = ()) -> list[CIJob]:
    """The named jobs (all but manual ones when none is named), plus what they need: their
    `needs`, or for a job without `needs` every job of the earlier stages, as GitLab orders
    them. A named job runs even if manual; ``manual`` (--manual) triggers manual jobs in the
    run. A job that needs a manual job nobody triggered is an error naming both."""
    triggered = {job.name for n in manual for job in pipeline.named(n)}
    for name in sorted(triggered):
        if pipeline.job(name).when != "manual":
            raise UserError(f"--manual {name}: the job is not manual (when: "
                            f"{pipeline.job(name).when})")
    named = [job for n in names for job in pipeline.named(n)] if names else \
        [j for j in pipeline.jobs if j.when != "manual" or j.name in triggered]
    triggered |= {job.name for job in named}
    if not names and not named:  # nothing would start: said, never an empty summary
        raise UserError(f"{pipeline.path}: every job of this pipeline is manual "
                        f"({', '.join(j.name for j in pipeline.jobs)}): trigger one with "
                        "--manual JOB, or name it")
    for job in pipeline.jobs:  # played: from here on it waits and runs as any other job
        if job.name in triggered and job.when == "manual":
            job.when, job.played = "on_success", True
    graph = GitLabGraph(pipeline, pipeline.jobs)
    chosen = named if not names else with_needs(
        pipeline.jobs, named, lambda job: [pipeline.job(n) for n in graph.after(job)], only)
    for job in [] if only else chosen:  # --only: the needed jobs are not part of the run
        for need in graph.after(job):
            if pipeline.job(need).when == "manual":
                how = "needs the manual job" if job.needs is not None else \
                    "is in a later stage than the blocking manual job (allow_failure: false)"
                raise UserError(f"{pipeline.path}:{job.line}: job {job.name!r} {how} "
                                f"{need!r}, which is not triggered: add --manual "
                                f"{shlex.quote(need)}, or name it")
    return chosen


class GitLabGraph:
    """Which jobs wait for which, and which run, as GitLab decides."""

    def __init__(self, pipeline: Pipeline, jobs: Sequence[CIJob]) -> None:
        self.pipeline = pipeline
        self.jobs = list(jobs)
        self.order = {s: i for i, s in enumerate(pipeline.stages)}

    def after(self, job: CIJob) -> list[str]:
        """What ``job`` waits for: its needs, else every job of the earlier stages except
        manual jobs allowed to fail (a manual job with allow_failure: false blocks the
        later stages: ci/jobs/job_control.md "Types of manual jobs")."""
        if job.when == "manual":
            return []
        if job.needs is not None:
            return list(job.needs)
        return [j.name for j in self.jobs if self.order[j.stage] < self.order[job.stage]
                and (j.when != "manual" or not j.allow_failure)]

    def decide(self, job: CIJob, results: Mapping[str, JobResult]) -> JobResult | None:
        if job.when == "manual":
            return JobResult(job.name, JobStatus.MANUAL, message="manual: name it to run")
        failed = any(not results[d].ok for d in self.after(job) if d in results)
        skipped = [n for n in job.needs or [] if n in results and
                   results[n].status in (JobStatus.SKIPPED, JobStatus.MANUAL)]
        if job.when == "on_success" and skipped and not failed:  # needs wait for success
            return JobResult(job.name, JobStatus.SKIPPED,
                             message=f"it needs {skipped[0]}, which did not run")
        if job.when == "always" or (job.when == "on_failure") == failed:
            return None
        why = "an earlier job failed" if failed else "no earlier job failed"
        return JobResult(job.name, JobStatus.SKIPPED, message=f"when: {job.when}, and {why}")

    def group(self, job: CIJob) -> str:
        return job.stage


class GitLabPlan(GitLabGraph):
    """The graph, plus how each job becomes a JobSpec and what its outcome means."""

    def __init__(self, pipeline: Pipeline, jobs: Sequence[CIJob], project: Path,
                 predefined: Mapping[str, str], user_vars: Mapping[str, str],
                 settings: RunSettings) -> None:
        super().__init__(pipeline, jobs)
        self.project = project
        self.predefined = predefined
        self.user_vars = user_vars
        self.settings = settings

    def spec(self, job: CIJob) -> JobSpec:
        # predefined < global < job < --var/--env-file < --secret < -e; a --secret is a
        # masked variable (file values may use it, as GitLab's project variables), like a
        # masked one of the file (masked as its value after expansion)
        secrets = self.settings.secrets
        # CI_JOB_ID: unique per job of the run (GitLab's job ids are); CI_JOB_STARTED_AT:
        # when this job's spec is made, right before its VM starts
        index = next((i for i, j in enumerate(self.pipeline.jobs) if j.name == job.name), 0)
        base = self.predefined.get("CI_PIPELINE_ID", "")
        timeout = self.settings.job_timeout(job.timeout)
        own = {"CI_JOB_ID": str((int(base) if base.isdecimal() else 0) + index + 1),
               "CI_JOB_STARTED_AT": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
               **({"CI_JOB_TIMEOUT": str(int(timeout))} if timeout else {}),
               **({"CI_JOB_MANUAL": "true"} if job.played else {}),
               **({"CI_PIPELINE_NAME": self.pipeline.name} if self.pipeline.name else {})}
        predefined = {**self.predefined, **own}
        variables = {**predefined, **expand(job.variables, {**predefined, **secrets}),
                     **self.user_vars, **secrets}
        env = job_env(variables, self.settings.env, term=self.settings.term)
        masked = {name: env[name] for name in job.masked if name in env}
        image = expand_image(job.image, env)  # its name may use the job's variables
        if image is not None:  # CI_JOB_IMAGE: "the name of the image running the job"
            env = {**env, "CI_JOB_IMAGE": image.name}
        spec = self.settings.spec(job.name, GitLabScript(job), env, self.project, timeout,
                                  secrets=masked, mask=GITLAB_MASK)
        return dataclasses.replace(spec, image=image,
                                   services=expand_services(job.services, env))

    def result(self, job: CIJob, outcome: Outcome, took: float) -> JobResult:
        allowed = job.allow_failure or (outcome.kind is OutcomeKind.JOB_FAILURE
                                        and outcome.exit_code in job.allow_exit_codes)
        return JobResult(job.name, JobStatus.of(outcome, allowed), took, outcome.exit_code,
                         outcome.message)


def schedule(pipeline: Pipeline, jobs: list[CIJob], parallel: int,
             run: Callable[[CIJob], JobResult], cancel: Cancel) -> list[JobResult]:
    graph = GitLabGraph(pipeline, jobs)
    return run_dag(jobs, graph.after, graph.decide, run, parallel, cancel)
