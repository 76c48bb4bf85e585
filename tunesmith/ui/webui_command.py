"""`tunesmith webui`: the browser UI, on this machine only unless asked otherwise, and then only with a password.

It binds 127.0.0.1. `--host 0.0.0.0` (or another address) and `--share` (a public gradio.live link) expose the page,
which can start processes and read files under its directories, so they need `--auth user:password` (or
GRADIO_AUTH); without it they are refused with the reason. GRADIO_SERVER_NAME, GRADIO_SERVER_PORT and GRADIO_SHARE
are read as Gradio reads them; analytics are always off.
"""

from __future__ import annotations

import argparse
import importlib.util
import ipaddress
import os
from pathlib import Path

from tunesmith.errors import ConfigError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", help="address to listen on (env GRADIO_SERVER_NAME); default 127.0.0.1")
    parser.add_argument("--port", type=int, help="port (env GRADIO_SERVER_PORT); default 7860")
    parser.add_argument("--share", action="store_true", help="also open a public gradio.live link (needs --auth)")
    parser.add_argument("--auth", help="user:password that the login page asks for (env GRADIO_AUTH)")
    parser.add_argument(
        "--allow-path",
        action="append",
        default=[],
        metavar="DIR",
        help="a directory the page may read and write besides the one it starts in (repeatable)",
    )
    parser.add_argument(
        "--state-dir", help="where the job list is kept (default: ~/.cache/tunesmith/webui); a restart finds jobs there"
    )
    parser.add_argument("--lang", choices=("en", "zh"), default="en", help="the page's first language")


def run(args: argparse.Namespace) -> int:
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"  # before gradio is imported: it reads this at import
    host = args.host or os.environ.get("GRADIO_SERVER_NAME") or "127.0.0.1"
    port = args.port or int(os.environ.get("GRADIO_SERVER_PORT") or 7860)
    share = args.share or os.environ.get("GRADIO_SHARE", "").lower() in ("1", "true", "yes")
    auth = parse_auth(args.auth or os.environ.get("GRADIO_AUTH"))
    check_exposure(host, share, auth)
    if importlib.util.find_spec("gradio") is None:
        raise ConfigError("tunesmith webui needs gradio: install the webui extra, pip install 'tunesmith[webui]'")

    from tunesmith.paths import cache_root
    from tunesmith.ui.app import CSS, create_app
    from tunesmith.ui.context import UiContext

    state_dir = Path(args.state_dir) if args.state_dir else cache_root() / "webui"
    context = UiContext.create(Path.cwd(), args.allow_path, state_dir)
    app = create_app(context, args.lang)
    print(f"tunesmith webui: http://{host}:{port}/ (files under {', '.join(map(str, context.policy.roots))})")
    app.queue(default_concurrency_limit=4).launch(
        server_name=host,
        server_port=port,
        share=share,
        auth=auth,
        css=CSS,
        footer_links=[],
        inbrowser=False,
        quiet=True,
    )
    return 0


def parse_auth(value: str | None) -> tuple[str, str] | None:
    if not value:
        return None
    user, sep, password = value.partition(":")
    if not sep or not user or not password:
        raise ConfigError("--auth: expected user:password (both non-empty)")
    return user, password


def check_exposure(host: str, share: bool, auth: tuple[str, str] | None) -> None:
    """Refuse to expose the page without a password: it starts processes and reads and writes files."""
    if auth is not None:
        return
    if share:
        raise ConfigError(
            "--share puts the page on a public gradio.live address, and the page can start training and read "
            "files; give --auth user:password (or GRADIO_AUTH)"
        )
    if not is_loopback(host):
        raise ConfigError(
            f"--host {host} lets other machines open the page, which can start training and read files; "
            "give --auth user:password (or GRADIO_AUTH), or keep the default 127.0.0.1"
        )


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        return False
