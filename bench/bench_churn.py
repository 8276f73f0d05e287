"""Churn (issue 15): a soak, not a timed test. Many trivial jobs go through the real queue
(JobStore.create + Celery send_task, as `kata-ci submit --detach` does) into one real
`kata-ci worker`, and every host resource a job touches is counted before and after: what
is left over is a leak, and every leak must be zero.

Run (as root, like the worker; the default soak takes the machine for a while):
    .venv/bin/python bench/bench_churn.py                      # 1,000 jobs, network none
    .venv/bin/python bench/bench_churn.py --quick              # 20 jobs: a smoke run
    .venv/bin/python bench/bench_churn.py --network egress     # jobs get a NIC (see below)
    .venv/bin/python bench/bench_churn.py --jobs 300 --concurrency 2 --network allowlist

It starts its own redis-server (free loopback port, temporary directory), one `kata-ci
worker` (temporary config pointing at it, a private run directory via $KATA_CI_RUN_DIR,
`[vm] grace = 2` so that timeouts are quick), runs a warm-up round (one job of every kind,
so that lazily made connections and threads are not counted as leaks), takes a BEFORE
snapshot, submits the jobs, waits for all of them to end, lets the worker settle, takes an
AFTER snapshot (again every 2 s while anything still looks leaked, up to --settle-max), and
prints before / after / leaked for:

- processes: the worker's descendants (ppid walk over /proc) and threads; host-wide
  qemu-system-*, virtiofsd and passt/pasta processes (a process counts as this run's when
  it is a descendant of the worker, sits in one of this run's VM cgroups, or its command
  line names this run's VMs, jobs or run directory; others' VMs are shown, never counted);
- the worker's open file descriptors (by type) and its connections to Redis;
- per-VM run directories, queued-job workspaces (`kata-ci-<job id>-*` and their quota
  images in the temp dir), quota mounts (the worker's mount table) and loop devices;
- per-VM cgroups (`/sys/fs/cgroup/{memory,cpu,pids}/kata-ci/<vm id>` on cgroup v1,
  `/sys/fs/cgroup/kata-ci/<vm id>` on v2; confine.py);
- network namespaces (`/run/netns/kci-<vm id>`, what `ip netns list` lists, and their
  nsfs bind mounts) and the links of the worker's namespace (tap/veth/uplink);
- Redis keys by family (`kataci:ws:*`, `kataci:cancel:*`, Celery's `unacked`...) and the
  members of the shared ones (leases, unacked, the queue list, the host's job list). Job
  records and logs (`kataci:job:*`, `kataci:log:*`, the `kataci:jobs` index) are kept on
  purpose: shown as retained history, checked against the number of jobs.

VM ids are learnt by watching the private run directory with inotify (each VM makes
`<run dir>/<vm id>`), so cgroups, namespaces and processes of other kata-ci users on the
same host are told apart from this run's.

Jobs: `echo ok`; every 10th fails (exit 3); every 50th (every 10th with --quick) alternately
times out (ignoring SIGTERM, so the VM is killed after the grace) or is cancelled once it
has printed; with a NIC, every 10th fetches a page from the lab's "internet" host through
kata-ci's resolver and pasta. The final states must match: e.g. 1,000 jobs with --network
none give 880 success, 100 failed, 10 timeout, 10 cancelled.

--network egress|allowlist: the script re-runs itself under `unshare --net --mount` and
builds the network suite's lab there (tests/netlab.py): the only hosts are the lab's, so no
packet can leave the machine; the worker, Redis and every VM live in that namespace.

Also printed: jobs/s, job duration p50/p95 (the records' started_at -> finished_at), and
the outcome counts. Exit status: 0 when every leak is zero and the outcomes match, 1 when
not, 2 when the run could not be made (130 when interrupted). Teardown always (also on
Ctrl-C or SIGTERM): the worker gets SIGTERM (SIGKILL after 60 s); what of this run's is still
on the host once it has exited is listed (a leak too), then removed (orphan VMs, quota mounts,
this run's empty cgroups and namespaces); Redis is stopped, the temporary directories go.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import redis
from churn_probe import (
    JOB_IN_TEXT,
    LABEL,
    QUEUE,
    Ours,
    Row,
    RunDirWatch,
    Snapshot,
    cgroup_parents,
    compare,
    console,
    mountinfo,
    processes,
    program,
    read,
    snapshot,
)
from rich.table import Table

from kata_ci.executors.network.netns import NETNS_DIR
from kata_ci.executors.network.netns import PREFIX as NETNS_PREFIX
from kata_ci.runner.core import config as config_mod
from kata_ci.runner.core.outcome import FINAL
from kata_ci.runner.queue.app import TASK, make_app
from kata_ci.runner.queue.store import PREFIX, JobStore
from kata_ci.runner.queue.workspace import Bounds, pack

ROOT = Path(__file__).resolve().parent.parent
KATA_CI = [sys.executable, "-m", "kata_ci.runner.cli"]
UNSHARED = "KATA_CI_CHURN_UNSHARED"  # set in the re-run under unshare
GRACE = 2.0
TIMEOUT_JOB = 4.0  # the job that times out: seconds it gets
CANCEL_JOB_LIMIT = 120.0  # the job we cancel: it would end by itself only after this

# -- the jobs -----------------------------------------------------------------------------

LAB_URL = "http://internet.test/hello"
KINDS: dict[str, tuple[list[str], float | None, str]] = {  # argv, own timeout, final state
    "ok": (["sh", "-c", "echo ok"], None, "success"),
    "fail": (["sh", "-c", "echo failing; exit 3"], None, "failed"),
    "timeout": (["sh", "-c", "trap '' TERM; echo started; sleep 600"], TIMEOUT_JOB, "timeout"),
    "cancel": (["sh", "-c", "echo started; exec sleep 600"], CANCEL_JOB_LIMIT, "cancelled"),
    "net": (["sh", "-c", f"curl -sSf -o /dev/null --max-time 20 {LAB_URL} && echo fetched"],
            None, "success"),
}


def plan(n: int, fail_every: int, special_every: int, net_every: int) -> list[str]:
    """The kind of each job: every ``special_every``-th times out or is cancelled (in turn),
    every ``fail_every``-th (offset by half) fails, with a NIC every ``net_every``-th (offset
    by 3) uses the network, the rest just print."""
    kinds: list[str] = []
    specials = 0
    for i in range(1, n + 1):
        if special_every and i % special_every == 0:
            kinds.append(("timeout", "cancel")[specials % 2])
            specials += 1
        elif fail_every and i % fail_every == fail_every // 2:
            kinds.append("fail")
        elif net_every and i % net_every == min(3, net_every - 1):
            kinds.append("net")
        else:
            kinds.append("ok")
    return kinds


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_redis(work: Path) -> tuple[subprocess.Popen[bytes], int]:
    """A private redis-server; its own session, so that Ctrl-C reaches only this script."""
    if shutil.which("redis-server") is None:
        raise SystemExit("redis-server is not installed (apt-get install redis-server)")
    port = free_port()
    data = work / "redis"
    data.mkdir()
    with (work / "redis.log").open("wb") as log:
        proc = subprocess.Popen(
            ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--dir", str(data),
             "--save", "", "--appendonly", "no", "--daemonize", "no"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    client = redis.Redis(port=port)
    for _ in range(250):
        with contextlib.suppress(redis.ConnectionError):
            if client.ping():
                return proc, port
        time.sleep(0.02)
    raise RuntimeError("redis-server did not start")


def write_config(path: Path, url: str, network: str, concurrency: int) -> None:
    lines = ["[vm]", f'network = "{network}"', f"grace = {GRACE}"]
    if network == "allowlist":
        lines.append('allow = ["internet.test:80"]')
    lines += ["[queue]", f'broker = "{url}"', f"concurrency = {concurrency}"]
    if network != "none":
        from tests import netlab
        lines += ["[network]", f'dns = ["{netlab.INTERNET_V4}"]']
    path.write_text("\n".join(lines) + "\n")


def tail(path: Path, lines: int = 30) -> str:
    return "\n".join(read(path, "rb").decode(errors="replace").splitlines()[-lines:])


class Worker:
    def __init__(self, config: Path, concurrency: int, run_root: Path, log: Path) -> None:
        self.log = log
        env = {**os.environ, "KATA_CI_RUN_DIR": str(run_root)}
        with log.open("wb") as out:
            self.proc = subprocess.Popen(
                [*KATA_CI, "worker", "--config", str(config), "-c", str(concurrency)],
                env=env, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT,
                start_new_session=True)  # Ctrl-C reaches only us; we stop it with SIGTERM
        self.graceful: bool | None = None

    def wait_ready(self, limit: float) -> None:
        deadline = time.monotonic() + limit
        while b" ready." not in read(self.log, "rb"):
            if self.proc.poll() is not None:
                raise RuntimeError(f"the worker exited ({self.proc.returncode}):\n"
                                   f"{tail(self.log)}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"the worker was not ready in {limit:g}s:\n{tail(self.log)}")
            time.sleep(0.2)

    def check(self) -> None:
        if self.proc.poll() is not None:
            raise RuntimeError(f"the worker exited ({self.proc.returncode}):\n{tail(self.log)}")

    def stop(self, limit: float = 60.0) -> None:
        if self.proc.poll() is not None:
            self.graceful = self.graceful if self.graceful is not None else False
            return
        with contextlib.suppress(ProcessLookupError):
            self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(limit)
            self.graceful = True
        except subprocess.TimeoutExpired:
            console.print(f"[yellow]the worker did not stop in {limit:g}s: SIGKILL[/]")
            self.proc.kill()
            self.proc.wait()
            self.graceful = False


@dataclass
class Batch:
    ids: list[str]
    kinds: dict[str, str]
    started: float
    ended: float = 0.0


class Runner:
    def __init__(self, store: JobStore, url: str, max_timeout: float, packed: bytes,
                 ours: Ours, worker: Worker) -> None:
        self.store = store
        self.app = make_app(url, max_timeout)
        self.packed = packed
        self.ours = ours
        self.worker = worker

    def submit(self, kinds: list[str]) -> Batch:
        batch = Batch([], {}, time.time())
        for kind in kinds:
            argv, timeout, _ = KINDS[kind]
            job = self.store.create(argv, LABEL, timeout or 600.0, self.packed)
            self.ours.job_ids.add(job.id)
            self.app.send_task(TASK, args=[job.id], queue=QUEUE)
            batch.ids.append(job.id)
            batch.kinds[job.id] = kind
        return batch

    def wait(self, batch: Batch, stall: float, progress: bool) -> None:
        """Until every job of ``batch`` has ended; cancels the cancel-kind ones once they
        printed. RuntimeError when nothing ends for ``stall`` s or the worker is gone."""
        pending = list(batch.ids)
        cancelled: set[str] = set()
        last_change = shown = time.monotonic()
        r = self.store.r
        while pending:
            self.worker.check()
            pipe = r.pipeline()
            for job_id in pending:
                pipe.hget(f"{PREFIX}job:{job_id}", "state")
            states = [s.decode() if s else "" for s in pipe.execute()]
            still = []
            for job_id, state in zip(pending, states, strict=True):
                if state in FINAL:
                    continue
                still.append(job_id)
                if state == "running" and batch.kinds[job_id] == "cancel" \
                        and job_id not in cancelled and self._printed(job_id):
                    self.store.request_cancel(job_id)
                    cancelled.add(job_id)
            if len(still) != len(pending):
                last_change = time.monotonic()
            pending = still
            now = time.monotonic()
            if progress and now - shown >= 15:
                shown = now
                done = len(batch.ids) - len(pending)
                rate = done / max(1e-9, time.time() - batch.started)
                console.print(f"  {done}/{len(batch.ids)} ended, {rate:.2f} jobs/s")
            if pending and now - last_change > stall:
                raise RuntimeError(f"no job ended for {stall:g}s; still pending: "
                                   f"{', '.join(pending[:5])}...\n{tail(self.worker.log)}")
            time.sleep(0.25)
        batch.ended = time.time()

    def _printed(self, job_id: str) -> bool:
        entries = cast(list[Any], self.store.r.xrange(f"{PREFIX}log:{job_id}", count=20))
        return any(fields.get(b"s") == b"stdout" for _, fields in entries)


def outcome_rows(store: JobStore, batch: Batch) -> tuple[list[tuple[str, int, int]], list[float],
                                                         list[float]]:
    want: collections.Counter[str] = collections.Counter(
        KINDS[k][2] for k in batch.kinds.values())
    got: collections.Counter[str] = collections.Counter()
    durations: list[float] = []
    success: list[float] = []
    for job_id in batch.ids:
        job = store.get(job_id)
        got[job.state] += 1
        if job.state != KINDS[batch.kinds[job_id]][2]:  # say why, with the end of its log
            log = b"".join(d for _, d in store.read_log(job_id))[-600:]
            console.print(f"[yellow]job {job_id} ({batch.kinds[job_id]}) ended {job.state}: "
                          f"{job.message}[/]\n{log.decode(errors='replace')}", markup=True,
                          highlight=False)
        if job.started_at and job.finished_at:
            durations.append(job.finished_at - job.started_at)
            if job.state == "success":
                success.append(job.finished_at - job.started_at)
    states = [s for s in ("success", "failed", "timeout", "cancelled", "system_failure")
              if s in want or s in got] + sorted(set(got) - set(want) - {
                  "success", "failed", "timeout", "cancelled", "system_failure"})
    return [(s, want.get(s, 0), got.get(s, 0)) for s in states], durations, success


def pctl(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def leaks_of(before: Snapshot, after: Snapshot, history: int) -> list[Row]:
    return [row for row in compare(before, after, history) if row.bad]


def print_table(rows: list[Row], title: str) -> None:
    table = Table(title=title, title_justify="left")
    for name, justify in (("", "left"), ("resource", "left"), ("before", "right"),
                          ("after", "right"), ("leaked", "right"), ("note", "left")):
        table.add_column(name, justify=justify)  # type: ignore[arg-type]
    group = ""
    for row in rows:
        leaked = "-" if row.leaked is None else (f"[bold red]{row.leaked}[/]" if row.bad
                                                 else "[green]0[/]")
        table.add_row(row.group if row.group != group else "", row.name, row.before, row.after,
                      leaked, row.note)
        group = row.group
    console.print(table)


def leftovers_after_stop(ours: Ours) -> list[str]:
    """This run's VMs, workspaces and mounts still on the host once the worker has exited."""
    left: list[str] = []
    if ours.run_root.is_dir():
        left += [f"run dir {p.name}" for p in ours.run_root.iterdir()]
    for name, parent in cgroup_parents().items():
        if parent.is_dir():
            left += [f"cgroup {name}/{p.name}" for p in parent.iterdir()
                     if p.is_dir() and ours.vm(p.name)]
    if NETNS_DIR.is_dir():
        left += [f"netns {p.name}" for p in NETNS_DIR.iterdir()
                 if p.name.startswith(NETNS_PREFIX) and ours.vm(p.name[len(NETNS_PREFIX):])]
    left += [f"process {p.pid} {p.comm}" for p in processes().values()
             if program(p) and (ours.text(" ".join(p.argv))
                                or ours.text(read(f"/proc/{p.pid}/cgroup")))]
    tmp = Path(tempfile.gettempdir())
    left += [f"workspace {p.name}" for p in tmp.iterdir()
             if (m := JOB_IN_TEXT.match(p.name)) and m.group(1) in ours.job_ids]
    left += [f"mount {point}" for point, _ in mountinfo(os.getpid()) if ours.text(point)]
    return left


