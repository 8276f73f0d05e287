"""The one environment builder: what a job's processes see, whichever source started it.

Nothing of the host's environment leaks in by itself (the worker's own TERM must not reach a
queued job): ``term`` is passed only by a source that has a user's terminal behind it, and
every other variable comes from the user (`-e`, `--var`, `--env-file`) or the CI file.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

from kata_ci.errors import UserError
from kata_ci.runner.core import beneath

GUEST_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def job_env(*layers: Mapping[str, str], term: str | None = None,
            path_prepend: Sequence[str] = ()) -> dict[str, str]:
    """Defaults, then TERM, then each layer in order (later wins); ``path_prepend`` goes in
    front of the resulting PATH (GitHub's $GITHUB_PATH, newest first)."""
    env = {"PATH": GUEST_PATH, "HOME": "/root", "LANG": "C.UTF-8", "CI": "true",
           "KATA_CI": "true"}
    if term:
        env["TERM"] = term
    for layer in layers:
        env.update(layer)
    if path_prepend:
        env["PATH"] = ":".join([*path_prepend, env["PATH"]])
    return env


def user_term() -> str | None:
    """The invoking user's TERM, for sources whose output reaches that user's terminal."""
    return os.environ.get("TERM") or None


def parse_env(items: Sequence[str], flag: str = "--env") -> dict[str, str]:
    """-e NAME=VALUE sets, -e NAME passes the host's value (as docker run -e)."""
    env: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not _NAME.fullmatch(key):
            raise UserError(f"{flag} {item!r}: expected NAME=VALUE or NAME")
        if not sep:
            if key not in os.environ:
                raise UserError(f"{flag} {key}: not set on the host")
            value = os.environ[key]
        env[key] = value
    return env


def parse_vars(items: Sequence[str], env_file: Path | None,
               workspace: Path | None = None) -> dict[str, str]:
    """CI variables: --env-file NAME=VALUE lines, then --var NAME=VALUE (later wins). An
    env file inside the workspace is read beneath it: a job may have made it a link to a
    host file, whose lines would become the next job's variables."""
    out: dict[str, str] = {}
    if env_file is not None:
        try:
            lines = (beneath.read_user_file(env_file) if workspace is None
                     else beneath.read_named(workspace, env_file)).splitlines()
        except UserError as exc:
            raise UserError(f"--env-file: {exc}") from None
        for number, line in enumerate(lines, 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            key, sep, value = line.removeprefix("export ").partition("=")
            if not sep or not _NAME.fullmatch(key.strip()):
                raise UserError(f"{env_file}:{number}: expected NAME=VALUE")
            out[key.strip()] = value.strip().strip("'\"")
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not _NAME.fullmatch(key):
            raise UserError(f"--var {item!r}: expected NAME=VALUE")
        out[key] = value
    return out
