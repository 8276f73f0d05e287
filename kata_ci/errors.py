"""The one exception root, and the two classes every failure is sorted into.

A failure is classed once, where it is raised: ``UserError`` (bad input or configuration,
nothing was started) or ``SystemFailure`` (the machinery failed: VM died, agent silent,
virtiofsd gone). A job's own non-zero exit is not an exception at all: it is an outcome.
"""

from __future__ import annotations


class KataCIError(Exception):
    """Root of every error kata-ci raises on purpose."""


class UserError(KataCIError):
    """Bad input, configuration or environment that the user can fix; nothing was started."""


class ImagesMissing(UserError):
    """Guest images are absent or older than the code that would boot them."""


class SystemFailure(KataCIError):
    """The sandbox failed underneath the job (GitLab's runner_system_failure).

    ``diagnostics`` carries what an operator needs: the tail of the guest console and backend logs.
    """

    def __init__(self, message: str, diagnostics: str = "") -> None:
        super().__init__(message)
        self.diagnostics = diagnostics

    def __str__(self) -> str:
        base = super().__str__()
        if not self.diagnostics:
            return base
        return f"{base}\n--- last guest console lines ---\n{self.diagnostics}"


class RestoreFailed(SystemFailure):
    """A VM could not be restored from its snapshot (corrupt or foreign file, QEMU refused
    the state). Nothing of the job ran yet: the provider boots the job cold instead."""


class RestoreStalled(RestoreFailed):
    """A restored VM whose agent did not answer within the boot timeout. Nothing of the job
    ran: it boots cold instead, but the template stays (a loaded host is slow, not the file
    broken). The churn bench saw it once in 1,000 restores under TCG."""


class ImagePullFailure(SystemFailure):
    """A job's OCI image could not be made ready (GitLab's failure_reason
    ``image_pull_failure``), raised before any job script runs. The message is one line that
    says what to fix: an unknown image or tag, a registry unreachable, credentials refused or
    missing, a corrupt layer, an image for another architecture, one too large, or pull_policy
    ``never`` with the image not cached."""

    reason = "image_pull_failure"  # Outcome.reason: what GitLab is told
