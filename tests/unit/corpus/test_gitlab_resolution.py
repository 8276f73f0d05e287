"""GitLab CI files resolved as GitLab documents it: `!reference`, hidden keys, `include:
local`, keyword validation, the merged view (`kata-ci ci config`). Each case is an example
of the doc section its docstring names (docs.gitlab.com/ci/yaml/...)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from kata_ci.runner.cli.app import main
from kata_ci.runner.gitlab.ci_file import CIError, Pipeline, load
from kata_ci.runner.gitlab.merge import resolve

MAIN = {"CI_COMMIT_BRANCH": "main", "CI_DEFAULT_BRANCH": "main", "CI_COMMIT_REF_NAME": "main",
        "CI_PIPELINE_SOURCE": "push"}


def pipeline(tmp_path: Path, text: str, files: dict[str, str] | None = None,
             variables: dict[str, str] | None = None) -> Pipeline:
    for name, body in (files or {}).items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(body)
    (tmp_path / ".gitlab-ci.yml").write_text(text)
    return load(tmp_path / ".gitlab-ci.yml", tmp_path, {**MAIN, **(variables or {})})


def job(p: Pipeline, name: str) -> dict[str, object]:
    found = p.job(name)
    return {"script": found.script, "before": found.before_script, "vars": found.variables,
            "when": found.when, "needs": found.needs}


def test_reference_to_a_hidden_list_in_rules(tmp_path: Path) -> None:
    """yaml_optimization.md "!reference tags": a hidden key holding a list of rules is
    referenced inside a job's rules list, and its rules are used in place."""
    p = pipeline(tmp_path, ".rules:\n  - if: $CI_COMMIT_BRANCH == 'other'\n"
                 "    when: never\n  - when: manual\n"
                 "job:\n  rules:\n    - !reference [.rules]\n  script: echo\n")
    assert job(p, "job")["when"] == "manual"


def test_reference_to_a_hidden_scalar_and_nested_references(tmp_path: Path) -> None:
    """yaml_optimization.md "!reference tags": references may point at scalars and nest (a
    referenced list itself holding references); nested script arrays are flattened."""
    p = pipeline(tmp_path, ".greeting: hello\n.setup:\n  - echo one\n  - !reference [.more]\n"
                 ".more:\n  - echo two\n"
                 "job:\n  variables:\n    WORD: !reference [.greeting]\n"
                 "  script:\n    - !reference [.setup]\n    - echo three\n")
    assert job(p, "job")["script"] == ["echo one", "echo two", "echo three"]
    assert p.job("job").variables["WORD"] == "hello"


def test_references_in_default_and_top_level_scripts(tmp_path: Path) -> None:
    """yaml_optimization.md "!reference tags" with ci/yaml "default": a reference in
    default:before_script and in the deprecated top-level after_script is resolved."""
    p = pipeline(tmp_path, ".s: {pre: [echo pre], post: [echo post]}\n"
                 "default:\n  before_script: !reference [.s, pre]\n"
                 "after_script:\n  - !reference [.s, post]\n"
                 "job: {script: [echo main]}\n")
    assert job(p, "job")["before"] == ["echo pre"]
    assert p.job("job").after_script == ["echo post"]


def test_reference_sees_the_extended_job(tmp_path: Path) -> None:
    """yaml_optimization.md "Use extends and include together"/"!reference tags": extends is
    merged first, so a reference to a job's key sees what that job inherited."""
    p = pipeline(tmp_path, ".base: {script: [echo base]}\n"
                 "a: {extends: .base}\n"
                 "b: {script: [!reference [a, script], echo b]}\n")
    assert job(p, "b")["script"] == ["echo base", "echo b"]


@pytest.mark.parametrize(("text", "message"), [
    (".a: !reference [.b]\n.b: !reference [.a]\njob: {script: [!reference [.a]]}\n",
     "is part of a circular chain"),
    ("job: {script: [!reference [.missing, script]]}\n", "could not be found"),
    ("job: {script: !reference [job, script]}\n", "is part of a circular chain"),
    ("job: {script: [!reference []]}\n", r"!reference \[\] is not valid"),
    ("job: {script: [!reference [{}]]}\n", r"!reference \[\{\}\] is not valid"),
    ("job: {script: [!reference [.a, 1]]}\n.a: {1: x}\n", r"\[\".a\", 1\] is not valid"),
    ("job: {script: !reference .a}\n", "'.a' is not valid"),
])
def test_bad_references_are_errors(tmp_path: Path, text: str, message: str) -> None:
    """yaml_optimization.md "!reference tags": a cycle or a missing target is an error in
    GitLab's words, never a crash."""
    with pytest.raises(CIError, match=message):
        pipeline(tmp_path, text)


