"""The worker's side of a job GitLab handed us: workspace, VM, caches and artifacts.

In gitlab-runner's stage order: get_sources (sources.py), restore_cache, download_artifacts,
the steps in the VM (steps.py), archive_cache, upload_artifacts. Everything but the steps
runs on the host, before the VM starts or after it is gone, and every host read of the
workspace after the job ran goes through files.py (beneath it, never following a link).
Caches live on this host per GitLab instance, project and key (as gitlab-runner's local
cache without a shared store); artifacts go to GitLab.

The trace itself is not sent from here: the job's output goes to its Redis log, masked,
and the poller that took the job (poller.py) ships it to GitLab and reports the ending.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import os
import re
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx

from kata_ci import __version__, paths
from kata_ci.errors import SystemFailure, UserError
from kata_ci.executors.network.policy import NetworkPolicy
from kata_ci.executors.provider import VMProvider
from kata_ci.runner.core.command import Cancel
from kata_ci.runner.core.config import Config
from kata_ci.runner.core.env import job_env
from kata_ci.runner.core.images import ImageUse
from kata_ci.runner.core.lifecycle import run_job
from kata_ci.runner.core.outcome import Outcome, OutcomeKind
from kata_ci.runner.core.registry_auth import docker_auths, first_per_registry, masks
from kata_ci.runner.core.secrets import GITLAB_MASK, Masker, MaskingSink, secret_problem
from kata_ci.runner.core.services import ServiceUse
from kata_ci.runner.core.sinks import LogSink, note
from kata_ci.runner.core.spec import JobSpec, job_network
from kata_ci.runner.gitlab.image import expand_services
from kata_ci.runner.gitlab_runner import files, selection, sources
from kata_ci.runner.gitlab_runner.api import GitLabAPI
from kata_ci.runner.gitlab_runner.masking import PrefixMaskingSink
from kata_ci.runner.gitlab_runner.payload import GitLabJob, parse_job
from kata_ci.runner.gitlab_runner.steps import (
    GitLabSteps,
    Variables,
    expand,
    guest_project_dir,
    runner_variables,
    variables,
)
from kata_ci.runner.queue.workspace import hand_over

log = logging.getLogger("kata_ci.gitlab")
MAX_MEMBERS = 200_000


@dataclass(frozen=True)
class Context:
    """What the worker hands over for one GitLab job."""

    config: Config
    provider: VMProvider
    label: str
    network: NetworkPolicy  # the label's
    workdir: Path  # empty, private, under the worker's quota
    cancel: Cancel  # hard: the lifecycle's
    graceful: Cancel  # GitLab's canceling


def run(entry: dict[str, object], sink: LogSink, ctx: Context) -> Outcome:
    """Run the job to its Outcome; never raises for what the job or GitLab did."""
    try:
        job = parse_job(entry.get("payload"))
        url = str(entry.get("url", ""))
        api = GitLabAPI(url, verify=str(entry.get("ca") or "") or True)
    except UserError as exc:
        note(sink, f"system failure: {exc}")
        return Outcome.system_failure(SystemFailure(str(exc)))
    masker = Masker([], GITLAB_MASK)
    prefixed = PrefixMaskingSink(sink, job.mask_prefixes)
    masked = MaskingSink(prefixed, masker)
    try:
        return _run(job, api, int(str(entry.get("runner_id", 0)) or 0), masked, ctx)
    finally:
        with contextlib.suppress(Exception):
            masked.flush()
        with contextlib.suppress(Exception):
            prefixed.flush()
        api.close()


def _run(job: GitLabJob, api: GitLabAPI, runner_id: int, sink: MaskingSink,
         ctx: Context) -> Outcome:
    note(sink, f"Running with kata-ci {__version__}, GitLab job {job.id} ({job.name}) in a "
               "fresh microVM")
    project_dir = guest_project_dir(job)
    try:
        found = variables(job, runner_variables(job, project_dir, runner_id))
    except UserError as exc:
        note(sink, f"ERROR: {exc}")
        return Outcome.job_failure(str(exc))
    for name, value in {**found.masked, "CI_JOB_TOKEN": job.token}.items():
        if secret_problem(value) is None:
            sink.add(value)
        elif name != "CI_JOB_TOKEN":
            note(sink, f"masked variable {name} is too short to mask; the job does not run")
            return Outcome.job_failure(f"masked variable {name} cannot be masked")
    try:
        image = job_image(job, found, sink)
    except UserError as exc:
        note(sink, f"ERROR: {exc}")
        return Outcome.job_failure(str(exc))
    services = job_services(job, found, image)
    hooks = job.raw.get("hooks")
    if isinstance(hooks, list) and hooks:
        names = ", ".join(str(h.get("name", "?"))[:40] for h in hooks if isinstance(h, dict))
        note(sink, f"hooks ({names}) are not supported: not run")
    cache_root = _cache_root(ctx.config, api.url)
    try:
        sources.check_git()
        tracked = sources.fetch(job, ctx.workdir, found.env, sink)
        _check_cancel(ctx)
        _restore_caches(job, cache_root, ctx.workdir, found.env, sink, ctx.config)
        _check_cancel(ctx)
        _download_dependencies(job, api, ctx.workdir, ctx.config, sink)
        _check_cancel(ctx)
        hand_over(ctx.workdir)
        timeout = min(float(job.timeout or ctx.config.vm.timeout),
                      ctx.config.queue.max_job_timeout)
        spec = JobSpec(
            name=f"{job.name} (GitLab job {job.id})",
            script=GitLabSteps(job.steps, found.files, ctx.graceful),
            env=job_env(found.env), workspace=ctx.workdir, guest_workdir=project_dir,
            timeout=timeout, grace=ctx.config.vm.grace, boot_timeout=ctx.config.vm.boot_timeout,
            vcpus=_size(ctx, "vcpus"), memory_mib=_size(ctx, "memory_mib"),
            network=job_network(ctx.network, found.env, f"GitLab job {job.id}"),
            secrets={}, mask=GITLAB_MASK, image=image, services=services)
    except UserError as exc:
        note(sink, f"ERROR: {exc}")
        return Outcome.job_failure(str(exc))
    except SystemFailure as exc:
        note(sink, f"system failure: {exc}")
        return Outcome.system_failure(exc)
    except _Cancelled:
        note(sink, "job cancelled before its VM started")
        return Outcome.cancelled("cancelled before the VM started")
    outcome = run_job(spec, ctx.provider, sink, ctx.cancel)
    if outcome.kind in (OutcomeKind.SYSTEM_FAILURE,) or ctx.cancel.is_set():
        return outcome
    succeeded = outcome.kind is OutcomeKind.SUCCESS
    after = After(ctx.workdir, tracked, project_dir, found.env, sink)
    try:
        _archive_caches(job, cache_root, after, succeeded, ctx.config)
        _upload_artifacts(job, api, after, succeeded, ctx.config)
    except UserError as exc:
        note(sink, f"ERROR: {exc}")
        return Outcome.job_failure(str(exc)) if succeeded else outcome
    return outcome


def job_image(job: GitLabJob, found: Variables, sink: MaskingSink) -> ImageUse | None:
    """The job's image, its name expanded with the job's variables (as gitlab-runner does),
    with the registry credentials of DOCKER_AUTH_CONFIG (first, as gitlab-runner ranks it)
    and of the payload. Every password is masked in the job's output from here on, with or
    without an image (DOCKER_AUTH_CONFIG reaches the job as a variable). UserError when the
    job has an image and DOCKER_AUTH_CONFIG is not a docker config.json."""
    credentials = list(job.credentials)
    notes: list[str] = []
    problem: UserError | None = None
    text = found.env.get("DOCKER_AUTH_CONFIG", "")
    var = job.variable_map.get("DOCKER_AUTH_CONFIG")
    if var is not None and var.file and text in found.files:  # a file variable: its content
        text = found.files[text].decode(errors="replace")
    if text.strip():
        try:
            auths, notes = docker_auths(text, "DOCKER_AUTH_CONFIG")
            credentials[:0] = auths
        except UserError as exc:
            problem = exc
    for value in masks(credentials):
        if secret_problem(value) is None:
            sink.add(value)
    if job.image_use is None:
        return None
    name = expand(job.image_use.name, found.env).strip()
    if not name:
        note(sink, f"image {job.image_use.name} expands to nothing: the job runs in kata-ci's "
                   "own root")
        return None
    if problem is not None:
        raise problem
    for line in [*job.image_notes, *notes]:
        note(sink, line)
    return dataclasses.replace(job.image_use, name=name,
                               credentials=first_per_registry(credentials))


def job_services(job: GitLabJob, found: Variables,
                 image: ImageUse | None) -> tuple[ServiceUse, ...]:
    """The job's services, names expanded, with the registry credentials the job's image
    got (DOCKER_AUTH_CONFIG and the payload's)."""
    credentials = image.credentials if image is not None else tuple(job.credentials)
    return tuple(dataclasses.replace(s, image=dataclasses.replace(s.image,
                                                                  credentials=credentials))
                 for s in expand_services(tuple(job.services), found.env))


class _Cancelled(Exception):
    pass


def _check_cancel(ctx: Context) -> None:
    """Between the host-side stages: a cancel (either kind) stops the job before its VM."""
    if ctx.cancel.check_now() or ctx.graceful.check_now():
        raise _Cancelled


def _size(ctx: Context, key: str) -> int:
    return int(ctx.config.labels.get(ctx.label, {}).get(key, getattr(ctx.config.vm, key)))


def _cache_root(config: Config, url: str) -> Path:
    base = Path(config.gitlab.cache_dir) if config.gitlab.cache_dir else \
        paths.cache_dir() / "gitlab-cache"
    return base / hashlib.sha256(url.encode()).hexdigest()[:12]


def _due(when: str, succeeded: bool) -> bool:
    return when == "always" or (when == "on_success") == succeeded


def _restore_caches(job: GitLabJob, root: Path, workdir: Path, env: dict[str, str],
                    sink: LogSink, config: Config) -> None:
    for cache in job.caches:
        if cache.policy == "push":
            continue
        keys = [cache.key, *cache.fallback_keys]
        fallback = env.get("CACHE_FALLBACK_KEY", "")
        if fallback.endswith("-protected"):
            # GitLab keeps protected branches' caches apart by this suffix: a job must not
            # reach one through its own variable (gitlab-runner refuses it the same way)
            note(sink, "WARNING: CACHE_FALLBACK_KEY may not name a protected cache; ignored")
        elif fallback:
            keys.append(fallback)
        for key in keys:
            archive = files.cache_path(root, job.project_id, key)
            note(sink, f"Checking cache for {key}...")
            if not archive.is_file():
                continue
            try:
                with archive.open("rb") as data:
                    for warning in files.extract_zip(data, workdir, _limit_for(config),
                                                     MAX_MEMBERS):
                        note(sink, f"WARNING: {warning}")
                os.utime(archive)  # recently used: the last to be evicted
            except UserError as exc:
                note(sink, f"WARNING: Failed to extract cache {key}: {exc}")
                continue
            note(sink, f"Successfully extracted cache {key}")
            break
        else:
            note(sink, f"WARNING: no cache found for {cache.key}")


@dataclass(frozen=True)
class After:
    """The workspace after the job: what archives are collected from, and how."""

    workdir: Path
    tracked: frozenset[str]
    project_dir: str  # the guest's name for workdir: $CI_PROJECT_DIR/out is out
    env: dict[str, str]  # paths may name variables, as GitLab expands them
    sink: LogSink

    def collect(self, paths: list[str], exclude: list[str],
                untracked: bool) -> selection.Collected:
        found = selection.collect(self.workdir, [expand(p, self.env) for p in paths],
                              [expand(p, self.env) for p in exclude], untracked, self.tracked,
                              project_dir=self.project_dir)
        for warning in found.warnings:
            self.warn(warning)
        return found

    def warn(self, text: str) -> None:
        note(self.sink, f"WARNING: {text}")


def _archive_caches(job: GitLabJob, root: Path, after: After, succeeded: bool,
                    config: Config) -> None:
    workdir, sink = after.workdir, after.sink
    for cache in job.caches:
        if cache.policy == "pull" or not _due(cache.when, succeeded):
            continue
        found = after.collect(cache.paths, [], cache.untracked)
        if not found.files:
            note(sink, f"Not creating cache {cache.key}: no files match")
            continue
        archive = files.cache_path(root, job.project_id, cache.key)
        archive.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        note(sink, f"Creating cache {cache.key}...")
        with files.atomic_write(archive) as out:
            files.write_zip(workdir, found.files, out, _limit_for(config), after.warn)
        note(sink, f"Created cache {cache.key} ({len(found.files)} files)")
        _evict(root, config.gitlab.cache_max_mib << 20, keep=archive)


def _evict(root: Path, budget: int, keep: Path) -> None:
    """Least recently used caches go until this GitLab's caches fit ``budget``: a job
    chooses its cache keys, so keys alone must not fill the host's disk."""
    found = []
    for path in root.glob("*/*.zip"):
        with contextlib.suppress(OSError):
            info = path.stat()
            found.append((info.st_mtime, info.st_size, path))
    total = sum(size for _, size, _ in found)
    for _, size, path in sorted(found):
        if total <= budget:
            break
        if path != keep:
            with contextlib.suppress(OSError):
                path.unlink()
                total -= size


def _limit_for(config: Config) -> int:
    return config.gitlab.max_artifacts_mib << 20


def _download_dependencies(job: GitLabJob, api: GitLabAPI, workdir: Path, config: Config,
                           sink: LogSink) -> None:
    for dep in job.dependencies:
        if not dep.filename:
            continue
        note(sink, f"Downloading artifacts for {dep.name} ({dep.id})...")
        with _scratch() as tmp:
            try:
                with tmp.open("w+b") as out:
                    reply = api.download_artifact(dep.id, dep.token, out, _limit_for(config))
            except httpx.HTTPError as exc:
                raise SystemFailure(f"downloading artifacts of job {dep.id}: {exc}") from None
            if reply.status != 200:
                raise UserError(f"downloading artifacts of {dep.name} ({dep.id}) failed: "
                                f"HTTP {reply.status}")
            with tmp.open("rb") as data:
                for warning in files.extract_zip(data, workdir, _limit_for(config), MAX_MEMBERS):
                    note(sink, f"WARNING: {warning}")


@contextlib.contextmanager
def _scratch() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="kata-ci-artifacts-") as tmp:
        yield Path(tmp) / "archive"


