"""GitLab CI ``rules: if`` expressions (doc: ci/jobs/job_rules.md, "CI/CD variable expressions").

    $VAR                 true when defined and not empty
    $VAR == "value"      string equality (also !=); `null` compares with undefined
    $VAR =~ /regex/      regex match (also !~); the right side may be a variable holding /re/
    a && b, a || b, ( )  && binds tighter than ||
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

from kata_ci.errors import UserError

_TOKEN = re.compile(r"""
    \s*(?:
      (?P<var>\$\{?[A-Za-z_][A-Za-z0-9_]*\}?)
    | "(?P<dq>(?:[^"\\]|\\.)*)"
    | '(?P<sq>[^']*)'
    | /(?P<re>(?:[^/\\]|\\.)*)/(?P<flags>[a-z]*)
    | (?P<op>==|!=|=~|!~|&&|\|\||\(|\))
    | (?P<null>null)\b
    )""", re.VERBOSE)


@dataclass(frozen=True)
class _Operand:
    kind: str  # var | str | re | null
    value: str
    flags: str = ""


class ExpressionError(UserError):
    pass


def evaluate(expression: str, variables: Mapping[str, str]) -> bool:
    tokens = _tokenize(expression)
    parser = _Parser(tokens, variables, expression)
    result = parser.or_expr()
    if parser.pos != len(tokens):
        raise ExpressionError(f"cannot parse rules:if expression {expression!r}: "
                              f"unexpected {tokens[parser.pos]!r}")
    return result


def _tokenize(text: str) -> list[str | _Operand]:
    tokens: list[str | _Operand] = []
    pos = 0
    while pos < len(text):
        if text[pos:].strip() == "":
            break
        match = _TOKEN.match(text, pos)
        if not match or match.end() == pos:
            raise ExpressionError(f"cannot parse rules:if expression {text!r} at {text[pos:]!r}")
        pos = match.end()
        if match.group("var"):
            tokens.append(_Operand("var", match.group("var").strip("${}")))
        elif match.group("dq") is not None:
            tokens.append(_Operand("str", re.sub(r"\\(.)", r"\1", match.group("dq"))))
        elif match.group("sq") is not None:
            tokens.append(_Operand("str", match.group("sq")))
        elif match.group("re") is not None:
            tokens.append(_Operand("re", match.group("re"), match.group("flags")))
        elif match.group("null"):
            tokens.append(_Operand("null", ""))
        else:
            tokens.append(match.group("op"))
    return tokens


class _Parser:
    def __init__(self, tokens: list[str | _Operand], variables: Mapping[str, str],
                 text: str) -> None:
        self.tokens = tokens
        self.vars = variables
        self.text = text
        self.pos = 0

    def _peek(self) -> str | _Operand | None:
        return self.tokens[self.pos] if self.pos < len(self.tokens) else None

    def or_expr(self) -> bool:
        result = self.and_expr()
        while self._peek() == "||":
            self.pos += 1
            right = self.and_expr()
            result = result or right
        return result

    def and_expr(self) -> bool:
        result = self.primary()
        while self._peek() == "&&":
            self.pos += 1
            right = self.primary()
            result = result and right
        return result

    def primary(self) -> bool:
        token = self._peek()
        if token == "(":
            self.pos += 1
            result = self.or_expr()
            if self._peek() != ")":
                raise ExpressionError(f"missing ')' in rules:if expression {self.text!r}")
            self.pos += 1
            return result
        left = self._operand()
        op = self._peek()
        if op not in ("==", "!=", "=~", "!~"):
            return self._truthy(left)
        self.pos += 1
        right = self._operand()
        if op in ("==", "!="):
            equal = self._value(left) == self._value(right)
            return equal if op == "==" else not equal
        pattern, flags = self._regex(right)
        found = re.search(pattern, self._value(left) or "",
                          re.IGNORECASE if "i" in flags else 0) is not None
        return found if op == "=~" else not found

    def _operand(self) -> _Operand:
        token = self._peek()
        if not isinstance(token, _Operand):
            raise ExpressionError(f"expected a variable, string or regex in rules:if "
                                  f"expression {self.text!r}, got {token!r}")
        self.pos += 1
        return token

    def _value(self, operand: _Operand) -> str | None:
        if operand.kind == "var":
            return self.vars.get(operand.value)
        return None if operand.kind == "null" else operand.value

    def _truthy(self, operand: _Operand) -> bool:
        return bool(self._value(operand))

    def _regex(self, operand: _Operand) -> tuple[str, str]:
        if operand.kind == "re":
            return operand.value, operand.flags
        text = self._value(operand) or ""
        match = re.fullmatch(r"/(.*)/([a-z]*)", text)
        if not match:
            raise ExpressionError(f"right side of =~ must be a /regex/ in {self.text!r}")
        return match.group(1), match.group(2)
