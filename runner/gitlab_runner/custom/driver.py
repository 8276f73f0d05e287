"""The four stages gitlab-runner's custom executor calls (docs/executors/custom.md).

``config``   prints the JSON gitlab-runner reads: builds in /builds and cache in /cache,
             both inside the VM, not shared between jobs.
``prepare``  starts the job's holder (holder.py), detached, and waits until its VM's agent
             answers; exit 0, or SYSTEM_FAILURE_EXIT_CODE (BUILD_FAILURE_EXIT_CODE when the
             job asked for a network wider than its label allows).
``run``      sends a stage's script to the holder, which runs it with bash in the VM;
             output streams back live. 0, or BUILD_FAILURE_EXIT_CODE (the script's own code in
             BUILD_EXIT_CODE_FILE), or SYSTEM_FAILURE_EXIT_CODE. SIGTERM cancels the script
             (SIGTERM in the guest, grace, kill).
``cleanup``  stops the holder (VM released, state removed); always succeeds.

Each returns the process's exit status and prints failures as one line on stderr.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from types import FrameType
from typing import Any

from kata_ci import __version__, paths
from kata_ci.errors import UserError
from kata_ci.runner.gitlab_runner.custom import protocol as proto
from kata_ci.runner.gitlab_runner.custom.job import (
    GUEST_BUILDS,
    GUEST_CACHE,
    MAX_SCRIPT,
    PREFIX,
    TIMEOUT_MARGIN,
    ExitCodes,
    StageError,
    StatePaths,
    check_stage,
    exit_codes,
    job_key,
    job_timeout,
    job_variables,
    network_request,
)

EXIT_USAGE = 2  # not run by gitlab-runner: there are no exit codes to read
STOP_WAIT = 30.0  # s a holder gets to release its VM after SIGTERM before SIGKILL


def say(message: str) -> None:
    """Progress, on stdout (gitlab-runner shows prepare's in the job log)."""
    print(f"kata-ci: {message}", flush=True)


def complain(message: str) -> None:
    """A failure: one line on stderr."""
    line = " ".join(message.split())
    print(f"kata-ci: {line}", file=sys.stderr, flush=True)


def _load_config(config_path: Path | None) -> Any:
    from kata_ci.runner.core import config as config_mod

    try:
        return config_mod.load(config_path)
    except UserError as exc:
        raise StageError(str(exc)) from None


# -- config_exec ------------------------------------------------------------------------------
def config_stage(config_path: Path | None, label: str | None) -> dict[str, Any]:
    """What config_exec prints. The config and label are checked here already, so that a
    runner set up wrongly fails at its first job's first stage."""
    from kata_ci.runner.gitlab_runner.custom.holder import vm_settings

    vm_settings(_load_config(config_path), label, {})
    return {"builds_dir": GUEST_BUILDS, "cache_dir": GUEST_CACHE, "builds_dir_is_shared": False,
            "hostname": socket.gethostname(),
            "driver": {"name": "kata-ci", "version": __version__}, "shell": "bash"}


# -- prepare_exec -----------------------------------------------------------------------------
def prepare_stage(config_path: Path | None, label: str | None,
                  environ: Mapping[str, str]) -> int:
    codes = exit_codes(environ)
    try:
        return _prepare(config_path, label, environ, codes)
    except StageError as exc:
        complain(str(exc))
        return codes.of(exc.kind)


def _prepare(config_path: Path | None, label: str | None, environ: Mapping[str, str],
             codes: ExitCodes) -> int:
    from kata_ci.runner.gitlab_runner.custom import holder, procs

    variables = job_variables(environ)
    key = job_key(variables)
    cfg = _load_config(config_path)
    settings = holder.vm_settings(cfg, label, network_request(variables))
    state = StatePaths.of(paths.run_dir(), key)
    if os.path.lexists(state.root):  # prepare_exec is retried after a system failure
        say(f"removing what an earlier attempt of job {variables['CI_JOB_ID']} left")
        stop_job(state)
    state.root.parent.mkdir(parents=True, exist_ok=True)
    try:
        state.root.mkdir(mode=0o700)
        os.chmod(state.root, 0o700)
        state.builds.mkdir(mode=0o700)
    except OSError as exc:
        raise StageError(f"cannot make the job's directory {state.root}: {exc}") from None
    parent = os.getppid()
    state.job.write_text(json.dumps({
        "key": key, "label": label,
        "config": str(config_path.resolve()) if config_path else None,
        "network": network_request(variables),
        "lifetime": job_timeout(variables) + TIMEOUT_MARGIN,
        "parent": {"pid": parent, "start": procs.start_time(parent)}}))
    say(f"job {variables['CI_JOB_ID']}: starting a microVM ({settings.vcpus} vCPU, "
        f"{settings.memory_mib} MiB, network {settings.network.describe()}"
        f"{f', label {label}' if label else ''})")
    read_end, write_end = os.pipe()
    token = secrets.token_hex(16)
    # The job's variables stay out of the holder's (and so QEMU's) environment.
    env = {k: v for k, v in environ.items() if not k.startswith(PREFIX)}
    try:
        with open(state.log, "ab") as log:
            proc = subprocess.Popen(procs.argv(state, token, write_end), stdin=subprocess.DEVNULL,
                                    stdout=log, stderr=log, pass_fds=[write_end], env=env,
                                    cwd="/", start_new_session=True)
    except OSError as exc:
        shutil.rmtree(state.root, ignore_errors=True)
        raise StageError(f"cannot start the VM holder: {exc}") from None
    finally:
        os.close(write_end)
    return _wait_ready(proc, read_end, state, codes)


def _wait_ready(proc: subprocess.Popen[bytes], read_end: int, state: StatePaths,
                codes: ExitCodes) -> int:
    cancelled: list[str] = []

    def on_signal(signum: int, frame: FrameType | None) -> None:
        cancelled.append(signal.Signals(signum).name)
        with contextlib.suppress(OSError):
            proc.send_signal(signal.SIGTERM)  # our own child: its pid is ours until reaped

    saved = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT,
                                                      signal.SIGHUP)}
    error: tuple[str, str] | None = None
    try:
        with os.fdopen(read_end, encoding="utf-8", errors="replace") as status:
            for line in status:
                try:
                    message = json.loads(line)
                except ValueError:
                    continue
                if "progress" in message:
                    say(str(message["progress"]))
                elif "ready" in message and not cancelled:
                    say(str(message["ready"]))
                    return 0
                elif "error" in message:
                    error = (str(message["error"]), str(message.get("kind", "system")))
                    break
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(STOP_WAIT)
    finally:
        for signum, handler in saved.items():
            signal.signal(signum, handler)
    if cancelled:
        error = (f"prepare cancelled ({cancelled[0]}); the VM was released", "system")
    elif error is None:
        error = (f"the VM holder exited before its VM was ready{_log_tail(state)}", "system")
    stop_job(state)
    complain(error[0])
    return codes.build if error[1] == "build" else codes.system


