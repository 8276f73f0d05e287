"""Secret masking: every masked form, values split across chunks, overlapping secrets, the
held-back tail, refused short values, and where secrets enter a job from each source."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from pathlib import Path
from urllib.parse import quote

import pytest

from kata_ci.errors import UserError
from kata_ci.runner.core.command import Cancel
from kata_ci.runner.core.lifecycle import Session
from kata_ci.runner.core.secrets import (
    GITHUB_MASK,
    GITLAB_MASK,
    Masker,
    MaskingSink,
    parse_secrets,
)
from kata_ci.runner.core.sinks import Stream
from kata_ci.runner.core.spec import Commands, JobSpec, RunSettings
from kata_ci.runner.github.commands import WorkflowCommands
from kata_ci.runner.github.expr import render
from kata_ci.runner.github.jobs import GitHubPlan, github_context
from kata_ci.runner.github.jobs import select as select_gh
from kata_ci.runner.github.steps import JobState, RunContext, contexts
from kata_ci.runner.github.workflow import load_workflow
from kata_ci.runner.gitlab.ci_file import CIError, load
from kata_ci.runner.gitlab.jobs import GitLabPlan, predefined_variables
from kata_ci.runner.gitlab.jobs import select as select_gl

SECRET = 's3cr3t/p@ss "q" %é'  # characters that URL and JSON encode differently
OTHER = "0therSecretValue"
KATA_CI = [sys.executable, "-m", "kata_ci.runner.cli"]


class Collect:
    """A LogSink keeping what reached it, per stream."""

    def __init__(self) -> None:
        self.got: dict[Stream, bytes] = {}

    def write(self, stream: Stream, data: bytes) -> None:
        self.got[stream] = self.got.get(stream, b"") + data


def shown(chunks: list[bytes], *secrets: str, mask: str = GITLAB_MASK) -> bytes:
    sink = Collect()
    masking = MaskingSink(sink, Masker(secrets, mask))
    for chunk in chunks:
        masking.write("stdout", chunk)
    masking.flush()
    return sink.got.get("stdout", b"")


def b64_cases() -> list[tuple[bytes, int]]:
    """The secret base64-encoded inside longer texts: every alignment, with and without
    something after it (`base64(user:secret\\n)`); with how many characters of it may stay
    visible: those of the bytes around, two that mix their bits with the secret's, padding."""
    return [(base64.b64encode(prefix + SECRET.encode() + suffix),
             -(-8 * len(prefix) // 6) + -(-8 * len(suffix) // 6) + 2 + 2)
            for prefix in (b"", b"u", b"us", b"use", b"user:")
            for suffix in (b"", b"\n", b"xy", b"xyz")]


def b64_texts() -> list[bytes]:
    return [text for text, _ in b64_cases()]


def test_each_masked_form_is_masked() -> None:
    """The plain value, its base64 at every alignment and with trailing text, its URL
    encoding and its JSON escape are all masked."""
    plain = [SECRET.encode(), quote(SECRET, safe="").encode(),
             json.dumps(SECRET)[1:-1].encode(), json.dumps(SECRET, ensure_ascii=False)[1:-1]
             .encode()]
    masker = Masker([SECRET])
    for text in plain:
        assert masker.mask(b"<" + text + b">") == b"<[MASKED]>", text
    for text, around in b64_cases():
        out = masker.mask(b"<" + text + b">")
        assert out.count(GITLAB_MASK.encode()) == 1, text
        assert len(out) - len(GITLAB_MASK) - 2 <= around, (text, out)


def test_every_split_point_of_every_form() -> None:
    """A form cut into two chunks (at every byte) or three is masked as if whole."""
    masker = Masker([SECRET])
    for text in [SECRET.encode(), quote(SECRET, safe="").encode(), *b64_texts()[:6]]:
        line = b"before " + text + b" after\n"
        whole = masker.mask(line)
        for cut in range(len(line) + 1):
            assert shown([line[:cut], line[cut:]], SECRET) == whole, (text, cut)
        for cut in range(1, len(line) - 1, 3):
            assert shown([line[:cut], line[cut:cut + 2], line[cut + 2:]], SECRET) == whole


def test_overlapping_and_nested_secrets() -> None:
    """Two secrets sharing bytes are masked as one stretch (neither shows a part of the
    other); a secret that is the start of a longer one does not leave that one's tail."""
    assert shown([b"xxabcdefgh12345678yy"], "abcdefgh1234", "gh12345678") == b"xx[MASKED]yy"
    for cut in range(1, 20):
        text = b"xxabcdefgh12345678yy"
        assert shown([text[:cut], text[cut:]], "abcdefgh1234", "gh12345678") == b"xx[MASKED]yy"
        text = b"-abcdefghij-"
        assert shown([text[:cut], text[cut:]], "abcdefgh", "abcdefghij") == b"-[MASKED]-"


def test_only_a_possible_start_is_held_and_flush_releases_it() -> None:
    """Output that cannot begin a secret passes at once; a tail that could is held back,
    then released unmasked at flush when the secret never completed."""
    sink = Collect()
    masking = MaskingSink(sink, Masker([OTHER]))
    masking.write("stdout", b"progress 10%\n")
    assert sink.got["stdout"] == b"progress 10%\n"
    masking.write("stdout", b"prompt: 0ther")
    assert sink.got["stdout"] == b"progress 10%\nprompt: "
    masking.write("stderr", b"elsewhere\n")  # streams are held apart
    assert sink.got["stderr"] == b"elsewhere\n"
    masking.flush()
    assert sink.got["stdout"] == b"progress 10%\nprompt: 0ther"


def test_replacement_text_and_run_time_mask() -> None:
    """GitHub's `***` replaces as GitLab's [MASKED] does; a value added later is masked in
    what follows, and a secret-free masker holds nothing back."""
    assert shown([f"a {OTHER} b".encode()], OTHER, mask=GITHUB_MASK) == b"a *** b"
    assert shown([b"0the"]) == b"0the"
    sink = Collect()
    masking = MaskingSink(sink, Masker())
    masking.write("stdout", b"x0th")
    assert sink.got["stdout"] == b"x0th"  # no secret yet: nothing to hold back for
    assert masking.add(OTHER) and not masking.add("short")
    masking.write("stdout", f"erSecretValue {OTHER}\n".encode())
    masking.flush()
    assert sink.got["stdout"] == b"x0therSecretValue [MASKED]\n"


def test_multiline_secret_lines_are_masked_alone() -> None:
    """Each line of a multi-line secret (a key file) is masked even when printed apart."""
    key = "-----BEGIN KEY-----\nMIIEvQIBADANBgkqhkiG9w0BAQ\n-----END KEY-----"
    out = Masker([key]).mask(b"line: MIIEvQIBADANBgkqhkiG9w0BAQ\n")
    assert out == b"line: [MASKED]\n"


def test_short_values_are_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A value under 8 bytes is refused by --secret, a JobSpec and a masked CI variable (with
    its file and line), and not registered by the Masker."""
    monkeypatch.setenv("SHORT", "abc")
    with pytest.raises(UserError, match="--secret SHORT: the value is 3 bytes"):
        parse_secrets(["SHORT"], tmp_path)
    with pytest.raises(UserError, match="secret S is 3 bytes"):
        JobSpec("j", Commands([]), {}, tmp_path, secrets={"S": "abc"})
    assert not Masker().add("1234567")
    ci = tmp_path / ".gitlab-ci.yml"
    ci.write_text("job:\n  script: [true]\n  variables:\n    T: {value: abc, masked: true}\n")
    with pytest.raises(CIError, match=rf"{ci}:1: variable T is masked but its value is 3"):
        load(ci, tmp_path, {})


def test_secret_sources(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """--secret NAME reads the host environment, NAME=@FILE a file (one newline dropped);
    NAME=VALUE (argv is public), a missing variable and a missing file are clear errors."""
    monkeypatch.setenv("TOKEN", OTHER)
    (tmp_path / "key").write_text("file-secret-value\n")
    assert parse_secrets(["TOKEN", f"KEY=@{tmp_path / 'key'}"], tmp_path) == {
        "TOKEN": OTHER, "KEY": "file-secret-value"}
    with pytest.raises(UserError, match="shows in every process list"):
        parse_secrets(["TOKEN=inline-value"], tmp_path)
    monkeypatch.delenv("TOKEN")
    with pytest.raises(UserError, match="no environment variable TOKEN"):
        parse_secrets(["TOKEN"], tmp_path)
    with pytest.raises(UserError, match="--secret KEY: "):
        parse_secrets([f"KEY=@{tmp_path / 'absent'}"], tmp_path)


def test_secret_file_in_the_workspace_is_read_beneath_it(tmp_path: Path) -> None:
    """--secret K=@f where a job made f in the checkout a link to a host file: refused, and
    the host file's content appears nowhere in the error."""
    host = tmp_path / "host-only"
    host.write_text("host-file-content-9d2\n")
    workspace = tmp_path / "ws"
    workspace.mkdir()
    (workspace / "key").symlink_to(host)
    with pytest.raises(UserError) as caught:
        parse_secrets([f"KEY=@{workspace / 'key'}"], workspace)
    assert "leaving the workspace" in str(caught.value)
    assert "host-file-content" not in str(caught.value)


def test_cli_secret_errors_are_one_line(tmp_path: Path) -> None:
    """`kata-ci run --secret` with a missing variable or an inline value exits 2 with one
    line and no traceback, before any VM starts."""
    env = {k: v for k, v in os.environ.items() if k != "NOPE_SECRET"}
    env["KATA_CI_RUN_DIR"] = str(tmp_path / "run")
    for arg in ("NOPE_SECRET", "NOPE_SECRET=value1234"):
        result = subprocess.run([*KATA_CI, "run", "--secret", arg, "--", "true"], env=env,
                                capture_output=True, text=True, cwd=tmp_path, timeout=60)
        assert result.returncode == 2, result.stderr
        assert "--secret NOPE_SECRET" in result.stderr and "Traceback" not in result.stderr
        assert not (tmp_path / "run").exists()


def test_gitlab_masked_variables_and_secrets(tmp_path: Path) -> None:
    """A `masked: true` variable and every --secret are in the job's env and its secrets,
    masked with [MASKED]; a job's own unmasked redefinition is not masked."""
    ci = tmp_path / ".gitlab-ci.yml"
    ci.write_text("variables:\n  PASS: {value: hunter2hunter2, masked: true}\n"
                  "  PLAIN: {value: visible, masked: false}\n"
                  "a:\n  script: [true]\n"
                  "b:\n  script: [true]\n  variables:\n    PASS: redefined\n")
    predefined = predefined_variables(tmp_path)
    pipeline = load(ci, tmp_path, predefined)
    settings = RunSettings(secrets={"TOKEN": OTHER})
    plan = GitLabPlan(pipeline, select_gl(pipeline, [], False), tmp_path, predefined, {},
                      settings)
    a, b = plan.spec(pipeline.job("a")), plan.spec(pipeline.job("b"))
    assert a.env["PASS"] == "hunter2hunter2" and a.env["TOKEN"] == OTHER
    assert a.secrets == {"TOKEN": OTHER, "PASS": "hunter2hunter2"} and a.mask == GITLAB_MASK
    assert b.secrets == {"TOKEN": OTHER} and b.env["PLAIN"] == "visible"


def test_github_secrets_context_and_mask(tmp_path: Path) -> None:
    """${{ secrets.NAME }} renders a --secret; a GitHub job masks with *** and does not get
    the secret in its environment unless a step asks for it."""
    path = tmp_path / "ci.yml"
    path.write_text("on: push\njobs:\n  j:\n    runs-on: ubuntu-latest\n"
                    "    steps:\n      - run: echo ${{ secrets.TOKEN }}\n")
    wf = load_workflow(path)
    github = github_context(predefined_variables(tmp_path), "push", wf, tmp_path)
    rc = RunContext(wf, tmp_path, github, {}, Cancel(), {"TOKEN": OTHER})
    job = select_gh(wf, [], False)[0]
    assert render("${{ secrets.TOKEN }}", contexts(job, JobState(), rc)) == OTHER
    spec = GitHubPlan(wf, [job], rc, RunSettings(secrets={"TOKEN": OTHER})).spec(job)
    assert spec.secrets == {"TOKEN": OTHER} and spec.mask == GITHUB_MASK
    assert OTHER not in spec.env.values()


def test_add_mask_command_registers_and_is_never_shown(tmp_path: Path) -> None:
    """`::add-mask::VALUE` (split anywhere across chunks; leading blanks and any letter case,
    as on GitHub) masks VALUE in the rest of the job and its own line never reaches the log;
    other lines pass unchanged."""
    value = "run-time-value%0Asecond-line"  # GitHub escaping: a newline inside
    text = (f"start\n::add-mask::{value}\nnow run-time-value\n::add\n"
            f"tail ::add-mask::x\n  ::ADD-MASK::blanks-and-case \nsee blanks-and-case\n"
            f"::add-mask::late-registered").encode()
    for cut in range(len(text) + 1):
        sink = Collect()
        masking = MaskingSink(sink, Masker(replacement=GITHUB_MASK))
        session = Session(JobSpec("j", Commands([]), {}, tmp_path), None,  # type: ignore[arg-type]
                          masking, Cancel())
        commands = WorkflowCommands(session)
        commands.write("stdout", text[:cut])
        commands.write("stdout", text[cut:])
        commands.flush()
        masking.write("stdout", b" late-registered\n")
        masking.flush()
        assert sink.got["stdout"] == (b"start\nnow ***\n::add\ntail ::add-mask::x\nsee ***\n"
                                      b" ***\n"), cut
