"""Bedrock's OpenAI- and Anthropic-compatible APIs through the proxy: the OpenAI and
Anthropic Python SDKs, the OpenAI Node SDK, LangChain.js's ChatOpenAI and Claude Code, each
unmodified, with a virtual key, against fakes of bedrock-runtime and
bedrock-mantle that verify SigV4 and speak the real formats (JSON and server-sent events)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import openai
import pytest

from proxy.metering.pricing import PriceTable
from proxy.server.simulated_compat import WORDS
from tests.conftest import MASTER_KEY, start_server
from tests.fake_compat import FakeCompat
from tests.helpers.admin import admin, new_key

README = Path(__file__).resolve().parent.parent / "README.md"
OSS = "openai.gpt-oss-120b"
OSS_RUNTIME = "openai.gpt-oss-120b-1:0"
HAIKU = "anthropic.claude-haiku-4-5"


@pytest.fixture(scope="module")
def fakes(bg) -> Iterator[dict[str, tuple[FakeCompat, str]]]:
    runtime = FakeCompat(signing_name="bedrock")
    mantle = FakeCompat(signing_name="bedrock-mantle")
    started = {}
    for name, fake in (("runtime", runtime), ("mantle", mantle)):
        url, runner = bg.run(start_server(fake.app()))
        started[name] = (fake, url, runner)
    yield {name: (fake, url) for name, (fake, url, _) in started.items()}
    for _, _, runner in started.values():
        bg.run(runner.cleanup())


@pytest.fixture(scope="module")
def proxy_compat(start_proxy, fakes):
    return start_proxy(
        endpoints={
            "bedrock-runtime": fakes["runtime"][1],
            "bedrock-mantle": fakes["mantle"][1],
        },
        ledger_flush_interval=0.1,
    )


@pytest.fixture
def runtime(fakes) -> FakeCompat:
    fakes["runtime"][0].reset()
    return fakes["runtime"][0]


@pytest.fixture
def mantle(fakes) -> FakeCompat:
    fakes["mantle"][0].reset()
    return fakes["mantle"][0]


def oai(server: Any, key: str, mantle: bool = False) -> openai.OpenAI:
    base = f"{server.url}/bedrock-mantle/v1" if mantle else f"{server.url}/bedrock/openai/v1"
    return openai.OpenAI(base_url=base, api_key=key, max_retries=0, timeout=20)


def claude(server: Any, mantle: bool = True, **auth: str) -> anthropic.Anthropic:
    base = f"{server.url}/bedrock-mantle/anthropic" if mantle else f"{server.url}/bedrock/anthropic"
    return anthropic.Anthropic(base_url=base, max_retries=0, timeout=20, **auth)


def spend(server: Any, key: dict) -> list[dict]:
    server.settle()
    _, logs = admin(server, "GET", f"/spend/logs?api_key={key['key_id']}&size=100")
    return logs["logs"]


def raw_post(server: Any, path: str, key: dict, body: bytes) -> tuple[int, dict]:
    request = urllib.request.Request(
        server.url + path,
        data=body,
        headers={"Authorization": f"Bearer {key['key']}", "Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def price(model: str) -> Any:
    found = PriceTable.load().price_for(model)
    assert found is not None, model
    return found[0]


# ---------------------------------------------------------------- OpenAI


def test_openai_sdk_chat_and_responses_pass_through_byte_for_byte(proxy_compat, runtime):
    key = new_key(proxy_compat, models=["openai.*"], max_budget=5.0)
    client = oai(proxy_compat, key["key"])
    chat = client.chat.completions.create(
        model=OSS_RUNTIME, messages=[{"role": "user", "content": "Hi"}]
    )
    assert chat.choices[0].message.content == "".join(WORDS)
    sent = runtime.requests[-1]
    assert sent.raw_path == "/openai/v1/chat/completions"
    # Re-signed for bedrock-runtime: the virtual key went nowhere upstream.
    assert sent.headers["Authorization"].startswith("AWS4-HMAC-SHA256")
    assert key["key"] not in json.dumps(dict(sent.headers))
    assert sent.headers["x-stainless-lang"] == "python"  # the SDK's own headers
    assert json.loads(sent.body) == {
        "model": OSS_RUNTIME,
        "messages": [{"role": "user", "content": "Hi"}],
    }
    # One answer goes on HTTP/1.1, as a native call's does; a stream on shared HTTP/2.
    assert sent.http_version == 1

    stream = client.chat.completions.create(
        model=OSS_RUNTIME,
        messages=[{"role": "user", "content": "Hi"}],
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert runtime.requests[-1].http_version == 2
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "".join(WORDS)
    assert chunks[-1].usage is not None and chunks[-1].usage.prompt_tokens == 20

    answer = client.responses.create(model=OSS_RUNTIME, input="Hi")
    assert answer.output_text == "".join(WORDS)
    events = list(client.responses.create(model=OSS_RUNTIME, input="Hi", stream=True))
    assert events[0].type == "response.created" and events[-1].type == "response.completed"
    streamed_id = events[0].response.id
    # Stored responses are read back (and not billed again).
    assert client.responses.retrieve(answer.id).output_text == "".join(WORDS)
    assert client.responses.retrieve(streamed_id).id == streamed_id

    rows = spend(proxy_compat, key)
    by_op = [(r["operation"], r["cost"]) for r in rows]
    operations = [op for op, _ in by_op]
    assert operations.count("OpenAIChatCompletions") == 2
    assert operations.count("OpenAICreateResponse") == 2
    assert operations.count("OpenAIGetResponse") == 2
    p = price(OSS_RUNTIME)
    one_call = 20 * p.input / 1000 + 5 * p.output / 1000
    for op, cost in by_op:
        if op == "OpenAIGetResponse":
            assert not cost
        else:
            assert cost == pytest.approx(one_call, rel=1e-6), op


def test_mantle_models_are_listed_as_the_key_may_use_them(proxy_compat, mantle):
    key = new_key(proxy_compat, models=["openai.gpt-oss-*"])
    client = oai(proxy_compat, key["key"], mantle=True)
    assert [m.id for m in client.models.list()] == ["openai.gpt-oss-120b", "openai.gpt-oss-20b"]
    assert mantle.requests[-1].raw_path == "/v1/models"
    chat = client.chat.completions.create(model=OSS, messages=[{"role": "user", "content": "x"}])
    assert chat.choices[0].message.content == "".join(WORDS)
    # Signed for bedrock-mantle's own scope (the fake checks it), priced without a version.
    assert "/bedrock-mantle/aws4_request" in mantle.requests[-1].headers["Authorization"]
    (row,) = [r for r in spend(proxy_compat, key) if r["operation"] == "OpenAIChatCompletions"]
    p = price(OSS)
    assert row["cost"] == pytest.approx(20 * p.input / 1000 + 5 * p.output / 1000, rel=1e-6)
    # The Anthropic API's listing too.
    listed = claude(proxy_compat, api_key=key["key"]).models.list()
    assert [m.id for m in listed.data] == ["openai.gpt-oss-120b", "openai.gpt-oss-20b"]


def test_cached_tokens_are_priced_as_cache_reads(proxy_compat, runtime):
    key = new_key(proxy_compat)
    oai(proxy_compat, key["key"]).chat.completions.create(
        model=OSS_RUNTIME, messages=[{"role": "user", "content": "use the cache"}]
    )
    (row,) = spend(proxy_compat, key)
    p = price(OSS_RUNTIME)
    read = p.cache_read if p.cache_read is not None else p.input
    assert row["cache_read_tokens"] == 8 and row["input_tokens"] == 12
    assert row["cost"] == pytest.approx((12 * p.input + 8 * read + 5 * p.output) / 1000, rel=1e-6)


def test_a_chat_stream_without_usage_and_a_cut_stream_are_never_free(proxy_compat, runtime):
    key = new_key(proxy_compat, max_budget=5.0)
    client = oai(proxy_compat, key["key"])
    chunks = list(
        client.chat.completions.create(
            model=OSS_RUNTIME, messages=[{"role": "user", "content": "Hi"}], stream=True
        )
    )
    assert all(c.usage is None for c in chunks)
    with pytest.raises(openai.APIError):
        list(
            client.chat.completions.create(
                model="test.cut",
                messages=[{"role": "user", "content": "Hi"}],
                stream=True,
                stream_options={"include_usage": True},
            )
        )
    rows = spend(proxy_compat, key)
    unreported = next(r for r in rows if r["model"] == OSS_RUNTIME)
    # Estimated: the request's bytes / 4 in, a token per streamed chunk out.
    assert unreported["estimated"] and unreported["cost"] > 0
    assert unreported["output_tokens"] == len(WORDS) + 2
    cut = next(r for r in rows if r["model"] == "test.cut")
    assert cut["incomplete"] and cut["output_tokens"] > 0


# ---------------------------------------------------------------- Anthropic


@pytest.mark.parametrize("auth", ["api_key", "auth_token"])
def test_anthropic_sdk_with_both_auth_forms(proxy_compat, mantle, auth):
    key = new_key(proxy_compat, models=["anthropic.*"])
    client = claude(proxy_compat, **{auth: key["key"]})
    message = client.messages.create(
        model=HAIKU,
        max_tokens=64,
        messages=[{"role": "user", "content": "Hi"}],
        extra_headers={
            "anthropic-beta": "context-1m-2025-08-07",
            "anthropic-version": "2023-06-01",
        },
    )
    assert message.content[0].text == "".join(WORDS)
    sent = mantle.requests[-1]
    assert sent.raw_path == "/anthropic/v1/messages"
    assert sent.headers["anthropic-version"] == "2023-06-01"
    assert sent.headers["anthropic-beta"] == "context-1m-2025-08-07"
    assert "x-api-key" not in sent.headers and key["key"] not in json.dumps(dict(sent.headers))

    with client.messages.stream(
        model=HAIKU, max_tokens=64, messages=[{"role": "user", "content": "Hi"}]
    ) as stream:
        assert "".join(stream.text_stream) == "".join(WORDS)
    counted = client.messages.count_tokens(
        model=HAIKU, messages=[{"role": "user", "content": "Hi"}]
    )
    assert counted.input_tokens == 20
    rows = spend(proxy_compat, key)
    p = price(HAIKU)
    calls = [r for r in rows if r["operation"] == "AnthropicMessages"]
    assert len(calls) == 2
    for row in calls:
        assert row["cost"] == pytest.approx((20 * p.input + 5 * p.output) / 1000, rel=1e-6)
    (count,) = [r for r in rows if r["operation"] == "AnthropicCountTokens"]
    assert count["cost"] == 0


def test_cache_writes_for_an_hour_cost_twice_the_input_price(proxy_compat, mantle):
    key = new_key(proxy_compat)
    client = claude(proxy_compat, api_key=key["key"])
    system = [{"type": "text", "text": "long", "cache_control": {"type": "ephemeral", "ttl": "1h"}}]
    request = {
        "model": HAIKU,
        "max_tokens": 64,
        "system": system,
        "messages": [{"role": "user", "content": "Hi"}],
    }
    client.messages.create(**request)
    with client.messages.stream(**request) as stream:
        stream.until_done()
    rows = spend(proxy_compat, key)
    p = price(HAIKU)
    expected = (20 * p.input + 5 * p.output + 50 * p.cache_write + 100 * 2 * p.input) / 1000
    assert [r["cost"] for r in rows] == [pytest.approx(expected, rel=1e-6)] * 2
    assert all(r["cache_write_tokens"] == 150 for r in rows)


# ---------------------------------------------------------------- governance


def test_refusals_raise_each_sdks_own_exceptions(proxy_compat, runtime, mantle):
    key = new_key(proxy_compat, models=["openai.gpt-oss-20b*"], rpm_limit=2)
    client = oai(proxy_compat, key["key"])
    with pytest.raises(openai.PermissionDeniedError) as denied:
        client.chat.completions.create(
            model=OSS_RUNTIME, messages=[{"role": "user", "content": "x"}]
        )
    assert denied.value.body["type"] == "permission_error"
    assert OSS_RUNTIME in denied.value.message
    with pytest.raises(openai.AuthenticationError):
        oai(proxy_compat, "sk-not-a-key").models.list()
    with pytest.raises(anthropic.PermissionDeniedError) as refused:
        claude(proxy_compat, api_key=key["key"]).messages.create(
            model=HAIKU, max_tokens=8, messages=[{"role": "user", "content": "x"}]
        )
    assert refused.value.body["type"] == "error"
    assert refused.value.body["error"]["type"] == "permission_error"
    with pytest.raises(anthropic.AuthenticationError):
        claude(proxy_compat, api_key="nope").messages.create(
            model=HAIKU, max_tokens=8, messages=[{"role": "user", "content": "x"}]
        )
    # A body Bedrock could read another way than the proxy is refused, not forwarded.
    twice = b'{"model": "openai.gpt-oss-20b-1:0", "model": "openai.gpt-oss-120b-1:0"}'
    status, error = raw_post(proxy_compat, "/bedrock/openai/v1/chat/completions", key, twice)
    assert status == 400 and error["error"]["type"] == "invalid_request_error"
    # The rate limit, with the header the SDK waits on.
    with pytest.raises(openai.RateLimitError) as limited:
        for _ in range(3):
            client.chat.completions.create(
                model="openai.gpt-oss-20b-1:0", messages=[{"role": "user", "content": "x"}]
            )
    assert limited.value.response.headers["retry-after"]
    assert limited.value.body["type"] == "rate_limit_error"


@pytest.mark.parametrize(
    "body",
    [
        b'{"model": "openai.gpt-oss-120b", "model": "openai.gpt-oss-20b", "input": "x"}',
        b'{"model": "openai.gpt-oss-120b", "input": "x",'
        b' "tools": [{"type": "web_search", "type": "function", "name": "f"}]}',
        b'{"model": "openai.gpt-oss-120b",'
        b' "input": [{"role": "user", "content": [{"file_id": "f", "file_id": null}]}]}',
        b'{"model": "openai.gpt-oss-120b", "input": "x", "conversation": {"id": "a", "id": "b"}}',
        b'{"mod\\u0065l": "openai.gpt-oss-120b", "model": "openai.gpt-oss-20b", "input": "x"}',
        b'\xef\xbb\xbf{"model": "openai.gpt-oss-120b", "input": "x"}',
        b'{"model": "openai.gpt-oss-120b", "input": "x", "temperature": NaN}',
        b'{"model": "openai.gpt-oss-120b", "input": "x", "tools": [{"type": 5}]}',
        b'{"model": "openai.gpt-oss-120b", "input": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
    ],
    ids=range(9),
)
def test_bodies_two_parsers_could_read_differently_are_refused(proxy_compat, mantle, body):
    key = new_key(proxy_compat)
    status, error = raw_post(proxy_compat, "/bedrock-mantle/v1/responses", key, body)
    assert status == 400, error
    assert error["error"]["type"] == "invalid_request_error"
    assert not mantle.requests


def test_server_side_tools_and_stored_resources_need_a_grant(proxy_compat, mantle):
    plain = new_key(proxy_compat)
    granted = new_key(proxy_compat, operation_groups=["inference", "server-tools"])
    refused_bodies: list[dict[str, Any]] = [
        {"model": OSS, "input": "x", "tools": [{"type": "web_search"}]},
        {"model": OSS, "input": "x", "tools": [{"type": "mcp", "server_url": "https://x"}]},
        {"model": OSS, "input": "x", "tools": [{"type": "file_search", "vector_store_ids": ["v"]}]},
        {
            "model": OSS,
            "input": [{"role": "user", "content": [{"type": "input_file", "file_id": "f"}]}],
        },
        {"model": OSS, "input": "x", "prompt": {"id": "pmpt_1"}},
    ]
    for body in refused_bodies:
        with pytest.raises(openai.PermissionDeniedError, match="server-tools"):
            oai(proxy_compat, plain["key"], mantle=True).responses.create(**body)
        assert oai(proxy_compat, granted["key"], mantle=True).responses.create(**body).id
    # A tool the client runs itself needs nothing.
    function = {"type": "function", "name": "f", "parameters": {"type": "object"}}
    oai(proxy_compat, plain["key"], mantle=True).responses.create(
        model=OSS, input="x", tools=[function]
    )
    anthropic_client = claude(proxy_compat, api_key=plain["key"])
    with pytest.raises(anthropic.PermissionDeniedError, match="web_search"):
        anthropic_client.messages.create(
            model=HAIKU,
            max_tokens=8,
            messages=[{"role": "user", "content": "x"}],
            tools=[{"type": "web_search_20250305", "name": "web_search"}],
        )
    anthropic_client.messages.create(
        model=HAIKU,
        max_tokens=8,
        messages=[{"role": "user", "content": "x"}],
        tools=[
            {"type": "bash_20250124", "name": "bash"},
            {"name": "f", "input_schema": {"type": "object"}},
        ],
    )
    with pytest.raises(openai.PermissionDeniedError, match="openai-project"):
        oai(proxy_compat, plain["key"], mantle=True).with_options(
            default_headers={"OpenAI-Project": "proj_other"}
        ).responses.create(model=OSS, input="x")


def test_stored_responses_belong_to_the_key_that_made_them(proxy_compat, mantle):
    owner, other = new_key(proxy_compat), new_key(proxy_compat)
    mine = oai(proxy_compat, owner["key"], mantle=True)
    theirs = oai(proxy_compat, other["key"], mantle=True)
    made = mine.responses.create(model=OSS, input="Hi", background=True)
    streamed = next(iter(mine.responses.create(model=OSS, input="Hi", stream=True)))
    for response_id in (made.id, streamed.response.id):
        with pytest.raises(openai.NotFoundError):
            theirs.responses.retrieve(response_id)
        with pytest.raises(openai.NotFoundError):
            theirs.responses.input_items.list(response_id)
        with pytest.raises(openai.NotFoundError):
            theirs.responses.cancel(response_id)
        with pytest.raises(openai.NotFoundError):
            theirs.responses.delete(response_id)
        with pytest.raises(openai.NotFoundError):
            theirs.responses.create(model=OSS, input="more", previous_response_id=response_id)
    requests_before = len(mantle.requests)
    assert mine.responses.retrieve(made.id).id == made.id
    assert list(mine.responses.input_items.list(made.id)) == []
    assert mine.responses.create(model=OSS, input="more", previous_response_id=made.id).id
    assert mine.responses.cancel(made.id).status == "cancelled"
    mine.responses.delete(made.id)
    assert len(mantle.requests) == requests_before + 5  # the refusals never went upstream
    # The master key is not held to it.
    assert oai(proxy_compat, MASTER_KEY, mantle=True).responses.retrieve(streamed.response.id)


def test_a_streams_first_event_arrives_before_the_upstream_sends_its_last(proxy_compat, runtime):
    key = new_key(proxy_compat)
    stream = oai(proxy_compat, key["key"]).chat.completions.create(
        model="test.gate", messages=[{"role": "user", "content": "x"}], stream=True
    )
    first = next(iter(stream))
    assert first.choices[0].delta.role == "assistant"
    runtime.gate.set()  # only now does the fake send its last event
    rest = list(stream)
    assert rest and not runtime.gate_timed_out


def test_unknown_paths_and_methods_are_refused_in_the_apis_shape(proxy_compat, runtime):
    key = new_key(proxy_compat)
    with pytest.raises(openai.NotFoundError) as missing:
        oai(proxy_compat, key["key"]).files.list()
    assert missing.value.body["type"] == "not_found_error"
    assert not runtime.requests


# ---------------------------------------------------------------- Node clients

JS = os.path.join(os.path.dirname(__file__), "js")
CLAUDE = os.path.join(JS, "node_modules", ".bin", "claude")


def node_env(**extra: str) -> dict[str, str]:
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "OPENAI_", "ANTHROPIC_"))
    }
    env.update(extra)
    return env


def run(args: list[str], env: dict[str, str], timeout: float = 90) -> subprocess.CompletedProcess:
    out = subprocess.run(args, capture_output=True, text=True, timeout=timeout, env=env, cwd=JS)
    assert out.returncode == 0, (
        f"exit {out.returncode}\nstdout:\n{out.stdout}\nstderr:\n{out.stderr}"
    )
    return out


def openai_node(server: Any, key: str, spec: dict[str, Any]) -> dict[str, dict]:
    out = run(["node", "compat.mjs", json.dumps(spec)], node_env(OPENAI_API_KEY=key))
    return {r["call"]: r for r in map(json.loads, out.stdout.splitlines())}


def test_the_openai_node_sdk_and_langchain(proxy_compat, runtime):
    key = new_key(proxy_compat, models=["openai.gpt-oss-120b*"])
    results = openai_node(
        proxy_compat,
        key["key"],
        {
            "baseURL": f"{proxy_compat.url}/bedrock/openai/v1",
            "model": OSS_RUNTIME,
            "refusedModel": "openai.gpt-oss-20b-1:0",
            "calls": ["chat", "chat-stream", "responses", "refused", "langchain"],
        },
    )
    text = "".join(WORDS)
    assert results["chat"]["text"] == text and results["chat"]["usage"]["prompt_tokens"] == 20
    assert results["chat-stream"]["text"] == text
    assert results["chat-stream"]["usage"]["completion_tokens"] == 5
    assert results["responses"]["text"] == text
    assert results["refused"]["error"] == "PermissionDeniedError", results["refused"]
    assert results["refused"]["status"] == 403
    assert results["langchain"] == {"call": "langchain", "text": text, "streamed": text}
    assert any(r.headers.get("x-stainless-lang") == "js" for r in runtime.requests)
    rows = spend(proxy_compat, key)
    assert {r["operation"] for r in rows} == {"OpenAIChatCompletions", "OpenAICreateResponse"}
    assert all(r["cost"] > 0 for r in rows if r["status"] == 200)


@pytest.mark.skipif(
    not os.path.exists(CLAUDE), reason="Claude Code is installed by make js-install"
)
def test_claude_code_in_print_mode(proxy_compat, mantle, tmp_path):
    key = new_key(proxy_compat, models=["anthropic.*"], max_budget=1.0)
    env = node_env(
        HOME=str(tmp_path),
        ANTHROPIC_BASE_URL=f"{proxy_compat.url}/bedrock-mantle/anthropic",
        ANTHROPIC_AUTH_TOKEN=key["key"],
        ANTHROPIC_MODEL=HAIKU,
        ANTHROPIC_DEFAULT_HAIKU_MODEL=HAIKU,
        DISABLE_AUTOUPDATER="1",
        DISABLE_TELEMETRY="1",
        CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC="1",
    )
    out = run(
        [CLAUDE, "-p", "Say hello", "--output-format", "json", "--max-turns", "1"],
        env,
        timeout=120,
    )
    result = json.loads(out.stdout)
    assert result["result"] == "".join(WORDS), out.stdout
    calls = [r for r in mantle.requests if r.raw_path.startswith("/anthropic/v1/messages")]
    assert calls, [r.raw_path for r in mantle.requests]
    assert all("anthropic-version" in r.headers for r in calls)
    assert all(key["key"] not in json.dumps(dict(r.headers)) for r in mantle.requests)
    rows = spend(proxy_compat, key)
    assert rows and all(r["operation"].startswith("Anthropic") for r in rows)
    assert sum(r["cost"] for r in rows) > 0


# ---------------------------------------------------------------- the simulator


def test_the_simulator_answers_the_compatible_apis(start_proxy):
    simulated = start_proxy(simulate=True, endpoints={})
    key = new_key(simulated, max_budget=1.0)
    client = oai(simulated, key["key"])
    chat = client.chat.completions.create(
        model=OSS_RUNTIME, messages=[{"role": "user", "content": "x"}]
    )
    assert chat.choices[0].message.content == "".join(WORDS)
    stream = client.chat.completions.create(
        model=OSS_RUNTIME,
        messages=[{"role": "user", "content": "x"}],
        stream=True,
        stream_options={"include_usage": True},
    )
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == "".join(WORDS)
    assert (
        oai(simulated, key["key"], mantle=True).responses.create(model=OSS, input="x").output_text
    )
    with claude(simulated, api_key=key["key"]).messages.stream(
        model=HAIKU, max_tokens=8, messages=[{"role": "user", "content": "x"}]
    ) as answer:
        assert "".join(answer.text_stream) == "".join(WORDS)
    assert {m.id for m in client.models.list()} >= {OSS}
    rows = spend(simulated, key)
    assert len(rows) == 5 and all(
        r["cost"] > 0 for r in rows if r["operation"] != "OpenAIListModels"
    )


# ---------------------------------------------------------------- the README's snippets


@pytest.mark.parametrize("client_name", ["OpenAI SDK (Python)", "Anthropic SDK (Python)"])
def test_the_readme_snippets_run_as_written(
    proxy_compat, runtime, mantle, monkeypatch, capsys, client_name
):
    key = new_key(proxy_compat)
    section = README.read_text().split(f"**{client_name}**", 1)[1]
    snippet = section.split("```python\n", 1)[1].split("```", 1)[0]
    # The SDKs' own variables, as make demo prints them (bedrock-mantle's Anthropic API).
    monkeypatch.setenv("OPENAI_BASE_URL", proxy_compat.url + "/bedrock/openai/v1")
    monkeypatch.setenv("OPENAI_API_KEY", key["key"])
    monkeypatch.setenv("ANTHROPIC_BASE_URL", proxy_compat.url + "/bedrock-mantle/anthropic")
    monkeypatch.setenv("ANTHROPIC_AUTH_TOKEN", key["key"])
    monkeypatch.delenv("ANTHROPIC_API_KEY", raising=False)
    exec(compile(snippet, "README.md", "exec"), {})
    assert capsys.readouterr().out.strip() == "".join(WORDS)


# ---------------------------------------------------------------- accounts


def test_stored_responses_are_read_in_the_account_that_holds_them(start_proxy, bg):
    """Two accounts' bedrock-mantle: a response made in one is read, continued and deleted
    there, wherever the key's pool sends its new calls."""
    fakes = {name: FakeCompat(signing_name="bedrock-mantle") for name in "ab"}
    started = {name: bg.run(start_server(fake.app())) for name, fake in fakes.items()}
    try:
        accounts = {
            name: {
                "regions": [region],
                "profile": "upstream",
                "endpoints": {"bedrock-mantle": started[name][0]},
            }
            for name, region in (("a", "us-east-1"), ("b", "us-west-2"))
        }
        proxy = start_proxy(
            upstreams={
                "accounts": accounts,
                "pools": {"only-a": [{"account": "a"}], "only-b": [{"account": "b"}]},
                "default_pool": "only-a",
            }
        )
        key = new_key(proxy, upstream="only-a")
        client = oai(proxy, key["key"], mantle=True)
        made = client.responses.create(model=OSS, input="Hi")
        streamed = next(iter(client.responses.create(model=OSS, input="Hi", stream=True)))
        assert set(fakes["a"].responses) == {made.id, streamed.response.id}
        status, _ = admin(
            proxy, "POST", "/key/update", {"key": key["key_id"], "upstream": "only-b"}
        )
        assert status == 200
        assert client.responses.create(model=OSS, input="new").id in fakes["b"].responses
        for response_id in (made.id, streamed.response.id):
            assert client.responses.retrieve(response_id).id == response_id
            more = client.responses.create(
                model=OSS, input="more", previous_response_id=response_id
            )
            assert more.id in fakes["a"].responses
        client.responses.delete(made.id)
        assert made.id not in fakes["a"].responses
        assert all(r.raw_path == "/v1/responses" for r in fakes["b"].requests)
    finally:
        for _, runner in started.values():
            bg.run(runner.cleanup())


