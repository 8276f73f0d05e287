"""Where kata-ci keeps images (cache) and per-VM state (run dir). Overridable by environment."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """Image cache: $KATA_CI_CACHE, else $XDG_CACHE_HOME/kata-ci, else ~/.cache/kata-ci."""
    explicit = os.environ.get("KATA_CI_CACHE")
    if explicit:
        return Path(explicit)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "kata-ci"


def run_dir() -> Path:
    """Per-VM sockets and logs live below here, one directory per VM, removed at teardown.

    Unix socket paths are limited to 108 bytes, so this must stay short: /run/kata-ci for root,
    $XDG_RUNTIME_DIR/kata-ci otherwise, $KATA_CI_RUN_DIR when set (tests use it to prove that
    nothing is left behind).
    """
    explicit = os.environ.get("KATA_CI_RUN_DIR")
    if explicit:
        return Path(explicit)
    if os.geteuid() == 0:
        return Path("/run/kata-ci")
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    return Path(xdg) / "kata-ci" if xdg else Path("/tmp") / f"kata-ci-{os.geteuid()}"
