"""Guest side of the agent channel: how the gRPC server is reached from the host.

The gRPC server always listens on a local unix socket. A transport connects that socket to
the host. On these hosts there is no vhost-vsock, so the channel is a virtio-serial port: a
single byte pipe, not a socket that accepts connections. ``SerialBridge`` turns it into one
connection at a time:

* It connects to the gRPC socket only when the host's first bytes arrive. The server speaks
  first on a new connection (HTTP/2 SETTINGS) and bytes written while the host is not
  attached are dropped, which would leave the host's connection hanging.
* The host attaching and detaching is visible in the guest: ``read()`` returns 0 and ``poll``
  reports POLLHUP while no host is attached. Detach ends the bridged connection, so a new host
  connection always meets a fresh HTTP/2 session.

A vsock transport needs no bridge (gRPC listens on ``vsock:`` directly); it is declared here
so the seam is visible, and selected by ``kataci.transport=vsock`` on KVM hosts that have it.
"""

from __future__ import annotations

import os
import select
import socket
import threading
import time

CHUNK = 256 * 1024
SERIAL_PORT_NAME = "kataci.agent"


def find_port(name: str) -> str:
    """/dev/vportNpM of the named port. /dev/virtio-ports/<name> is a udev link; no udev here."""
    base = "/sys/class/virtio-ports"
    for entry in os.listdir(base):
        try:
            with open(f"{base}/{entry}/name") as handle:
                if handle.read().strip() == name:
                    return f"/dev/{entry}"
        except OSError:
            continue
    raise SystemExit(f"kata-ci-agent: no virtio-serial port named {name}")


def _write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)  # virtio-serial takes at most 32 KiB per write
        view = view[written:]


class SerialBridge:
    """Bridges one host connection at a time between a virtio-serial port and a unix socket."""

    def __init__(self, port_path: str, backend_path: str) -> None:
        self.port_path = port_path
        self.backend_path = backend_path

    def serve_forever(self) -> None:
        port = os.open(self.port_path, os.O_RDWR)
        poller = select.poll()
        poller.register(port, select.POLLIN)
        while True:
            first = self._next_data(port, poller)
            backend = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            backend.connect(self.backend_path)
            backend.sendall(first)
            pump = threading.Thread(target=self._backend_to_port, args=(backend, port),
                                    daemon=True)
            pump.start()
            try:
                while True:
                    data = os.read(port, CHUNK)
                    if not data:  # host detached
                        break
                    backend.sendall(data)
            except OSError:
                pass
            backend.close()  # the server sees EOF and ends the HTTP/2 session; pump exits
            pump.join()

    @staticmethod
    def _next_data(port: int, poller: select.poll) -> bytes:
        """Block until the host attaches and sends its first bytes."""
        while True:
            events = poller.poll()
            if any(ev & select.POLLIN for _, ev in events):
                data = os.read(port, CHUNK)
                if data:
                    return data
            # POLLHUP: no host attached. The driver offers no wakeup on attach; a short sleep
            # keeps this cheap while costing at most 10 ms of connection latency.
            time.sleep(0.01)

    @staticmethod
    def _backend_to_port(backend: socket.socket, port: int) -> None:
        try:
            while True:
                data = backend.recv(CHUNK)
                if not data:
                    return
                _write_all(port, data)
        except OSError:
            return


def serve_transport(kind: str, backend_path: str) -> None:
    """Connect the local gRPC socket to the host; blocks for the life of the VM."""
    if kind == "serial":
        SerialBridge(find_port(SERIAL_PORT_NAME), backend_path).serve_forever()
    else:
        raise SystemExit(f"agent transport {kind!r} is not available in this guest")
