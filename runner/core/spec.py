"""``JobSpec``: what every job source builds, and the one lifecycle runs.

`kata-ci run -- CMD`, a GitLab CI-file job, a GitHub workflow job and a queued job all become
a JobSpec. What differs between them is only the ``script``: a plain list of commands, GitLab's
script + after_script, or GitHub's steps (which decide at run time what runs next, from what
earlier steps wrote). A script sees the VM only through a ``Session``.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from kata_ci.errors import UserError
from kata_ci.executors.network.policy import NONE, NetworkPolicy, narrow
from kata_ci.runner.core.images import ImageUse
from kata_ci.runner.core.outcome import Outcome, OutcomeKind
from kata_ci.runner.core.secrets import GITLAB_MASK, check_secrets
from kata_ci.runner.core.services import ServiceUse

if TYPE_CHECKING:
    from kata_ci.runner.core.lifecycle import Session


@dataclass(frozen=True)
class Command:
    """One process in the job's VM."""

    argv: Sequence[str]
    env: Mapping[str, str] | None = None  # None: the job's environment
    cwd: str = ""  # "": the workspace
    timeout: float = 0.0  # its own limit, 0: none; the job's deadline applies as well...
    within_job_timeout: bool = True  # ...unless False (GitLab's after_script: 5 min of its own)
    timeout_message: str = ""  # how its own timeout is reported


class JobScript(Protocol):
    """What runs in the VM once it is up. Returns the job's outcome; may raise
    SystemFailure (the lifecycle classes it), never anything for a job's own failure."""

    def run(self, session: Session) -> Outcome: ...


@dataclass(frozen=True)
class Commands:
    """Commands one after another; the first that does not succeed ends the job."""

    commands: Sequence[Command]

    def run(self, session: Session) -> Outcome:
        outcome = Outcome.job_failure("no command to run")
        for command in self.commands:
            outcome = session.run(command)
            if outcome.kind is not OutcomeKind.SUCCESS:
                break
        return outcome


@dataclass(frozen=True)
class JobSpec:
    """Everything the lifecycle needs to run one job, whoever asked for it.

    ``image``: the OCI image the job's commands run in (core/images.py); None: kata-ci's own
    root filesystem. ``network``: what the VM may reach (executors/network/policy.py).
    ``secrets`` reach the job only through ``env`` (over the agent channel); the lifecycle
    masks their values in every sink of the job, with ``mask`` (GitLab's ``[MASKED]``,
    GitHub's ``***``) in their place.
    """

    name: str
    script: JobScript
    env: Mapping[str, str]  # complete: built by core.env.job_env, nothing else is added
    workspace: Path  # shared into the VM over virtio-fs
    guest_workdir: str | None = None  # where the workspace appears; default: the same path
    timeout: float = 0.0  # the whole job, 0: none
    grace: float = 10.0  # SIGTERM -> kill on cancel and timeout
    boot_timeout: float = 60.0
    vcpus: int = 2
    memory_mib: int = 1024
    network: NetworkPolicy = NONE  # mode none: no NIC at all
    secrets: Mapping[str, str] = field(default_factory=dict)  # name -> value, masked in logs
    mask: str = GITLAB_MASK
    image: ImageUse | None = None
    services: tuple[ServiceUse, ...] = ()  # core/services.py: in the same VM, own roots

    def __post_init__(self) -> None:
        check_secrets(self.secrets)  # a value too short to mask never reaches a VM

    @property
    def workdir(self) -> str:
        return self.guest_workdir or str(self.workspace)


@dataclass(frozen=True)
class RunSettings:
    """What the configuration and the command line say about every job of one run."""

    timeout: float = 3600.0  # [vm] timeout or --timeout; 0: none
    timeout_flag: bool = False  # --timeout was given: it wins over a CI file's own timeout
    grace: float = 10.0
    boot_timeout: float = 60.0
    vcpus: int = 2
    memory_mib: int = 1024
    env: Mapping[str, str] = field(default_factory=dict)  # -e: over every other variable
    secrets: Mapping[str, str] = field(default_factory=dict)  # --secret: masked in every job
    term: str | None = None  # the user's TERM, when a terminal is behind the run
    network: NetworkPolicy = NONE  # the label's (or [vm]'s, or --network's) policy

    def job_timeout(self, own: float | None) -> float:
        """A CI file's own job timeout (GitLab `timeout:`, GitHub `timeout-minutes`) when it
        sets one, else kata-ci's; an explicit --timeout beats both."""
        return self.timeout if self.timeout_flag or not own else own

    def spec(self, name: str, script: JobScript, env: Mapping[str, str], workspace: Path,
             timeout: float | None = None, secrets: Mapping[str, str] | None = None,
             mask: str = GITLAB_MASK) -> JobSpec:
        """``secrets``: the job's own masked values, on top of --secret's. A job narrows its
        network with the variables KATA_CI_NETWORK and KATA_CI_NETWORK_ALLOW (never wider
        than the runner's policy: a UserError naming the job)."""
        return JobSpec(name=name, script=script, env=env, workspace=workspace,
                       network=job_network(self.network, env, f"job {name!r}"),
                       timeout=self.timeout if timeout is None else timeout,
                       grace=self.grace, boot_timeout=self.boot_timeout, vcpus=self.vcpus,
                       memory_mib=self.memory_mib, secrets={**self.secrets, **(secrets or {})},
                       mask=mask)


def job_network(ceiling: NetworkPolicy, env: Mapping[str, str], source: str) -> NetworkPolicy:
    """The runner's policy, narrowed by the job's own KATA_CI_NETWORK(_ALLOW) variables."""
    mode = env.get("KATA_CI_NETWORK") or None
    allow = tuple(env.get("KATA_CI_NETWORK_ALLOW", "").split())
    return narrow(ceiling, mode, allow, f"{source}: KATA_CI_NETWORK")


def check_workspace(path: Path) -> Path:
    """The workspace a user named, resolved; UserError if it cannot be shared."""
    resolved = path.resolve()
    if not resolved.is_dir():
        raise UserError(f"workspace {path} is not a directory")
    if any(ch in str(resolved) for ch in "\n\0"):
        raise UserError(f"workspace path {resolved!r} has characters a guest path cannot hold")
    return resolved


@contextlib.contextmanager
def checkout_lock(root: Path) -> Iterator[None]:
    """One `kata-ci run` at a time per checkout, for as long as its jobs run.

    The file server does not carry a guest's file locks to the host (virtiofsd 1.13 has no
    POSIX/flock forwarding), so two runs in one checkout would not see each other's locks
    (a package manager's lock file, a build tool's): the second run stops with a clear
    message instead. The lock is flock(2) on the directory itself: nothing is written into
    the checkout, and it ends with the process, however it ends.
    """
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UserError(f"{root} is busy: another `kata-ci run` is running jobs in this "
                            "checkout; wait for it or use another checkout") from None
        yield
    finally:
        os.close(fd)
