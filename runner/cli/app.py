"""The ``kata-ci`` command line.

Exit statuses of ``kata-ci run``: the command's own status (0-255; 128+N when it died of
signal N), 124 timeout, 125 system failure (the VM or its plumbing failed, not the command),
130 cancelled (Ctrl-C, SIGTERM), 2 bad usage or configuration (nothing was started).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
from pathlib import Path

import click
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from kata_ci import __version__, paths
from kata_ci.errors import KataCIError, UserError
from kata_ci.executors.network.policy import NONE, NetworkPolicy
from kata_ci.images.artifacts import Manifest
from kata_ci.runner.core import config as config_mod
from kata_ci.runner.core.command import Cancel
from kata_ci.runner.core.env import job_env, user_term
from kata_ci.runner.core.images import ImageUse
from kata_ci.runner.core.outcome import Outcome, OutcomeKind
from kata_ci.runner.core.sinks import TerminalSink
from kata_ci.runner.core.spec import (
    Command,
    Commands,
    RunSettings,
    check_workspace,
    checkout_lock,
)

err = Console(stderr=True, highlight=False)
EXIT_USAGE = 2


def _fail(exc: KataCIError, code: int) -> None:
    err.print(f"[bold red]kata-ci:[/] {escape(str(exc))}", soft_wrap=True)
    sys.exit(code)


def _notify(message: str) -> None:
    err.print(f"[yellow]kata-ci:[/] {escape(message)}", soft_wrap=True)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="kata-ci")
def main() -> None:
    """Run CI jobs, each in a fresh microVM with its own kernel."""


class _RunCommand(click.Command):
    """Remembers whether the user wrote `--`: `kata-ci run -- make` runs a command, while
    `kata-ci run build` runs the CI job named build."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        ctx.meta["raw_command"] = "--" in args
        return super().parse_args(ctx, args)


@main.command(cls=_RunCommand)
@click.option("-C", "--workspace", type=click.Path(path_type=Path), default=".",
              show_default=True, help="Directory shared into the VM as the working directory.")
@click.option("--vcpus", type=int, help="Virtual CPUs (config: vm.vcpus).")
@click.option("--memory", "memory_mib", type=int, help="Guest memory in MiB (vm.memory_mib).")
@click.option("--timeout", type=float, help="Seconds before the job is stopped; 0 = none.")
@click.option("--grace", type=float, help="Seconds between SIGTERM and killing the VM.")
@click.option("--accel", type=click.Choice(["auto", "kvm", "tcg"]), help="Acceleration.")
@click.option("--cold", is_flag=True, default=None,
              help="Boot every VM cold instead of restoring a snapshot (vm.start = \"cold\").")
@click.option("--network", type=click.Choice(["none", "egress", "allowlist"]),
              help="What the VM may reach (vm.network; default egress: the internet, nothing "
                   "private). allowlist: only --allow destinations.")
@click.option("--allow", "allow_items", multiple=True, metavar="DEST",
              help="With --network allowlist: host[:ports], *.domain[:ports], CIDR[:ports], "
                   "[v6]:ports; repeatable.")
@click.option("-e", "--env", "env_items", multiple=True, metavar="NAME[=VALUE]",
              help="Set a variable in the job (NAME alone passes the host's value).")
@click.option("--secret", "secret_items", multiple=True, metavar="NAME[=@FILE]",
              help="A secret: NAME takes the host's environment variable NAME, NAME=@FILE a "
                   "file's content (one trailing newline dropped); at least 8 bytes. It is in "
                   "the job's environment (GitHub: only as ${{ secrets.NAME }}) and masked in "
                   "its output, also base64- and URL-encoded. Never NAME=VALUE: argv is public.")
@click.option("--config", "config_path", type=click.Path(path_type=Path),
              help="TOML config file (default: ~/.config/kata-ci/config.toml).")
@click.option("--gitlab-ci", "gitlab_ci", type=click.Path(path_type=Path),
              help="The GitLab CI file (default: .gitlab-ci.yml in the workspace).")
@click.option("--workflow", type=click.Path(path_type=Path),
              help="A GitHub workflow file (default: all of .github/workflows).")
