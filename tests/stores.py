"""The store backends the suite runs against: SQLite always, PostgreSQL on the machine's
server (127.0.0.1:5432). Outside CI an unreachable PostgreSQL skips with the reason; under
CI=true it fails, so a green run always means both were tested."""

from __future__ import annotations

import asyncio
import os
import secrets
from collections.abc import Iterator

import pytest

from tests.helpers.ports import free_port

PG_ADMIN_URL = os.environ.get("BEDROCK_PROXY_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")
REDIS_URL = os.environ.get("BEDROCK_PROXY_TEST_REDIS", "redis://127.0.0.1:6379/0")
# This test process's own keys in the machine's Redis: another suite running beside it
# (another clone's make test) shares the server, never the keys.
REDIS_PREFIX = f"bp-test-{secrets.token_hex(4)}"


def unreachable(service: str, reason: str) -> None:
    message = f"{service} is not reachable: {reason}"
    if os.environ.get("CI") == "true":
        pytest.fail(message + " (required under CI=true)")
    pytest.skip(message)


@pytest.fixture(scope="module")
def pg_database(bg) -> Iterator[str]:
    """A fresh database for each test file, dropped at its end: a file's totals must not
    count the rows of whichever file ran before it in the same worker (the replicas' load
    test leaves 5,000)."""
    import asyncpg

    name = f"bp_test_{secrets.token_hex(4)}"

    async def create() -> None:
        conn = await asyncpg.connect(PG_ADMIN_URL, timeout=5)
        try:
            await conn.execute(f"CREATE DATABASE {name}")
        finally:
            await conn.close()

    async def drop() -> None:
        # WITH (FORCE) ends the sessions still open (a replica that is just exiting) in
        # the same statement; terminating them first and dropping after raced with their
        # exit ("database is being accessed by other users").
        conn = await asyncpg.connect(PG_ADMIN_URL, timeout=5)
        try:
            for attempt in range(5):
                try:
                    await conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
                    return
                except asyncpg.ObjectInUseError:
                    if attempt == 4:
                        raise
                    await asyncio.sleep(0.2)
        finally:
            await conn.close()

    try:
        bg.run(create(), timeout=15)
    except Exception as exc:  # OSError, asyncpg errors, timeouts
        unreachable("PostgreSQL at 127.0.0.1:5432", f"{type(exc).__name__}: {exc}")
    base = PG_ADMIN_URL.rsplit("/", 1)[0]
    yield f"{base}/{name}"
    bg.run(drop(), timeout=15)


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def store_settings(request, tmp_path_factory) -> dict[str, str]:
    """Settings that point a proxy at one backend; proxies given the same dict share it."""
    if request.param == "sqlite":
        return {"sqlite_path": str(tmp_path_factory.mktemp("sqlite") / "keys.db")}
    return {"database_url": request.getfixturevalue("pg_database")}


@pytest.fixture(scope="session")
def redis_url() -> str:
    """The machine's Redis (127.0.0.1:6379), once it answers a ping."""
    import redis

    try:
        redis.Redis.from_url(REDIS_URL, socket_connect_timeout=3).ping()
    except Exception as exc:
        unreachable("Redis at 127.0.0.1:6379", f"{type(exc).__name__}: {exc}")
    return REDIS_URL


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory) -> Iterator[int]:
    """A Redis of the test file's own on a free loopback port, so a test can take it away
    (behind ``tests.helpers.relay``) without touching the machine's shared one."""
    import shutil
    import subprocess
    import time

    import redis

    binary = shutil.which("redis-server")
    if binary is None:
        unreachable("redis-server", "not installed")
    port = free_port()
    workdir = tmp_path_factory.mktemp("redis")
    proc = subprocess.Popen(
        [
            binary,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(workdir),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    client = redis.Redis(port=port, socket_connect_timeout=1)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    proc.kill()
                    output = proc.communicate(timeout=5)[0].decode(errors="replace")
                    unreachable("a throwaway redis-server", output[-2000:])
                time.sleep(0.05)
        yield port
    finally:
        client.close()
        proc.terminate()
        proc.wait(10)
