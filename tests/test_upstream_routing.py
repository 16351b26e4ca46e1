"""Upstream routing end to end: three fake upstreams stand for three account/region pairs,
each accepting only its own account's credentials; a fake STS issues the third account's
role sessions. Real boto3 clients talk to the proxy and never see a throttle one member
answered while another had capacity."""

from __future__ import annotations

import asyncio
import json
import os
import re
import secrets
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import botocore.exceptions
import pytest
from botocore.exceptions import ClientError

from proxy.server.app import UPSTREAM
from proxy.server.config import ConfigError, load_settings
from tests.conftest import MASTER_KEY, SERVICES, boto_client, start_server, unanswered_port
from tests.fake_bedrock import (
    UPSTREAM_ACCESS_KEY,
    UPSTREAM_SECRET_KEY,
    UPSTREAM_SESSION_TOKEN,
    FakeBedrock,
)
from tests.fake_s3 import FakeS3, Obj
from tests.fake_sts import FakeSts
from tests.helpers.admin import admin, new_key
from tests.stores import REDIS_PREFIX

HAIKU = "anthropic.claude-3-haiku-20240307-v1:0"
ACCOUNT_IDS = {"a": "111111111111", "b": "222222222222", "c": "333333333333"}
REGIONS = {"a": "us-east-1", "b": "us-west-2", "c": "eu-west-1"}
B_KEY_ID, B_SECRET = "AKIDACCOUNTBFAKE0002", "account-b/secret/key"
ROLE_C = f"arn:aws:iam::{ACCOUNT_IDS['c']}:role/bedrock-research"
MESSAGE = [{"role": "user", "content": [{"text": "Hello"}]}]


class Fleet:
    def __init__(
        self,
        fakes: dict[str, FakeBedrock],
        urls: dict[str, str],
        sts: FakeSts,
        sts_url: str,
        s3_b: FakeS3,
        s3_b_url: str,
    ) -> None:
        self.fakes, self.urls, self.sts, self.sts_url = fakes, urls, sts, sts_url
        self.s3_b, self.s3_b_url = s3_b, s3_b_url

    def clear(self) -> None:
        for fake in self.fakes.values():
            fake.requests.clear()
            fake.fault = None
        self.sts.calls.clear()

    def served(self) -> Counter[str]:
        return Counter({name: len(f.requests) for name, f in self.fakes.items()})

    def upstreams(self, **overrides: Any) -> dict[str, Any]:
        def endpoints(name: str) -> dict[str, str]:
            return {service: self.urls[name] for service in SERVICES}

        config: dict[str, Any] = {
            "accounts": {
                "a": {
                    "regions": ["us-east-1"],
                    "profile": "upstream",
                    "endpoints": endpoints("a"),
                    "account_id": ACCOUNT_IDS["a"],
                },
                "b": {
                    "regions": ["us-west-2"],
                    "profile": "account-b",
                    "endpoints": {**endpoints("b"), "s3": self.s3_b_url},
                    "account_id": ACCOUNT_IDS["b"],
                },
                "c": {
                    "regions": ["eu-west-1"],
                    "assume_role": {
                        "role_arn": ROLE_C,
                        "external_id": "research-ext-1",
                        "session_name": "bedrock-proxy",
                        "duration_seconds": 1800,
                        "session_tags": {"Team": "team_id", "User": "user_id", "Key": "key_alias"},
                        "source_profile": "upstream",
                    },
                    "endpoints": {**endpoints("c"), "sts": self.sts_url},
                },
            },
            "pools": {
                "main": [{"account": "a"}, {"account": "b", "priority": 1}],
                "spread": [{"account": "a"}, {"account": "b"}],
                "only-b": [{"account": "b"}],
                "research": [{"account": "c"}],
                "geo": [{"account": "c"}, {"account": "a", "priority": 1}],
            },
            "routes": [
                {"team": "research", "pool": "research"},
                {"user": "eve", "account": "b", "region": "us-west-2"},
            ],
            "default_pool": "main",
            "cooldown_seconds": 30,
        }
        config.update(overrides)
        return config


