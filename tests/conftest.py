"""Test harness: the fake Bedrock and proxies run on a background event loop, on loopback,
so blocking clients (boto3, the AWS CLI, curl) can call them from ordinary test functions."""

from __future__ import annotations

import asyncio
import contextlib
import faulthandler
import io
import os
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import boto3
import pytest
from aiohttp import web
from botocore.config import Config

from proxy.observe.accesslog import AccessLog
from proxy.server.app import PIPELINE, create_app
from proxy.server.config import load_settings
from proxy.server.listen.runner import ProxyRunner
from proxy.wire.h2server import Http2Limits
from tests.fake_bedrock import (
    UPSTREAM_ACCESS_KEY,
    UPSTREAM_SECRET_KEY,
    UPSTREAM_SESSION_TOKEN,
    FakeBedrock,
)
from tests.fake_s3 import FakeS3
from tests.stores import REDIS_PREFIX

MASTER_KEY = "sk-master-test-0123456789"
REGION = "us-east-1"
SERVICES = ("bedrock-runtime", "bedrock-agent-runtime", "bedrock")


# pytest-xdist (--dist loadfile --no-loadscope-reorder) hands out test files in collection
# order, so the longest go first. Its own order (most tests first) left the replicas' file
# for last, run alone for 30 s while the other workers idled. Wall seconds per file as
# measured; the other files keep their order.
LONGEST_FIRST = (
    "test_resilience.py",  # 42
    "test_replicas.py",  # 30
    "test_http2.py",  # 30
    "test_upstream_routing.py",  # 28
    "test_console.py",  # 21
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    def rank(item: pytest.Item) -> int:
        name = item.path.name
        return LONGEST_FIRST.index(name) if name in LONGEST_FIRST else len(LONGEST_FIRST)

    items.sort(key=rank)  # stable: each file's tests keep their order


def _isolate_aws_environment(tmp: str) -> None:
    """No real AWS settings or credentials may reach a test; the upstream's come from a
    shared-credentials profile, so the proxy resolves them through the real chain."""
    for name in list(os.environ):
        if name.startswith("AWS_") or name.startswith("BEDROCK_PROXY_"):
            del os.environ[name]
    credentials = os.path.join(tmp, "credentials")
    with open(credentials, "w") as fh:
        fh.write(
            "[upstream]\n"
            f"aws_access_key_id = {UPSTREAM_ACCESS_KEY}\n"
            f"aws_secret_access_key = {UPSTREAM_SECRET_KEY}\n"
            f"aws_session_token = {UPSTREAM_SESSION_TOKEN}\n"
        )
    config = os.path.join(tmp, "config")
    with open(config, "w") as fh:
        fh.write("")
    os.environ["AWS_SHARED_CREDENTIALS_FILE"] = credentials
    os.environ["AWS_CONFIG_FILE"] = config
    os.environ["AWS_EC2_METADATA_DISABLED"] = "true"
    os.environ["AWS_DEFAULT_REGION"] = REGION


class BackgroundLoop:
    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro: Any, timeout: float = 30) -> Any:
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return future.result(timeout)
        except TimeoutError:
            # What the loop was doing instead: its tasks' stacks and every thread's.
            print(f"background loop: {coro!r} still running after {timeout} s")
            for task in asyncio.all_tasks(self.loop):
                task.print_stack(limit=8, file=sys.stdout)
            faulthandler.dump_traceback(file=sys.__stdout__)
            raise

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


class OffsetClock:
    """The system's clock plus an offset a test moves forward: windows and budget periods
    end when the test says, not after a sleep. Time still passes normally in between."""

    def __init__(self) -> None:
        self.offset = 0.0

    def time(self) -> float:
        return time.time() + self.offset

    def monotonic(self) -> float:
        return time.monotonic() + self.offset

    def advance(self, seconds: float) -> None:
        self.offset += seconds

    def fresh_minute(self, margin: float = 0.05) -> None:
        """Move to just past the start of the next calendar minute (rate windows)."""
        self.advance(60 - self.time() % 60 + margin)


