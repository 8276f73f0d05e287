"""``kata-ci images build``: kernel, rootfs and initramfs, then the manifest that ties them."""

from __future__ import annotations

from pathlib import Path

from kata_ci.errors import ImagesMissing
from kata_ci.images.artifacts import Manifest, Progress
from kata_ci.images.initramfs import build_initramfs, initramfs_key
from kata_ci.images.kernel import build_kernel
from kata_ci.images.rootfs import build_rootfs, guest_python_version
from kata_ci.images.tools import build_tools, tools_key


def build_all(cache: Path, progress: Progress, mirror: str | None = None) -> Manifest:
    kernel = build_kernel(cache, progress)
    rootfs = build_rootfs(cache, progress, mirror)
    initramfs = build_initramfs(cache, progress, guest_python_version(rootfs))
    tools = build_tools(cache, progress, mirror)
    manifest = Manifest(kernel=kernel, rootfs=rootfs, initramfs=initramfs, tools=tools)
    manifest.save(cache)
    return manifest


def load_current(cache: Path) -> Manifest:
    """The manifest, refused when the agent code changed since the images were built.

    Only the initramfs is checked here (it carries the agent, the part that changes with
    kata-ci itself); library versions are checked by the Health handshake at boot.
    """
    manifest = Manifest.load(cache)
    expected = initramfs_key(guest_python_version(manifest.rootfs))
    if manifest.initramfs.key != expected:
        raise ImagesMissing(
            "guest images are older than this kata-ci (agent changed): run `kata-ci images build`"
        )
    if manifest.tools.key != tools_key():
        raise ImagesMissing("host tools (jail, virtiofsd) are older than this kata-ci: "
                            "run `kata-ci images build`")
    return manifest