@click.option("--pipeline", is_flag=True, help="Run the whole pipeline (not manual jobs).")
@click.option("--only", is_flag=True, help="Run the named jobs without the jobs they need.")
@click.option("--manual", "manual_items", multiple=True, metavar="JOB",
              help="Trigger this GitLab manual job in the run (as its play button would); "
                   "repeatable. A job named as JOB runs even if manual.")
@click.option("-j", "--jobs", "parallel", type=click.IntRange(1, 64), default=1,
              show_default=True, help="VMs at once.")
@click.option("--var", "var_items", multiple=True, metavar="NAME=VALUE",
              help="A CI variable (wins over the file's).")
@click.option("--env-file", type=click.Path(path_type=Path), help="NAME=VALUE lines.")
@click.option("--event", default="push", show_default=True,
              help="push, pull_request, workflow_dispatch, schedule: filters workflows by "
                   "`on:` and sets CI_PIPELINE_SOURCE.")
@click.option("--image", metavar="REF",
              help="Run the command (after --) in this OCI image's root, in the VM: "
                   "python:3.12, registry.example.com/team/tool@sha256:...")
@click.option("--user", "image_user", metavar="USER",
              help="With --image: run as this user (name, uid, name:group, uid:gid).")
@click.option("--entrypoint", metavar="PROGRAM",
              help="With --image: replace the image's entrypoint; '' for none.")
@click.option("--pull", "pull_policy", type=click.Choice(["always", "if-not-present", "never"]),
              help="With --image: when to ask the registry (images.pull_policy).")
@click.argument("command", nargs=-1)
@click.pass_context
def run(ctx: click.Context, workspace: Path, vcpus: int | None, memory_mib: int | None,
        timeout: float | None, grace: float | None, accel: str | None, cold: bool | None,
        network: str | None, allow_items: tuple[str, ...], env_items: tuple[str, ...],
        secret_items: tuple[str, ...], config_path: Path | None,
        gitlab_ci: Path | None,
        workflow: Path | None, pipeline: bool, only: bool, manual_items: tuple[str, ...],
        parallel: int, var_items: tuple[str, ...],
        env_file: Path | None, event: str, image: str | None, image_user: str | None,
        entrypoint: str | None, pull_policy: str | None, command: tuple[str, ...]) -> None:
    """Run CI jobs or a command, each in a fresh microVM over the workspace.

    \b
      kata-ci run                  list the jobs of .gitlab-ci.yml
      kata-ci run build test       run these jobs (and the jobs they need)
      kata-ci run --pipeline -j 2  the whole pipeline, two VMs at once
      kata-ci run -- make test     a command, executed directly (use sh -c for shell syntax)
      kata-ci run --image python:3.12 -- pytest    the command in an OCI image's root
      kata-ci run --secret TOKEN --secret KEY=@key.txt build    with masked secrets
    """
    from kata_ci.runner.core.env import parse_env
    from kata_ci.runner.core.secrets import parse_secrets

    try:
        cfg = config_mod.load(config_path).with_vm(
            vcpus=vcpus, memory_mib=memory_mib, timeout=timeout, grace=grace, accel=accel,
            start="cold" if cold else None,
            network="allowlist" if allow_items and network is None else network,
            allow=list(allow_items) if allow_items
            else [] if network not in (None, "allowlist") else None)
        root = check_workspace(workspace)
        settings = run_settings(cfg, parse_env(env_items), timeout is not None,
                                parse_secrets(secret_items, root), network is not None)
        for item in secret_items:  # QEMU and virtiofsd inherit our environment: not these
            if "=" not in item:
                os.environ.pop(item, None)
        use = None
        if image is not None:
            use = ImageUse(image, None if entrypoint is None else
                           tuple(w for w in [entrypoint] if w), image_user or "",
                           pull_policy or "")
        elif image_user is not None or entrypoint is not None or pull_policy is not None:
            raise UserError("--user, --entrypoint and --pull go with --image")
        if use is not None and not ctx.meta.get("raw_command"):
            raise UserError("--image goes with a command: kata-ci run --image REF -- CMD "
                            "(CI jobs name their image in the CI file)")
        if not ctx.meta.get("raw_command"):
            sys.exit(_run_ci(root, cfg, settings, gitlab_ci, workflow, list(command), pipeline,
                             only, parallel, var_items, env_file, event, manual_items))
        if not command:
            raise UserError("no command after --")
        outcome = _run_command(root, cfg, settings, command, use)
    except UserError as exc:
        _fail(exc, EXIT_USAGE)
    if outcome.kind is OutcomeKind.SYSTEM_FAILURE:
        err.print(f"[bold red]kata-ci: system failure:[/] {escape(outcome.message)}",
                  soft_wrap=True)
        if outcome.diagnostics:
            err.print("--- last guest console lines ---", style="dim")
            err.print(outcome.diagnostics, markup=False, highlight=False, soft_wrap=True)
    elif outcome.kind in (OutcomeKind.TIMEOUT, OutcomeKind.CANCELLED):
        err.print(f"[bold yellow]kata-ci:[/] {escape(outcome.message)}")
    sys.exit(outcome.exit_code)


