#!/usr/bin/env python3
"""bin/Runner.Listener of the FAKE actions runner (tests/fakes/actions_runner.py puts this file
in the tarball), not GitHub's runner: the real one cannot be fetched here. Python 3.11,
standard library only (the guest has no third-party modules).

The real runner's surface: ``run.sh [--jitconfig <b64>]`` or the config in
ACTIONS_RUNNER_INPUT_JITCONFIG (the real runner's documented input; every
ACTIONS_RUNNER_INPUT_* is removed from the process environment at once, so that no step sees
it: steps inherit the rest of the runner's environment, as with the real runner; like the real
one, this process's own /proc/<pid>/environ still holds what it was started with), its log
lines, "Must not run with sudo" as root unless RUNNER_ALLOW_RUNASROOT is set, one job then
exit 0 (ephemeral), SIGTERM/SIGINT stop the running step and report the job cancelled, exit 1.

What it speaks is the FAKE GitHub's stand-in protocol (tests/fakes/github.py, /_fake_actions/),
not GitHub's internal Actions service: POST sessions (long poll, 200 job / 204 none), POST
jobs/<id>/logs, POST jobs/<id>/complete, each with ``Authorization: Bearer <secret>`` where the
secret is the one in the config's .credentials_rsaparams.
"""

from __future__ import annotations

import base64
import contextlib
import http.client
import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any, NoReturn
from urllib.parse import urlsplit

VERSION = "2.329.0"  # build_runner_tarball writes the tarball's version here
INPUT_PREFIX = "ACTIONS_RUNNER_INPUT_"
HTTP_TIMEOUT = 100.0  # longer than any long poll: an abandoned poll would strand a job
RESULTS = {"success": "Succeeded", "failure": "Failed", "cancelled": "Canceled"}
_print_lock = threading.Lock()


class Interrupted(Exception):
    """SIGTERM/SIGINT while no job runs."""


class State:
    job: dict[str, Any] | None = None  # the job being run
    cancelled = False
    proc: subprocess.Popen[bytes] | None = None  # the running step


STATE = State()


def stamp() -> str:
    return time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime())


def say(line: str) -> None:
    with _print_lock:
        print(line, flush=True)


def fail(message: str) -> NoReturn:
    print(message, file=sys.stderr, flush=True)
    sys.exit(1)


def take_config(argv: list[str]) -> str:
    """The encoded JIT config from ``[run] --jitconfig <b64>`` or the environment; every
    ACTIONS_RUNNER_INPUT_* leaves the environment first, whatever happens next."""
    inputs = {key: os.environ.pop(key) for key in list(os.environ)
              if key.startswith(INPUT_PREFIX)}
    args = list(argv)
    if args and not args[0].startswith("-"):
        if args[0] != "run":
            fail(f"'{args[0]}': this FAKE runner only runs with a JIT config "
                 "(run.sh --jitconfig <config>)")
        args.pop(0)
    given = inputs.get(f"{INPUT_PREFIX}JITCONFIG", "")
    while args:
        arg = args.pop(0)
        if arg == "--jitconfig" and args:
            given = args.pop(0)
        elif arg.startswith("--jitconfig="):
            given = arg.partition("=")[2]
        elif arg in ("--once", "--ephemeral"):
            continue
        else:
            fail(f"Unrecognized command-line input arguments: '{arg}'. "
                 "For usage refer to: ./config.sh --help")
    if not given:
        fail("No JIT configuration: pass --jitconfig <config> or set "
             f"{INPUT_PREFIX}JITCONFIG (this FAKE runner supports only JIT runners)")
    return given


def decode(encoded: str) -> tuple[dict[str, Any], str]:
    """The .runner settings and the runner's secret, from the three config files."""
    try:
        files = json.loads(base64.b64decode(encoded, validate=True))
        settings = json.loads(base64.b64decode(files[".runner"]))
        secret = json.loads(base64.b64decode(files[".credentials_rsaparams"]))["secret"]
        json.loads(base64.b64decode(files[".credentials"]))
        if not all(isinstance(settings.get(k), str) and settings[k]
                   for k in ("serverUrl", "agentName")) or not isinstance(secret, str):
            raise ValueError("serverUrl, agentName or the credentials are missing")
        return settings, secret
    except (ValueError, KeyError, TypeError) as exc:  # binascii.Error is a ValueError
        fail(f"Failed to load the JIT configuration: {type(exc).__name__}")


