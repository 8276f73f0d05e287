"""The ``[gitlab]`` part of kata-ci's TOML config: the GitLab runners this host serves.

    [gitlab]
    cache_dir = ""          # host-side job caches; empty: ~/.cache/kata-ci/gitlab-cache
    max_artifacts_mib = 1024  # one artifacts or cache archive
    cache_max_mib = 10240   # all caches of one GitLab on this host; least recently used go

    [[gitlab.runners]]      # one per runner (instance, group or project); written by register
    name = "gitlab.example.com"
    url = "https://gitlab.example.com"
    id = 12345
    token = "glrt-..."      # the file holds tokens: register writes it 0600
    token_obtained_at = 1767225600.0
    token_expires_at = 0.0  # 0: does not expire
    system_id = "s_0123456789ab"
    label = "default"       # kata-ci label: VM size and network policy of its jobs
    tls_ca_file = ""        # a private CA for this GitLab

`register` and token rotation rewrite the file with tomlkit, keeping the operator's comments
and order; the write is atomic and keeps the file's 0600 mode.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import tomlkit
import tomlkit.items

from kata_ci.errors import UserError

SYSTEM_ID = re.compile(r"[sr]_[0-9a-f]{12}")


@dataclass(frozen=True)
class GitLabRunner:
    url: str
    token: str
    system_id: str
    name: str = ""
    id: int = 0
    token_obtained_at: float = 0.0
    token_expires_at: float = 0.0
    label: str = "default"
    tls_ca_file: str = ""

    @property
    def shown(self) -> str:
        return self.name or f"{self.url} #{self.id}"

    def rotate_at(self) -> float | None:
        """When to reset the token: at 75 % of its lifetime, as gitlab-runner does."""
        if not self.token_expires_at or not self.token_obtained_at:
            return None
        return self.token_obtained_at + 0.75 * (self.token_expires_at - self.token_obtained_at)


@dataclass(frozen=True)
class GitLabConfig:
    runners: list[GitLabRunner] = field(default_factory=list)
    cache_dir: str = ""
    max_artifacts_mib: int = 1024
    cache_max_mib: int = 10240


def parse(source: str, table: Any) -> GitLabConfig:
    if not isinstance(table, dict):
        raise UserError(f"{source}: [gitlab] must be a table")
    unknown = set(table) - {"runners", "cache_dir", "max_artifacts_mib", "cache_max_mib"}
    if unknown:
        raise UserError(f"{source}: unknown key(s) gitlab.{', gitlab.'.join(sorted(unknown))}")
    runners = []
    known = {f.name: f for f in fields(GitLabRunner)}
    for index, raw in enumerate(table.get("runners", [])):
        where = f"{source}: gitlab.runners[{index}]"
        if not isinstance(raw, dict):
            raise UserError(f"{where} must be a table")
        for key, value in raw.items():
            if key not in known:
                raise UserError(f"{where}: unknown key {key}")
            want = {"float": float, "int": int}.get(str(known[key].type), str)
            if (not isinstance(value, want) and not (want is float and isinstance(value, int))) \
                    or isinstance(value, bool):
                raise UserError(f"{where}.{key} must be {want.__name__}")
        missing = {"url", "token", "system_id"} - set(raw)
        if missing:
            raise UserError(f"{where} lacks {', '.join(sorted(missing))} "
                            "(`kata-ci gitlab register` writes them)")
        if not SYSTEM_ID.fullmatch(raw["system_id"]):
            raise UserError(f"{where}.system_id must look like s_0123456789ab")
        values: dict[str, Any] = {k: float(v) if str(known[k].type) == "float" else v
                                  for k, v in raw.items()}
        runners.append(GitLabRunner(**values))
    cache_dir = table.get("cache_dir", "")
    limit = table.get("max_artifacts_mib", 1024)
    budget = table.get("cache_max_mib", 10240)
    if not isinstance(cache_dir, str) or not all(
            isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in (limit, budget)):
        raise UserError(f"{source}: gitlab.cache_dir must be a path, gitlab.max_artifacts_mib "
                        "and gitlab.cache_max_mib positive numbers")
    return GitLabConfig(runners, cache_dir, limit, budget)


def new_system_id() -> str:
    """``s_`` + 12 hex digits from /etc/machine-id (one runner manager per host, stable
    across reinstalls of kata-ci), else ``r_`` + random, as gitlab-runner does."""
    with contextlib.suppress(OSError):
        import hashlib
        machine = Path("/etc/machine-id").read_text().strip()
        if machine:
            return "s_" + hashlib.sha256(f"kata-ci:{machine}".encode()).hexdigest()[:12]
    return "r_" + secrets.token_hex(6)


@contextlib.contextmanager
def _edit(path: Path) -> Iterator[tomlkit.TOMLDocument]:
    try:
        doc = tomlkit.parse(path.read_text()) if path.exists() else tomlkit.document()
    except (OSError, tomlkit.exceptions.ParseError) as exc:
        raise UserError(f"config file {path}: {exc}") from None
    yield doc
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(fd, 0o600)  # it holds runner tokens
        with os.fdopen(fd, "w") as out:
            out.write(tomlkit.dumps(doc))
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def add_runner(path: Path, runner: GitLabRunner) -> None:
    """Append a [[gitlab.runners]] entry (replacing one with the same url and id)."""
    with _edit(path) as doc:
        gitlab = doc.setdefault("gitlab", tomlkit.table())
        runners = gitlab.setdefault("runners", tomlkit.aot())
        keep = [r for r in runners if not (r.get("url") == runner.url and r.get("id") == runner.id)]
        entries = tomlkit.aot()
        for old in keep:
            entries.append(old)
        entry = tomlkit.table()
        for f in fields(GitLabRunner):
            entry[f.name] = getattr(runner, f.name)
        entries.append(entry)
        gitlab["runners"] = entries


def update_token(path: Path, old: GitLabRunner, token: str, obtained: float,
                 expires: float) -> GitLabRunner:
    """Store a rotated token in place of ``old``'s; the runner with it."""
    with _edit(path) as doc:
        for entry in doc.get("gitlab", {}).get("runners", []):
            if entry.get("token") == old.token:
                entry["token"] = token
                entry["token_obtained_at"] = obtained
                entry["token_expires_at"] = expires
                break
        else:
            raise UserError(f"{path}: runner {old.shown} is no longer in the file")
    from dataclasses import replace
    return replace(old, token=token, token_obtained_at=obtained, token_expires_at=expires)