@dataclass
class Server:
    url: str
    app: web.Application
    runner: web.AppRunner
    log: io.BytesIO | None = None
    clock: OffsetClock | None = None
    bg: BackgroundLoop | None = None

    def settle(self) -> None:
        """Wait until every finished request has been charged and its ledger row written
        (the proxy does both after the response has gone out)."""
        from proxy.server.app import METERING

        async def settled() -> None:
            await self.app[PIPELINE].idle()
            await self.app[METERING].drain()

        assert self.bg is not None
        self.bg.run(settled(), timeout=10)

    @property
    def base(self) -> str:
        return self.url + "/bedrock"

    def log_lines(self) -> list[dict]:
        import orjson

        assert self.log is not None
        return [orjson.loads(line) for line in self.log.getvalue().splitlines() if line]

    def wait_log_line(self, predicate: Any, timeout: float = 5.0) -> dict:
        """The newest access-log record matching ``predicate``, once the proxy has written it:
        a client can see a stream's end before the proxy's handler has finished."""
        deadline = time.monotonic() + timeout
        while True:
            found = [r for r in self.log_lines() if predicate(r)]
            if found or time.monotonic() > deadline:
                assert found, self.log_lines()[-3:]
                return found[-1]
            time.sleep(0.02)


async def start_server(
    app: web.Application,
    tls: Any = None,
    keepalive_timeout: float = 75.0,
    send_timeout: float = 120.0,
    header_timeout: float | None = None,
    port: int = 0,
) -> tuple[str, web.AppRunner]:
    # Like AWS, the fakes read bodies as sent: aiohttp must not inflate Content-Encoding.
    # The fakes take HTTP/2 on the same port as AWS does (on the proxy's own listener: its
    # HTTP/2 front is tested on its own by real clients, curl and the JavaScript SDK).
    runner = ProxyRunner(
        app,
        # The proxy's: 2 s, so that the tests of it do not wait long (a test that must
        # not race it on a busy machine asks for more).
        header_timeout=header_timeout or (2.0 if PIPELINE in app else 30.0),
        keepalive_timeout=keepalive_timeout,
        http2=Http2Limits(send_timeout=send_timeout),
    )
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", port, ssl_context=tls)
    await site.start()
    host, port = runner.addresses[0][:2]
    return f"{'https' if tls else 'http'}://{host}:{port}", runner


@pytest.fixture(scope="session")
def bg(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BackgroundLoop]:
    _isolate_aws_environment(str(tmp_path_factory.mktemp("aws")))
    loop = BackgroundLoop()
    yield loop
    loop.stop()


@pytest.fixture(scope="session")
def fake_server(bg: BackgroundLoop) -> Iterator[tuple[FakeBedrock, str]]:
    fake = FakeBedrock()
    url, runner = bg.run(start_server(fake.app()))
    yield fake, url
    bg.run(runner.cleanup())


@pytest.fixture(scope="session")
def fake_s3_server(bg: BackgroundLoop) -> Iterator[tuple[FakeS3, str]]:
    fake = FakeS3()
    url, runner = bg.run(start_server(fake.app()))
    yield fake, url
    bg.run(runner.cleanup())


@pytest.fixture
def fake(fake_server: tuple[FakeBedrock, str]) -> FakeBedrock:
    fake_server[0].reset()
    return fake_server[0]


ProxyFactory = Callable[..., Server]


