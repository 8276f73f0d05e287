"""The read-only status page of `kata-ci status`: a Starlette app over the job store
(app.py) and its plain HTML/CSS/JS (static/), served as they are: no build step."""

from kata_ci.runner.ops.web.app import WebSettings, create_app

__all__ = ["WebSettings", "create_app"]
