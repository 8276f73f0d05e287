"""``kata-ci status``: the read-only status page (runner/ops/web), served by uvicorn.

Loopback by default. Bound anywhere else it needs a token (``--token-file`` or
``$KATA_CI_STATUS_TOKEN``): the page shows job names, commands and logs, which are not for
everyone who can reach the host. Exit 2 with one line for bad usage, as the queue commands.
"""

from __future__ import annotations

import ipaddress
import os
import socket
from pathlib import Path
from types import FrameType

import click

from kata_ci.errors import UserError
from kata_ci.runner.cli.queue import _usage_errors, config_option, err
from kata_ci.runner.queue.store import JobStore

DEFAULT_LISTEN = "127.0.0.1:8480"
TOKEN_ENV = "KATA_CI_STATUS_TOKEN"
MIN_TOKEN = 16  # characters: a token short enough to guess protects nothing


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # another name: it may resolve anywhere


def read_token(token_file: Path | None) -> str:
    """The token from the file (trailing whitespace dropped), else from the environment;
    '' when neither is given."""
    if token_file is not None:
        try:
            token = token_file.read_text().strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise UserError(f"--token-file {token_file}: {exc}") from None
        where = f"--token-file {token_file}"
    else:
        token = os.environ.get(TOKEN_ENV, "").strip()
        where = f"${TOKEN_ENV}"
        if not token:
            return ""
    if len(token) < MIN_TOKEN:
        raise UserError(f"{where}: the token must be at least {MIN_TOKEN} characters")
    return token


def bind(host: str, port: int, listen: str) -> socket.socket:
    """The listening socket, made here so that a taken port or an address this host does
    not have is one line and exit 2, before the server starts."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        return socket.create_server((host, port), family=family, backlog=128)
    except OSError as exc:
        raise UserError(f"--listen {listen}: {exc.strerror or exc}") from None


@click.command()
@click.option("--listen", default=DEFAULT_LISTEN, show_default=True, metavar="HOST:PORT",
              help="Where to serve the page. Anything but loopback needs a token.")
@click.option("--token-file", type=click.Path(path_type=Path),
              help=f"A file holding the token every request must carry (or ${TOKEN_ENV}). "
                   "Open the page once as /?token=TOKEN (it sets a cookie), or send "
                   "Authorization: Bearer TOKEN.")
@config_option
@_usage_errors
def status(listen: str, token_file: Path | None, config_path: Path | None) -> None:
    """Serve the read-only status page: jobs, their timings, VMs per host, live logs."""
    from kata_ci.runner.cli.daemon_options import parse_listen
    from kata_ci.runner.core import config as config_mod

    host, port = parse_listen(listen, "--listen")
    token = read_token(token_file)
    if not token and not is_loopback(host):
        raise UserError(f"refusing to serve the status page on {host} without a token: give "
                        f"--token-file or ${TOKEN_ENV}, or listen on loopback")
    cfg = config_mod.load(config_path)
    # No requeue function: the page never ends or queues a job. A short outage budget: a
    # Redis outage shows on the page as an error instead of requests that hang for minutes.
    store = JobStore.connect(cfg.queue.broker, cfg.queue.log_limit_mib << 20,
                             outage_seconds=5.0)
    sock = bind(host, port, listen)
    shown = f"[{host}]" if ":" in host else host
    err.print(f"kata-ci status: serving http://{shown}:{sock.getsockname()[1]}/"
              + (" (token required)" if token else ""), soft_wrap=True)
    serve(store, token, sock)


def serve(store: JobStore, token: str, sock: socket.socket) -> None:
    import uvicorn

    from kata_ci.runner.ops.web.app import WebSettings, close_streams, create_app

    app = create_app(store, WebSettings(token=token))

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: FrameType | None) -> None:
            close_streams(app)  # followed logs would otherwise hold the shutdown
            super().handle_exit(sig, frame)

    # No access log: a /?token=... request line would put the token in it. A stream still
    # open 5 s into the shutdown is cut.
    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off",
                            proxy_headers=False, server_header=False,
                            timeout_graceful_shutdown=5)
    Server(config).run(sockets=[sock])