@pytest.fixture(scope="session")
def start_proxy(
    bg: BackgroundLoop,
    fake_server: tuple[FakeBedrock, str],
    fake_s3_server: tuple[FakeS3, str],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[ProxyFactory]:
    started: list[Server] = []
    store_dir = tmp_path_factory.mktemp("stores")

    def factory(**overrides: Any) -> Server:
        env = overrides.pop("env", {})
        tls = overrides.pop("tls", None)
        clock = overrides.pop("clock", None) or OffsetClock()
        values: dict[str, Any] = {
            "master_key": MASTER_KEY,
            "aws_profile": "upstream",
            "region": REGION,
            "endpoints": {**{name: fake_server[1] for name in SERVICES}, "s3": fake_s3_server[1]},
            "connect_timeout": 2.0,
            "first_byte_timeout": 5.0,
            "idle_timeout": 5.0,
            "sqlite_path": str(store_dir / f"proxy-{len(started)}.db"),
            # The suite starts many proxies against one PostgreSQL server.
            "database_pool_size": 3,
            "redis_prefix": REDIS_PREFIX,
        }
        values.update(overrides)
        header_timeout = values.pop("listener_header_timeout", None)
        # A port known before the proxy starts (an identity provider's redirect URI).
        port = values.pop("listener_port", 0)
        settings = load_settings(env=env, overrides=values)
        log = io.BytesIO()
        app = create_app(settings, access_log=AccessLog(True, log), clock=clock)
        url, runner = bg.run(
            start_server(
                app, tls, settings.keepalive_timeout, settings.body_timeout, header_timeout, port
            )
        )
        server = Server(url, app, runner, log, clock, bg)
        started.append(server)
        return server

    yield factory
    for server in started:
        bg.run(server.runner.cleanup())


@pytest.fixture(scope="session")
def proxy(start_proxy: ProxyFactory) -> Server:
    return start_proxy()


@pytest.fixture(scope="module")
def cert_pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    """A self-signed certificate for localhost and 127.0.0.1, and its key."""
    from proxy.server.listen.tls import write_self_signed

    return write_self_signed(str(tmp_path_factory.mktemp("tls")))


@pytest.fixture(scope="module")
def https_proxy(start_proxy: ProxyFactory, cert_pair: tuple[str, str]) -> Server:
    """A proxy on TLS (ALPN h2 and http/1.1) with that certificate."""
    from proxy.server.listen.tls import server_context

    return start_proxy(tls=server_context(*cert_pair))


@contextlib.contextmanager
def unanswered_port() -> Iterator[int]:
    """A loopback port whose listener never accepts and whose accept queue is full, so a
    new connection's SYN goes unanswered: the one way to make a connect time out here."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    fillers = []
    try:
        for _ in range(8):
            filler = socket.socket()
            filler.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                filler.connect(("127.0.0.1", port))
            fillers.append(filler)
        time.sleep(0.1)
        yield port
    finally:
        for filler in fillers:
            filler.close()
        listener.close()


def client_config(**kwargs: Any) -> Config:
    return Config(retries={"total_max_attempts": 1, "mode": "standard"}, read_timeout=20, **kwargs)


def with_key_header(client: Any, key: str, header: str = "litellm_user_api_key") -> Any:
    """What users of other gateways do: sign with dummy credentials, add the key in a hook."""
    value = f"Bearer {key}" if header == "litellm_user_api_key" else key

    def add_header(request: Any, **_: Any) -> None:
        request.headers[header] = value

    client.meta.events.register_first("before-sign.*.*", add_header)
    return client


def boto_client(
    service: str,
    server: Server,
    key: str | None = MASTER_KEY,
    header: str = "litellm_user_api_key",
    **kwargs: Any,
) -> Any:
    client = boto3.client(
        service,
        endpoint_url=server.base,
        region_name=REGION,
        aws_access_key_id="dummy-access-key",
        aws_secret_access_key="dummy-secret-key",
        config=client_config(),
        **kwargs,
    )
    if key is not None:
        with_key_header(client, key, header)
    return client


from tests.helpers.browser import browser  # noqa: E402, F401
from tests.stores import pg_database, redis_server, redis_url, store_settings  # noqa: E402, F401
