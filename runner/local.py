"""``kata-ci run -- CMD``: one command in a fresh microVM over the current directory.

Stages (as the daemon will use them): ACQUIRE (images, accel, orphans) -> BOOT -> RUN ->
CLEANUP. Every way out goes through CLEANUP; every ending is an Outcome.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

from kata_ci import paths
from kata_ci.errors import SystemFailure, UserError
from kata_ci.executors.accel import choose
from kata_ci.executors.base import VMSpec
from kata_ci.executors.qemu.backend import QemuBackend, reap_orphans
from kata_ci.images.build import load_current
from kata_ci.runner.config import Config
from kata_ci.runner.job import EXIT_CANCELLED, JobRequest, LogSink, Outcome, OutcomeKind, run_job

GUEST_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
Notify = Callable[[str], None]


class TerminalSink:
    """Guest stdout to our stdout; stderr (and stored kata-ci notes) to stderr; unbuffered."""

    def write(self, stream: str, data: bytes) -> None:
        target = sys.stdout.buffer if stream == "stdout" else sys.stderr.buffer
        target.write(data)
        target.flush()


@dataclass(frozen=True)
class LocalRun:
    argv: Sequence[str]
    workspace: Path
    config: Config
    env: Mapping[str, str]


def guest_env(extra: Mapping[str, str]) -> dict[str, str]:
    """The job's whole environment: nothing of the host leaks in unless asked for (--env)."""
    env = {"PATH": GUEST_PATH, "HOME": "/root", "LANG": "C.UTF-8", "CI": "true",
           "KATA_CI": "true"}
    if "TERM" in os.environ:
        env["TERM"] = os.environ["TERM"]
    env.update(extra)
    return env


def parse_env(items: Sequence[str]) -> dict[str, str]:
    """--env K=V sets, --env K passes the host's value (as docker run -e)."""
    env: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not key or not key.replace("_", "a").isalnum() or key[0].isdigit():
            raise UserError(f"--env {item!r}: expected NAME=VALUE or NAME")
        if not sep:
            if key not in os.environ:
                raise UserError(f"--env {key}: not set on the host")
            value = os.environ[key]
        env[key] = value
    return env


def check_workspace(path: Path) -> Path:
    resolved = path.resolve()
    if not resolved.is_dir():
        raise UserError(f"workspace {path} is not a directory")
    if any(ch in str(resolved) for ch in "\n\0"):
        raise UserError(f"workspace path {resolved!r} has characters a guest path cannot hold")
    return resolved


def acquire(config: Config, notify: Notify) -> tuple[QemuBackend, VMSpec]:
    """Images, acceleration, and the orphans of earlier runs that were killed outright."""
    cache = paths.cache_dir()
    manifest = load_current(cache)
    run_root = paths.run_dir()
    for vm_id in reap_orphans(run_root):
        notify(f"removed VM {vm_id} left by a kata-ci process that no longer runs")
    decision = choose(config.vm.accel, manifest, cache, run_root)
    if decision.fresh and decision.accel == "tcg":
        notify(f"using TCG software emulation, not KVM: {decision.reason} "
               "Jobs run several times slower; `kata-ci doctor` explains.")
    spec = VMSpec(kernel=Path(manifest.kernel.path), initramfs=Path(manifest.initramfs.path),
                  rootfs=Path(manifest.rootfs.path), vcpus=config.vm.vcpus,
                  memory_mib=config.vm.memory_mib)
    return QemuBackend(decision.accel, run_root), spec


def run_local(job: LocalRun, sink: LogSink, notify: Notify) -> Outcome:
    backend, base = acquire(job.config, notify)
    spec = dataclasses.replace(base, workspace=job.workspace)
    vm = backend.create(spec)
    with _terminate_as_interrupt():
        try:
            try:
                vm.start(job.config.vm.boot_timeout)
            except SystemFailure as exc:
                return Outcome.system_failure(exc)
            request = JobRequest(argv=job.argv, env=guest_env(job.env), cwd=spec.workdir or "",
                                 timeout=job.config.vm.timeout, grace=job.config.vm.grace)
            outcome = run_job(vm, request, sink)
            if outcome.kind in (OutcomeKind.SUCCESS, OutcomeKind.JOB_FAILURE):
                vm.stop()
            return outcome
        except KeyboardInterrupt:  # during boot: nothing runs in the guest yet
            return Outcome(OutcomeKind.CANCELLED, EXIT_CANCELLED, "cancelled during boot")
        finally:
            vm.kill()


@contextlib.contextmanager
def _terminate_as_interrupt() -> Iterator[None]:
    """SIGTERM/SIGHUP (a CI system cancelling us, a closed terminal) cancel like Ctrl-C."""

    def interrupt(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    saved = {s: signal.signal(s, interrupt) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for signum, handler in saved.items():
            signal.signal(signum, handler)
