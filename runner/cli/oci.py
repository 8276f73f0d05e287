"""`kata-ci images pull|list|prune`: the OCI images jobs run in (images/oci/), on this host.

Pulling ahead is never needed (a job pulls what it names) but warms the cache before a burst
of jobs, and shows a registry or credential problem without running a job.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import click
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from kata_ci import paths
from kata_ci.errors import KataCIError, UserError
from kata_ci.images.oci.store import ImageStore
from kata_ci.runner.core import config as config_mod

err = Console(stderr=True, highlight=False)
out = Console(highlight=False)
AGE = re.compile(r"([0-9]+(?:\.[0-9]+)?)([smhd]?)")
UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def _store(config_path: Path | None) -> tuple[ImageStore, config_mod.Config]:
    cfg = config_mod.load(config_path)
    store = ImageStore(paths.cache_dir() / "oci", cfg.images.registries(),
                       lambda line: err.print(escape(line)))
    return store, cfg


def _fail(exc: KataCIError) -> None:
    err.print(f"[bold red]kata-ci:[/] {escape(str(exc))}", soft_wrap=True)
    raise SystemExit(1)


def parse_age(text: str) -> float:
    match = AGE.fullmatch(text.strip())
    if not match:
        raise UserError(f"--older-than {text!r}: expected a number with s, m, h or d (30d)")
    return float(match.group(1)) * UNITS[match.group(2)]


@click.command("pull")
@click.argument("reference")
@click.option("--pull", "policy", type=click.Choice(["always", "if-not-present", "never"]),
              help="Default: images.pull_policy.")
@click.option("--config", "config_path", type=click.Path(path_type=Path))
def oci_pull(reference: str, policy: str | None, config_path: Path | None) -> None:
    """Pull an OCI image into this host's cache (what a job naming it would do)."""
    try:
        store, cfg = _store(config_path)
        image = store.pull(reference, policy or cfg.images.pull_policy)  # type: ignore[arg-type]
    except KataCIError as exc:
        _fail(exc)
    out.print(f"{escape(reference)} {image.digest} ({image.size_bytes / 2**20:.1f} MiB)")


@click.command("list")
@click.option("--config", "config_path", type=click.Path(path_type=Path))
def oci_list(config_path: Path | None) -> None:
    """The OCI images in this host's cache."""
    try:
        store, _ = _store(config_path)
        found = store.images()
    except KataCIError as exc:
        _fail(exc)
    table = Table("image", "digest", "MiB")
    for image in found:
        table.add_row(escape(image.reference), image.digest[:19],
                      f"{image.size_bytes / 2**20:.1f}")
    out.print(table)


@click.command("prune")
@click.option("--older-than", "older_than", default="30d", show_default=True,
              help="Remove images no job used for this long (s, m, h, d).")
@click.option("--dry-run", is_flag=True, help="Say what would go; remove nothing.")
@click.option("--config", "config_path", type=click.Path(path_type=Path))
def oci_prune(older_than: str, dry_run: bool, config_path: Path | None) -> None:
    """Remove OCI images unused for a while (an image a job is pulling or using stays)."""
    try:
        store, _ = _store(config_path)
        gone = store.prune(parse_age(older_than), dry_run=dry_run)
    except KataCIError as exc:
        _fail(exc)
    verb = "would remove" if dry_run else "removed"
    for image in gone:
        out.print(f"{verb} {escape(image.reference)} {image.digest[:19]}")
    out.print(f"{verb} {len(gone)} image(s) at {time.strftime('%Y-%m-%d %H:%M:%S')}")
