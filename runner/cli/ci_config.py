"""`kata-ci ci config`: the pipeline as GitLab merges it, printed as YAML.

Like the "Full configuration" tab of GitLab's pipeline editor: `include: local` files merged,
`extends` and `!reference` resolved, keys in the order of the merged file, hidden keys
(`.name`) kept as GitLab's merged view keeps them (resolved), `.pre`/`.post` around the
stages as GitLab injects them. Beyond that view, `default:` is also applied to every job
(what each job really gets). Rules are not evaluated: every job is shown, whatever the branch.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click
import yaml
from rich.console import Console
from rich.markup import escape

from kata_ci.errors import UserError
from kata_ci.runner.core import beneath
from kata_ci.runner.core.spec import check_workspace

err = Console(stderr=True, highlight=False)


class _Dumper(yaml.SafeDumper):
    """Multi-line strings as literal blocks, as they were most likely written; every value
    written out where it is used (no &anchors: the merged view shows each job whole)."""

    def ignore_aliases(self, data: object) -> bool:
        return True


def _text(dumper: yaml.SafeDumper, data: str) -> yaml.ScalarNode:
    style = "|" if "\n" in data else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", data, style=style)


_Dumper.add_representer(str, _text)


@click.group("ci")
def ci() -> None:
    """Inspect a repository's CI configuration without running it."""


@ci.command("config")
@click.option("-C", "--workspace", type=click.Path(path_type=Path), default=".",
              show_default=True, help="The checkout.")
@click.option("--gitlab-ci", "gitlab_ci", type=click.Path(path_type=Path),
              help="The GitLab CI file (default: .gitlab-ci.yml in the workspace).")
@click.option("--var", "var_items", multiple=True, metavar="NAME=VALUE",
              help="A variable include paths may use.")
def config(workspace: Path, gitlab_ci: Path | None, var_items: tuple[str, ...]) -> None:
    """Print the fully merged .gitlab-ci.yml (includes, extends, !reference, default:)."""
    from kata_ci.runner.core.env import parse_vars
    from kata_ci.runner.gitlab.jobs import predefined_variables
    from kata_ci.runner.gitlab.merge import resolve

    try:
        root = check_workspace(workspace)
        path = gitlab_ci if gitlab_ci is not None else root / ".gitlab-ci.yml"
        if gitlab_ci is None and not beneath.exists(root, ".gitlab-ci.yml"):
            raise UserError(f"no .gitlab-ci.yml in {root}")
        variables = {**predefined_variables(root), **parse_vars(var_items, None, root)}
        merged = resolve(path, root, variables)
    except UserError as exc:
        err.print(f"[bold red]kata-ci:[/] {escape(str(exc))}", soft_wrap=True)
        sys.exit(2)
    document: dict[str, Any] = {}
    for key in merged.order:
        if key in merged.jobs:
            document[key] = merged.jobs[key]
        elif key in merged.templates:
            document[key] = merged.templates[key]
        elif key in merged.data:
            document[key] = merged.data[key]
    document.update((k, v) for k, v in merged.data.items() if k not in document)  # default:
    if isinstance(document.get("stages"), list):
        document["stages"] = [".pre", *[s for s in document["stages"]
                                        if s not in (".pre", ".post")], ".post"]
    sys.stdout.write(yaml.dump(document, Dumper=_Dumper, sort_keys=False,
                               allow_unicode=True, default_flow_style=False))
