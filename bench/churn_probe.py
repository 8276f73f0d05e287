"""What the churn bench counts (bench_churn.py): this run's VMs, processes, fds, files,
cgroups, network namespaces and Redis keys, snapshotted before and after and compared."""

from __future__ import annotations

import collections
import contextlib
import ctypes
import os
import re
import struct
import sys
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import redis
from rich.console import Console

from kata_ci.executors.network import firewall
from kata_ci.executors.network.netns import NETNS_DIR
from kata_ci.executors.network.netns import PREFIX as NETNS_PREFIX
from kata_ci.executors.qemu.confine import CGROUP_PARENT, CGROUP_ROOT
from kata_ci.runner.queue.app import queue_name
from kata_ci.runner.queue.store import LEASES, PREFIX

LABEL = "default"
QUEUE = queue_name(LABEL)
VM_ID = re.compile(r"^[0-9a-f]{12}$")
JOB_IN_TEXT = re.compile(r"kata-ci-([0-9a-f]{16})-")
VM_IN_TEXT = re.compile(r"(?:/kata-ci/|kci-|/)([0-9a-f]{12})(?![0-9a-f])")
console = Console(highlight=False, width=None if sys.stdout.isatty() else 150)


# -- what this run made ----------------------------------------------------------------------

@dataclass
class Ours:
    """What belongs to this run: its VM ids (learnt from the run directory), its job ids,
    the run directory and the worker."""

    run_root: Path
    work: Path
    vm_ids: set[str] = field(default_factory=set)
    job_ids: set[str] = field(default_factory=set)
    worker_pid: int = 0

    def vm(self, vm_id: str) -> bool:
        return vm_id in self.vm_ids

    def text(self, text: str) -> bool:
        """Whether a command line or cgroup path names this run."""
        if str(self.run_root) in text or str(self.work) in text:
            return True
        if any(m in self.job_ids for m in JOB_IN_TEXT.findall(text)):
            return True
        return any(m in self.vm_ids for m in VM_IN_TEXT.findall(text))


class RunDirWatch:
    """Every name created in the run directory, by inotify: each VM makes ``<root>/<vm
    id>``, removed at teardown, so polling could miss a short-lived one."""

    IN_CREATE, IN_MOVED_TO = 0x100, 0x80

    def __init__(self, root: Path, into: set[str]) -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        self.root = root
        self.into = into
        self.fd = libc.inotify_init1(os.O_CLOEXEC)
        if self.fd < 0 or libc.inotify_add_watch(self.fd, bytes(root),
                                                  self.IN_CREATE | self.IN_MOVED_TO) < 0:
            raise OSError(ctypes.get_errno(), f"inotify on {root}")
        threading.Thread(target=self._run, name="run-dir-watch", daemon=True).start()

    def _run(self) -> None:
        while True:
            try:
                data = os.read(self.fd, 1 << 16)
            except OSError:
                return
            offset = 0
            while offset + 16 <= len(data):
                _, _, _, length = struct.unpack_from("iIII", data, offset)
                name = data[offset + 16:offset + 16 + length].rstrip(b"\0").decode(
                    errors="replace")
                offset += 16 + length
                if VM_ID.match(name):
                    self.into.add(name)

    def sweep(self) -> None:
        """Names present now (in case an event was missed)."""
        with contextlib.suppress(OSError):
            self.into.update(p.name for p in self.root.iterdir() if VM_ID.match(p.name))


# -- measuring ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class Measure:
    """One resource at one moment. ``ids``: identities (a set difference finds what is new;
    ``ours`` are this run's), else only ``count`` (a growth is a leak). ``kind``: leak (must
    not grow), history (kept on purpose; checked against ``expected``), pool (may grow by
    POOL_SLACK), info (shown only)."""

    group: str
    name: str
    count: int
    ids: frozenset[str] | None = None
    ours: frozenset[str] = frozenset()
    kind: str = "leak"
    detail: dict[str, int] = field(default_factory=dict)
    ttl: float | None = None  # Redis: the shortest time to live of the family's keys
    unit: str = ""


Snapshot = dict[str, Measure]
# redis-py's pool holds as many connections as threads ever used Redis at once (job threads,
# heartbeats, the reaper, the announcer, milestones): after warm-up it may still grow by a few
# when they happen to coincide. A connection leaked per job would show as hundreds.
POOL_SLACK = 4