class Server:
    def __init__(self, url: str, secret: str) -> None:
        parts = urlsplit(url)
        self.https = parts.scheme == "https"
        self.host, self.port = parts.hostname or "localhost", parts.port
        self.prefix = parts.path.rstrip("/")
        self.secret = secret

    def call(self, path: str, body: bytes, content_type: str = "application/json",
             sent: Callable[[], None] | None = None) -> tuple[int, bytes]:
        conn_type = http.client.HTTPSConnection if self.https else http.client.HTTPConnection
        conn = conn_type(self.host, self.port, timeout=HTTP_TIMEOUT)
        try:
            conn.request("POST", f"{self.prefix}/_fake_actions/{path}", body=body, headers={
                "Authorization": f"Bearer {self.secret}", "Content-Type": content_type,
                "User-Agent": f"GitHubActionsRunner-linux-x64/{VERSION} (FAKE)"})
            if sent is not None:
                sent()
            response = conn.getresponse()
            return response.status, response.read()
        finally:
            conn.close()

    def retried(self, path: str, body: bytes, content_type: str = "application/json",
                tries: int = 5) -> int:
        """A report that must arrive: connection errors and 5xx are retried a few times."""
        status = 0
        for attempt in range(tries):
            try:
                status = self.call(path, body, content_type)[0]
                if status < 500:
                    return status
            except (OSError, http.client.HTTPException) as exc:
                print(f"{stamp()}: {path}: {exc}", file=sys.stderr, flush=True)
            time.sleep(min(0.5 * 2 ** attempt, 5))
        return status


class LogPoster:
    """Step output to the job's log at the fake GitHub, in batches, from a thread."""

    def __init__(self, server: Server, job_id: int) -> None:
        self.server, self.path = server, f"jobs/{job_id}/logs"
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def add(self, line: str) -> None:
        self.lines.put(line)

    def close(self) -> None:
        self.lines.put(None)
        self.thread.join(60)

    def _run(self) -> None:
        done = False
        while not done:
            batch: list[str] = []
            deadline = time.monotonic() + 0.3
            while not done and (left := deadline - time.monotonic()) > 0:
                try:
                    line = self.lines.get(timeout=left)
                except queue.Empty:
                    break
                if line is None:
                    done = True
                else:
                    batch.append(line)
            if batch:
                self.server.retried(self.path, "".join(f"{x}\n" for x in batch).encode(),
                                    "text/plain; charset=utf-8", tries=3)


def kill_step(sig: int = signal.SIGTERM) -> None:
    proc = STATE.proc
    if proc is not None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, sig)


def on_signal(signum: int, frame: FrameType | None) -> None:
    STATE.cancelled = True
    if STATE.job is None:
        raise Interrupted
    kill_step(signal.SIGTERM)  # then SIGKILL if the step outlives a grace period
    timer = threading.Timer(5.0, kill_step, (signal.SIGKILL,))
    timer.daemon = True
    timer.start()


def run_step(step: dict[str, Any], cwd: Path, env: dict[str, str],
             out: Callable[[str], None]) -> int:
    """One step's script in bash (-e -o pipefail) in its own process group; its output line by
    line to ``out``. Processes it leaves behind are killed when it ends."""
    proc = subprocess.Popen(
        ["bash", "--noprofile", "--norc", "-e", "-o", "pipefail", "-c", str(step.get("run", ""))],
        cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, start_new_session=True)
    STATE.proc = proc
    if STATE.cancelled:  # a signal came just before the step started
        kill_step(signal.SIGKILL)
    stdout = proc.stdout
    assert stdout is not None

    def read() -> None:
        for raw in stdout:
            out(raw.decode(errors="replace").rstrip("\n"))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    code = proc.wait()
    reader.join(2.0)
    kill_step(signal.SIGKILL)  # orphans of the step (and what holds its output open)
    reader.join(5.0)
    STATE.proc = None
    return code


