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
from typing import Protocol, TypeVar

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

    @property
    def ok(self) -> bool:
        return self.status.ok


class Named(Protocol):
    @property
    def name(self) -> str: ...


J = TypeVar("J", bound=Named)
Decide = Callable[[J, Mapping[str, JobResult]], JobResult | None]


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


def run_dag(jobs: Sequence[J], after: Callable[[J], Iterable[str]], decide: Decide[J],
            run: Callable[[J], JobResult], parallel: int, cancel: Cancel) -> list[JobResult]:
    """Run ``jobs`` at most ``parallel`` at once; results in the order of ``jobs``.

    Ctrl-C here (the main thread) sets ``cancel``: running jobs see it (SIGTERM, grace,
    kill), waiting ones are settled as cancelled."""
    names = {job.name for job in jobs}
    deps = {job.name: [d for d in after(job) if d in names and d != job.name] for job in jobs}
    results: dict[str, JobResult] = {}
    running: dict[Future[JobResult], J] = {}
    waiting = list(jobs)
    with ThreadPoolExecutor(max_workers=parallel) as pool:
        while waiting or running:
            try:
                progressed = _start_ready(waiting, running, results, deps, decide, run, pool,
                                          parallel, cancel)
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
    return [results.get(job.name) or JobResult(job.name, JobStatus.CANCELLED) for job in jobs]


def _start_ready(waiting: list[J], running: dict[Future[JobResult], J],
                 results: dict[str, JobResult], deps: Mapping[str, list[str]],
                 decide: Decide[J], run: Callable[[J], JobResult],
                 pool: ThreadPoolExecutor, parallel: int, cancel: Cancel) -> bool:
    progressed = False
    for job in list(waiting):
        if len(running) >= parallel:
            break  # a job is taken only when a VM slot is free, so cancel stops it
        if not all(d in results for d in deps[job.name]):
            continue
        waiting.remove(job)
        progressed = True
        settled = JobResult(job.name, JobStatus.CANCELLED) if cancel.is_set() \
            else decide(job, results)
        if settled is None:
            running[pool.submit(run, job)] = job
        else:
            results[job.name] = settled
    return progressed
