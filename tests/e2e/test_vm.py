"""One real microVM per module, driven through the executor API: kernel, exits, streaming,
and what the workspace share does and does not expose."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from kata_ci.executors.qemu.backend import QemuVM
from kata_ci.images.artifacts import Manifest
from tests.e2e.conftest import MakeVM

ENV = {"PATH": "/usr/bin:/bin"}


@pytest.fixture(scope="module")
def share(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("share")
    (root / "outside").mkdir()
    (root / "outside" / "secret.txt").write_text("host-secret-7f3a\n")
    (root / "ws").mkdir()
    return root


@pytest.fixture(scope="module")
def vm(request: pytest.FixtureRequest, share: Path, manifest: Manifest,
       make_vm: MakeVM) -> Iterator[QemuVM]:
    from kata_ci.executors.base import VMSpec

    spec = VMSpec(kernel=Path(manifest.kernel.path), initramfs=Path(manifest.initramfs.path),
                  rootfs=Path(manifest.rootfs.path), workspace=share / "ws")
    machine = make_vm(spec)
    failed_before = request.session.testsfailed
    try:
        machine.start(timeout=120)
        yield machine
    finally:
        if request.session.testsfailed > failed_before:
            print(f"\n=== VM diagnostics ===\n{machine.diagnostics(60)}", file=sys.stderr)
        machine.kill()


def run(vm: QemuVM, script: str) -> tuple[bytes, bytes, int]:
    stream = vm.agent.exec(["sh", "-c", script], ENV)
    out, err = bytearray(), bytearray()
    for chunk in stream:
        (out if chunk.stream == "stdout" else err).extend(chunk.data)
    assert stream.exit is not None
    return bytes(out), bytes(err), stream.exit.exit_code


def test_guest_runs_the_built_kernel(vm: QemuVM, manifest: Manifest) -> None:
    """uname -r in the guest is the kernel we built, not the host's."""
    out, _, code = run(vm, "uname -r")
    assert code == 0
    assert out.decode().strip() == manifest.kernel.detail
    assert out.decode().strip() != os.uname().release


@pytest.mark.parametrize(("script", "code"), [
    ("true", 0), ("exit 1", 1), ("exit 42", 42), ("kill -TERM $$", 128 + 15)])
def test_exit_statuses(vm: QemuVM, script: str, code: int) -> None:
    """Exit statuses 0, 1, 42 and death by signal come back right from the guest."""
    assert run(vm, script)[2] == code


def test_stdout_and_stderr_are_distinct(vm: QemuVM) -> None:
    """Guest stderr arrives as stderr and stdout as stdout, through the virtio-serial bridge."""
    out, err, _ = run(vm, "echo to-out; echo to-err >&2")
    assert (out, err) == (b"to-out\n", b"to-err\n")


def test_first_line_arrives_before_the_command_ends(vm: QemuVM) -> None:
    """Live streaming: output printed before a 3 s sleep reaches the host during the sleep."""
    stream = vm.agent.exec(["sh", "-c", "echo first; sleep 3; echo second"], ENV)
    chunks = iter(stream)
    assert next(chunks).data == b"first\n"
    assert stream.exit is None  # the guest command has not ended yet
    assert b"".join(c.data for c in chunks) == b"second\n"


def test_files_cross_the_share_both_ways(vm: QemuVM, share: Path) -> None:
    """A file written in the guest appears on the host, and a host file appears in the guest."""
    (share / "ws" / "from-host.txt").write_text("hello guest\n")
    out, _, code = run(vm, "cat from-host.txt && echo 'hello host' > from-guest.txt")
    assert (out, code) == (b"hello guest\n", 0)
    assert (share / "ws" / "from-guest.txt").read_text() == "hello host\n"


def test_only_the_workspace_is_shared(vm: QemuVM, share: Path) -> None:
    """The guest has one virtio-fs mount, and the host directory around the workspace is not
    reachable through it."""
    out, _, _ = run(vm, "grep -c ' virtiofs ' /proc/mounts; ls ..")
    count, *parent = out.decode().split()
    assert count == "1"
    assert "outside" not in parent  # '..' is the guest's own directory, not the host's


def test_symlinks_cannot_reach_host_files(vm: QemuVM, share: Path) -> None:
    """Symlinks in the workspace pointing outside it resolve in the guest, never on the host."""
    secret = share / "outside" / "secret.txt"
    ws = share / "ws"
    (ws / "abs-link").symlink_to(secret)
    (ws / "rel-link").symlink_to(Path("..") / "outside" / "secret.txt")
    out, _, _ = run(vm, "cat abs-link rel-link 2>&1; cat /proc/self/mounts >/dev/null")
    assert b"host-secret-7f3a" not in out
    assert b"No such file" in out
