"""``python -m kata_ci.runner.cli``: the same as the ``kata-ci`` command."""

from kata_ci.runner.cli.app import main

main()
