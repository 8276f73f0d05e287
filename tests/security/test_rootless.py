"""`kata-ci run` by an ordinary user (no sudo): everything runs as that user, guest root is
that user in the checkout, nothing runs as root. kata-ci's own .venv may sit under /root (a
pyenv Python), so the user gets a venv of their own from Debian's python3, as they would
install kata-ci themselves."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from kata_ci import paths

USER = 4321
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def user_venv() -> Path:
    """A venv the user can run, cached by the dependency list (pip install -e of this repo)."""
    key = hashlib.sha256((REPO / "pyproject.toml").read_bytes()).hexdigest()[:12]
    venv = Path("/usr/local/lib/kata-ci") / f"test-user-venv-{key}"
    if not (venv / "bin" / "kata-ci").exists():
        subprocess.run(["/usr/bin/python3", "-m", "venv", str(venv)], check=True)
        subprocess.run([str(venv / "bin" / "pip"), "install", "-q",
                        "--disable-pip-version-check", "-e", str(REPO)], check=True)
    return venv


@pytest.fixture
def home() -> Iterator[Path]:
    root = Path(tempfile.mkdtemp(prefix="kci-user-", dir="/tmp"))
    os.chmod(root, 0o755)
    for name in ("home", "ws", "run"):
        (root / name).mkdir()
        os.chown(root / name, USER, USER)
    yield root
    shutil.rmtree(root, ignore_errors=True)


def test_ordinary_user_runs_a_job_and_nothing_runs_as_root(user_venv: Path, home: Path) -> None:
    """uid 4321 runs `kata-ci run`: the job sees itself as root, its file lands owned by
    4321, and every process of the run (QEMU, the file server) runs as 4321."""
    assert (paths.cache_dir() / "manifest.json").exists()  # root built and published images
    env = {"HOME": str(home / "home"), "PATH": "/usr/bin:/bin",
           "KATA_CI_RUN_DIR": str(home / "run")}
    argv = ["setpriv", "--reuid", str(USER), "--regid", str(USER), "--clear-groups",
            str(user_venv / "bin" / "kata-ci"), "run", "--",
            "sh", "-c", "id -u; touch made-by-job; sleep 4"]
    run = subprocess.Popen(argv, env=env, cwd=home / "ws", stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE)
    seen: dict[int, int] = {}
    while run.poll() is None:
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                # Ours: naming this test's folders (kata-ci, the file server's --shared-dir)
                # or working inside its run dir (QEMU names its sockets relative to it).
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
                cwd = os.readlink(f"/proc/{pid}/cwd")
                if str(home).encode() in cmdline or cwd.startswith(str(home / "run")):
                    seen[int(pid)] = os.stat(f"/proc/{pid}").st_uid
            except OSError:
                continue
        time.sleep(0.2)
    out, err = run.communicate()
    assert run.returncode == 0, err.decode()
    assert out.decode().split() == ["0"]
    assert (home / "ws" / "made-by-job").stat().st_uid == USER
    assert len(seen) >= 3 and set(seen.values()) == {USER}, seen  # kata-ci, virtiofsd, QEMU
