"""Metering with real clients: every usage source against the numbers the fake sent, cost,
annotations, the ledger and its reports, and limits that hold under concurrency."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
import urllib.request
from datetime import datetime

import aiohttp
import pytest
from botocore.exceptions import EventStreamError

from proxy.metering.pricing import PriceTable
from tests.conftest import MASTER_KEY, boto_client
from tests.helpers.admin import admin, ledger_row, new_key, sigv4_client
from tests.helpers.http import curl

MESSAGES = [{"role": "user", "content": [{"text": "Hello"}]}]
HAIKU = "anthropic.claude-3-haiku-20240307-v1:0"
PRICES = PriceTable.load()


def cost_of(model: str, i: int = 0, o: int = 0, cr: int = 0, cw: int = 0) -> float:
    price, multiplier = PRICES.price_for(model)
    read = price.cache_read if price.cache_read is not None else price.input
    write = price.cache_write if price.cache_write is not None else price.input
    return (i * price.input + o * price.output + cr * read + cw * write) * multiplier / 1000


@pytest.fixture(scope="module")
def metered(start_proxy, store_settings):
    return start_proxy(ledger_flush_interval=0.1, key_cache_ttl=0.5, **store_settings)


def request_id(reply: dict) -> str:
    return reply["ResponseMetadata"]["HTTPHeaders"]["x-bedrock-proxy-request-id"]


def test_ledger_batches_round_trip_every_value(store_settings, bg):
    """A batch goes to the database as one JSON array: every type, null and odd string
    must come back exactly as written, and a repeated request id must not double."""
    from proxy.store import open_store
    from proxy.store.records import LABEL_COLUMNS, SPEND_COLUMNS, LabelRow, SpendRow

    store = open_store(store_settings.get("database_url"), store_settings.get("sqlite_path", ""), 2)
    tag = f"rt-{time.time_ns()}"
    rows = [
        (
            f"{tag}-{i}",
            1795319557.123456 + i / 7,
            "2026-11-22",
            f"key-{i}",
            'alias "quoted" ünïcode \\ \n tab\t' if i == 0 else None,
            None,
            "team-x",
            None,
            "ConverseStream",
            "bedrock-runtime",
            "anthropic.claude-3-haiku-20240307-v1:0",
            200 + i,
            0.1 + i / 3,
            2**40 + i,
            i,
            0,
            3,
            2**40 + 2 * i + 3,
            None if i % 2 else 1e-12 * (i + 1),
            i % 2,
            "use-case",
            '{"tags": ["a", "b"]}',
            None if i else "UpstreamStreamError",
            i % 2,
            None
            if i % 3
            else f"arn:aws:bedrock:us-east-1:123456789012:application-inference-profile/p{i}",
            None if i % 4 else "team-a",
            None if i % 4 else "eu-west-1",
        )
        for i in range(2500)
    ]
    labels = [
        (f"{tag}-{i}", "tag", f"t{i % 3}", rows[i][1], rows[i][18], 7) for i in range(0, 2500, 5)
    ]

    async def run():
        await store.open()
        try:
            await store.spend.insert(
                [SpendRow(*row) for row in rows], [LabelRow(*label) for label in labels]
            )
            # a retried batch: rows are not doubled
            await store.spend.insert(
                [SpendRow(*row) for row in rows[:10]], []
            )  # a retried batch: rows are not doubled
            got = await store.db.fetch(
                f"SELECT {', '.join(SPEND_COLUMNS)} FROM bp_spend WHERE request_id LIKE $1",
                f"{tag}-%",
            )
            got_labels = await store.db.fetch(
                f"SELECT {', '.join(LABEL_COLUMNS)} FROM bp_spend_labels WHERE request_id LIKE $1",
                f"{tag}-%",
            )
            return got, got_labels
        finally:  # the store is shared with this module's other tests
            await store.db.execute("DELETE FROM bp_spend WHERE request_id LIKE $1", f"{tag}-%")
            await store.db.execute(
                "DELETE FROM bp_spend_labels WHERE request_id LIKE $1", f"{tag}-%"
            )
            await store.close()

    got, got_labels = bg.run(run(), timeout=60)
    by_id = {row["request_id"]: tuple(row[c] for c in SPEND_COLUMNS) for row in got}
    assert len(got) == len(rows)
    assert [by_id[row[0]] for row in rows] == rows
    assert sorted(tuple(r[c] for c in LABEL_COLUMNS) for r in got_labels) == sorted(labels)


def test_budgets_by_user_and_team_are_read_through_the_partial_indexes(store_settings, bg):
    """Rows of keys with no user or team are left out of the user and team indexes
    (migration 7: two B-tree inserts fewer per ledger row); a budget's spend by user or
    team is still found, and through those indexes."""
    from proxy.store import open_store
    from proxy.store.records import SpendRow

    store = open_store(store_settings.get("database_url"), store_settings.get("sqlite_path", ""), 2)
    tag = f"pi-{time.time_ns()}"

    def row(i: int, user: str | None, team: str | None, cost: float) -> SpendRow:
        return SpendRow(
            *(f"{tag}-{i}", 1795319557.0 + i, "2026-11-22", f"key-{tag}", None, user, team),
            *(None, "Converse", "bedrock-runtime", "m", 200, 1.0, 1, 1, 0, 0, 2, cost, 0),
            *(None, None, None, 0, None, None, None),
        )

    async def run():
        await store.open()
        try:
            await store.spend.insert(
                [
                    row(0, f"u-{tag}", None, 1.0),
                    row(1, None, f"t-{tag}", 2.0),
                    row(2, None, None, 4.0),
                    row(3, f"u-{tag}", f"t-{tag}", 8.0),
                ],
                [],
            )
            spent = [
                await store.spend.since("user", f"u-{tag}", 0.0),
                await store.spend.since("team", f"t-{tag}", 0.0),
                await store.spend.since("key", f"key-{tag}", 0.0),
            ]
            if store.dialect == "sqlite":
                plans = [
                    " ".join(
                        str(r["detail"])
                        for r in await store.db.fetch(
                            f"EXPLAIN QUERY PLAN SELECT SUM(cost) FROM bp_spend"
                            f" WHERE {column} = $1 AND ts >= $2",
                            "x",
                            0.0,
                        )
                    )
                    for column in ("user_id", "team_id")
                ]
                plans += [
                    str(r["sql"])
                    for r in await store.db.fetch(
                        "SELECT sql FROM sqlite_master WHERE name IN"
                        " ('bp_spend_user_ts', 'bp_spend_team_ts') ORDER BY name DESC"
                    )
                ]
            else:
                plans = [
                    str(r["indexdef"])
                    for r in await store.db.fetch(
                        "SELECT indexdef FROM pg_indexes WHERE indexname IN"
                        " ('bp_spend_user_ts', 'bp_spend_team_ts') ORDER BY indexname DESC"
                    )
                ]
            return spent, plans
        finally:
            await store.db.execute("DELETE FROM bp_spend WHERE request_id LIKE $1", f"{tag}-%")
            await store.close()

    spent, plans = bg.run(run(), timeout=60)
    assert spent == [9.0, 10.0, 15.0]
    if store_settings.get("database_url"):
        assert "WHERE (user_id IS NOT NULL)" in plans[0]
        assert "WHERE (team_id IS NOT NULL)" in plans[1]
    else:
        assert "bp_spend_user_ts" in plans[0] and "bp_spend_team_ts" in plans[1]
        assert "WHERE user_id IS NOT NULL" in plans[2]
        assert "WHERE team_id IS NOT NULL" in plans[3]


# ---------------------------------------------------------------- usage sources


def test_converse_usage_cost_and_headers(metered, fake):
    key = new_key(metered)
    client = sigv4_client("bedrock-runtime", metered, key)
    reply = client.converse(modelId=HAIKU, messages=MESSAGES)
    headers = reply["ResponseMetadata"]["HTTPHeaders"]
    expected = cost_of(HAIKU, 11, 7)
    assert headers["x-bedrock-proxy-tokens"] == "18"
    assert float(headers["x-bedrock-proxy-cost"]) == pytest.approx(expected)
    row = ledger_row(metered, request_id(reply))
    assert (row["input_tokens"], row["output_tokens"], row["total_tokens"]) == (11, 7, 18)
    assert row["cost"] == pytest.approx(expected)
    assert row["key_id"] == key["key_id"] and row["operation"] == "Converse"
    assert row["model"] == HAIKU and row["status"] == 200 and row["incomplete"] is False


def test_converse_stream_usage_from_metadata_event(metered, fake):
    client = boto_client("bedrock-runtime", metered)
    reply = client.converse_stream(modelId="us." + HAIKU, messages=MESSAGES)
    list(reply["stream"])
    row = ledger_row(metered, request_id(reply))
    assert (row["input_tokens"], row["output_tokens"]) == (12, 9)
    assert row["cost"] == pytest.approx(cost_of(HAIKU, 12, 9))
    assert row["key_id"] == "master"


def test_invoke_model_usage_from_headers_including_cache(metered, fake):
    model = "anthropic.claude-3-5-sonnet-20241022-v2:0"
    client = boto_client("bedrock-runtime", metered)
    reply = client.invoke_model(modelId=model, body=b'{"prompt": "x"}')
    reply["body"].read()
    row = ledger_row(metered, request_id(reply))
    assert (row["input_tokens"], row["output_tokens"]) == (25, 13)
    assert (row["cache_read_tokens"], row["cache_write_tokens"]) == (4, 3)
    assert row["cost"] == pytest.approx(cost_of(model, 25, 13, 4, 3))
    assert float(reply["ResponseMetadata"]["HTTPHeaders"]["x-bedrock-proxy-cost"]) == pytest.approx(
        cost_of(model, 25, 13, 4, 3)
    )


def test_invoke_stream_usage_from_final_chunk(metered, fake):
    client = boto_client("bedrock-runtime", metered)
    reply = client.invoke_model_with_response_stream(modelId=HAIKU, body=b'{"prompt": "x"}')
    list(reply["body"])
    row = ledger_row(metered, request_id(reply))
    assert (row["input_tokens"], row["output_tokens"]) == (30, 3)


def test_guardrail_units_count_tokens_and_agents(metered, fake):
    runtime = boto_client("bedrock-runtime", metered)
    applied = runtime.apply_guardrail(
        guardrailIdentifier="gr-1",
        guardrailVersion="1",
        source="INPUT",
        content=[{"text": {"text": "hi"}}],
    )
    row = ledger_row(metered, request_id(applied))
    assert row["cost"] == pytest.approx((1 * 0.15 + 2 * 0.15 + 1 * 0.0) / 1000)
    counted = runtime.count_tokens(modelId=HAIKU, input={"converse": {"messages": MESSAGES}})
    row = ledger_row(metered, request_id(counted))
    assert row["input_tokens"] == 17 and row["cost"] == 0.0
    agents = boto_client("bedrock-agent-runtime", metered)
    reply = agents.invoke_agent(
        agentId="AGENT12345", agentAliasId="ALIAS12345", sessionId="s-1", inputText="x"
    )
    list(reply["completion"])
    row = ledger_row(metered, request_id(reply))
    assert row["operation"] == "InvokeAgent" and row["total_tokens"] == 0 and row["cost"] is None


def test_unpriced_model_keeps_tokens_with_null_cost(metered, fake):
    client = boto_client("bedrock-runtime", metered)
    reply = client.converse(modelId="acme.unknown-model-v9", messages=MESSAGES)
    assert "x-bedrock-proxy-cost" not in reply["ResponseMetadata"]["HTTPHeaders"]
    row = ledger_row(metered, request_id(reply))
    assert row["total_tokens"] == 18 and row["cost"] is None


def test_stream_cut_short_is_recorded_incomplete(metered, fake):
    client = boto_client("bedrock-runtime", metered)
    reply = client.converse_stream(modelId="test.cut", messages=MESSAGES)
    with pytest.raises(EventStreamError):
        list(reply["stream"])
    row = ledger_row(metered, request_id(reply))
    assert row["incomplete"] is True and row["error"] == "UpstreamStreamError"


# ---------------------------------------------------------------- annotations and reports


def test_annotations_recorded_and_never_forwarded(metered, fake):
    client = boto_client("bedrock-runtime", metered)

    def annotate(request, **_):
        request.headers["xProxy-UseCase-Name"] = "summarise"
        request.headers["xProxy-User-ID"] = "end-user-7"
        request.headers["xProxy-Request-Tags"] = "alpha, beta"
        request.headers["xProxy-Request-Properties"] = '{"ticket": 42}'

    client.meta.events.register_first("before-sign.*.*", annotate)
    reply = client.converse(modelId=HAIKU, messages=MESSAGES)
    seen = {k.lower() for k in fake.requests[-1].headers}
    assert not any(name.startswith("xproxy-") for name in seen)
    row = ledger_row(metered, request_id(reply))
    assert row["use_case"] == "summarise" and row["end_user"] == "end-user-7"
    assert row["annotations"]["tags"] == ["alpha", "beta"]
    assert row["annotations"]["properties"] == {"ticket": 42}
    _status, report = admin(metered, "GET", "/spend/report?group_by=tag")
    groups = {r["group"]: r for r in report["rows"]}
    assert groups["alpha"]["requests"] >= 1 and groups["beta"]["requests"] >= 1


def test_report_totals_equal_the_ledger(metered, fake):
    key = new_key(metered, team_id="finance")
    client = sigv4_client("bedrock-runtime", metered, key)
    ids = [request_id(client.converse(modelId=HAIKU, messages=MESSAGES)) for _ in range(3)]
    for rid in ids:
        ledger_row(metered, rid)
    status, logs = admin(metered, "GET", "/spend/logs?size=1000")
    rows = logs["logs"]
    for group_by in ("key", "model", "team", "day", "use_case", "operation"):
        status, report = admin(metered, "GET", f"/spend/report?group_by={group_by}")
        assert status == 200
        assert report["totals"]["requests"] == len(rows)
        assert report["totals"]["total_tokens"] == sum(r["total_tokens"] for r in rows)
        assert report["totals"]["cost"] == pytest.approx(sum(r["cost"] or 0 for r in rows))
    status, report = admin(metered, "GET", "/spend/report?group_by=team")
    finance = next(r for r in report["rows"] if r["group"] == "finance")
    assert finance["requests"] == 3 and finance["cost"] == pytest.approx(3 * cost_of(HAIKU, 11, 7))
    status, own = admin(metered, "GET", "/key/info", key=key["key"])
    assert own["info"]["spend"] == pytest.approx(3 * cost_of(HAIKU, 11, 7))
    status, _error = admin(metered, "GET", "/spend/report?group_by=key", key=key["key"])
    assert status == 403


# ---------------------------------------------------------------- limits


def _wait_for_fresh_minute(server) -> None:
    """Rate windows are calendar minutes: move the proxy's clock to the start of one."""
    server.clock.fresh_minute()