@pytest.fixture(scope="module")
def fleet(bg) -> Iterator[Fleet]:
    fakes = {name: FakeBedrock(account_id=ACCOUNT_IDS[name]) for name in "abc"}
    fakes["b"].accept_default = False
    fakes["b"].credentials[B_KEY_ID] = (B_SECRET, None)
    fakes["c"].accept_default = False
    s3_b = FakeS3(account_key=(B_KEY_ID, B_SECRET))
    started = {name: bg.run(start_server(fake.app())) for name, fake in fakes.items()}
    urls = {name: url for name, (url, _) in started.items()}
    s3_b_url, s3_b_runner = bg.run(start_server(s3_b.app()))

    def grant(role: str, akid: str, secret: str, token: str) -> None:
        assert role == ROLE_C
        fakes["c"].credentials[akid] = (secret, token)

    sts = FakeSts({UPSTREAM_ACCESS_KEY: (UPSTREAM_SECRET_KEY, UPSTREAM_SESSION_TOKEN)}, grant)
    sts.external_ids[ROLE_C] = "research-ext-1"
    sts_url, sts_runner = bg.run(start_server(sts.app()))
    # Account b's own keys, as a profile in the shared credentials file the suite uses.
    with open(os.environ["AWS_SHARED_CREDENTIALS_FILE"], "a") as fh:
        fh.write(
            f"\n[account-b]\naws_access_key_id = {B_KEY_ID}\naws_secret_access_key = {B_SECRET}\n"
        )
    yield Fleet(fakes, urls, sts, sts_url, s3_b, s3_b_url)
    bg.run(s3_b_runner.cleanup())
    for _, runner in started.values():
        bg.run(runner.cleanup())
    bg.run(sts_runner.cleanup())


@pytest.fixture
def routed(fleet: Fleet, start_proxy):
    """A new proxy (fresh health) on the three accounts."""
    fleet.clear()

    def make(**overrides: Any):
        upstreams = fleet.upstreams(**overrides.pop("upstreams", {}))
        return start_proxy(upstreams=upstreams, **overrides)

    return make


def converse(client: Any, model: str = HAIKU, **kwargs: Any) -> dict:
    return client.converse(modelId=model, messages=MESSAGE, **kwargs)


def served_by(response: dict) -> str:
    return response["ResponseMetadata"]["HTTPHeaders"]["x-bedrock-proxy-upstream"]


def signed_with(fake: FakeBedrock) -> set[tuple[str, str]]:
    """(access key, region) of every request the fake received."""
    out = set()
    for received in fake.requests:
        credential = received.headers["Authorization"].split("Credential=")[1].split(",")[0]
        akid, _, region, *_ = credential.split("/")
        out.add((akid, region))
    return out


# ---------------------------------------------------------------- accounts and roles


def test_each_member_signs_with_its_own_account(routed, fleet):
    proxy = routed()
    main = boto_client("bedrock-runtime", proxy)
    assert served_by(converse(main)) == "a/us-east-1"
    b_key = new_key(proxy, upstream="only-b")
    assert served_by(converse(boto_client("bedrock-runtime", proxy, key=b_key["key"]))) == (
        "b/us-west-2"
    )
    eve = new_key(proxy, user_id="eve")  # a route may name one account instead of a pool
    assert served_by(converse(boto_client("bedrock-runtime", proxy, key=eve["key"]))) == (
        "b/us-west-2"
    )
    assert signed_with(fleet.fakes["a"]) == {(UPSTREAM_ACCESS_KEY, "us-east-1")}
    assert signed_with(fleet.fakes["b"]) == {(B_KEY_ID, "us-west-2")}
    assert "X-Amz-Security-Token" not in fleet.fakes["b"].requests[0].headers
    # The control plane and the agent runtime follow the route as well.
    boto_client("bedrock", proxy, key=b_key["key"]).list_foundation_models()
    assert fleet.fakes["b"].requests[-1].operation == "ListFoundationModels"
    assert signed_with(fleet.fakes["b"]) == {(B_KEY_ID, "us-west-2")}


def test_files_go_to_the_bucket_of_the_keys_account(routed, fleet):
    from tests.helpers.admin import s3_client

    proxy = routed()
    key = new_key(proxy, upstream="only-b", file_buckets=["team-b"])
    s3 = s3_client(proxy, key)
    put = s3.put_object(Bucket="team-b", Key="batch/in.jsonl", Body=b'{"recordId": "1"}\n')
    assert put["ResponseMetadata"]["HTTPHeaders"]["x-bedrock-proxy-upstream"] == "b/us-west-2"
    assert fleet.s3_b.buckets["team-b"]["batch/in.jsonl"].data == b'{"recordId": "1"}\n'
    _, _, headers = fleet.s3_b.requests[-1]
    authorization = {k.lower(): v for k, v in headers.items()}["authorization"]
    assert f"{B_KEY_ID}/" in authorization and "/us-west-2/s3/" in authorization


