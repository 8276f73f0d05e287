"""`rules: if` expressions, case by case from GitLab's doc (ci/jobs/job_rules.md,
"CI/CD variable expressions")."""

from __future__ import annotations

import pytest

from kata_ci.runner.gitlab.expr import ExpressionError, evaluate

VARS = {"CI_COMMIT_BRANCH": "main", "CI_DEFAULT_BRANCH": "main", "EMPTY": "",
        "CI_COMMIT_MESSAGE": "Fix: [skip tests] please", "RE": "/^fea/", "TAG": "v1.2"}


@pytest.mark.parametrize(("expression", "expected"), [
    # "Compare a variable to a string": == and != with double or single quotes.
    ('$CI_COMMIT_BRANCH == "main"', True),
    ("$CI_COMMIT_BRANCH == 'dev'", False),
    ('$CI_COMMIT_BRANCH != "dev"', True),
    # "Compare two variables".
    ("$CI_COMMIT_BRANCH == $CI_DEFAULT_BRANCH", True),
    # "Check if a variable is defined": a bare variable is true when defined and not empty.
    ("$CI_COMMIT_BRANCH", True),
    ("$EMPTY", False),
    ("$UNDEFINED", False),
    # "Compare a variable to null": undefined equals null; ${VAR} form is the same variable.
    ("$UNDEFINED == null", True),
    ("${CI_COMMIT_BRANCH} != null", True),
    # "Regex pattern matches": =~ and !~, with the i flag.
    ("$CI_COMMIT_MESSAGE =~ /\\[skip tests\\]/", True),
    ("$TAG =~ /^V1/i", True),
    ("$TAG !~ /^v2/", True),
    # "Store the regex in a variable": the right side may be a variable holding /re/.
    ("'feature-x' =~ $RE", True),
    # "Join expressions together with && or ||", && binding tighter, parentheses grouping.
    ('$CI_COMMIT_BRANCH == "main" && $EMPTY', False),
    ('$EMPTY || $CI_COMMIT_BRANCH == "main"', True),
    ('$UNDEFINED && $EMPTY || $TAG', True),
    ('$UNDEFINED && ($EMPTY || $TAG)', False),
])
def test_expressions(expression: str, expected: bool) -> None:
    """Each documented operator evaluates as GitLab does."""
    assert evaluate(expression, VARS) is expected


@pytest.mark.parametrize("expression", ['$A == "x" &&', "($A", "$A === 'b'", "== $A"])
def test_malformed_expression_is_an_error_showing_it(expression: str) -> None:
    """An expression that does not parse is an error that shows the expression."""
    with pytest.raises(ExpressionError) as info:
        evaluate(expression, VARS)
    assert repr(expression) in str(info.value) or expression in str(info.value)
