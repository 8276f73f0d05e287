"""A small network of test hosts, for the network suite (tests/*/network/).

The suite runs in a network namespace of its own (scripts/test.sh: ``unshare --net
--mount``): there, "the host" is that namespace, and its only uplink is a veth to the
namespace ``lab-world``, which holds every test host on one interface:

- "internet": 198.51.100.10 and 2001:db8::10 (documentation ranges), HTTP on 80 and 8080,
  DNS on 53 (the upstream of kata-ci's resolver); a second one at 198.51.100.20;
- "metadata": 169.254.169.254, HTTP on 80;
- "LAN": 10.9.0.9 and fd00:9::9, HTTP on 80.

The host itself (198.51.100.1, 2001:db8::1, 127.0.0.1) listens on port 7777. No packet
can leave for a real address: nothing else is connected, and ``check_isolated`` refuses to
build the lab anywhere but in an empty namespace.
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

WORLD = "lab-world"
HOST_V4, HOST_V6 = "198.51.100.1", "2001:db8::1"
INTERNET_V4, INTERNET_V6 = "198.51.100.10", "2001:db8::10"
OTHER_V4 = "198.51.100.20"
METADATA_V4 = "169.254.169.254"
LAN_V4, LAN_V6 = "10.9.0.9", "fd00:9::9"
HOST_PORT = 7777
BODY = "hello from the internet host\n"
NAMES = {
    "internet.test": [INTERNET_V4, INTERNET_V6],
    "other.test": [OTHER_V4],
    "lan.test": [LAN_V4, LAN_V6],  # a public name resolving into the LAN: DNS rebinding
    "metadata.test": [METADATA_V4],
}


def check_isolated() -> str | None:
    """None when this process is in a network namespace with only a loopback and no route
    (a new one); else why the network suite must not run here."""
    # /proc/self/net is this process's namespace (/sys/class/net is sysfs's, from its mount).
    lines = Path("/proc/self/net/dev").read_text().splitlines()[2:]
    links = sorted(line.split(":")[0].strip() for line in lines)
    if links != ["lo"]:
        return f"interfaces {links} exist: run under `unshare --net --mount` (scripts/test.sh)"
    return None


def _ip(*args: str, netns: str | None = None) -> None:
    prefix = ["ip", "netns", "exec", netns] if netns else []
    subprocess.run([*prefix, "ip", *args], check=True, capture_output=True)


class Lab:
    """The world namespace, its servers, and the host's listener. ``close`` removes all."""

    def __init__(self) -> None:
        self.servers: subprocess.Popen[bytes] | None = None
        self._listeners: list[socket.socket] = []
        self._stop = threading.Event()
        self.host_hits = 0

    def start(self) -> None:
        Path("/run/netns").mkdir(parents=True, exist_ok=True)
        subprocess.run(["mount", "-t", "tmpfs", "lab-netns", "/run/netns"], check=True)
        _ip("link", "set", "lo", "up")
        _ip("netns", "add", WORLD)
        _ip("link", "add", "w0", "type", "veth", "peer", "name", "w1")
        _ip("link", "set", "w1", "netns", WORLD)
        _ip("addr", "add", f"{HOST_V4}/24", "dev", "w0")
        _ip("-6", "addr", "add", f"{HOST_V6}/64", "dev", "w0", "nodad")
        _ip("link", "set", "w0", "up")
        _ip("route", "add", "default", "via", INTERNET_V4)
        _ip("-6", "route", "add", "default", "via", INTERNET_V6)
        _ip("link", "set", "lo", "up", netns=WORLD)
        _ip("addr", "add", f"{INTERNET_V4}/24", "dev", "w1", netns=WORLD)
        for address in (OTHER_V4, METADATA_V4, LAN_V4):
            _ip("addr", "add", f"{address}/32", "dev", "w1", netns=WORLD)
        for address in (INTERNET_V6, LAN_V6):
            _ip("-6", "addr", "add", f"{address}/64", "dev", "w1", "nodad", netns=WORLD)
        _ip("link", "set", "w1", "up", netns=WORLD)
        _ip("route", "add", "default", "dev", "w1", netns=WORLD)
        self.servers = subprocess.Popen(
            ["ip", "netns", "exec", WORLD, sys.executable, "-m", "tests.netlab_hosts"],
            cwd=Path(__file__).resolve().parent.parent, stdout=subprocess.PIPE)
        assert self.servers.stdout is not None
        if self.servers.stdout.readline().strip() != b"ready":
            raise RuntimeError("the lab's servers did not start")
        self._listen()

    def _listen(self) -> None:
        """The host's own service on 7777, on every address of the host."""
        for family, address in ((socket.AF_INET, "0.0.0.0"), (socket.AF_INET6, "::")):
            sock = socket.socket(family, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind((address, HOST_PORT))
            sock.listen(16)
            sock.settimeout(0.2)
            self._listeners.append(sock)
            threading.Thread(target=self._accept, args=(sock,), daemon=True).start()

    def _accept(self, sock: socket.socket) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(OSError):
                conn, _ = sock.accept()
                self.host_hits += 1
                with conn:
                    conn.sendall(b"HTTP/1.0 200 OK\r\n\r\nthe host's own service\n")

    def close(self) -> None:
        self._stop.set()
        for sock in self._listeners:
            sock.close()
        if self.servers is not None:
            self.servers.kill()
            self.servers.wait()
        with contextlib.suppress(subprocess.CalledProcessError):
            _ip("netns", "del", WORLD)
        with contextlib.suppress(subprocess.CalledProcessError):
            _ip("link", "del", "w0")
        subprocess.run(["umount", "/run/netns"], check=False)


@contextlib.contextmanager
def lab() -> Iterator[Lab]:
    world = Lab()
    try:
        world.start()
        yield world
    finally:
        world.close()


def kata_netns() -> list[str]:
    """kata-ci's namespaces still present (leftovers)."""
    root = Path("/run/netns")
    return sorted(p.name for p in root.iterdir() if p.name.startswith("kci-")) if \
        root.is_dir() else []


def host_state() -> tuple[str, str, str]:
    """The host's links, routes and nftables ruleset: kata-ci must change none of them."""
    def out(*argv: str) -> str:
        return subprocess.run(argv, capture_output=True, text=True).stdout
    return out("ip", "-br", "link"), out("ip", "route") + out("ip", "-6", "route"), \
        out("nft", "list", "ruleset")


def wait_gone(pids: list[int], timeout: float = 10.0) -> list[int]:
    """Of ``pids``, those still alive after ``timeout``."""
    deadline = time.monotonic() + timeout
    alive = list(pids)
    while alive and time.monotonic() < deadline:
        alive = [p for p in alive if Path(f"/proc/{p}").exists()]
        time.sleep(0.05)
    return alive