async def _burst(
    url: str, token: str, count: int, body: dict | None = None
) -> list[tuple[int, dict, str]]:
    async with aiohttp.ClientSession() as session:

        async def one() -> tuple[int, dict, str]:
            async with session.post(
                url,
                json=body or {"messages": MESSAGES},
                headers={"Authorization": f"Bearer {token}"},
            ) as r:
                return r.status, dict(r.headers), (await r.read()).decode(errors="replace")

        return await asyncio.gather(*(one() for _ in range(count)))


async def test_rpm_exact_under_concurrency(metered, fake):
    key = await asyncio.to_thread(new_key, metered, rpm_limit=10)
    _wait_for_fresh_minute(metered)
    results = await _burst(metered.base + f"/model/{HAIKU}/converse", key["key"], 30)
    statuses = sorted(status for status, _, _ in results)
    assert statuses.count(200) == 10 and statuses.count(429) == 20
    refused = next(r for r in results if r[0] == 429)
    assert refused[1]["x-amzn-ErrorType"] == "ThrottlingException"
    assert 1 <= int(refused[1]["Retry-After"]) <= 60
    assert "10 requests per minute" in json.loads(refused[2])["message"]


async def test_parallel_cap(metered, fake):
    fake.frame_delay = 0.15  # streams of ~1.5 s: all six requests arrive while two are open
    key = await asyncio.to_thread(new_key, metered, max_parallel_requests=2)
    results = await _burst(metered.base + "/model/test.slow/converse-stream", key["key"], 6)
    statuses = sorted(status for status, _, _ in results)
    assert statuses == [200, 200, 429, 429, 429, 429]
    # Slots come back when the streams end.
    results = await _burst(metered.base + "/model/test.slow/converse-stream", key["key"], 2)
    assert [s for s, _, _ in results] == [200, 200]


