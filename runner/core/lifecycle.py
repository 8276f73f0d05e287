"""The one job lifecycle, under every job source: prepare -> run -> finish -> cleanup.

In the spirit of gitlab-runner's executor: ``prepare`` gets a running VM from the provider
(a cancel during boot kills it), ``run`` hands the VM to the job's script through a
``Session``, ``finish`` classes whatever happened as one Outcome and notes it in the job's
log, and ``cleanup`` gives the VM back always, with Ctrl-C and SIGTERM held off until it is
done (a half-killed VM would leak its processes).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import signal
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from types import FrameType

from kata_ci.errors import SystemFailure, UserError
from kata_ci.executors.base import VM
from kata_ci.executors.provider import VMProvider, VMRequest
from kata_ci.guest.roots import hosts_file
from kata_ci.images.oci.store import Image
from kata_ci.runner.core import services
from kata_ci.runner.core.command import Cancel, CommandRequest, run_command, with_diagnostics
from kata_ci.runner.core.images import JobRoot, enter, image_env, pull, workspace_ids
from kata_ci.runner.core.outcome import Outcome, OutcomeKind
from kata_ci.runner.core.secrets import Masker, MaskingSink
from kata_ci.runner.core.sinks import LogSink, note
from kata_ci.runner.core.spec import Command, JobSpec

log = logging.getLogger("kata_ci.lifecycle")


class Session:
    """What a job's script may do with its running VM."""

    def __init__(self, spec: JobSpec, vm: VM, sink: LogSink, cancel: Cancel,
                 root: JobRoot | None = None, image: Image | None = None) -> None:
        self.spec = spec
        self.vm = vm
        self.sink = sink
        self.cancel = cancel
        self.deadline = time.monotonic() + spec.timeout if spec.timeout else None
        self.root = root  # the job's OCI image root, when it has an image
        self.image = image
        self.env = self.image_env(spec.env)

    @property
    def workdir(self) -> str:
        return self.spec.workdir

    @property
    def expired(self) -> bool:
        """The job's own deadline has passed."""
        return self.deadline is not None and time.monotonic() >= self.deadline

    def run(self, command: Command, sink: LogSink | None = None,
            cancel: Cancel | None = None) -> Outcome:
        """Run one command to its end under the job's deadline and cancel; its output goes
        to ``sink`` (a filter in front of the job's sink), by default the job's sink.
        ``cancel``: a stop of this command only (GitLab's graceful cancel), on top of the
        job's own."""
        timeout, message = command.timeout, command.timeout_message
        if command.within_job_timeout and self.deadline is not None:
            remaining = self.deadline - time.monotonic()
            if remaining <= 0:
                return Outcome.timeout(self.spec.timeout)
            if not timeout or remaining < timeout:
                timeout, message = remaining, f"job timed out after {self.spec.timeout:g}s"
        env = self.env if command.env is None else command.env
        argv, root, user = list(command.argv), "", ""
        if self.root is not None:
            if command.env is not None:
                env = self.image_env(command.env)
            argv, root, user = self.root.argv(argv), self.root.name, self.root.user
        request = CommandRequest(argv, env, command.cwd or self.workdir, timeout,
                                 self.spec.grace, message, root, user)
        if cancel is not None and cancel is not self.cancel:
            cancel = _either(cancel, self.cancel)
        return run_command(self.vm, request, sink or self.sink, cancel or self.cancel)

    def add_mask(self, value: str) -> bool:
        """Mask ``value`` in the rest of the job's output; False if too short to mask."""
        return isinstance(self.sink, MaskingSink) and self.sink.add(value)

    def image_env(self, env: Mapping[str, str]) -> Mapping[str, str]:
        """An environment with the image's Env beneath it (core/images.py)."""
        if self.image is None or self.spec.image is None:
            return env
        return image_env(self.image, env, self.spec.image)

    def _guest(self, path: str) -> str:
        return path if self.root is None else self.root.guest_path(path, self.workdir)

    def put_files(self, files: Mapping[str, bytes], mode: int = 0o644) -> None:
        """Files as the job's commands see them (in its image root, if it has one)."""
        self.vm.agent.put_files({self._guest(p): d for p, d in files.items()}, mode)

    def get_files(self, paths: Sequence[str], max_bytes: int) -> dict[str, bytes | None]:
        got = self.vm.agent.get_files([self._guest(p) for p in paths], max_bytes)
        return {p: got.get(self._guest(p)) for p in paths}

    def note(self, text: str) -> None:
        note(self.sink, text)