def cleanup_leftovers(ours: Ours) -> None:
    """After the worker: whatever of this run's is still there (a SIGKILLed worker's VMs,
    mounts), removed the way the next worker start would."""
    from kata_ci.executors.network.netns import remove_netns
    from kata_ci.executors.qemu.confine import remove_stale_cgroup
    from kata_ci.executors.qemu.orphans import reap_orphans
    from kata_ci.runner.queue import quota

    with contextlib.suppress(Exception):
        reap_orphans(ours.run_root)
    for vm_id in ours.vm_ids:  # every VM of this run is gone with its worker by now
        remove_stale_cgroup(vm_id)  # rmdir: only an empty cgroup goes
        with contextlib.suppress(OSError):
            remove_netns(vm_id)
    tmp = Path(tempfile.gettempdir())
    for path in tmp.iterdir():
        m = JOB_IN_TEXT.match(path.name)
        if m and m.group(1) in ours.job_ids:
            with contextlib.suppress(Exception):
                quota.discard(path)


def reexec_unshared() -> None:
    from tests import netlab

    if netlab.check_isolated() is None:
        return
    if os.environ.get(UNSHARED):
        raise SystemExit(f"not in an empty network namespace: {netlab.check_isolated()}")
    if os.geteuid() != 0:
        raise SystemExit("--network with a NIC needs root (network namespaces)")
    os.environ[UNSHARED] = "1"
    os.execvp("unshare", ["unshare", "--net", "--mount", "--propagation", "private", "--",
                          sys.executable, *sys.argv])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else "",
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=1000, help="jobs to churn (1000)")
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run: 20 jobs, one in 10 timing out or cancelled")
    parser.add_argument("--special-every", type=int, default=0,
                        help="every Nth job times out or is cancelled (50; 10 with --quick)")
    parser.add_argument("--concurrency", type=int, default=2, help="worker -c (2)")
    parser.add_argument("--network", choices=("none", "egress", "allowlist"), default="none",
                        help="[vm] network of the jobs; a NIC runs all under unshare --net")
    parser.add_argument("--settle", type=float, default=5.0,
                        help="seconds idle before the AFTER snapshot (5)")
    parser.add_argument("--settle-max", type=float, default=30.0,
                        help="keep re-measuring every 2 s while something looks leaked (30)")
    parser.add_argument("--stall", type=float, default=300.0,
                        help="give up when no job ends for this long (300 s)")
    parser.add_argument("--ready-timeout", type=float, default=900.0,
                        help="seconds for the worker to be ready (it builds VM templates)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = parser.parse_args()
    if args.quick:
        args.jobs = 20
    nic = args.network != "none"
    if nic:
        reexec_unshared()
    special_every = args.special_every or (10 if args.quick else 50)
    kinds = plan(args.jobs, 10, special_every, 10 if nic else 0)
    warmup = ["ok", "fail", "timeout", "cancel"] + (["net"] if nic else []) \
        + ["ok"] * max(0, args.concurrency - 1)

    def interrupted(signum: int, _: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, interrupted)
    work = Path(tempfile.mkdtemp(prefix="kci-churn-"))
    run_root = work / "run"
    run_root.mkdir()
    ours = Ours(run_root=run_root, work=work)
    status = 2
    with contextlib.ExitStack() as stack:
        redis_proc: subprocess.Popen[bytes] | None = None
        worker: Worker | None = None
        try:
            if nic:
                from tests import netlab
                stack.enter_context(netlab.lab())
            redis_proc, port = start_redis(work)
            url = f"redis://127.0.0.1:{port}/0"
            config = work / "config.toml"
            write_config(config, url, args.network, args.concurrency)
            cfg = config_mod.load(config)
            (work / "ws").mkdir()
            (work / "ws" / "README").write_text("churn\n")
            packed = pack(work / "ws", Bounds.of(cfg.queue))
            watch = RunDirWatch(run_root, ours.vm_ids)
            console.print(f"churn: {args.jobs} jobs, concurrency {args.concurrency}, network "
                          f"{args.network}; work dir {work}")
            worker = Worker(config, args.concurrency, run_root, work / "worker.log")
            ours.worker_pid = worker.proc.pid
            worker.wait_ready(args.ready_timeout)
            store = JobStore.connect(url)
            runner = Runner(store, url, cfg.queue.max_job_timeout, packed, ours, worker)
            console.print(f"worker {worker.proc.pid} ready; warm-up: {len(warmup)} jobs "
                          f"({', '.join(warmup)})")
            warm = runner.submit(warmup)
            runner.wait(warm, args.stall, progress=False)
            time.sleep(args.settle)
            watch.sweep()
            before = snapshot(ours, store.r, port, nic)
            console.print(f"BEFORE taken; submitting {args.jobs} jobs")
            batch = runner.submit(kinds)
            runner.wait(batch, args.stall, progress=True)
            history = len(warmup) + args.jobs
            time.sleep(args.settle)
            settled = args.settle
            watch.sweep()
            after = snapshot(ours, store.r, port, nic)
            while leaks_of(before, after, history) and settled < args.settle_max:
                time.sleep(2)
                settled += 2
                after = snapshot(ours, store.r, port, nic)
            rows = compare(before, after, history)
            print_table(rows, f"churn: {args.jobs} jobs (+{len(warmup)} warm-up), concurrency "
                              f"{args.concurrency}, network {args.network}; AFTER taken "
                              f"{settled:g} s after the last job ended")
            outcomes, durations, success = outcome_rows(store, batch)
            wall = batch.ended - batch.started
            table = Table("outcome", "expected", "got", title="outcomes", title_justify="left")
            for state, want, got in outcomes:
                mark = "" if want == got else " [bold red]<-[/]"
                table.add_row(state, str(want), f"{got}{mark}")
            console.print(table)
            console.print(
                f"throughput: {args.jobs / wall:.2f} jobs/s ({args.jobs / wall * 60:.0f} "
                f"jobs/min) over {wall:.1f} s, submit to last ending\n"
                f"job duration (started -> finished): all p50 {pctl(durations, .5):.2f} s, "
                f"p95 {pctl(durations, .95):.2f} s; success p50 {pctl(success, .5):.2f} s, "
                f"p95 {pctl(success, .95):.2f} s\n"
                f"VMs seen in the run directory: {len(ours.vm_ids)}")
            leaks = [row for row in rows if row.bad]
            wrong = [o for o in outcomes if o[1] != o[2]]
            status = 1 if leaks or wrong else 0
        except KeyboardInterrupt:
            console.print("[yellow]interrupted: tearing down[/]")
            status = 130
        except (RuntimeError, OSError, redis.RedisError) as exc:
            console.print(f"[bold red]churn could not run:[/] {exc}")
            status = 2
        finally:
            signal.signal(signal.SIGINT, signal.SIG_IGN)  # teardown runs to its end
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            if worker is not None:
                worker.stop()
                left = leftovers_after_stop(ours)
                if worker.graceful and status in (0, 1):
                    if left:
                        console.print("[bold red]left after the worker stopped (SIGTERM):[/] "
                                      + ", ".join(left[:10]))
                        status = 1
                    else:
                        console.print("after the worker stopped (SIGTERM): nothing of this "
                                      "run's left")
                cleanup_leftovers(ours)
            if redis_proc is not None:
                redis_proc.terminate()
                try:
                    redis_proc.wait(10)
                except subprocess.TimeoutExpired:
                    redis_proc.kill()
                    redis_proc.wait()
        # netlab's ExitStack closes here
    if args.keep:
        console.print(f"kept {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)
    verdict = {0: "[green]PASS: no leak, outcomes as submitted[/]",
               1: "[bold red]FAIL: leaks or wrong outcomes (above)[/]"}.get(status, "")
    if verdict:
        console.print(verdict)
    return status


if __name__ == "__main__":
    sys.exit(main())
