"""``bedrock-proxy`` command line: serve, and the admin commands built on the same config."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import getpass
import json
import logging
import os
import resource
import secrets
import shutil
import signal
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar
from urllib.parse import urlsplit

from aiohttp import web

from ..access.keyservice import KeyService
from ..access.secretbox import SecretBox
from ..metering.limits import usd
from ..metering.reports import Reports
from ..observe.accesslog import configure_logging
from ..server.app import PIPELINE, STATE, StartupError, create_app, create_ops_app
from ..server.config import ConfigError, Settings, load_settings
from ..server.listen.runner import ProxyRunner
from ..server.listen.tls import TLSConfigError, load_chain, server_context, write_self_signed
from ..store import Store, open_store
from ..store.audit import Actor
from ..store.records import ALLOW_LIST_FIELDS
from ..wire.errors import AwsError
from ..wire.h2server import Http2Limits
from . import login
from .demo import client_lines, send_demo_traffic, try_it_key

# Who the audit log names for the CLI's changes: the operating-system user running it.
CLI_ACTOR = Actor("cli", getpass.getuser())

log = logging.getLogger("bedrock_proxy")
_T = TypeVar("_T")


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
    serve.add_argument("--workers", type=int, help="processes sharing the port (default 1)")
    serve.add_argument(
        "--simulate",
        action="store_true",
        default=None,
        help="answer Bedrock calls from the built-in simulator, not AWS (labelled everywhere)",
    )
    serve.add_argument(
        "--allow-unauthenticated",
        action="store_true",
        default=None,
        help="serve without client authentication when no master key is set",
    )
    demo = commands.add_parser(
        "demo", help="serve on the built-in simulator with demo keys and traffic (make demo)"
    )
    demo.add_argument("--port", type=int, default=4000)
    demo.add_argument(
        "--tls-port", type=int, default=4443, help="HTTPS, with a generated certificate (0: none)"
    )
    demo.add_argument("--sqlite-path", default="demo.db")
    demo.add_argument("--requests", type=int, default=60, help="demo calls sent at startup")
    keys = commands.add_parser("keys", help="manage virtual keys in the configured store")
    keys.add_argument("--config", help="YAML settings file (BEDROCK_PROXY_CONFIG)")
    key_commands = keys.add_subparsers(dest="keys_command", required=True)
    create = key_commands.add_parser("create", help="mint a key; prints its secrets once")
    _key_fields(create)
    listing = key_commands.add_parser("list", help="list keys")
    listing.add_argument("--user")
    listing.add_argument("--team")
    listing.add_argument("--page", type=int, default=1)
    listing.add_argument("--size", type=int, default=100)
    for name, text in (
        ("info", "show one key"),
        ("revoke", "delete a key; every replica refuses it within key_cache_ttl"),
        ("regenerate", "new token and access key pair; the old ones stop working"),
    ):
        key_commands.add_parser(name, help=text).add_argument(
            "key", help="token, key id, access key id or alias"
        )
    update = key_commands.add_parser("update", help="change a key")
    update.add_argument("key", help="token, key id, access key id or alias")
    _key_fields(update)
    blocking = update.add_mutually_exclusive_group()
    blocking.add_argument("--block", dest="blocked", action="store_true", default=None)
    blocking.add_argument("--unblock", dest="blocked", action="store_false")

    teams = commands.add_parser("teams", help="teams' settings: the upstream pool they use")
    teams.add_argument("--config", help="YAML settings file (BEDROCK_PROXY_CONFIG)")
    team_commands = teams.add_subparsers(dest="teams_command", required=True)
    team_set = team_commands.add_parser("set", help="set a team's upstream pool")
    team_set.add_argument("team", help="the team_id its keys carry")
    team_set.add_argument("--upstream", help="a pool name; omit to clear it")
    team_commands.add_parser("info", help="show one team").add_argument("team")
    team_commands.add_parser("list", help="list teams with settings")
    for sub in (*key_commands.choices.values(), *team_commands.choices.values()):
        sub.add_argument("--json", action="store_true", help="print JSON (for scripts)")

    spend = commands.add_parser("spend", help="spend report from the ledger, as a table")
    spend.add_argument("--config", help="YAML settings file (BEDROCK_PROXY_CONFIG)")
    spend.add_argument(
        "--group-by",
        default="key",
        help="key, user, team, model, operation, tag, limit, use_case, end_user or day",
    )
    spend.add_argument("--start", help="ISO 8601 time or date (inclusive)")
    spend.add_argument("--end", help="ISO 8601 time or date (exclusive)")
    spend.add_argument("--json", action="store_true", help="print JSON instead of a table")

    login_cmd = commands.add_parser(
        "login", help="sign in through the proxy's single sign-on, for short-lived keys"
    )
    login_cmd.add_argument("--url", required=True, help="the proxy, e.g. https://gateway.example")
    login_cmd.add_argument(
        "--no-browser", action="store_true", help="print the address only; open it yourself"
    )
    token_cmd = commands.add_parser(
        "token", help="print a short-lived key for the signed-in user (after login)"
    )
    token_cmd.add_argument(
        "--format",
        choices=("key", "credential-process", "env"),
        default="key",
        help="key (apiKeyHelper, SDKs), credential-process (AWS SDKs and CLI), env",
    )

    audit = commands.add_parser("audit", help="the audit log in the configured store")
    audit.add_argument("--config", help="YAML settings file (BEDROCK_PROXY_CONFIG)")
    audit_commands = audit.add_subparsers(dest="audit_command", required=True)
    audit_commands.add_parser(
        "verify", help="check the audit log's hash chain; exit 1 if a row was changed"
    )

    selfsigned = commands.add_parser(
        "tls-selfsigned", help="write a self-signed certificate for localhost and 127.0.0.1"
    )
    selfsigned.add_argument("--out", required=True, help="directory for cert.pem and key.pem")
    return parser


def _key_fields(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add("--alias", dest="key_alias")
    add("--user", dest="user_id")
    add("--team", dest="team_id")
    add("--models", type=_csv, help="comma-separated model IDs, ARNs or globs")
    add("--groups", dest="operation_groups", type=_csv, help="comma-separated operation groups")
    add("--guardrails", dest="guardrail_ids", type=_csv)
    add("--knowledge-bases", dest="knowledge_base_ids", type=_csv)
    add("--agents", dest="agent_ids", type=_csv)
    add("--flows", dest="flow_ids", type=_csv)
    add("--buckets", dest="file_buckets", type=_csv, help="S3 buckets for files and batch URIs")
    add("--prefixes", dest="file_prefixes", type=_csv, help="S3 key prefixes within them")
    add("--agent-runtimes", dest="agent_runtime_arns", type=_csv, help="AgentCore runtimes")
    add("--memories", dest="memory_ids", type=_csv, help="AgentCore memories")
    add("--code-interpreters", dest="code_interpreter_ids", type=_csv)
    add("--browsers", dest="browser_ids", type=_csv)
    add("--evaluators", dest="evaluator_ids", type=_csv)
    add("--gateways", dest="gateway_ids", type=_csv)
    add("--registries", dest="registry_ids", type=_csv)
    add("--duration", help="lifetime such as 30d or 12h")
    add("--expires", help="expiry time, ISO 8601")
    add("--budget", dest="max_budget", type=float)
    add("--budget-duration", dest="budget_duration")
    add("--rpm", dest="rpm_limit", type=int)
    add("--tpm", dest="tpm_limit", type=int)
    add("--parallel", dest="max_parallel_requests", type=int)
    add("--metadata", type=json.loads, help="a JSON object")
    add("--upstream", help="the upstream pool this key's requests go to (upstreams.pools)")


_KEY_FIELDS = (
    "key_alias",
    "user_id",
    "team_id",
    "models",
    "operation_groups",
    *ALLOW_LIST_FIELDS,
    "duration",
    "expires",
    "max_budget",
    "budget_duration",
    "rpm_limit",
    "tpm_limit",
    "max_parallel_requests",
    "metadata",
    "blocked",
    "upstream",
)


def _csv(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "serve":
        return _serve_command(args)
    if args.command == "keys":
        return _keys_command(args)
    if args.command == "demo":
        return _demo_command(args)
    if args.command == "spend":
        return _spend_command(args)
    if args.command == "audit":
        return _audit_command(args)
    if args.command == "login":
        return login.login(args.url, open_browser=not args.no_browser)
    if args.command == "token":
        return login.token(args.format)
    if args.command == "teams":
        return _teams_command(args)
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
                "workers": args.workers,
                "simulate": args.simulate,
            },
        )
        configure_logging(settings.log_level)
        if settings.workers > 1:
            return supervise(settings.workers)
        app = create_app(settings)
        tls = None
        if settings.tls_cert is not None:
            assert settings.tls_key is not None  # the config requires both or neither
            tls = server_context(settings.tls_cert, settings.tls_key)
    except ConfigError as exc:
        print(f"bedrock-proxy: {exc}", file=sys.stderr)
        return 2
    except TLSConfigError as exc:
        print(f"bedrock-proxy: config error: {exc}", file=sys.stderr)
        return 2
    _install_uvloop()
    _tune_gc()
    _raise_open_files_limit()
    try:
        asyncio.run(serve(app, settings, tls))
    except StartupError as exc:
        print(f"bedrock-proxy: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(
            f"bedrock-proxy: cannot listen on {settings.host}:{settings.port}: {exc.strerror}",
            file=sys.stderr,
        )
        return 1
    return 0


def _demo_command(args: argparse.Namespace) -> int:
    """The proxy on loopback, on the simulator, with demo keys and traffic; the master key
    is BEDROCK_PROXY_MASTER_KEY, or the demo store's own (printed at startup)."""
    master = os.environ.get("BEDROCK_PROXY_MASTER_KEY") or _demo_master_key(args.sqlite_path)
    try:
        settings = load_settings(
            env={},
            overrides={
                "host": "127.0.0.1",
                "port": args.port,
                "master_key": master,
                "sqlite_path": args.sqlite_path,
                "simulate": True,
                "access_log": False,
                # Simulated agents' answers name no tokens: a price per call, so that
                # budgeted demo keys may call them.
                "request_prices": {"InvokeAgent": 0.001, "InvokeAgentRuntime": 0.001},
            },
        )
        configure_logging(settings.log_level)
        app = create_app(settings)
    except ConfigError as exc:
        print(f"bedrock-proxy: {exc}", file=sys.stderr)
        return 2
    base = f"http://127.0.0.1:{args.port}"
    tls_base = ca = None
    also_tls = None
    if args.tls_port:
        # Beside the demo's store, made once: the CA path printed stays the same.
        tls_dir = os.path.join(os.path.dirname(os.path.abspath(args.sqlite_path)), "demo-tls")
        ca, key_file = os.path.join(tls_dir, "cert.pem"), os.path.join(tls_dir, "key.pem")
        if not (os.path.exists(ca) and os.path.exists(key_file)):
            ca, key_file = write_self_signed(tls_dir)
        tls_base = f"https://127.0.0.1:{args.tls_port}"
        also_tls = (args.tls_port, server_context(ca, key_file))

    async def run() -> None:
        server = asyncio.create_task(serve(app, settings, also_tls=also_tls))
        try:
            keys = await send_demo_traffic(base, master, args.requests)
            mine = await try_it_key(base, master)
        except Exception as exc:
            print(f"bedrock-proxy demo: the demo traffic failed: {exc}", file=sys.stderr)
        else:
            served = base + (f" and {tls_base}" if tls_base else "")
            print(f"\nSimulated Bedrock on {served}", flush=True)
            print(f"Console: {base}/ui  (sign in with {master})", flush=True)
            for key in keys:
                print(f"  demo key {key['key_alias']}: {key['key']}", flush=True)
            admin = (master, os.path.abspath(args.sqlite_path))
            lines = client_lines(mine, base, tls_base, ca, admin)
            print("\n" + "\n".join(lines) + "\n", flush=True)
        await server

    _install_uvloop()
    try:
        asyncio.run(run())
    except OSError as exc:
        print(f"bedrock-proxy: cannot listen on 127.0.0.1: {exc.strerror}", file=sys.stderr)
        return 1
    return 0


