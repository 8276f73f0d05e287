"""Snapshot start (issue 9): VMs restored from one template are separate machines, and a
template that cannot be restored never costs the job nor leaves anything behind.

These need QEMU >= 9.0 (scripts/setup.sh installs it from bookworm-backports); on a host
without it they fail rather than skip, like every real-VM test.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest

from kata_ci import paths
from kata_ci.executors.base import VMSpec
from kata_ci.executors.provider import SnapshotProvider, VMRequest
from kata_ci.executors.qemu.backend import QemuBackend, QemuVM
from kata_ci.executors.templates import TemplateStore
from kata_ci.images.artifacts import Manifest
from tests.e2e.conftest import MakeVM, kata_ci_run, leftovers

ENV = {"PATH": "/usr/bin:/bin"}
# The kernel's own timestamp of a late boot step: restores of one template show the template's,
# cold boots each their own (TCG timing differs run to run).
BOOT_MARK = "dmesg | grep -m1 'Freeing unused kernel image' | cut -d']' -f1 | tr -d '[ '"
PROBE = (f"{BOOT_MARK}; "
         "head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \\n'; "
         "echo; python3 -c 'import os; print(os.getrandom(32).hex())'; date +%s.%N")


def run(vm: QemuVM, script: str) -> str:
    stream = vm.agent.exec(["sh", "-c", script], ENV)
    out = b"".join(chunk.data for chunk in stream if chunk.stream == "stdout")
    assert stream.exit is not None and stream.exit.exit_code == 0
    return out.decode()


def snapshot_provider(tmp_path: Path, manifest: Manifest, backend: QemuBackend,
                      notes: list[str], boot_timeout: float,
                      ) -> tuple[SnapshotProvider, TemplateStore, VMRequest]:
    """A provider of its own (templates under ``tmp_path``, notes kept) and a 2 vCPU / 1 GiB
    request over an empty workspace."""
    store = TemplateStore(tmp_path / "templates")
    base = VMSpec(kernel=Path(manifest.kernel.path), initramfs=Path(manifest.initramfs.path),
                  rootfs=Path(manifest.rootfs.path))
    (tmp_path / "ws").mkdir()
    return (SnapshotProvider(backend, base, store, notes.append), store,
            VMRequest(tmp_path / "ws", None, 2, 1024, boot_timeout))


def test_snapshots_are_possible_on_this_host(backend: QemuBackend) -> None:
    """The suite runs in snapshot mode: QEMU and virtiofsd here must be able to."""
    assert backend.snapshot_problem() is None


def test_two_restored_vms_have_their_own_randomness_and_the_hosts_clock(
        tmp_path: Path, manifest: Manifest, make_vm: MakeVM) -> None:
    """Two VMs restored from one template share its kernel boot log (proof they are restores)
    but not its RNG state: /dev/urandom and getrandom() differ right after restore, and both
    guest clocks read the host's time."""
    seen = []
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        spec = VMSpec(kernel=Path(manifest.kernel.path),
                      initramfs=Path(manifest.initramfs.path),
                      rootfs=Path(manifest.rootfs.path), workspace=tmp_path / name)
        vm = make_vm(spec)
        try:
            times = vm.start(120)
            assert times.restored
            booted, urandom, getrandom, clock = run(vm, PROBE).split()
            assert abs(float(clock) - time.time()) < 2.0
            seen.append((booted, urandom, getrandom))
        finally:
            vm.kill()
    (boot_a, urandom_a, getrandom_a), (boot_b, urandom_b, getrandom_b) = seen
    assert boot_a == boot_b
    assert urandom_a != urandom_b and getrandom_a != getrandom_b


def test_cold_flag_boots_every_vm_and_snapshot_mode_restores(
        tmp_path: Path, cli_env: dict[str, str]) -> None:
    """`kata-ci run` restores (two runs show the template's kernel boot log); `--cold` boots
    (two runs, two boot logs). Both give the job the workspace and the same result."""
    def boot_mark(*flags: str) -> str:
        done = kata_ci_run([*flags, "--", "sh", "-c", f"{BOOT_MARK}; echo x > out"],
                           cli_env, tmp_path)
        assert done.returncode == 0, done.stderr.decode()
        assert (tmp_path / "out").read_text() == "x\n"
        return done.stdout.decode().strip()

    assert boot_mark() == boot_mark()
    assert boot_mark("--cold") != boot_mark("--cold")
    assert leftovers(cli_env) == []


def private_cache(tmp_path: Path, manifest: Manifest, tools: Path | None = None) -> Path:
    """A cache of its own (templates included) over the same images; ``tools``: another
    tools folder."""
    cache = tmp_path / "cache"
    cache.mkdir()
    record = json.loads(manifest.to_json())
    if tools is not None:
        record["tools"]["path"] = str(tools)
    (cache / "manifest.json").write_text(json.dumps(record))
    accel = paths.cache_dir() / "accel.json"
    if accel.exists():
        shutil.copy(accel, cache / "accel.json")
    return cache


