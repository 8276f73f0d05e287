"""Workflow commands on a step's output, as GitHub's runner reads them (doc: "Workflow
commands for GitHub Actions", each section named in the docstrings)."""

from __future__ import annotations

from pathlib import Path

import pytest

from kata_ci.runner.core.command import Cancel
from kata_ci.runner.core.lifecycle import Session
from kata_ci.runner.core.secrets import GITHUB_MASK, Masker, MaskingSink
from kata_ci.runner.core.sinks import Stream
from kata_ci.runner.core.spec import Commands, JobSpec
from kata_ci.runner.github.commands import StepCommands, WorkflowCommands, parse


class Collect:
    def __init__(self) -> None:
        self.got = b""

    def write(self, stream: Stream, data: bytes) -> None:
        self.got += data


def process(tmp_path: Path, text: str, env: dict[str, str] | None = None,
            debug: bool = False, cut: int | None = None) -> tuple[str, StepCommands]:
    """``text`` as a step's stdout (split at ``cut``): what is shown, what was produced."""
    sink = Collect()
    masking = MaskingSink(sink, Masker(replacement=GITHUB_MASK))
    session = Session(JobSpec("j", Commands([]), {}, tmp_path), None,  # type: ignore[arg-type]
                      masking, Cancel())
    commands = WorkflowCommands(session, env, debug)
    data = text.encode()
    at = len(data) if cut is None else cut
    commands.write("stdout", data[:at])
    commands.write("stdout", data[at:])
    produced = commands.flush()
    masking.flush()
    return sink.got.decode(), produced


def test_set_output_is_a_step_output_with_a_deprecation_warning(tmp_path: Path) -> None:
    """"Setting an output parameter" (the deprecated ::set-output form): the value becomes a
    step output, with GitHub's deprecation warning; data escaping (%0A) is undone."""
    shown, produced = process(tmp_path, "::set-output name=list::a%0Ab\nafter\n")
    assert produced.outputs == {"list": "a\nb"}
    assert "`set-output` command is deprecated" in shown and "after\n" in shown
    assert "::set-output" not in shown


def test_set_env_and_add_path_refused_without_opt_in(tmp_path: Path) -> None:
    """"Setting an environment variable"/"Adding a system path" (the disabled commands):
    refused with GitHub's message and the step fails, unless
    ACTIONS_ALLOW_UNSECURE_COMMANDS is true."""
    shown, produced = process(tmp_path, "::set-env name=A::1\n::add-path::/opt/x\n")
    assert "The `set-env` command is disabled" in shown
    assert "The `add-path` command is disabled" in shown
    assert produced.env == {} and produced.path == [] and produced.failure
    shown, produced = process(tmp_path, "::set-env name=A::1\n::add-path::/opt/x\n",
                              {"ACTIONS_ALLOW_UNSECURE_COMMANDS": "true"})
    assert produced.env == {"A": "1"} and produced.path == ["/opt/x"] and not produced.failure


def test_set_env_refuses_node_options(tmp_path: Path) -> None:
    """"Setting an environment variable" (the runner's set-env block list): NODE_OPTIONS is
    not set; an error annotation in GitHub's words, the step is not failed."""
    _, produced = process(tmp_path, "::set-env name=node_options::--require x\n",
                          {"ACTIONS_ALLOW_UNSECURE_COMMANDS": "true"})
    assert produced.env == {} and not produced.failure
    assert produced.annotations == ["Error: Can't update NODE_OPTIONS environment variable "
                                    "using ::set-env:: command."]


def test_commands_without_a_name_fail_the_step(tmp_path: Path) -> None:
    """"Setting an output parameter" (set-output's required name property): without it the
    command fails the step with the runner's message, and sets nothing."""
    shown, produced = process(tmp_path, "::set-output::v\n")
    assert produced.outputs == {}
    assert produced.failure == "Required field 'name' is missing in ##[set-output] command."
    assert "Unable to process command '::set-output::v' successfully." in shown


def test_stop_commands_and_resume(tmp_path: Path) -> None:
    """"Stopping and starting workflow commands": between ::stop-commands::TOKEN and
    ::TOKEN:: command lines are plain output; after it, commands work again (both lines
    shown, as the runner echoes them)."""
    shown, produced = process(tmp_path, "::stop-commands::tok123\n::warning::plain\n"
                              "::set-output name=a::1\n::TOK123::\n::set-output name=b::2\n")
    assert "::warning::plain\n" in shown and "::set-output name=a::1\n" in shown
    assert produced.outputs == {"b": "2"} and produced.annotations == []
    assert "::stop-commands::tok123\n" in shown and "::TOK123::\n" in shown