def test_a_batch_job_runs_reads_and_is_charged_in_its_own_account(routed, fleet, tmp_path):
    from tests.helpers.admin import ledger_row

    fleet.fakes["b"].s3 = fleet.s3_b  # the job writes its manifest to account b's S3
    proxy = routed(
        sqlite_path=str(tmp_path / "batch.db"), batch_poll_interval=0.2, ledger_flush_interval=0.1
    )
    key = new_key(proxy, upstream="only-b", file_buckets=["b-in", "b-out"])
    records = "".join(json.dumps({"recordId": f"r{i}", "modelInput": {}}) + "\n" for i in range(4))
    fleet.s3_b.buckets["b-in"] = {"in.jsonl": Obj(records.encode(), '"e"', "application/jsonl")}
    control = boto_client("bedrock", proxy, key=key["key"])
    created = control.create_model_invocation_job(
        jobName="nightly-b",
        roleArn=f"arn:aws:iam::{ACCOUNT_IDS['b']}:role/batch",
        modelId=HAIKU,
        inputDataConfig={"s3InputDataConfig": {"s3Uri": "s3://b-in/in.jsonl"}},
        outputDataConfig={"s3OutputDataConfig": {"s3Uri": "s3://b-out/results/"}},
    )
    arn = created["jobArn"]
    assert f":us-west-2:{ACCOUNT_IDS['b']}:" in arn and served_by(created) == "b/us-west-2"
    # Read (and so ended, by the fake) by the master key (whose pool is "main", on a): the ARN sends it to b.
    got = boto_client("bedrock", proxy).get_model_invocation_job(jobIdentifier=arn)
    assert served_by(got) == "b/us-west-2" and got["status"] == "Completed"
    row = ledger_row(proxy, arn, timeout=10)
    assert (row["operation"], row["key_id"], row["input_tokens"]) == (
        "ModelInvocationJob",
        key["key_id"],
        40,
    )
    assert row["region"] == "us-west-2"
    assert not fleet.fakes["a"].requests


def test_assumed_role_carries_session_tags_and_its_own_temporary_credentials(routed, fleet):
    proxy = routed()
    ana = new_key(proxy, team_id="research", user_id="ana", key_alias=f"ana-{secrets.token_hex(3)}")
    bo = new_key(proxy, team_id="research", user_id="bo", key_alias=f"bo-{secrets.token_hex(3)}")
    ana_client = boto_client("bedrock-runtime", proxy, key=ana["key"])
    for _ in range(3):
        assert served_by(converse(ana_client)) == "c/eu-west-1"
    assert served_by(converse(boto_client("bedrock-runtime", proxy, key=bo["key"]))) == (
        "c/eu-west-1"
    )
    calls = fleet.sts.calls
    # One role session per tag set, reused until it nears expiry.
    assert len(calls) == 2
    assert calls[0].role_arn == ROLE_C and calls[0].external_id == "research-ext-1"
    assert calls[0].session_name == "bedrock-proxy" and calls[0].duration == 1800
    assert calls[0].source_access_key == UPSTREAM_ACCESS_KEY
    assert calls[0].tags == {"Team": "research", "User": "ana", "Key": ana["key_alias"]}
    assert calls[1].tags == {"Team": "research", "User": "bo", "Key": bo["key_alias"]}
    tokens = [r.headers.get("X-Amz-Security-Token") for r in fleet.fakes["c"].requests]
    assert tokens == [calls[0].issued_token] * 3 + [calls[1].issued_token]
    assert {akid for akid, _ in signed_with(fleet.fakes["c"])} == {
        calls[0].issued_access_key,
        calls[1].issued_access_key,
    }
    assert not fleet.fakes["a"].requests and not fleet.fakes["b"].requests


def test_a_role_session_is_refreshed_before_it_expires_without_a_request_waiting(routed, fleet):
    proxy = routed()
    key = new_key(proxy, team_id="research", user_id="cy")
    client = boto_client("bedrock-runtime", proxy, key=key["key"])
    fleet.sts.expires_in = 400.0  # inside the 1800 s session's refresh window (450 s)
    try:
        converse(client)
        first = fleet.sts.calls[-1]
        time.sleep(1.1)  # providers look at expiry at most once a second
        converse(client)  # still signed with the first session; a refresh starts
        deadline = time.monotonic() + 5
        while len(fleet.sts.calls) < 2:
            assert time.monotonic() < deadline, "no background refresh"
            time.sleep(0.02)
        fleet.sts.expires_in = None
        time.sleep(0.1)
        converse(client)
    finally:
        fleet.sts.expires_in = None
    tokens = [r.headers["X-Amz-Security-Token"] for r in fleet.fakes["c"].requests]
    second = fleet.sts.calls[1]
    assert tokens == [first.issued_token, first.issued_token, second.issued_token]
    assert second.tags == first.tags


def test_a_refused_role_is_an_aws_shaped_503_and_moves_to_the_next_member(routed, fleet):
    proxy = routed(
        upstreams={
            "pools": {
                "main": [{"account": "c"}, {"account": "a", "priority": 1}],
                "research": [{"account": "c"}],
            },
        }
    )
    fleet.sts.denied.add(ROLE_C)
    try:
        assert served_by(converse(boto_client("bedrock-runtime", proxy))) == "a/us-east-1"
        key = new_key(proxy, team_id="research")
        with pytest.raises(botocore.exceptions.ClientError) as caught:
            converse(boto_client("bedrock-runtime", proxy, key=key["key"]))
        error = caught.value.response
        assert error["Error"]["Code"] == "ServiceUnavailableException"
        assert error["ResponseMetadata"]["HTTPStatusCode"] == 503
        assert "account c" in error["Error"]["Message"]
    finally:
        fleet.sts.denied.clear()