def run_settings(cfg: config_mod.Config, env: dict[str, str], timeout_flag: bool,
                 secrets: dict[str, str] | None = None,
                 network_flag: bool = False) -> RunSettings:
    """What the config file and the flags say about every job of this run."""
    vm = cfg.vm
    return RunSettings(timeout=vm.timeout, timeout_flag=timeout_flag, grace=vm.grace,
                       boot_timeout=vm.boot_timeout, vcpus=vm.vcpus, memory_mib=vm.memory_mib,
                       env=env, term=user_term(), secrets=secrets or {},
                       network=local_network(cfg, network_flag))


def local_network(cfg: config_mod.Config, flag: bool) -> NetworkPolicy:
    """[vm]'s policy (or the flags'). Without root there are no network namespaces: the
    configured default then becomes ``none`` with a note; an explicit --network fails."""
    from kata_ci.executors.network.netns import available

    policy = cfg.policy()
    why_not = available()
    if policy.nic and why_not:
        if flag:
            raise UserError(f"--network {policy.mode} is not possible: {why_not}")
        _notify(f"network: none ({why_not}); the job runs without a NIC")
        return NONE
    return policy


def _run_command(root: Path, cfg: config_mod.Config, settings: RunSettings,
                 command: tuple[str, ...], image: ImageUse | None = None) -> Outcome:
    """`kata-ci run -- CMD`: one job, its output straight to the terminal."""
    from kata_ci.executors.provider import open_provider
    from kata_ci.runner.core.lifecycle import run_job, terminate_as_interrupt

    provider = open_provider(cfg.vm.accel, _notify, cfg.vm.max_file_size, cfg.vm.start,
                             cfg.images.registries(), cfg.images.pull_policy)
    spec = settings.spec("command", Commands([Command(command)]),
                         job_env(settings.env, settings.secrets, term=settings.term), root)
    spec = dataclasses.replace(spec, image=image)
    with checkout_lock(root), terminate_as_interrupt():
        try:
            return run_job(spec, provider, TerminalSink(notes=False), Cancel())
        except KeyboardInterrupt:  # after the job ended, before we returned: it is over
            return Outcome.cancelled()


def _run_ci(root: Path, cfg: config_mod.Config, settings: RunSettings, gitlab_ci: Path | None,
            workflow: Path | None, names: list[str], pipeline: bool, only: bool,
            parallel: int, var_items: tuple[str, ...], env_file: Path | None,
            event: str, manual: tuple[str, ...] = ()) -> int:
    from kata_ci.executors.provider import open_provider
    from kata_ci.runner.cli.ci import choose, discover, list_jobs, plan_for, run_selected
    from kata_ci.runner.core.env import parse_vars
    from kata_ci.runner.core.lifecycle import terminate_as_interrupt

    # Jobs will run: the checkout is ours before git and the CI files are read (spec.py).
    busy = checkout_lock(root) if names or pipeline else contextlib.nullcontext()
    with busy:
        user = parse_vars(var_items, env_file, root)
        found = discover(root, gitlab_ci, workflow, user, event)
        if found.repo.notice:
            _notify(found.repo.notice)
        if not names and not pipeline:
            list_jobs(found, Console())
            return 0
        target = choose(found, names, pipeline)
        cancel = Cancel()
        plan = plan_for(found, target, names, only, root, user, settings, cancel, manual)
        provider = open_provider(cfg.vm.accel, _notify, cfg.vm.max_file_size, cfg.vm.start,
                             cfg.images.registries(), cfg.images.pull_policy)
        with terminate_as_interrupt():
            return run_selected(plan, provider, parallel, cancel, err)


