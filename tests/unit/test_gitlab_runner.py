"""kata-ci as a GitLab runner, the parts without a network: payloads, variables, masking,
the config file, failure reasons."""

from __future__ import annotations

import copy
import json
import os
import stat
from pathlib import Path
from typing import Any

import pytest

from kata_ci.errors import UserError
from kata_ci.runner.core import config as config_mod
from kata_ci.runner.core.sinks import Stream
from kata_ci.runner.gitlab_runner import settings
from kata_ci.runner.gitlab_runner.api import FEATURES
from kata_ci.runner.gitlab_runner.follow import failure_reason
from kata_ci.runner.gitlab_runner.masking import PrefixMaskingSink
from kata_ci.runner.gitlab_runner.payload import parse_job
from kata_ci.runner.gitlab_runner.poller import parse_time
from kata_ci.runner.gitlab_runner.steps import guest_project_dir, variables

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "gitlab"  # PROVENANCE.md


def _fixture(name: str = "jobs_request.201.gitlab-spec-reconstructed.json") -> dict[str, Any]:
    return dict(json.loads((FIXTURES / name).read_text()))


class Collect:
    def __init__(self) -> None:
        self.out = b""

    def write(self, stream: Stream, data: bytes) -> None:
        self.out += data


def test_the_documented_payload_parses_into_steps_caches_and_artifacts() -> None:
    """GitLab's own payload shape (fixture) becomes typed steps, cache, artifacts, git info
    with the credentials taken out of the repository URL."""
    job = parse_job(_fixture())
    assert job.id == 1001 and job.token == "job-token-1001"
    assert [s.name for s in job.steps] == ["script", "after_script"]
    assert job.steps[1].when == "always" and job.steps[1].allow_failure
    assert job.caches[0].key == "cache_key-non_protected" and job.caches[0].policy == "pull-push"
    assert job.artifacts[0].paths == ["out/"] and job.artifacts[0].expire_in == "7d"
    assert job.git.repo_url == "http://gitlab.example.com/group/kata-sample.git"
    assert "job-token" not in job.git.repo_url and job.git.depth == 20
    assert "script_failure" in job.failure_reasons and job.image == "image:1.0"


def test_the_runners_own_test_payload_parses() -> None:
    """The payload gitlab-runner's network tests serve parses as well."""
    job = parse_job(_fixture("jobs_request.201.runner-network-test.json"))
    assert job.id > 0 and job.steps


@pytest.mark.parametrize("field,value", [
    (("git_info", "refspecs"), ["--upload-pack=touch /tmp/x"]),
    (("git_info", "refspecs"), ["+refs/heads/x:refs/remotes/origin/x", "-c"]),
    (("git_info", "sha"), "--output=/etc/passwd"),
    (("git_info", "repo_url"), "ext::sh -c touch% /tmp/pwned"),
    (("git_info", "repo_url"), "file:///etc"),
    (("git_info", "repo_url"), "http://[::1/x.git"),
    (("git_info", "repo_url"), "http://host:99999/x.git"),
    (("variables",), [{"key": "A B", "value": "x"}]),
    (("steps",), [{"name": "../x", "script": ["true"]}]),
    (("steps",), [{"name": "script", "script": "not a list"}]),
    (("cache",), [{"key": "k", "policy": "sometimes"}]),
    (("id",), True),
])
def test_a_payload_that_could_become_an_option_or_protocol_is_refused(
        field: tuple[str, ...], value: Any) -> None:
    """Refspecs, sha and URL reach host git: anything but GitLab's forms is refused, as are
    wrong types, with a message naming the field."""
    raw = copy.deepcopy(_fixture())
    target = raw
    for key in field[:-1]:
        target = target[key]
    target[field[-1]] = value
    with pytest.raises(UserError, match="GitLab job payload"):
        parse_job(raw)