# ---------------------------------------------------------------- failover


@pytest.mark.parametrize("fault", ["throttle", "unavailable", "error500"])
def test_a_storm_on_one_member_never_reaches_the_client(routed, fleet, fault):
    proxy = routed()
    fleet.fakes["a"].fault = fault
    client = boto_client("bedrock-runtime", proxy)
    answers = [converse(client) for _ in range(30)]
    assert {served_by(a) for a in answers} == {"b/us-west-2"}
    # Cooling down, a was asked once; b served every request.
    assert fleet.served() == {"a": 1, "b": 30, "c": 0}
    # The same for streams: moved before their first byte.
    fleet.fakes["a"].fault = fault
    stream = client.converse_stream(modelId=HAIKU, messages=MESSAGE)
    assert served_by(stream) == "b/us-west-2"
    assert any("metadata" in event for event in stream["stream"])
    proxy.settle()
    status, logs = admin(proxy, "GET", "/spend/logs")
    assert status == 200
    rows = [r for r in logs["logs"] if r["operation"] == "Converse"]
    assert len(rows) == 30
    assert {(r["account"], r["region"], r["status"]) for r in rows} == {("b", "us-west-2", 200)}
    _, text = _metrics(proxy)
    kind = "throttles" if fault == "throttle" else "failures"
    assert f'bedrock_proxy_upstream_member_{kind}_total{{member="a/us-east-1"}} 1' in text
    assert 'bedrock_proxy_upstream_member_failovers_total{member="a/us-east-1"} 1' in text
    assert 'bedrock_proxy_upstream_member_cooldowns_total{member="a/us-east-1"} 1' in text
    assert 'bedrock_proxy_upstream_member_requests_total{member="b/us-west-2"} 31' in text
    # The console's live page shows each member's health.
    live = _console_live(proxy)
    members = {m["member"]: m for m in live["members"]}
    assert members["a/us-east-1"]["state"] == "cooling down"
    assert members["b/us-west-2"]["state"] == "healthy" and members["b/us-west-2"]["requests"] == 31


def test_a_member_that_cannot_be_reached_is_skipped(routed, fleet):
    with unanswered_port() as port:
        _skip_unreachable_members(routed, fleet, port)


def _skip_unreachable_members(routed, fleet, port: int) -> None:
    dead = {s: f"http://127.0.0.1:{port}" for s in SERVICES}
    closed = {s: "http://127.0.0.1:9" for s in SERVICES}
    proxy = routed(
        connect_timeout=0.3,
        upstreams={
            "accounts": {
                **fleet.upstreams()["accounts"],
                "dead": {"regions": ["us-east-2"], "profile": "upstream", "endpoints": dead},
                "closed": {"regions": ["us-east-1"], "profile": "upstream", "endpoints": closed},
            },
            "pools": {
                "main": [
                    {"account": "dead"},
                    {"account": "closed", "priority": 1},
                    {"account": "b", "priority": 2},
                ]
            },
            "routes": [],
        },
    )
    started = time.monotonic()
    assert served_by(converse(boto_client("bedrock-runtime", proxy))) == "b/us-west-2"
    assert time.monotonic() - started < 3
    tried = _member_counts(proxy)
    assert tried["dead/us-east-2"] == tried["closed/us-east-1"] == 1, tried
    # Both cool down: the next request goes straight to b, trying neither (counted, not
    # timed: a busy machine makes any request slow).
    assert served_by(converse(boto_client("bedrock-runtime", proxy))) == "b/us-west-2"
    assert _member_counts(proxy) == tried


def test_a_stream_is_never_moved_after_its_first_byte(routed, fleet):
    proxy = routed()
    client = boto_client("bedrock-runtime", proxy)
    stream = client.converse_stream(modelId="test.cut", messages=MESSAGE)
    assert served_by(stream) == "a/us-east-1"
    with pytest.raises(botocore.exceptions.EventStreamError):
        for _ in stream["stream"]:
            pass
    time.sleep(0.2)
    assert fleet.served()["a"] == 1 and fleet.served()["b"] == 0


