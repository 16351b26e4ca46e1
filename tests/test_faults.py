"""Faults survived: Redis and PostgreSQL taken away behind a relay (paused: a partition;
cut: gone), an upstream that stalls after its headers, and a corrupt event-stream frame.

The dependencies are the test file's own (a throwaway redis-server, a fresh PostgreSQL
database) behind ``tests.helpers.relay``: the machine's shared services are never stopped.
"""

from __future__ import annotations

import json
import logging
import secrets
import time
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pytest
import redis
from botocore.exceptions import ClientError, EventStreamError

from proxy.metering.limits import LimitSpec, RedisLimiter
from proxy.server.app import METERING, STORE
from tests.conftest import MASTER_KEY, boto_client
from tests.helpers.admin import admin, new_key
from tests.helpers.relay import Relay
from tests.stores import REDIS_PREFIX

MESSAGES = [{"role": "user", "content": [{"text": "Hello"}]}]
HAIKU = "anthropic.claude-3-haiku-20240307-v1:0"


def wait_for(condition: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def release(bg: Any, fake: Any, index: int) -> None:
    """Let the ``index``-th held request answer (its event lives on the fake's loop)."""
    bg.loop.call_soon_threadsafe(fake.holds[index].set)


def metric(proxy: Any, name: str) -> float:
    request = urllib.request.Request(
        proxy.url + "/metrics", headers={"Authorization": f"Bearer {MASTER_KEY}"}
    )
    with urllib.request.urlopen(request, timeout=10) as answer:
        for line in answer.read().decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
    raise AssertionError(f"no metric {name}")


def settled(bg: Any, proxy: Any) -> None:
    """Every ended request charged (``Server.settle`` would also wait for the held one)."""
    bg.run(proxy.app[METERING].drain(), timeout=10)


def refusal(call: Callable[[], Any]) -> ClientError:
    with pytest.raises(ClientError) as caught:
        call()
    return caught.value


def inflight(port: int, key_id: str) -> int:
    client = redis.Redis(port=port)
    try:
        return int(client.zcard(f"{REDIS_PREFIX}:key:{key_id}:inflight"))
    finally:
        client.close()


@pytest.fixture
def redis_relay(redis_server: int) -> Iterator[Relay]:
    redis.Redis(port=redis_server).flushall()
    with Relay("127.0.0.1", redis_server) as relay:
        yield relay


# ---------------------------------------------------------------- Redis


def test_slots_of_requests_that_end_during_a_redis_cut_are_freed_when_it_returns(
    start_proxy, fake, bg, redis_relay, redis_server
):
    proxy = start_proxy(redis_url=f"redis://{redis_relay.host_port}/0", first_byte_timeout=60.0)
    key = new_key(proxy, max_parallel_requests=3)
    client = boto_client("bedrock-runtime", proxy, key["key"])
    with ThreadPoolExecutor(3) as pool:
        held = {
            pool.submit(client.converse, modelId="test.hold", messages=MESSAGES) for _ in range(3)
        }
        wait_for(lambda: len(fake.holds) == 3, "three requests held upstream")
        assert inflight(redis_server, key["key_id"]) == 3

        redis_relay.cut()
        release(bg, fake, 0)
        release(bg, fake, 1)
        ended = wait(held, 20, FIRST_COMPLETED).done
        if len(ended) < 2:
            ended |= wait(held - ended, 20, FIRST_COMPLETED).done
        for done in ended:  # answered; their settlements find Redis gone
            assert done.result()["stopReason"] == "end_turn"
        (running,) = held - ended
        settled(bg, proxy)
        # Meanwhile a limited key is refused in its API's own shape, with Retry-After.
        refused = refusal(lambda: client.converse(modelId=HAIKU, messages=MESSAGES))
        assert refused.response["Error"]["Code"] == "ServiceUnavailableException"
        assert refused.response["ResponseMetadata"]["HTTPHeaders"]["retry-after"] == "1"
        assert metric(proxy, "bedrock_proxy_redis_up") == 0
        assert metric(proxy, "bedrock_proxy_limit_settlements_pending") == 2

        redis_relay.restore()
        restored = time.monotonic()
        while True:  # the first answers after the return may still find it away
            try:
                client.converse(modelId=HAIKU, messages=MESSAGES)
                break
            except ClientError as exc:
                assert exc.response["Error"]["Code"] == "ServiceUnavailableException", exc
                assert time.monotonic() - restored < 5
        # Redis is asked again 0.5 s after a failure; the rest is slack for a busy machine.
        assert time.monotonic() - restored < 3.0
        settled(bg, proxy)
        # Only the request still held upstream holds a slot: the two that ended while
        # Redis was away gave theirs back when it returned, not an hour later.
        assert inflight(redis_server, key["key_id"]) == 1
        assert metric(proxy, "bedrock_proxy_limit_settlements_pending") == 0
        assert metric(proxy, "bedrock_proxy_redis_up") == 1
        release(bg, fake, 2)
        assert running.result(20)["stopReason"] == "end_turn"
    proxy.settle()
    assert inflight(redis_server, key["key_id"]) == 0


def test_with_local_limits_a_redis_cut_still_serves_limited_keys_within_their_limit(
    start_proxy, fake, redis_relay
):
    proxy = start_proxy(
        redis_url=f"redis://{redis_relay.host_port}/0", limits_on_redis_outage="local"
    )
    key = new_key(proxy, rpm_limit=2)
    client = boto_client("bedrock-runtime", proxy, key["key"])
    proxy.clock.fresh_minute()
    with redis_relay.down():
        for _ in range(2):
            client.converse(modelId=HAIKU, messages=MESSAGES)
        refused = refusal(lambda: client.converse(modelId=HAIKU, messages=MESSAGES))
        assert refused.response["Error"]["Code"] == "ThrottlingException"
        assert "2 requests per minute" in refused.response["Error"]["Message"]
        with urllib.request.urlopen(proxy.url + "/health/readiness", timeout=5) as answer:
            ready = json.loads(answer.read())
        assert ready["status"] == "ready" and ready["degraded"] == ["redis"]


class _Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def time(self) -> float:
        return self.now

    def monotonic(self) -> float:
        return self.now


class _NoBudgets:
    async def spent(self, spec: LimitSpec, since: float) -> float:
        return 0.0


def test_a_dead_replicas_slots_lapse_within_a_lease_and_a_live_ones_are_renewed(bg, redis_server):
    clock = _Clock()
    url = f"redis://127.0.0.1:{redis_server}/0"
    prefix = "t-" + secrets.token_hex(4)
    spec = LimitSpec("key", "k", max_parallel=1)

    async def go() -> None:
        live = RedisLimiter(url, _NoBudgets(), 30, prefix, clock)  # type: ignore[arg-type]
        other = RedisLimiter(url, _NoBudgets(), 30, prefix, clock)  # type: ignore[arg-type]
        try:
            await live.admit([spec], "running", 0.0)
            clock.now += 20
            await live.renew_leases()  # what the replica does every third of a lease
            clock.now += 20  # 40 s after admission, 20 after the renewal: still held
            with pytest.raises(Exception, match="1 requests in parallel"):
                await other.admit([spec], "second", 0.0)
            clock.now += 31  # the replica died: no renewal for more than a lease
            await other.admit([spec], "third", 0.0)
        finally:
            await other.close()
            live._held.clear()  # a dead replica settles nothing on its way out
            await live.close()

    bg.run(go())


# ---------------------------------------------------------------- PostgreSQL


@pytest.fixture
def pg_relay(pg_database: str) -> Iterator[tuple[Relay, str]]:
    parts = urlsplit(pg_database)
    with Relay(parts.hostname or "127.0.0.1", parts.port or 5432) as relay:
        netloc = f"{parts.username}@{relay.host_port}" if parts.username else relay.host_port
        yield relay, urlunsplit(parts._replace(netloc=netloc))


def _readiness(proxy: Any) -> tuple[int, dict, float]:
    started = time.monotonic()
    with urllib.request.urlopen(proxy.url + "/health/readiness", timeout=10) as answer:
        return answer.status, json.loads(answer.read()), time.monotonic() - started


@pytest.mark.parametrize("outage", ["pause", "cut"])
def test_a_store_outage_costs_known_keys_nothing_new_keys_a_deadline_and_loses_no_row(
    start_proxy, fake, pg_relay, outage, caplog
):
    caplog.set_level(logging.WARNING)
    relay, url = pg_relay
    deadline = 3.0
    proxy = start_proxy(
        database_url=url, store_timeout=deadline, key_cache_ttl=1.0, ledger_flush_interval=0.2
    )
    known, unseen = new_key(proxy), new_key(proxy)
    client = boto_client("bedrock-runtime", proxy, known["key"])
    answered = [client.converse(modelId=HAIKU, messages=MESSAGES)]

    (relay.pause if outage == "pause" else relay.cut)()
    try:
        # A key this replica knows is served throughout, past its cache ttl and past the
        # store's deadline, no call waiting the deadline out (a bound a loaded machine
        # cannot cross by itself: a call that waited for the store took 3 s and more).
        started = time.monotonic()
        while time.monotonic() - started < 2 * (deadline + 1.0):
            call = time.monotonic()
            answered.append(client.converse(modelId=HAIKU, messages=MESSAGES))
            assert time.monotonic() - call < deadline, (call - started, len(answered))
            time.sleep(0.02)  # a steady client, not a flood
        # A key it has never read: a 503 the SDK knows, within the deadline.
        call = time.monotonic()
        stranger = boto_client("bedrock-runtime", proxy, unseen["key"])
        refused = refusal(lambda: stranger.converse(modelId=HAIKU, messages=MESSAGES))
        assert time.monotonic() - call < deadline + 1.5
        assert refused.response["Error"]["Code"] == "ServiceUnavailableException"
        assert refused.response["ResponseMetadata"]["HTTPHeaders"]["retry-after"] == "1"
        # The admin API: a 503 too, never a 500.
        status, body = admin(proxy, "POST", "/key/generate", {"key_alias": "during-outage"})
        assert (status, body["code"]) == (503, "ServiceUnavailableException")
        # Readiness: this replica can serve, so it stays in; the store is reported.
        status, ready, took = _readiness(proxy)
        assert status == 200 and ready["degraded"] == ["store"], ready
        assert took < 1.5
        assert metric(proxy, "bedrock_proxy_store_up") == 0
    finally:
        relay.restore()

    def rows() -> int:
        status, logs = admin(proxy, "GET", f"/spend/logs?api_key={known['key_id']}&size=1")
        return logs["total_count"] if status == 200 else -1

    # Every answered request has its ledger row once the store is back: none lost.
    wait_for(lambda: rows() == len(answered), f"{len(answered)} ledger rows", timeout=15)
    status, ready, _ = _readiness(proxy)
    assert status == 200 and "degraded" not in ready
    assert metric(proxy, "bedrock_proxy_store_up") == 1
    # The outage was seen and is over (its health warns as one begins and as it ends:
    # test_a_store_outage_is_one_warning_as_it_begins_and_one_as_it_ends), and nothing
    # that an outage touches (asyncpg reconnecting, the store, the ledger, the settlers, a
    # request) logged a traceback, in this proxy or in the session's others (which share
    # the log).
    from proxy.server.app import STORE

    health = proxy.app[STORE].health
    assert health.up and health.failures >= 1
    touched = ("asyncpg", "bedrock_proxy.store", "bedrock_proxy.ledger")
    touched += ("bedrock_proxy.batches", "bedrock_proxy.pipeline")
    tracebacks = [
        f"{r.name}: {r.getMessage()}"
        for r in caplog.records
        if r.exc_info and r.name.startswith(touched)
    ]
    assert not tracebacks, tracebacks


# ---------------------------------------------------------------- upstreams


def test_a_small_answer_that_stalls_after_its_headers_fails_at_the_idle_timeout(start_proxy, fake):
    proxy = start_proxy(first_byte_timeout=60.0, idle_timeout=1.0)
    client = boto_client("bedrock-runtime", proxy)
    started = time.monotonic()
    refused = refusal(lambda: client.converse(modelId="test.stall-body", messages=MESSAGES))
    assert refused.response["Error"]["Code"] == "ModelTimeoutException"
    assert time.monotonic() - started < 10  # the idle timeout, not first_byte_timeout's 60


def test_a_corrupt_frame_ends_the_stream_with_an_exception_frame_and_a_failed_row(
    start_proxy, fake
):
    proxy = start_proxy(ledger_flush_interval=0.1)
    client = boto_client("bedrock-runtime", proxy)
    reply = client.converse_stream(modelId="test.bad-crc", messages=MESSAGES)
    request_id = reply["ResponseMetadata"]["HTTPHeaders"]["x-bedrock-proxy-request-id"]
    events = []
    with pytest.raises(EventStreamError) as caught:  # a ClientError, not ChecksumMismatch
        for event in reply["stream"]:
            events.append(event)
    assert caught.value.response["Error"]["Code"] == "internalServerException"
    assert "CRC" in caught.value.response["Error"]["Message"]
    assert len(events) == 1  # the frame before the corrupt one, and nothing after
    proxy.settle()
    status, logs = admin(proxy, "GET", f"/spend/logs?request_id={request_id}")
    assert status == 200
    (row,) = logs["logs"]
    assert row["error"] == "UpstreamStreamError" and row["incomplete"] == 1


def test_a_full_disk_is_a_503_and_the_ledger_keeps_its_rows_until_there_is_room(
    start_proxy, fake, bg, tmp_path
):
    proxy = start_proxy(sqlite_path=str(tmp_path / "full.db"), ledger_flush_interval=0.1)
    known = new_key(proxy)
    client = boto_client("bedrock-runtime", proxy, known["key"])
    client.converse(modelId=HAIKU, messages=MESSAGES)
    proxy.settle()
    db = proxy.app[STORE].db.inner

    def max_pages(pages: int | None) -> None:
        """SQLite's own "database or disk is full" (SQLITE_FULL), past ``pages`` pages."""

        def pragma() -> None:
            conn = db._conn
            if pages is None:
                pages_now = conn.execute("PRAGMA page_count").fetchone()[0]
                conn.execute(f"PRAGMA max_page_count = {pages_now}")
            else:
                conn.execute(f"PRAGMA max_page_count = {pages}")

        bg.run(db._run(pragma))

    max_pages(None)  # full from now on
    try:
        answered = 1 + len([client.converse(modelId=HAIKU, messages=MESSAGES) for _ in range(60)])
        for attempt in range(100):  # until a new key needs a page the disk does not have
            status, body = admin(proxy, "POST", "/key/generate", {"key_alias": f"full-{attempt}"})
            if status != 200:
                break
        assert (status, body["code"]) == (503, "ServiceUnavailableException"), body
    finally:
        max_pages(1 << 30)

    def rows() -> int:
        status, logs = admin(proxy, "GET", f"/spend/logs?api_key={known['key_id']}&size=1")
        return logs["total_count"] if status == 200 else -1

    wait_for(lambda: rows() == answered, f"{answered} ledger rows")


def test_a_store_outage_is_one_warning_as_it_begins_and_one_as_it_ends(caplog):
    from proxy.store.guard import StoreHealth

    now = [100.0]
    health = StoreHealth(monotonic=lambda: now[0])
    caplog.set_level(logging.WARNING, logger="bedrock_proxy.store")
    for _ in range(50):  # every call of the outage fails
        health.failed("TimeoutError: no answer within the store deadline")
        now[0] += 0.1
    health.succeeded()
    health.succeeded()
    lines = [r.getMessage() for r in caplog.records if r.name == "bedrock_proxy.store"]
    assert lines == [
        "store unavailable: TimeoutError: no answer within the store deadline "
        "(calls fail with 503 until it answers)",
        "store available again after 5.0 s",
    ]
    assert (health.failures, health.up) == (1, True)
