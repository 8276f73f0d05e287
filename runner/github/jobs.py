"""GitHub workflow jobs as kata-ci runs them: selection, the job graph, contexts, results.

A job waits for the jobs it `needs` (every matrix variant of each); its `if` is evaluated once
they are done, against `needs.*` aggregated over the variants (its default `success()` looks
at every job upstream); with fail-fast, a failed matrix job cancels its siblings that have not
started. A strategy or name written with `github`/`needs` expressions is built when the run
is planned (`prepare`) or once the job's needs have ended (`GitHubGraph.expand`): only then
are its instances known. `max-parallel` N: instance k also waits for instance k-N, so at most
N of a matrix run at once. Each job runs in its own VM (GitHubSteps).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from kata_ci.errors import UserError
from kata_ci.runner.core.env import job_env
from kata_ci.runner.core.outcome import JobStatus, Outcome, OutcomeKind
from kata_ci.runner.core.schedule import JobResult, run_dag, with_needs
from kata_ci.runner.core.secrets import GITHUB_MASK
from kata_ci.runner.core.spec import JobSpec, RunSettings
from kata_ci.runner.github.available import waits_for_run
from kata_ci.runner.github.container import container_image, service_uses
from kata_ci.runner.github.expr import evaluate_tree, render
from kata_ci.runner.github.steps import (
    GitHubSteps,
    JobState,
    RunContext,
    condition,
    contexts,
    flag,
    github_env,
    minutes,
)
from kata_ci.runner.github.workflow import (
    GHJob,
    Workflow,
    build,
)


def select(workflow: Workflow, names: list[str], only: bool) -> list[GHJob]:
    """Named jobs plus what they need. A job id selects all its matrix variants; a shown
    name like `test (3.11)` selects that one."""
    if not names:
        return list(workflow.jobs)
    named = [j for j in workflow.jobs if any(n in (j.key, j.name) for n in names)]
    return with_needs(workflow.jobs, named,
                      lambda job: [j for j in workflow.jobs if j.key in job.needs], only)


def github_context(predefined: Mapping[str, str], event: str, workflow: Workflow,
                   workspace: Path) -> dict[str, Any]:
    """The `github` context of a local run, from the checkout's predefined variables."""
    p = predefined
    ref_name = p["CI_COMMIT_REF_NAME"]
    ref = f"refs/tags/{ref_name}" if "CI_COMMIT_TAG" in p else f"refs/heads/{ref_name}"
    return {"event_name": event, "ref": ref, "ref_name": ref_name,
            "sha": p["CI_COMMIT_SHA"], "repository": f"local/{workspace.name}",
            "repository_owner": "local", "workspace": str(workspace), "actor": "kata-ci",
            "run_id": p["CI_PIPELINE_ID"], "run_number": "1", "run_attempt": "1",
            "workflow": workflow.name, "event": {}, "head_ref": "", "base_ref": "",
            "server_url": "https://github.com", "action": "", "ref_type":
            "tag" if "CI_COMMIT_TAG" in p else "branch"}


def prepare(workflow: Workflow, github: Mapping[str, Any]) -> Workflow:
    """The run's workflow with every strategy and name that waits only for the `github`
    context built (their instances named before the run, so they can be selected); those
    naming `needs` still wait for their needs. A bad one is reported now, before any VM."""
    jobs = list(workflow.jobs)
    ctx = {"github": dict(github), "needs": {}, "vars": {}, "inputs": {}}
    for job in list(jobs):
        if job.matrix_source is not None and not waits_for_run(
                [job.matrix_source, job.title], "needs"):
            build_in_place(workflow, jobs, job, ctx)
    return dataclasses.replace(workflow, jobs=jobs)


def build_in_place(workflow: Workflow, jobs: list[GHJob], job: GHJob,
                   ctx: Mapping[str, Any]) -> list[GHJob]:
    """``job``'s instances, put in its place in ``jobs`` (UserError if its strategy cannot
    be built); names stay unique among ``jobs`` and their ids."""
    taken = {j.name for j in jobs if j is not job} | ({j.key for j in jobs} - {job.key})
    instances = build(job, job.matrix_source, ctx,
                      f"{workflow.path}:{job.line}: job {job.key!r}", taken)
    at = jobs.index(job)
    jobs[at:at + 1] = instances
    return instances


