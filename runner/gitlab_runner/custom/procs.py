"""Which processes are a job's holder, and whether gitlab-runner is still there.

Pids are reused: a holder is signalled only after /proc says it runs our user's
``python -m kata_ci.runner.gitlab_runner.custom.holder ... <state dir> <token>``, and
gitlab-runner is followed by its pid together with its start time.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from pathlib import Path

from kata_ci.runner.gitlab_runner.custom.job import StatePaths

MODULE = "kata_ci.runner.gitlab_runner.custom.holder"


def argv(paths: StatePaths, token: str, status_fd: int) -> list[str]:
    return [sys.executable, "-m", MODULE, "--status-fd", str(status_fd), str(paths.root), token]


def start_time(pid: int) -> int | None:
    """A process's start time (clock ticks since boot), or None: with the pid, it names one
    process for good (pids are reused, start times of one pid are not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return None
    fields = stat[stat.rfind(b")") + 2:].split()
    if len(fields) < 20 or fields[0] == b"Z":  # a zombie has ended all but its record
        return None
    return int(fields[19])


def parent_gone(pid: int, start: int | None) -> bool:
    """Whether the process recorded at prepare (pid, start time) has ended; pid 0: none."""
    if not pid:
        return False
    now = start_time(pid)
    return now is None or (start is not None and now != start)


def is_holder(pid: int, paths: StatePaths, token: str | None = None) -> bool:
    """Whether ``pid`` is a live holder of this state directory, run by our user (and with
    ``token``, that very one): checked before any signal, pids are reused."""
    try:
        owner = os.stat(f"/proc/{pid}").st_uid
        args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[:-1]
    except OSError:
        return False
    if owner != os.geteuid() or len(args) < 5 or args[1:3] != [b"-m", MODULE.encode()]:
        return False
    if args[-2] != os.fsencode(paths.root):
        return False
    return token is None or args[-1] == token.encode()


def find_holders(paths: StatePaths) -> set[int]:
    """Holders of this job on this host: the one its record names (token checked) and any
    other a scan of /proc finds for the same directory (an earlier attempt's)."""
    found: set[int] = set()
    with contextlib.suppress(OSError, ValueError, TypeError, KeyError):
        record = json.loads(paths.record.read_text())
        if is_holder(int(record["pid"]), paths, str(record["token"])):
            found.add(int(record["pid"]))
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != os.getpid() and is_holder(int(entry), paths):
            found.add(int(entry))
    return found
