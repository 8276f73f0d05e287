"""Content keys, the image manifest, and running long build steps with progress.

Every artifact lives in ``<cache>/<kind>/<key>/`` where ``key`` hashes everything that went into
it; a finished artifact has a ``DONE`` marker, so an interrupted build is never mistaken for a
good one and a second build with unchanged inputs does nothing. ``manifest.json`` names the
artifacts that belong together; executors and tests read only the manifest.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from kata_ci.errors import ImagesMissing, KataCIError

Progress = Callable[[str], None]
HERE = Path(__file__).resolve().parent
MANIFEST_NAME = "manifest.json"
KINDS = ("kernel", "rootfs", "initramfs", "tools")


class BuildError(KataCIError):
    """A build step failed; the message names the log that holds the details."""


def hash_inputs(parts: Iterable[str | bytes | Path]) -> str:
    """Stable content hash of strings, bytes and files (files by name and content)."""
    digest = hashlib.sha256()
    for part in parts:
        if isinstance(part, Path):
            digest.update(part.name.encode())
            digest.update(part.read_bytes())
        elif isinstance(part, str):
            digest.update(part.encode())
        else:
            digest.update(part)
        digest.update(b"\0")
    return digest.hexdigest()[:16]


def file_sha256(path: Path) -> str:
    """sha256 of a built file, computed once and kept beside it (images are immutable)."""
    record = path.with_name(path.name + ".sha256")
    if record.is_file():
        return record.read_text().strip()
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    record.write_text(digest.hexdigest() + "\n")
    return digest.hexdigest()


@dataclass(frozen=True)
class Artifact:
    """One built file: where it is, the key of its inputs, and the hash of its bytes."""

    path: str
    key: str
    sha256: str
    detail: str = ""


@dataclass(frozen=True)
class Manifest:
    kernel: Artifact
    rootfs: Artifact
    initramfs: Artifact
    tools: Artifact  # a directory: kata-ci-jail and virtiofsd (images/tools.py)
    # Optional: the operator's actions-runner tarball as a read-only ext4 layer every VM sees
    # at /opt/actions-runner (images/runner_layer.py). Absent from manifests without one.
    runner: Artifact | None = None

    def to_json(self) -> str:
        record = asdict(self)
        if self.runner is None:
            del record["runner"]  # as older kata-ci wrote it: a manifest without a layer
        return json.dumps(record, indent=2, sort_keys=True)

    @classmethod
    def load(cls, cache: Path) -> Manifest:
        path = cache / MANIFEST_NAME
        try:
            raw = json.loads(path.read_text())
            runner = raw.get("runner")
            manifest = cls(**{k: Artifact(**raw[k]) for k in KINDS},
                           runner=Artifact(**runner) if runner is not None else None)
        except FileNotFoundError:
            raise ImagesMissing(
                f"guest images are not built (no {path}): run `kata-ci images build`"
            ) from None
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ImagesMissing(
                f"image manifest {path} is unreadable ({exc}): run `kata-ci images build`"
            ) from None
        for artifact in (manifest.kernel, manifest.rootfs, manifest.initramfs, manifest.tools,
                         *([manifest.runner] if manifest.runner else [])):
            if not Path(artifact.path).exists():
                raise ImagesMissing(
                    f"image {artifact.path} is missing: run `kata-ci images build`"
                )
        return manifest

    def save(self, cache: Path) -> None:
        cache.mkdir(parents=True, exist_ok=True)
        tmp = cache / (MANIFEST_NAME + ".tmp")
        tmp.write_text(self.to_json())
        os.replace(tmp, cache / MANIFEST_NAME)


def artifact_dir(cache: Path, kind: str, key: str) -> Path:
    return cache / kind / key


def finished(directory: Path) -> bool:
    return (directory / "DONE").is_file()


def mark_done(directory: Path) -> None:
    (directory / "DONE").write_text(time.strftime("%Y-%m-%dT%H:%M:%SZ\n", time.gmtime()))


def fresh_dir(directory: Path) -> Path:
    """An empty directory for a build, removing what a previous interrupted build left."""
    if directory.exists():
        shutil.rmtree(directory)
    directory.mkdir(parents=True)
    return directory


def run_step(
    argv: Sequence[str | Path],
    log: Path,
    progress: Progress,
    label: str,
    cwd: Path | None = None,
    env: dict[str, str] | None = None,
) -> None:
    """Run one long build command, its output appended to ``log``, progress reported by line.

    Output goes to a file, not to memory: a kernel build prints tens of thousands of lines.
    """
    started = time.monotonic()
    last_report = 0.0
    with log.open("ab") as sink:
        sink.write(f"$ {' '.join(map(str, argv))}\n".encode())
        sink.flush()
        proc = subprocess.Popen(
            [str(a) for a in argv],
            cwd=cwd,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        assert proc.stdout is not None
        for line in proc.stdout:
            sink.write(line)
            now = time.monotonic()
            if now - last_report > 0.5:
                last_report = now
                text = line.decode(errors="replace").strip()[:70]
                progress(f"{label} [{now - started:4.0f}s] {text}")
        code = proc.wait()
    if code != 0:
        tail = b"".join(log.read_bytes().splitlines(keepends=True)[-15:]).decode(errors="replace")
        raise BuildError(f"{label} failed (exit {code}); full log: {log}\n{tail}")
    progress(f"{label} done in {time.monotonic() - started:.0f}s")
