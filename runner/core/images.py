"""Jobs in OCI images (GitLab ``image:``, GitHub ``container:``, ``kata-ci run --image``).

Pulled on the host before any VM starts (a pull failure is GitLab's image_pull_failure,
classed before the job's script runs, and costs no VM); after the VM starts, the image's
disk is hot-added and the agent makes its root (agent.proto PrepareRoot). From then on
every command of the job runs in that root as the image's user, through its entrypoint
unless the job overrides it, with the image's environment under the job's variables.
"""

from __future__ import annotations

import dataclasses
import subprocess
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from kata_ci.errors import ImagePullFailure, SystemFailure, UserError
from kata_ci.executors.base import VM
from kata_ci.guest.roots import RootError, resolve
from kata_ci.images.oci.reference import parse_reference
from kata_ci.images.oci.registry import Credentials
from kata_ci.images.oci.store import Image, ImageStore
from kata_ci.runner.core.env import GUEST_PATH

JOB_ROOT = "job"
ROOT_TIMEOUT = 30.0  # hot-add, SCSI scan, mounts: seconds under TCG on a loaded host
POLICIES = ("always", "if-not-present", "never")


@dataclass(frozen=True)
class ImageUse:
    """What a job asked for. ``entrypoint`` None: the image's own; () : none (GitLab's
    ``entrypoint: [""]``, GitHub's containers). ``user``: "" keeps the image's User."""

    name: str
    entrypoint: tuple[str, ...] | None = None
    user: str = ""
    pull_policy: str = ""  # "": the runner's default ([images] pull_policy)
    credentials: tuple[Credentials, ...] = ()
    env: Mapping[str, str] = field(default_factory=dict)  # GitHub's container.env

    def user_in(self, image: Image) -> str:
        """Who runs the commands: the job's override, else the image's User."""
        return self.user or image.config.user

    def entrypoint_in(self, image: Image) -> tuple[str, ...]:
        """What prefixes every command: the job's override, else the image's Entrypoint."""
        return tuple(image.config.entrypoint if self.entrypoint is None else self.entrypoint)

    def policy(self, default: str) -> str:
        policy = self.pull_policy or default
        if policy not in POLICIES:
            raise UserError(f"image {self.name}: pull_policy {policy!r}: expected one of "
                            f"{', '.join(POLICIES)}")
        return policy


@dataclass(frozen=True)
class JobRoot:
    """The job's image root in its VM, as Session runs commands in it."""

    name: str
    path: str  # in the guest: where PutFiles/GetFiles reach the root's files
    user: str
    entrypoint: tuple[str, ...]

    def argv(self, argv: list[str] | tuple[str, ...]) -> list[str]:
        return [*self.entrypoint, *argv]

    def guest_path(self, path: str, workdir: str) -> str:
        """A path as the root sees it, as the agent (in kata-ci's root) reaches it; the
        workspace is bound at the same path in both."""
        if path == workdir or path.startswith(workdir.rstrip("/") + "/"):
            return path
        return self.path.rstrip("/") + path


def pull(use: ImageUse, store: ImageStore, default_policy: str) -> Image:
    """The image on this host (ImagePullFailure with what to fix otherwise)."""
    try:
        return store.pull(mirrored(use.name, store.registries.mirrors),
                          use.policy(default_policy),  # type: ignore[arg-type]
                          use.credentials)
    except UserError as exc:
        raise ImagePullFailure(str(exc)) from None


def mirrored(name: str, mirrors: Mapping[str, str]) -> str:
    """``name`` as pulled through its registry's mirror ([images] registry_mirrors)."""
    if not mirrors:
        return name
    ref = parse_reference(name)
    target = mirrors.get(ref.registry)
    return str(dataclasses.replace(ref, registry=target)) if target else name


def workspace_ids(image: Image, use: ImageUse) -> tuple[int, int]:
    """The uid and gid the job runs as, from the image's own /etc/passwd and /etc/group
    (read from its disk, never from a path the job controls): the workspace's owner appears
    to the guest as them, so a non-root image user may write its checkout, as GitLab's
    and GitHub's containers may. A name the image lacks: (0, 0); the guest then says so."""
    user = use.user_in(image)
    if not user:
        return (0, 0)
    try:
        who = resolve(_disk_file(image.disk, "/etc/passwd"),
                      _disk_file(image.disk, "/etc/group"), user)
    except RootError:
        return (0, 0)
    return (who.uid, who.gid)


def _disk_file(disk: Path, path: str) -> str:
    """A small file of an image disk, read with debugfs (the disk is never mounted here)."""
    try:
        done = subprocess.run(["debugfs", "-R", f"cat {path}", str(disk)], capture_output=True,
                              timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return done.stdout[:1 << 20].decode(errors="replace") if done.returncode == 0 else ""


def image_env(image: Image, job: Mapping[str, str], use: ImageUse) -> dict[str, str]:
    """The image's Env below the job's variables (as Docker and GitLab merge them). kata-ci's
    own defaults give way: PATH is the image's (with what $GITHUB_PATH put in front), and
    HOME is left for the agent to take from the image's /etc/passwd."""
    base: dict[str, str] = {}
    for item in image.config.env:
        key, sep, value = item.partition("=")
        if sep and key:
            base[key] = value
    env = {**base, **use.env}
    for key, value in job.items():
        if key == "PATH" and value.endswith(GUEST_PATH):
            prefix = value[: -len(GUEST_PATH)]
            env["PATH"] = prefix + base.get("PATH", GUEST_PATH)
        elif key == "HOME" and value == "/root" and "HOME" not in use.env:
            continue
        else:
            env[key] = value
    return env


def enter(vm: VM, image: Image, use: ImageUse, hosts: Mapping[str, str],
          note: Callable[[str], None]) -> JobRoot:
    """Attach the image to the running VM and make the job's root of it."""
    vm.attach_image(image.disk, 0)
    path = vm.agent.prepare_root(JOB_ROOT, 0, "", hosts, ROOT_TIMEOUT)
    entrypoint, user = use.entrypoint_in(image), use.user_in(image)
    note(f"running in image {use.name} ({image.digest[:19]})"
         + (f" as {user}" if user else "")
         + (f", entrypoint {list(entrypoint)}" if entrypoint else ""))
    if not path:
        raise SystemFailure(f"the agent made no root of image {use.name}")
    return JobRoot(JOB_ROOT, path, user, entrypoint)