def _either(first: Cancel, second: Cancel) -> Cancel:
    return Cancel(poll=lambda: first.is_set() or second.is_set(), interval=0.0)


def run_job(spec: JobSpec, provider: VMProvider, sink: LogSink, cancel: Cancel) -> Outcome:
    """Run one job to its Outcome. Never raises for anything the job or the VM did.

    Every write to the job's log, its notes included, passes one MaskingSink (the job's
    secrets and what it registers at run time), flushed whatever the ending; the Outcome's
    message and console tail are masked too, since sources show them outside the sink."""
    masked = MaskingSink(sink, Masker(spec.secrets.values(), spec.mask))
    try:
        outcome = _run_job(spec, provider, masked, cancel)
    finally:
        _flush(masked)  # the job's own output, all of it, before our note on its ending
    _finish(outcome, masked)
    _flush(masked)
    return dataclasses.replace(outcome, message=masked.masker.mask_text(outcome.message),
                               diagnostics=masked.masker.mask_text(outcome.diagnostics))


def _flush(sink: MaskingSink) -> None:
    try:
        sink.flush()
    except Exception:  # a sink that fails now (Redis gone for good) must not hide the ending
        log.exception("could not write the end of the job's output to its log")


def _run_job(spec: JobSpec, provider: VMProvider, sink: LogSink, cancel: Cancel) -> Outcome:
    vm: VM | None = None
    outcome: Outcome | None = None
    image: Image | None = None
    service_images: list[Image] = []
    held = contextlib.ExitStack()  # the job's image disks: `images prune` leaves them alone
    try:
        if spec.image is not None:  # before any VM: a pull failure costs none
            note(sink, f"pulling image {spec.image.name}")
            image = pull(spec.image, provider.image_store(), provider.pull_policy)
            held.enter_context(provider.image_store().in_use(image))
        for service in spec.services:
            note(sink, f"pulling service image {service.image.name}")
            service_images.append(pull(service.image, provider.image_store(),
                                       provider.pull_policy))
            held.enter_context(provider.image_store().in_use(service_images[-1]))
        vm = _prepare(spec, provider, cancel,
                      workspace_ids(image, spec.image) if image and spec.image else (0, 0))
        if cancel.is_set():
            outcome = Outcome.cancelled("cancelled during boot")
        else:
            outcome = _run(spec, vm, sink, cancel, image, service_images)
    except KeyboardInterrupt:
        cancel.set()
        outcome = Outcome.cancelled("cancelled during boot" if vm is None else "job cancelled")
    except SystemFailure as exc:
        if cancel.is_set():
            outcome = Outcome.cancelled("cancelled during boot")
        else:
            outcome = Outcome.system_failure(exc)
    except Exception as exc:  # a bug of ours while preparing: this job fails, the run goes on
        log.exception("job %s: unexpected error while preparing its VM", spec.name)
        outcome = Outcome.system_failure(SystemFailure(f"internal error: {exc!r}"))
    finally:
        if vm is not None:
            with _uninterruptible():
                provider.release(vm, graceful=outcome is not None and outcome.ran_to_end)
        held.close()
    return outcome


