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
    network = "egress" # none | egress | allowlist (README, "Network")
    allow = []         # allowlist: ["pypi.org:443", "*.pythonhosted.org:443", "198.51.100.0/24"]

    [network]
    holes = []         # private destinations every job may reach: ["10.1.2.3:3128"]
    dns = []           # upstream resolvers behind kata-ci's own; empty: /etc/resolv.conf

    [labels.locked]    # per label: vcpus, memory_mib, network, allow
    network = "allowlist"
    allow = ["pypi.org:443"]

    [images]
    mirror = ""        # Debian mirror for the rootfs; empty: the host's apt mirror

    [gitlab] / [github]: runner/gitlab_runner/settings.py, runner/github_runner/settings.py
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, get_args

from kata_ci.errors import UserError
from kata_ci.executors.network.policy import NetworkPolicy, build_policy
from kata_ci.images.oci.registry import RegistryConfig
from kata_ci.runner.github_runner.settings import GitHubConfig
from kata_ci.runner.github_runner.settings import parse as parse_github
from kata_ci.runner.gitlab_runner.settings import GitLabConfig
from kata_ci.runner.gitlab_runner.settings import parse as parse_gitlab

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
    network: str = "egress"
    allow: list[str] = field(default_factory=list)

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
        if not all(isinstance(a, str) for a in self.allow):
            problems.append("allow must be a list of strings like \"pypi.org:443\"")
        else:
            try:
                build_policy(self.network, self.allow, [], [], source)
            except UserError as exc:
                problems.append(str(exc).removeprefix(f"{source}: "))
        if self.accel not in get_args(AccelChoice):
            problems.append(f"accel must be one of auto, kvm, tcg, not {self.accel!r}")
        if problems:
            raise UserError(f"{source}: " + "; ".join(problems))
        return self


@dataclass(frozen=True)
class ImagesConfig:
    """[images]: kata-ci's own VM images (mirror) and the OCI images jobs run in."""

    mirror: str = ""
    pull_policy: str = "always"  # GitLab's default: a tag is re-resolved, layers are cached
    auth_file: str = ""  # docker-style config.json for registries (~/.docker/config.json)
    insecure_registries: list[str] = field(default_factory=list)  # plain HTTP allowed
    cert_dirs: dict[str, str] = field(default_factory=dict)  # registry -> CA directory
    registry_mirrors: dict[str, str] = field(default_factory=dict)  # "docker.io" -> mirror

    def validate(self, source: str) -> ImagesConfig:
        if self.pull_policy not in ("always", "if-not-present", "never"):
            raise UserError(f"{source}: images.pull_policy {self.pull_policy!r}: expected "
                            "always, if-not-present or never")
        if not all(isinstance(v, str) for v in [*self.insecure_registries,
                                                *self.cert_dirs.values(),
                                                *self.registry_mirrors.values()]):
            raise UserError(f"{source}: images.insecure_registries, images.cert_dirs and "
                            "images.registry_mirrors hold strings")
        return self

    def registries(self) -> RegistryConfig:
        return RegistryConfig(auth_file=Path(self.auth_file).expanduser() if self.auth_file
                              else None, insecure=tuple(self.insecure_registries),
                              cert_dirs={k: Path(v) for k, v in self.cert_dirs.items()},
                              mirrors=dict(self.registry_mirrors))


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
    # Seconds an ended job's record and log stay in Redis (`jobs`, `logs`, the status page);
    # then they go, so that Redis holds a bounded history however many jobs run.
    retention: float = 7 * 86400.0

    def validate(self, source: str) -> QueueConfig:
        if not 1 <= self.lease_ttl <= 3600:
            raise UserError(f"{source}: queue.lease_ttl must be between 1 and 3600 seconds, "
                            f"not {self.lease_ttl:g}")
        if self.retention < 60:
            raise UserError(f"{source}: queue.retention must be at least 60 seconds, not "
                            f"{self.retention:g}")
        return self


