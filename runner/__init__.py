"""The runner: CLI, configuration, job sources and the job runner that drives executors."""