def _log_tail(state: StatePaths) -> str:
    try:
        lines = state.log.read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return f": {lines[-1]}" if lines else ""


# -- run_exec ---------------------------------------------------------------------------------
def run_stage(script: Path, stage: str, environ: Mapping[str, str]) -> int:
    codes = exit_codes(environ)
    try:
        result, code, message = _run(script, stage, environ)
    except StageError as exc:
        complain(str(exc))
        return codes.of(exc.kind)
    if result == "success":
        return 0
    if result == "system_failure":
        complain(f"system failure: {message}")
        return codes.system
    if result == "failed":
        _write_exit_code(environ.get("BUILD_EXIT_CODE_FILE", ""), code)
    elif message:
        complain(message)
    return codes.build


def _run(script: Path, stage: str, environ: Mapping[str, str]) -> tuple[proto.Result, int, str]:
    variables = job_variables(environ)
    state = StatePaths.of(paths.run_dir(), job_key(variables))
    check_stage(stage)
    try:
        with open(script, "rb") as handle:
            content = handle.read(MAX_SCRIPT + 1)
    except OSError as exc:
        raise StageError(f"cannot read the {stage} script: {exc.strerror}") from None
    if len(content) > MAX_SCRIPT:
        raise StageError(f"the {stage} script is over {MAX_SCRIPT >> 20} MiB, more than "
                         "kata-ci carries into the VM", "build")
    try:
        conn = proto.connect(state.socket)
    except (OSError, proto.ProtocolError) as exc:
        raise StageError(f"no VM for job {variables['CI_JOB_ID']} (prepare did not run, or "
                         f"its VM is gone: {exc})") from None
    with conn:
        try:
            proto.send_json(conn, proto.REQUEST, {"stage": stage, "env": variables})
            proto.send(conn, proto.SCRIPT, content)
            return _stream(conn)
        except (OSError, proto.ProtocolError) as exc:
            raise StageError(f"lost the VM holder's connection: {exc}") from None