def aggregate(results: list[JobResult]) -> dict[str, Any]:
    """needs.<job> of a matrix job: failure if any variant failed; outputs merged."""
    statuses = {r.status for r in results}
    result = ("failure" if statuses & {JobStatus.FAILED, JobStatus.TIMEOUT,
                                       JobStatus.SYSTEM_FAILURE} else
              "cancelled" if JobStatus.CANCELLED in statuses else
              "skipped" if statuses == {JobStatus.SKIPPED} else "success")
    outputs: dict[str, str] = {}
    for r in results:
        outputs.update({k: v for k, v in r.outputs.items() if v})
    return {"result": result, "outputs": outputs}


class GitHubGraph:
    """needs, `if:` and fail-fast, as GitHub decides them."""

    def __init__(self, workflow: Workflow, jobs: Sequence[GHJob], rc: RunContext) -> None:
        self.workflow = workflow
        self.jobs = list(jobs)
        self.rc = rc
        self.by_key: dict[str, list[GHJob]] = {}
        for job in self.jobs:
            self.by_key.setdefault(job.key, []).append(job)

    def after(self, job: GHJob) -> list[str]:
        names = [v.name for need in job.needs for v in self.by_key.get(need, [])]
        siblings = self.by_key.get(job.key, [])
        if job.max_parallel and job in siblings:  # at most max-parallel of them at once
            at = siblings.index(job)
            if at >= job.max_parallel:
                names.append(siblings[at - job.max_parallel].name)
        return names

    def ancestors(self, key: str) -> set[str]:
        """Every job id upstream of ``key``, through needs of needs."""
        found: set[str] = set()
        pending = [n for v in self.by_key.get(key, []) for n in v.needs]
        while pending:
            need = pending.pop()
            if need not in found:
                found.add(need)
                pending += [n for v in self.by_key.get(need, []) for n in v.needs]
        return found

    def expand(self, job: GHJob, results: Mapping[str, JobResult]) -> list[GHJob] | \
            JobResult | None:
        """A strategy or name written with expressions, built now that the job's needs have
        ended (`matrix: ${{ fromJSON(needs.plan.outputs.targets) }}`); its instances replace
        it. A strategy that cannot be built fails the job (not the run), with the reason."""
        if job.matrix_source is None:
            return None
        ctx = {"github": self.rc.github, "needs": {n: self.need(n, results) for n in job.needs},
               "vars": {}, "inputs": {}}
        try:
            instances = self.build(job, ctx)
        except UserError as exc:
            return JobResult(job.name, JobStatus.FAILED, message=str(exc))
        return instances

    def build(self, job: GHJob, ctx: Mapping[str, Any]) -> list[GHJob]:
        """``job``'s instances in its place (UserError if its strategy cannot be built)."""
        instances = build_in_place(self.workflow, self.jobs, job, ctx)
        self.by_key[job.key] = instances
        return instances

    def need(self, key: str, results: Mapping[str, JobResult]) -> dict[str, Any]:
        """needs.<key> once all its variants are done; a job outside the selection (--only)
        counts as succeeded."""
        variants = self.by_key.get(key, [])
        if key not in self.rc.needs and variants and all(v.name in results for v in variants):
            self.rc.needs[key] = aggregate([results[v.name] for v in variants])
        return self.rc.needs.get(key, {"result": "success", "outputs": {}})

    def decide(self, job: GHJob, results: Mapping[str, JobResult]) -> JobResult | None:
        siblings = self.by_key[job.key]
        if job.fail_fast and any(results[s.name].status is JobStatus.FAILED
                                 for s in siblings if s.name in results):
            return JobResult(job.name, JobStatus.CANCELLED)
        needs = {n: self.need(n, results) for n in job.needs}
        # success() and failure() look at every job upstream, not only the direct needs
        # ("If you have a chain of dependent jobs, failure() returns true if any ancestor job
        # fails"): a job is skipped when anything in its chain did not succeed, as GitHub
        # also skips it after a skipped ancestor (actions/runner#491)
        upstream = [self.need(a, results)["result"] for a in self.ancestors(job.key)]
        chain_ok = all(r == "success" for r in upstream)
        chain_failed = any(r == "failure" for r in upstream)
        cancelled = self.rc.cancelled
        functions: dict[str, Callable[..., Any]] = {
            "success": lambda: chain_ok and not cancelled.is_set(), "always": lambda: True,
            "failure": lambda: chain_failed, "cancelled": cancelled.is_set}
        # jobs.<job_id>.if may name github, needs, vars and inputs (context availability)
        ctx = {"github": self.rc.github, "needs": needs, "vars": {}, "inputs": {}}
        if condition(job.if_, ctx, functions):
            return None
        return JobResult(job.name, JobStatus.SKIPPED, message="if: condition not met")

    def finish(self, results: Mapping[str, JobResult]) -> None:
        """Every finished job's needs.<key> for the caller."""
        for key in self.by_key:
            self.need(key, results)

    def group(self, job: GHJob) -> str:
        return self.workflow.name


