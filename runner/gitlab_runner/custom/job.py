"""What gitlab-runner hands a custom-executor driver, validated (docs/executors/custom.md).

gitlab-runner runs each stage with its own environment plus the job's variables prefixed
``CUSTOM_ENV_``, and ``BUILD_FAILURE_EXIT_CODE`` / ``SYSTEM_FAILURE_EXIT_CODE`` (read, never
assumed). The job's variables are the job's: hostile. Of them only the job id, the runner id
(or short token) and the timeout are used on the host, each checked against a strict pattern
before it names anything; the rest only ever reaches the guest, as its environment.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

PREFIX = "CUSTOM_ENV_"
GUEST_BUILDS = "/builds"  # config_exec's builds_dir: the job's share, inside the VM
GUEST_CACHE = "/cache"  # config_exec's cache_dir: inside the VM, gone with it
DEFAULT_TIMEOUT = 3600  # s, when CI_JOB_TIMEOUT is absent
TIMEOUT_MARGIN = 300  # s the holder outlives the job's timeout before it gives up on its own
MAX_TIMEOUT = 7 * 24 * 3600
MAX_SCRIPT = 3 << 20  # the agent's PutFiles carries at most 4 MiB per call
SOCKET_PATH_MAX = 107  # sun_path, minus its NUL

_JOB_ID = re.compile(r"[0-9]{1,20}")
_RUNNER_ID = re.compile(r"[0-9]{1,20}")
_SHORT_TOKEN = re.compile(r"[A-Za-z0-9_-]{1,64}")
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_STAGE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
_CODE = re.compile(r"[0-9]{1,3}")

Kind = Literal["build", "system"]


class StageError(Exception):
    """A stage cannot go on: ``kind`` says whose fault (the job's: build; ours: system)."""

    def __init__(self, message: str, kind: Kind = "system") -> None:
        super().__init__(message)
        self.kind = kind


class UsageError(Exception):
    """Not called the way gitlab-runner calls a driver (the exit codes are missing)."""


@dataclass(frozen=True)
class ExitCodes:
    build: int
    system: int

    def of(self, kind: Kind) -> int:
        return self.build if kind == "build" else self.system


def exit_codes(environ: Mapping[str, str]) -> ExitCodes:
    """BUILD_FAILURE_EXIT_CODE and SYSTEM_FAILURE_EXIT_CODE, as gitlab-runner sets them."""
    found = []
    for name in ("BUILD_FAILURE_EXIT_CODE", "SYSTEM_FAILURE_EXIT_CODE"):
        value = environ.get(name, "")
        if not _CODE.fullmatch(value) or not 1 <= int(value) <= 255:
            what = "is not set" if not value else f"is {value!r}, not an exit status 1-255"
            raise UsageError(f"{name} {what}: `kata-ci gitlab-executor` is meant to be "
                             "run by gitlab-runner's custom executor")
        found.append(int(value))
    return ExitCodes(*found)


def job_variables(environ: Mapping[str, str]) -> dict[str, str]:
    """The job's variables (CUSTOM_ENV_NAME -> NAME): the guest's environment. Names a
    process environment cannot carry are left out."""
    return {name[len(PREFIX):]: value for name, value in environ.items()
            if name.startswith(PREFIX) and _NAME.fullmatch(name[len(PREFIX):])}


def job_key(variables: Mapping[str, str]) -> str:
    """``<runner>-<job>``: names the job's state directory on this host. The runner part
    keeps two runners on one host apart (job ids are per GitLab instance)."""
    job = variables.get("CI_JOB_ID", "")
    if not _JOB_ID.fullmatch(job):
        raise StageError(f"CUSTOM_ENV_CI_JOB_ID {_shown(job)} is not a job id")
    runner = variables.get("CI_RUNNER_ID", "")
    if _RUNNER_ID.fullmatch(runner):
        return f"{runner}-{job}"
    token = variables.get("CI_RUNNER_SHORT_TOKEN", "")
    if _SHORT_TOKEN.fullmatch(token):
        return f"t{token}-{job}"
    raise StageError("neither CUSTOM_ENV_CI_RUNNER_ID nor CUSTOM_ENV_CI_RUNNER_SHORT_TOKEN "
                     "names a runner")


def job_timeout(variables: Mapping[str, str]) -> int:
    """CI_JOB_TIMEOUT in seconds (default 3600); anything but a plain number is ignored."""
    value = variables.get("CI_JOB_TIMEOUT", "")
    if not value.isascii() or not value.isdigit() or len(value) > 9 or int(value) == 0:
        return DEFAULT_TIMEOUT
    return min(int(value), MAX_TIMEOUT)


def check_stage(stage: str) -> str:
    """A stage name as gitlab-runner passes it (prepare_script, get_sources, step_script...)."""
    if not _STAGE.fullmatch(stage):
        raise StageError(f"stage name {_shown(stage)} is not one gitlab-runner uses")
    return stage


def network_request(variables: Mapping[str, str]) -> dict[str, str]:
    """The job's own network wishes (README, Network: a job narrows, never widens)."""
    return {k: variables[k] for k in ("KATA_CI_NETWORK", "KATA_CI_NETWORK_ALLOW")
            if k in variables}


@dataclass(frozen=True)
class StatePaths:
    """One job's state on this host: ``<run dir>/gitlab-<key>/``, mode 0700."""

    root: Path

    @classmethod
    def of(cls, run_root: Path, key: str) -> StatePaths:
        paths = cls(run_root / f"gitlab-{key}")
        if len(str(paths.socket)) > SOCKET_PATH_MAX:
            raise StageError(f"kata-ci's run directory {run_root} is too long for a unix "
                             "socket path: set KATA_CI_RUN_DIR to a shorter one")
        return paths

    @property
    def socket(self) -> Path:
        return self.root / "holder.sock"

    @property
    def record(self) -> Path:  # written by the holder: its pid and token
        return self.root / "holder.json"

    @property
    def job(self) -> Path:  # written by prepare: what the holder starts (no job variables)
        return self.root / "job.json"

    @property
    def log(self) -> Path:  # the holder's stdout and stderr
        return self.root / "holder.log"

    @property
    def builds(self) -> Path:  # shared into the VM at /builds
        return self.root / "builds"


def _shown(value: str) -> str:
    return repr(value[:40] + ("..." if len(value) > 40 else "")) if value else "(not set)"
