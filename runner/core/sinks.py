"""Where a job's output goes: one ``LogSink`` shape for the terminal, a pipeline's prefixed
lines, the Redis job log and (later) a GitLab trace.

Streams are the guest's ``stdout`` and ``stderr``, and ``kata-ci``: notes of ours about the
job (a boot failure, a timeout, a system failure with the console tail) that belong in the
job's log whichever source started it. Operator logs (the worker's) are kept apart from these.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable
from typing import Literal, Protocol

Stream = Literal["stdout", "stderr", "kata-ci"]
Emit = Callable[[Stream, bytes], None]  # one job's output, chunk by chunk


class LogSink(Protocol):
    """Receives output chunks as they arrive."""

    def write(self, stream: Stream, data: bytes) -> None: ...


def stream_named(name: str) -> Stream:
    """A stored stream name back as a Stream (anything unknown is shown as stderr)."""
    return "stdout" if name == "stdout" else "kata-ci" if name == "kata-ci" else "stderr"


def note(sink: LogSink, text: str) -> None:
    """A kata-ci note in the job's log, on a line of its own."""
    sink.write("kata-ci", f"kata-ci: {text.rstrip()}\n".encode(errors="replace"))


class TerminalSink:
    """Guest stdout to our stdout; stderr and kata-ci notes to stderr; unbuffered.

    ``notes=False`` drops our notes: `kata-ci run -- CMD` reports the ending itself.
    """

    def __init__(self, notes: bool = True) -> None:
        self.notes = notes

    def write(self, stream: Stream, data: bytes) -> None:
        if stream == "kata-ci" and not self.notes:
            return
        target = sys.stdout.buffer if stream == "stdout" else sys.stderr.buffer
        target.write(data)
        target.flush()


class CallbackSink:
    """A LogSink that hands each chunk to a function."""

    def __init__(self, emit: Emit) -> None:
        self.emit = emit

    def write(self, stream: Stream, data: bytes) -> None:
        self.emit(stream, data)


class PrefixedOutput:
    """Whole lines, each handed on with its job's name: several jobs share one terminal."""

    def __init__(self, write: Callable[[str, Stream, bytes], None]) -> None:
        self.write = write
        self.partial: dict[tuple[str, Stream], bytes] = {}
        self.lock = threading.Lock()

    def sink(self, job: str) -> CallbackSink:
        def emit(stream: Stream, data: bytes) -> None:
            with self.lock:
                buffered = self.partial.pop((job, stream), b"") + data
                *lines, rest = buffered.split(b"\n")
                for line in lines:
                    self.write(job, stream, line + b"\n")
                if rest:
                    self.partial[(job, stream)] = rest
        return CallbackSink(emit)

    def flush(self, job: str) -> None:
        with self.lock:
            streams: tuple[Stream, ...] = ("stdout", "stderr", "kata-ci")
            for stream in streams:
                rest = self.partial.pop((job, stream), b"")
                if rest:
                    self.write(job, stream, rest + b"\n")
