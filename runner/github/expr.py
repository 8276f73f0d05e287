"""GitHub Actions expressions, `${{ ... }}` (doc: actions/learn-github-actions/expressions).

Values are None, bool, float, str, list, dict. As documented:
- `==`/`!=`/`<`… compare loosely: different types are converted to numbers (null 0, bools
  1/0, strings parsed, '' is 0, else NaN); strings compare case-insensitively.
- `&&`/`||` return one of their operands; falsy are false, 0, -0, '', null and NaN.
- property names are case-insensitive; a missing property is null; `a.*.b` filters.
- functions: contains, startsWith, endsWith, format, join, toJSON, fromJSON, hashFiles and the
  status functions success, always, cancelled, failure.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Collection, Mapping
from typing import Any

from kata_ci.errors import UserError

_TOKEN = re.compile(r"""\s*(?:
    (?P<num>-?(?:0x[0-9a-fA-F]+|\d+(?:\.\d+)?(?:[eE][+-]?\d+)?))
  | '(?P<str>(?:[^']|'')*)'
  | (?P<id>[A-Za-z_][A-Za-z0-9_-]*)
  | (?P<op>==|!=|<=|>=|&&|\|\||[()\[\].!<>,*])
  )""", re.VERBOSE)
_EMBED = re.compile(r"\$\{\{(.*?)\}\}", re.DOTALL)


MAX_EXPRESSION = 21_000  # GitHub: an expression's result and text are bounded likewise


class ExpressionError(UserError):
    pass


Functions = Mapping[str, Callable[..., Any]]


def to_number(value: Any) -> float:
    if value is None:
        return 0.0
    if isinstance(value, bool):
        return 1.0 if value else 0.0
    if isinstance(value, (int, float)):  # YAML gives ints (a matrix value `7`)
        return float(value)
    if isinstance(value, str):
        text = value.strip()
        if text == "":
            return 0.0
        try:
            return float(int(text, 16)) if text.lower().startswith("0x") else float(text)
        except ValueError:
            return math.nan
    return math.nan


def truthy(value: Any) -> bool:
    if isinstance(value, float):
        return not (value == 0 or math.isnan(value))
    return value not in (None, False, "")


def to_string(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return str(int(value)) if value.is_integer() else repr(value)
    if isinstance(value, (list, dict)):
        return "Array" if isinstance(value, list) else "Object"
    return str(value)


def _compare(left: Any, right: Any) -> tuple[Any, Any]:
    if isinstance(left, str) and isinstance(right, str):
        return left.lower(), right.lower()
    if type(left) is type(right) and not isinstance(left, (list, dict)):
        return left, right
    return to_number(left), to_number(right)


def _equal(left: Any, right: Any) -> bool:
    if isinstance(left, (list, dict)) or isinstance(right, (list, dict)):
        return left is right
    a, b = _compare(left, right)
    return bool(a == b)


def _get(value: Any, key: Any) -> Any:
    if isinstance(value, dict):
        if key in value:
            return value[key]
        lowered = str(key).lower()
        return next((v for k, v in value.items() if str(k).lower() == lowered), None)
    if isinstance(value, list) and isinstance(key, float) and key.is_integer():
        index = int(key)
        return value[index] if 0 <= index < len(value) else None
    return None


def _format(template: str, *args: Any) -> str:
    def sub(match: re.Match[str]) -> str:
        if match.group(0) in ("{{", "}}"):
            return match.group(0)[0]
        index = int(match.group(1))
        if index >= len(args):
            raise ExpressionError(f"format: no argument {{{index}}} for {template!r}")
        return to_string(args[index])
    return re.sub(r"\{\{|\}\}|\{(\d+)\}", sub, template)


BUILTINS: dict[str, Callable[..., Any]] = {
    "contains": lambda s, i: any(_equal(x, i) for x in s) if isinstance(s, list)
    else to_string(i).lower() in to_string(s).lower(),
    "startswith": lambda s, p: to_string(s).lower().startswith(to_string(p).lower()),
    "endswith": lambda s, p: to_string(s).lower().endswith(to_string(p).lower()),
    "format": lambda t, *a: _format(to_string(t), *a),
    "join": lambda a, sep=",": to_string(sep).join(map(to_string, a))
    if isinstance(a, list) else to_string(a),
    "tojson": lambda v: json.dumps(_whole_numbers(v), indent=2),
    "fromjson": lambda s: _from_json(to_string(s)),
}


def _from_json(text: str) -> Any:
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise ExpressionError(f"fromJSON: not JSON: {text!r} ({exc})") from None
    return _numbers_as_float(value)


def _whole_numbers(value: Any) -> Any:
    """Numbers as toJSON prints them: a whole number without `.0` (GitHub's `toJSON(1)` is
    `1`; every number here is a float, as in GitHub's expressions)."""
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e16:
        return int(value)
    if isinstance(value, list):
        return [_whole_numbers(v) for v in value]
    if isinstance(value, dict):
        return {k: _whole_numbers(v) for k, v in value.items()}
    return value


def _numbers_as_float(value: Any) -> Any:
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, list):
        return [_numbers_as_float(v) for v in value]
    return {k: _numbers_as_float(v) for k, v in value.items()}


