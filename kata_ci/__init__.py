"""kata-ci: every CI job in a fresh microVM with its own kernel.

This module is imported inside the guest too (the agent lives in ``kata_ci.guest``), so it must
stay free of imports: every import costs seconds under TCG emulation.
"""

__version__ = "0.1.0"