def test_control_plane_writes_and_jobs_are_never_moved(routed, fleet):
    proxy = routed()
    fleet.fakes["a"].fault = "error500"
    control = boto_client("bedrock", proxy)
    with pytest.raises(botocore.exceptions.ClientError) as caught:
        control.create_model_invocation_job(
            jobName="j1",
            roleArn="arn:aws:iam::111111111111:role/batch",
            modelId=HAIKU,
            inputDataConfig={"s3InputDataConfig": {"s3Uri": "s3://in/x.jsonl"}},
            outputDataConfig={"s3OutputDataConfig": {"s3Uri": "s3://out/"}},
        )
    assert caught.value.response["Error"]["Code"] == "InternalServerException"
    runtime = boto_client("bedrock-runtime", proxy)
    with pytest.raises(botocore.exceptions.ClientError):
        runtime.start_async_invoke(
            modelId="amazon.nova-reel-v1:0",
            modelInput={"taskType": "TEXT_VIDEO"},
            outputDataConfig={"s3OutputDataConfig": {"s3Uri": "s3://out/"}},
        )
    assert fleet.served()["b"] == 0


def test_jobs_are_read_in_the_account_that_owns_them(routed, fleet):
    proxy = routed()
    spread = new_key(proxy, upstream="spread")
    runtime = boto_client("bedrock-runtime", proxy, key=spread["key"])
    owners = set()
    arns: list[str] = []
    for i in range(12):
        started = runtime.start_async_invoke(
            modelId="amazon.nova-reel-v1:0",
            modelInput={"taskType": "TEXT_VIDEO", "n": i},
            outputDataConfig={"s3OutputDataConfig": {"s3Uri": "s3://out/"}},
        )
        arn = started["invocationArn"]
        arns.append(arn)
        owner = served_by(started)
        owners.add(owner)
        account = "a" if owner.startswith("a/") else "b"
        assert f":{ACCOUNT_IDS[account]}:" in arn
        before = len(fleet.fakes[account].requests)
        got = runtime.get_async_invoke(invocationArn=arn)
        assert served_by(got) == owner
        assert fleet.fakes[account].requests[before].operation == "GetAsyncInvoke"
    assert owners == {"a/us-east-1", "b/us-west-2"}  # both were used, each kept its jobs
    # The key moves to a pool without account b: b's jobs are still read (and stopped)
    # in b, where they run.
    moved = admin(proxy, "POST", "/key/update", {"key": spread["key_id"], "upstream": "research"})
    assert moved[0] == 200
    b_job = next(a for a in arns if f":{ACCOUNT_IDS['b']}:" in a)
    assert served_by(runtime.get_async_invoke(invocationArn=b_job)) == "b/us-west-2"


# ---------------------------------------------------------------- where a model may go


def test_a_model_goes_only_where_it_is_valid(routed, fleet):
    proxy = routed()
    geo = new_key(proxy, upstream="geo", team_id="research")
    client = boto_client("bedrock-runtime", proxy, key=geo["key"])
    # c (eu-west-1) comes first in the pool, but a us. profile runs only in US regions.
    assert served_by(converse(client, "us." + HAIKU)) == "a/us-east-1"
    assert served_by(converse(client, "eu." + HAIKU)) == "c/eu-west-1"
    assert served_by(converse(client, "global." + HAIKU)) == "c/eu-west-1"
    with pytest.raises(client.exceptions.ValidationException) as caught:
        converse(client, "apac." + HAIKU)
    assert "apac." in str(caught.value)
    assert not any(name in str(caught.value) for name in ("geo", "eu-west-1", "us-east-1"))
    # An application profile stays in its own account and region, and is looked up there.
    profile = f"arn:aws:bedrock:us-east-1:{ACCOUNT_IDS['a']}:application-inference-profile/p1"
    fleet.fakes["a"].model_refs[profile] = HAIKU
    assert served_by(converse(client, profile)) == "a/us-east-1"
    assert [r.operation for r in fleet.fakes["a"].requests][-2:] == [
        "GetInferenceProfile",
        "Converse",
    ]
    elsewhere = f"arn:aws:bedrock:us-east-1:{ACCOUNT_IDS['b']}:application-inference-profile/p2"
    with pytest.raises(client.exceptions.ValidationException):
        converse(client, elsewhere)


def test_lookups_on_a_keys_behalf_are_authorised_bounded_and_stay_in_its_pool(routed, fleet):
    """A key that may not use a model, with rpm_limit 1, naming 12 made-up application
    profiles, causes one signed lookup a minute; a key routed to one pool never causes a
    lookup in another pool's account, and cannot tell a foreign profile that exists from
    one that does not."""
    proxy = routed()
    looked_up = lambda name: sum(  # noqa: E731
        r.operation == "GetInferenceProfile" for r in fleet.fakes[name].requests
    )
    limited = new_key(proxy, models=["amazon.*"], rpm_limit=1)
    client = boto_client("bedrock-runtime", proxy, key=limited["key"])
    for i in range(12):
        made_up = f"arn:aws:bedrock:us-east-1:{ACCOUNT_IDS['a']}:application-inference-profile/x{i}"
        with pytest.raises(ClientError):
            converse(client, made_up)
    assert looked_up("a") <= 1
    # A key in pool only-b (account b, us-west-2) names a profile of account a.
    in_b = new_key(proxy, upstream="only-b")
    client = boto_client("bedrock-runtime", proxy, key=in_b["key"])
    existing = f"arn:aws:bedrock:us-east-1:{ACCOUNT_IDS['a']}:application-inference-profile/p9"
    missing = f"arn:aws:bedrock:us-east-1:{ACCOUNT_IDS['a']}:application-inference-profile/p0"
    fleet.fakes["a"].model_refs[existing] = HAIKU
    before = looked_up("a")
    answers = []
    for arn in (existing, missing):
        with pytest.raises(ClientError) as caught:
            converse(client, arn)
        answers.append((caught.value.response["Error"]["Code"], str(caught.value).replace(arn, "")))
    assert looked_up("a") == before  # no lookup in another pool's account
    assert answers[0] == answers[1]  # the same refusal, whether or not it exists
    assert not any(word in answers[0][1] for word in ("only-b", "us-west-2", ACCOUNT_IDS["b"]))


