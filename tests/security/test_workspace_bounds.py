"""Escape 4, the queue's half: the host disk is unbounded. A 4 GiB sparse file packs to a few
MiB for `submit` and unpacked to 4 GiB on the worker; a job could fill the worker's disk.
Packing and unpacking are bounded by what the files hold once unpacked, counted as they are
written, and the worker's per-job workspace is a hard quota (a real VM fills it here)."""

from __future__ import annotations

import gzip
import io
import os
import tarfile
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis

from kata_ci.errors import UserError
from kata_ci.executors.qemu.backend import QemuVM
from kata_ci.runner.core.outcome import FINAL
from kata_ci.runner.queue.app import TASK, make_app, queue_name
from kata_ci.runner.queue.store import JobStore
from kata_ci.runner.queue.workspace import pack, unpack
from tests.e2e import test_daemon
from tests.e2e.test_daemon import Worker, wait_until
from tests.integration.redis_server import RedisServer

workers, store = test_daemon.workers, test_daemon.store  # real workers, as in the e2e suite

GiB = 1 << 30
LIMIT = 1 << 30  # the default unpack bound (queue.unpack_limit_mib = 1024)
ENV = {"PATH": "/usr/bin:/bin:/usr/sbin:/sbin"}


def on_disk(root: Path) -> tuple[int, int]:
    """(apparent bytes of the regular files, bytes the disk really holds) under root."""
    apparent = used = 0
    for path in root.rglob("*"):
        info = path.lstat()
        if path.is_file() and not path.is_symlink():
            apparent += info.st_size
        used += info.st_blocks * 512
    return apparent, used


