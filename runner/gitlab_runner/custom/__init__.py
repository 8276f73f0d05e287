"""kata-ci as a custom-executor driver for gitlab-runner (config, prepare, run, cleanup)."""