def test_script_nesting_beyond_ten_levels_is_refused(tmp_path: Path) -> None:
    """ci/yaml "script": a nested array of strings up to 10 levels deep; deeper is refused
    with GitLab's message."""
    deep = "x"
    for _ in range(11):
        deep = f"[{deep}]"
    with pytest.raises(CIError, match="up to 10 levels deep"):
        pipeline(tmp_path, f"job: {{script: {deep}}}\n")
    ok = "x"
    for _ in range(9):
        ok = f"[{ok}]"
    assert job(pipeline(tmp_path, f"job: {{script: {ok}}}\n"), "job")["script"] == ["x"]


@pytest.mark.parametrize("include", [
    "include: ci/a.yml", "include: [ci/a.yml]", "include: [{local: ci/a.yml}]",
    "include: {local: /ci/a.yml}", "include: {local: ./ci/a.yml}", "include: 'ci/*.yml'",
    "include: '**/a.yml'", "include: ci/$DIR_NAME.yml", "include: 'ci/${DIR_NAME}.yml'",
])
def test_include_local_forms(tmp_path: Path, include: str) -> None:
    """ci/yaml "include:local": the string and list shorthands, a path from the root (/ or
    ./), wildcards and variables in the path include the file."""
    p = pipeline(tmp_path, f"{include}\nmain: {{script: [echo]}}\n",
                 {"ci/a.yml": "from_include: {script: [echo included]}\n"},
                 {"DIR_NAME": "a"})
    assert [j.name for j in p.jobs] == ["from_include", "main"]


def test_including_file_wins_and_nested_includes(tmp_path: Path) -> None:
    """ci/yaml "include" ("merge method"): keys of the including file override the included
    ones; an included file can include others."""
    p = pipeline(tmp_path, "include: ci/a.yml\njob: {variables: {A: main}}\n",
                 {"ci/a.yml": "include: ci/b.yml\njob: {script: [echo], variables: {A: a}}\n",
                  "ci/b.yml": "deep: {script: [echo deep]}\n"})
    assert p.job("job").variables["A"] == "main" and p.job("deep").script == ["echo deep"]


@pytest.mark.parametrize(("include", "message"), [
    ("ci/missing.yml", "Local file `ci/missing.yml` does not exist!"),
    ("ci/$NOPE.yml", "Local file `ci/$NOPE.yml` does not exist!"),
    ("../outside.yml", "leaves the project"),
    ("ci/a.txt", "does not have YAML extension!"),
    ("{remote: 'https://example.com/x.yml'}", "cannot be fetched here"),
    ("{local: x.yml, inputs: {a: 1}}", "not supported"),
])
def test_include_errors(tmp_path: Path, include: str, message: str) -> None:
    """ci/yaml "include:local": a missing file is GitLab's "Local file ... does not exist!",
    paths stay in the project, files need a YAML extension, remote ones are not fetched."""
    with pytest.raises(CIError, match=r"\.gitlab-ci\.yml:1: .*" + message.replace(
            "$", r"\$").replace("!", "!").replace(".", r"\.")):
        pipeline(tmp_path, f"include: {include}\njob: {{script: [x]}}\n",
                 {"ci/a.txt": "x: 1\n"})


def test_include_rules_with_if(tmp_path: Path) -> None:
    """includes.md "Use rules with include": an include whose rules do not match is left
    out."""
    p = pipeline(tmp_path, "include:\n  - local: ci/a.yml\n    rules:\n"
                 "      - if: $CI_COMMIT_BRANCH == 'release'\n"
                 "main: {script: [echo]}\n",
                 {"ci/a.yml": "extra: {script: [echo]}\n"})
    assert [j.name for j in p.jobs] == ["main"]


