"""One GitLab pipeline and one GitHub workflow that use most of the documented semantics of
issue 14 together, run for real: every job in its own VM."""

from __future__ import annotations

from pathlib import Path

from tests.e2e.conftest import kata_ci_run, leftovers
from tests.e2e.test_pipeline import summary

PIPELINE = """\
include:
  - local: ci/$TEMPLATES.yml
workflow:
  rules:
    - if: $CI_PIPELINE_SOURCE == "push"
      variables: {DEPLOY_ENV: staging}
    - when: never
stages: [build, test, deploy]
.setup:
  - echo "setup by reference"
.staging-rules:
  - if: $DEPLOY_ENV == "staging"
    variables: {GREETING: hello-staging}
default:
  before_script:
    - !reference [.setup]
build:
  stage: build
  script:
    - echo "status during script $CI_JOB_STATUS"
    - echo built > built.txt
test:
  extends: .tested
  parallel:
    matrix:
      - FLAVOUR: [a, b]
flaky:
  stage: test
  allow_failure: {exit_codes: [3]}
  rules:
    - if: $DEPLOY_ENV == "staging"
      allow_failure: true
  script: exit 4
greet:
  stage: deploy
  rules:
    - !reference [.staging-rules]
  needs: [build, {job: absent, optional: true}]
  script: echo "greeting $GREETING"
approve:
  stage: deploy
  when: manual
  script: echo approved
release:
  stage: deploy
  needs: [approve]
  script: echo released
"""

TEMPLATE = """\
.tested:
  stage: test
  script:
    - echo "node $CI_NODE_INDEX/$CI_NODE_TOTAL flavour $FLAVOUR from $(cat built.txt)"
"""

WORKFLOW = """\
on: push
jobs:
  plan:
    runs-on: ubuntu-latest
    outputs:
      targets: ${{ steps.t.outputs.targets }}
    steps:
      - id: t
        run: |
          echo '::set-output name=targets::["x","y"]'
          echo "::notice file=app.py,line=3::planned two targets"
          echo "::group::details"
          echo "inside the group"
          echo "::endgroup::"
          echo "::stop-commands::pause-token"
          echo "::warning::not a command while stopped"
          echo "::pause-token::"
  build:
    needs: plan
    runs-on: ${{ 'ubuntu-latest' }}
    strategy:
      matrix:
        target: ${{ fromJSON(needs.plan.outputs.targets) }}
    env:
      LABEL: ${{ matrix.target }}-built
    timeout-minutes: ${{ 5 }}
    continue-on-error: ${{ matrix.target == 'y' }}
    steps:
      - run: echo "building $LABEL"; test "${{ matrix.target }}" = x
  broken:
    runs-on: ubuntu-latest
    steps:
      - run: echo "::set-env name=SNEAKY::1"
  middle:
    needs: broken
    if: always()
    runs-on: ubuntu-latest
    steps:
      - run: echo "middle runs anyway"
  leaf:
    needs: middle
    runs-on: ubuntu-latest
    steps:
      - run: echo "leaf never runs"
"""


def test_gitlab_pipeline_with_rules_references_includes_and_manual_jobs(
        tmp_path: Path, cli_env: dict[str, str]) -> None:
    """include:local with a variable, workflow:rules:variables, !reference in rules and
    default, extends from the include, parallel:matrix with CI_NODE_*, CI_JOB_STATUS during
    script, rules:allow_failure over exit_codes, optional needs, and --manual: statuses and
    outputs as GitLab documents them; then the same file filtered out by workflow:rules."""
    (tmp_path / "ci").mkdir()
    (tmp_path / "ci" / "shared.yml").write_text(TEMPLATE)
    (tmp_path / ".gitlab-ci.yml").write_text(PIPELINE)
    result = kata_ci_run(["--pipeline", "--var", "TEMPLATES=shared", "--manual", "approve",
                          "-j", "2"], cli_env, tmp_path, timeout=900)
    assert result.returncode == 0, result.stderr.decode()
    assert summary(result.stderr) == {
        "build": "success", "test: [a]": "success", "test: [b]": "success",
        "flaky": "warning", "greet": "success", "approve": "success", "release": "success"}, \
        result.stderr.decode()
    out = result.stdout.decode()
    for line in ("[build] status during script running", "[build] setup by reference",
                 "[test: [a]] node 1/2 flavour a from built",
                 "[test: [b]] node 2/2 flavour b from built",
                 "[greet] greeting hello-staging", "[release] released"):
        assert line in out, line
    filtered = kata_ci_run(["--pipeline", "--var", "TEMPLATES=shared", "--event",
                            "schedule"], cli_env, tmp_path)
    assert filtered.returncode == 2
    assert b"filtered out by workflow rules" in filtered.stderr, filtered.stderr
    assert leftovers(cli_env) == []


def test_github_workflow_with_dynamic_matrix_commands_and_ancestor_failure(
        tmp_path: Path, cli_env: dict[str, str]) -> None:
    """A matrix from needs.*.outputs via fromJSON, expressions in runs-on, env,
    timeout-minutes and continue-on-error, workflow commands (set-output, notice, group,
    stop-commands, a refused set-env), and a job skipped because an ancestor (not its direct
    need) failed; exit 1 (broken)."""
    (tmp_path / ".github" / "workflows").mkdir(parents=True)
    (tmp_path / ".github" / "workflows" / "ci.yml").write_text(WORKFLOW)
    result = kata_ci_run(["--pipeline", "-j", "2"], cli_env, tmp_path, timeout=900)
    assert result.returncode == 1, result.stderr.decode()
    assert summary(result.stderr) == {
        "plan": "success", "build (x)": "success", "build (y)": "warning",
        "broken": "failed", "middle": "success", "leaf": "skipped"}, result.stderr.decode()
    out, err = result.stdout.decode(), result.stderr.decode()
    for line in ("[build (x)] building x-built", "[build (y)] building y-built",
                 "inside the group", "::warning::not a command while stopped",
                 "[middle] middle runs anyway"):
        assert line in out, line
    assert "leaf never runs" not in out
    assert "`set-env` command is disabled" in out + err
    assert "app.py:3" in err and "planned two targets" in err  # the annotation in the summary
    assert leftovers(cli_env) == []
