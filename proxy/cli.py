"""``bedrock-proxy`` command line: serve, and the admin commands built on the same config."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import ssl
import sys

from aiohttp import web

from .accesslog import configure_logging
from .app import STATE, create_app, create_ops_app
from .config import ConfigError, Settings, load_settings
from .tls import TLSConfigError, load_chain, server_context, write_self_signed

log = logging.getLogger("bedrock_proxy")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bedrock-proxy", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run the proxy")
    serve.add_argument("--config", help="YAML settings file (BEDROCK_PROXY_CONFIG)")
    serve.add_argument("--host", help="listen address (default 0.0.0.0)")
    serve.add_argument("--port", type=int, help="listen port (default 4000)")
    serve.add_argument(
        "--tls-cert", help="PEM certificate chain: serve HTTPS (BEDROCK_PROXY_TLS_CERT)"
    )
    serve.add_argument("--tls-key", help="PEM private key for --tls-cert (BEDROCK_PROXY_TLS_KEY)")
    serve.add_argument("--http-port", type=int, help="also serve health checks over plain HTTP")
    serve.add_argument(
        "--allow-unauthenticated",
        action="store_true",
        default=None,
        help="serve without client authentication when no master key is set",
    )
    selfsigned = commands.add_parser(
        "tls-selfsigned", help="write a self-signed certificate for localhost and 127.0.0.1"
    )
    selfsigned.add_argument("--out", required=True, help="directory for cert.pem and key.pem")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "serve":
        return _serve_command(args)
    if args.command == "tls-selfsigned":
        cert, _ = write_self_signed(args.out)
        # The two things a boto3 user needs: pass verify=, or set AWS_CA_BUNDLE.
        print(f'verify="{cert}"')
        print(f"export AWS_CA_BUNDLE={cert}")
        return 0
    return 2


def _serve_command(args: argparse.Namespace) -> int:
    try:
        settings = load_settings(
            args.config,
            overrides={
                "host": args.host,
                "port": args.port,
                "allow_unauthenticated": args.allow_unauthenticated,
                "tls_cert": args.tls_cert,
                "tls_key": args.tls_key,
                "http_port": args.http_port,
            },
        )
        configure_logging(settings.log_level)
        app = create_app(settings)
        tls = server_context(settings.tls_cert, settings.tls_key) if settings.tls_cert else None
    except ConfigError as exc:
        print(f"bedrock-proxy: {exc}", file=sys.stderr)
        return 2
    except TLSConfigError as exc:
        print(f"bedrock-proxy: config error: {exc}", file=sys.stderr)
        return 2
    _install_uvloop()
    try:
        asyncio.run(serve(app, settings, tls))
    except OSError as exc:
        print(
            f"bedrock-proxy: cannot listen on {settings.host}:{settings.port}: {exc.strerror}",
            file=sys.stderr,
        )
        return 1
    return 0


async def serve(
    app: web.Application, settings: Settings, tls: ssl.SSLContext | None = None
) -> None:
    """Run until SIGTERM or SIGINT, then stop accepting and let requests finish."""
    runners = [web.AppRunner(app, handler_cancellation=True, access_log=None)]
    if settings.http_port is not None:
        runners.append(web.AppRunner(create_ops_app(app), access_log=None))
    for runner in runners:
        await runner.setup()
    try:
        site = web.TCPSite(runners[0], settings.host, settings.port, backlog=1024, ssl_context=tls)
        await site.start()
        scheme = "https" if tls else "http"
        log.info("listening on %s://%s:%d/bedrock", scheme, settings.host, settings.port)
        if settings.http_port is not None:
            await web.TCPSite(runners[1], settings.host, settings.http_port).start()
            log.info("health checks on http://%s:%d/health", settings.host, settings.http_port)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        if tls is not None:
            loop.add_signal_handler(signal.SIGHUP, _reload_tls, tls, settings)
        await stop.wait()
        log.info("shutting down")
        app[STATE]["ready"] = False
    finally:
        for runner in reversed(runners):
            await runner.cleanup()


def _reload_tls(context: ssl.SSLContext, settings: Settings) -> None:
    """SIGHUP: new handshakes get the new certificate; open connections keep theirs."""
    try:
        load_chain(context, settings.tls_cert, settings.tls_key)
    except TLSConfigError as exc:
        log.error("certificate reload failed, keeping the current one: %s", exc)
    else:
        log.info("certificate reloaded from %s", settings.tls_cert)


def _install_uvloop() -> None:
    with contextlib.suppress(ImportError):
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