def test_include_self_loop_hits_the_limit(tmp_path: Path) -> None:
    """ci/yaml "include": GitLab caps includes ("Maximum of 150 nested includes are
    allowed!"); a file including itself stops there instead of recursing forever."""
    with pytest.raises(CIError, match=r"nested includes|nesting depth"):
        pipeline(tmp_path, "include: ci/a.yml\njob: {script: [x]}\n",
                 {"ci/a.yml": "include: ci/a.yml\n"})


@pytest.mark.parametrize(("body", "message"), [
    ("{script: [x], when: never}", "when should be one of: on_success, on_failure, always, "
     "manual, delayed"),
    ("{script: [x], when: [never]}", "when should be one of"),
    ("{script: [x], rules: [{when: {a: 1}}]}", "rules:rule when unknown value"),
    ("{script: [x], only: {refs: 1}}", "only config should be an array of strings or regular"),
    ("{script: [x], except: ['/(/']}", "except config should be an array of strings or reg"),
    ("{script: [x], timeout: 'soon'}", "timeout config should be a duration"),
    ("{script: [x], start_in: 1 hour}", "start in must be blank"),
    ("{script: [x], when: delayed, start_in: 2 weeks}", "start in should not exceed the limit"),
    ("{script: [x], rules: [{changes: {paths: 1}}]}", "rules:rule:changes config should be"),
    ("{script: [x], retry: 3}", "retry config should be an integer between 0 and 2"),
    ("{script: [x], tags: docker}", "tags config should be an array of strings"),
    ("{script: [x], run: [], }", "these keys cannot be used together: script, run"),
    ("{script: [x], rules: [{if: $X}], only: [main]}", "may not be used with `rules`: only"),
    ("{script: [x], rules: [{iff: $X}]}", "rules:rule config contains unknown keys: iff"),
    ("{script: [x], rules: {if: $X}}", "rules config should be an array of hashes"),
    ("{script: [x], needs: build}", "needs config should be an array"),
    ("{script: [x], parallel: 201}", "less than or equal to 200"),
    ("{script: [x], parallel: {matrix: [{A: [1, 2]}], x: 1}}", "matrix config should be"),
    ("{script: [x], allow_failure: {exit_codes: [one]}}", "exit_codes should be"),
    ("{script: [x], variables: [A]}", "should be a hash of key value pairs"),
    ("{script: {a: 1}}", "script config should be a string or a nested array"),
    ("{stage: test}", "should implement the script:, run:, or trigger: keyword"),
    ("{script: [x], stage: [test]}", "stage config should be a string"),
    ("{script: [x], extends: [1]}", "extends should be a string or an array of strings"),
    ("{script: [x], inherit: {default: 1}}", "inherit:default config should be"),
    ("{script: [x], when: delayed}", "start in should be a duration"),
])
def test_keywords_validated_as_gitlab_validates(tmp_path: Path, body: str,
                                                message: str) -> None:
    """ci/yaml, each keyword's "Possible inputs": a value GitLab rejects is refused with
    file:line, the job and GitLab's wording (when: never only inside rules)."""
    with pytest.raises(CIError, match=r"\.gitlab-ci\.yml:1: jobs:job.*" + message.replace(
            "[", r"\[").replace("`", "`").replace(":", ":")):
        pipeline(tmp_path, f"job: {body}\n")


def test_yaml_bomb_is_refused(tmp_path: Path) -> None:
    """ci/yaml limits ("max_yaml_depth"/size): aliases that expand into billions of values
    are refused before anything walks them."""
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    for i in range(1, 9):
        lines.append(f".a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]")
    with pytest.raises(CIError, match="too big"):
        pipeline(tmp_path, "\n".join(lines) + "\njob: {script: [x], variables: {A: *a8}}\n")


