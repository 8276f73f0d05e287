"""GitHub Actions expressions, case by case from the docs (actions/learn-github-actions/
expressions and contexts)."""

from __future__ import annotations

import pytest

from kata_ci.runner.github.expr import ExpressionError, evaluate, render

CTX = {
    "github": {"event_name": "push", "ref": "refs/heads/main", "workspace": "/w"},
    "matrix": {"os": "ubuntu-latest", "version": 3.0},
    "steps": {"strings": {"outputs": {"build-output-dir": "/w/build"}}},
    "env": {"EMPTY": "", "LIST": '["a","b"]'},
    "needs": {"a": {"result": "success", "outputs": {"x": "1"}},
              "b": {"result": "failure", "outputs": {"x": "2"}}},
}


@pytest.mark.parametrize(("expression", "expected"), [
    # "Literals": null, booleans, numbers (incl. hex and exponent), single-quoted strings.
    ("null", None), ("true", True), ("0xff", 255.0), ("-2.5e1", -25.0),
    ("'It''s open'", "It's open"),
    # "Operators": == is loose and case-insensitive for strings.
    ("'ABC' == 'abc'", True),
    ("github.event_name == 'PUSH'", True),
    # different types compare as numbers: null is 0, true is 1, '' is 0.
    ("null == 0", True), ("true == 1", True), ("'' == 0", True), ("'2' == 2", True),
    ("'abc' == 0", False),  # NaN equals nothing
    ("1 < 2 && 'b' > 'A'", True),
    # && and || return operands (falsy: false, 0, '', null).
    ("env.EMPTY || 'default'", "default"),
    ("'x' && 'y'", "y"),
    ("!env.EMPTY", True),
    # "Contexts": property names are case-insensitive; missing ones are null.
    ("GitHub.Event_Name", "push"),
    ("github.nope", None),
    ("steps.strings.outputs.build-output-dir", "/w/build"),
    ("steps.strings.outputs['build-output-dir']", "/w/build"),
    ("needs.b.result", "failure"),
    # "Object filters": needs.*.result lists every job's result.
    ("contains(needs.*.result, 'failure')", True),
    # "Functions"
    ("contains('Hello world', 'WORLD')", True),
    ("contains(fromJSON(env.LIST), 'b')", True),
    ("startsWith(github.ref, 'refs/heads/')", True),
    ("endsWith('file.TXT', '.txt')", True),
    ("format('{0} {{1}} {1}', 'a', matrix.version)", "a {1} 3"),
    ("join(fromJSON(env.LIST), '+')", "a+b"),
    ("fromJSON('{\"n\": 1}').n", 1.0),
    ("toJSON(needs.a.outputs)", '{\n  "x": "1"\n}'),
])
def test_expressions(expression: str, expected: object) -> None:
    """Each documented rule evaluates as GitHub does."""
    assert evaluate(expression, CTX) == expected


def test_render_interpolates_into_text() -> None:
    """${{ }} inside a string is replaced by the value as text; numbers lose a trailing .0."""
    assert render("-B ${{ steps.strings.outputs.build-output-dir }} -DV=${{ matrix.version }}",
                  CTX) == "-B /w/build -DV=3"


def test_status_functions_come_from_the_runner() -> None:
    """success()/failure()/always()/cancelled() are the runner's, passed in per evaluation."""
    assert evaluate("failure() && needs.a.result == 'success'", CTX,
                    {"failure": lambda: True}) is True


@pytest.mark.parametrize("expression", ["github.", "contains('a'", "1 +", "nope()", "'open"])
def test_bad_expressions_show_the_expression(expression: str) -> None:
    """An expression that does not parse, or calls an unknown function, is an error showing it."""
    with pytest.raises(ExpressionError, match="expression"):
        evaluate(expression, CTX)
