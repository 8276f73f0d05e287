"""Token masking by prefix, as gitlab-runner's token sanitizer does: ``glpat-abc123``
becomes ``glpat-[MASKED]`` in the trace, for GitLab's built-in token prefixes and the job's
``features.token_mask_prefixes``. Masked variables are masked by value elsewhere
(core/secrets.py); this catches tokens the job was never given but prints anyway.

A token may arrive split across output chunks: the tail that could still be (or become) a
token is held back until the next chunk or the flush, never sent half-masked.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Iterable

from kata_ci.runner.core.sinks import LogSink, Stream

# gitlab-runner common/buildlogger/internal/tokensanitizer/token_masker.go
BUILTIN_PREFIXES = ("glpat-", "gloas-", "gldt-", "glrt-", "glcbt-", "glptt-", "glft-",
                    "glimt-", "glagent-", "glsoat-", "glffct-", "gltst-", "glrtr-", "GR1348941")
TOKEN_CHARS = rb"[A-Za-z0-9_.\-]"
MASK = b"[MASKED]"
MAX_HOLD = 4096  # a "token" longer than this is masked and sent as it goes


class PrefixMaskingSink:
    """Masks prefixed tokens per stream before handing the output on."""

    def __init__(self, inner: LogSink, prefixes: Iterable[str] = ()) -> None:
        self.inner = inner
        valid = {p for p in (*BUILTIN_PREFIXES, *prefixes) if 3 <= len(p) <= 64 and p.isprintable()}
        self.prefixes = sorted((p.encode() for p in valid), key=len, reverse=True)
        alternatives = b"|".join(re.escape(p) for p in self.prefixes)
        self.token = re.compile(b"(" + alternatives + b")" + TOKEN_CHARS + b"+")
        self.open_token = re.compile(b"(?:" + alternatives + b")" + TOKEN_CHARS + b"*\\Z")
        self.held: dict[Stream, bytes] = {}
        self.lock = threading.Lock()

    def mask(self, data: bytes) -> bytes:
        return self.token.sub(lambda m: m.group(1) + MASK, data)

    def _cut(self, data: bytes) -> int:
        """Where the part that might still grow into a token begins."""
        cut = len(data)
        found = self.open_token.search(data, max(0, len(data) - MAX_HOLD))
        if found:
            cut = found.start()
        for prefix in self.prefixes:
            for size in range(min(len(prefix) - 1, len(data)), 0, -1):
                if data.endswith(prefix[:size]):
                    cut = min(cut, len(data) - size)
                    break
        return cut

    def write(self, stream: Stream, data: bytes) -> None:
        with self.lock:
            data = self.held.pop(stream, b"") + data
            cut = self._cut(data)
            if len(data) - cut > MAX_HOLD:
                cut = len(data)
            ready, rest = data[:cut], data[cut:]
            if rest:
                self.held[stream] = rest
        if ready:
            self.inner.write(stream, self.mask(ready))

    def flush(self) -> None:
        with self.lock:
            held, self.held = self.held, {}
        for stream, data in held.items():
            self.inner.write(stream, self.mask(data))