def evaluate(text: str, contexts: Mapping[str, Any], functions: Functions | None = None) -> Any:
    if len(text) > MAX_EXPRESSION:
        raise ExpressionError(f"an expression longer than {MAX_EXPRESSION} characters")
    parser = _Parser(text, contexts, {**BUILTINS, **{k.lower(): v for k, v in
                                                      (functions or {}).items()}})
    try:
        value = parser.or_()
    except RecursionError:
        raise ExpressionError(f"expression nests too deeply: {text[:80]!r}") from None
    if parser.pos != len(parser.tokens):
        raise ExpressionError(f"cannot parse expression {text!r}: unexpected "
                              f"{parser.tokens[parser.pos][1]!r}")
    return value


def evaluate_tree(value: Any, contexts: Mapping[str, Any]) -> Any:
    """A YAML value with expressions in it, evaluated (a matrix, a container): a string that
    is one whole `${{ }}` becomes the expression's value, of any type (an array spliced in
    from fromJSON); other strings have their expressions rendered as text; keys likewise."""
    if isinstance(value, str):
        whole = re.fullmatch(r"\s*\$\{\{(.*?)\}\}\s*", value, re.DOTALL)
        if whole and "${{" not in whole.group(1):
            return evaluate(whole.group(1), contexts)
        return render(value, contexts)
    if isinstance(value, dict):
        return {render(str(k), contexts): evaluate_tree(v, contexts) for k, v in value.items()}
    if isinstance(value, list):
        return [evaluate_tree(v, contexts) for v in value]
    return value


STATUS = ("success", "failure", "always", "cancelled")


def parse(text: str, allowed: Collection[str] | None = None) -> None:
    """Whether ``text`` is an expression (ExpressionError if not), without its contexts:
    every context is empty and every known function returns null, so only the syntax, the
    function names and their argument counts are checked; with ``allowed``, also that it
    names only those contexts (GitHub's "Unrecognized named-value" where the
    context-availability table does not offer one)."""
    if len(text) > MAX_EXPRESSION:
        raise ExpressionError(f"an expression longer than {MAX_EXPRESSION} characters")
    stubs = {name: (lambda *args: None) for name in [*BUILTINS, *STATUS, "hashfiles"]}
    parser = _Parser(text, {}, stubs)
    parser.allowed = None if allowed is None else {a.lower() for a in allowed}
    try:
        parser.or_()
    except RecursionError:
        raise ExpressionError(f"expression nests too deeply: {text[:80]!r}") from None
    if parser.pos != len(parser.tokens):
        raise ExpressionError(f"cannot parse expression {text!r}: unexpected "
                              f"{parser.tokens[parser.pos][1]!r}")


def render(text: str, contexts: Mapping[str, Any], functions: Functions | None = None) -> str:
    """Replace every ${{ expr }} inside a string by the expression's value as text."""
    return _EMBED.sub(lambda m: to_string(evaluate(m.group(1), contexts, functions)), text)


def uses_status_function(text: str) -> bool:
    return re.search(r"\b(success|failure|always|cancelled)\s*\(", text, re.I) is not None


