"""The ``[github]`` part of kata-ci's TOML config: the GitHub runners this host provides.

    [github]
    api_url = "https://api.github.com"   # GitHub Enterprise Server: https://HOST/api/v3
    org = "octo-org"          # org-level runners; empty: repository-level runners
    repositories = ["octo-org/hello-world"]  # served (and watched by reconcile)
    runner_group_id = 1       # "Default"
    # A GitHub App (preferred) ...
    app_id = 12345
    installation_id = 678
    private_key_file = "/etc/kata-ci/github-app.pem"   # or $KATA_CI_GITHUB_PRIVATE_KEY_FILE
    # ... or a token (fine-grained or classic, "Administration: write" / admin:org)
    token_file = ""           # or $KATA_CI_GITHUB_TOKEN
    webhook_secret_file = "/etc/kata-ci/github-webhook-secret"  # or $KATA_CI_GITHUB_WEBHOOK_SECRET
    name_prefix = "kata-ci-"  # every runner kata-ci creates; reconcile removes only these
    idle_timeout = 300.0      # a runner without a job by then is stopped and deregistered
    reconcile_interval = 60.0
    max_body_kib = 25600      # GitHub caps webhook payloads at 25 MB
    runner_tarball = ""       # GitHub's actions-runner-linux-x64-*.tar.gz for `images build`

    [[github.label_sets]]     # runs-on labels -> a kata-ci label (VM size, network policy)
    labels = ["kata-ci"]      # "self-hosted", "linux", "x64" are implied, as on GitHub
    label = "default"
    max_runners = 10

Secrets are read from files or the environment only when used, and never logged.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from kata_ci.errors import UserError

# Labels GitHub gives every self-hosted Linux x64 runner itself: a job may ask for them.
IMPLIED = frozenset({"self-hosted", "linux", "x64"})
# GitHub's own rules: owners are letters, digits and hyphens; a repository is never . or ..
REPO = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]{0,38}/(?!\.\.?$)[A-Za-z0-9_.-]{1,100}")
LABEL = re.compile(r"[A-Za-z0-9_.:-]{1,100}")  # what kata-ci accepts as a runner label
PREFIX = re.compile(r"[a-z0-9-]{1,32}")


@dataclass(frozen=True)
class LabelSet:
    labels: tuple[str, ...]
    label: str = "default"
    max_runners: int = 10

    @property
    def key(self) -> str:
        """Stable name of the set in Redis and logs."""
        return ",".join(sorted(self.labels))

    def serves(self, wanted: list[str]) -> bool:
        """A job's runs-on labels are all this set's (or implied), case-insensitively, as
        GitHub matches them."""
        have = {lbl.lower() for lbl in self.labels} | IMPLIED
        return all(lbl.lower() in have for lbl in wanted)


@dataclass(frozen=True)
class GitHubConfig:
    api_url: str = "https://api.github.com"
    org: str = ""
    repositories: tuple[str, ...] = ()
    runner_group_id: int = 1
    app_id: int = 0
    installation_id: int = 0
    private_key_file: str = ""
    token_file: str = ""
    webhook_secret_file: str = ""
    name_prefix: str = "kata-ci-"
    idle_timeout: float = 300.0
    reconcile_interval: float = 60.0
    max_body_kib: int = 25600
    runner_tarball: str = ""
    label_sets: tuple[LabelSet, ...] = ()

    @property
    def enabled(self) -> bool:
        return bool(self.label_sets)

    def label_set_for(self, wanted: list[str]) -> LabelSet | None:
        """The smallest set serving all of ``wanted``: a small job does not take a big VM."""
        serving = [s for s in self.label_sets if s.serves(wanted)]
        return min(serving, key=lambda s: len(s.labels)) if serving else None

    def label_set(self, key: str) -> LabelSet | None:
        return next((s for s in self.label_sets if s.key == key), None)

    def serves_repo(self, full_name: str) -> bool:
        """A repository whose jobs this host takes: the org's, or one listed."""
        if self.org and full_name.split("/", 1)[0].lower() == self.org.lower():
            return True
        return full_name.lower() in {r.lower() for r in self.repositories}

    def scope_of(self, full_name: str) -> str:
        """Where a runner for this repository's job registers: the org, or the repository."""
        return f"org:{self.org}" if self.org else f"repo:{full_name}"

    def scopes(self) -> list[str]:
        return [f"org:{self.org}"] if self.org else [f"repo:{r}" for r in self.repositories]

    # -- secrets: read at use, from a file or the environment --------------------------------
    def token(self) -> str:
        return _secret(self.token_file, "KATA_CI_GITHUB_TOKEN", "github.token_file")

    def private_key(self) -> str:
        path = self.private_key_file or os.environ.get("KATA_CI_GITHUB_PRIVATE_KEY_FILE", "")
        return _secret(path, "", "github.private_key_file")

    def webhook_secret(self) -> bytes:
        secret = _secret(self.webhook_secret_file, "KATA_CI_GITHUB_WEBHOOK_SECRET",
                         "github.webhook_secret_file")
        if not secret:
            raise UserError("no webhook secret: set [github] webhook_secret_file or "
                            "KATA_CI_GITHUB_WEBHOOK_SECRET (GitHub signs deliveries with it)")
        return secret.encode()