@dataclass(frozen=True)
class Proc:
    pid: int
    ppid: int
    state: str
    start: str
    comm: str
    argv: list[str]

    @property
    def ident(self) -> str:
        return f"{self.pid}:{self.start}:{self.comm}"


def read(path: str | Path, mode: str = "r") -> Any:
    try:
        with open(path, mode) as f:
            return f.read()
    except OSError:
        return b"" if "b" in mode else ""


def processes() -> dict[int, Proc]:
    found: dict[int, Proc] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        stat = read(f"/proc/{entry}/stat")
        if not stat:
            continue
        close = stat.rfind(")")
        comm = stat[stat.find("(") + 1:close]
        rest = stat[close + 2:].split()
        argv = [a.decode(errors="replace") for a in
                read(f"/proc/{entry}/cmdline", "rb").split(b"\0") if a]
        found[int(entry)] = Proc(int(entry), int(rest[1]), rest[0], rest[19], comm, argv)
    return found


def descendants(procs: dict[int, Proc], root: int) -> list[Proc]:
    children: dict[int, list[int]] = collections.defaultdict(list)
    for p in procs.values():
        children[p.ppid].append(p.pid)
    out: list[Proc] = []
    todo = list(children.get(root, []))
    while todo:
        pid = todo.pop()
        out.append(procs[pid])
        todo += children.get(pid, [])
    return out


def program(p: Proc) -> str:
    """qemu | virtiofsd | pasta | '' (through trixie's loader, the program is argv[3])."""
    names = [Path(p.argv[0]).name] if p.argv else []
    if names and names[0].startswith("ld-linux") and len(p.argv) > 3:
        names.append(Path(p.argv[3]).name)
    names.append(p.comm)
    for name in names:
        if name.startswith("qemu-system-"):
            return "qemu"
        if name == "virtiofsd":
            return "virtiofsd"
        if name.split(".")[0] in ("passt", "pasta"):
            return "pasta"
    return ""


def fd_kind(target: str) -> str:
    if target.startswith(("socket:", "pipe:", "net:", "mnt:", "pid:", "user:")):
        return target.split(":")[0]
    if target.startswith("anon_inode:"):
        return "anon_inode:" + target[len("anon_inode:"):].strip("[]")
    if target.startswith("/dev/"):
        return target
    if JOB_IN_TEXT.search(target):
        return "a job's workspace"
    return "file"


def mountinfo(pid: int) -> list[tuple[str, str]]:
    """(mount point, file system type) of ``pid``'s mount namespace."""
    out = []
    for line in read(f"/proc/{pid}/mountinfo").splitlines():
        left, _, right = line.partition(" - ")
        point = left.split()[4]
        point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), point)
        out.append((point, right.split()[0] if right else ""))
    return out


def worker_sockets_to(pid: int, port: int) -> int:
    """Established TCP connections of ``pid`` to ``port`` (Redis)."""
    inodes = set()
    with contextlib.suppress(OSError):
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
    count = 0
    for table in ("tcp", "tcp6"):
        for line in read(f"/proc/{pid}/net/{table}").splitlines()[1:]:
            cols = line.split()
            if len(cols) > 9 and cols[3] == "01" and int(cols[2].split(":")[1], 16) == port \
                    and cols[9] in inodes:
                count += 1
    return count


def cgroup_parents() -> dict[str, Path]:
    """Where confine.py makes VM cgroups on this host: name -> parent directory."""
    found: dict[str, Path] = {}
    if (CGROUP_ROOT / "cgroup.controllers").is_file():
        found["v2"] = CGROUP_ROOT / CGROUP_PARENT
    for controller in ("memory", "cpu", "pids"):
        if (CGROUP_ROOT / controller).is_dir():
            found[controller] = CGROUP_ROOT / controller / CGROUP_PARENT
    return found


def family(key: str) -> str:
    if key.startswith(PREFIX):
        parts = key.split(":")
        return ":".join(parts[:2]) + ":*" if len(parts) > 2 else key
    if key.startswith("celery-task-meta-"):
        return "celery-task-meta-*"
    return key


