"""`.gitlab-ci.yml` resolution, each case from GitLab's CI YAML reference (doc: ci/yaml)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from kata_ci.runner.core.command import Cancel
from kata_ci.runner.core.outcome import JobStatus
from kata_ci.runner.core.schedule import JobResult
from kata_ci.runner.core.sinks import PrefixedOutput
from kata_ci.runner.gitlab.ci_file import CIError, Pipeline, load, merged_jobs, parse_duration
from kata_ci.runner.gitlab.jobs import job_script, schedule, select

FIXTURES = Path(__file__).resolve().parents[3] / "shared" / "fixtures" / "gitlab-ci"
MAIN = {"CI_COMMIT_BRANCH": "main", "CI_DEFAULT_BRANCH": "main", "CI_COMMIT_REF_NAME": "main",
        "CI_PIPELINE_SOURCE": "push"}


def write(tmp_path: Path, text: str, name: str = ".gitlab-ci.yml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def pipeline(tmp_path: Path, text: str, variables: dict[str, str] | None = None) -> Pipeline:
    return load(write(tmp_path, text), tmp_path, variables or MAIN)


def names(p: Pipeline) -> list[str]:
    return [j.name for j in p.jobs]


def test_extends_merge_matches_the_documented_result() -> None:
    """yaml_optimization.md "Merge details": hashes deep-merge (later extends wins), arrays
    (tags, script) are replaced, not merged."""
    got = merged_jobs(FIXTURES / "extends-merge.gitlab-ci.yml", FIXTURES).jobs["rspec"]
    expected = yaml.safe_load((FIXTURES / "extends-merge.expected.yml").read_text())["rspec"]
    assert got == expected


@pytest.mark.parametrize("name", sorted(p.name for p in FIXTURES.glob("*.gitlab-ci.yml")))
def test_shared_fixtures_parse(name: str, tmp_path: Path) -> None:
    """The real templates and doc examples load without error and yield jobs."""
    assert load(FIXTURES / name, tmp_path, MAIN).jobs


def test_implicit_stages_and_global_scripts(tmp_path: Path) -> None:
    """Without `stages:`, the defaults are .pre, build, test, deploy, .post; global
    before_script/after_script (deprecated form of default:) apply to every job."""
    p = load(FIXTURES / "bash-template.gitlab-ci.yml", tmp_path, MAIN)
    assert p.stages == [".pre", "build", "test", "deploy", ".post"]
    assert [j.stage for j in p.jobs] == ["build", "test", "test", "deploy"]
    assert all(j.before_script and j.after_script for j in p.jobs)
    assert all(not j.unsupported and j.image and j.image.name == "busybox:latest"
               for j in p.jobs)


def test_multi_level_extends_and_hidden_jobs(tmp_path: Path) -> None:
    """extends chains resolve through several levels; jobs starting with '.' never run."""
    p = pipeline(tmp_path, ".a: {variables: {A: '1', B: '1'}, script: [a]}\n"
                           ".b: {extends: .a, variables: {B: '2'}}\n"
                           "job: {extends: .b, variables: {C: '3'}}\n")
    assert names(p) == ["job"]
    assert p.jobs[0].variables["A"] == "1" and p.jobs[0].variables["B"] == "2"
    assert p.jobs[0].script == ["a"]


def test_circular_extends_is_an_error(tmp_path: Path) -> None:
    """A job extending itself through others is rejected with the chain."""
    with pytest.raises(CIError, match="circular dependency detected in `extends`: a -> b -> a"):
        pipeline(tmp_path, "a: {extends: b, script: [x]}\nb: {extends: a, script: [x]}\n")


def test_reference_tag_and_nested_script_arrays(tmp_path: Path) -> None:
    """!reference reuses another job's section; nested script arrays are flattened."""
    p = pipeline(tmp_path, ".setup: {script: [one, two]}\n"
                           "job: {script: [!reference [.setup, script], three]}\n")
    assert p.jobs[0].script == ["one", "two", "three"]


def test_anchors_and_merge_keys(tmp_path: Path) -> None:
    """YAML anchors and `<<:` merge keys work as in any YAML."""
    p = pipeline(tmp_path, ".base: &base {stage: build, script: [echo]}\n"
                           "job: {<<: *base, variables: {X: '1'}}\n")
    assert (p.jobs[0].stage, p.jobs[0].script) == ("build", ["echo"])


def test_default_and_inherit(tmp_path: Path) -> None:
    """default: keywords apply unless the job sets them or opts out with inherit:default."""
    p = pipeline(tmp_path, "default: {before_script: [setup], after_script: [bye]}\n"
                           "a: {script: [x]}\n"
                           "b: {script: [x], before_script: [own]}\n"
                           "c: {script: [x], inherit: {default: false}}\n"
                           "d: {script: [x], inherit: {default: [after_script]}}\n")
    got = {j.name: (j.before_script, j.after_script) for j in p.jobs}
    assert got == {"a": (["setup"], ["bye"]), "b": (["own"], ["bye"]), "c": ([], []),
                   "d": ([], ["bye"])}


