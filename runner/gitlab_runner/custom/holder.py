"""The process that owns one GitLab job's VM between gitlab-runner's separate stage processes.

`prepare` starts it detached (its own session, stdio to ``holder.log`` in the job's state
directory) as ``python -m kata_ci.runner.gitlab_runner.custom.holder --status-fd N DIR TOKEN``.
It acquires the VM through the provider in its main thread (the VM processes die with that
thread: the jail's parent-death signal), reports progress and then ``ready`` (or the error)
over the status pipe to `prepare`, and serves each `run` stage on its unix socket
(protocol.py). It ends, releasing the VM and removing the state directory, when `cleanup`
sends SIGTERM, when gitlab-runner (the process that ran `prepare`) is gone, or when the job's
timeout plus a margin has passed. Killed outright, its VM processes die with it and the next
`cleanup` or provider start removes what is left.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import os
import shutil
import signal
import socket
import sys
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import IO, Any

from kata_ci.errors import KataCIError, SystemFailure, UserError
from kata_ci.executors.base import VM
from kata_ci.executors.network.policy import NONE, NetworkPolicy
from kata_ci.executors.provider import VMProvider
from kata_ci.runner.core import config as config_mod
from kata_ci.runner.core.command import Cancel, CommandRequest, run_command
from kata_ci.runner.core.env import job_env
from kata_ci.runner.core.outcome import OutcomeKind
from kata_ci.runner.core.sinks import Stream
from kata_ci.runner.core.spec import job_network
from kata_ci.runner.gitlab_runner.custom import protocol as proto
from kata_ci.runner.gitlab_runner.custom.job import (
    GUEST_BUILDS,
    StageError,
    StatePaths,
    check_stage,
)
from kata_ci.runner.gitlab_runner.custom.procs import parent_gone

GUEST_SCRIPTS = "/tmp/kata-ci-gitlab"  # each stage's script, put there by PutFiles
POLL = 0.5  # s between looks at gitlab-runner's pid and the deadline

log = logging.getLogger("kata_ci.gitlab_executor.holder")


@dataclass(frozen=True)
class VMSettings:
    vcpus: int
    memory_mib: int
    network: NetworkPolicy
    note: str = ""  # said to the job (network narrowed to none without root)


def vm_settings(cfg: config_mod.Config, label: str | None,
                request: Mapping[str, str]) -> VMSettings:
    """The label's VM size and network policy, narrowed (never widened) by the job's own
    KATA_CI_NETWORK(_ALLOW). StageError: system for the operator's config, build for the
    job's request."""
    from kata_ci.executors.network.netns import available

    if label is not None and label not in cfg.labels:
        known = ", ".join(sorted(cfg.labels)) or "none"
        raise StageError(f"--label {label}: {cfg.source} has no [labels.{label}] "
                         f"(labels: {known})")
    own = cfg.labels.get(label, {}) if label else {}
    try:
        ceiling = cfg.policy(label)
    except UserError as exc:
        raise StageError(str(exc)) from None
    note = ""
    why_not = available()
    if ceiling.nic and why_not:
        note = f"network: none ({why_not}); the job runs without a NIC"
        ceiling = NONE
    try:
        network = job_network(ceiling, request, "job")
    except UserError as exc:
        raise StageError(str(exc), "build") from None
    return VMSettings(own.get("vcpus", cfg.vm.vcpus), own.get("memory_mib", cfg.vm.memory_mib),
                      network, note)


class StageOutput:
    """A LogSink that frames output to one `run` client; a client gone cancels its command."""

    def __init__(self, conn: socket.socket, cancel: Cancel) -> None:
        self.conn = conn
        self.cancel = cancel
        self.lock = threading.Lock()
        self.gone = False

    def write(self, stream: Stream, data: bytes) -> None:
        kind = {"stdout": proto.STDOUT, "stderr": proto.STDERR}.get(stream, proto.NOTE)
        for start in range(0, len(data), proto.MAX_FRAME):
            self.send(kind, data[start:start + proto.MAX_FRAME])

    def send(self, kind: bytes, payload: bytes) -> None:
        with self.lock:
            if self.gone:
                return
            try:
                proto.send(self.conn, kind, payload)
            except OSError:
                self.gone = True
                self.cancel.set()