def snapshot(ours: Ours, r: redis.Redis, redis_port: int, nic: bool) -> Snapshot:
    snap: Snapshot = {}

    def put(m: Measure) -> None:
        snap[f"{m.group}/{m.name}"] = m

    def ids(group: str, name: str, all_ids: set[str], mine: Callable[[str], bool],
            **kw: Any) -> None:
        put(Measure(group, name, len(all_ids), frozenset(all_ids),
                    frozenset(i for i in all_ids if mine(i)), **kw))

    wpid = ours.worker_pid
    alive = Path(f"/proc/{wpid}").exists()

    # processes
    procs = processes()
    family_tree = descendants(procs, wpid) if alive else []
    tree = {p.pid for p in family_tree}
    ids("processes", "descendants of the worker", {p.ident for p in family_tree}, lambda _: True,
        detail=collections.Counter(p.comm + (" (zombie)" if p.state == "Z" else "")
                                   for p in family_tree))
    status = read(f"/proc/{wpid}/status")
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    put(Measure("processes", "worker threads", int(fields.get("Threads", "0"))))
    put(Measure("processes", "worker RSS", int(fields.get("VmRSS", "0 kB").split()[0]) >> 10,
                kind="info", unit=" MiB"))
    mine = {p.ident for p in procs.values() if program(p) and (
        p.pid in tree or ours.text(" ".join(p.argv)) or ours.text(read(f"/proc/{p.pid}/cgroup")))}
    for kind, title in (("qemu", "qemu-system-* (host-wide)"),
                        ("virtiofsd", "virtiofsd (host-wide)"),
                        ("pasta", "passt/pasta (host-wide)")):
        ids("processes", title, {p.ident for p in procs.values() if program(p) == kind},
            mine.__contains__)

    # file descriptors
    kinds: collections.Counter[str] = collections.Counter()
    with contextlib.suppress(OSError):
        for fd in os.listdir(f"/proc/{wpid}/fd"):
            with contextlib.suppress(OSError):
                kinds[fd_kind(os.readlink(f"/proc/{wpid}/fd/{fd}"))] += 1
    # Redis connections are counted apart: they are a pool, not per job (POOL_SLACK).
    conns = worker_sockets_to(wpid, redis_port)
    kinds["socket"] -= conns
    put(Measure("fds", "open fds of the worker but Redis's", sum(kinds.values()),
                detail=dict(kinds)))
    put(Measure("fds", "worker connections to Redis (a pool)", conns, kind="pool"))

    # files and mounts
    run_entries = {p.name for p in ours.run_root.iterdir()} if ours.run_root.is_dir() else set()
    ids("files", "per-VM run dirs ($KATA_CI_RUN_DIR)", run_entries, lambda _: True)
    tmp = Path(tempfile.gettempdir())
    workspaces = {p.name for p in tmp.iterdir() if JOB_IN_TEXT.match(p.name)}
    ids("files", f"workspaces {tmp}/kata-ci-<job>-*", workspaces, ours.text)
    mounts = mountinfo(wpid if alive else os.getpid())
    quota = {point for point, _ in mounts if JOB_IN_TEXT.search(point)}
    ids("files", "quota mounts (worker's mounts)", quota, ours.text)
    loops = set()
    for backing in Path("/sys/block").glob("loop*/loop/backing_file"):
        name = read(backing).strip()
        if JOB_IN_TEXT.search(name):
            loops.add(f"{backing.parts[3]}:{name}")
    ids("files", "loop devices on quota images", loops, ours.text)

    # cgroups
    for parent in cgroup_parents().values():
        groups = {p.name for p in parent.iterdir() if p.is_dir()} if parent.is_dir() else set()
        where = parent.relative_to(CGROUP_ROOT)
        ids("cgroups", f"{CGROUP_ROOT}/{where}/<vm>", groups, ours.vm)

    # network
    netns = {p.name for p in NETNS_DIR.iterdir() if p.name.startswith(NETNS_PREFIX)} \
        if NETNS_DIR.is_dir() else set()
    ids("network", f"{NETNS_DIR}/{NETNS_PREFIX}<vm> (ip netns list)", netns,
        lambda n: ours.vm(n[len(NETNS_PREFIX):]))
    ns_mounts = {point for point, _ in mounts if point.startswith(f"{NETNS_DIR}/{NETNS_PREFIX}")}
    ids("network", "netns bind mounts (nsfs)", ns_mounts,
        lambda n: ours.vm(Path(n).name[len(NETNS_PREFIX):]))
    links = {line.split(":")[0].strip() for line in
             read(f"/proc/{wpid if alive else os.getpid()}/net/dev").splitlines()[2:]}
    ids("network", "links in the worker's netns", links,
        lambda n: nic or n.startswith(("tap", "veth", "kci", firewall.UPLINK_IF)))

    # Redis
    history = {f"{PREFIX}job:*", f"{PREFIX}log:*"}
    families: collections.Counter[str] = collections.Counter()
    ttls: dict[str, float] = {}
    for raw in r.scan_iter(count=1000):
        key = raw.decode(errors="replace")
        fam = family(key)
        families[fam] += 1
        if fam in history:
            continue
        ttl = cast(int, r.pttl(raw))
        if ttl >= 0:
            ttls[fam] = min(ttls.get(fam, ttl), ttl)
    for fam, n in sorted(families.items()):
        put(Measure("redis", f"keys {fam}", n, kind="history" if fam in history else "leak",
                    ttl=ttls[fam] / 1000 if fam in ttls else None))
    put(Measure("redis", f"ZCARD {PREFIX}jobs (index)",
                cast(int, r.zcard(f"{PREFIX}jobs")), kind="history"))
    put(Measure("redis", f"ZCARD {LEASES}", cast(int, r.zcard(LEASES))))
    put(Measure("redis", "HLEN unacked", cast(int, r.hlen("unacked"))))
    put(Measure("redis", "ZCARD unacked_index", cast(int, r.zcard("unacked_index"))))
    put(Measure("redis", f"LLEN {QUEUE}", cast(int, r.llen(QUEUE))))
    put(Measure("redis", f"HLEN {PREFIX}host:*", sum(
        cast(int, r.hlen(k)) for k in r.scan_iter(f"{PREFIX}host:*"))))
    return snap


