"""The VM's host-side logs (guest console, QEMU and file-server output), each capped.

The guest writes the console (a job can flood /dev/ttyS0), and a guest can make QEMU or the
file server print: none of them may fill the host disk. QEMU and virtiofsd never get a file
of their own; they write into pipes, and one thread per VM copies the pipes into files that
rotate at half the cap (``name`` and ``name.1``), so at most ``cap`` bytes per log stay and
the newest output, the part failure reports need, is always there.
"""

from __future__ import annotations

import contextlib
import os
import selectors
import threading
from collections.abc import Callable
from pathlib import Path

DEFAULT_CAP = 4 << 20  # per log: console output of a runaway job is noise after this


class CappedLog:
    def __init__(self, path: Path, cap: int, watch: Callable[[bytes], None] | None) -> None:
        self.path = path
        self.watch = watch
        self.half = max(1, cap // 2)
        self._file = path.open("ab")
        self._size = self._file.tell()

    def write(self, data: bytes) -> None:
        if self.watch is not None:
            self.watch(data)
        while data:
            room = self.half - self._size
            if room <= 0:
                self._rotate()
                continue
            chunk, data = data[:room], data[room:]
            self._file.write(chunk)
            self._size += len(chunk)
        self._file.flush()

    def _rotate(self) -> None:
        self._file.close()
        os.replace(self.path, self.path.with_name(self.path.name + ".1"))
        self._file = self.path.open("wb")
        self._size = 0

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._file.close()


class LogPump:
    """Copies pipes to capped logs on one daemon thread until every pipe's writer is gone."""

    def __init__(self, cap: int = DEFAULT_CAP) -> None:
        self.cap = cap
        self._selector = selectors.DefaultSelector()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def pipe(self, path: Path, watch: Callable[[bytes], None] | None = None) -> int:
        """A new pipe whose read end feeds ``path``; returns the write end for the child
        (the caller closes it once the child has it). ``watch`` sees every chunk first."""
        read, write = os.pipe()
        os.set_blocking(read, False)
        with self._lock:
            self._selector.register(read, selectors.EVENT_READ,
                                    CappedLog(path, self.cap, watch))
        return write

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="vm-logs", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            with self._lock:
                if not self._selector.get_map():
                    return
            for key, _ in self._selector.select(timeout=0.5):
                log: CappedLog = key.data
                try:
                    data = os.read(key.fd, 1 << 16)
                except BlockingIOError:
                    continue
                except OSError:
                    data = b""
                if data:
                    log.write(data)
                else:
                    self._drop(key.fd, log)

    def _drop(self, fd: int, log: CappedLog) -> None:
        with self._lock, contextlib.suppress(KeyError, ValueError):
            self._selector.unregister(fd)
        os.close(fd)
        log.close()

    def join(self, timeout: float = 2.0) -> None:
        """After the writers are dead: the thread drains what is left and ends."""
        if self._thread is not None:
            self._thread.join(timeout)
        with self._lock:
            for key in list((self._selector.get_map() or {}).values()):  # None once closed
                with contextlib.suppress(OSError, KeyError, ValueError):
                    self._selector.unregister(key.fd)
                    os.close(key.fd)
                key.data.close()
            if self._thread is None or not self._thread.is_alive():
                # Its epoll fd now, not when a reference cycle is collected (the churn
                # bench saw them pile up between collections).
                self._selector.close()


def tail(path: Path, lines: int) -> str:
    """The last lines of a capped log, reaching into the rotated half when needed."""
    data = b""
    for part in (path.with_name(path.name + ".1"), path):
        try:
            with part.open("rb") as handle:
                handle.seek(0, os.SEEK_END)
                handle.seek(max(0, handle.tell() - 64 * 1024))
                data = (data + handle.read())[-64 * 1024:]
        except OSError:
            continue
    return b"\n".join(data.splitlines()[-lines:]).decode(errors="replace")
