"""QMP conversations with one QEMU: the guest opening its agent port, saving a snapshot,
restoring one. Each opens its own QMP connection (QEMU serves one client at a time) and
closes it before returning; ``check`` raises when the VM died meanwhile, so a dead QEMU is
reported by its cause, not as a QMP error.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from qemu.qmp import QMPError
from qemu.qmp.legacy import QEMUMonitorProtocol

from kata_ci.errors import RestoreFailed, SystemFailure
from kata_ci.executors.qemu.argv import AGENT_PORT_ID, SCSI_ID, SNAPSHOT_URI

Check = Callable[[], None]
# mapped-ram (QEMU >= 9.0): every RAM page at a fixed offset of the file, zero pages left as
# holes. A restore reads only the written pages, straight into guest RAM (~0.1 s under TCG
# against ~0.7 s for the stream format, ../shared/notes/snapshot-restore.md, table B).
CAPABILITIES = [{"capability": "mapped-ram", "state": True}]
ENDED = ("completed", "failed", "cancelled")


@contextlib.contextmanager
def monitor(path: Path, check: Check, what: str,
            failure: type[SystemFailure] = SystemFailure) -> Iterator[QEMUMonitorProtocol]:
    qmp = QEMUMonitorProtocol(str(path))
    try:
        qmp.connect(negotiate=True)
        yield qmp
    except (OSError, EOFError, QMPError) as exc:
        time.sleep(0.1)  # QEMU closing QMP usually means it is exiting: report why
        check()
        raise failure(f"{what}: QMP connection failed: {exc}") from None
    finally:
        with contextlib.suppress(Exception):
            qmp.close()


def wait_agent_port(path: Path, deadline: float, check: Check, late: Callable[[], str]) -> None:
    """Until the guest opens the agent port.

    Bytes sent before the guest opens its end are dropped by the guest driver, so the host
    must not connect before. QMP says when: the VSERPORT_CHANGE event, and ``frontend-open``
    in query-chardev. Both are used, because events emitted before our QMP negotiation
    finished are not delivered (a host stalled under load would miss it). ``late``: the
    message when the deadline passes.
    """
    with monitor(path, check, "waiting for the guest agent") as qmp:
        next_query = 0.0
        while True:
            check()
            now = time.monotonic()
            if now > deadline:
                raise SystemFailure(late())
            if now >= next_query:
                chardevs: list[dict[str, Any]] = qmp.cmd("query-chardev")  # type: ignore[assignment]
                if any(c.get("label") == "agent" and c.get("frontend-open") for c in chardevs):
                    return
                next_query = now + 1.0
            try:
                event = qmp.pull_event(wait=0.1)
            except TimeoutError:
                continue
            data = (event or {}).get("data", {})
            if (event or {}).get("event") == "VSERPORT_CHANGE" and \
                    data.get("id") == AGENT_PORT_ID and data.get("open"):
                return


def save_snapshot(path: Path, deadline: float, check: Check) -> None:
    """Stop the guest and write its whole state to the snapshot fd (argv.snapshot_args)."""
    with monitor(path, check, "saving the snapshot") as qmp:
        qmp.cmd("migrate-set-capabilities", capabilities=CAPABILITIES)
        qmp.cmd("stop")
        qmp.cmd("migrate", uri=SNAPSHOT_URI)
        status = _until_ended(qmp, deadline, check)
        if status["status"] != "completed":
            raise SystemFailure(f"saving the snapshot failed: {_error(status)}")


def restore_snapshot(path: Path, deadline: float, check: Check) -> None:
    """Load the snapshot into a QEMU started with ``-incoming defer``, then run the guest.
    Anything wrong with the file or the state is RestoreFailed (a cold boot can follow)."""
    with monitor(path, check, "restoring the snapshot", RestoreFailed) as qmp:
        try:
            qmp.cmd("migrate-set-capabilities", capabilities=CAPABILITIES)
            qmp.cmd("migrate-incoming", uri=SNAPSHOT_URI)
        except QMPError as exc:
            raise RestoreFailed(f"QEMU refused the snapshot: {exc}") from None
        status = _until_ended(qmp, deadline, check)
        if status["status"] != "completed":
            raise RestoreFailed(f"restoring the snapshot failed: {_error(status)}")
        qmp.cmd("cont")


def _until_ended(qmp: QEMUMonitorProtocol, deadline: float, check: Check) -> dict[str, Any]:
    delay = 0.002
    while True:
        check()
        status: dict[str, Any] = qmp.cmd("query-migrate")  # type: ignore[assignment]
        if status.get("status") in ENDED:
            return status
        if time.monotonic() > deadline:  # slow, not broken: never a RestoreFailed
            raise SystemFailure(f"migration still {status.get('status', 'not started')} "
                                "at the deadline")
        time.sleep(delay)
        delay = min(delay * 2, 0.05)


def _error(status: dict[str, Any]) -> str:
    return str(status.get("error-desc") or status.get("status"))


IMAGE_FDSET_BASE = 10  # fdsets 10, 11, ...: image disks; 1 is the snapshot's


def attach_disk(path: Path, fd: int, index: int, check: Check) -> None:
    """Hot-add the read-only disk open as ``fd`` as LUN 0 of SCSI target ``index``. QEMU's
    identity cannot open kata-ci's cache: the file goes over the QMP socket (SCM_RIGHTS)
    into an fdset, and the block node opens it from there, read-only."""
    fdset, node = IMAGE_FDSET_BASE + index, f"image{index}"
    with monitor(path, check, "attaching an image disk") as qmp:
        qmp.send_fd_scm(fd)
        for command, args in (
                ("add-fd", {"fdset-id": fdset, "opaque": f"kata-ci image {index}"}),
                ("blockdev-add", {"driver": "raw", "node-name": node, "read-only": True,
                                  "file": {"driver": "file", "read-only": True,
                                           "filename": f"/dev/fdset/{fdset}"}}),
                ("device_add", {"driver": "scsi-hd", "id": node, "drive": node,
                                "bus": f"{SCSI_ID}.0", "scsi-id": index, "lun": 0})):
            reply = qmp.cmd_raw(command, args)
            if "error" in reply:
                check()
                raise SystemFailure(f"attaching image disk {index}: {command}: "
                                    f"{reply['error'].get('desc', reply['error'])}")