class Holder:
    def __init__(self, paths: StatePaths, token: str, status: IO[str] | None) -> None:
        self.paths = paths
        self.token = token
        self.status = status
        self.stop = threading.Event()
        self.reason = ""
        self.vm: VM | None = None
        self.booting: list[VM] = []
        self.grace = 10.0
        self.seq = itertools.count(1)
        self.listener: socket.socket | None = None
        self.provider: VMProvider | None = None
        self.vm_gone = ""  # why the VM is no more, when a stage's cancel killed it
        self.stages: list[threading.Thread] = []

    # -- the holder's life ------------------------------------------------------------------
    def run(self) -> None:
        from kata_ci.executors.provider import VMRequest, open_provider

        job = json.loads(self.paths.job.read_text())
        try:
            cfg = config_mod.load(Path(job["config"]) if job.get("config") else None)
        except UserError as exc:
            raise StageError(str(exc)) from None
        settings = vm_settings(cfg, job.get("label"), job.get("network", {}))
        if settings.note:
            self.progress(settings.note)
        self.grace = cfg.vm.grace
        parent = job.get("parent", {})
        watcher = threading.Thread(target=self.watch, name="kata-ci-holder-watch", daemon=True,
                                   args=(int(parent.get("pid", 0)), parent.get("start"),
                                         time.monotonic() + float(job["lifetime"])))
        watcher.start()
        self.provider = provider = open_provider(cfg.vm.accel, self.progress,
                                                 cfg.vm.max_file_size, cfg.vm.start)
        self.listener = self.listen()
        started = time.monotonic()
        self.vm = provider.acquire(
            VMRequest(self.paths.builds, GUEST_BUILDS, settings.vcpus, settings.memory_mib,
                      cfg.vm.boot_timeout, settings.network), self.booting.append)
        if self.stop.is_set():
            raise StageError(f"stopped while the VM started: {self.reason}")
        how = "restored" if self.vm.boot_times and self.vm.boot_times.restored else "cold boot"
        log.info("VM %s ready (%s)", self.vm.id, how)
        self.report({"ready": f"VM {self.vm.id} ready in {time.monotonic() - started:.1f}s "
                     f"({how}; {settings.vcpus} vCPU, {settings.memory_mib} MiB, network "
                     f"{settings.network.describe()}); builds at {GUEST_BUILDS}"})
        self.close_status()
        self.serve(self.listener)

    def serve(self, listener: socket.socket) -> None:
        listener.settimeout(POLL)
        while not self.stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            stage = threading.Thread(target=self.handle, args=(conn,), name="kata-ci-stage",
                                     daemon=True)
            self.stages = [t for t in self.stages if t.is_alive()] + [stage]
            stage.start()
        log.info("stopping: %s", self.reason)

    def watch(self, parent: int, parent_start: int | None, deadline: float) -> None:
        """gitlab-runner gone, or the job's time up: stop. Once stopping, the VMs are
        killed from here: the main thread may be busy booting one."""
        while not self.stop.wait(POLL):
            if parent_gone(parent, parent_start):
                self.request_stop(f"gitlab-runner (pid {parent}) is gone")
            elif time.monotonic() > deadline:
                self.request_stop("the job's timeout (and a margin) has passed")
        for vm in list(self.booting):
            vm.kill()

    def request_stop(self, reason: str) -> None:
        if not self.stop.is_set():
            self.reason = reason
            self.stop.set()

    def teardown(self) -> None:
        """Release the VM, remove the state directory. Signals only set ``stop`` meanwhile."""
        self.request_stop("done")
        if self.vm is not None and self.provider is not None:
            self.provider.release(self.vm, graceful=False)
        for vm in list(self.booting):
            vm.kill()  # idempotent; returns when every host resource of the VM is gone
        until = time.monotonic() + 2.0  # stages still running: their clients hear why
        for stage in self.stages:
            stage.join(max(0.0, until - time.monotonic()))
        if self.listener is not None:
            self.listener.close()
        shutil.rmtree(self.paths.root, ignore_errors=True)
        log.info("VM released, %s removed", self.paths.root)

    # -- prepare's status pipe --------------------------------------------------------------
    def progress(self, message: str) -> None:
        log.info("%s", message)
        self.report({"progress": message})

    def fail(self, message: str, kind: str) -> None:
        log.error("%s", message)
        self.report({"error": message, "kind": kind})

    def report(self, line: dict[str, str]) -> None:
        if self.status is None:
            return
        try:
            self.status.write(json.dumps(line) + "\n")
            self.status.flush()
        except (OSError, ValueError):  # prepare is gone (killed): nobody will use this VM
            self.status = None
            self.request_stop("prepare went away before the VM was ready")

    def close_status(self) -> None:
        if self.status is not None:
            with contextlib.suppress(OSError):
                self.status.close()
            self.status = None

    # -- run stages -------------------------------------------------------------------------
    def listen(self) -> socket.socket:
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        with contextlib.suppress(FileNotFoundError):
            self.paths.socket.unlink()
        listener.bind(str(self.paths.socket))
        os.chmod(self.paths.socket, 0o600)
        listener.listen(16)
        return listener

    def handle(self, conn: socket.socket) -> None:
        cancel = Cancel()
        out = StageOutput(conn, cancel)
        try:
            proto.check_peer(conn)
            conn.settimeout(30)
            first, second = proto.recv(conn), proto.recv(conn)
            if first is None or second is None or first[0] != proto.REQUEST \
                    or second[0] != proto.SCRIPT:
                raise proto.ProtocolError("expected a request and a script")
            stage, env = proto.parse_request(first[1])
            conn.settimeout(None)
        except (proto.ProtocolError, OSError) as exc:
            log.warning("refused a connection: %s", exc)
            conn.close()
            return
        threading.Thread(target=self.listen_for_cancel, args=(conn, cancel), daemon=True,
                         name="kata-ci-stage-cancel").start()
        try:
            result = self.run_stage(stage, env, second[1], out, cancel)
        except Exception as exc:  # a bug of ours: this stage fails as a system failure
            log.exception("stage %s: unexpected error", stage)
            result = proto.exit_payload("system_failure", message=f"internal error: {exc!r}")
        out.send(proto.EXIT, json.dumps(result).encode())
        with contextlib.suppress(OSError):
            conn.shutdown(socket.SHUT_RDWR)  # wakes the cancel listener
        conn.close()

    @staticmethod
    def listen_for_cancel(conn: socket.socket, cancel: Cancel) -> None:
        """A cancel frame, or the client gone (gitlab-runner killed the stage): cancel."""
        with contextlib.suppress(OSError, proto.ProtocolError):
            while True:
                frame = proto.recv(conn)
                if frame is None or frame[0] == proto.CANCEL:
                    break
        cancel.set()

    def run_stage(self, stage: str, env: dict[str, str], script: bytes, out: StageOutput,
                  cancel: Cancel) -> dict[str, Any]:
        vm = self.vm
        if vm is None or self.stop.is_set():
            return proto.exit_payload("system_failure",
                                      message=f"the job's VM is being released ({self.reason})")
        if self.vm_gone:
            return proto.exit_payload("system_failure", message=self.vm_gone)
        try:
            check_stage(stage)
            vm.check()
            path = f"{GUEST_SCRIPTS}/{next(self.seq)}-{stage}.sh"
            vm.agent.put_files({path: script}, 0o700)
        except StageError as exc:
            return proto.exit_payload("system_failure", message=str(exc))
        except SystemFailure as exc:
            log.error("stage %s: %s\n%s", stage, exc.args[0], exc.diagnostics)
            return proto.exit_payload("system_failure", message=str(exc.args[0]))
        log.info("stage %s: running %s", stage, path)
        request = CommandRequest(["bash", path], job_env(env), GUEST_BUILDS, 0.0, self.grace)
        outcome = run_command(vm, request, out, cancel)
        log.info("stage %s: %s %s", stage, outcome.kind.value, outcome.message)
        if outcome.kind is OutcomeKind.SUCCESS:
            return proto.exit_payload("success")
        if outcome.kind in (OutcomeKind.JOB_FAILURE, OutcomeKind.TIMEOUT):
            return proto.exit_payload("failed", outcome.exit_code, outcome.message)
        if outcome.kind is OutcomeKind.CANCELLED:
            try:
                vm.check()
            except SystemFailure:
                self.vm_gone = (f"the VM was killed: the cancelled {stage} did not end within "
                                f"its {self.grace:g}s grace period")
            return proto.exit_payload("cancelled", message="stage cancelled: the script got "
                                      f"SIGTERM ({self.grace:g}s grace, then the VM is killed)")
        if outcome.diagnostics:
            log.error("stage %s: last guest console lines:\n%s", stage, outcome.diagnostics)
        message = outcome.message if not self.stop.is_set() else \
            f"{outcome.message} (the VM was released: {self.reason})"
        return proto.exit_payload("system_failure", message=message)


