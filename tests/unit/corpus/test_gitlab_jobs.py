"""GitLab jobs as GitLab documents them: needs (optional, cross-project, excluded jobs),
rules:variables/needs/allow_failure, workflow:rules, manual jobs, parallel names, predefined
variables. Each case is an example of the doc section its docstring names."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner

from kata_ci.errors import UserError
from kata_ci.runner.cli.app import main
from kata_ci.runner.core.command import Cancel
from kata_ci.runner.core.outcome import JobStatus
from kata_ci.runner.core.schedule import JobResult
from kata_ci.runner.core.spec import JobSpec, RunSettings
from kata_ci.runner.gitlab.ci_file import CIError, Pipeline, load, slug
from kata_ci.runner.gitlab.jobs import GitLabPlan, predefined_variables, schedule, select

MAIN = {"CI_COMMIT_BRANCH": "main", "CI_DEFAULT_BRANCH": "main", "CI_COMMIT_REF_NAME": "main",
        "CI_PIPELINE_SOURCE": "push"}


def pipeline(tmp_path: Path, text: str, variables: dict[str, str] | None = None) -> Pipeline:
    (tmp_path / ".gitlab-ci.yml").write_text(text)
    return load(tmp_path / ".gitlab-ci.yml", tmp_path, {**MAIN, **(variables or {})})


def names(jobs: list) -> list[str]:  # type: ignore[type-arg]
    return [j.name for j in jobs]


def test_needs_optional_drops_an_excluded_job(tmp_path: Path) -> None:
    """ci/yaml "needs:optional": a needed job that rules left out is ignored when optional."""
    p = pipeline(tmp_path, "a: {script: [x], rules: [{if: $NOPE}]}\n"
                 "b: {script: [x], needs: [{job: a, optional: true}]}\n")
    assert names(p.jobs) == ["b"] and p.job("b").needs == []


def test_needs_on_an_excluded_job_is_gitlabs_error(tmp_path: Path) -> None:
    """ci/yaml "needs:optional": without optional, needing a job rules excluded is an error
    with GitLab's wording, naming both jobs."""
    with pytest.raises(CIError, match=r"'b' job needs 'a' job, but 'a' does not exist in the "
                                      r"pipeline.*use needs:optional"):
        pipeline(tmp_path, "a: {script: [x], rules: [{if: $NOPE}]}\n"
                 "b: {script: [x], needs: [a]}\n")


def test_cross_project_needs_are_skipped_with_a_note(tmp_path: Path) -> None:
    """ci/yaml "needs:project" and "needs:pipeline:job": another pipeline's job cannot be
    met locally; the need is noted and skipped, the file still loads."""
    p = pipeline(tmp_path, "b: {script: [x], needs: [{project: grp/lib, job: build, "
                 "ref: main, artifacts: true}, {pipeline: $PARENT_PIPELINE_ID, job: gen}]}\n")
    assert p.job("b").needs == []
    assert any("project grp/lib" in n for n in p.job("b").notes)
    assert any("pipeline $PARENT_PIPELINE_ID" in n for n in p.job("b").notes)


def test_run_job_without_needs_runs_earlier_stages_first(tmp_path: Path) -> None:
    """ci/yaml "stages": a job without needs starts after every job of earlier stages, so
    `kata-ci run deploy` also runs build and test (but not later stages or manual jobs)."""
    p = pipeline(tmp_path, "build: {stage: build, script: [x]}\n"
                 "test: {stage: test, script: [x]}\nmanual: {stage: test, script: [x], "
                 "when: manual}\ndeploy: {stage: deploy, script: [x]}\n"
                 "post: {stage: .post, script: [x]}\n")
    assert names(select(p, ["deploy"], False)) == ["build", "test", "deploy"]
    assert names(select(p, ["deploy"], True)) == ["deploy"]


def test_rules_variables_win_over_job_variables(tmp_path: Path) -> None:
    """job_rules.md "rules:variables": the matching rule's variables override the job's."""
    p = pipeline(tmp_path, "job:\n  variables: {A: job, B: job}\n  script: [x]\n  rules:\n"
                 "    - if: $CI_COMMIT_BRANCH == 'main'\n      variables: {A: rule}\n")
    assert p.job("job").variables["A"] == "rule" and p.job("job").variables["B"] == "job"


