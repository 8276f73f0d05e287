"""Running one command in a started VM: streaming, timeout, cancel, and the one place where a
command's ending is classed as an Outcome.

Cancel follows buildkite's agent: SIGTERM to the command's process group in the guest, a
grace period, then the VM is killed; it happens exactly once however often it is asked for (a
second Ctrl-C skips the rest of the grace period).
"""

from __future__ import annotations

import contextlib
import math
import signal
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from kata_ci.errors import SystemFailure
from kata_ci.executors.base import VM
from kata_ci.runner.core.outcome import EXIT_TIMEOUT, Outcome, OutcomeKind
from kata_ci.runner.core.sinks import LogSink


class Cancel:
    """One cancel request for a job, from whatever asks: Ctrl-C or SIGTERM on the CLI, a
    pipeline's fail-fast, a flag in Redis (``poll``, asked at most every ``interval`` s)."""

    def __init__(self, poll: Callable[[], bool] | None = None, interval: float = 0.5) -> None:
        self._event = threading.Event()
        self._poll = poll
        self._interval = interval
        self._next_poll = 0.0
        self._lock = threading.Lock()

    def set(self) -> None:
        self._event.set()

    def check_now(self) -> bool:
        """is_set, asking ``poll`` now whatever the interval: for a decision that must not
        miss a request made a moment ago (whether to run GitLab's after_script)."""
        if not self._event.is_set() and self._poll is not None and self._poll():
            self._event.set()
        return self._event.is_set()

    def is_set(self) -> bool:
        if self._event.is_set() or self._poll is None:
            return self._event.is_set()
        with self._lock:
            now = time.monotonic()
            if now < self._next_poll:
                return False
            self._next_poll = now + self._interval
        if self._poll():
            self._event.set()
        return self._event.is_set()


@dataclass(frozen=True)
class CommandRequest:
    argv: Sequence[str]
    env: Mapping[str, str] = field(default_factory=dict)
    cwd: str = ""
    timeout: float = 0.0  # 0: none
    grace: float = 10.0
    timeout_message: str = ""  # what a timeout is reported as; default: this timeout
    root: str = ""  # an OCI image root the agent made (core/images.py); "": kata-ci's
    user: str = ""  # who runs it in that root (the image's User or the job's override)


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


def run_command(vm: VM, request: CommandRequest, sink: LogSink, cancel: Cancel) -> Outcome:
    """Run the request to its end. ``cancel`` is checked about ten times a second; Ctrl-C
    (KeyboardInterrupt, in the main thread) cancels too."""
    stream = vm.agent.exec(request.argv, request.env, request.cwd, root=request.root,
                           user=request.user)
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
    while not done.is_set():
        try:
            done.wait(0.1)
            if done.is_set() or canceller.reason is not None:
                continue
            if time.monotonic() > deadline:
                canceller.cancel(OutcomeKind.TIMEOUT)
            elif cancel.is_set():
                canceller.cancel(OutcomeKind.CANCELLED)
            vm.check()
        except KeyboardInterrupt:
            cancel.set()
            if not canceller.cancel(OutcomeKind.CANCELLED):
                canceller.escalate()
        except SystemFailure as exc:
            failure.append(exc)
            stream.cancel()
            break
    if canceller.reason is OutcomeKind.TIMEOUT:
        return Outcome(OutcomeKind.TIMEOUT, EXIT_TIMEOUT, request.timeout_message
                       or f"job timed out after {request.timeout:g}s")
    if canceller.reason is OutcomeKind.CANCELLED:
        return Outcome.cancelled()
    if failure:
        return Outcome.system_failure(with_diagnostics(failure[0], vm))
    assert stream.exit is not None
    if stream.exit.error:  # never started (no such program, unknown user): say it as a shell
        sink.write("stderr", f"kata-ci: {stream.exit.error}\n".encode(errors="replace"))
    return Outcome.from_exit(stream.exit)


def with_diagnostics(failure: SystemFailure, vm: VM) -> SystemFailure:
    """A lost agent connection usually means the VM died: check, to report the real cause."""
    if failure.diagnostics:
        return failure
    time.sleep(0.2)  # a dying VM process closes the socket a moment before it is reaped
    try:
        vm.check()
    except SystemFailure as underlying:
        return underlying
    return SystemFailure(str(failure.args[0]), vm.diagnostics())