def _stream(conn: socket.socket) -> tuple[proto.Result, int, str]:
    """The stage's output, live, until its end. SIGTERM/SIGINT/SIGHUP (gitlab-runner
    cancelling the job or timing it out) ask the holder to cancel the script; its end still
    comes back here."""
    asked: list[int] = []

    def on_signal(signum: int, frame: FrameType | None) -> None:
        if not asked:
            asked.append(signum)
            with contextlib.suppress(OSError):
                proto.send(conn, proto.CANCEL)

    saved = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT,
                                                      signal.SIGHUP)}
    try:
        while True:
            frame = proto.recv(conn)
            if frame is None:
                raise StageError("the VM holder went away in the middle of the stage")
            kind, payload = frame
            if kind == proto.STDOUT:
                sys.stdout.buffer.write(payload)
                sys.stdout.buffer.flush()
            elif kind in (proto.STDERR, proto.NOTE):
                sys.stderr.buffer.write(payload)
                sys.stderr.buffer.flush()
            elif kind == proto.EXIT:
                result = proto.parse_exit(payload)
                return ("cancelled", *result[1:]) if asked and result[0] != "success" \
                    else result
    finally:
        for signum, handler in saved.items():
            signal.signal(signum, handler)


def _write_exit_code(path: str, code: int) -> None:
    """BUILD_EXIT_CODE_FILE: the script's real status, for allow_failure: exit_codes."""
    if not path:
        return
    try:
        Path(path).write_text(f"{code}\n")
    except OSError as exc:
        complain(f"cannot write BUILD_EXIT_CODE_FILE: {exc.strerror}")


# -- cleanup_exec -----------------------------------------------------------------------------
def cleanup_stage(environ: Mapping[str, str]) -> int:
    """Idempotent; 0 whatever was or was not there (gitlab-runner ignores the result)."""
    try:
        variables = job_variables(environ)
        state = StatePaths.of(paths.run_dir(), job_key(variables))
    except StageError as exc:
        complain(f"nothing to clean up: {exc}")
        return 0
    existed = os.path.lexists(state.root)
    stop_job(state)
    if existed:
        say(f"job {variables['CI_JOB_ID']}: VM released")
    return 0


def stop_job(state: StatePaths) -> None:
    """Stop the job's holders (SIGTERM: it releases the VM; SIGKILL if it does not end in
    time, then the provider removes what its VM left), then remove the state directory."""
    from kata_ci.runner.gitlab_runner.custom.procs import find_holders, is_holder

    pids = find_holders(state)
    for pid in pids:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + STOP_WAIT
    while pids and time.monotonic() < deadline:
        pids = {pid for pid in pids if is_holder(pid, state)}
        time.sleep(0.05)
    for pid in pids:
        if is_holder(pid, state):
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
    if pids:
        time.sleep(0.5)  # its VM processes die with it (parent-death signal)
        _reap_vms()
    shutil.rmtree(state.root, ignore_errors=True)


def _reap_vms() -> None:
    """Run directories, cgroups and namespaces of VMs whose holder was killed: opening a
    provider removes those of dead owners."""
    from kata_ci.errors import KataCIError
    from kata_ci.executors.provider import open_provider

    with contextlib.suppress(KataCIError):
        open_provider("auto", complain)
