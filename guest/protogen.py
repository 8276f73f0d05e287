"""Regenerate agent_pb2.py, agent_pb2.pyi and agent_pb2_grpc.py from agent.proto.

Run as ``python -m kata_ci.guest.protogen`` (``--check`` compares instead of writing). The
proto is compiled from a temporary tree shaped like the package so that the generated imports
read ``from kata_ci.guest import agent_pb2`` and resolve the same on host and guest.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
GENERATED = ("agent_pb2.py", "agent_pb2.pyi", "agent_pb2_grpc.py")


def generate(into: Path) -> None:
    from grpc_tools import protoc  # dev-only dependency; imported here on purpose

    with tempfile.TemporaryDirectory() as tmp:
        pkg = Path(tmp) / "kata_ci" / "guest"
        pkg.mkdir(parents=True)
        shutil.copy(HERE / "agent.proto", pkg / "agent.proto")
        code = protoc.main([
            "grpc_tools.protoc", f"-I{tmp}", f"--python_out={tmp}", f"--pyi_out={tmp}",
            f"--grpc_python_out={tmp}", "kata_ci/guest/agent.proto",
        ])
        if code != 0:
            raise SystemExit(f"protoc failed with {code}")
        for name in GENERATED:
            shutil.copy(pkg / name, into / name)


def main() -> int:
    if "--check" in sys.argv[1:]:
        with tempfile.TemporaryDirectory() as tmp:
            generate(Path(tmp))
            stale = [n for n in GENERATED
                     if (Path(tmp) / n).read_bytes() != (HERE / n).read_bytes()]
        if stale:
            print(f"stale generated stubs: {', '.join(stale)}; "
                  "run python -m kata_ci.guest.protogen")
            return 1
        return 0
    generate(HERE)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