def test_variable_precedence_job_over_global(tmp_path: Path) -> None:
    """Job variables override global ones; `inherit: variables: false` drops the global ones."""
    p = pipeline(tmp_path, "variables: {A: g, B: g}\n"
                           "x: {script: [s], variables: {B: j}}\n"
                           "y: {script: [s], inherit: {variables: false}}\n")
    assert p.jobs[0].variables["A"] == "g" and p.jobs[0].variables["B"] == "j"
    assert "A" not in p.jobs[1].variables


def test_unknown_key_names_file_line_and_job(tmp_path: Path) -> None:
    """GitLab rejects unknown job keywords: 'jobs:x config contains unknown keys'."""
    with pytest.raises(CIError, match=r"\.gitlab-ci\.yml:2: jobs:bad config contains "
                                      r"unknown keys: scrpit"):
        pipeline(tmp_path, "ok: {script: [x]}\nbad: {scrpit: [x]}\n")


def test_malformed_yaml_names_the_file(tmp_path: Path) -> None:
    """Broken YAML is reported with the file, before anything runs."""
    with pytest.raises(CIError, match=r"\.gitlab-ci\.yml: invalid YAML"):
        pipeline(tmp_path, "job: {script: [x]\n")


def test_needs_cycle_and_unknown_need(tmp_path: Path) -> None:
    """needs must name jobs of the pipeline and must not form a cycle."""
    with pytest.raises(CIError, match="needs form a cycle"):
        pipeline(tmp_path, "a: {script: [x], needs: [b]}\nb: {script: [x], needs: [a]}\n")
    with pytest.raises(CIError, match="undefined need: nope"):
        pipeline(tmp_path, "a: {script: [x], needs: [nope]}\n")


def test_rules_if_when_and_allow_failure(tmp_path: Path) -> None:
    """The first matching rule decides when: and allow_failure; no match means never."""
    p = pipeline(tmp_path, "a: {script: [x], rules: [{if: '$CI_COMMIT_BRANCH == \"dev\"'},"
                           " {if: $CI_COMMIT_BRANCH, when: manual, allow_failure: true}]}\n"
                           "b: {script: [x], rules: [{if: '$NOPE'}]}\n"
                           "c: {script: [x], rules: [{when: always}]}\n")
    assert [(j.name, j.when, j.allow_failure) for j in p.jobs] == [
        ("a", "manual", True), ("c", "always", False)]


def test_rules_exists(tmp_path: Path) -> None:
    """rules:exists matches files of the project (globs allowed)."""
    (tmp_path / "Makefile").write_text("")
    p = pipeline(tmp_path, "a: {script: [x], rules: [{exists: [Makefile]}]}\n"
                           "b: {script: [x], rules: [{exists: ['*.gradle']}]}\n")
    assert names(p) == ["a"]


def test_rules_changes_match_the_snapshot_files(tmp_path: Path) -> None:
    """rules:changes matches globs against the changed files it is given, names with spaces
    included; None (outside git, first commit) makes every file count as changed."""
    text = ("a: {script: [x], rules: [{changes: ['src/*.py']}]}\n"
            "b: {script: [x], rules: [{changes: {paths: ['docs/*']}}]}\n"
            "c: {script: [x], rules: [{changes: ['my file.txt']}]}\n")
    path = write(tmp_path, text)
    assert names(load(path, tmp_path, MAIN, ["src/app.py", "my file.txt"])) == ["a", "c"]
    assert names(load(path, tmp_path, MAIN, [])) == []
    assert names(load(path, tmp_path, MAIN, None)) == ["a", "b", "c"]


def test_only_except_refs(tmp_path: Path) -> None:
    """only/except with branch names, regexes and the `branches`/`tags` keywords."""
    p = pipeline(tmp_path, "a: {script: [x], only: [main]}\n"
                           "b: {script: [x], only: [/^release-/]}\n"
                           "c: {script: [x], except: [branches]}\n"
                           "d: {script: [x], only: {refs: [tags]}}\n"
                           "e: {script: [x], only: [branches]}\n")
    assert names(p) == ["a", "e"]


def test_parallel_count_and_matrix_names(tmp_path: Path) -> None:
    """parallel: N makes 'job i/N' with CI_NODE_INDEX/TOTAL; parallel:matrix makes one job per
    combination, named 'job: [v1, v2]', with the values as variables."""
    p = pipeline(tmp_path, "n: {script: [x], parallel: 2}\n"
                           "m: {script: [x], parallel: {matrix: [{OS: [a, b], V: '1'}]}}\n")
    assert names(p) == ["n 1/2", "n 2/2", "m: [a, 1]", "m: [b, 1]"]
    assert p.jobs[1].variables["CI_NODE_INDEX"] == "2"
    assert p.jobs[3].variables["OS"] == "b"


def test_needs_on_a_parallel_job_waits_for_all_variants(tmp_path: Path) -> None:
    """needs: [job] on a parallel job means every one of its instances."""
    p = pipeline(tmp_path, "t: {script: [x], parallel: 2}\nd: {script: [x], needs: [t]}\n")
    assert p.job("d").needs == ["t 1/2", "t 2/2"]