def _demo_master_key(sqlite_path: str) -> str:
    """A master key of the demo store's own, random, kept owner-only beside it: the demo
    prints it as an export line, and a well-known one left in a shell would become the
    master key of the next proxy started from it. (It also seals the demo keys' secrets,
    so it must outlive a restart.)"""
    path = os.path.join(os.path.dirname(os.path.abspath(sqlite_path)), "demo-master-key")
    try:
        with open(path, encoding="ascii") as existing:
            key = existing.read().strip()
            if key:
                return key
    except FileNotFoundError:
        pass
    key = "sk-demo-" + secrets.token_urlsafe(24)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="ascii") as out:
        out.write(key + "\n")
    return key


def describe_store(settings: Settings) -> str:
    """Which store a command uses, for the operator (never a password)."""
    if settings.database_url:
        url = urlsplit(settings.database_url)
        where = f"{url.hostname or 'localhost'}{':' + str(url.port) if url.port else ''}"
        return f"PostgreSQL {where}{url.path}"
    return f"SQLite {os.path.abspath(settings.sqlite_path)}"


def _with_store(
    args: argparse.Namespace,
    work: Callable[[Settings, Store], Awaitable[_T]],
    *,
    creates: bool = False,
    check: Callable[[Settings], None] | None = None,
) -> tuple[int, _T | None]:
    """Load settings as ``serve`` does, open that store, run one job on it: (exit code,
    result). The store is named on stderr. A SQLite file is created only by a command that
    ``creates`` (a key, a team), and only once ``check`` has passed: a command that fails
    leaves no empty store behind."""
    try:
        settings = load_settings(args.config)
    except ConfigError as exc:
        print(f"bedrock-proxy: {exc}", file=sys.stderr)
        return 2, None
    print(f"bedrock-proxy: store: {describe_store(settings)}", file=sys.stderr)
    try:
        if check is not None:
            check(settings)
    except AwsError as exc:
        print(f"bedrock-proxy: {exc.code}: {exc.message}", file=sys.stderr)
        return 2, None
    if not settings.database_url and not creates and not os.path.exists(settings.sqlite_path):
        print(
            f"bedrock-proxy: there is no store at {os.path.abspath(settings.sqlite_path)}: "
            "point the command at the one the server uses (--config, "
            "BEDROCK_PROXY_DATABASE_URL or BEDROCK_PROXY_SQLITE_PATH; "
            "make demo's is BEDROCK_PROXY_SQLITE_PATH=demo.db)",
            file=sys.stderr,
        )
        return 1, None

    async def run() -> _T:
        # Not a request: a report over a large ledger may take longer than serving allows.
        store = open_store(settings.database_url, settings.sqlite_path, timeout=60.0)
        await store.open()
        try:
            return await work(settings, store)
        finally:
            await store.close()

    try:
        return 0, asyncio.run(run())
    except AwsError as exc:
        print(f"bedrock-proxy: {exc.code}: {exc.message}", file=sys.stderr)
        return 1, None
    except OSError as exc:  # the store could not be reached
        print(f"bedrock-proxy: cannot open the store: {exc}", file=sys.stderr)
        return 1, None


