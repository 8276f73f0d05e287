"""Where VM templates (booted, saved guests) are kept: one directory per template key.

Backend-neutral: a backend says what the key is (everything a restore depends on) and how to
write the snapshot file; this store keeps finished templates like the images beside them:
``<cache>/templates/<key>/`` with the file, ``meta.json`` and a ``DONE`` marker written last.
Builds are serialised per key across processes (flock), written into a fresh folder and
renamed into place, so a reader sees a whole template or none.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SNAPSHOT_FILE = "vm.snap"


@dataclass(frozen=True)
class Template:
    key: str
    directory: Path

    @property
    def file(self) -> Path:
        return self.directory / SNAPSHOT_FILE

    def meta(self) -> dict[str, Any]:
        try:
            loaded = json.loads((self.directory / "meta.json").read_text())
        except (OSError, ValueError):
            return {}
        return loaded if isinstance(loaded, dict) else {}


class TemplateStore:
    def __init__(self, root: Path) -> None:
        self.root = root

    def find(self, key: str) -> Template | None:
        template = Template(key, self.root / key)
        if (template.directory / "DONE").is_file() and template.file.is_file():
            return template
        return None

    def build(self, key: str, meta: dict[str, Any], write: Callable[[Path], object]) -> Template:
        """The template for ``key``, made by ``write(path of the snapshot file)`` unless
        another process finished it while we waited for the lock."""
        with self._locked(key):
            found = self.find(key)
            if found is not None:
                return found
            staging = self.root / f".{key}.{os.getpid()}"
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir(mode=0o700)
            try:
                started = time.monotonic()
                write(staging / SNAPSHOT_FILE)
                record = {**meta, "key": key, "build_seconds": round(time.monotonic() - started, 2),
                          "built": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
                (staging / "meta.json").write_text(json.dumps(record, indent=2, sort_keys=True))
                (staging / "DONE").write_text(record["built"] + "\n")
                shutil.rmtree(self.root / key, ignore_errors=True)  # a half one, never DONE
                os.replace(staging, self.root / key)
            finally:
                shutil.rmtree(staging, ignore_errors=True)
        self._prune(key, meta.get("family"))
        return Template(key, self.root / key)

    def discard(self, template: Template) -> None:
        """Remove a template that failed to restore; the next job builds it again. VMs
        restored from it are unaffected (the restore read the file whole)."""
        with self._locked(template.key):
            shutil.rmtree(template.directory, ignore_errors=True)

    def _prune(self, key: str, family: object) -> None:
        """Templates of the same family (size, acceleration) but another key were made from
        inputs that changed (images, QEMU): nothing will restore them again."""
        if family is None:
            return
        for other in self.root.iterdir():
            if other.name == key or other.name.startswith(".") or not other.is_dir():
                continue
            if Template(other.name, other).meta().get("family") == family:
                with contextlib.suppress(OSError), self._locked(other.name):
                    shutil.rmtree(other, ignore_errors=True)

    @contextlib.contextmanager
    def _locked(self, key: str) -> Iterator[None]:
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(self.root / f".{key}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)