# ---------------------------------------------------------------- affinity


def _conversation_hit_rate(proxy, fleet, conversations: int, turns: int) -> tuple[float, set]:
    """Share of turns after the first that went where their conversation began (where
    the prompt cache holds its prefix), and the members first turns went to."""
    key = new_key(proxy, upstream="spread")
    client = boto_client("bedrock-runtime", proxy, key=key["key"])
    hits = total = 0
    first_members = set()
    for c in range(conversations):
        system = [{"text": f"You are assistant number {c} of {secrets.token_hex(4)}."}]
        messages: list[dict] = []
        first = None
        for t in range(turns):
            messages.append({"role": "user", "content": [{"text": f"turn {t}"}]})
            answer = client.converse(modelId=HAIKU, system=system, messages=messages)
            member = served_by(answer)
            messages.append(answer["output"]["message"])
            if first is None:
                first = member
                first_members.add(member)
            else:
                total += 1
                hits += member == first
    return hits / total, first_members


def test_affinity_keeps_a_conversation_on_one_member(routed, fleet, capsys):
    proxy = routed()
    rate, _ = _conversation_hit_rate(proxy, fleet, 1, 100)
    assert rate == 1.0
    rate, members = _conversation_hit_rate(proxy, fleet, 16, 4)
    assert rate == 1.0 and members == {"a/us-east-1", "b/us-west-2"}  # conversations spread
    # The explicit header names the conversation instead.
    key = new_key(proxy, upstream="spread")
    client = boto_client("bedrock-runtime", proxy, key=key["key"])

    def tag(request: Any, **_: Any) -> None:
        request.headers["x-bedrock-proxy-affinity"] = "ticket-42"

    client.meta.events.register_first("before-sign.*.*", tag)
    seen = {served_by(converse(client, system=[{"text": f"s{i}"}])) for i in range(20)}
    assert len(seen) == 1
    assert all(
        "x-bedrock-proxy-affinity" not in r.headers
        for f in fleet.fakes.values()
        for r in f.requests
    )
    # Without affinity, turns land by weight alone: the cache is warm about half the time.
    plain = routed(upstreams={"affinity": False})
    random_rate, _ = _conversation_hit_rate(plain, fleet, 4, 10)
    assert random_rate < 0.85
    with capsys.disabled():
        print(f"\nprompt-cache member hit rate: affinity 100%, none {random_rate:.0%}")


def test_a_cooling_member_loses_its_conversations_until_it_is_back(routed, fleet):
    proxy = routed(upstreams={"cooldown_seconds": 0.2, "max_cooldown_seconds": 0.2})
    key = new_key(proxy, upstream="spread")
    client = boto_client("bedrock-runtime", proxy, key=key["key"])
    system = [{"text": "a long stable prompt"}]
    home = served_by(client.converse(modelId=HAIKU, system=system, messages=MESSAGE))
    account = home[0]
    other = "b" if account == "a" else "a"
    fleet.fakes[account].fault = "throttle"
    moved = served_by(client.converse(modelId=HAIKU, system=system, messages=MESSAGE))
    assert moved.startswith(other)
    fleet.fakes[account].fault = None
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:  # probed back once the cool-down ends
        back = served_by(client.converse(modelId=HAIKU, system=system, messages=MESSAGE))
        if back == home:
            break
        time.sleep(0.05)
    assert back == home


# ---------------------------------------------------------------- replicas