@dataclass
class Row:
    group: str
    name: str
    before: str
    after: str
    leaked: int | None  # None: shown only
    note: str
    bad: bool


def compare(before: Snapshot, after: Snapshot, expected_history: int) -> list[Row]:
    rows: list[Row] = []
    for key in dict.fromkeys([*before, *after]):
        b, a = before.get(key), after.get(key)
        m = a or b
        assert m is not None
        zero = Measure(m.group, m.name, 0, frozenset() if m.ids is not None else None,
                       kind=m.kind)
        b, a = b or zero, a or zero
        note: list[str] = []
        if a.kind == "info":
            leaked = None
        elif a.kind == "history":
            leaked = abs(a.count - expected_history)
            note.append(f"retained history: expected {expected_history}")
        elif a.ids is not None and b.ids is not None:
            new = a.ids - b.ids
            mine = new & a.ours
            leaked = len(mine)
            if new - mine:
                note.append(f"+{len(new - mine)} not this run's (ignored)")
            if mine:
                note.append("left: " + ", ".join(sorted(mine)[:3]) + (" ..." if len(mine) > 3
                                                                     else ""))
        elif a.kind == "pool":
            leaked = max(0, a.count - b.count - POOL_SLACK)
            if a.count > b.count and not leaked:
                note.append(f"pool grown by {a.count - b.count} (up to {POOL_SLACK} is its peak "
                            "use, not a leak)")
        else:
            leaked = max(0, a.count - b.count)
        if a.detail or b.detail:
            grown = {k: a.detail.get(k, 0) - b.detail.get(k, 0)
                     for k in {*a.detail, *b.detail}}
            parts = [f"{k} {v:+d}" for k, v in sorted(grown.items()) if v]
            if parts:
                note.append("; ".join(parts))
        if leaked and a.ttl is not None:
            note.append(f"these keys expire, the soonest in {a.ttl / 3600:.1f} h")
        rows.append(Row(m.group, m.name, f"{b.count}{m.unit}", f"{a.count}{m.unit}", leaked,
                        "; ".join(note), bool(leaked)))
    return rows


# -- the run ---------------------------------------------------------------------------------
