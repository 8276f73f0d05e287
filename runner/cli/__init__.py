"""The ``kata-ci`` command line: `run` (a command or a repository's CI jobs), `images`,
`doctor`, and the queue commands (`worker`, `submit`, `jobs`, `logs`, `cancel`)."""

from kata_ci.runner.cli.app import main

__all__ = ["main"]