@pytest.mark.parametrize("damage", ["header", "truncated"])
def test_a_damaged_template_boots_the_job_cold_leaves_nothing_and_is_rebuilt(
        tmp_path: Path, manifest: Manifest, cli_env: dict[str, str], damage: str) -> None:
    """A template file damaged on disk: the job still runs (cold, with a note), nothing of
    the failed restore is left, and the next job has a new template that restores."""
    env = {**cli_env, "KATA_CI_CACHE": str(private_cache(tmp_path, manifest))}
    work = tmp_path / "ws"
    work.mkdir()
    first = kata_ci_run(["--", "true"], env, work)
    assert first.returncode == 0, first.stderr.decode()
    [snap] = (tmp_path / "cache" / "templates").glob("*/vm.snap")
    if damage == "header":
        with snap.open("r+b") as handle:
            handle.write(os.urandom(4096))
    else:
        os.truncate(snap, 4096)
    second = kata_ci_run(["--", "sh", "-c", "echo ran"], env, work)
    assert second.returncode == 0, second.stderr.decode()
    assert second.stdout.decode() == "ran\n"
    assert "could not restore" in second.stderr.decode()
    assert leftovers(env) == []
    third = kata_ci_run(["--", "true"], env, work)
    assert third.returncode == 0 and "could not restore" not in third.stderr.decode()
    [rebuilt] = (tmp_path / "cache" / "templates").glob("*/vm.snap")
    assert rebuilt.stat().st_size > 4096


def test_file_server_failing_at_restore_is_a_clear_system_failure_leaving_nothing(
        tmp_path: Path, manifest: Manifest, cli_env: dict[str, str]) -> None:
    """virtiofsd that cannot serve (here: it exits at once) fails the restore, then the cold
    boot: the job ends as a system failure naming the file server, nothing left behind."""
    env = {**cli_env, "KATA_CI_CACHE": str(private_cache(tmp_path, manifest))}
    work = tmp_path / "ws"
    work.mkdir()
    assert kata_ci_run(["--", "true"], env, work).returncode == 0  # the template exists
    tools = tmp_path / "tools"
    shutil.copytree(manifest.tools.path, tools, symlinks=True)
    real = (tools / "bin" / "virtiofsd").read_text()
    (tools / "bin" / "virtiofsd").write_text(
        "#!/bin/sh\n# answers --version like the real one, serves nothing\n"
        'case "$1" in --version) ' + real.splitlines()[-1].removeprefix("exec ") + ";; esac\n"
        "echo 'virtiofsd: refusing to serve (test)' >&2; exit 1\n")
    record = json.loads((tmp_path / "cache" / "manifest.json").read_text())
    record["tools"]["path"] = str(tools)
    (tmp_path / "cache" / "manifest.json").write_text(json.dumps(record))
    done = kata_ci_run(["--", "echo", "never"], env, work)
    assert done.returncode == 125, done.stderr.decode()
    assert b"never" not in done.stdout
    assert "virtiofsd" in done.stderr.decode()
    assert leftovers(env) == []


def test_a_host_where_restores_keep_failing_stops_rebuilding_templates(
        tmp_path: Path, manifest: Manifest, backend: QemuBackend) -> None:
    """When a rebuilt template fails to restore again, the provider stops building templates
    of that size for its life: later jobs boot cold at once instead of paying a build each."""
    notes: list[str] = []
    provider, store, request = snapshot_provider(tmp_path, manifest, backend, notes, 120)

    def job() -> bool:
        vm = provider.acquire(request, lambda vm: None)
        restored = "could not restore" not in (notes[-1] if notes else "")
        provider.release(vm, graceful=True)
        return restored

    def damage() -> None:
        for snap in store.root.glob("*/vm.snap"):
            with snap.open("r+b") as handle:
                handle.write(os.urandom(4096))

    assert job()  # builds the template, restores from it
    for _ in range(2):
        damage()
        notes.clear()
        assert not job()  # a failed restore: cold boot, template discarded
        assert list(store.root.glob("*/vm.snap")) == []
        if _ == 0:
            assert job()  # rebuilt, restores again
    notes.clear()
    job()
    assert list(store.root.glob("*/vm.snap")) == []  # not built a third time
    assert any("restores keep failing" in note for note in notes)


def test_a_restore_that_stalls_boots_the_job_cold_and_keeps_the_template(
        tmp_path: Path, manifest: Manifest, backend: QemuBackend) -> None:
    """A restored VM that never answers (here its QEMU is stopped with SIGSTOP as it starts):
    at the boot timeout the job gets a cold-booted VM instead of a system failure, the
    stalled VM is gone, and the template stays for the next job."""
    import signal
    import threading

    notes: list[str] = []
    provider, store, request = snapshot_provider(tmp_path, manifest, backend, notes, 30)
    provider.release(provider.acquire(request, lambda vm: None), graceful=True)  # template
    made: list[QemuVM] = []

    def stop_the_first(vm: object) -> None:
        made.append(vm)  # type: ignore[arg-type]
        if len(made) > 1:
            return

        def stop() -> None:
            while made[0]._qemu is None:
                time.sleep(0.005)
            os.kill(made[0]._qemu.pid, signal.SIGSTOP)

        threading.Thread(target=stop, daemon=True).start()

    vm = provider.acquire(request, stop_the_first)
    try:
        assert len(made) == 2 and vm is made[1]
        assert vm.boot_times is not None and not vm.boot_times.restored
        assert any("did not answer" in note and "booting cold" in note for note in notes)
        assert made[0]._qemu is not None and made[0]._qemu.poll() is not None  # killed
    finally:
        provider.release(vm, graceful=True)
    assert list(store.root.glob("*/vm.snap")), "the template was discarded"