def test_tpm_limit(metered, fake):
    _wait_for_fresh_minute(metered)
    key = new_key(metered, tpm_limit=20)
    client = sigv4_client("bedrock-runtime", metered, key)
    client.converse(modelId=HAIKU, messages=MESSAGES)  # 18 tokens
    metered.settle()  # charged after the response
    client.converse(modelId=HAIKU, messages=MESSAGES)  # 36: over, but admitted at 18
    metered.settle()
    with pytest.raises(client.exceptions.ThrottlingException, match="20 tokens per minute"):
        client.converse(modelId=HAIKU, messages=MESSAGES)


def test_budget_exhaustion_and_reset(metered, fake):
    one_call = cost_of(HAIKU, 11, 7)
    key = new_key(metered, max_budget=one_call * 1.5, budget_duration="6s")
    client = sigv4_client("bedrock-runtime", metered, key)
    client.converse(modelId=HAIKU, messages=MESSAGES)
    metered.settle()
    client.converse(modelId=HAIKU, messages=MESSAGES)  # spent < budget: admitted
    metered.settle()
    with pytest.raises(client.exceptions.ServiceQuotaExceededException) as info:
        client.converse(modelId=HAIKU, messages=MESSAGES)
    message = info.value.response["Error"]["Message"]
    assert f"key {key['key_id']}" in message and "resets at" in message
    # A budget of a few thousandths of a cent is shown as one, not as "$0.00".
    budget = re.search(r"of (\$[0-9.]+);", message)
    assert budget is not None and float(budget.group(1)[1:]) > 0, message
    assert info.value.response["ResponseMetadata"]["HTTPStatusCode"] == 400
    # The next period starts 6 s after the key was created.
    created = datetime.fromisoformat(key["created_at"].replace("Z", "+00:00")).timestamp()
    metered.clock.advance(max(0.0, created + 6.2 - metered.clock.time()))
    client.converse(modelId=HAIKU, messages=MESSAGES)