def _secret(path: str, env: str, key: str) -> str:
    if path:
        try:
            return Path(path).read_text().strip()
        except OSError as exc:
            raise UserError(f"{key} {path}: {exc.strerror or exc}") from None
    return os.environ.get(env, "").strip() if env else ""


_SCALARS: dict[str, type] = {"api_url": str, "org": str, "runner_group_id": int, "app_id": int,
                             "installation_id": int, "private_key_file": str, "token_file": str,
                             "webhook_secret_file": str, "name_prefix": str,
                             "idle_timeout": float, "reconcile_interval": float,
                             "max_body_kib": int, "runner_tarball": str}


def parse(source: str, table: Any) -> GitHubConfig:
    if not isinstance(table, dict):
        raise UserError(f"{source}: [github] must be a table")
    known = {f.name for f in fields(GitHubConfig)}
    unknown = set(table) - known
    if unknown:
        raise UserError(f"{source}: unknown key(s) github.{', github.'.join(sorted(unknown))}")
    values: dict[str, Any] = {}
    for key, want in _SCALARS.items():
        if key not in table:
            continue
        value = table[key]
        ok = isinstance(value, want) or (want is float and isinstance(value, int))
        if not ok or isinstance(value, bool):
            raise UserError(f"{source}: github.{key} must be {want.__name__}")
        values[key] = float(value) if want is float else value
    config = GitHubConfig(**values, repositories=_repos(source, table.get("repositories", [])),
                          label_sets=_label_sets(source, table.get("label_sets", [])))
    return _checked(source, config)


def _repos(source: str, raw: Any) -> tuple[str, ...]:
    if not isinstance(raw, list) or not all(isinstance(r, str) and REPO.fullmatch(r)
                                            for r in raw):
        raise UserError(f"{source}: github.repositories must be a list of \"owner/name\"")
    return tuple(raw)


def _label_sets(source: str, raw: Any) -> tuple[LabelSet, ...]:
    if not isinstance(raw, list):
        raise UserError(f"{source}: github.label_sets must be [[github.label_sets]] tables")
    sets = []
    for index, entry in enumerate(raw):
        where = f"{source}: github.label_sets[{index}]"
        if not isinstance(entry, dict) or set(entry) - {"labels", "label", "max_runners"}:
            raise UserError(f"{where} may set only labels, label, max_runners")
        labels = entry.get("labels")
        if not isinstance(labels, list) or not labels or len(labels) > 90 or not all(
                isinstance(lbl, str) and LABEL.fullmatch(lbl) for lbl in labels):
            raise UserError(f"{where}.labels must be 1-90 labels of letters, digits, ._:-")
        label = entry.get("label", "default")
        most = entry.get("max_runners", 10)
        if not isinstance(label, str) or not label:
            raise UserError(f"{where}.label must be a kata-ci label name")
        if not isinstance(most, int) or isinstance(most, bool) or most < 1:
            raise UserError(f"{where}.max_runners must be a positive integer")
        custom = tuple(dict.fromkeys(lbl for lbl in labels if lbl.lower() not in IMPLIED))
        if not custom:
            raise UserError(f"{where}.labels needs a label of its own besides "
                            f"{', '.join(sorted(IMPLIED))} (every self-hosted runner has those)")
        sets.append(LabelSet(custom, label, most))
    keys = [s.key for s in sets]
    if len(set(keys)) != len(keys):
        raise UserError(f"{source}: two github.label_sets have the same labels")
    return tuple(sets)


def _checked(source: str, config: GitHubConfig) -> GitHubConfig:
    if not config.label_sets:
        return config
    if not config.org and not config.repositories:
        raise UserError(f"{source}: [github] needs org or repositories")
    if not config.api_url.startswith(("https://", "http://")):
        raise UserError(f"{source}: github.api_url must be an http(s) URL")
    if not PREFIX.fullmatch(config.name_prefix):
        raise UserError(f"{source}: github.name_prefix must be 1-32 of a-z, 0-9, -")
    if config.app_id and not (config.installation_id and (
            config.private_key_file or os.environ.get("KATA_CI_GITHUB_PRIVATE_KEY_FILE"))):
        raise UserError(f"{source}: a GitHub App needs github.installation_id and "
                        "github.private_key_file")
    if config.idle_timeout < 10 or config.reconcile_interval < 1 or config.max_body_kib < 1:
        raise UserError(f"{source}: github.idle_timeout >= 10, reconcile_interval >= 1, "
                        "max_body_kib >= 1")
    return config