def run_job(job: dict[str, Any], settings: dict[str, Any], server: Server,
            runner_dir: Path) -> str:
    repo = str(job.get("repository", "owner/repo"))
    short = repo.rsplit("/", 1)[-1]
    work = Path(str(settings.get("workFolder") or "_work"))
    work = work if work.is_absolute() else runner_dir / work
    workspace, temp = work / short / short, work / "_temp"
    workspace.mkdir(parents=True, exist_ok=True)
    temp.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)  # as the real runner's steps: its environment, inputs gone
    env.update({str(k): str(v) for k, v in dict(job.get("env") or {}).items()})
    env.update(GITHUB_ACTIONS="true", CI="true", RUNNER_NAME=str(settings["agentName"]),
               RUNNER_TEMP=str(temp), RUNNER_OS="Linux", RUNNER_ARCH="X64",
               RUNNER_WORKSPACE=str(work / short), GITHUB_REPOSITORY=repo,
               GITHUB_REPOSITORY_OWNER=repo.split("/")[0], GITHUB_WORKSPACE=str(workspace),
               GITHUB_RUN_ID=str(job.get("run_id", "")), GITHUB_JOB=str(job.get("name", "")),
               PATH=os.environ.get("PATH") or "/usr/local/bin:/usr/bin:/bin")
    poster = LogPoster(server, int(job["id"]))

    def out(line: str) -> None:
        say(line)
        poster.add(line)

    conclusion = "success"
    for step in list(job.get("steps") or []):
        if STATE.cancelled:
            break
        # the step's name only, not its script: a test looking for a step's output in the
        # log must not find it in the script's text
        out(f"##[group]Run {step.get('name', '')}")
        out("##[endgroup]")
        code = run_step(dict(step), workspace, env, out)
        if STATE.cancelled:
            out("##[error]The operation was canceled.")
            break
        if code != 0:
            out(f"##[error]Process completed with exit code {code}.")
            conclusion = "failure"
            break
    poster.close()
    shutil.rmtree(temp, ignore_errors=True)
    return "cancelled" if STATE.cancelled else conclusion


def listen(server: Server) -> dict[str, Any]:
    """Sessions until one brings a job (long poll; 204: none yet)."""
    announced = False
    backoff = 0.5

    def connected() -> None:
        nonlocal announced
        if not announced:
            announced = True
            say("\u221a Connected to GitHub\n")
            say(f"Current runner version: '{VERSION}'")
            say(f"{stamp()}: Listening for Jobs")

    hello = json.dumps({"version": VERSION, "os": "linux"}).encode()
    while True:
        try:
            status, data = server.call("sessions", hello, sent=connected)
        except (OSError, http.client.HTTPException) as exc:
            say(f"{stamp()}: Runner connect error: {exc}. Retrying until reconnected.")
            time.sleep(backoff)
            backoff = min(backoff * 2, 5.0)
            continue
        backoff = 0.5
        if status == 200:
            job = json.loads(data)["job"]
            STATE.job = dict(job)
            return STATE.job
        if status == 204:
            continue
        if status == 401:
            fail(f"{stamp()}: Runner registration has been deleted from the server, "
                 "please re-configure. Runner registrations are automatically deleted for "
                 "runners that have not connected to the service recently.")
        if status == 409:
            fail(f"{stamp()}: This ephemeral runner has already run its job.")
        say(f"{stamp()}: Unexpected answer from the server: HTTP {status}. Retrying.")
        time.sleep(backoff)


def main(argv: list[str]) -> int:
    encoded = take_config(argv)
    if os.geteuid() == 0 and not os.environ.get("RUNNER_ALLOW_RUNASROOT"):
        fail("Must not run with sudo")
    settings, secret = decode(encoded)
    del encoded
    server = Server(str(settings["serverUrl"]), secret)
    runner_dir = Path(__file__).resolve().parent.parent
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        job = listen(server)
    except Interrupted:
        say(f"{stamp()}: Runner listener exit because of cancellation.")
        return 1
    name = str(job.get("name", ""))
    say(f"{stamp()}: Running job: {name}")
    conclusion = run_job(job, settings, server, runner_dir)
    status = server.retried(f"jobs/{job['id']}/complete",
                            json.dumps({"conclusion": conclusion}).encode())
    if status != 200:
        print(f"{stamp()}: reporting the job's end failed: HTTP {status}", file=sys.stderr,
              flush=True)
    say(f"{stamp()}: Job {name} completed with result: {RESULTS[conclusion]}")
    return 1 if STATE.cancelled else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
