"""A GitHub for the network lab: the contract FAKE of GitHub (tests/fakes/github.py) served
from the lab's "internet" host, so that runners inside VMs reach it over their real network
path (tap, namespace, nftables, pasta), plus everything kata-ci needs around it: a VM image
cache with a runner layer made from the FAKE actions runner, a config, `kata-ci worker` and
`kata-ci github serve` processes. Used by tests/e2e/network/test_github.py and
bench/bench_github.py. GitHub and its real runner cannot be reached here.
"""

from __future__ import annotations

import ctypes
import json
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

from kata_ci import paths
from kata_ci.images.artifacts import Manifest
from kata_ci.images.build import load_current
from kata_ci.images.runner_layer import build_runner_layer
from tests import netlab
from tests.e2e.conftest import KATA_CI, stop_process
from tests.e2e.test_daemon import Worker, wait_until
from tests.fakes.actions_runner import build_runner_tarball

CLONE_NEWNET = 0x40000000
TOKEN = "ghs_fake_installation_token_0123456789"
SECRET = "webhook-secret-0123456789abcdef"
API_PORT = 8443


def bind_in_world(port: int) -> socket.socket:
    """A TCP socket bound to the "internet" host's address inside the lab's world namespace.
    A namespace switch is per thread: a helper thread switches, binds, and exits; the socket
    keeps its namespace and serves from any thread."""
    made: list[socket.socket] = []
    errors: list[BaseException] = []

    def in_world() -> None:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            fd = os.open(f"/run/netns/{netlab.WORLD}", os.O_RDONLY)
            try:
                if libc.setns(fd, CLONE_NEWNET) != 0:
                    raise OSError(ctypes.get_errno(), "setns")
            finally:
                os.close(fd)
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((netlab.INTERNET_V4, port))
            made.append(sock)
        except BaseException as exc:  # reported in the caller's thread
            errors.append(exc)

    thread = threading.Thread(target=in_world)
    thread.start()
    thread.join()
    if errors:
        raise errors[0]
    return made[0]


def layer_cache(root: Path, version: str = "2.329.0") -> Path:
    """An image cache whose manifest is the machine's own plus a runner layer made from the
    fake runner tarball: the machine's manifest is never changed."""
    cache = root / "cache"
    cache.mkdir(parents=True, exist_ok=True)
    tarball = build_runner_tarball(root, version)
    base = load_current(paths.cache_dir())
    layer = build_runner_layer(cache, lambda m: print(m, file=sys.stderr), tarball)
    manifest = Manifest(kernel=base.kernel, rootfs=base.rootfs, initramfs=base.initramfs,
                        tools=base.tools, runner=layer)
    manifest.save(cache)
    return cache


def write_config(path: Path, broker: str, api_url: str, *, idle_timeout: float = 300.0,
                 reconcile_interval: float = 60.0, label: str = "default") -> Path:
    path.write_text(
        f'[queue]\nbroker = "{broker}"\nlease_ttl = 6\n'
        f'[vm]\ngrace = 2\nnetwork = "egress"\n'
        f'[network]\ndns = ["{netlab.INTERNET_V4}"]\n'
        f'[github]\napi_url = "{api_url}"\norg = "octo-org"\n'
        f'repositories = ["octo-org/hello-world"]\n'
        f'token_file = "{path.parent / "token"}"\n'
        f'webhook_secret_file = "{path.parent / "secret"}"\n'
        f'idle_timeout = {idle_timeout}\nreconcile_interval = {reconcile_interval}\n'
        f'[[github.label_sets]]\nlabels = ["self-hosted", "kata-ci"]\nlabel = "{label}"\n'
        f'max_runners = 4\n')
    (path.parent / "token").write_text(TOKEN)
    (path.parent / "secret").write_text(SECRET)
    os.chmod(path.parent / "token", 0o600)
    os.chmod(path.parent / "secret", 0o600)
    return path


class Serve:
    """A `kata-ci github serve` process with its own log."""

    def __init__(self, config: Path, log: Path, port: int) -> None:
        self.config, self.log, self.port = config, log, port
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/webhook"

    def start(self, env: dict[str, str] | None = None) -> None:
        with self.log.open("ab") as sink:
            self.proc = subprocess.Popen(
                [*KATA_CI, "github", "serve", "--config", str(self.config), "--listen",
                 f"127.0.0.1:{self.port}"], stdout=sink, stderr=sink, env=env)
        wait_until(lambda: b"serving GitHub webhooks" in self.log.read_bytes(), 60,
                   "github serve ready")

    def stop(self) -> None:
        stop_process(self.proc, 20)


def worker(config: Path, root: Path, cache: Path) -> Worker:
    """A `kata-ci worker` on the label, using the cache with the runner layer."""
    made = Worker(config, ["default"], root)
    made.env["KATA_CI_CACHE"] = str(cache)
    return made


def process_argvs() -> Callable[[], list[str]]:
    """Every host process's argv, read now (for leak checks)."""
    def read() -> list[str]:
        found = []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    found.append((entry / "cmdline").read_bytes().replace(b"\0", b" ")
                                 .decode(errors="replace"))
                except OSError:
                    continue
        return found
    return read


def dump(*logs: Path) -> str:
    return "\n".join(f"=== {log} ===\n{log.read_text(errors='replace')[-6000:]}"
                     for log in logs if log.exists())


__all__ = ["API_PORT", "SECRET", "TOKEN", "Serve", "bind_in_world", "dump", "json",
           "layer_cache", "process_argvs", "worker", "write_config"]
