"""GitLab CI keywords: which belong where, and the values GitLab accepts (doc: ci/yaml)."""

from __future__ import annotations

JOB_KEYS = {
    "after_script", "allow_failure", "artifacts", "before_script", "cache", "coverage",
    "dependencies", "environment", "extends", "hooks", "id_tokens", "identity", "image",
    "inherit", "interruptible", "manual_confirmation", "needs", "only", "except", "pages",
    "parallel", "release", "resource_group", "retry", "rules", "script", "secrets", "services",
    "stage", "tags", "timeout", "trigger", "variables", "when", "start_in", "run",
    "dast_configuration",
}
GLOBAL_KEYS = {"default", "include", "stages", "variables", "workflow", "image", "services",
               "cache", "before_script", "after_script", "spec"}
DEFAULT_KEYS = {"after_script", "artifacts", "before_script", "cache", "hooks", "id_tokens",
                "image", "interruptible", "retry", "services", "tags", "timeout"}
DEFAULT_STAGES = [".pre", "build", "test", "deploy", ".post"]
WHENS = {"on_success", "on_failure", "always", "manual", "never", "delayed"}  # in rules
JOB_WHENS = {"on_success", "on_failure", "always", "manual", "delayed"}  # `never`: rules only
RULE_KEYS = {"if", "changes", "exists", "when", "allow_failure", "variables", "needs",
             "start_in", "interruptible"}
WORKFLOW_KEYS = {"rules", "name", "auto_cancel"}
WORKFLOW_RULE_KEYS = {"if", "changes", "exists", "when", "variables", "auto_cancel"}
# Predefined variables GitLab gives jobs only (predefined_variables.md, "Job-only"): not
# available to `include` or `rules`.
JOB_ONLY = {"CI_BUILDS_DIR", "CI_PROJECT_DIR", "CI_JOB_ID", "CI_JOB_URL", "CI_JOB_STARTED_AT",
            "CI_JOB_STATUS", "CI_JOB_TIMEOUT", "CI_JOB_TOKEN", "CI_PIPELINE_ID",
            "CI_PIPELINE_URL", "CI_SERVER", "CI_REPOSITORY_URL", "CI_REGISTRY_USER",
            "CI_REGISTRY_PASSWORD", "CI_DEPLOY_USER", "CI_DEPLOY_PASSWORD",
            "CI_TRIGGER_SHORT_TOKEN"}
JOB_ONLY_PREFIXES = ("CI_RUNNER_", "CI_CONCURRENT_")