class _Parser:
    def __init__(self, text: str, contexts: Mapping[str, Any], functions: Functions) -> None:
        self.text = text
        self.contexts = {k.lower(): v for k, v in contexts.items()}
        self.functions = functions
        self.tokens: list[tuple[str, Any]] = []
        self.starts: list[int] = []  # each token's offset in text, for messages
        self.allowed: set[str] | None = None  # contexts the field may name (parse only)
        pos = 0
        while pos < len(text):
            if not text[pos:].strip():
                break
            match = _TOKEN.match(text, pos)
            if not match:
                raise ExpressionError(f"cannot parse expression {text!r} at {text[pos:]!r}")
            self.starts.append(match.start(match.lastgroup or 0))
            pos = match.end()
            kind = match.lastgroup or ""
            value: Any = match.group(kind)
            if kind == "num":
                value = to_number(value)
            elif kind == "str":
                value = value.replace("''", "'")
            self.tokens.append((kind, value))
        self.pos = 0

    def _indent(self) -> int:
        return len(self.text) - len(self.text.lstrip())

    def _peek(self, *ops: str) -> bool:
        return self.pos < len(self.tokens) and self.tokens[self.pos] in [("op", o) for o in ops]

    def _expect(self, op: str) -> None:
        if not self._peek(op):
            raise ExpressionError(f"cannot parse expression {self.text!r}: expected {op!r}")
        self.pos += 1

    def or_(self) -> Any:
        value = self.and_()
        while self._peek("||"):
            self.pos += 1
            right = self.and_()
            value = value if truthy(value) else right
        return value

    def and_(self) -> Any:
        value = self.equality()
        while self._peek("&&"):
            self.pos += 1
            right = self.equality()
            value = right if truthy(value) else value
        return value

    def equality(self) -> Any:
        value = self.relation()
        while self._peek("==", "!="):
            op = self.tokens[self.pos][1]
            self.pos += 1
            same = _equal(value, self.relation())
            value = same if op == "==" else not same
        return value

    def relation(self) -> Any:
        value = self.unary()
        while self._peek("<", "<=", ">", ">="):
            op = self.tokens[self.pos][1]
            self.pos += 1
            a, b = _compare(value, self.unary())
            try:
                value = {"<": a < b, "<=": a <= b, ">": a > b, ">=": a >= b}[op]
            except TypeError:
                value = False
        return value

    def unary(self) -> Any:
        if self._peek("!"):
            self.pos += 1
            return not truthy(self.unary())
        return self.postfix(self.primary())

    def primary(self) -> Any:
        if self.pos >= len(self.tokens):
            raise ExpressionError(f"cannot parse expression {self.text!r}: unexpected end")
        kind, value = self.tokens[self.pos]
        self.pos += 1
        if kind in ("num", "str"):
            return value
        if (kind, value) == ("op", "("):
            inner = self.or_()
            self._expect(")")
            return inner
        if kind == "id":
            name = value.lower()
            if name in ("true", "false"):
                return name == "true"
            if name == "null":
                return None
            if self._peek("("):
                return self.call(name)
            if self.allowed is not None and name not in self.allowed:
                at = self.starts[self.pos - 1] + 1 - self._indent()
                raise ExpressionError(f"Unrecognized named-value: '{value}'. Located at "
                                      f"position {at} within expression: "
                                      f"{self.text.strip()}")
            return self.contexts.get(name)
        raise ExpressionError(f"cannot parse expression {self.text!r}: unexpected {value!r}")

    def call(self, name: str) -> Any:
        self._expect("(")
        args = []
        if not self._peek(")"):
            args.append(self.or_())
            while self._peek(","):
                self.pos += 1
                args.append(self.or_())
        self._expect(")")
        if name not in self.functions:
            raise ExpressionError(f"unknown function {name}() in expression {self.text!r}")
        try:
            return self.functions[name](*args)
        except ExpressionError:
            raise
        except (TypeError, ValueError, OverflowError, RecursionError) as exc:
            raise ExpressionError(f"{name}(): {exc} in expression {self.text!r}") from None

    def postfix(self, value: Any) -> Any:
        while self._peek(".", "["):
            if self._peek("."):
                self.pos += 1
                if self._peek("*"):
                    self.pos += 1
                    value = list(value.values()) if isinstance(value, dict) else \
                        value if isinstance(value, list) else []
                    continue
                kind, key = self.tokens[self.pos] if self.pos < len(self.tokens) else ("", "")
                if kind != "id":
                    raise ExpressionError(f"cannot parse expression {self.text!r}: "
                                          "expected a property name after '.'")
                self.pos += 1
                value = [_get(v, key) for v in value] if isinstance(value, list) \
                    and key not in ("length",) else _get(value, key)
            else:
                self.pos += 1
                key = self.or_()
                self._expect("]")
                value = _get(value, key)
        return value
