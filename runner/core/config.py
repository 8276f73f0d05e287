"""Typed configuration from TOML, overridable by CLI flags.

Looked up at --config, else $KATA_CI_CONFIG, else $XDG_CONFIG_HOME/kata-ci/config.toml
(~/.config/kata-ci/config.toml). A missing default file is fine; a missing explicit file, an
unknown key or a wrong type is a UserError naming the file and key.

    [vm]
    vcpus = 2
    memory_mib = 1024
    timeout = 3600     # seconds for one job; 0 = no limit
    grace = 10         # seconds between SIGTERM and killing the VM on cancel/timeout
    boot_timeout = 60  # seconds for the guest agent to answer after the VM starts
    accel = "auto"     # auto | kvm | tcg
    max_file_mib = 16384  # no file in the workspace grows past this; 0 = no bound
    start = "snapshot" # snapshot: restore from a template where QEMU allows; cold: boot

    [images]
    mirror = ""        # Debian mirror for the rootfs; empty: the host's apt mirror
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, get_args

from kata_ci.errors import UserError

AccelChoice = Literal["auto", "kvm", "tcg"]
StartChoice = Literal["snapshot", "cold"]


@dataclass(frozen=True)
class VMConfig:
    vcpus: int = 2
    memory_mib: int = 1024
    timeout: float = 3600.0
    grace: float = 10.0
    boot_timeout: float = 60.0
    accel: AccelChoice = "auto"
    # No file a job writes in the workspace grows past this (RLIMIT_FSIZE on the file
    # server: the guest gets EFBIG); 0 = no bound. Bounds one file, not the total.
    max_file_mib: int = 16384
    # How a job's VM starts: restored from a booted template of its size (QEMU >= 9.0 and
    # virtiofsd >= 1.11; else cold, `kata-ci doctor` says why), or always cold-booted.
    start: StartChoice = "snapshot"

    @property
    def max_file_size(self) -> int | None:
        return self.max_file_mib << 20 if self.max_file_mib else None

    def validate(self, source: str) -> VMConfig:
        cpus = os.cpu_count() or 1
        problems = []
        if not 1 <= self.vcpus <= max(cpus, 1) * 4:
            problems.append(f"vcpus must be between 1 and {cpus * 4}, not {self.vcpus}")
        if not 256 <= self.memory_mib <= 256 * 1024:
            problems.append(f"memory_mib must be between 256 and 262144, not {self.memory_mib}")
        if self.timeout < 0:
            problems.append(f"timeout must be >= 0 (0 = no limit), not {self.timeout}")
        if self.grace < 0:
            problems.append(f"grace must be >= 0, not {self.grace}")
        if self.boot_timeout <= 0:
            problems.append(f"boot_timeout must be > 0, not {self.boot_timeout}")
        if self.max_file_mib < 0:
            problems.append(f"max_file_mib must be >= 0 (0 = no bound), not {self.max_file_mib}")
        if self.start not in get_args(StartChoice):
            problems.append(f"start must be snapshot or cold, not {self.start!r}")
        if self.accel not in get_args(AccelChoice):
            problems.append(f"accel must be one of auto, kvm, tcg, not {self.accel!r}")
        if problems:
            raise UserError(f"{source}: " + "; ".join(problems))
        return self


@dataclass(frozen=True)
class ImagesConfig:
    mirror: str = ""


@dataclass(frozen=True)
class QueueConfig:
    """The daemon: broker, what this worker serves, how many VMs at once, limits."""

    broker: str = "redis://127.0.0.1:6379/0"
    labels: list[str] = field(default_factory=lambda: ["default"])
    concurrency: int = 1
    max_job_timeout: float = 6 * 3600.0
    log_limit_mib: int = 16
    # A queued workspace: what it may unpack to (sparse files count in full) and hold while
    # the job runs (a loop-mounted ext4 image per job, needs root; 0 = no quota).
    unpack_limit_mib: int = 1024
    unpack_max_members: int = 100_000
    workspace_quota_mib: int = 4096
    # Seconds a running job's lease lasts: its worker renews it every lease_ttl/3; a job whose
    # worker is gone (killed, host lost) ends within 4/3 x lease_ttl: system_failure, or
    # queued again once if submitted with --retry (runner/queue/lease.py).
    lease_ttl: float = 30.0

    def validate(self, source: str) -> QueueConfig:
        if not 1 <= self.lease_ttl <= 3600:
            raise UserError(f"{source}: queue.lease_ttl must be between 1 and 3600 seconds, "
                            f"not {self.lease_ttl:g}")
        return self


LABEL_SIZE_KEYS = ("vcpus", "memory_mib")


@dataclass(frozen=True)
class Config:
    vm: VMConfig = field(default_factory=VMConfig)
    images: ImagesConfig = field(default_factory=ImagesConfig)
    queue: QueueConfig = field(default_factory=QueueConfig)
    # Per-label VM size: [labels.big] vcpus = 4, memory_mib = 8192
    labels: dict[str, dict[str, int]] = field(default_factory=dict)
    source: str = "defaults"

    def with_vm(self, **overrides: Any) -> Config:
        """Flags over file values; only the flags the user gave (None = not given)."""
        given = {k: v for k, v in overrides.items() if v is not None}
        vm = dataclasses.replace(self.vm, **given).validate("command line")
        return dataclasses.replace(self, vm=vm)


def default_path() -> Path:
    explicit = os.environ.get("KATA_CI_CONFIG")
    if explicit:
        return Path(explicit)
    xdg = os.environ.get("XDG_CONFIG_HOME")
    return (Path(xdg) if xdg else Path.home() / ".config") / "kata-ci" / "config.toml"


def load(path: Path | None = None) -> Config:
    explicit = path is not None or "KATA_CI_CONFIG" in os.environ
    path = path or default_path()
    try:
        raw = tomllib.loads(path.read_text())
    except FileNotFoundError:
        if explicit:
            raise UserError(f"config file {path} does not exist") from None
        return Config()
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise UserError(f"config file {path}: {exc}") from None
    sections: dict[str, type[Any]] = {"vm": VMConfig, "images": ImagesConfig,
                                      "queue": QueueConfig}
    unknown = set(raw) - set(sections) - {"labels"}
    if unknown:
        raise UserError(f"{path}: unknown section(s) {', '.join(sorted(unknown))}")
    built = {name: _section(path, name, cls, raw.get(name, {})) for name, cls in sections.items()}
    config = Config(vm=built["vm"], images=built["images"], queue=built["queue"],
                    labels=_labels(path, raw.get("labels", {})), source=str(path))
    config.vm.validate(str(path))
    config.queue.validate(str(path))
    return config


def _labels(path: Path, table: Any) -> dict[str, dict[str, int]]:
    if not isinstance(table, dict):
        raise UserError(f"{path}: [labels] must hold tables like [labels.big]")
    sizes: dict[str, dict[str, int]] = {}
    for label, size in table.items():
        if not isinstance(size, dict) or set(size) - set(LABEL_SIZE_KEYS):
            raise UserError(f"{path}: [labels.{label}] may set only {', '.join(LABEL_SIZE_KEYS)}")
        for key, value in size.items():
            if not isinstance(value, int) or isinstance(value, bool):
                raise UserError(f"{path}: labels.{label}.{key} must be int")
        VMConfig(**size).validate(f"{path}: [labels.{label}]")
        sizes[label] = dict(size)
    return sizes


def _section(path: Path, name: str, cls: type[Any], table: Any) -> Any:
    if not isinstance(table, dict):
        raise UserError(f"{path}: [{name}] must be a table")
    known = {f.name: f for f in fields(cls)}
    for key, value in table.items():
        if key not in known:
            raise UserError(f"{path}: unknown key {name}.{key} (known: {', '.join(known)})")
        want = float if known[key].type == "float" else type(getattr(cls(), key))
        ok = isinstance(value, want) or (want is float and isinstance(value, int))
        if not ok or isinstance(value, bool) != (want is bool):
            raise UserError(f"{path}: {name}.{key} must be {want.__name__}, "
                            f"not {type(value).__name__}")
    return cls(**{k: float(v) if known[k].type == "float" else v for k, v in table.items()})


def vm_sizes(config: Config, labels: list[str] | None = None) -> list[tuple[int, int]]:
    """(vcpus, memory_mib) of the default VM and of each label's (all, or ``labels``)."""
    sizes = [(config.vm.vcpus, config.vm.memory_mib)]
    for label, size in config.labels.items():
        if labels is None or label in labels:
            sizes.append((size.get("vcpus", config.vm.vcpus),
                          size.get("memory_mib", config.vm.memory_mib)))
    return list(dict.fromkeys(sizes))