class GitHubPlan(GitHubGraph):
    def __init__(self, workflow: Workflow, jobs: Sequence[GHJob], rc: RunContext,
                 settings: RunSettings) -> None:
        super().__init__(workflow, jobs, rc)
        self.settings = settings
        self.scripts: dict[str, GitHubSteps] = {}

    def spec(self, job: GHJob) -> JobSpec:
        early = contexts(job, JobState(), self.rc)  # github, needs, matrix, secrets...
        job = dataclasses.replace(job, env={k: render(v, early) for k, v in job.env.items()},
                                  timeout_minutes=minutes(job.timeout_minutes, early))
        # runs-on picks a machine on GitHub; here every job has its VM: evaluated (a bad
        # expression fails the job, as on GitHub), then ignored
        evaluate_tree(job.runs_on, early)
        base = job_env(github_env(self.rc, job), term=self.settings.term)
        script = GitHubSteps(job, self.rc, base, self.settings.env)
        self.scripts[job.name] = script
        own = float(job.timeout_minutes) * 60 if job.timeout_minutes else None
        ctx = contexts(job, JobState(), self.rc)  # container: matrix, github, secrets...
        image, secrets, script.notes = container_image(job.container,
                                                       lambda text: render(text, ctx))
        services, more, notes = service_uses(job.services, lambda text: render(text, ctx))
        script.notes += notes
        spec = self.settings.spec(job.name, script, base, self.rc.workspace,
                                  self.settings.job_timeout(own), secrets={**secrets, **more},
                                  mask=GITHUB_MASK)
        return dataclasses.replace(spec, image=image, services=services)

    def result(self, job: GHJob, outcome: Outcome, took: float) -> JobResult:
        script = self.scripts.pop(job.name, None)
        state = script.state if script else None
        ctx = contexts(job, state, self.rc) if state else {"matrix": job.matrix}
        try:
            outputs = {k: render(v, ctx) for k, v in job.outputs.items()} if state else {}
            allowed = flag(job.continue_on_error, ctx)
        except UserError as exc:  # a bad expression in outputs/continue-on-error
            return JobResult(job.name, JobStatus.FAILED, took, outcome.exit_code,
                             f"{outcome.message}; {exc}".lstrip("; "))
        return JobResult(job.name, JobStatus.of(outcome, allowed), took, outcome.exit_code,
                         "" if outcome.kind is OutcomeKind.SUCCESS else outcome.message,
                         outputs=outputs, annotations=list(state.annotations) if state else [])


def schedule(workflow: Workflow, jobs: list[GHJob], parallel: int,
             run: Callable[[GHJob], JobResult], rc: RunContext) -> list[JobResult]:
    graph = GitHubGraph(workflow, jobs, rc)
    results = run_dag(jobs, graph.after, graph.decide, run, parallel, rc.cancelled,
                      graph.expand)
    graph.finish({r.name: r for r in results})
    return results

