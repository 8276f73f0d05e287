"""Secrets: values a job gets in its environment that no log of it shows.

A ``Masker`` knows each secret in the forms a job is likely to print it in, after GitHub's
runner (its SecretMasker ``ValueEncoders``): the value itself, its base64 at each of the three
byte alignments it can have inside a longer base64 text (``base64(user:token)``) with the
characters that also depend on neighbouring bytes trimmed, its percent-encoding (URLs), and
its JSON-string escape. Each line of a multi-line secret is a form of its own, as on GitHub.

``MaskingSink`` masks one job's output per stream as it streams. A secret may arrive split
across chunks (two writes with a sleep between), so a sink holds back the shortest tail that
could still begin a masked form, and releases it with the next chunk or at ``flush``. The
lifecycle puts one around every job's sink and flushes it at the job's end, whatever the end.

Values shorter than ``MIN_SECRET_BYTES`` are refused: GitLab refuses masked variables under
8 characters, because a short mask both hides ordinary output and gives the value away by
what it hides.
"""

from __future__ import annotations

import base64
import json
import os
import re
import threading
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from urllib.parse import quote, quote_plus

from kata_ci.errors import UserError
from kata_ci.runner.core.sinks import LogSink, Stream

MIN_SECRET_BYTES = 8  # as GitLab's masked variables
GITLAB_MASK = "[MASKED]"
GITHUB_MASK = "***"
_MIN_FORM_BYTES = 4  # a derived form (one line of a secret) shorter than this is not masked
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def secret_problem(value: str) -> str | None:
    """Why a value cannot be a secret (too short to mask), or None."""
    size = len(value.encode())
    if size < MIN_SECRET_BYTES:
        return (f"is {size} byte{'s' * (size != 1)} long; a masked value needs at least "
                f"{MIN_SECRET_BYTES} (a shorter one would be both guessable and mask ordinary "
                "output)")
    return None


def check_secrets(secrets: Mapping[str, str], what: str = "secret") -> None:
    """UserError naming the first secret that cannot be masked."""
    for name, value in secrets.items():
        problem = secret_problem(value)
        if problem:
            raise UserError(f"{what} {name} {problem}")


