"""A job's workspace on its way through the queue: packed by `submit`, unpacked by the worker.

The checkout travels as tar.gz in Redis, uncommitted changes included, as `kata-ci run` would
see it; no git server is needed.
"""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

from kata_ci.errors import UserError

MAX_WORKSPACE = 256 << 20


def pack(directory: Path) -> bytes:
    """The workspace as tar.gz; refused over MAX_WORKSPACE so Redis is not flooded."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz", compresslevel=3) as tar:
        tar.add(directory, arcname=".")
    data = buffer.getvalue()
    if len(data) > MAX_WORKSPACE:
        raise UserError(f"workspace {directory} packs to {len(data) >> 20} MiB, over the "
                        f"{MAX_WORKSPACE >> 20} MiB limit")
    return data


def unpack(data: bytes, into: Path) -> None:
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
        tar.extractall(into, filter="data")  # no absolute paths, no escaping links
