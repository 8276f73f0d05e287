"""Pruning the image store (store.py): images unused for a while, their references, and what
killed pulls left behind. An image somebody holds (a pull finishing it, a VM using it through
ImageStore.in_use) is skipped: its lock is taken without waiting, and only then is the image
looked at again, so a use that lands meanwhile keeps it."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING

from kata_ci.images.oci.reference import DIGEST

if TYPE_CHECKING:
    from kata_ci.images.oci.store import Image, ImageStore

STALE_SECONDS = 3600  # a tmp-* this old belongs to no running pull (skopeo's timeout is less)


def list_images(store: ImageStore) -> list[Image]:
    found = []
    for meta in sorted((store.root / "images").glob("*.json")):
        digest = f"sha256:{meta.stem}"
        loaded = store.load(digest) if DIGEST.fullmatch(digest) else None
        if loaded is not None:
            found.append(loaded[0])
    return found


def prune_images(store: ImageStore, older_than_seconds: float, dry_run: bool) -> list[Image]:
    removed: list[Image] = []
    for meta in sorted((store.root / "images").glob("*.json")):
        digest = f"sha256:{meta.stem}"
        if not DIGEST.fullmatch(digest) or not _idle(store, digest, older_than_seconds):
            continue
        with store.lock(digest, blocking=False) as held:
            if not held:
                store.say(f"prune: {digest} is in use, kept")
                continue
            loaded = store.load(digest)
            if loaded is None or not _idle(store, digest, older_than_seconds):
                continue
            removed.append(loaded[0])
            if not dry_run:
                meta.unlink()  # first: without its record the disk is no image any more
                store.disk_path(digest).unlink(missing_ok=True)
                _drop_refs(store.root / "refs", digest)
    if not dry_run:
        _drop_leftovers(store)
    return removed


def _idle(store: ImageStore, digest: str, older_than_seconds: float) -> bool:
    loaded = store.load(digest)
    if loaded is None:
        return False
    last = loaded[1].get("last_used")
    return isinstance(last, (int, float)) and time.time() - last >= older_than_seconds


def _drop_refs(refs: Path, digest: str) -> None:
    for path in refs.glob("*.json"):
        with contextlib.suppress(OSError, ValueError, AttributeError):
            if json.loads(path.read_text()).get("digest") == digest:
                path.unlink()


def _drop_leftovers(store: ImageStore) -> None:
    """tmp-* of killed pulls (work dirs, auth files, half-written records), and disks whose
    record was never written, once they are an hour old and nobody holds their lock."""
    now = time.time()
    for folder in (store.root, store.root / "images", store.root / "refs"):
        for path in folder.glob("tmp-*"):
            with contextlib.suppress(FileNotFoundError):
                if now - path.lstat().st_mtime < STALE_SECONDS:
                    continue
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    path.unlink()
    for disk in (store.root / "images").glob("*.ext4"):
        digest = f"sha256:{disk.stem}"
        if not DIGEST.fullmatch(digest) or store.meta_path(digest).exists():
            continue
        with store.lock(digest, blocking=False) as held, contextlib.suppress(FileNotFoundError):
            if held and now - os.lstat(disk).st_mtime >= STALE_SECONDS:
                disk.unlink()
