"""kata-ci as a GitLab runner: the runner API client, the poller, and the worker's side
of a GitLab job."""
