"""OCI images (issue 13), in one run: a cold pull of a ~100 MB image (fetch, verify, unpack,
ext4 disk) from a real registry on loopback; the same image again from the cache (by digest:
no network; by tag with pull_policy always: one manifest request); and a whole job (`true`)
in that image next to the same job in kata-ci's own root, the floor measured in the same run.

    .venv/bin/python bench/bench_images.py [--mib 100] [--jobs 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kata_ci.executors.provider import open_provider
from kata_ci.images.oci.registry import RegistryConfig
from kata_ci.images.oci.store import ImageStore
from kata_ci.runner.core.command import Cancel
from kata_ci.runner.core.images import ImageUse
from kata_ci.runner.core.lifecycle import run_job
from kata_ci.runner.core.outcome import OutcomeKind
from kata_ci.runner.core.sinks import CallbackSink
from kata_ci.runner.core.spec import Command, Commands, JobSpec
from tests.oci_images import File, build_image
from tests.oci_registry import RegistryFixture


def timed(action: object) -> float:
    started = time.monotonic()
    action()  # type: ignore[operator]
    return time.monotonic() - started


def job_seconds(provider: object, workspace: Path, image: ImageUse | None) -> float:
    spec = JobSpec(name="bench", script=Commands([Command(["true"])]),
                   env={"PATH": "/usr/bin:/bin"}, workspace=workspace, image=image)
    started = time.monotonic()
    outcome = run_job(spec, provider, CallbackSink(lambda s, d: None), Cancel())  # type: ignore[arg-type]
    if outcome.kind is not OutcomeKind.SUCCESS:
        raise SystemExit(f"job failed: {outcome.message}")
    return time.monotonic() - started


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mib", type=int, default=100)
    parser.add_argument("--jobs", type=int, default=5)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="kci-imgb-", dir="/tmp"))
    with RegistryFixture() as registry:
        # Incompressible, in 4 MiB files: what a toolchain layer costs to move and unpack.
        files = {f"opt/data/{i:03d}.bin": File(os.urandom(4 << 20))
                 for i in range(max(1, args.mib // 4))}
        digest = build_image(registry, "bench/big", "1", files, {"Cmd": ["/bin/sh"]})
        ref, by_digest = f"{registry.host}/bench/big:1", f"{registry.host}/bench/big@{digest}"
        cold = []
        for attempt in range(3):
            store = ImageStore(root / f"cold{attempt}", RegistryConfig(), None)
            cold.append(timed(lambda s=store: s.pull(ref, "always")))
        store = ImageStore(root / "cold0", RegistryConfig(), None)
        warm_digest = [timed(lambda: store.pull(by_digest, "if-not-present")) for _ in range(5)]
        warm_tag = [timed(lambda: store.pull(ref, "always")) for _ in range(5)]
        provider = open_provider("auto", lambda m: print(m, file=sys.stderr))
        provider._images = store  # the warm cache above
        workspace = root / "ws"
        workspace.mkdir()
        job_seconds(provider, workspace, None)  # templates built, caches warm
        plain = [job_seconds(provider, workspace, None) for _ in range(args.jobs)]
        imaged = [job_seconds(provider, workspace, ImageUse(ref, pull_policy="if-not-present"))
                  for _ in range(args.jobs)]
    size = store.pull(by_digest, "never").size_bytes / 2**20
    print(f"\nOCI images, one run, {args.mib} MiB of layer data ({size:.0f} MiB ext4 disk), "
          f"TCG, registry on loopback")
    print(f"{'measure':<58}{'p50':>8}{'max':>8}")
    for label, values in (
            ("cold pull: fetch + verify + unpack + ext4 disk", cold),
            ("cached, by digest (no network)", warm_digest),
            ("cached, by tag, pull_policy always (manifest asked)", warm_tag),
            ("job `true` in kata-ci's own root (floor)", plain),
            ("job `true` in the image (cached)", imaged)):
        print(f"{label:<58}{statistics.median(values):>7.2f}s{max(values):>7.2f}s")
    print(f"{'job in image / floor (p50)':<58}"
          f"{statistics.median(imaged) / statistics.median(plain):>7.2f}x")


if __name__ == "__main__":
    main()
