"""The local protocol between `kata-ci gitlab-executor run` and the job's holder process.

One unix stream socket per run stage, in the job's 0700 state directory; each side checks
with SO_PEERCRED that the other runs as the same user. Frames: one kind byte, a 4-byte
big-endian length, the payload.

    run -> holder   R  {"stage": ..., "env": {...}}      the request (JSON)
                    S  script bytes                        what bash runs in the guest
                    C  (empty)                             cancel: SIGTERM, grace, kill
    holder -> run   1  stdout bytes / 2  stderr bytes / N  a kata-ci note (to stderr)
                    X  {"result": ..., "code": N, "message": ...}   the end (JSON)

``result``: success, failed (the script's own non-zero ``code``), cancelled,
system_failure. Closing the connection before X cancels the command.
"""

from __future__ import annotations

import json
import os
import socket
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

REQUEST = b"R"
SCRIPT = b"S"
CANCEL = b"C"
STDOUT = b"1"
STDERR = b"2"
NOTE = b"N"
EXIT = b"X"
KINDS = frozenset({REQUEST, SCRIPT, CANCEL, STDOUT, STDERR, NOTE, EXIT})

MAX_FRAME = 8 << 20
_HEADER = struct.Struct(">cI")
_UCRED = struct.Struct("3i")  # pid, uid, gid

Result = Literal["success", "failed", "cancelled", "system_failure"]
RESULTS: frozenset[str] = frozenset({"success", "failed", "cancelled", "system_failure"})


class ProtocolError(Exception):
    """The other side sent something this protocol does not have."""


def send(sock: socket.socket, kind: bytes, payload: bytes = b"") -> None:
    if kind not in KINDS:
        raise ValueError(f"unknown frame kind {kind!r}")
    if len(payload) > MAX_FRAME:
        raise ProtocolError(f"frame of {len(payload)} bytes, over {MAX_FRAME}")
    sock.sendall(_HEADER.pack(kind, len(payload)) + payload)


def send_json(sock: socket.socket, kind: bytes, value: Mapping[str, Any]) -> None:
    send(sock, kind, json.dumps(value).encode())


def recv(sock: socket.socket) -> tuple[bytes, bytes] | None:
    """The next frame, or None at a clean end of the connection."""
    header = _recv_exact(sock, _HEADER.size, eof_ok=True)
    if header is None:
        return None
    kind, length = _HEADER.unpack(header)
    if kind not in KINDS:
        raise ProtocolError(f"unknown frame kind {kind!r}")
    if length > MAX_FRAME:
        raise ProtocolError(f"frame of {length} bytes, over {MAX_FRAME}")
    payload = _recv_exact(sock, length, eof_ok=False) if length else b""
    assert payload is not None
    return kind, payload


def decode_json(payload: bytes) -> dict[str, Any]:
    try:
        value = json.loads(payload)
    except ValueError:
        raise ProtocolError("a JSON frame that is not JSON") from None
    if not isinstance(value, dict):
        raise ProtocolError("a JSON frame that is not an object")
    return value


def exit_payload(result: Result, code: int = 0, message: str = "") -> dict[str, Any]:
    return {"result": result, "code": code, "message": message}


def parse_exit(payload: bytes) -> tuple[Result, int, str]:
    value = decode_json(payload)
    result, code, message = value.get("result"), value.get("code", 0), value.get("message", "")
    if result not in RESULTS or not isinstance(code, int) or not isinstance(message, str):
        raise ProtocolError("a malformed exit frame")
    return result, code, message


def parse_request(payload: bytes) -> tuple[str, dict[str, str]]:
    """(stage, env) of a run request; ProtocolError unless both are what `run` sends."""
    value = decode_json(payload)
    stage, env = value.get("stage"), value.get("env")
    if not isinstance(stage, str) or not isinstance(env, dict) or not all(
            isinstance(k, str) and isinstance(v, str) and k and "=" not in k
            and "\0" not in k + v for k, v in env.items()):
        raise ProtocolError("a malformed run request")
    return stage, env


def peer_uid(sock: socket.socket) -> int:
    _, uid, _ = _UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                              _UCRED.size))
    return int(uid)


def check_peer(sock: socket.socket) -> None:
    """The other end runs as our user, or ProtocolError."""
    uid = peer_uid(sock)
    if uid != os.geteuid():
        raise ProtocolError(f"peer runs as uid {uid}, not {os.geteuid()}")


def connect(path: Path, timeout: float = 10.0) -> socket.socket:
    """A checked connection to the holder; OSError when nobody listens there."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.settimeout(timeout)
        sock.connect(str(path))
        sock.settimeout(None)
        check_peer(sock)
    except BaseException:
        sock.close()
        raise
    return sock


def _recv_exact(sock: socket.socket, size: int, eof_ok: bool) -> bytes | None:
    chunks, got = [], 0
    while got < size:
        chunk = sock.recv(min(size - got, 1 << 20))
        if not chunk:
            if eof_ok and got == 0:
                return None
            raise ProtocolError("connection closed in the middle of a frame")
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)
