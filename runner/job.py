"""Running one command in a started VM: streaming, timeout, cancel, and the one place where
every ending is classed as an Outcome.

Cancel follows buildkite's agent: SIGTERM to the job's process group in the guest, a grace
period, then the VM is killed; it happens exactly once however often it is asked for (a
second Ctrl-C skips the rest of the grace period).
"""

from __future__ import annotations

import contextlib
import enum
import math
import signal
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from kata_ci.errors import SystemFailure
from kata_ci.executors.agent_client import Exit, StreamName
from kata_ci.executors.base import VM

EXIT_TIMEOUT = 124  # as timeout(1)
EXIT_SYSTEM_FAILURE = 125  # as docker run: the sandbox failed, not the command
EXIT_CANCELLED = 130  # as a shell after SIGINT


class OutcomeKind(enum.Enum):
    SUCCESS = "success"
    JOB_FAILURE = "job_failure"
    SYSTEM_FAILURE = "system_failure"
    TIMEOUT = "timeout"
    CANCELLED = "cancelled"


@dataclass(frozen=True)
class Outcome:
    kind: OutcomeKind
    exit_code: int  # what `kata-ci run` exits with
    message: str = ""
    diagnostics: str = ""

    @classmethod
    def from_exit(cls, ex: Exit) -> Outcome:
        if ex.exit_code == 0:
            return cls(OutcomeKind.SUCCESS, 0)
        if ex.signal:
            name = _signame(ex.signal)
            return cls(OutcomeKind.JOB_FAILURE, ex.exit_code, f"command killed by {name}")
        text = ex.error or f"command exited with status {ex.exit_code}"
        return cls(OutcomeKind.JOB_FAILURE, ex.exit_code, text)

    @classmethod
    def system_failure(cls, failure: SystemFailure) -> Outcome:
        return cls(OutcomeKind.SYSTEM_FAILURE, EXIT_SYSTEM_FAILURE, str(failure.args[0]),
                   failure.diagnostics)


def _signame(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


class LogSink(Protocol):
    """Receives output chunks as they arrive (terminal, job log store, GitLab trace...)."""

    def write(self, stream: StreamName, data: bytes) -> None: ...


@dataclass(frozen=True)
class JobRequest:
    argv: Sequence[str]
    env: Mapping[str, str] = field(default_factory=dict)
    cwd: str = ""
    timeout: float = 0.0  # 0: none
    grace: float = 10.0


class Canceller:
    """SIGTERM, grace, kill: once."""

    def __init__(self, vm: VM, exec_id: str, grace: float, done: threading.Event) -> None:
        self.vm = vm
        self.exec_id = exec_id
        self.grace = grace
        self.done = done
        self.reason: OutcomeKind | None = None
        self._lock = threading.Lock()

    def cancel(self, reason: OutcomeKind) -> bool:
        """Start cancelling in the background; False if a cancel was already under way."""
        with self._lock:
            if self.reason is not None:
                return False
            self.reason = reason
        threading.Thread(target=self._run, name="kata-ci-cancel", daemon=True).start()
        return True

    def escalate(self) -> None:
        """Skip what is left of the grace period."""
        self.vm.kill()

    def _run(self) -> None:
        # If the agent is gone, killing the VM below is all that is left to do.
        with contextlib.suppress(SystemFailure):
            self.vm.agent.signal(self.exec_id, signal.SIGTERM, whole_group=True)
        if not self.done.wait(self.grace):
            self.vm.kill()


def run_job(vm: VM, request: JobRequest, sink: LogSink,
            cancel_requested: Callable[[], bool] | None = None) -> Outcome:
    """Run the request to its end. ``cancel_requested`` is polled about twice a second (the
    daemon asks Redis); Ctrl-C (KeyboardInterrupt) cancels too."""
    stream = vm.agent.exec(request.argv, request.env, request.cwd)
    done = threading.Event()
    failure: list[SystemFailure] = []

    def pump() -> None:
        try:
            for chunk in stream:
                sink.write(chunk.stream, chunk.data)
        except SystemFailure as exc:
            failure.append(exc)
        except Exception as exc:
            failure.append(SystemFailure(f"output could not be delivered: {exc!r}"))
        finally:
            done.set()

    threading.Thread(target=pump, name="kata-ci-output", daemon=True).start()
    canceller = Canceller(vm, stream.exec_id, request.grace, done)
    deadline = time.monotonic() + request.timeout if request.timeout else math.inf
    next_poll = 0.0
    while not done.is_set():
        try:
            done.wait(0.1)
            if done.is_set() or canceller.reason is not None:
                continue
            now = time.monotonic()
            if now > deadline:
                canceller.cancel(OutcomeKind.TIMEOUT)
            elif cancel_requested is not None and now >= next_poll:
                next_poll = now + 0.5
                if cancel_requested():
                    canceller.cancel(OutcomeKind.CANCELLED)
            vm.check()
        except KeyboardInterrupt:
            if not canceller.cancel(OutcomeKind.CANCELLED):
                canceller.escalate()
        except SystemFailure as exc:
            failure.append(exc)
            stream.cancel()
            break
    if canceller.reason is OutcomeKind.TIMEOUT:
        return Outcome(OutcomeKind.TIMEOUT, EXIT_TIMEOUT,
                       f"job timed out after {request.timeout:g}s")
    if canceller.reason is OutcomeKind.CANCELLED:
        return Outcome(OutcomeKind.CANCELLED, EXIT_CANCELLED, "job cancelled")
    if failure:
        return Outcome.system_failure(_with_diagnostics(failure[0], vm))
    assert stream.exit is not None
    return Outcome.from_exit(stream.exit)


def _with_diagnostics(failure: SystemFailure, vm: VM) -> SystemFailure:
    """A lost agent connection usually means the VM died: check, to report the real cause."""
    if failure.diagnostics:
        return failure
    time.sleep(0.2)  # a dying QEMU closes the socket a moment before it is reaped
    try:
        vm.check()
    except SystemFailure as underlying:
        return underlying
    return SystemFailure(str(failure.args[0]), vm.diagnostics())
