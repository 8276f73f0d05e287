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