def _prepare(spec: JobSpec, provider: VMProvider, cancel: Cancel,
             ids: tuple[int, int]) -> VM:
    """A running VM; a cancel during boot kills it (boot then fails, and we say cancelled)."""
    booting: list[VM] = []
    booted = threading.Event()

    def watch() -> None:
        while not booted.wait(0.2):
            if cancel.is_set() and booting:
                # Every VM the provider made: a failed restore is followed by a cold boot.
                for vm in list(booting):
                    vm.kill()
                return

    watcher = threading.Thread(target=watch, name="kata-ci-boot-cancel", daemon=True)
    watcher.start()
    try:
        return provider.acquire(VMRequest(spec.workspace, spec.guest_workdir, spec.vcpus,
                                          spec.memory_mib, spec.boot_timeout, spec.network,
                                          ids),
                                booting.append)
    finally:
        booted.set()


def _run(spec: JobSpec, vm: VM, sink: LogSink, cancel: Cancel, image: Image | None,
         service_images: list[Image]) -> Outcome:
    try:
        root = None
        hosts = services.hosts_for(spec.services)
        if image is not None and spec.image is not None:
            root = enter(vm, image, spec.image, hosts, lambda text: note(sink, text))
        elif hosts:  # kata-ci's own root: the aliases in its /etc/hosts, as the roots get
            vm.agent.put_files({"/etc/hosts": hosts_file(hosts).encode()})
        session = Session(spec, vm, sink, cancel, root, image)
        started = [(use, pulled, services.start(vm, index, use, pulled, session.env, hosts))
                   for index, (use, pulled) in enumerate(
                       zip(spec.services, service_images, strict=True), start=1)]
        if started:
            note(sink, "services: " + ", ".join(f"{u.image.name} as {', '.join(u.aliases)}"
                                               for u, _, _ in started))
            services.wait_healthy(vm, started, lambda text: note(sink, text))
        return spec.script.run(session)
    except SystemFailure as exc:
        return Outcome.system_failure(with_diagnostics(exc, vm))
    except UserError as exc:  # something in the job's own definition, found at run time
        return Outcome.job_failure(str(exc))
    except KeyboardInterrupt:
        cancel.set()
        return Outcome.cancelled()
    except Exception as exc:  # a bug of ours: this job fails, the run goes on
        log.exception("job %s: unexpected error", spec.name)
        return Outcome.system_failure(SystemFailure(f"internal error: {exc!r}"))


def _finish(outcome: Outcome, sink: LogSink) -> None:
    """The ending in the job's own log (terminal, Redis, trace), for every source alike."""
    try:
        if outcome.kind is OutcomeKind.SYSTEM_FAILURE:
            text = f"system failure: {outcome.message}"
            if outcome.diagnostics:
                text += f"\n--- last guest console lines ---\n{outcome.diagnostics}"
            note(sink, text)
        elif outcome.kind in (OutcomeKind.TIMEOUT, OutcomeKind.CANCELLED):
            note(sink, outcome.message)
    except Exception:  # a sink that fails now (Redis gone for good) must not hide the ending
        log.exception("could not write the job's ending to its log")


@contextlib.contextmanager
def _uninterruptible() -> Iterator[None]:
    """Hold off Ctrl-C/SIGTERM/SIGHUP while the VM is released (main thread only: signals
    are delivered there). The job is ending anyway, so a signal that came is dropped."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def hold(signum: int, frame: FrameType | None) -> None:
        log.info("signal %s during cleanup: finishing the cleanup first", signum)

    saved = {s: signal.signal(s, hold) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for signum, handler in saved.items():
            signal.signal(signum, handler)


@contextlib.contextmanager
def terminate_as_interrupt() -> Iterator[None]:
    """SIGTERM/SIGHUP (a CI system cancelling us, a closed terminal) cancel like Ctrl-C."""

    def interrupt(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    saved = {s: signal.signal(s, interrupt) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for signum, handler in saved.items():
            signal.signal(signum, handler)
