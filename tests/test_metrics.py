"""The metrics' families, as a scrape reads them, from what requests recorded.

Requests update one series each (operation, model, status, key); the exposition's families
(requests, tokens by kind, cost, unpriced, four histograms by operation) are sums of those
series. These tests pin the sums: what each family shows for a known set of requests, and
that another worker's snapshot adds to them.
"""

from __future__ import annotations

from proxy.exchange import Exchange, Identity
from proxy.metering.usage import Usage
from proxy.observe.metrics import Metrics
from proxy.wire.routing import Operation, Service

RUNTIME = Service("bedrock-runtime", "bedrock-runtime", "bedrock")
CONVERSE = Operation(RUNTIME, "Converse", "POST", "/model/{modelId}/converse", ("modelId",), False)
STREAM = Operation(
    RUNTIME, "ConverseStream", "POST", "/model/{modelId}/converse-stream", ("modelId",), True
)
ALICE = Identity("virtual", key_id="k-1", alias="alice")
BOB = Identity("virtual", key_id="k-2")  # no alias: the key id is the label


def exchange(
    op: Operation,
    identity: Identity | None,
    status: int = 200,
    model: str | None = "m1",
    usage: Usage | None = None,
    cost: float | None = None,
    seconds: float = 0.003,
    upstream: float | None = 0.002,
    ttfb: float | None = None,
) -> Exchange:
    x = Exchange("r", "POST", 100.0, operation=op, model=model, identity=identity)
    x.status, x.usage, x.cost, x.seconds = status, usage, cost, seconds
    if upstream is not None:
        x.upstream_started, x.upstream_done = 100.0, 100.0 + upstream
    if ttfb is not None:
        x.first_byte_at = 100.0 + ttfb
    return x


def used(inp: int, out: int, cache_read: int = 0) -> Usage:
    return Usage(input_tokens=inp, output_tokens=out, cache_read_tokens=cache_read, found=True)


def recorded() -> Metrics:
    metrics = Metrics()
    metrics.completed(exchange(CONVERSE, ALICE, usage=used(10, 5), cost=0.5))
    metrics.completed(exchange(CONVERSE, ALICE, usage=used(1, 2, cache_read=3), cost=0.25))
    metrics.completed(exchange(STREAM, ALICE, usage=used(4, 4), cost=0.0, ttfb=0.0007))
    metrics.completed(exchange(CONVERSE, BOB, model="unpriced-model", usage=used(7, 1)))
    # Refused: its model is not a label (anything a client names would be), no upstream.
    refused = exchange(CONVERSE, BOB, status=429, model="made-up", upstream=None)
    refused.refusal = "rpm"
    metrics.completed(refused)
    metrics.completed(exchange(CONVERSE, None, status=403, model=None, upstream=None))
    return metrics


def test_the_families_are_the_sums_of_the_series() -> None:
    families = recorded().families()
    assert families.requests == {
        ("Converse", "m1", "200", "alice"): 2,
        ("ConverseStream", "m1", "200", "alice"): 1,
        ("Converse", "unpriced-model", "200", "k-2"): 1,
        ("Converse", "other", "429", "k-2"): 1,
        ("Converse", "", "403", ""): 1,
    }
    assert families.tokens == {
        ("m1", "alice", "input"): 15,
        ("m1", "alice", "output"): 11,
        ("m1", "alice", "cache_read"): 3,
        ("unpriced-model", "k-2", "input"): 7,
        ("unpriced-model", "k-2", "output"): 1,
    }
    assert families.cost == {("m1", "alice"): 0.75}  # a free stream still has its series
    assert families.unpriced == {("unpriced-model",): 1}
    assert families.refusals == {("rpm",): 1}
    duration = families.duration.series
    assert set(duration) == {("Converse",), ("ConverseStream",)}
    assert sum(duration[("Converse",)][:-1]) == 5 and duration[("Converse",)][-1] == 0.015
    # Only requests that went upstream have upstream and overhead observations.
    assert sum(families.upstream.series[("Converse",)][:-1]) == 3
    assert sum(families.overhead.series[("Converse",)][:-1]) == 3
    assert set(families.ttfb.series) == {("ConverseStream",)}


def test_the_exposition_shows_every_family() -> None:
    text = recorded().render().decode()
    assert (
        'bedrock_proxy_requests_total{operation="Converse",model="m1",status="200",'
        'key="alice"} 2' in text
    )
    assert 'bedrock_proxy_tokens_total{model="m1",key="alice",kind="output"} 11' in text
    assert 'bedrock_proxy_cost_usd_total{model="m1",key="alice"} 0.75' in text
    assert 'bedrock_proxy_unpriced_requests_total{model="unpriced-model"} 1' in text
    assert 'bedrock_proxy_limit_refusals_total{reason="rpm"} 1' in text
    assert 'bedrock_proxy_request_duration_seconds_count{operation="Converse"} 5' in text
    assert 'bedrock_proxy_stream_ttfb_seconds_count{operation="ConverseStream"} 1' in text


def test_another_workers_snapshot_adds_to_this_ones() -> None:
    mine, other = recorded(), recorded()
    text = mine.render([other.snapshot()], [True]).decode()
    assert (
        'bedrock_proxy_requests_total{operation="Converse",model="m1",status="200",'
        'key="alice"} 4' in text
    )
    assert 'bedrock_proxy_cost_usd_total{model="m1",key="alice"} 1.5' in text
    assert 'bedrock_proxy_request_duration_seconds_count{operation="Converse"} 10' in text
    # The scrape read the series; it did not change them.
    assert mine.families().requests[("Converse", "m1", "200", "alice")] == 2