def test_ci_config_prints_the_merged_configuration(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """pipeline_editor "View full configuration": includes, extends, !reference and default:
    resolved in the printed YAML, keys in file order, hidden keys kept (resolved) as GitLab's
    merged view shows them."""
    (tmp_path / "ci").mkdir()
    (tmp_path / "ci" / "t.yml").write_text(".tpl: {stage: build, script: [echo tpl]}\n")
    (tmp_path / ".gitlab-ci.yml").write_text(
        "include: ci/t.yml\ndefault: {before_script: [echo before]}\n.s: [echo ref]\n"
        "build: {extends: .tpl}\ntest: {script: [!reference [.s], echo own]}\n")
    result = CliRunner().invoke(main, ["ci", "config", "-C", str(tmp_path)])
    assert result.exit_code == 0, result.output
    merged = yaml.safe_load(result.stdout)
    assert merged["build"] == {"before_script": ["echo before"], "stage": "build",
                               "script": ["echo tpl"]}
    assert merged["test"]["script"] == [["echo ref"], "echo own"]
    assert list(merged) == [".tpl", "default", ".s", "build", "test"]
    assert merged[".s"] == ["echo ref"] and "include" not in merged


def test_ci_config_errors_exit_2(tmp_path: Path) -> None:
    """A file GitLab rejects: `ci config` exits 2 with file:line, never a traceback."""
    (tmp_path / ".gitlab-ci.yml").write_text("job: {script: [x], when: never}\n")
    result = CliRunner().invoke(main, ["ci", "config", "-C", str(tmp_path)])
    assert result.exit_code == 2 and ".gitlab-ci.yml:1: jobs:job when should be one of: " \
        in result.stderr and "Traceback" not in result.output


def test_resolve_keeps_templates_for_references(tmp_path: Path) -> None:
    """yaml_optimization.md "Hide jobs": hidden keys are templates (kept for references, not
    jobs)."""
    (tmp_path / ".gitlab-ci.yml").write_text(".t: [a]\njob: {script: [x]}\n")
    merged = resolve(tmp_path / ".gitlab-ci.yml", tmp_path, MAIN)
    assert list(merged.jobs) == ["job"] and merged.templates[".t"] == ["a"]


def test_reference_chains_in_rules_and_stages_are_flattened(tmp_path: Path) -> None:
    """yaml_optimization.md "!reference tags" with ci/yaml "rules" and "stages": a referenced
    list holding a reference to another list nests; rules and stages take it flattened."""
    p = pipeline(tmp_path, ".r1: [{if: $CI_COMMIT_BRANCH == 'main', when: manual}]\n"
                 ".r2: [!reference [.r1], {when: never}]\n.late: [check, ship]\n"
                 "stages: [build, !reference [.late]]\n"
                 "job: {stage: ship, script: [x], rules: [!reference [.r2]]}\n")
    assert p.stages == [".pre", "build", "check", "ship", ".post"]
    assert job(p, "job")["when"] == "manual"


def test_a_job_written_as_one_reference(tmp_path: Path) -> None:
    """yaml_optimization.md "!reference tags": a whole job may be a reference to a hidden
    hash (resolved after extends, then validated as a job)."""
    p = pipeline(tmp_path, ".tpl: {script: [echo tpl]}\njob: !reference [.tpl]\n")
    assert job(p, "job")["script"] == ["echo tpl"]
    with pytest.raises(CIError, match="jobs:job config should be a hash"):
        pipeline(tmp_path, ".tpl: [a]\njob: !reference [.tpl]\n")


@pytest.mark.parametrize(("text", "message"), [
    (".b: {script: [y]}\n.base: {extends: .b}\njob: {extends: !reference [.base, extends]}\n",
     "jobs:job:extends should be a string or an array of strings"),
    (".x: [a.yml]\ninclude: !reference [.x]\njob: {script: [x]}\n",
     "a !reference is resolved after includes"),
])
def test_references_are_resolved_after_include_and_extends(tmp_path: Path, text: str,
                                                           message: str) -> None:
    """yaml_optimization.md "!reference tags" / "Use extends and include together": includes
    and extends come first, so a !reference in `include` or `extends` is refused, never
    read as file or job names."""
    with pytest.raises(CIError, match=message):
        pipeline(tmp_path, text)


def test_reference_bomb_is_refused(tmp_path: Path) -> None:
    """yaml_optimization.md "!reference tags" (10 levels): lists referencing each other ten
    times over would expand to billions of values; refused, not walked."""
    lines = [".a0: [x, x, x, x, x, x, x, x, x, x]"]
    for i in range(1, 8):
        lines.append(f".a{i}: [" + ", ".join([f"!reference [.a{i - 1}]"] * 10) + "]")
    with pytest.raises(CIError, match="too big once `extends` and `!reference` are resolved"):
        pipeline(tmp_path, "\n".join(lines) + "\njob: {script: [!reference [.a7]]}\n")


def test_extends_levels_and_long_chains(tmp_path: Path) -> None:
    """ci/yaml "extends": up to eleven levels of inheritance; deeper, however long the
    chain, is GitLab's "nesting too deep in `extends`" (no RecursionError)."""
    def chain(n: int) -> str:
        return ".t0: {script: [x]}\n" + "".join(
            f".t{i}: {{extends: .t{i - 1}}}\n" for i in range(1, n)) + \
            f"job: {{extends: .t{n - 1}}}\n"
    assert job(pipeline(tmp_path, chain(11)), "job")["script"] == ["x"]
    for n in (12, 2000):
        with pytest.raises(CIError, match="nesting too deep in `extends`"):
            pipeline(tmp_path, chain(n))


@pytest.mark.parametrize(("include", "jobs"), [
    ("configs/*.yml", ["top", "main"]),
    ("configs/**.yml", ["sub", "top", "main"]),
    ("configs/**/*.yml", ["sub", "main"]),
    ("nothing/*.yml", ["main"]),
])
def test_include_wildcards_as_gitlab_matches(tmp_path: Path, include: str,
                                             jobs: list[str]) -> None:
    """includes.md "Use include:local with wildcard file paths": `*` stays in a folder,
    `configs/**.yml` takes subfolders too, `configs/**/*.yml` only subfolders."""
    p = pipeline(tmp_path, f"include: '{include}'\nmain: {{script: [echo]}}\n",
                 {"configs/top.yml": "top: {script: [x]}\n",
                  "configs/deeper/sub.yml": "sub: {script: [x]}\n"})
    assert [j.name for j in p.jobs] == jobs


def test_include_empty_file_and_exists_rules(tmp_path: Path) -> None:
    """ci/yaml "include:local" (an empty file is GitLab's "Local file ... is empty!") and
    includes.md "include with rules:exists"."""
    with pytest.raises(CIError, match=r"Local file `e\.yml` is empty!"):
        pipeline(tmp_path, "include: e.yml\njob: {script: [x]}\n", {"e.yml": "\n"})
    text = ("include:\n  - local: a.yml\n    rules: [{exists: [marker.txt]}]\n"
            "main: {script: [x]}\n")
    assert [j.name for j in pipeline(tmp_path, text, {"a.yml": "extra: {script: [x]}\n"})
            .jobs] == ["main"]
    (tmp_path / "marker.txt").write_text("")
    assert [j.name for j in pipeline(tmp_path, text).jobs] == ["extra", "main"]


def test_include_paths_use_no_job_only_variables(tmp_path: Path) -> None:
    """includes.md "Use variables with include" / predefined_variables.md "Variable
    availability": job-only variables such as CI_PROJECT_DIR are not expanded in include."""
    with pytest.raises(CIError, match=r"Local file `\$CI_PROJECT_DIR/a.yml` does not exist!"):
        pipeline(tmp_path, "include: $CI_PROJECT_DIR/a.yml\njob: {script: [x]}\n",
                 {"a.yml": "x: {script: [x]}\n"}, {"CI_PROJECT_DIR": ""})


def test_include_link_out_of_the_project_is_refused(tmp_path: Path) -> None:
    """ci/yaml "include:local" (files of the same repository): a link leaving the project is
    refused and its target never read."""
    outside = tmp_path.parent / f"{tmp_path.name}-outside.yml"
    outside.write_text("stolen: {script: [x]}\n")
    (tmp_path / "ci").mkdir()
    (tmp_path / "ci" / "a.yml").symlink_to(outside)
    with pytest.raises(CIError) as caught:
        pipeline(tmp_path, "include: ci/a.yml\njob: {script: [x]}\n")
    assert "stolen" not in str(caught.value)


@pytest.mark.parametrize(("body", "message"), [
    ("{script: [x], artifacts: {paths: a}}", "artifacts:paths config should be an array of s"),
    ("{script: [x], artifacts: {when: never}}", "artifacts when should be on_success, on_fai"),
    ("{script: [x], artifacts: {expire}}", "artifacts config contains unknown keys: expire"),
    ("{script: [x], cache: [1]}", "cache config should be a hash or an array of hashes"),
    ("{script: [x], cache: [{}, {}, {}, {}, {}]}", "no more than 4 caches can be created"),
    ("{script: [x], cache: {key: [a]}}", "cache:key config should be a hash, a string"),
    ("{script: [x], cache: {key: {files: a}}}", "cache:key:files config should be an array"),
    ("{script: [x], environment: {url: x}}", "environment name can't be blank"),
    ("{script: [x], environment: {name: p, action: go}}", "environment action should be"),
    ("{trigger: {projekt: a}}", "trigger config contains unknown keys: projekt"),
    ("{script: [x], retry: {max: 1, when: [1]}}", "retry when should be a string or an arr"),
    ("{script: [x], retry: {max: 1, exit_codes: [a]}}", "retry exit_codes should be an int"),
    ("{script: [x], hooks: {pre_get_sources_script: {a: 1}}}",
     "hooks:pre_get_sources_script config should be a string or a nested array"),
    ("{script: [x], id_tokens: {T: {aud: 1}}}", "id_tokens:T:aud config should be a string"),
    ("{script: [x], secrets: {S: 1}}", "secrets config should be a hash of hashes"),
    ("{script: [x], release: {name: r}}", "release tag name can't be blank"),
    ("{script: [x], pages: 1}", "pages config should be a hash or a boolean value"),
    ("{script: [x], identity: [g]}", "identity config should be a string"),
])
def test_keywords_kata_ci_ignores_are_still_validated(tmp_path: Path, body: str,
                                                      message: str) -> None:
    """ci/yaml "artifacts", "cache", "retry", "environment", "trigger", "hooks", "id_tokens",
    "secrets", "release", "pages", "identity" ("Possible inputs"): a shape GitLab rejects is
    refused with file:line and the job, though kata-ci does not act on the keyword."""
    with pytest.raises(CIError, match=r"\.gitlab-ci\.yml:1: jobs:job:?.*" + message):
        pipeline(tmp_path, f"job: {body}\n")


def test_documented_shapes_of_ignored_keywords_pass(tmp_path: Path) -> None:
    """ci/yaml "artifacts", "cache", "environment", "id_tokens", "release", "pages",
    "hooks", "retry": the documented forms load (the checks above refuse no valid file)."""
    p = pipeline(tmp_path, """\
default:
  cache: [{key: {files: [Gemfile.lock], prefix: r}, paths: [vendor], policy: pull}]
  hooks: {pre_get_sources_script: [echo hi]}
  retry: {max: 2, when: [runner_system_failure], exit_codes: 137}
job:
  script: [x]
  artifacts: {paths: [out], exclude: [out/*.o], when: always, expire_in: 1 week,
              reports: {junit: r.xml}}
  environment: {name: review/$CI_COMMIT_REF_SLUG, url: https://x, action: start}
  id_tokens: {T: {aud: [a, b]}}
  release: {tag_name: v1, description: d, milestones: m1}
  pages: {publish: public}
  secrets: {S: {vault: a/b@c}}
  identity: google_cloud
""")
    assert [j.name for j in p.jobs] == ["job"]


@pytest.mark.parametrize(("text", "line"), [
    ("null: {script: [x]}\n", 1),
    ("job: {script: [x]}\n1: {script: [x]}\n", 2),
    ("job: {script: [x]}\ntrue: {script: [x]}\n", 2),
])
def test_top_level_keys_must_be_strings(tmp_path: Path, text: str, line: int) -> None:
    """ci/yaml "Job keywords" (a job name is a string): `null:`, `1:` or `true:` at the top
    level is refused on its own line."""
    with pytest.raises(CIError, match=rf"\.gitlab-ci\.yml:{line}: .* a job name or keyword "
                                      "must be a string"):
        pipeline(tmp_path, text)


def test_top_level_merge_key_is_a_yaml_anchor(tmp_path: Path) -> None:
    """yaml_optimization.md "Anchors": `<<: *anchor` at the top level merges the anchored
    jobs in (a merge key, not a job name)."""
    p = pipeline(tmp_path, ".t: &t {a: {script: [x]}}\n<<: *t\nb: {script: [y]}\n")
    assert [j.name for j in p.jobs] == ["a", "b"]
