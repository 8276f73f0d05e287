"""The GitHub runner provider's pure parts: [github] config, label-set matching, the webhook
signature (GitHub's published test vector) and the workflow_job payload checks."""

from __future__ import annotations

import hashlib
import hmac
import json
from pathlib import Path

import pytest

from kata_ci.errors import UserError
from kata_ci.runner.core import config as config_mod
from kata_ci.runner.github_runner.settings import GitHubConfig, LabelSet, parse
from kata_ci.runner.github_runner.webhook import parse as parse_payload
from kata_ci.runner.github_runner.webhook import signature_ok

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "github" / "webhooks"


def fixture(name: str) -> bytes:
    """GitHub's real payload examples (tests/fixtures/github/PROVENANCE.md)."""
    return (FIXTURES / name).read_bytes()


def test_signature_matches_githubs_published_test_vector() -> None:
    """GitHub's documented secret/payload/signature triple verifies; one changed byte in the
    body, the secret or the digest does not."""
    secret, body = b"It's a Secret to Everybody", b"Hello, World!"
    good = "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17"
    assert signature_ok(secret, body, good)
    assert not signature_ok(secret, b"Hello, World?", good)
    assert not signature_ok(b"It's a secret to everybody", body, good)
    assert not signature_ok(secret, body, good[:-1] + "f")


def test_signature_refuses_missing_and_other_algorithms() -> None:
    """No header, an empty one, the legacy sha1 form and a bare digest are all refused."""
    secret, body = b"k" * 20, b"{}"
    sha1 = "sha1=" + hmac.new(secret, body, hashlib.sha1).hexdigest()
    bare = hmac.new(secret, body, hashlib.sha256).hexdigest()
    for header in (None, "", sha1, bare, "sha512=" + bare):
        assert not signature_ok(secret, body, header), header


@pytest.mark.parametrize("name", ["workflow_job.queued.payload.json",
                                  "workflow_job.in_progress.payload.json",
                                  "workflow_job.completed.success.with-organization.payload.json",
                                  "workflow_job.completed.failure.with-organization.payload.json",
                                  "workflow_job.waiting.payload.json"])
def test_real_payloads_parse(name: str) -> None:
    """Each of GitHub's real workflow_job payload examples parses into the fields kata-ci
    uses, with its action, ids, repository and labels."""
    raw = json.loads(fixture(name))
    job = parse_payload(fixture(name))
    assert job.action == raw["action"] and job.id == raw["workflow_job"]["id"]
    assert job.repo == raw["repository"]["full_name"]
    assert job.labels == raw["workflow_job"]["labels"]


@pytest.mark.parametrize("mutate, why", [
    (lambda p: p.update(action="exploded"), "unknown action"),
    (lambda p: p["workflow_job"].update(labels="kata-ci"), "labels"),
    (lambda p: p["workflow_job"].update(labels=["x"] * 101), "labels"),
    (lambda p: p["workflow_job"].update(id="1"), "id"),
    (lambda p: p["workflow_job"].update(id=True), "id"),
    (lambda p: p["repository"].update(full_name="../../etc"), "full_name"),
    (lambda p: p.pop("workflow_job"), "missing"),
])
def test_malformed_payloads_are_refused_with_a_reason(mutate: object, why: str) -> None:
    """A payload with a wrong shape is a ValueError naming the field, never a crash later."""
    payload = json.loads(fixture("workflow_job.queued.payload.json"))
    mutate(payload)  # type: ignore[operator]
    with pytest.raises(ValueError, match=why):
        parse_payload(json.dumps(payload).encode())


def test_label_set_match_is_case_insensitive_with_implied_labels_and_smallest_wins() -> None:
    """runs-on [self-hosted, Linux, kata-ci] fits {kata-ci} and {kata-ci, big}: the smaller
    set serves it; [kata-ci, gpu] fits none."""
    small, big = LabelSet(("kata-ci",), "default"), LabelSet(("kata-ci", "big"), "big")
    config = GitHubConfig(org="o", label_sets=(big, small))
    assert config.label_set_for(["self-hosted", "Linux", "KATA-CI"]) == small
    assert config.label_set_for(["kata-ci", "big"]) == big
    assert config.label_set_for(["kata-ci", "gpu"]) is None
    assert config.label_set_for(["ubuntu-latest"]) is None


def test_config_parses_and_names_the_file_on_errors(tmp_path: Path) -> None:
    """A full [github] section loads; wrong keys and values are UserErrors naming the file
    and the key."""
    path = tmp_path / "config.toml"
    path.write_text('[github]\norg = "octo-org"\ntoken_file = "/t"\n'
                    '[[github.label_sets]]\nlabels = ["self-hosted", "kata-ci"]\n'
                    'label = "default"\nmax_runners = 3\n')
    cfg = config_mod.load(path)
    assert cfg.github.enabled and cfg.github.scopes() == ["org:octo-org"]
    assert cfg.github.label_sets[0].labels == ("kata-ci",)  # implied ones dropped
    for body, key in [('[github]\nbogus = 1\n', "github.bogus"),
                      ('[github]\nidle_timeout = "x"\n', "github.idle_timeout"),
                      ('[github]\nrepositories = ["../x"]\n', "github.repositories"),
                      ('[github]\norg = "o"\n[[github.label_sets]]\nlabels = ["self-hosted"]\n',
                       "label of its own"),
                      ('[github]\n[[github.label_sets]]\nlabels = ["k"]\n', "org or repo"),
                      ('[github]\norg = "o"\napp_id = 5\n[[github.label_sets]]\n'
                       'labels = ["k"]\n', "installation_id")]:
        path.write_text(body)
        with pytest.raises(UserError, match=key) as caught:
            config_mod.load(path)
        assert str(path) in str(caught.value)


def test_secrets_come_from_files_or_the_environment(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """The webhook secret and token are read from their file, else the environment; no
    webhook secret at all is a UserError saying how to set one."""
    secret = tmp_path / "secret"
    secret.write_text("from-a-file\n")
    assert GitHubConfig(webhook_secret_file=str(secret)).webhook_secret() == b"from-a-file"
    monkeypatch.setenv("KATA_CI_GITHUB_WEBHOOK_SECRET", "from-the-env")
    monkeypatch.setenv("KATA_CI_GITHUB_TOKEN", "ghs_env")
    assert GitHubConfig().webhook_secret() == b"from-the-env"
    assert GitHubConfig().token() == "ghs_env"
    monkeypatch.delenv("KATA_CI_GITHUB_WEBHOOK_SECRET")
    with pytest.raises(UserError, match="webhook_secret_file"):
        GitHubConfig().webhook_secret()
    with pytest.raises(UserError, match="nope"):
        GitHubConfig(token_file=str(tmp_path / "nope")).token()


def test_repo_scope_and_service() -> None:
    """Org runners serve the org's repositories; without an org, runners register per
    listed repository and other repositories are not served."""
    org = GitHubConfig(org="Octo-Org")
    assert org.serves_repo("octo-org/anything") and org.scope_of("octo-org/x") == "org:Octo-Org"
    repos = GitHubConfig(repositories=("a/b",))
    assert repos.serves_repo("A/B") and not repos.serves_repo("a/c")
    assert repos.scope_of("a/b") == "repo:a/b" and repos.scopes() == ["repo:a/b"]
    parse("x", {})  # an empty section is fine: GitHub is simply off