def test_rules_needs_replace_the_jobs_needs(tmp_path: Path) -> None:
    """ci/yaml "rules:needs": when the rule matches, its needs replace the job's."""
    p = pipeline(tmp_path, "a: {stage: build, script: [x]}\nb: {stage: build, script: [x]}\n"
                 "c:\n  script: [x]\n  needs: [a]\n  rules:\n"
                 "    - if: $CI_COMMIT_BRANCH == 'main'\n      needs: [b]\n")
    assert p.job("c").needs == ["b"]


def test_rules_allow_failure_overrides_exit_codes(tmp_path: Path) -> None:
    """ci/yaml "rules:allow_failure": the rule's value replaces the job's allow_failure,
    exit_codes included; a rule without it keeps the job's."""
    p = pipeline(tmp_path, "a:\n  script: [x]\n  allow_failure: {exit_codes: [3]}\n"
                 "  rules: [{if: $CI_COMMIT_BRANCH, allow_failure: false}]\n"
                 "b:\n  script: [x]\n  allow_failure: {exit_codes: [3]}\n"
                 "  rules: [{if: $CI_COMMIT_BRANCH}]\n"
                 "c: {script: [x], rules: [{when: manual}]}\n")
    assert p.job("a").allow_exit_codes == [] and not p.job("a").allow_failure
    assert p.job("b").allow_exit_codes == [3]
    assert not p.job("c").allow_failure  # when: manual in rules: allow_failure false


def test_workflow_rules_filter_the_pipeline(tmp_path: Path) -> None:
    """ci/yaml "workflow:rules": no matching rule (or when: never) means no pipeline, said
    with GitLab's "Pipeline filtered out by workflow rules."."""
    text = ("workflow:\n  rules:\n    - if: $CI_PIPELINE_SOURCE == 'schedule'\n"
            "      when: never\n    - if: $CI_COMMIT_BRANCH\n"
            "job: {script: [x]}\n")
    assert names(pipeline(tmp_path, text).jobs) == ["job"]
    filtered = pipeline(tmp_path, text, {"CI_PIPELINE_SOURCE": "schedule"})
    assert filtered.jobs == [] and filtered.empty == "Pipeline filtered out by workflow rules."


def test_workflow_rules_variables_reach_job_rules_and_jobs(tmp_path: Path) -> None:
    """ci/yaml "workflow:rules:variables": the matching rule's variables are pipeline-wide,
    over global variables, seen by job rules."""
    p = pipeline(tmp_path, "variables: {DEPLOY: none}\nworkflow:\n  rules:\n"
                 "    - if: $CI_COMMIT_BRANCH == 'main'\n      variables: {DEPLOY: prod}\n"
                 "deploy: {script: [x], rules: [{if: $DEPLOY == 'prod'}]}\n"
                 "other: {script: [x], rules: [{if: $DEPLOY == 'none'}]}\n")
    assert names(p.jobs) == ["deploy"] and p.job("deploy").variables["DEPLOY"] == "prod"


@pytest.mark.parametrize(("workflow", "message"), [
    ("workflow: {rules: [{when: manual}]}", "workflow:rules:rule when unknown value: manual"),
    ("workflow: {rulez: []}", "workflow config contains unknown keys"),
    ("workflow: {rules: {if: $X}}", "workflow:rules config should be an array of hashes"),
])
def test_workflow_shape_errors(tmp_path: Path, workflow: str, message: str) -> None:
    """ci/yaml "workflow:rules": only always or never, only documented keys."""
    with pytest.raises(CIError, match=message):
        pipeline(tmp_path, f"{workflow}\njob: {{script: [x]}}\n")