def main(args: list[str]) -> int:
    if len(args) != 4 or args[0] != "--status-fd" or not args[1].isdigit():
        print("usage: holder --status-fd N STATE_DIR TOKEN", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(message)s")
    paths = StatePaths(Path(args[2]))
    status = os.fdopen(int(args[1]), "w", encoding="utf-8")
    holder = Holder(paths, args[3], status)

    def on_signal(signum: int, frame: FrameType | None) -> None:
        holder.request_stop(f"{signal.Signals(signum).name} (cleanup, or a cancelled prepare)")

    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, on_signal)
    code = 0
    try:
        tmp = paths.record.with_suffix(".tmp")
        tmp.write_text(json.dumps({"pid": os.getpid(), "token": args[3]}))
        tmp.replace(paths.record)
        holder.run()
    except StageError as exc:
        holder.fail(str(exc), exc.kind)
        code = 1
    except KataCIError as exc:
        message = str(exc.args[0]) if exc.args else repr(exc)
        if holder.stop.is_set():
            message = f"stopped while the VM started: {holder.reason}"
        holder.fail(message, "system")
        code = 1
    except Exception as exc:
        log.exception("unexpected error")
        holder.fail(f"internal error: {exc!r}", "system")
        code = 1
    finally:
        holder.teardown()
        holder.close_status()
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
