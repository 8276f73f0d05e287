"""kata-ci as a provider of GitHub Actions runners: the webhook endpoint, demand and
reconcile, the GitHub API client, and the worker's side (one JIT runner in one VM)."""
