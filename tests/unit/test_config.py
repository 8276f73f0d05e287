"""TOML configuration: defaults, overrides, and clear errors for bad files and values."""

from __future__ import annotations

from pathlib import Path

import pytest

from kata_ci.errors import UserError
from kata_ci.runner.core.config import load


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(text)
    return path


def test_values_from_file(tmp_path: Path) -> None:
    """Values in [vm] replace defaults; ints are accepted where seconds are floats."""
    cfg = load(write(tmp_path, "[vm]\nvcpus = 1\nmemory_mib = 512\ntimeout = 30\n"))
    assert (cfg.vm.vcpus, cfg.vm.memory_mib, cfg.vm.timeout) == (1, 512, 30.0)


def test_flags_override_file(tmp_path: Path) -> None:
    """A flag given on the command line wins over the file; flags not given do not."""
    cfg = load(write(tmp_path, "[vm]\nvcpus = 1\nmemory_mib = 512\n")).with_vm(
        vcpus=2, memory_mib=None)
    assert (cfg.vm.vcpus, cfg.vm.memory_mib) == (2, 512)


def test_missing_default_file_is_fine(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No config file at the default place means defaults, not an error."""
    monkeypatch.delenv("KATA_CI_CONFIG", raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    assert load().vm.vcpus == 2


def test_missing_explicit_file_is_an_error(tmp_path: Path) -> None:
    """--config naming a file that does not exist is reported, not ignored."""
    with pytest.raises(UserError, match="does not exist"):
        load(tmp_path / "nope.toml")


@pytest.mark.parametrize(("text", "message"), [
    ("[vm]\ncpus = 2\n", r"unknown key vm\.cpus"),
    ("[vmm]\n", r"unknown section\(s\) vmm"),
    ("[vm]\nvcpus = \"two\"\n", r"vm\.vcpus must be int, not str"),
    ("[vm]\nvcpus = true\n", r"vm\.vcpus must be int, not bool"),
    ("[vm]\nvcpus = 0\n", r"vcpus must be between"),
    ("[vm]\nmemory_mib = 64\n", r"memory_mib must be between"),
    ("[vm]\naccel = \"xen\"\n", r"accel must be one of"),
    ("[vm\n", r"config\.toml"),
])
def test_bad_files_name_file_and_key(tmp_path: Path, text: str, message: str) -> None:
    """Every bad config names the file and what is wrong with it."""
    path = write(tmp_path, text)
    with pytest.raises(UserError, match=message) as info:
        load(path)
    assert str(path) in str(info.value)


def test_bad_flag_values_are_rejected(tmp_path: Path) -> None:
    """A bad value given as a flag is reported as coming from the command line."""
    with pytest.raises(UserError, match="command line: timeout must be >= 0"):
        load(write(tmp_path, "")).with_vm(timeout=-1)


def test_queue_and_label_sizes(tmp_path: Path) -> None:
    """[queue] configures the daemon; [labels.NAME] sizes the VMs of jobs with that label."""
    cfg = load(write(tmp_path, '[queue]\nbroker = "redis://h:1/2"\nlabels = ["big", "x"]\n'
                               'concurrency = 2\n[labels.big]\nvcpus = 4\nmemory_mib = 4096\n'))
    assert (cfg.queue.broker, cfg.queue.labels, cfg.queue.concurrency) == (
        "redis://h:1/2", ["big", "x"], 2)
    assert cfg.labels == {"big": {"vcpus": 4, "memory_mib": 4096}}


def test_bad_label_size(tmp_path: Path) -> None:
    """A label table with an unknown key or an invalid size is refused, naming the label."""
    with pytest.raises(UserError, match=r"\[labels\.big\] may set only"):
        load(write(tmp_path, "[labels.big]\ndisk = 3\n"))
    with pytest.raises(UserError, match=r"\[labels\.big\].*memory_mib must be between"):
        load(write(tmp_path, "[labels.big]\nmemory_mib = 1\n"))