# Reading keys unseals no secret: any sealing key will do for them.
_READ_ONLY_SECRET = "-" * 16
_KEY_WRITES = ("create", "update", "regenerate", "revoke")


def _sealing_secret(settings: Settings) -> None:
    if not (settings.secret_key or settings.master_key):
        raise AwsError(
            400,
            "config error",
            "changing keys needs BEDROCK_PROXY_MASTER_KEY (or secret_key) to seal their "
            "secrets, as the server has it",
        )


def _keys_command(args: argparse.Namespace) -> int:
    fields = {n: getattr(args, n) for n in _KEY_FIELDS if getattr(args, n, None) is not None}
    command = args.keys_command
    writes = command in _KEY_WRITES

    async def work(settings: Settings, store: Store) -> object:
        secret = settings.secret_key or settings.master_key or _READ_ONLY_SECRET
        service = KeyService(
            store,
            SecretBox(secret, settings.previous_secret_keys),
            pools=settings.fleet.pools,
        )
        if command == "create":
            return await service.generate(fields, CLI_ACTOR)
        if command == "list":
            filters = {k: v for k, v in (("user_id", args.user), ("team_id", args.team)) if v}
            return await service.list(filters, args.page, args.size, full=True)
        if command == "info":
            return await service.info(args.key)
        if command == "update":
            return await service.update(args.key, fields, CLI_ACTOR)
        if command == "regenerate":
            return await service.regenerate(args.key, CLI_ACTOR)
        return {"deleted_keys": await service.delete([args.key], actor=CLI_ACTOR)}

    code, result = _with_store(
        args, work, creates=command == "create", check=_sealing_secret if writes else None
    )
    if code == 0:
        if args.json or command in ("create", "regenerate"):  # secrets: shown once, whole
            print(json.dumps(result, indent=2, ensure_ascii=False))
        elif command == "list":
            assert isinstance(result, dict)
            print(format_keys(result))
        elif command == "info":
            assert isinstance(result, dict)
            print(format_fields(result["info"]))
        else:
            print(json.dumps(result, ensure_ascii=False))
    return code