def archive(members: list[tuple[tarfile.TarInfo, bytes | None]]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return buffer.getvalue()


def gnu_sparse(name: str, size: int) -> bytes:
    """A hand-made GNU sparse member header: it claims a ``size``-byte file and stores no
    data, all hole (what `tar --sparse` writes for a sparse file)."""
    info = tarfile.TarInfo(name)
    info.type, info.size = tarfile.GNUTYPE_SPARSE, 0
    header = bytearray(info.tobuf(format=tarfile.GNU_FORMAT))
    header[483:495] = b"%011o\0" % size  # the GNU header's realsize field, octal
    header[148:156] = b" " * 8  # the checksum counts its own field as spaces
    header[148:155] = b"%06o\0" % sum(header)
    return bytes(header)


def hard_link(name: str, target: str) -> bytes:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = tarfile.LNKTYPE, target
    return info.tobuf(format=tarfile.GNU_FORMAT)


def by_hand(*headers: bytes) -> bytes:
    return gzip.compress(b"".join(headers) + bytes(1024))


@pytest.fixture
def into(tmp_path: Path) -> Path:
    path = tmp_path / "into"
    path.mkdir()
    return path


def test_sparse_4gib_refused_at_pack(tmp_path: Path) -> None:
    """A workspace with a 4 GiB sparse file is refused by pack (unpacked size), at once,
    instead of shipping 4 GiB in a few MiB."""
    ws = tmp_path / "ws"
    ws.mkdir()
    (ws / "Makefile").write_text("all:\n")
    with (ws / "sparse").open("wb") as handle:
        handle.truncate(4 * GiB)
    with pytest.raises(UserError, match=r"more than 1024 MiB unpacked .*sparse"):
        pack(ws)


def test_sparse_4gib_archive_stops_at_unpack(into: Path) -> None:
    """A hand-made archive whose sparse member unpacks to 4 GiB (a header that lies about
    the data it holds): unpack refuses it with a clear error, nothing reaches the disk."""
    with pytest.raises(UserError, match="more than 1024 MiB unpacked"):
        unpack(by_hand(gnu_sparse("big", 4 * GiB)), into)
    apparent, used = on_disk(into)
    assert apparent <= LIMIT and used < 1 << 20


def test_hard_links_count_bytes_written(into: Path) -> None:
    """Hard-link members claim 0 bytes each but would repeat a 600 MiB file: the bytes
    written are counted and unpack stops at the bound, nothing over it on disk."""
    data = by_hand(gnu_sparse("big", 600 << 20),
                   *(hard_link(f"copy{n}", "big") for n in range(3)))
    with pytest.raises(UserError, match="more unpacked bytes than allowed"):
        unpack(data, into)
    apparent, used = on_disk(into)
    assert apparent <= LIMIT and used < 1 << 20  # runs of zeros land as holes


def test_many_members_refused(into: Path) -> None:
    """A tar bomb of 100,001 empty files is refused at the member bound (100,000)."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz", compresslevel=1) as tar:
        for n in range(100_001):
            tar.addfile(tarfile.TarInfo(f"f{n}"), io.BytesIO())
    with pytest.raises(UserError, match="more than 100000 members"):
        unpack(buffer.getvalue(), into)
    assert len(os.listdir(into)) <= 100_000


def test_links_devices_setuid_refused(into: Path, tmp_path: Path) -> None:
    """Links leaving the target, device nodes and fifos are refused with a clear error;
    setuid bits are never restored."""
    out = tarfile.TarInfo("etc")
    out.type, out.linkname = tarfile.SYMTYPE, "/etc"
    up = tarfile.TarInfo("up")
    up.type, up.linkname = tarfile.SYMTYPE, "../../.."
    dev = tarfile.TarInfo("sda")
    dev.type, dev.devmajor, dev.devminor, dev.mode = tarfile.BLKTYPE, 8, 0, 0o666
    fifo = tarfile.TarInfo("fifo")
    fifo.type = tarfile.FIFOTYPE
    for bad in (out, up, dev, fifo):
        with pytest.raises(UserError, match="refused"):
            unpack(archive([(bad, None)]), into)
    assert os.listdir(into) == []
    suid = tarfile.TarInfo("sh")
    suid.mode, suid.size, suid.uid = 0o4755, 4, 0
    unpack(archive([(suid, b"#!/s")]), into)
    assert (into / "sh").stat().st_mode & 0o7777 == 0o755


@pytest.fixture
def quota_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="kci-quota-"))
    yield path
    from kata_ci.runner.queue import quota
    quota.discard(path)


@pytest.mark.vm
def test_quota_stops_a_job_filling_the_disk(quota_dir: Path,
                                            vm_factory: Callable[..., QemuVM]) -> None:
    """A job writing past its 64 MiB workspace quota (fallocate 1 GiB, then dd) gets ENOSPC;
    the host disk holds no more than the quota; files in the share still execute."""
    from kata_ci.runner.queue import quota

    (quota_dir / "under.txt").write_text("kept\n")  # hidden by the mount, back after it
    image = quota_dir.with_name(quota_dir.name + ".img")
    host = os.statvfs(quota_dir.parent)
    free_before = host.f_bavail * host.f_frsize
    with quota.limited(quota_dir, 64):
        (quota_dir / "run.sh").write_text("#!/bin/sh\necho exec-ok\n")
        (quota_dir / "run.sh").chmod(0o755)
        vm = vm_factory(workspace=quota_dir)
        script = ("./run.sh && cp /bin/true ./t && ./t && echo bin-ok; "
                  "fallocate -l 1G big 2>&1; echo fallocate=$?; rm -f big; "
                  "dd if=/dev/zero of=fill bs=1M count=200 2>/tmp/dd.err; echo dd=$?; "
                  "cat /tmp/dd.err; echo size=$(du -m fill | cut -f1); sync")
        stream = vm.agent.exec(["sh", "-c", script], ENV, cwd=str(quota_dir))
        out = b"".join(chunk.data for chunk in stream).decode(errors="replace")
        assert "exec-ok" in out and "bin-ok" in out, out
        assert "fallocate=0" not in out and "dd=0" not in out, out
        assert out.count("No space left on device") >= 2, out
        assert 32 <= int(out.split("size=")[1].split()[0]) <= 64, out  # filled, up to quota
        assert image.stat().st_blocks * 512 <= 64 << 20
        host = os.statvfs(quota_dir.parent)
        assert free_before - host.f_bavail * host.f_frsize < 1 << 30
        vm.kill()
    assert not os.path.ismount(quota_dir) and not image.exists()
    assert (quota_dir / "under.txt").read_text() == "kept\n"


@pytest.fixture
def config(redis_server: RedisServer, tmp_path: Path) -> Path:
    """A worker whose workspaces hold at most 64 MiB."""
    redis.Redis.from_url(redis_server.url).flushdb()
    path = tmp_path / "config.toml"
    path.write_text(f'[queue]\nbroker = "{redis_server.url}"\nworkspace_quota_mib = 64\n'
                    "[vm]\ngrace = 2\n")
    return path


@pytest.mark.vm
def test_queued_jobs_stay_within_their_workspace(
        workers: Callable[..., Worker], config: Path, store: JobStore,
        redis_server: RedisServer, tmp_path: Path) -> None:
    """Through the real worker: a tar-bomb workspace ends as a failed job at once (no VM, no
    disk), and a job writing past the 64 MiB quota fails with ENOSPC; nothing stays
    mounted."""
    worker = workers()
    app = make_app(redis_server.url, 3600)
    bomb = store.create(["true"], "default", 60, by_hand(gnu_sparse("big", 4 * GiB)))
    app.send_task(TASK, args=[bomb.id], queue=queue_name("default"))
    (tmp_path / "ws").mkdir()
    fill = store.create(["sh", "-c", "dd if=/dev/zero of=fill bs=1M count=200"], "default",
                        300, pack(tmp_path / "ws"))
    app.send_task(TASK, args=[fill.id], queue=queue_name("default"))
    wait_until(lambda: store.get(fill.id).state in FINAL, 300, "the fill job")
    wait_until(lambda: store.get(bomb.id).state in FINAL, 30, "the bomb job")
    assert store.get(bomb.id).state == "failed"
    assert b"more than 1024 MiB unpacked" in b"".join(d for _, d in store.read_log(bomb.id))
    assert store.get(fill.id).state == "failed", b"".join(d for _, d in store.read_log(fill.id))
    assert b"No space left on device" in b"".join(d for _, d in store.read_log(fill.id))
    assert "kata-ci-" not in Path("/proc/mounts").read_text()
    assert worker.leftovers() == []