@dataclass(frozen=True)
class NetworkConfig:
    """The operator's network settings, for every job (per-job policy is in [vm] and labels)."""

    holes: list[str] = field(default_factory=list)
    dns: list[str] = field(default_factory=list)

    def validate(self, source: str) -> NetworkConfig:
        for key in ("holes", "dns"):
            if not all(isinstance(v, str) for v in getattr(self, key)):
                raise UserError(f"{source}: network.{key} must be a list of strings")
        build_policy("none", [], self.holes, self.dns, f"{source}: [network]")
        return self


LABEL_KEYS = {"vcpus": int, "memory_mib": int, "network": str, "allow": list}


@dataclass(frozen=True)
class Config:
    vm: VMConfig = field(default_factory=VMConfig)
    images: ImagesConfig = field(default_factory=ImagesConfig)
    queue: QueueConfig = field(default_factory=QueueConfig)
    network: NetworkConfig = field(default_factory=NetworkConfig)
    # Per label: [labels.big] vcpus = 4, memory_mib = 8192, network = "allowlist", allow = []
    labels: dict[str, dict[str, Any]] = field(default_factory=dict)
    gitlab: GitLabConfig = field(default_factory=GitLabConfig)  # gitlab_runner/settings.py
    github: GitHubConfig = field(default_factory=GitHubConfig)  # github_runner/settings.py
    source: str = "defaults"

    def with_vm(self, **overrides: Any) -> Config:
        """Flags over file values; only the flags the user gave (None = not given)."""
        given = {k: v for k, v in overrides.items() if v is not None}
        vm = dataclasses.replace(self.vm, **given).validate("command line")
        return dataclasses.replace(self, vm=vm)

    def policy(self, label: str | None = None) -> NetworkPolicy:
        """The network of a job: [vm], or its label's, with the operator's holes and DNS."""
        own = self.labels.get(label, {}) if label else {}
        mode = own.get("network", self.vm.network)
        allow = own.get("allow", self.vm.allow if "network" not in own else [])
        where = f"{self.source}: [labels.{label}]" if own else self.source
        return build_policy(mode, allow, self.network.holes, self.network.dns, where)


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
                                      "queue": QueueConfig, "network": NetworkConfig}
    unknown = set(raw) - set(sections) - {"labels", "gitlab", "github"}
    if unknown:
        raise UserError(f"{path}: unknown section(s) {', '.join(sorted(unknown))}")
    built = {name: _section(path, name, cls, raw.get(name, {})) for name, cls in sections.items()}
    config = Config(vm=built["vm"], images=built["images"], queue=built["queue"],
                    network=built["network"], labels=_labels(path, raw.get("labels", {})),
                    gitlab=parse_gitlab(str(path), raw.get("gitlab", {})),
                    github=parse_github(str(path), raw.get("github", {})), source=str(path))
    config.vm.validate(str(path))
    config.images.validate(str(path))
    config.queue.validate(str(path))
    config.network.validate(str(path))
    for label in config.labels:
        config.policy(label)
    return config


def _labels(path: Path, table: Any) -> dict[str, dict[str, Any]]:
    if not isinstance(table, dict):
        raise UserError(f"{path}: [labels] must hold tables like [labels.big]")
    labels: dict[str, dict[str, Any]] = {}
    for label, own in table.items():
        if not isinstance(own, dict) or set(own) - set(LABEL_KEYS):
            raise UserError(f"{path}: [labels.{label}] may set only {', '.join(LABEL_KEYS)}")
        for key, value in own.items():
            if not isinstance(value, LABEL_KEYS[key]) or isinstance(value, bool):
                raise UserError(f"{path}: labels.{label}.{key} must be "
                                f"{LABEL_KEYS[key].__name__}")
        VMConfig(**own).validate(f"{path}: [labels.{label}]")
        labels[label] = dict(own)
    return labels


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


def vm_sizes(config: Config, labels: list[str] | None = None) -> list[tuple[int, int, bool]]:
    """(vcpus, memory_mib, NIC) of the default VM and of each label's (all, or ``labels``):
    the VM kinds whose templates are worth building ahead."""
    sizes = [(config.vm.vcpus, config.vm.memory_mib, config.policy().nic)]
    for label, own in config.labels.items():
        if labels is None or label in labels:
            sizes.append((own.get("vcpus", config.vm.vcpus),
                          own.get("memory_mib", config.vm.memory_mib), config.policy(label).nic))
    return list(dict.fromkeys(sizes))
