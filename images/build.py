"""``kata-ci images build``: kernel, rootfs and initramfs (and the optional runner layer),
then the manifest that ties them."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
from pathlib import Path

from kata_ci.errors import ImagesMissing, UserError
from kata_ci.images.artifacts import MANIFEST_NAME, Artifact, Manifest, Progress
from kata_ci.images.initramfs import build_initramfs, initramfs_key
from kata_ci.images.kernel import build_kernel
from kata_ci.images.rootfs import build_rootfs, guest_python_version
from kata_ci.images.runner_layer import build_runner_layer
from kata_ci.images.tools import SYSTEM_TOOLS, build_tools, tools_key

# Root's images, published for every user of the host: `kata-ci run` by an ordinary user
# (rootless) needs the same kernel, initramfs and rootfs, and cannot read /root/.cache nor
# build a rootfs (debootstrap needs root). Read-only to others, like the tools beside it.
SYSTEM_IMAGES = SYSTEM_TOOLS.parent / "images"


def build_all(cache: Path, progress: Progress, mirror: str | None = None,
              runner_tarball: Path | None = None, drop_runner: bool = False) -> Manifest:
    """Every image, then the manifest. The runner layer (images/runner_layer.py) is built from
    ``runner_tarball`` when given; without one, the layer of the previous manifest is kept
    while its file exists (the operator configured it once, and a later plain `images build`,
    e.g. after a kata-ci upgrade, must not silently take /opt/actions-runner from every VM);
    ``drop_runner`` removes it from the manifest."""
    if runner_tarball is not None and drop_runner:
        raise UserError("a runner tarball and dropping the runner layer exclude each other")
    kernel = build_kernel(cache, progress)
    rootfs = build_rootfs(cache, progress, mirror)
    initramfs = build_initramfs(cache, progress, guest_python_version(rootfs))
    tools = build_tools(cache, progress, mirror)
    if runner_tarball is not None:
        runner: Artifact | None = build_runner_layer(cache, progress, runner_tarball)
    else:
        runner = None if drop_runner else _previous_layer(cache, progress)
    manifest = Manifest(kernel=kernel, rootfs=rootfs, initramfs=initramfs, tools=tools,
                        runner=runner)
    manifest.save(cache)
    if os.geteuid() == 0:
        publish(manifest, progress)
    return manifest


def publish(manifest: Manifest, progress: Progress) -> None:
    """Root's artifacts under SYSTEM_IMAGES (hard links where the file system allows, else
    copies), with a manifest naming them. Old keys are left: a running VM may use them."""
    published = {}
    for kind in ("kernel", "initramfs", "rootfs", *(["runner"] if manifest.runner else [])):
        artifact = getattr(manifest, kind)
        source = Path(artifact.path)
        target_dir = SYSTEM_IMAGES / kind / artifact.key
        if not (target_dir / "DONE").is_file():
            target_dir.mkdir(parents=True, exist_ok=True)
            os.chmod(target_dir, 0o755)
            # The artifact and what describes it (python-version, sha256, ...); DONE last.
            files = sorted(f for f in source.parent.iterdir() if f.is_file())
            for item in sorted(files, key=lambda f: f.name == "DONE"):
                _link_or_copy(item, target_dir / item.name)
            progress(f"{kind} {artifact.key}: published to {SYSTEM_IMAGES}")
        published[kind] = dataclasses.replace(artifact, path=str(target_dir / source.name))
    for directory in (SYSTEM_IMAGES, *(SYSTEM_IMAGES / k for k in published)):
        with contextlib.suppress(OSError):
            os.chmod(directory, 0o755)
    dataclasses.replace(manifest, **published).save(SYSTEM_IMAGES)


def _previous_layer(cache: Path, progress: Progress) -> Artifact | None:
    """The runner layer the last manifest named, if its image is still there."""
    try:
        raw = json.loads((cache / MANIFEST_NAME).read_text()).get("runner")
        layer = Artifact(**raw) if raw else None
    except (OSError, ValueError, TypeError, AttributeError):
        return None
    if layer is None:
        return None
    if not (Path(layer.path).is_file() and (Path(layer.path).parent / "DONE").is_file()):
        progress(f"runner layer {layer.key}: its image is gone, dropped "
                 "(--runner-tarball builds one again)")
        return None
    progress(f"runner layer {layer.key}: kept from the previous build, version {layer.detail} "
             "(--no-runner-layer drops it)")
    return layer


def _link_or_copy(source: Path, target: Path) -> None:
    partial = target.with_name(target.name + ".partial")
    partial.unlink(missing_ok=True)
    try:
        os.link(source, partial)
    except OSError:
        shutil.copyfile(source, partial)
    os.chmod(partial, 0o644 | (source.stat().st_mode & 0o111))
    os.replace(partial, target)


def manifest_dir(cache: Path) -> Path:
    """Where this user's manifest is: their own cache, or, for an ordinary user who built
    no images, the ones root published."""
    if os.geteuid() != 0 and not (cache / "manifest.json").exists() \
            and (SYSTEM_IMAGES / "manifest.json").exists():
        return SYSTEM_IMAGES
    return cache


def load_current(cache: Path) -> Manifest:
    """The manifest, refused when the agent code changed since the images were built.

    Only the initramfs is checked here (it carries the agent, the part that changes with
    kata-ci itself); library versions are checked by the Health handshake at boot.
    """
    manifest = Manifest.load(manifest_dir(cache))
    expected = initramfs_key(guest_python_version(manifest.rootfs))
    if manifest.initramfs.key != expected:
        raise ImagesMissing(
            "guest images are older than this kata-ci (agent changed): run `kata-ci images build`"
        )
    if manifest.tools.key != tools_key():
        raise ImagesMissing("host tools (jail, virtiofsd) are older than this kata-ci: "
                            "run `kata-ci images build`")
    return manifest