def test_cooldown_is_shared_by_three_replicas_on_redis(routed, fleet, redis_url, bg):
    import redis

    redis.Redis.from_url(redis_url).delete(f"{REDIS_PREFIX}:upstream-health")
    replicas = [
        routed(redis_url=redis_url, upstreams={"health_sync_seconds": 0.05}) for _ in range(3)
    ]
    fleet.fakes["a"].fault = "throttle"
    assert served_by(converse(boto_client("bedrock-runtime", replicas[0]))) == "b/us-west-2"
    deadline = time.monotonic() + 5
    for replica in replicas[1:]:
        health = replica.app[UPSTREAM].fleet.health
        while health.available("a/us-east-1", time.time()):
            assert time.monotonic() < deadline, "the cool-down did not reach every replica"
            time.sleep(0.02)
    for replica in replicas[1:]:
        client = boto_client("bedrock-runtime", replica)
        assert {served_by(converse(client)) for _ in range(10)} == {"b/us-west-2"}
    assert fleet.served() == {"a": 1, "b": 21, "c": 0}
    # Deleting the hash resets every member on every replica within a sync, although
    # their cool-downs (30 s) have not ended.
    fleet.fakes["a"].fault = None
    redis.Redis.from_url(redis_url).delete(f"{REDIS_PREFIX}:upstream-health")
    deadline = time.monotonic() + 5
    for replica in replicas:
        health = replica.app[UPSTREAM].fleet.health
        while not health.available("a/us-east-1", time.time()):
            assert time.monotonic() < deadline, "a replica kept the deleted cool-down"
            time.sleep(0.02)
    assert served_by(converse(boto_client("bedrock-runtime", replicas[2]))) == "a/us-east-1"


# ---------------------------------------------------------------- admin, CLI, config


def test_keys_and_teams_name_their_pool(routed, fleet):
    proxy = routed()
    status, error = admin(proxy, "POST", "/key/generate", {"upstream": "nowhere"})
    assert status == 400 and error["code"] == "ValidationException"
    assert "'nowhere'" in error["message"] and "only-b" in error["message"]
    key = new_key(proxy, team_id="ops")
    client = boto_client("bedrock-runtime", proxy, key=key["key"])
    assert served_by(converse(client)) == "a/us-east-1"  # the default pool
    status, body = admin(proxy, "POST", "/team/update", {"team_id": "ops", "upstream": "only-b"})
    assert status == 200 and body["team_id"] == "ops" and body["upstream"] == "only-b"
    assert served_by(converse(client)) == "b/us-west-2"
    status, body = admin(proxy, "GET", "/team/info?team_id=ops")
    assert body == {"team_id": "ops", "upstream": "only-b", "members_with_roles": []}
    status, body = admin(proxy, "POST", "/key/update", {"key": key["key_id"], "upstream": "main"})
    assert status == 200 and body["upstream"] == "main"
    status, body = admin(proxy, "POST", "/team/update", {"team_id": "ops", "upstream": "x"})
    assert status == 400
    status, body = admin(proxy, "POST", "/team/update", {"team_id": "ops", "upstream": None})
    assert status == 200 and body["upstream"] is None
    status, body = admin(proxy, "GET", "/team/list", key=key["key"])
    assert status == 403


def test_cli_sets_key_and_team_pools(fleet, tmp_path):
    config = tmp_path / "proxy.yaml"
    config.write_text(
        json.dumps(
            {
                "master_key": MASTER_KEY,
                "sqlite_path": str(tmp_path / "keys.db"),
                "upstreams": fleet.upstreams(),
            }
        )
    )
    bin_ = os.path.join(os.path.dirname(sys.executable), "bedrock-proxy")

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [bin_, *args, "--config", str(config)]
            if args[0] == "spend"
            else [bin_, args[0], "--config", str(config), *args[1:]],
            capture_output=True,
            text=True,
            timeout=60,
        )

    made = cli("keys", "create", "--alias", "cli-routed", "--upstream", "only-b")
    assert made.returncode == 0, made.stderr
    assert json.loads(made.stdout)["upstream"] == "only-b"
    refused = cli("keys", "create", "--upstream", "nowhere")
    assert refused.returncode == 1 and "not an upstream pool" in refused.stderr
    team = cli("teams", "set", "ops", "--upstream", "spread")
    assert team.returncode == 0 and json.loads(team.stdout)["upstream"] == "spread"
    listed = cli("teams", "list")
    assert json.loads(listed.stdout) == {"teams": [{"team_id": "ops", "upstream": "spread"}]}