def test_allow_failure_exit_codes_and_timeout(tmp_path: Path) -> None:
    """allow_failure:exit_codes lists the statuses that count as allowed; timeout parses
    GitLab's human durations."""
    p = pipeline(tmp_path, "a: {script: [x], allow_failure: {exit_codes: [3, 4]}, "
                           "timeout: 1h 30m}\n")
    assert p.jobs[0].allow_exit_codes == [3, 4] and not p.jobs[0].allow_failure
    assert p.jobs[0].timeout == 5400
    assert parse_duration("10 minutes", "f") == 600
    with pytest.raises(CIError):
        parse_duration("soon", "f")


def test_include_local_and_unreachable_includes(tmp_path: Path) -> None:
    """include: local merges the file under the including one (which wins); remote, template
    and project includes cannot be fetched here and say so."""
    (tmp_path / "ci").mkdir()
    write(tmp_path, "variables: {A: inc, B: inc}\nshared: {script: [from-include]}\n",
          "ci/common.yml")
    p = pipeline(tmp_path, "include: [{local: ci/common.yml}]\nvariables: {B: main}\n"
                           "own: {script: [x]}\n")
    assert names(p) == ["shared", "own"]
    assert (p.job("own").variables["A"], p.job("own").variables["B"]) == ("inc", "main")
    for spec in ("{template: Auto-DevOps.gitlab-ci.yml}", "'https://example.com/ci.yml'",
                 "{project: g/p, file: x.yml}"):
        with pytest.raises(CIError, match="cannot be fetched here"):
            pipeline(tmp_path, f"include: [{spec}]\nj: {{script: [x]}}\n")


def test_select_runs_needs_unless_only(tmp_path: Path) -> None:
    """Naming a job runs the jobs it needs too; --only runs just it; a named manual job runs."""
    p = pipeline(tmp_path, "a: {script: [x]}\nb: {script: [x], needs: [a]}\n"
                           "m: {script: [x], when: manual}\n")
    assert [j.name for j in select(p, ["b"], only=False)] == ["a", "b"]
    assert [j.name for j in select(p, ["b"], only=True)] == ["b"]
    assert [j.name for j in select(p, [], only=False)] == ["a", "b"]
    assert [j.when for j in select(p, ["m"], only=False)] == ["on_success"]


def test_schedule_follows_stages_needs_and_when(tmp_path: Path) -> None:
    """Stages wait for earlier stages; needs start early; on_success jobs are skipped after a
    failure, on_failure and always jobs run; allowed failures do not fail the pipeline."""
    p = pipeline(tmp_path, "stages: [one, two, three]\n"
                           "ok: {stage: one, script: [x]}\n"
                           "bad: {stage: one, script: [x]}\n"
                           "soft: {stage: one, script: [x], allow_failure: true}\n"
                           "early: {stage: two, script: [x], needs: [ok]}\n"
                           "later: {stage: three, script: [x]}\n"
                           "fix: {stage: three, script: [x], when: on_failure}\n"
                           "report: {stage: three, script: [x], when: always}\n")
    ran: list[str] = []

    def run(job: object) -> JobResult:
        name = job.name  # type: ignore[attr-defined]
        ran.append(name)
        status = {"bad": "failed", "soft": "warning"}.get(name, "success")
        return JobResult(name, JobStatus(status))

    results = schedule(p, p.jobs, 1, run, Cancel())
    assert {r.name: r.status.value for r in results} == {
        "ok": "success", "bad": "failed", "soft": "warning", "early": "success",
        "later": "skipped", "fix": "success", "report": "success"}
    assert ran.index("early") > ran.index("ok")


def test_job_script_echoes_and_stops_at_first_failure() -> None:
    """Each command is echoed with '$ ' before it runs, under `set -eo pipefail`."""
    script = job_script(["echo 'hi there'", "false"])
    assert script.startswith("set -eo pipefail\n")
    assert "'$ echo '\"'\"'hi there'\"'\"''" in script


def test_prefixed_output_emits_whole_lines() -> None:
    """Output from several jobs interleaves only at line boundaries, each with its job."""
    seen: list[tuple[str, str, bytes]] = []
    out = PrefixedOutput(lambda job, stream, line: seen.append((job, stream, line)))
    out.sink("a").write("stdout", b"par")
    out.sink("b").write("stdout", b"one\n")
    out.sink("a").write("stdout", b"tial\nnext")
    out.flush("a")
    assert seen == [("b", "stdout", b"one\n"), ("a", "stdout", b"partial\n"),
                    ("a", "stdout", b"next\n")]


def test_find_cycle_reports_the_loop_only() -> None:
    """The reported cycle starts and ends at the same job, without the path leading to it."""
    from kata_ci.runner.core.schedule import find_cycle

    assert find_cycle({"x": ["a"], "a": ["b"], "b": ["a"]}) == ["a", "b", "a"]
    assert find_cycle({"a": ["b"], "b": []}) is None
    assert find_cycle({"a": ["a"]}) == ["a", "a"]