def test_variables_expand_unless_raw_and_file_variables_become_guest_files() -> None:
    """$VAR/${VAR} expand from earlier variables; raw ones stay literal; file variables are
    files in the guest whose path is the value; masked values are collected."""
    raw = _fixture()
    raw["variables"] = [
        {"key": "BASE", "value": "/opt"},
        {"key": "EXPANDED", "value": "${BASE}/bin:$BASE/lib $$HOME"},
        {"key": "RAW", "value": "$BASE", "raw": True},
        {"key": "KEYFILE", "value": "secret-material-123", "file": True, "masked": True},
    ]
    found = variables(parse_job(raw), {"CI_PROJECT_DIR": "/builds/p"})
    assert found.env["EXPANDED"] == "/opt/bin:/opt/lib $HOME"
    assert found.env["RAW"] == "$BASE"
    assert found.env["KEYFILE"] == "/run/kata-ci/variables/KEYFILE"
    assert found.files == {"/run/kata-ci/variables/KEYFILE": b"secret-material-123"}
    assert found.masked == {"KEYFILE": "secret-material-123"}
    assert found.env["CI_PROJECT_DIR"] == "/builds/p"


def test_the_runners_own_variables_win_over_the_jobs() -> None:
    """A job cannot move its own project dir by setting CI_PROJECT_DIR."""
    raw = _fixture()
    raw["variables"] = [{"key": "CI_PROJECT_DIR", "value": "/etc"}]
    found = variables(parse_job(raw), {"CI_PROJECT_DIR": "/builds/p"})
    assert found.env["CI_PROJECT_DIR"] == "/builds/p"


@pytest.mark.parametrize("path,expected", [
    ("group/sub/project", "/builds/group/sub/project"),
    ("../../etc", "/builds/project"),
    ("group/.hidden", "/builds/project"),
    ("a\nb/c", "/builds/project"),
])
def test_the_guest_project_dir_is_the_project_path_only_when_plain(path: str,
                                                                    expected: str) -> None:
    """/builds/<namespace>/<project> as GitLab's runners do; anything odd becomes
    /builds/project instead of a path the guest init would resolve."""
    raw = _fixture()
    raw["job_info"]["project_full_path"] = path
    assert guest_project_dir(parse_job(raw)) == expected


def test_prefixed_tokens_are_masked_even_split_across_chunks() -> None:
    """glpat-... printed in pieces leaves the host only as glpat-[MASKED]; a configured
    prefix works the same; plain text passes at once."""
    sink = Collect()
    masking = PrefixMaskingSink(sink, ["mycorp_"])
    masking.write("stdout", b"token gl")
    masking.write("stdout", b"pat-abc")
    assert b"abc" not in sink.out
    masking.write("stdout", b"DEF123 done\nkey mycorp_s3cr3tvalue\n")
    masking.write("stdout", b"plain text")
    assert sink.out == b"token glpat-[MASKED] done\nkey mycorp_[MASKED]\nplain text"
    masking.flush()
    assert sink.out.endswith(b"plain text")


def test_a_token_held_back_at_the_end_is_masked_on_flush() -> None:
    """A token at the very end of the output is released masked when the job ends."""
    sink = Collect()
    masking = PrefixMaskingSink(sink)
    masking.write("stderr", b"glrt-abcdef")
    assert sink.out == b""
    masking.flush()
    assert sink.out == b"glrt-[MASKED]"


def test_failure_reasons_follow_the_runners_compatibility_rule() -> None:
    """The always-supported reasons go as they are; others only if the job lists them."""
    assert failure_reason("script_failure", []) == "script_failure"
    assert failure_reason("job_canceled", []) == "unknown_failure"
    assert failure_reason("job_canceled", ["job_canceled"]) == "job_canceled"


def test_announced_features_are_exactly_what_is_implemented() -> None:
    """Image (with its executor_opts), services (variables, several aliases), the two-phase
    commit and graceful cancel are announced; interactive sessions are not (GitLab then
    keeps such jobs from us)."""
    assert FEATURES["two_phase_job_commit"] and FEATURES["cancel_gracefully"]
    assert FEATURES["image"] and FEATURES["image_executor_opts"] and FEATURES["services"]
    assert FEATURES["service_multiple_aliases"] and not FEATURES["terminal"]
    assert FEATURES["artifacts_exclude"] and FEATURES["return_exit_code"]


