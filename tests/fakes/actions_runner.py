"""A FAKE of GitHub's actions-runner tarball (actions-runner-linux-x64-<version>.tar.gz), not
GitHub's runner, which cannot be fetched here: the same top-level shape (run.sh, config.sh,
env.sh, bin/Runner.Listener, bin/Runner.Worker) around a Python listener
(tests/fakes/actions_listener.py) that speaks the contract FAKE of GitHub's job hand-out
(tests/fakes/github.py, /_fake_actions/). Only JIT runners: ``run.sh --jitconfig <config>`` or
ACTIONS_RUNNER_INPUT_JITCONFIG. The archive is reproducible (fixed mtimes and owners): the same
version gives the same bytes, hence the same runner image layer.
"""

from __future__ import annotations

import gzip
import io
import re
import tarfile
from pathlib import Path

LISTENER = Path(__file__).resolve().with_name("actions_listener.py")
MTIME = 1_700_000_000

RUN_SH = """#!/bin/bash
# FAKE of GitHub's actions-runner run.sh (see README.FAKE): the listener runs one JIT job.
DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
exec "$DIR/bin/Runner.Listener" run "$@"
"""

CONFIG_SH = """#!/bin/bash
# FAKE of GitHub's actions-runner config.sh (see README.FAKE).
echo "This FAKE actions runner supports only JIT runners: run.sh --jitconfig <config>" \\
     "(or ACTIONS_RUNNER_INPUT_JITCONFIG); config.sh is not supported." >&2
exit 1
"""

ENV_SH = """#!/bin/bash
# FAKE of GitHub's actions-runner env.sh (see README.FAKE): nothing to record.
exit 0
"""

WORKER = """#!/bin/bash
# FAKE of GitHub's Runner.Worker (see README.FAKE): the fake Runner.Listener runs the steps
# itself, so this is never started.
echo "Runner.Worker: FAKE, not used (bin/Runner.Listener runs the job)" >&2
exit 1
"""

README = """This is a FAKE of GitHub's actions runner ({version}), made for kata-ci's tests by
tests/fakes/actions_runner.py. The real runner cannot be fetched on the machine these tests
run on. It is NOT GitHub's runner and cannot talk to GitHub.

- run.sh [--jitconfig <config>] (or ACTIONS_RUNNER_INPUT_JITCONFIG): bin/Runner.Listener, a
  Python 3 script, takes one job from the FAKE GitHub (tests/fakes/github.py) over its
  stand-in protocol (/_fake_actions/), runs its steps with bash, reports, exits 0.
- config.sh: not supported (only JIT runners); exits 1.
"""


def build_runner_tarball(dest_dir: Path, version: str = "2.329.0") -> Path:
    """Write ``actions-runner-linux-x64-<version>.tar.gz`` into ``dest_dir``; its path."""
    if not re.fullmatch(r"\d+(\.\d+){1,3}", version):
        raise ValueError(f"not a runner version: {version!r}")
    source = LISTENER.read_text()
    marker = re.compile(r'^VERSION = "[^"]*"', re.MULTILINE)
    if not marker.search(source):
        raise RuntimeError(f"{LISTENER} has no VERSION line")
    listener = marker.sub(f'VERSION = "{version}"', source, count=1)
    files = [("run.sh", RUN_SH, 0o755), ("config.sh", CONFIG_SH, 0o755),
             ("env.sh", ENV_SH, 0o755), ("bin/Runner.Listener", listener, 0o755),
             ("bin/Runner.Worker", WORKER, 0o755),
             ("README.FAKE", README.format(version=version), 0o644)]
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as archive:
        archive.addfile(_info("bin/", tarfile.DIRTYPE, 0o755, 0))
        for name, text, mode in files:
            data = text.encode()
            archive.addfile(_info(name, tarfile.REGTYPE, mode, len(data)), io.BytesIO(data))
    dest_dir.mkdir(parents=True, exist_ok=True)
    out = dest_dir / f"actions-runner-linux-x64-{version}.tar.gz"
    with out.open("wb") as handle, gzip.GzipFile(filename="", mode="wb", fileobj=handle,
                                                 mtime=0) as packed:
        packed.write(raw.getvalue())
    return out


def _info(name: str, kind: bytes, mode: int, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name.rstrip("/"))
    info.type, info.mode, info.size, info.mtime = kind, mode, size, MTIME
    info.uid = info.gid = 0
    info.uname = info.gname = "root"
    return info
