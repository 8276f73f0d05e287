"""``kata-ci gitlab register|run|list``: kata-ci as a GitLab runner.

``register`` verifies a runner authentication token (``glrt-``, made in GitLab's UI, or made
here with ``--create`` from a personal access token through python-gitlab) and writes it to
the config file with this host's ``system_id``; ``run`` takes jobs for every configured
runner (poller.py) while workers of its label have room.
"""

from __future__ import annotations

import logging
import signal
import sys
import time
from pathlib import Path
from types import FrameType

import click
import httpx
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from kata_ci.errors import UserError
from kata_ci.runner.cli.daemon_options import daemon_options, start_daemon
from kata_ci.runner.cli.queue import _usage_errors, config_option
from kata_ci.runner.core import config as config_mod
from kata_ci.runner.gitlab_runner import settings
from kata_ci.runner.gitlab_runner.api import GitLabAPI, check_url

out = Console(highlight=False)


@click.group()
def gitlab() -> None:
    """kata-ci as a GitLab runner: register it, then run it beside the workers."""


def _read_secret(path: Path | None, env_name: str, what: str) -> str | None:
    import os

    if path is not None:
        try:
            return path.read_text().strip()
        except OSError as exc:
            raise UserError(f"{what} file {path}: {exc.strerror}") from None
    return os.environ.get(env_name) or None


@gitlab.command()
@click.option("--url", required=True, help="GitLab's URL, e.g. https://gitlab.example.com")
@click.option("--token", help="The runner authentication token (glrt-...); or --token-file, "
                              "or $KATA_CI_GITLAB_TOKEN.")
@click.option("--token-file", type=click.Path(path_type=Path, dir_okay=False))
@click.option("--create", type=click.Choice(["instance", "group", "project"]),
              help="Create the runner first, with a personal access token (create_runner "
                   "scope) from --personal-token-file or $GITLAB_PRIVATE_TOKEN.")
@click.option("--personal-token-file", type=click.Path(path_type=Path, dir_okay=False))
@click.option("--target-id", type=int, help="With --create group/project: its id.")
@click.option("--tag", "tags", multiple=True, help="With --create: a runner tag (repeatable).")
@click.option("--label", default="default", show_default=True,
              help="kata-ci label of its jobs: VM size and network policy ([labels.X]).")
@click.option("--name", default="", help="A name for it in kata-ci's config.")
@click.option("--tls-ca-file", default="", help="CA bundle for a GitLab with a private CA.")
@config_option
@_usage_errors
def register(url: str, token: str | None, token_file: Path | None, create: str | None,
             personal_token_file: Path | None, target_id: int | None, tags: tuple[str, ...],
             label: str, name: str, tls_ca_file: str, config_path: Path | None) -> None:
    """Verify a runner token with GitLab and store it in the config file (mode 0600)."""
    url = check_url(url)
    path = config_path or config_mod.default_path()
    cfg = config_mod.load(config_path) if path.exists() else config_mod.Config()
    cfg.policy(label)  # an unknown or broken label is refused before anything is written
    if create:
        token = _create(url, create, personal_token_file, target_id, list(tags), tls_ca_file)
    if token and not create:
        out.print("[yellow]kata-ci:[/] --token leaves the token in this shell's history and "
                  "in the process list; --token-file or $KATA_CI_GITLAB_TOKEN do not")
    token = token or _read_secret(token_file, "KATA_CI_GITLAB_TOKEN", "--token-file")
    if not token:
        raise UserError("give the runner token: --token, --token-file or $KATA_CI_GITLAB_TOKEN")
    system_id = next((r.system_id for r in cfg.gitlab.runners), "") or settings.new_system_id()
    api = GitLabAPI(url, verify=tls_ca_file or True)
    try:
        reply = api.verify(token, system_id)
    except httpx.HTTPError as exc:
        raise UserError(f"cannot reach {url}: {exc}") from None
    finally:
        api.close()
    if reply.status == 403:
        raise UserError(f"{url} refused the token (403): it is not a valid runner token")
    body = reply.json()
    if reply.status != 200 or not isinstance(body, dict) or not isinstance(body.get("id"), int):
        raise UserError(f"{url}: /runners/verify answered HTTP {reply.status}; expected 200 "
                        "with the runner's id (is this GitLab 15.10 or newer?)")
    from kata_ci.runner.gitlab_runner.poller import parse_time

    runner = settings.GitLabRunner(
        url=url, token=str(body.get("token") or token), system_id=system_id,
        name=name or f"{url.split('//', 1)[1]} #{body['id']}", id=body["id"],
        token_obtained_at=time.time(), token_expires_at=parse_time(body.get("token_expires_at")),
        label=label, tls_ca_file=tls_ca_file)
    settings.add_runner(path, runner)
    out.print(f"registered runner {escape(runner.shown)} (system id {system_id}, label "
              f"{escape(label)}) in {path}")


