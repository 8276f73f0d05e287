"""The image cache: a second build with unchanged inputs reuses every artifact."""

from __future__ import annotations

from pathlib import Path

from kata_ci import paths
from kata_ci.images.artifacts import Manifest
from kata_ci.images.build import build_all


def test_second_build_with_unchanged_inputs_does_nothing(manifest: Manifest) -> None:
    """`images build` on a filled cache rebuilds nothing and yields the same manifest."""
    artifacts = (manifest.kernel, manifest.rootfs, manifest.initramfs)
    stamps = [(Path(a.path).parent / "DONE").stat().st_mtime_ns for a in artifacts]
    stamps.append((Path(manifest.tools.path) / "DONE").stat().st_mtime_ns)
    said: list[str] = []
    again = build_all(paths.cache_dir(), said.append)
    assert again == manifest
    assert [line.split(":")[1].strip() for line in said] == ["cached"] * 4, said
    assert [(Path(a.path).parent / "DONE").stat().st_mtime_ns for a in artifacts] + [
        (Path(manifest.tools.path) / "DONE").stat().st_mtime_ns] == stamps