# The columns of ``keys list``: what tells keys apart at a glance.
_KEY_COLUMNS = ("key_id", "key_alias", "user_id", "team_id", "models", "max_budget", "expires")


def format_keys(listing: dict[str, Any]) -> str:
    rows = [[_key_cell(k.get(c)) for c in _KEY_COLUMNS] for k in listing["keys"]]
    footer = f"({listing['total_count']} keys; page {listing['current_page']} of "
    footer += f"{max(1, listing['total_pages'])}; --json for every field)"
    return format_table(list(_KEY_COLUMNS), rows, numeric=()) + "\n" + footer


def format_fields(record: dict[str, Any]) -> str:
    """One key, one field per line (empty fields left out)."""
    shown = {k: v for k, v in record.items() if v not in (None, [], {}, "")}
    width = max((len(k) for k in shown), default=0)
    return "\n".join(f"{k.ljust(width)}  {_key_cell(v)}" for k, v in shown.items())


def _key_cell(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, list):
        return ",".join(str(v) for v in value) or "-"
    if isinstance(value, dict):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, float):
        return usd(value)
    return str(value)


def format_table(header: list[str], rows: list[list[str]], numeric: tuple[int, ...]) -> str:
    """Columns padded to their widest cell; ``numeric`` columns right-aligned."""
    widths = [max(len(header[i]), *(len(r[i]) for r in rows)) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        return "  ".join(
            c.rjust(w) if i in numeric else c.ljust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ).rstrip()

    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)])