def test_every_job_excluded_is_said_and_exits_2(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """ci/yaml "rules": a pipeline whose jobs are all excluded has no jobs; `kata-ci run`
    says GitLab's "No stages / jobs for this pipeline." and exits 2."""
    (tmp_path / "cfg.toml").write_text("")
    monkeypatch.setenv("KATA_CI_CONFIG", str(tmp_path / "cfg.toml"))
    (tmp_path / "ws").mkdir()
    (tmp_path / "ws" / ".gitlab-ci.yml").write_text("a: {script: [x], rules: [{if: $NO}]}\n")
    for args in ([], ["--pipeline"]):
        result = CliRunner().invoke(main, ["run", "-C", str(tmp_path / "ws"), *args])
        assert result.exit_code == 2 and "No stages / jobs for this pipeline." in result.stderr


def test_manual_jobs_and_their_dependents(tmp_path: Path) -> None:
    """ci/jobs/job_control.md "Create a job that must be run manually": --manual triggers a
    manual job in a pipeline run; a job needing an untriggered manual job is an error naming
    both; a job named on the command line runs even if manual."""
    p = pipeline(tmp_path, "build: {script: [x]}\napprove: {script: [x], when: manual}\n"
                 "release: {script: [x], needs: [approve]}\n")
    with pytest.raises(UserError, match=r"job 'release' needs the manual job 'approve'.*"
                                        r"--manual approve"):
        select(p, [], False)
    chosen = select(p, [], False, manual=["approve"])
    assert names(chosen) == ["build", "approve", "release"]
    assert p.job("approve").when == "on_success"
    p = pipeline(tmp_path, "approve: {script: [x], when: manual}\n")
    assert [j.when for j in select(p, ["approve"], False)] == ["on_success"]
    with pytest.raises(UserError, match="not manual"):
        select(pipeline(tmp_path, "a: {script: [x]}\n"), [], False, manual=["a"])


def test_parallel_instance_names_and_node_variables(tmp_path: Path) -> None:
    """ci/yaml "parallel" and "parallel:matrix": instances are `job 1/2` and `job: [a, x]`;
    CI_NODE_INDEX/CI_NODE_TOTAL are set for both forms; `job: [1/2]` names `job 1/2`."""
    p = pipeline(tmp_path, "n: {script: [x], parallel: 2}\n"
                 "m: {script: [x], parallel: {matrix: [{P: [a, b], Q: x}, {P: c}]}}\n")
    assert names(p.jobs) == ["n 1/2", "n 2/2", "m: [a, x]", "m: [b, x]", "m: [c]"]
    assert [(j.variables["CI_NODE_INDEX"], j.variables["CI_NODE_TOTAL"]) for j in p.jobs] == [
        ("1", "2"), ("2", "2"), ("1", "3"), ("2", "3"), ("3", "3")]
    assert names(p.named("n: [1/2]")) == ["n 1/2"] and names(p.named("n")) == ["n 1/2",
                                                                                "n 2/2"]
    assert names(p.named("m: [b, x]")) == ["m: [b, x]"]


def test_predefined_variables_a_checkout_can_supply(tmp_path: Path) -> None:
    """ci/variables/predefined_variables.md: the variables a local run can know are set."""
    variables = predefined_variables(tmp_path)
    for name in ("CI", "GITLAB_CI", "CI_PROJECT_DIR", "CI_COMMIT_SHA", "CI_COMMIT_SHORT_SHA",
                 "CI_COMMIT_REF_NAME", "CI_COMMIT_REF_SLUG", "CI_COMMIT_BEFORE_SHA",
                 "CI_PIPELINE_ID", "CI_PIPELINE_IID", "CI_PIPELINE_SOURCE", "CI_JOB_ID",
                 "CI_PROJECT_NAMESPACE", "CI_PROJECT_PATH_SLUG", "CI_DEFAULT_BRANCH",
                 "CI_CONFIG_PATH", "CI_PIPELINE_CREATED_AT", "CI_COMMIT_REF_PROTECTED"):
        assert name in variables, name
    assert variables["CI_COMMIT_BEFORE_SHA"] == "0" * 40
    job = pipeline(tmp_path, "Build Docs: {script: [x]}\n").job("Build Docs")
    assert job.variables["CI_JOB_NAME_SLUG"] == "build-docs"


def test_delayed_job_runs_with_a_note(tmp_path: Path) -> None:
    """ci/yaml "when:delayed" with start_in: kata-ci runs the job without waiting, and says
    so."""
    job = pipeline(tmp_path, "j: {script: [x], when: delayed, start_in: 5 minutes}\n").job("j")
    assert job.when == "delayed" and any("without waiting" in n for n in job.notes)


def test_need_in_a_later_stage_is_gitlabs_error(tmp_path: Path) -> None:
    """ci/yaml "needs": a needed job may be in the same or an earlier stage; a later one is
    refused as GitLab says it, "is not defined in current or prior stages"."""
    with pytest.raises(CIError, match=r"\.gitlab-ci\.yml:1: a job: need b is not defined in "
                                      r"current or prior stages"):
        pipeline(tmp_path, "a: {stage: build, script: [x], needs: [b]}\n"
                 "b: {stage: test, script: [x]}\n")
    p = pipeline(tmp_path, "a: {stage: test, script: [x], needs: [b]}\n"
                 "b: {stage: test, script: [x]}\n")
    assert p.job("a").needs == ["b"]


def test_undefined_need_is_gitlabs_error(tmp_path: Path) -> None:
    """ci/yaml "needs": a need naming no job at all is "job: undefined need: name"."""
    with pytest.raises(CIError, match=r":1: a job: undefined need: ghost$"):
        pipeline(tmp_path, "a: {script: [x], needs: [ghost]}\n")


def test_a_job_name_prefix_is_not_a_parallel_instance(tmp_path: Path) -> None:
    """ci/yaml "parallel": only `build 1/2` or `build: [..]` are instances of `build`;
    `build docs` is another job, for needs and on the command line."""
    text = "build docs: {stage: build, script: [x]}\nt: {script: [x], needs: [build]}\n"
    with pytest.raises(CIError, match="undefined need: build"):
        pipeline(tmp_path, text)
    p = pipeline(tmp_path, "build docs: {script: [x]}\n")
    with pytest.raises(CIError, match="no job named 'build'"):
        p.named("build")


def test_needs_parallel_matrix_picks_instances_by_value(tmp_path: Path) -> None:
    """ci/yaml "needs:parallel:matrix": the need names the instances whose variables have
    those values, whatever the order of the keys."""
    p = pipeline(tmp_path, "b: {stage: build, script: [x], parallel: {matrix: "
                 "[{OS: [linux, mac], ARCH: [amd64, arm64]}]}}\n"
                 "t: {script: [x], needs: [{job: b, parallel: {matrix: "
                 "[{ARCH: arm64, OS: mac}]}}]}\n")
    assert p.job("t").needs == ["b: [mac, arm64]"]
    with pytest.raises(CIError, match="does not exist in the pipeline"):
        pipeline(tmp_path, "b: {stage: build, script: [x], parallel: {matrix: [{OS: linux}]}}"
                 "\nt: {script: [x], needs: [{job: b, parallel: {matrix: [{OS: bsd}]}}]}\n")


@pytest.mark.parametrize(("policy", "runs"), [
    ("only: {variables: [$DEPLOY == 'yes']}", True),
    ("only: {variables: [$DEPLOY == 'no']}", False),
    ("only: {refs: [main], variables: [$DEPLOY == 'no']}", False),  # only: every key
    ("only: {refs: [main], variables: [$DEPLOY == 'yes']}", True),
    ("except: {refs: [other], variables: [$DEPLOY == 'yes']}", False),  # except: any key
    ("except: {variables: [$DEPLOY == 'no']}", True),
    ("only: [merge_requests]", False),
    ("only: [pushes]", True),
])
def test_only_except_keys(tmp_path: Path, policy: str, runs: bool) -> None:
    """ci/yaml "only:variables / except:variables", "only:refs / except:refs": keys of
    `only` must all match, any key of `except` excludes; `merge_requests` is a source."""
    p = pipeline(tmp_path, f"variables: {{DEPLOY: 'yes'}}\nj:\n  script: [x]\n  {policy}\n"
                 "k: {script: [x]}\n")
    assert ("j" in names(p.jobs)) is runs


def test_blocking_manual_job_holds_later_stages(tmp_path: Path) -> None:
    """ci/jobs/job_control.md "Types of manual jobs": `when: manual` from rules has
    allow_failure false, so later stages wait for it; untriggered, that is an error naming
    both jobs; job-level `when: manual` (allow_failure true) blocks nothing."""
    text = ("gate: {stage: build, script: [x], rules: [{when: manual}]}\n"
            "soft: {stage: build, script: [x], when: manual}\n"
            "deploy: {stage: deploy, script: [x]}\n")
    with pytest.raises(UserError, match=r"job 'deploy' is in a later stage than the blocking "
                                        r"manual job .* 'gate'.*--manual gate"):
        select(pipeline(tmp_path, text), [], False)
    p = pipeline(tmp_path, text)
    chosen = select(p, [], False, manual=["gate"])
    assert names(chosen) == ["gate", "deploy"]
    ran: list[str] = []

    def run(job: object) -> JobResult:
        ran.append(job.name)  # type: ignore[attr-defined]
        return JobResult(job.name, JobStatus.SUCCESS)  # type: ignore[attr-defined]

    schedule(p, chosen, 2, run, Cancel())
    assert ran == ["gate", "deploy"]


def test_a_named_manual_job_brings_its_needs(tmp_path: Path) -> None:
    """ci/yaml "when:manual" with "needs": `kata-ci run approve` plays the manual job, and
    runs what it needs first, as for any job."""
    p = pipeline(tmp_path, "build: {stage: build, script: [x]}\n"
                 "approve: {stage: deploy, script: [x], when: manual, needs: [build]}\n")
    assert names(select(p, ["approve"], False)) == ["build", "approve"]


def test_slugs_as_gitlab_makes_them() -> None:
    """predefined_variables.md CI_COMMIT_REF_SLUG: lowercased, every other character `-`,
    63 bytes, no leading or trailing `-`."""
    assert slug("Feature/Ü-x") == "feature---x"
    assert slug("a" * 62 + "/b") == "a" * 62


def test_commit_facts_from_the_checkout(tmp_path: Path) -> None:
    """predefined_variables.md CI_COMMIT_MESSAGE/TITLE/DESCRIPTION/AUTHOR/TIMESTAMP and
    CI_COMMIT_REF_PROTECTED (the default branch is protected) from the local commit."""
    env = {"GIT_AUTHOR_NAME": "Ann", "GIT_AUTHOR_EMAIL": "ann@example.org",
           "GIT_COMMITTER_NAME": "Ann", "GIT_COMMITTER_EMAIL": "ann@example.org",
           "GIT_COMMITTER_DATE": "2024-05-06T07:08:09+00:00", "HOME": str(tmp_path),
           "PATH": "/usr/bin:/bin", "GIT_CONFIG_NOSYSTEM": "1"}
    for argv in (["init", "-q", "-b", "main"],
                 ["commit", "-q", "--allow-empty", "-m", "Fix it", "-m", "Because."]):
        subprocess.run(["git", *argv], cwd=tmp_path, env=env, check=True)
    variables = predefined_variables(tmp_path)
    assert variables["CI_COMMIT_TITLE"] == "Fix it"
    assert variables["CI_COMMIT_MESSAGE"] == "Fix it\n\nBecause."
    assert variables["CI_COMMIT_DESCRIPTION"] == "\nBecause."
    assert variables["CI_COMMIT_AUTHOR"] == "Ann <ann@example.org>"
    assert variables["CI_COMMIT_TIMESTAMP"] == "2024-05-06T07:08:09+00:00"
    assert variables["CI_COMMIT_REF_PROTECTED"] == "true"
    assert variables["CI_PROJECT_PATH"] == f"local/{tmp_path.name}"


def plan_specs(tmp_path: Path, text: str, manual: tuple[str, ...] = (),
               settings: RunSettings | None = None) -> dict[str, JobSpec]:
    """Each selected job's JobSpec, as a run makes them right before its VMs start."""
    p = pipeline(tmp_path, text)
    plan = GitLabPlan(p, select(p, [], False, manual), tmp_path, {**MAIN, "CI_NODE_TOTAL": "1"},
                      {}, settings or RunSettings())
    return {job.name: plan.spec(job) for job in plan.jobs}


def test_job_level_manual_with_allow_failure_false_blocks(tmp_path: Path) -> None:
    """ci/yaml "when" (manual) and job_control.md "Types of manual jobs": a job-level manual
    job is optional (allow_failure true by default) unless it says allow_failure: false, then
    it blocks the later stages."""
    text = ("gate: {stage: build, script: [x], when: manual, allow_failure: false}\n"
            "soft: {stage: build, script: [x], when: manual}\n"
            "deploy: {stage: deploy, script: [x]}\n")
    p = pipeline(tmp_path, text)
    assert not p.job("gate").allow_failure and p.job("soft").allow_failure
    with pytest.raises(UserError, match=r"blocking manual job .*'gate'"):
        select(p, [], False)
    assert names(select(pipeline(tmp_path, text), [], False, ["gate"])) == ["gate", "deploy"]


def test_workflow_rules_see_global_variables(tmp_path: Path) -> None:
    """ci/yaml "workflow:rules": the rules' `if` sees the file's global variables (GitLab
    evaluates them with the pipeline's YAML variables), so a global switch filters it."""
    text = "variables: {RUN: 'VALUE'}\nworkflow: {rules: [{if: $RUN == 'yes'}]}\nj: {script: [x]}\n"
    assert names(pipeline(tmp_path, text.replace("VALUE", "yes")).jobs) == ["j"]
    filtered = pipeline(tmp_path, text.replace("VALUE", "no"))
    assert filtered.empty == "Pipeline filtered out by workflow rules."


def test_user_variables_win_over_the_files_in_rules(tmp_path: Path) -> None:
    """ci/variables "CI/CD variable precedence": pipeline variables (--var) win over the
    file's global and job variables, in rules:if as in the job."""
    (tmp_path / ".gitlab-ci.yml").write_text(
        "variables: {TARGET: none}\n"
        "deploy: {script: [x], variables: {TARGET: staging}, rules: [{if: $TARGET == 'prod'}]}\n")
    path = tmp_path / ".gitlab-ci.yml"
    assert load(path, tmp_path, MAIN).jobs == []
    user = {"TARGET": "prod"}
    assert names(load(path, tmp_path, {**MAIN, **user}, None, user).jobs) == ["deploy"]


def test_node_total_is_1_without_parallel(tmp_path: Path) -> None:
    """predefined_variables.md CI_NODE_TOTAL: "set to 1 if the job does not use parallel";
    CI_NODE_INDEX only for parallel jobs; an instance's own total wins."""
    assert predefined_variables(tmp_path)["CI_NODE_TOTAL"] == "1"
    specs = plan_specs(tmp_path, "one: {script: [x]}\nmany: {script: [x], parallel: 3}\n")
    assert specs["one"].env["CI_NODE_TOTAL"] == "1" and "CI_NODE_INDEX" not in specs["one"].env
    assert specs["many 2/3"].env["CI_NODE_TOTAL"] == "3"
    assert specs["many 2/3"].env["CI_NODE_INDEX"] == "2"


def test_pipeline_name_from_workflow_name(tmp_path: Path) -> None:
    """ci/yaml "workflow:name" and predefined_variables.md CI_PIPELINE_NAME: the name, with
    the matching workflow rule's variables expanded, is every job's CI_PIPELINE_NAME."""
    text = ("workflow:\n  name: 'Build $KIND on $CI_COMMIT_BRANCH'\n"
            "  rules: [{if: $CI_COMMIT_BRANCH, variables: {KIND: nightly}}]\nj: {script: [x]}\n")
    assert pipeline(tmp_path, text).name == "Build nightly on main"
    assert plan_specs(tmp_path, text)["j"].env["CI_PIPELINE_NAME"] == "Build nightly on main"
    with pytest.raises(CIError, match="workflow name should be a string"):
        pipeline(tmp_path, "workflow: {name: [a]}\nj: {script: [x]}\n")


def test_job_facts_a_local_run_knows(tmp_path: Path) -> None:
    """predefined_variables.md CI_JOB_MANUAL ("only available if the job was started
    manually"), CI_JOB_TIMEOUT (seconds), CI_JOB_IMAGE, CI_DISPOSABLE_ENVIRONMENT."""
    specs = plan_specs(tmp_path, "m: {script: [x], when: manual, timeout: 2m}\n"
                       "i: {script: [x], image: 'alpine:$V', variables: {V: '3.20'}}\n",
                       manual=("m",), settings=RunSettings(timeout=600.0))
    assert specs["m"].env["CI_JOB_MANUAL"] == "true" and "CI_JOB_MANUAL" not in specs["i"].env
    assert specs["m"].env["CI_JOB_TIMEOUT"] == "120" and specs["i"].env["CI_JOB_TIMEOUT"] == "600"
    assert specs["i"].env["CI_JOB_IMAGE"] == "alpine:3.20" and "CI_JOB_IMAGE" not in specs["m"].env
    assert predefined_variables(tmp_path)["CI_DISPOSABLE_ENVIRONMENT"] == "true"


def test_rules_start_in_is_the_delay_noted(tmp_path: Path) -> None:
    """ci/yaml "rules:start_in": a rule's `when: delayed` takes the rule's start_in; kata-ci
    notes the delay it does not wait for."""
    job = pipeline(tmp_path, "j: {script: [x], rules: [{when: delayed, start_in: 1 hour}]}\n"
                   ).job("j")
    assert job.when == "delayed" and any("start_in: 1 hour" in n for n in job.notes)


@pytest.mark.parametrize("text", [
    "n: {script: [x], parallel: 2}\n'n 1/2': {script: [x]}\n",
    "m: {script: [x], parallel: {matrix: [{P: a}, {P: a}]}}\n",
    "m: {script: [x], parallel: {matrix: [{P: a}]}}\n'm: [a]': {script: [x]}\n",
])
def test_an_instance_name_used_twice_is_refused(tmp_path: Path, text: str) -> None:
    """ci/yaml "parallel" / "parallel:matrix": instances are named `job 1/N` and
    `job: [values]`; a name made twice (by a job of that name, or two equal matrix rows)
    would make two jobs one: refused with the file and line."""
    with pytest.raises(CIError, match=r"\.gitlab-ci\.yml:\d+: job '.*': the name is used twice"):
        pipeline(tmp_path, text)


def test_matrix_values_are_named_as_gitlab_writes_them(tmp_path: Path) -> None:
    """ci/yaml "parallel:matrix": instance names list the values of one row; numbers and
    booleans as YAML wrote them (`true`, not Python's `True`), in the variables too."""
    p = pipeline(tmp_path, "m: {script: [x], parallel: {matrix: [{V: [3.12, 10], F: true}]}}\n")
    assert names(p.jobs) == ["m: [3.12, true]", "m: [10, true]"]
    assert p.job("m: [10, true]").variables["F"] == "true"


def test_a_pipeline_of_manual_jobs_only_says_so(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """ci/jobs/job_control.md "Create a job that must be run manually": when every job is
    manual, `kata-ci run --pipeline` starts nothing; it says how to trigger one and exits 2,
    never an empty summary."""
    with pytest.raises(UserError, match=r"every job of this pipeline is manual \(a\).*--manual"):
        select(pipeline(tmp_path, "a: {script: [x], when: manual}\n"), [], False)
    (tmp_path / "cfg.toml").write_text("")
    monkeypatch.setenv("KATA_CI_CONFIG", str(tmp_path / "cfg.toml"))
    result = CliRunner().invoke(main, ["run", "-C", str(tmp_path), "--pipeline"])
    assert result.exit_code == 2 and "every job of this pipeline is manual" in result.stderr


def test_a_named_job_of_a_filtered_pipeline_says_why(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """ci/yaml "workflow:rules": `kata-ci run JOB` on a pipeline the workflow rules filter
    out names the reason, "Pipeline filtered out by workflow rules.", and exits 2."""
    (tmp_path / "cfg.toml").write_text("")
    monkeypatch.setenv("KATA_CI_CONFIG", str(tmp_path / "cfg.toml"))
    (tmp_path / ".gitlab-ci.yml").write_text("workflow: {rules: [{when: never}]}\n"
                                             "j: {script: [x]}\n")
    result = CliRunner().invoke(main, ["run", "-C", str(tmp_path), "j"])
    assert result.exit_code == 2
    assert "Pipeline filtered out by workflow rules." in result.stderr


def test_an_endless_timeout_is_refused(tmp_path: Path) -> None:
    """ci/yaml "timeout": a duration; one too big to be a number is an error naming the
    file and line, not an endless job."""
    with pytest.raises(CIError, match=r"\.gitlab-ci\.yml:1: cannot read timeout"):
        pipeline(tmp_path, "j: {script: [x], timeout: '" + "9" * 400 + " days'}\n")