def test_register_writes_a_0600_config_that_keeps_comments_and_loads(tmp_path: Path) -> None:
    """add_runner keeps the operator's file and comments, writes 0600 (it holds tokens);
    update_token swaps the token in place; the result loads as typed config."""
    path = tmp_path / "config.toml"
    path.write_text("# my comment\n[vm]\nvcpus = 2\n")
    runner = settings.GitLabRunner(url="https://gl.example", token="glrt-aaaaaaaaaaaa",
                                   system_id="s_0123456789ab", id=7, label="default",
                                   token_obtained_at=1000.0, token_expires_at=2000.0)
    settings.add_runner(path, runner)
    settings.add_runner(path, runner)  # again: replaced, not duplicated
    assert "# my comment" in path.read_text()
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    cfg = config_mod.load(path)
    assert cfg.gitlab.runners == [runner]
    assert runner.rotate_at() == 1750.0
    new = settings.update_token(path, runner, "glrt-bbbbbbbbbbbb", 3000.0, 4000.0)
    assert config_mod.load(path).gitlab.runners == [new]


def test_a_broken_gitlab_section_is_a_clear_error(tmp_path: Path) -> None:
    """A runner without a token, a bad system id or an unknown key names file and key."""
    path = tmp_path / "config.toml"
    for body, message in [
        ('[[gitlab.runners]]\nurl = "https://x"\nsystem_id = "s_0123456789ab"\n', "lacks token"),
        ('[[gitlab.runners]]\nurl = "https://x"\ntoken = "t"\nsystem_id = "x"\n', "system_id"),
        ('[gitlab]\nbogus = 1\n', "unknown key"),
        ('[[gitlab.runners]]\nurl = 5\ntoken = "t"\nsystem_id = "s_0123456789ab"\n', "url"),
    ]:
        path.write_text(body)
        with pytest.raises(UserError, match=message):
            config_mod.load(path)


def test_gitlab_times_parse() -> None:
    """token_expires_at in GitLab's ISO form; nothing or junk is 'no expiry'."""
    assert parse_time("2021-09-27T21:05:03.203Z") == pytest.approx(1632776703.203)
    assert parse_time(None) == 0.0 and parse_time("soon") == 0.0


def test_variables_that_double_at_each_step_stop_the_job_not_the_worker() -> None:
    """`V2: $V1$V1`, `V3: $V2$V2`...: expansion past 1 MiB for one or 16 MiB in all is the
    job's error, before the worker's memory goes."""
    raw = _fixture()
    raw["variables"] = [{"key": "V0", "value": "x" * 1000}] + [
        {"key": f"V{i}", "value": f"$V{i - 1}$V{i - 1}"} for i in range(1, 40)]
    with pytest.raises(UserError, match="expands to more than"):
        variables(parse_job(raw), {})


def test_a_fallback_key_may_not_reach_a_protected_cache(tmp_path: Path) -> None:
    """CACHE_FALLBACK_KEY=<key>-protected from an unprotected job is ignored with a warning:
    GitLab's suffixes keep protected branches' caches apart."""
    from kata_ci.runner.gitlab_runner import execute, files

    root, ws = tmp_path / "cache", tmp_path / "ws"
    ws.mkdir()
    secret = files.cache_path(root, 7, "release-protected")
    secret.parent.mkdir(parents=True)
    secret.write_bytes(b"PK\x05\x06" + b"\0" * 18)  # an empty zip
    raw = _fixture()
    raw["cache"] = [{"key": "mine-non_protected", "paths": ["x"], "policy": "pull"}]
    sink = Collect()
    execute._restore_caches(parse_job(raw), root, ws,
                            {"CACHE_FALLBACK_KEY": "release-protected"}, sink,
                            config_mod.Config())
    assert b"may not name a protected cache" in sink.out
    assert b"release-protected" not in sink.out.replace(b"protected cache", b"")