def _teams_command(args: argparse.Namespace) -> int:
    async def work(settings: Settings, store: Store) -> object:
        secret = settings.secret_key or settings.master_key or "-" * 16  # teams seal nothing
        service = KeyService(store, SecretBox(secret, []), pools=settings.fleet.pools)
        if args.teams_command == "set":
            body = {"team_id": args.team, "upstream": args.upstream}
            return await service.set_team(body, CLI_ACTOR)
        if args.teams_command == "info":
            return await service.team_info(args.team)
        return await service.teams()

    code, result = _with_store(args, work, creates=args.teams_command == "set")
    if code == 0:
        print(json.dumps(result, indent=2, ensure_ascii=False))
    return code


def _audit_command(args: argparse.Namespace) -> int:
    """``audit verify``: every row's hash, and its link to the row before."""

    async def work(settings: Settings, store: Store) -> tuple[int, int | None]:
        return await store.audit.verify()

    code, result = _with_store(args, work)
    if result is None:
        return code
    checked, broken = result
    if broken is not None:
        print(
            f"bedrock-proxy: the audit log was changed at row {broken} "
            f"({checked} rows before it verified)",
            file=sys.stderr,
        )
        return 1
    print(f"audit log verified: {checked} rows, the hash chain is whole")
    return 0


def _spend_command(args: argparse.Namespace) -> int:
    async def work(settings: Settings, store: Store) -> dict[str, Any]:
        return await Reports(store).report(args.group_by, args.start, args.end)

    code, report = _with_store(args, work)
    if report is not None:
        print(json.dumps(report, indent=2) if args.json else format_report(report))
    return code