def _create(url: str, kind: str, token_file: Path | None, target: int | None,
            tags: list[str], ca: str) -> str:
    """A new runner through python-gitlab's user runners API (GitLab >= 15.10)."""
    import gitlab as python_gitlab
    import gitlab.exceptions

    personal = _read_secret(token_file, "GITLAB_PRIVATE_TOKEN", "--personal-token-file")
    if not personal:
        raise UserError("--create needs a personal access token: --personal-token-file or "
                        "$GITLAB_PRIVATE_TOKEN")
    data: dict[str, object] = {"runner_type": f"{kind}_type", "tag_list": tags,
                               "run_untagged": not tags, "description": "kata-ci"}
    if kind != "instance":
        if target is None:
            raise UserError(f"--create {kind} needs --target-id")
        data[f"{kind}_id"] = target
    client = python_gitlab.Gitlab(url, private_token=personal, ssl_verify=ca or True)
    try:
        client.auth()  # who the token belongs to: the runner is created as that user's
        if client.user is None:
            raise UserError(f"{url}: the personal access token names no user")
        created = client.user.runners.create(data)
    except gitlab.exceptions.GitlabError as exc:
        raise UserError(f"{url}: creating the runner failed: {exc.error_message}") from None
    return str(created.token)


@gitlab.command(name="list")
@config_option
@_usage_errors
def list_runners(config_path: Path | None) -> None:
    """The configured GitLab runners (never their tokens)."""
    cfg = config_mod.load(config_path)
    table = Table("name", "url", "id", "label", "token expires")
    for r in cfg.gitlab.runners:
        expires = time.strftime("%Y-%m-%d", time.gmtime(r.token_expires_at)) \
            if r.token_expires_at else "never"
        table.add_row(escape(r.shown), escape(r.url), str(r.id), escape(r.label), expires)
    out.print(table)


@gitlab.command()
@click.option("--check-interval", type=float, default=3.0, show_default=True,
              help="Seconds between requests when GitLab answers at once (no long poll).")
@config_option
@daemon_options
@_usage_errors
def run(check_interval: float, config_path: Path | None, metrics_listen: str | None,
        log_format: str) -> None:
    """Take jobs from GitLab for the workers of each runner's label (blocks)."""
    from kata_ci.runner.gitlab_runner.poller import Poller
    from kata_ci.runner.queue.app import sender
    from kata_ci.runner.queue.store import JobStore

    cfg = config_mod.load(config_path)
    start_daemon(log_format, metrics_listen, cfg.queue.broker)
    store = JobStore.connect(cfg.queue.broker, cfg.queue.log_limit_mib << 20,
                             retention=cfg.queue.retention,
                             requeue=sender(cfg.queue.broker, cfg.queue.max_job_timeout))
    poller = Poller(cfg, config_path or config_mod.default_path(), store,
                    sender(cfg.queue.broker, cfg.queue.max_job_timeout), check_interval)

    def stop(signum: int, frame: FrameType | None) -> None:
        logging.getLogger("kata_ci.gitlab").info(
            "stopping: no new jobs; jobs in flight keep running and the next `gitlab run` "
            "carries on reporting them")
        poller.stop.set()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    for runner in cfg.gitlab.runners:
        logging.getLogger("kata_ci.gitlab").info("serving %s on label %s", runner.shown,
                                                 runner.label)
    poller.run()
    sys.exit(0)