def test_named_limit_by_header(metered, fake):
    _wait_for_fresh_minute(metered)
    status, created = admin(
        metered, "POST", "/limit/new", {"limit_id": f"proj-{time.time_ns()}", "rpm_limit": 2}
    )
    assert status == 200, created
    limit_id = created["limit_id"]
    args = ("-H", f"Authorization: Bearer {MASTER_KEY}", "-H", f"xProxy-Limit-IDs: {limit_id}")
    url = metered.base + f"/model/{HAIKU}/converse"
    assert curl(url, *args, data=json.dumps({"messages": MESSAGES}))[0] == 200
    assert curl(url, *args, data=json.dumps({"messages": MESSAGES}))[0] == 200
    status, _headers, body = curl(url, *args, data=json.dumps({"messages": MESSAGES}))
    assert status == 429 and f"limit {limit_id}" in json.loads(body)["message"]
    # Without the header the same key is not bound by that limit.
    assert (
        curl(
            url,
            "-H",
            f"Authorization: Bearer {MASTER_KEY}",
            data=json.dumps({"messages": MESSAGES}),
        )[0]
        == 200
    )


def test_limits_admin_validation(metered):
    status, error = admin(metered, "POST", "/limit/new", {"limit_id": "x", "rpm_limit": -1})
    assert status == 400 and error["code"] == "ValidationException"
    status, error = admin(
        metered, "POST", "/limit/update", {"limit_id": "does-not-exist", "rpm_limit": 1}
    )
    assert status == 404


