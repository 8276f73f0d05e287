"""The shipped deployment files say what the daemon's guarantees depend on."""

from __future__ import annotations

import json
from pathlib import Path

import jinja2

from kata_ci.runner.core.config import load

ANSIBLE = Path(__file__).resolve().parents[2] / "ansible"


def test_shipped_redis_config_enables_aof_and_never_evicts() -> None:
    """Job state survives a Redis restart only with AOF; evicting a queued workspace loses it."""
    lines = (ANSIBLE / "files/redis-kata-ci.conf").read_text().splitlines()
    settings = dict(line.split(None, 1) for line in lines if line and not line.startswith("#"))
    assert settings["appendonly"] == "yes"
    assert settings["maxmemory-policy"] == "noeviction"


def test_worker_config_template_renders_to_a_valid_config(tmp_path: Path) -> None:
    """The ansible template renders (with label sizes and a GitLab runner) into a file
    `kata-ci worker` and `kata-ci gitlab run` accept."""
    env = jinja2.Environment(undefined=jinja2.StrictUndefined)
    env.filters["to_json"] = json.dumps
    text = env.from_string((ANSIBLE / "templates/config.toml.j2").read_text()).render(
        kata_ci_broker="redis://broker:6379/0", kata_ci_labels=["default", "big"],
        kata_ci_concurrency=2,
        kata_ci_label_sizes={"big": {"vcpus": 4, "memory_mib": 8192}},
        kata_ci_gitlab_runners=[{"url": "https://gitlab.example", "token": "glrt-x",
                                 "system_id": "s_0123456789ab", "id": 5, "label": "big"}],
        kata_ci_github={"org": "", "repositories": [], "app_id": 0, "installation_id": 0,
                        "label_sets": []})
    path = tmp_path / "config.toml"
    path.write_text(text)
    cfg = load(path)
    assert cfg.queue.labels == ["default", "big"] and cfg.queue.concurrency == 2
    assert cfg.labels == {"big": {"vcpus": 4, "memory_mib": 8192}}
    assert [(r.url, r.id, r.label) for r in cfg.gitlab.runners] == [
        ("https://gitlab.example", 5, "big")]


def test_worker_unit_runs_the_worker_with_the_managed_config() -> None:
    """systemd starts `kata-ci worker` on the file the playbook writes."""
    unit = (ANSIBLE / "files/kata-ci-worker.service").read_text()
    assert "kata-ci worker --config /etc/kata-ci/config.toml" in unit
    assert "dest: /etc/kata-ci/config.toml" in (ANSIBLE / "site.yml").read_text()


def test_gitlab_unit_runs_the_poller_on_the_managed_config() -> None:
    """systemd starts `kata-ci gitlab run` on the file the playbook writes, and may write
    only there (token rotation)."""
    unit = (ANSIBLE / "files/kata-ci-gitlab.service").read_text()
    assert "kata-ci gitlab run --config /etc/kata-ci/config.toml" in unit
    assert "ReadWritePaths=/etc/kata-ci" in unit and "ProtectSystem=strict" in unit


def test_config_template_renders_github_label_sets(tmp_path: Path) -> None:
    """With GitHub label sets, the rendered file has an App-authenticated [github] section
    whose sets map runs-on labels to kata-ci labels; `github serve` runs on that file."""
    env = jinja2.Environment(undefined=jinja2.StrictUndefined)
    env.filters["to_json"] = json.dumps
    text = env.from_string((ANSIBLE / "templates/config.toml.j2").read_text()).render(
        kata_ci_broker="redis://broker:6379/0", kata_ci_labels=["default", "big"],
        kata_ci_concurrency=2, kata_ci_label_sizes={}, kata_ci_gitlab_runners=[],
        kata_ci_github={"org": "octo-org", "repositories": ["octo-org/a"], "app_id": 7,
                        "installation_id": 9,
                        "label_sets": [{"labels": ["kata-ci"]},
                                       {"labels": ["kata-ci", "big"], "label": "big",
                                        "max_runners": 3}]})
    path = tmp_path / "config.toml"
    path.write_text(text)
    gh = load(path).github
    assert gh.org == "octo-org" and gh.app_id == 7 and gh.installation_id == 9
    assert [(s.labels, s.label, s.max_runners) for s in gh.label_sets] == [
        (("kata-ci",), "default", 10), (("kata-ci", "big"), "big", 3)]
    unit = (ANSIBLE / "files/kata-ci-github.service").read_text()
    assert "kata-ci github serve --config /etc/kata-ci/config.toml" in unit
    assert "files/kata-ci-github.service" in (ANSIBLE / "site.yml").read_text()
