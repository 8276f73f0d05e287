"""One scheduler for both CI formats' job graphs (GitLab stages/needs, GitHub needs).

A format says three things about a job: which jobs it waits ``after``, whether it runs or is
settled without a VM once those are done (``decide``: skipped, manual, fail-fast cancelled),
and how to ``run`` it. The scheduler takes a job only when a VM slot is free, so a cancel or a
fail-fast stops every job that has not started.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from kata_ci.runner.core.command import Cancel
from kata_ci.runner.core.outcome import JobStatus


@dataclass
class JobResult:
    name: str
    status: JobStatus
    duration: float = 0.0
    exit_code: int | None = None
    message: str = ""
    outputs: dict[str, str] = field(default_factory=dict)  # GitHub job outputs
    annotations: list[str] = field(default_factory=list)  # GitHub ::error:: etc., masked

    @property
    def ok(self) -> bool:
        return self.status.ok


class Named(Protocol):
    @property
    def name(self) -> str: ...


J = TypeVar("J", bound=Named)
Decide = Callable[[J, Mapping[str, JobResult]], JobResult | None]
# A job whose instances are known only once its needs ended (GitHub: a matrix from
# `needs.*.outputs`): None, it is an ordinary job; a list, the jobs that replace it; a
# JobResult, it is settled so (its matrix could not be built).
Expand = Callable[[J, Mapping[str, JobResult]], "list[J] | JobResult | None"]


def find_cycle(graph: Mapping[str, Sequence[str]]) -> list[str] | None:
    """A dependency cycle as a path that returns to its start (a -> b -> a), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(name: str, trail: list[str]) -> list[str] | None:
        if state.get(name) == 1:
            return [*trail, name]
        if state.get(name) == 2:
            return None
        state[name] = 1
        for dep in graph.get(name, ()):
            cycle = visit(dep, [*trail, name])
            if cycle:
                return cycle
        state[name] = 2
        return None

    for name in graph:
        cycle = visit(name, [])
        if cycle:
            return cycle[cycle.index(cycle[-1]):]
    return None


def with_needs(jobs: Sequence[J], named: Iterable[J], needs_of: Callable[[J], Iterable[J]],
               only: bool) -> list[J]:
    """The named jobs and, unless ``only``, every job they need, transitively; in the order
    of ``jobs``."""
    wanted = {job.name for job in named}
    pending = [] if only else [job for job in jobs if job.name in wanted]
    while pending:
        for need in needs_of(pending.pop()):
            if need.name not in wanted:
                wanted.add(need.name)
                pending.append(need)
    return [job for job in jobs if job.name in wanted]


class _Graph:
    """The jobs of a run and what each waits for; jobs may be replaced by their instances
    (``Expand``) while it runs, after which every waiting job's dependencies are recomputed
    (``after`` then names the instances)."""

    def __init__(self, jobs: Sequence[J], after: Callable[[J], Iterable[str]]) -> None:
        self.jobs: list[Any] = list(jobs)
        self.after = after
        self.deps: dict[str, list[str]] = {}
        self.recompute()

    def recompute(self) -> None:
        names = {job.name for job in self.jobs}
        self.deps = {job.name: [d for d in self.after(job) if d in names and d != job.name]
                     for job in self.jobs}

    def replace(self, job: Any, instances: list[Any]) -> None:
        at = self.jobs.index(job)
        self.jobs[at:at + 1] = instances
        self.recompute()


def run_dag(jobs: Sequence[J], after: Callable[[J], Iterable[str]], decide: Decide[J],
            run: Callable[[J], JobResult], parallel: int, cancel: Cancel,
            expand: Expand[J] | None = None) -> list[JobResult]:
    """Run ``jobs`` at most ``parallel`` at once; results in the order of ``jobs`` (an
    expanded job's instances in its place).

    Ctrl-C here (the main thread) sets ``cancel``: running jobs see it (SIGTERM, grace,
    kill), waiting ones are settled as cancelled."""
    graph = _Graph(jobs, after)
    results: dict[str, JobResult] = {}
    running: dict[Future[JobResult], J] = {}
    waiting = list(jobs)
    with ThreadPoolExecutor(max_workers=parallel) as pool:
        while waiting or running:
            try:
                progressed = _start_ready(waiting, running, results, graph, decide, run, pool,
                                          parallel, cancel, expand)
                if running:
                    done, _ = wait(running, timeout=0.2, return_when=FIRST_COMPLETED)
                    for future in done:
                        job = running.pop(future)
                        results[job.name] = future.result()
                elif waiting and not progressed:  # cannot happen for an acyclic graph
                    for job in waiting:
                        results[job.name] = JobResult(job.name, JobStatus.CANCELLED,
                                                      message="its needs never finished")
                    waiting.clear()
            except KeyboardInterrupt:
                cancel.set()
    return [results.get(job.name) or JobResult(job.name, JobStatus.CANCELLED)
            for job in graph.jobs]


def _start_ready(waiting: list[J], running: dict[Future[JobResult], J],
                 results: dict[str, JobResult], graph: _Graph,
                 decide: Decide[J], run: Callable[[J], JobResult],
                 pool: ThreadPoolExecutor, parallel: int, cancel: Cancel,
                 expand: Expand[J] | None) -> bool:
    progressed = False
    for job in list(waiting):
        if len(running) >= parallel:
            break  # a job is taken only when a VM slot is free, so cancel stops it
        if job not in waiting or not all(d in results for d in graph.deps[job.name]):
            continue
        waiting.remove(job)
        progressed = True
        grown = None if cancel.is_set() or expand is None else expand(job, results)
        if isinstance(grown, list):  # its instances wait in its place, decided on their own
            graph.replace(job, grown)
            waiting.extend(grown)
            waiting.sort(key=graph.jobs.index)
            continue
        settled = grown if isinstance(grown, JobResult) else \
            JobResult(job.name, JobStatus.CANCELLED) if cancel.is_set() \
            else decide(job, results)
        if settled is None:
            running[pool.submit(run, job)] = job
        else:
            results[job.name] = settled
    return progressed
