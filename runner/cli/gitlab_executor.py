"""`kata-ci gitlab-executor`: kata-ci as gitlab-runner's custom executor driver.

In gitlab-runner's config.toml ([runners.custom]): config_exec, prepare_exec, run_exec and
cleanup_exec run `kata-ci` with these subcommands in their *_args (README, "GitLab custom
executor"). The work is in runner/gitlab_runner/custom/: driver.py (the stages), holder.py
(the process that owns the VM between them), protocol.py (how they talk).
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from kata_ci.runner.gitlab_runner.custom import driver
from kata_ci.runner.gitlab_runner.custom.job import StageError, UsageError, exit_codes

_config = click.option("--config", "config_path", type=click.Path(path_type=Path),
                       help="kata-ci's TOML config (default: $KATA_CI_CONFIG, "
                            "~/.config/kata-ci/config.toml).")
_label = click.option("--label", metavar="NAME",
                      help="VM size and network policy from [labels.NAME] (default: [vm]).")


@click.group("gitlab-executor")
def gitlab_executor() -> None:
    """gitlab-runner's custom executor: each job in a fresh microVM.

    \b
    [runners.custom]
      config_exec = "kata-ci"     config_args = ["gitlab-executor", "config"]
      prepare_exec = "kata-ci"    prepare_args = ["gitlab-executor", "prepare", "--label", "x"]
      run_exec = "kata-ci"        run_args = ["gitlab-executor", "run"]
      cleanup_exec = "kata-ci"    cleanup_args = ["gitlab-executor", "cleanup"]
    """


def _guarded(stage: Callable[[], int]) -> None:
    """Exit with the stage's status; anything unexpected is one line, never a traceback."""
    try:
        code = stage()
    except UsageError as exc:
        driver.complain(str(exc))
        code = driver.EXIT_USAGE
    except StageError as exc:
        driver.complain(str(exc))
        code = _code_for(exc.kind)
    except Exception as exc:  # a bug of ours: a system failure, said in one line
        driver.complain(f"internal error: {exc!r}")
        code = _code_for("system")
    sys.exit(code)


def _code_for(kind: str) -> int:
    try:
        codes = exit_codes(os.environ)
    except UsageError:
        return driver.EXIT_USAGE
    return codes.build if kind == "build" else codes.system


@gitlab_executor.command("config")
@_config
@_label
def config(config_path: Path | None, label: str | None) -> None:
    """config_exec: print the driver's JSON (builds in /builds, cache in /cache, in the VM)."""

    def stage() -> int:
        settings: dict[str, Any] = driver.config_stage(config_path, label)
        click.echo(json.dumps(settings))
        return 0

    _guarded(stage)


@gitlab_executor.command("prepare")
@_config
@_label
def prepare(config_path: Path | None, label: str | None) -> None:
    """prepare_exec: start the job's VM and wait until its agent answers."""
    _guarded(lambda: driver.prepare_stage(config_path, label, os.environ))


@gitlab_executor.command("run")
@_config
@_label
@click.argument("script", type=click.Path(path_type=Path))
@click.argument("stage")
def run(config_path: Path | None, label: str | None, script: Path, stage: str) -> None:
    """run_exec SCRIPT STAGE: run gitlab-runner's script for STAGE with bash in the VM."""
    _guarded(lambda: driver.run_stage(script, stage, os.environ))


@gitlab_executor.command("cleanup")
@_config
@_label
def cleanup(config_path: Path | None, label: str | None) -> None:
    """cleanup_exec: release the job's VM and remove its files (idempotent)."""
    _guarded(lambda: driver.cleanup_stage(os.environ))
