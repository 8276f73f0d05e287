"""The shell a job's script runs in, when the job runs in an OCI image.

kata-ci's own root has bash, and a job without an image runs its scripts with it as it
always has. An image may have none (busybox, alpine, distroless with a shell): there, as
gitlab-runner's shell detection and GitHub's `sh` fallback do, the script runs with bash if
the image has it, else with ``sh``. ``set -o pipefail`` is an error that ends dash (a
special builtin's error), so it is turned on only where a subshell shows it is known.
"""

from __future__ import annotations

# Run "$1" (the script) with bash when the image has it, else with sh: `sh -c DETECT sh
# SCRIPT`. Every shell an image may have understands this much.
DETECT = 'if command -v bash >/dev/null 2>&1; then exec bash -c "$1"; fi; exec sh -c "$1"'
# The same for a script file, as GitHub runs a step in a container without `shell:`.
DETECT_FILE = 'if command -v bash >/dev/null 2>&1; then exec bash -e "$1"; fi; exec sh -e "$1"'

STRICT = "set -eo pipefail"  # bash: kata-ci's root, and the detected bash of an image
PORTABLE = "set -e\nif (set -o pipefail) 2>/dev/null; then set -o pipefail; fi"


def preamble(image: bool) -> str:
    """The first lines of a GitLab-style script: errexit, and pipefail where the shell has
    it (bash, busybox ash; dash 0.5.12 has not)."""
    return PORTABLE if image else STRICT


def script_argv(script: str, image: bool) -> list[str]:
    """argv running ``script``: bash, as ever, without an image; in an image, bash if it has
    one, else sh."""
    if not image:
        return ["bash", "-c", script]
    return ["sh", "-c", DETECT, "sh", script]


def file_argv(path: str) -> list[str]:
    """argv running the script file ``path`` in an image: `bash -e` if it has bash, else
    `sh -e` (GitHub's default for a step in a container without `shell:`)."""
    return ["sh", "-c", DETECT_FILE, "sh", path]