_GOOD = {
    "accounts": {"a": {"regions": ["us-east-1"]}},
    "pools": {"main": [{"account": "a"}]},
}


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"pools": {"main": [{"account": "zz"}]}}, "upstreams.pools.main[0]: unknown account 'zz'"),
        ({"routes": [{"team": "t", "pool": "nope"}]}, "upstreams.routes[0].pool: unknown pool"),
        (
            {"routes": [{"team": "t", "account": "zz"}]},
            "upstreams.routes[0][0]: unknown account 'zz' (one of a)",
        ),
        (
            {"accounts": {"a": {"regions": ["us-east-1", "mars-north-1x"]}}},
            "upstreams.accounts.a.regions: 'mars-north-1x' is not an AWS region name",
        ),
        (
            {"pools": {"main": [{"account": "a", "region": "eu-west-1"}]}},
            "'eu-west-1' is not one of account a's regions",
        ),
        (
            {
                "accounts": {
                    "a": {
                        "regions": ["us-east-1"],
                        "assume_role": {"role_arn": "arn:aws:iam::12:role/x"},
                    }
                }
            },
            "upstreams.accounts.a.assume_role.role_arn: 'arn:aws:iam::12:role/x' is not an IAM role",
        ),
        (
            {
                "accounts": {
                    "a": {
                        "regions": ["us-east-1"],
                        "assume_role": {
                            "role_arn": ROLE_C,
                            "session_tags": {"Team": "password"},
                        },
                    }
                }
            },
            "session_tags.Team: 'password' is not one of key_id, key_alias, team_id, user_id",
        ),
        ({"default_pool": "other"}, "upstreams.default_pool: 'other' is not a pool"),
        (
            {
                "accounts": {
                    "a": {
                        "regions": ["us-east-1"],
                        "profile": "p",
                        "assume_role": {"role_arn": ROLE_C},
                    }
                }
            },
            "upstreams.accounts.a: profile and assume_role together",
        ),
        ({"pools": {"main": [{"account": "a", "weight": 0}]}}, "weight: must be a number above 0"),
    ],
)
def test_bad_configs_are_refused_with_one_line(change, expected, tmp_path):
    upstreams = {**_GOOD, **change}
    with pytest.raises(ConfigError) as caught:
        load_settings(env={}, overrides={"master_key": MASTER_KEY, "upstreams": upstreams})
    message = str(caught.value)
    assert "\n" not in message and message.startswith("config error: ")
    assert expected in message
    # The same line from the command, before anything listens.
    config = tmp_path / "bad.yaml"
    config.write_text(json.dumps({"master_key": MASTER_KEY, "upstreams": upstreams}))
    bin_ = os.path.join(os.path.dirname(sys.executable), "bedrock-proxy")
    done = subprocess.run(
        [bin_, "serve", "--config", str(config), "--port", "1"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode != 0
    assert done.stderr.strip().splitlines()[-1].endswith(message)


def test_without_upstreams_nothing_changes(proxy, fake):
    answer = converse(boto_client("bedrock-runtime", proxy))
    assert "x-bedrock-proxy-upstream" not in answer["ResponseMetadata"]["HTTPHeaders"]


def _console_live(proxy) -> dict:
    import urllib.error
    import urllib.parse
    import urllib.request

    class Keep(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *args: Any) -> None:
            return None

    sign_in = urllib.request.Request(
        proxy.url + "/ui/signin", data=urllib.parse.urlencode({"key": MASTER_KEY}).encode()
    )
    try:
        urllib.request.build_opener(Keep).open(sign_in, timeout=10)
    except urllib.error.HTTPError as redirect:
        cookie = redirect.headers["Set-Cookie"].split(";")[0]
    live = urllib.request.Request(proxy.url + "/ui/live.json", headers={"Cookie": cookie})
    with urllib.request.urlopen(live, timeout=10) as response:
        return json.loads(response.read())


def _member_counts(proxy) -> dict[str, int]:
    """Failovers off each member: how often a request tried it and moved on."""
    _, text = _metrics(proxy)
    found = re.findall(
        r'bedrock_proxy_upstream_member_failovers_total\{member="([^"]+)"\} (\d+)', text
    )
    return {member: int(n) for member, n in found}


def _metrics(proxy) -> tuple[int, str]:
    import urllib.request

    request = urllib.request.Request(
        proxy.url + "/metrics", headers={"Authorization": f"Bearer {MASTER_KEY}"}
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return response.status, response.read().decode()


def test_an_sts_that_never_answers_neither_holds_startup_nor_requests(routed, fleet, bg):
    """STS accepts the connection and says nothing: the proxy starts listening at once,
    and requests for the role's account move to the next member at once meanwhile."""

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()  # until the client gives up; never a byte back

    async def start() -> asyncio.Server:
        return await asyncio.start_server(silent, "127.0.0.1", 0)

    server = bg.run(start())
    try:
        port = server.sockets[0].getsockname()[1]
        accounts = fleet.upstreams()["accounts"]
        accounts["c"] = {
            **accounts["c"],
            "endpoints": {**accounts["c"]["endpoints"], "sts": f"http://127.0.0.1:{port}"},
        }
        began = time.monotonic()
        proxy = routed(upstreams={"accounts": accounts})
        assert time.monotonic() - began < 5  # listening, not waiting for STS
        key = new_key(proxy, upstream="geo")  # c (the silent STS's role) first, then a
        client = boto_client("bedrock-runtime", proxy, key=key["key"])
        began = time.monotonic()
        for _ in range(3):
            assert served_by(converse(client)) == "a/us-east-1"
        assert time.monotonic() - began < 5  # moved past c at once, not after a timeout
    finally:
        server.close()
