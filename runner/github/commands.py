"""Workflow commands on a step's output, as GitHub's runner reads them (doc: actions/reference/
workflows-and-actions/workflow-commands): a line `::name key=value,key=value::data`.

- `::add-mask::V` masks V for the rest of the job; the line is never shown.
- `::set-output name=N::V` sets a step output (deprecated: a warning, as GitHub prints).
- `::set-env name=N::V` and `::add-path::P` only with ACTIONS_ALLOW_UNSECURE_COMMANDS=true in
  the step's environment; otherwise refused with GitHub's message, and the step fails.
- `::stop-commands::TOKEN` ... `::TOKEN::`: lines in between are plain output.
- `::debug::M` shown only when ACTIONS_STEP_DEBUG is true; `::notice::`, `::warning::`,
  `::error::` (file, line, endLine, col, endColumn, title) are shown and kept as annotations
  for the run's summary (masked like the log).
- `::group::T` / `::endgroup::` fold in the terminal: a `▸ T` header, the lines indented.

A job controls its output, so only the start of a line that may still become a command is
held back, bounded; every other byte passes at once.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from kata_ci.runner.core.lifecycle import Session
from kata_ci.runner.core.secrets import MIN_SECRET_BYTES
from kata_ci.runner.core.sinks import Stream

HOLD_LIMIT = 64 << 10  # a longer would-be command line: an add-mask is dropped, else shown
_PIECES = re.compile(rb"[^\n]*\n|[^\n]+")
LEVELS = {"notice": "Notice", "warning": "Warning", "error": "Error"}
UNSECURE = ("The `{0}` command is disabled. Please upgrade to using Environment Files or opt "
            "into unsecure command execution by setting the `ACTIONS_ALLOW_UNSECURE_COMMANDS` "
            "environment variable to `true`. For more information see: https://github.blog/"
            "changelog/2020-10-01-github-actions-deprecating-set-env-and-add-path-commands/")
DEPRECATED = ("The `{0}` command is deprecated and will be disabled soon. Please upgrade to "
              "using Environment Files. For more information see: https://github.blog/"
              "changelog/2022-10-11-github-actions-deprecating-save-state-and-set-output-"
              "commands/")
STOP_TOKEN = ("You cannot use a endToken that is an empty string, the string 'pause-logging', "
              "or another workflow command. For more information see: https://docs.github.com/"
              "actions/learn-github-actions/workflow-commands-for-github-actions#example-"
              "stopping-and-starting-workflow-commands or opt into insecure command execution "
              "by setting the `ACTIONS_ALLOW_UNSECURE_STOPCOMMAND_TOKENS` environment variable "
              "to `true`.")
RESERVED_ENV = {"NODE_OPTIONS"}  # GitHub's runner refuses these from set-env / $GITHUB_ENV


def unescape_data(text: str) -> str:
    return text.replace("%0D", "\r").replace("%0A", "\n").replace("%25", "%")


def unescape_property(text: str) -> str:
    return (text.replace("%0D", "\r").replace("%0A", "\n").replace("%3A", ":")
            .replace("%2C", ",").replace("%25", "%"))


@dataclass
class Command:
    name: str
    properties: dict[str, str]
    data: str


def parse(line: str) -> Command | None:
    """``line`` (one line, no newline) as a command, or None if it is not one. Blanks
    before it are allowed; blanks after it belong to the data, as the runner's TrimStart."""
    text = line.lstrip()
    if not text.startswith("::"):
        return None
    end = text.find("::", 2)
    if end < 0:
        return None
    head, data = text[2:end], text[end + 2:]
    name, _, props = head.partition(" ")
    if not name or not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
        return None
    properties = {}
    for item in filter(None, props.split(",")):
        key, sep, value = item.partition("=")
        if sep:
            # the runner's property names are case-insensitive (endLine, endline)
            properties[key.strip().lower()] = unescape_property(value)
    return Command(name, properties, unescape_data(data))


def _could_be(line: bytes) -> bool | None:
    """True: starts as a command; None: may still become one; False: cannot."""
    head = line.lstrip(b" \t")
    return True if head.startswith(b"::") else None if head in (b"", b":") else False