def _upload_artifacts(job: GitLabJob, api: GitLabAPI, after: After, succeeded: bool,
                      config: Config) -> None:
    workdir, sink = after.workdir, after.sink
    failures = []
    for artifact in job.artifacts:
        if not _due(artifact.when, succeeded):
            continue
        found = after.collect(artifact.paths, artifact.exclude, artifact.untracked)
        if not found.files:
            note(sink, f"WARNING: no files to upload for {artifact.artifact_type}")
            continue
        fmt = artifact.artifact_format or "zip"
        writer = {"zip": files.write_zip, "gzip": files.write_gzip, "raw": files.write_raw}.get(fmt)
        if writer is None:
            raise UserError(f"artifact format {fmt!r} is not supported")
        name = re.sub(r"[^A-Za-z0-9._-]", "_", artifact.name or "artifacts")[:100] or "artifacts"
        filename = found.files[0].rsplit("/", 1)[-1] if fmt == "raw" else \
            f"{name}.{'zip' if fmt == 'zip' else 'gz'}"
        note(sink, f"Uploading artifacts ({artifact.artifact_type}, {len(found.files)} files)...")
        with _scratch() as tmp:
            with tmp.open("wb") as out:
                writer(workdir, found.files, out, _limit_for(config), after.warn)
            query = {"artifact_format": fmt, "artifact_type": artifact.artifact_type}
            if artifact.expire_in:
                query["expire_in"] = artifact.expire_in
            try:
                reply = api.upload_artifact(job.id, job.token, tmp, filename, query)
            except httpx.HTTPError as exc:
                failures.append(f"{artifact.artifact_type}: {exc}")
                continue
        if reply.status == 201:
            note(sink, f"Uploaded artifacts ({artifact.artifact_type}): 201 Created")
        else:
            failures.append(f"{artifact.artifact_type}: HTTP {reply.status}"
                            + (" (too large)" if reply.status == 413 else ""))
    if failures:
        raise UserError("uploading artifacts failed: " + "; ".join(failures))