def test_spend_command_prints_a_table(metered, store_settings, fake):
    """A table by default: keys with their aliases, costs with the digits that keep them
    non-zero; a refused request is not counted as one without a price."""
    import os
    import subprocess
    import sys

    from botocore.exceptions import ClientError

    boto_client("bedrock-runtime", metered).converse(modelId=HAIKU, messages=MESSAGES)
    key = new_key(metered, key_alias="spend-cli-key", models=[HAIKU])
    client = sigv4_client("bedrock-runtime", metered, key)
    client.converse(modelId=HAIKU, messages=MESSAGES)
    with pytest.raises(ClientError):
        client.converse(modelId="amazon.nova-pro-v1:0", messages=MESSAGES)  # refused
    metered.settle()
    env = {k: v for k, v in os.environ.items() if not k.startswith("BEDROCK_PROXY_")}
    for name, value in store_settings.items():
        env["BEDROCK_PROXY_" + name.upper()] = value

    def spend(*args: str) -> str:
        out = subprocess.run(
            [os.path.join(os.path.dirname(sys.executable), "bedrock-proxy"), "spend", *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert out.returncode == 0, out.stderr
        return out.stdout

    lines = spend("--group-by", "model").splitlines()
    assert lines[0].split()[:2] == ["model", "requests"]
    assert any(line.startswith(HAIKU) for line in lines)
    assert any(line.startswith("TOTAL") for line in lines)
    by_key = spend("--group-by", "key").splitlines()
    mine = next(line for line in by_key if line.startswith(f"{key['key_id']} (spend-cli-key)"))
    requests, cost = mine.split()[2], mine.split()[-1]
    assert requests == "2" and float(cost) == pytest.approx(cost_of(HAIKU, 11, 7), rel=0.05)
    row = next(
        r
        for r in json.loads(spend("--group-by", "key", "--json"))["rows"]
        if r["group"] == key["key_id"]
    )
    assert row["key_alias"] == "spend-cli-key" and row["unpriced"] == 0


def test_health_readiness_with_metering(metered):
    with urllib.request.urlopen(metered.url + "/health/readiness", timeout=5) as response:
        assert json.loads(response.read())["status"] == "ready"


def test_a_ledger_flush_writes_what_was_queued_and_leaves_later_rows_for_the_next(tmp_path, bg):
    """Rows that arrive while a batch is being written wait for the next tick: a flush
    that drained until the queue was empty kept the writer busy without end under load,
    one small transaction (and a GIL hand-off) per few dozen rows."""
    from proxy.metering.ledger import Ledger
    from proxy.store import open_store
    from proxy.store.records import SpendRow

    store = open_store(None, str(tmp_path / "ledger.db"))
    inserts: list[int] = []

    def row(i: int) -> SpendRow:
        return SpendRow(
            *(f"lf-{i}", 1795319557.0 + i, "2026-11-22", "key-lf", None, None, None),
            *(None, "Converse", "bedrock-runtime", "m", 200, 1.0, 1, 1, 0, 0, 2, 0.5, 0),
            *(None, None, None, 0, None, None, None),
        )

    async def run() -> tuple[int, list[int], int]:
        await store.open()
        ledger = Ledger(store, flush_interval=60, max_batch=40)
        insert = store.spend.insert

        async def observed(rows, labels):  # rows come in while this batch is written
            inserts.append(len(rows))
            for i in range(5 if len(inserts) <= 3 else 0):
                ledger.record(row(1000 * len(inserts) + i), [])
            await insert(rows, labels)

        store.spend.insert = observed  # type: ignore[method-assign]
        try:
            for i in range(100):
                ledger.record(row(i), [])
            await ledger.flush()
            left_after_first = ledger.depth
            await ledger.close()
            written = (await store.db.fetch("SELECT COUNT(*) AS n FROM bp_spend"))[0]["n"]
            return left_after_first, list(inserts), written
        finally:
            await store.close()

    left, sizes, written = bg.run(run(), timeout=30)
    assert sizes[:3] == [40, 40, 20]  # the 100 queued, in batches of at most 40
    assert left == 15  # what came in meanwhile waits for the next flush
    assert sizes[3:] == [15] and written == 115  # and close writes it all


def test_a_full_ledger_queue_drops_and_counts_what_it_cannot_hold(bg, tmp_path):
    """During a store outage rows wait in the queue up to ``max_queue``; past it they are
    dropped and counted (``bedrock_proxy_ledger_rows_dropped_total``), and the rows held
    are all written once the store answers."""
    from proxy.metering.ledger import Ledger
    from proxy.store import StoreUnavailable, open_store
    from proxy.store.records import SpendRow

    store = open_store(None, str(tmp_path / "ledger.db"))

    def row(i: int) -> SpendRow:
        return SpendRow(
            *(f"q-{i}", 1795319557.0 + i, "2026-11-22", "key-q", None, None, None),
            *(None, "Converse", "bedrock-runtime", "m", 200, 1.0, 1, 1, 0, 0, 2, 0.5, 0),
            *(None, None, None, 0, None, None, None),
        )

    async def run() -> tuple[int, int, int, int]:
        await store.open()
        ledger = Ledger(store, flush_interval=60, max_batch=4, max_queue=10)
        insert = store.spend.insert

        async def down(rows, labels):
            raise StoreUnavailable("TimeoutError: no answer within the store deadline")

        store.spend.insert = down  # type: ignore[method-assign]
        try:
            for i in range(13):
                ledger.record(row(i), [])
            await ledger.flush()  # fails: every row is kept
            held, dropped = ledger.depth, ledger.dropped
            store.spend.insert = insert  # type: ignore[method-assign]
            await ledger.close()
            written = (await store.db.fetch("SELECT COUNT(*) AS n FROM bp_spend"))[0]["n"]
            return held, dropped, written, ledger.depth
        finally:
            await store.close()

    held, dropped, written, left = bg.run(run(), timeout=30)
    assert (held, dropped) == (10, 3)
    assert (written, left) == (10, 0)


def test_batch_settlement_waits_out_a_store_outage_without_an_error_a_round(bg, caplog):
    """The store's health logs an outage once; the settler, which polls every interval,
    adds no error line a round for it (another failure still is one)."""
    from proxy.metering.batches import BatchSettler
    from proxy.store import StoreUnavailable

    failures = [StoreUnavailable("TimeoutError"), StoreUnavailable("TimeoutError")]
    failures.append(RuntimeError("the claim broke"))
    rounds = asyncio.Event()

    async def claim(name: str, seconds: float) -> bool:
        if not failures:
            rounds.set()
            return False
        raise failures.pop(0)

    async def unused(*args: object) -> object:
        raise AssertionError("nothing to settle")

    async def run() -> None:
        settler = BatchSettler(None, unused, unused, unused, claim, "us-east-1", interval=0.01)
        settler.start()
        try:
            await asyncio.wait_for(rounds.wait(), 10)
        finally:
            await settler.close()

    caplog.set_level(logging.DEBUG, logger="bedrock_proxy.batches")
    bg.run(run(), timeout=20)
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == ["batch settlement failed: RuntimeError: the claim broke"], errors