@main.group()
def images() -> None:
    """Build and inspect the guest images (kernel, rootfs, initramfs); pull, list and prune
    the OCI images jobs run in."""


@images.command("build")
@click.option("--mirror", help="Debian mirror for the rootfs (default: the host's apt mirror).")
@click.option("--config", "config_path", type=click.Path(path_type=Path))
@click.option("--runner-tarball", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="GitHub's actions-runner-*.tar.gz: every VM gets it at /opt/actions-runner "
                   "(kept by later builds without this option).")
@click.option("--no-runner-layer", is_flag=True,
              help="Drop the runner layer an earlier build added.")
def images_build(mirror: str | None, config_path: Path | None, runner_tarball: Path | None,
                 no_runner_layer: bool) -> None:
    """Build what is missing; unchanged inputs are reused from the cache. Then the VM
    templates of the configured sizes ([vm] and [labels.*]) when snapshots are possible."""
    from kata_ci.executors.provider import open_provider
    from kata_ci.images.build import build_all

    try:
        cfg = config_mod.load(config_path)
        with err.status("building guest images") as status:
            manifest = build_all(paths.cache_dir(), lambda m: status.update(m),
                                 mirror or cfg.images.mirror or None,
                                 runner_tarball=runner_tarball, drop_runner=no_runner_layer)
            status.update("VM templates")
            provider = open_provider(cfg.vm.accel, _notify, cfg.vm.max_file_size, cfg.vm.start,
                             cfg.images.registries(), cfg.images.pull_policy)
            keys = provider.prepare(config_mod.vm_sizes(cfg))
    except KataCIError as exc:
        _fail(exc, 1)
    _show_manifest(manifest)
    if keys:
        err.print(f"VM templates ready: {', '.join(keys)}")
    else:
        err.print(f"no VM templates: every VM boots cold ({escape(provider.why)})")


@images.command("show")
def images_show() -> None:
    """Print the image manifest."""
    from kata_ci.images.build import load_current

    try:
        _show_manifest(load_current(paths.cache_dir()))
    except KataCIError as exc:
        _fail(exc, 1)


def _show_manifest(manifest: Manifest) -> None:
    table = Table("image", "key", "detail", "path")
    for name, art in (("kernel", manifest.kernel), ("rootfs", manifest.rootfs),
                      ("initramfs", manifest.initramfs)):
        table.add_row(name, art.key, art.detail, art.path)
    if manifest.runner is not None:  # detail: the actions-runner version
        table.add_row("runner layer", manifest.runner.key,
                      f"actions-runner {manifest.runner.detail}", manifest.runner.path)
    Console().print(table)


@main.command()
def doctor() -> None:
    """Check this host: the VMM, virtiofsd, images, and KVM or TCG (and why)."""
    from kata_ci.runner.cli.doctor import run_checks

    checks = run_checks()
    table = Table("check", "status", "detail")
    colours = {"ok": "green", "warn": "yellow", "fail": "red"}
    for check in checks:
        table.add_row(check.name, f"[{colours[check.status]}]{check.status}[/]", check.detail)
    Console().print(table)
    sys.exit(1 if any(c.status == "fail" for c in checks) else 0)


def _register_queue_commands() -> None:
    from kata_ci.runner.cli.queue import COMMANDS
    from kata_ci.runner.cli.status import status

    for command in (*COMMANDS, status):
        main.add_command(command)


_register_queue_commands()

from kata_ci.runner.cli.gitlab import gitlab  # noqa: E402

main.add_command(gitlab)

from kata_ci.runner.cli.github import github  # noqa: E402
from kata_ci.runner.cli.gitlab_executor import gitlab_executor  # noqa: E402

main.add_command(gitlab_executor)
main.add_command(github)

from kata_ci.runner.cli.oci import oci_list, oci_prune, oci_pull  # noqa: E402

for _command in (oci_pull, oci_list, oci_prune):
    images.add_command(_command)

from kata_ci.runner.cli.ci_config import ci  # noqa: E402

main.add_command(ci)