def test_a_revoked_key_loses_its_open_stream_with_the_apis_error_event(proxy_compat, runtime):
    key = new_key(proxy_compat)
    stream = oai(proxy_compat, key["key"]).chat.completions.create(
        model="test.hold", messages=[{"role": "user", "content": "x"}], stream=True
    )
    chunks = iter(stream)
    assert next(chunks).choices[0].delta.role == "assistant"
    status, _ = admin(proxy_compat, "POST", "/key/delete", {"keys": [key["key_id"]]})
    assert status == 200
    proxy_compat.clock.advance(2)  # past the stream's next look at its key
    runtime.gate.set()  # the upstream goes on: the proxy ends it at its next event
    with pytest.raises(openai.APIError, match="deleted while the request was running"):
        list(chunks)
    assert not runtime.gate_timed_out
    line = proxy_compat.wait_log_line(lambda r: r.get("model") == "test.hold")
    assert line["error"] == "AccessDeniedException" and line["incomplete"]


# ---------------------------------------------------------------- observed like any call


def test_the_console_metrics_and_traces_show_compatible_calls(start_proxy, fakes, runtime):
    """A chat completion is a span, a metric, a ledger row and a line in the console's
    spend by model, named by its operation and its model, as a native call is."""
    from tests.helpers.console import console_get as _get
    from tests.helpers.console import sign_in as _sign_in
    from tests.helpers.tracing import span_exporter

    exporter = span_exporter()
    server = start_proxy(
        endpoints={"bedrock-runtime": fakes["runtime"][1]}, tracing=True, ledger_flush_interval=0.1
    )
    key = new_key(server, models=["openai.*"], max_budget=5.0)
    oai(server, key["key"]).chat.completions.create(
        model=OSS_RUNTIME, messages=[{"role": "user", "content": "Hi"}]
    )
    server.settle()
    deadline = time.monotonic() + 10
    while not (
        spans := [s for s in exporter.get_finished_spans() if "OpenAIChatCompletions" in s.name]
    ):
        assert time.monotonic() < deadline, [s.name for s in exporter.get_finished_spans()]
        time.sleep(0.02)
    assert spans[0].attributes["gen_ai.request.model"] == OSS_RUNTIME
    assert spans[0].attributes["gen_ai.usage.input_tokens"] == 20
    request = urllib.request.Request(
        server.url + "/metrics", headers={"Authorization": f"Bearer {MASTER_KEY}"}
    )
    with urllib.request.urlopen(request, timeout=10) as answer:
        metrics = answer.read().decode()
    assert re.search(r'operation="OpenAIChatCompletions"[^\n]*status="200"', metrics), metrics[
        :3000
    ]
    status, cookie = _sign_in(server, MASTER_KEY)
    assert status == 303 and cookie
    status, page = _get(server, "/ui/spend?by=model", {"bp_console": cookie})
    assert status == 200 and f'data-group="{OSS_RUNTIME}"' in page
