"""Host process helpers shared by the backend (reaping VMs) and the worker (reaping jobs)."""

from __future__ import annotations

import os


def pid_alive(pid: object) -> bool:
    """Whether a process with this pid exists (any owner); False for a non-int."""
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