@dataclass
class StepCommands:
    """What one step's commands produced, for the step's record and the job's state."""

    outputs: dict[str, str] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)
    path: list[str] = field(default_factory=list)
    annotations: list[str] = field(default_factory=list)
    failure: str = ""  # a refused command: the step fails with this


class WorkflowCommands:
    """A step's output on its way to the job's (masking) sink, commands acted upon."""

    def __init__(self, session: Session, env: Mapping[str, str] | None = None,
                 debug: bool = False) -> None:
        self.session = session
        env = env or {}
        # read as the runner's bool.TryParse: case-insensitive, blanks around allowed
        self.unsecure = env.get("ACTIONS_ALLOW_UNSECURE_COMMANDS", "").strip().lower() == "true"
        self.weak_tokens = \
            env.get("ACTIONS_ALLOW_UNSECURE_STOPCOMMAND_TOKENS", "").strip().lower() == "true"
        self.debug = debug
        self.result = StepCommands()
        self.stop_token = ""
        self.grouped = False
        self.held: dict[Stream, bytes] = {}  # a line's start that may be a command
        self.mid_line: set[Stream] = set()  # inside a line already passed on
        self.dropping: set[Stream] = set()  # inside an over-long add-mask line

    def write(self, stream: Stream, data: bytes) -> None:
        for piece in _PIECES.findall(data):
            ends = piece.endswith(b"\n")
            if stream in self.dropping or stream in self.mid_line:
                if stream in self.mid_line:
                    self._show(stream, piece, start=False)
                if ends:
                    self.dropping.discard(stream)
                    self.mid_line.discard(stream)
                continue
            line = self.held.pop(stream, b"") + piece
            could = _could_be(line)
            if could is False or (could is None and ends):
                self._show(stream, line)
                if not ends:
                    self.mid_line.add(stream)
            elif ends:
                self._line(stream, line)
            elif len(line) > HOLD_LIMIT:
                if line.lstrip(b" \t")[:12].lower() == b"::add-mask::":
                    self.dropping.add(stream)
                    self.session.note(f"warning: an ::add-mask:: line longer than "
                                      f"{HOLD_LIMIT} bytes was dropped")
                else:
                    self._show(stream, line)
                    self.mid_line.add(stream)
            else:
                self.held[stream] = line

    def flush(self) -> StepCommands:
        """The step's output ended: a last line without a newline is complete now."""
        held, self.held = self.held, {}
        self.mid_line.clear()
        self.dropping.clear()
        for stream, line in held.items():
            self._line(stream, line)
        return self.result

    def _show(self, stream: Stream, data: bytes, start: bool = True) -> None:
        if self.grouped and start:
            data = b"  " + data
        self.session.sink.write(stream, data)

    def _say(self, stream: Stream, text: str) -> None:
        self._show(stream, text.encode() + b"\n")

    def _line(self, stream: Stream, raw: bytes) -> None:
        text = raw.decode(errors="replace").rstrip("\r\n")
        command = parse(text)
        if command is not None and self.stop_token:
            # the runner resumes on the token as a command name, case-insensitively, and
            # shows the line; anything else is plain output while stopped
            if command.name.lower() == self.stop_token.lower():
                self.stop_token = ""
                self._show(stream, raw)
                return
            command = None
        if command is None:
            self._show(stream, raw)
            return
        handler = getattr(self, "_" + command.name.lower().replace("-", "_"), None)
        if handler is None or command.name.lower() not in COMMANDS:
            self._show(stream, raw)  # not a command GitHub knows: ordinary output
            return
        handler(stream, command, text)

    def _add_mask(self, stream: Stream, command: Command, text: str) -> None:
        # blanks around the value are not masked themselves: the value without them is, a
        # superset of its occurrences (the runner keeps them; masking more is safe)
        value = command.data.strip()
        if not value:
            self._say(stream, "Warning: Can't add secret mask for empty string in ##[add-mask] "
                              "command.")
        elif not self.session.add_mask(value):
            self.session.note(f"warning: an ::add-mask:: value shorter than "
                              f"{MIN_SECRET_BYTES} bytes is not masked")

    def _stop_commands(self, stream: Stream, command: Command, text: str) -> None:
        """A token that is empty, `pause-logging` or a command's name would let ordinary
        output resume (or never stop) processing: refused unless opted in, as the runner's
        ValidateStopToken does; processing then goes on."""
        token = command.data
        if not token or token.lower() == "pause-logging" or token.lower() in COMMANDS:
            if not self.weak_tokens:
                self._refuse(stream, text, STOP_TOKEN)
                return
            self._say(stream, "Warning: " + STOP_TOKEN)
        self._show(stream, text.encode() + b"\n")
        self.stop_token = token

    def _set_output(self, stream: Stream, command: Command, text: str) -> None:
        self._say(stream, "Warning: " + DEPRECATED.format("set-output"))
        if self._named(stream, command, text):
            self.result.outputs[command.properties["name"]] = command.data

    def _save_state(self, stream: Stream, command: Command, text: str) -> None:
        """State is for an action's post step; kata-ci runs no actions: only checked."""
        self._say(stream, "Warning: " + DEPRECATED.format("save-state"))
        self._named(stream, command, text)

    def _named(self, stream: Stream, command: Command, text: str) -> bool:
        if command.properties.get("name"):
            return True
        self._refuse(stream, text, f"Required field 'name' is missing in ##[{command.name}] "
                                   "command.")
        return False

    def _set_env(self, stream: Stream, command: Command, text: str) -> None:
        if not self._unsecure_allowed(stream, command, text) or \
                not self._named(stream, command, text):
            return
        name = command.properties["name"]
        if name.upper() in RESERVED_ENV:
            # the runner adds an error annotation and ignores the command; the step goes on
            self._annotation(f"Error: Can't update {name.upper()} environment variable using "
                             "::set-env:: command.", stream)
            return
        self.result.env[name] = command.data

    def _add_path(self, stream: Stream, command: Command, text: str) -> None:
        if not self._unsecure_allowed(stream, command, text):
            return
        if not command.data:
            self._refuse(stream, text, "Value cannot be null or empty: path")
            return
        if command.data in self.result.path:  # the runner moves a repeated path to the front
            self.result.path.remove(command.data)
        self.result.path.insert(0, command.data)

    def _unsecure_allowed(self, stream: Stream, command: Command, text: str) -> bool:
        if not self.unsecure:
            self._refuse(stream, text, UNSECURE.format(command.name))
        return self.unsecure

    def _refuse(self, stream: Stream, text: str, why: str) -> None:
        self._say(stream, f"Error: Unable to process command '{text.strip()}' successfully.")
        self._say(stream, f"Error: {why}")
        self.result.failure = self.result.failure or why

    def _debug(self, stream: Stream, command: Command, text: str) -> None:
        if self.debug:
            self._say(stream, f"##[debug]{command.data}")

    def _annotate(self, stream: Stream, command: Command, text: str) -> None:
        props = command.properties
        level = LEVELS[command.name.lower()]
        where = props.get("file", "")
        if where and props.get("line"):  # file:line[-endLine][:col[-endColumn]]
            where += f":{props['line']}"
            if props.get("endline") and props["endline"] != props["line"]:
                where += f"-{props['endline']}"
            if props.get("col"):
                where += f":{props['col']}" + (f"-{props['endcolumn']}"
                                               if props.get("endcolumn") else "")
        message = (f"{props['title']}: " if props.get("title") else "") + command.data
        self._annotation(f"{level}: " + (f"{where}: " if where else "") + message, stream)

    def _annotation(self, shown: str, stream: Stream) -> None:
        self._say(stream, shown)
        # masked now, as the log is: the summary is printed on the host
        self.result.annotations.append(self._masked(shown))

    _notice = _warning = _error = _annotate

    def _group(self, stream: Stream, command: Command, text: str) -> None:
        self.grouped = False
        self._say(stream, f"▸ {command.data}")
        self.grouped = True

    def _endgroup(self, stream: Stream, command: Command, text: str) -> None:
        self.grouped = False

    def _echo(self, stream: Stream, command: Command, text: str) -> None:
        """::echo::on|off only changes how GitHub logs commands; nothing to do here."""

    def _masked(self, text: str) -> str:
        masker = getattr(self.session.sink, "masker", None)
        return masker.mask_text(text) if masker is not None else text


COMMANDS = {"add-mask", "stop-commands", "set-output", "save-state", "set-env", "add-path",
            "debug", "notice", "warning", "error", "group", "endgroup", "echo"}