@pytest.mark.parametrize("token", ["", "pause-logging", "add-mask", "Set-Output"])
def test_weak_stop_tokens_are_refused(tmp_path: Path, token: str) -> None:
    """"Stopping and starting workflow commands" (the runner's stop-token check): a token
    that is empty, pause-logging or a command's name is refused, commands go on being
    processed; ACTIONS_ALLOW_UNSECURE_STOPCOMMAND_TOKENS=true allows it."""
    text = f"::stop-commands::{token}\n::set-output name=a::1\n"
    _, produced = process(tmp_path, text)
    assert "You cannot use a endToken that is an empty string" in produced.failure
    assert produced.outputs == {"a": "1"}
    _, produced = process(tmp_path, text,
                          {"ACTIONS_ALLOW_UNSECURE_STOPCOMMAND_TOKENS": "true"})
    assert not produced.failure and produced.outputs == ({} if token else {"a": "1"})


def test_annotations_with_properties(tmp_path: Path) -> None:
    """"Setting a notice/warning/error message": shown, and kept for the summary with
    file, line, col and title (properties unescaped: %3A, %2C)."""
    shown, produced = process(tmp_path, "::error file=src/a%2Cb.py,line=4,col=2,"
                              "title=Bad%3A thing::it broke\n::notice::fyi\n")
    assert produced.annotations == ["Error: src/a,b.py:4:2: Bad: thing: it broke",
                                    "Notice: fyi"]
    assert "Error: src/a,b.py:4:2: Bad: thing: it broke\n" in shown


def test_annotations_are_masked(tmp_path: Path) -> None:
    """"Masking a value in a log": an annotation after ::add-mask:: is masked, as the log."""
    shown, produced = process(tmp_path, "::add-mask::hunter2-secret\n"
                              "::warning::leaked hunter2-secret\n")
    assert produced.annotations == ["Warning: leaked ***"]
    assert "hunter2-secret" not in shown


def test_debug_only_when_step_debug_is_on(tmp_path: Path) -> None:
    """"Setting a debug message": shown only with ACTIONS_STEP_DEBUG (debug logging)."""
    assert "hidden" not in process(tmp_path, "::debug::hidden\n")[0]
    assert "##[debug]shown" in process(tmp_path, "::debug::shown\n", debug=True)[0]


def test_groups_fold_in_the_terminal(tmp_path: Path) -> None:
    """"Grouping log lines": a `▸ title` header, the group's lines indented, then back."""
    for cut in range(0, 40, 3):
        shown, _ = process(tmp_path, "before\n::group::My title\ninside\n::endgroup::\nout\n",
                           cut=cut)
        assert shown == "before\n▸ My title\n  inside\nout\n", cut


@pytest.mark.parametrize("line", ["::", "::nope", "plain :: text", "::not a command::x",
                                  "::unknown-cmd::data"])
def test_lines_that_are_not_commands_pass_unchanged(tmp_path: Path, line: str) -> None:
    """"About workflow commands": only `::name props::data` lines of known commands are
    acted upon; everything else is ordinary output."""
    assert process(tmp_path, line + "\n")[0] == line + "\n"


def test_parse_forms() -> None:
    """"About workflow commands" (`::workflow-command parameter1={data},...::{command
    value}`): name, properties and data, with leading blanks allowed."""
    command = parse("  ::warning file=a.py,line=3::msg::with colons")
    assert command is not None and command.name == "warning"
    assert command.properties == {"file": "a.py", "line": "3"}
    assert command.data == "msg::with colons"


def test_annotation_ranges_and_property_case(tmp_path: Path) -> None:
    """"Setting an error message" (file, line, endLine, col, endColumn, title): a range is
    shown as file:line-endLine:col-endColumn; property names are case-insensitive, as the
    runner reads them; %0A in data is a newline."""
    _, produced = process(tmp_path, "::warning FILE=a.py,line=2,ENDLINE=5,col=1,endColumn=9"
                                    "::two%0Alines\n")
    assert produced.annotations == ["Warning: a.py:2-5:1-9: two\nlines"]


def test_add_path_repeated_moves_to_the_front(tmp_path: Path) -> None:
    """"Adding a system path" (opted in with ACTIONS_ALLOW_UNSECURE_COMMANDS): newest first,
    a repeated path moved to the front rather than listed twice; an empty one fails."""
    _, produced = process(tmp_path, "::add-path::/a\n::add-path::/b\n::add-path::/a\n",
                          {"ACTIONS_ALLOW_UNSECURE_COMMANDS": " True "})
    assert produced.path == ["/a", "/b"] and not produced.failure
    _, produced = process(tmp_path, "::add-path::\n", {"ACTIONS_ALLOW_UNSECURE_COMMANDS": "true"})
    assert produced.failure
