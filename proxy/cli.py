"""``bedrock-proxy`` command line: serve, and the admin commands built on the same config."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys

from aiohttp import web

from .accesslog import configure_logging
from .app import STATE, create_app
from .config import ConfigError, Settings, load_settings

log = logging.getLogger("bedrock_proxy")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bedrock-proxy", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run the proxy")
    serve.add_argument("--config", help="YAML settings file (BEDROCK_PROXY_CONFIG)")
    serve.add_argument("--host", help="listen address (default 0.0.0.0)")
    serve.add_argument("--port", type=int, help="listen port (default 4000)")
    serve.add_argument(
        "--allow-unauthenticated",
        action="store_true",
        default=None,
        help="serve without client authentication when no master key is set",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "serve":
        return _serve_command(args)
    return 2


def _serve_command(args: argparse.Namespace) -> int:
    try:
        settings = load_settings(
            args.config,
            overrides={
                "host": args.host,
                "port": args.port,
                "allow_unauthenticated": args.allow_unauthenticated,
            },
        )
        configure_logging(settings.log_level)
        app = create_app(settings)
    except ConfigError as exc:
        print(f"bedrock-proxy: {exc}", file=sys.stderr)
        return 2
    _install_uvloop()
    try:
        asyncio.run(serve(app, settings))
    except OSError as exc:
        print(
            f"bedrock-proxy: cannot listen on {settings.host}:{settings.port}: {exc.strerror}",
            file=sys.stderr,
        )
        return 1
    return 0


async def serve(app: web.Application, settings: Settings) -> None:
    """Run until SIGTERM or SIGINT, then stop accepting and let requests finish."""
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, settings.host, settings.port, backlog=1024)
        await site.start()
        log.info("listening on http://%s:%d/bedrock", settings.host, settings.port)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        log.info("shutting down")
        app[STATE]["ready"] = False
    finally:
        await runner.cleanup()


def _install_uvloop() -> None:
    with contextlib.suppress(ImportError):
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