def format_report(report: dict[str, Any]) -> str:
    columns = ["requests", "input_tokens", "output_tokens", "total_tokens", "cost"]
    rows = [[_group(r)] + [_cell(r.get(c)) for c in columns] for r in report["rows"]]
    rows.append(["TOTAL"] + [_cell(report["totals"].get(c)) for c in columns])
    header = [report["group_by"], *columns[:-1], "cost (USD)"]
    lines = [format_table(header, rows, numeric=tuple(range(1, len(header))))]
    unpriced = report["totals"].get("unpriced")
    if unpriced:
        lines.append(f"({unpriced} requests have no price: their cost is not in the totals)")
    return "\n".join(lines)


def _group(row: dict[str, Any]) -> str:
    group = "-" if row["group"] is None else str(row["group"])
    return f"{group} ({row['key_alias']})" if row.get("key_alias") else group


def _cell(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and not value.is_integer():
        return usd(value)[1:]  # (the column says USD)
    return f"{int(value):,}" if isinstance(value, int | float) else str(value)


async def serve(
    app: web.Application,
    settings: Settings,
    tls: ssl.SSLContext | None = None,
    also_tls: tuple[int, ssl.SSLContext] | None = None,
) -> None:
    """Run until SIGTERM or SIGINT, then drain: readiness goes false, the listeners close,
    in-flight requests and streams get ``shutdown_timeout`` to finish, the ledger is
    flushed. A second signal, or the deadline, ends the rest (streams with an exception
    frame, never a silent cut)."""
    runners: list[web.AppRunner] = [
        ProxyRunner(
            app,
            header_timeout=settings.header_timeout,
            keepalive_timeout=settings.keepalive_timeout,
            # A client that never opens its window is as slow as one that never sends.
            http2=Http2Limits(send_timeout=settings.body_timeout),
            # A backstop only: the deadline below ends handlers first.
            shutdown_timeout=settings.shutdown_timeout + 5,
        )
    ]
    if settings.http_port is not None:
        runners.append(
            ProxyRunner(
                create_ops_app(app),
                header_timeout=settings.header_timeout,
                keepalive_timeout=settings.keepalive_timeout,
            )
        )
    for runner in runners:
        await runner.setup()
    try:
        reuse_port = settings.reuse_port or None
        site = web.TCPSite(
            runners[0],
            settings.host,
            settings.port,
            backlog=1024,
            ssl_context=tls,
            reuse_port=reuse_port,
        )
        await site.start()
        scheme = "https" if tls else "http"
        log.info("listening on %s://%s:%d/bedrock", scheme, settings.host, settings.port)
        if also_tls is not None:  # the same app on a second port, over TLS (the demo)
            port, context = also_tls
            await web.TCPSite(runners[0], settings.host, port, ssl_context=context).start()
            log.info("listening on https://%s:%d/bedrock", settings.host, port)
        if settings.http_port is not None:
            await web.TCPSite(
                runners[1], settings.host, settings.http_port, reuse_port=reuse_port
            ).start()
            log.info("health checks on http://%s:%d/health", settings.host, settings.http_port)
        stop, force = asyncio.Event(), asyncio.Event()

        def on_signal() -> None:
            (force if stop.is_set() else stop).set()

        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, on_signal)
        if tls is not None:
            loop.add_signal_handler(signal.SIGHUP, _reload_tls, tls, settings)
        await stop.wait()
        pipeline = app[PIPELINE]
        log.info(
            "draining %d in-flight requests (up to %g s)",
            pipeline.in_flight,
            settings.shutdown_timeout,
        )
        app[STATE]["ready"] = False
        pipeline.shutdown.stopping = True
        drain = asyncio.create_task(runners[0].cleanup())
        deadline = asyncio.create_task(asyncio.wait_for(force.wait(), settings.shutdown_timeout))
        await asyncio.wait({drain, deadline}, return_when=asyncio.FIRST_COMPLETED)
        if not drain.done():
            log.warning("ending %d requests at shutdown", pipeline.in_flight)
            pipeline.abort_all()
        deadline.cancel()
        await asyncio.gather(deadline, return_exceptions=True)
        await drain
        runners = runners[1:]
        log.info("stopped")
    finally:
        for runner in reversed(runners):
            await runner.cleanup()