def _base64_forms(raw: bytes) -> set[bytes]:
    """The value's base64 as it appears inside a longer base64 text.

    With ``p`` bytes of something else before it in its 3-byte group, base64 character ``i``
    of the whole holds bits 6i..6i+6 of (p unknown bytes + value + more unknown bytes): only
    the characters whose six bits all lie inside the value are the value's own.
    """
    forms = {base64.b64encode(raw)}  # the whole value encoded alone, padding included
    for p in range(3):
        encoded = base64.b64encode(b"\0" * p + raw).rstrip(b"=")
        first = -(-8 * p // 6)  # ceil: the first character free of the bytes before
        last = 8 * (p + len(raw)) // 6  # floor: the end of the last one free of those after
        forms.add(encoded[first:last])
    return forms


def masked_forms(value: str) -> set[bytes]:
    """Every form of ``value`` that a Masker hides."""
    raw = value.encode()
    forms = {raw, *_base64_forms(raw)}
    for text in (quote(value, safe=""), quote_plus(value, safe=""),
                 json.dumps(value)[1:-1], json.dumps(value, ensure_ascii=False)[1:-1]):
        forms.add(text.encode())
    if "\n" in value:  # each line long enough to be a secret of its own
        forms.update(line for line in (s.strip().encode() for s in value.splitlines())
                     if len(line) >= MIN_SECRET_BYTES)
    return {form for form in forms if len(form) >= _MIN_FORM_BYTES}


class Masker:
    """Replaces every masked form of its secrets with ``replacement``."""

    def __init__(self, values: Iterable[str] = (), replacement: str = GITLAB_MASK) -> None:
        self.replacement = replacement.encode()
        self._forms: set[bytes] = set()
        self._lock = threading.Lock()
        for value in values:
            self.add(value)

    def add(self, value: str) -> bool:
        """Mask ``value`` from now on; False (nothing added) if it is too short to mask."""
        if secret_problem(value):
            return False
        forms = masked_forms(value)
        with self._lock:
            self._forms |= forms
        return True

    def __bool__(self) -> bool:
        return bool(self._forms)

    def mask(self, data: bytes) -> bytes:
        """``data`` with every form masked, nothing held back (the end of a stream)."""
        with self._lock:
            return self._replace(data, self._spans(data), len(data))

    def mask_text(self, text: str) -> str:
        """A message of ours (an outcome, a console tail) with every form masked."""
        return self.mask(text.encode()).decode(errors="replace") if self._forms else text

    def split(self, data: bytes) -> tuple[bytes, bytes]:
        """(what may be shown now, masked; the raw tail that could begin a form)."""
        with self._lock:
            if not self._forms:
                return data, b""
            spans = self._spans(data)
            cut = self._held_from(data)
            for start, end in spans:
                if start < cut < end:  # a match running into the held tail may still grow
                    cut = start
                    break
            return self._replace(data, spans, cut), data[cut:]

    def _spans(self, data: bytes) -> list[tuple[int, int]]:
        """Every occurrence of every form, overlapping ones merged (two secrets that share
        bytes are masked as one stretch, so neither shows a part of the other)."""
        found = []
        for form in self._forms:
            at = data.find(form)
            while at >= 0:
                found.append((at, at + len(form)))
                at = data.find(form, at + 1)
        merged: list[tuple[int, int]] = []
        for start, end in sorted(found):
            if merged and start <= merged[-1][1]:
                merged[-1] = (merged[-1][0], max(end, merged[-1][1]))
            else:
                merged.append((start, end))
        return merged

    def _held_from(self, data: bytes) -> int:
        """Where the tail begins that is a proper prefix of some form (len(data): none)."""
        held = len(data)
        for form in self._forms:  # only where the form's first byte is: cheap for long ones
            at = data.find(form[:1], max(0, len(data) - len(form) + 1))
            while 0 <= at < held:
                if form.startswith(data[at:]):
                    held = at
                    break
                at = data.find(form[:1], at + 1)
        return held

    def _replace(self, data: bytes, spans: Sequence[tuple[int, int]], cut: int) -> bytes:
        out, done = [], 0
        for start, end in spans:
            if end > cut:
                break
            out += [data[done:start], self.replacement]
            done = end
        out.append(data[done:cut])
        return b"".join(out)


class MaskingSink:
    """A LogSink that masks its masker's secrets before passing output on (per stream)."""

    def __init__(self, inner: LogSink, masker: Masker) -> None:
        self.inner = inner
        self.masker = masker
        self._held: dict[Stream, bytes] = {}
        self._lock = threading.Lock()

    def write(self, stream: Stream, data: bytes) -> None:
        with self._lock:
            shown, held = self.masker.split(self._held.pop(stream, b"") + data)
            if held:
                self._held[stream] = held
        if shown:
            self.inner.write(stream, shown)

    def add(self, value: str) -> bool:
        """Register a secret found at run time (GitHub's ::add-mask::)."""
        return self.masker.add(value)

    def flush(self) -> None:
        """Release every held-back tail, masked: the end of the job's output."""
        with self._lock:
            held, self._held = self._held, {}
        for stream, data in held.items():
            self.inner.write(stream, self.masker.mask(data))


SECRET_FILE_LIMIT = 64 << 10


def parse_secrets(items: Sequence[str], workspace: Path, flag: str = "--secret") -> dict[str, str]:
    """``NAME``: the host environment variable NAME; ``NAME=@PATH``: the file's content (one
    trailing newline dropped). ``NAME=VALUE`` is refused: it would put the value in argv.
    A file inside the workspace is read beneath it (a job may have made it a link to a host
    file); one outside is the user's own, bounded and regular like every file kata-ci reads."""
    out: dict[str, str] = {}
    for item in items:
        name, sep, source = item.partition("=")
        if not _NAME.fullmatch(name):
            raise UserError(f"{flag} {name!r}: expected NAME or NAME=@FILE")
        if not sep:
            if name not in os.environ:
                raise UserError(f"{flag} {name}: no environment variable {name} on the host")
            value = os.environ[name]
        elif source.startswith("@") and len(source) > 1:
            value = _read_secret_file(workspace, Path(source[1:]).absolute(),
                                      f"{flag} {name}")
        else:
            raise UserError(f"{flag} {name}=...: a value on the command line shows in every "
                            f"process list; use {flag} {name} (from the environment) or "
                            f"{flag} {name}=@FILE")
        problem = secret_problem(value)
        if problem:
            raise UserError(f"{flag} {name}: the value {problem}")
        out[name] = value
    return out


def _read_secret_file(workspace: Path, path: Path, what: str) -> str:
    from kata_ci.runner.core.beneath import read_named

    try:
        value = read_named(workspace, path, SECRET_FILE_LIMIT)
    except UserError as exc:
        raise UserError(f"{what}: {exc}") from None
    value = value.removesuffix("\n").removesuffix("\r")
    if "\0" in value:
        raise UserError(f"{what}: {path} holds a NUL byte, which no environment variable can")
    return value