def supervise(workers: int) -> int:
    """``--workers N``: N copies of this command on one port (SO_REUSEPORT). Signals are
    passed on; a worker that dies is replaced; the supervisor exits when all have stopped."""
    argv = _without_workers_flag(sys.argv[1:])
    # Where the workers share their metrics (observe.shared): private to this supervisor.
    metrics_dir = tempfile.mkdtemp(prefix="bedrock-proxy-metrics-")
    env = dict(
        os.environ,
        BEDROCK_PROXY_WORKERS="1",
        BEDROCK_PROXY_REUSE_PORT="true",
        BEDROCK_PROXY_METRICS_DIR=metrics_dir,
    )
    command = [sys.executable, "-m", "proxy", *argv]
    children = [subprocess.Popen(command, env=env) for _ in range(workers)]
    stopping = False

    def forward(signum: int, _frame: object) -> None:
        nonlocal stopping
        if signum in (signal.SIGTERM, signal.SIGINT):
            stopping = True
        for child in children:
            if child.poll() is None:
                child.send_signal(signum)

    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, forward)
    log.info("supervising %d workers on one port", workers)
    while True:
        alive = [c for c in children if c.poll() is None]
        if stopping and not alive:
            break
        for i, child in enumerate(children):
            if child.poll() is not None and not stopping:
                log.error("worker %d exited with %s; starting another", child.pid, child.returncode)
                time.sleep(1)
                if stopping:  # signalled meanwhile: nothing to replace
                    break
                children[i] = replacement = subprocess.Popen(command, env=env)
                if stopping:  # signalled as it started, perhaps before it was in the list
                    replacement.send_signal(signal.SIGTERM)
        time.sleep(0.2)
    shutil.rmtree(metrics_dir, ignore_errors=True)
    return max((c.returncode or 0) for c in children)


def _without_workers_flag(argv: list[str]) -> list[str]:
    out: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--workers":
            skip = True
        elif not arg.startswith("--workers="):
            out.append(arg)
    return out


def _reload_tls(context: ssl.SSLContext, settings: Settings) -> None:
    """SIGHUP: new handshakes get the new certificate; open connections keep theirs."""
    try:
        # SIGHUP is only handled when serving TLS, and the config requires both files.
        assert settings.tls_cert is not None and settings.tls_key is not None
        load_chain(context, settings.tls_cert, settings.tls_key)
    except TLSConfigError as exc:
        log.error("certificate reload failed, keeping the current one: %s", exc)
    else:
        log.info("certificate reloaded from %s", settings.tls_cert)


def _tune_gc() -> None:
    """With thousands of streams open, a full collection walks every live object: 120-215 ms
    pauses at 5,000 streams, each one a stall for every stream. The startup heap (service
    models, route tables) is frozen out of collection, and a full collection is considered
    only after 2,000 x 10 x 200 = 4M net allocations, so they come rare (none while 5,000
    streams open). The young generations stay small: a pause is as long as the generation
    it walks, and every stream's ~80 objects pass through them as the streams open. With
    (10,000, 20, 20), the same product, the middle generation grew to 200k objects and
    paused every stream for up to 149 ms (added TTFB p99 +108 ms at 5,000 streams); at
    (2,000, 10, 200) the longest young pause was 15 ms (p99 +11 ms). The total work is the
    same: a survivor is walked once in each young generation whatever their sizes."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(2_000, 10, 200)


def _raise_open_files_limit() -> None:
    """Every proxied stream holds two descriptors, the client's connection and the
    upstream's: at the soft limit many shells and units start with (1,024), the proxy
    held ~500 streams. The soft limit is raised to the hard one (as nginx's
    ``worker_rlimit_nofile`` would be set); raising the hard one is the operator's call."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else _NR_OPEN
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError) as exc:
            log.warning("could not raise the open-files limit from %d: %s", soft, exc)
            return
        log.info("open-files limit raised from %d to %d", soft, target)


# The kernel's default cap on any process's descriptors (fs.nr_open), for an unlimited
# hard limit.
_NR_OPEN = 1_048_576


def _install_uvloop() -> None:
    with contextlib.suppress(ImportError):
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
