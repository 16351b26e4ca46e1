"""``bedrock-proxy demo`` (``make demo``): the proxy on the built-in simulator with a little
traffic already sent, so the console opens with keys, spend and live figures; and a key of
one's own ("try-it", new at every start) with the lines that point each client at it.

The demo serves HTTPS too, with a certificate it makes: boto3 and the AWS CLI send a
Bedrock API key (``AWS_BEARER_TOKEN_BEDROCK``) only over HTTPS."""

from __future__ import annotations

import asyncio
import json
import logging
import random
import shlex
from typing import Any

import aiohttp

log = logging.getLogger("bedrock_proxy.demo")

# (alias, team, user, budget in USD, requests per minute)
DEMO_KEYS = (
    ("web-frontend", "web", "ana", 25.0, 600),
    ("search-indexer", "search", "bo", 50.0, None),
    ("ci-evals", "platform", "cy", 10.0, 120),
)
DEMO_MODELS = (
    "us.anthropic.claude-sonnet-4-5-20250929-v1:0",
    "anthropic.claude-3-haiku-20240307-v1:0",
    "amazon.nova-lite-v1:0",
)
_MESSAGE = {"messages": [{"role": "user", "content": [{"text": "Hello from the demo"}]}]}


async def send_demo_traffic(base: str, master_key: str, requests: int = 60) -> list[dict[str, Any]]:
    """Create the demo keys (once) and send ``requests`` calls spread over them."""
    admin = {"Authorization": f"Bearer {master_key}"}
    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(timeout=timeout) as http:
        await _ready(http, base)
        keys = []
        for alias, team, user, budget, rpm in DEMO_KEYS:
            async with http.get(f"{base}/key/info", params={"key": alias}, headers=admin) as found:
                if found.status == 200:
                    continue  # made by an earlier demo run; its token is not shown again
            body = {"key_alias": alias, "team_id": team, "user_id": user, "max_budget": budget}
            if rpm:
                body["rpm_limit"] = rpm
            async with http.post(f"{base}/key/generate", json=body, headers=admin) as made:
                made.raise_for_status()
                keys.append(await made.json())
        tokens = [k["key"] for k in keys] or [master_key]
        rng = random.Random(7)
        for i in range(requests):
            token = tokens[i % len(tokens)]
            model = DEMO_MODELS[rng.randrange(len(DEMO_MODELS))]
            operation = "converse-stream" if i % 4 == 3 else "converse"
            url = f"{base}/bedrock/model/{model}/{operation}"
            async with http.post(
                url, json=_MESSAGE, headers={"Authorization": f"Bearer {token}"}
            ) as answer:
                await answer.read()
                answer.raise_for_status()
        async with http.post(
            f"{base}/bedrock/knowledgebases/DEMOKB0001/retrieve",
            json={"retrievalQuery": {"text": "what is the proxy?"}},
            headers={"Authorization": f"Bearer {tokens[0]}"},
        ) as answer:
            await answer.read()
            answer.raise_for_status()
        return keys


async def _ready(http: aiohttp.ClientSession, base: str) -> None:
    for _ in range(200):
        try:
            async with http.get(f"{base}/health/readiness") as response:
                if response.status == 200:
                    return
        except aiohttp.ClientError:
            pass
        await asyncio.sleep(0.1)
    raise RuntimeError("the demo proxy did not become ready")


# The key the demo prints whole at every start (a fresh token each time: tokens are shown
# once), with a budget the printed calls fit in many times over.
TRY_IT = "try-it"
TRY_IT_BUDGET = 5.0
TRY_IT_MODEL = "amazon.nova-lite-v1:0"
CLAUDE_CODE_MODEL = DEMO_MODELS[0]
CLAUDE_CODE_SMALL_MODEL = DEMO_MODELS[1]


async def try_it_key(base: str, master_key: str) -> dict[str, Any]:
    """The "try-it" key, made or given a new token (its old one stops working)."""
    admin = {"Authorization": f"Bearer {master_key}"}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as http:
        async with http.get(f"{base}/key/info", params={"key": TRY_IT}, headers=admin) as found:
            exists = found.status == 200
        body: dict[str, Any]
        if exists:
            url, body = f"{base}/key/regenerate", {"key": TRY_IT}
        else:
            url = f"{base}/key/generate"
            body = {"key_alias": TRY_IT, "team_id": "demo", "max_budget": TRY_IT_BUDGET}
        async with http.post(url, json=body, headers=admin) as made:
            made.raise_for_status()
            key: dict[str, Any] = await made.json()
            return key


def client_lines(
    key: dict[str, Any],
    http_base: str,
    https_base: str | None,
    ca: str | None,
    admin: tuple[str, str] | None = None,
) -> list[str]:
    """Shell lines, each runnable as printed: the key in every client's own variables, then
    one call per client (boto3, the AWS CLI, curl, Node, Claude Code). ``admin``: the
    master key and the store's path, for curl's admin calls and the CLI."""
    q = shlex.quote
    base = https_base or http_base
    message = [{"role": "user", "content": [{"text": "Hello"}]}]
    lines = [
        f"# The {TRY_IT} key (budget ${TRY_IT_BUDGET:g}): its token (a Bedrock API key), and",
        "# its key pair for SigV4 (the agent runtime's SDKs take no API key):",
        f"export AWS_BEARER_TOKEN_BEDROCK={q(key['key'])}",
        f"export AWS_ACCESS_KEY_ID={q(key['access_key_id'])}",
        f"export AWS_SECRET_ACCESS_KEY={q(key['secret_access_key'])}",
        f"export AWS_ENDPOINT_URL_BEDROCK_RUNTIME={q(base + '/bedrock')}",
        f"export AWS_ENDPOINT_URL_BEDROCK_AGENT_RUNTIME={q(base + '/bedrock')}",
        f"export AWS_ENDPOINT_URL_BEDROCK_AGENTCORE={q(base + '/bedrock-agentcore')}",
        "export AWS_REGION=us-east-1 AWS_DEFAULT_REGION=us-east-1",
    ]
    if ca is not None:
        lines += [f"export AWS_CA_BUNDLE={q(ca)}", f"export NODE_EXTRA_CA_CERTS={q(ca)}"]
    lines.append(f"export BEDROCK_PROXY_URL={q(base)}")
    if admin is not None:
        master, store = admin
        lines += [
            "# The admin side: the master key, and the store the CLI must use:",
            f"export BEDROCK_PROXY_MASTER_KEY={q(master)}",
            f"export BEDROCK_PROXY_SQLITE_PATH={q(store)}",
        ]
    lines += [
        "# The OpenAI and Anthropic SDKs, and Claude Code, read these:",
        f"export OPENAI_BASE_URL={q(http_base + '/bedrock/openai/v1')}",
        'export OPENAI_API_KEY="$AWS_BEARER_TOKEN_BEDROCK"',
        f"export ANTHROPIC_BASE_URL={q(http_base + '/bedrock/anthropic')}",
        'export ANTHROPIC_AUTH_TOKEN="$AWS_BEARER_TOKEN_BEDROCK"',
        f"export ANTHROPIC_MODEL={q(CLAUDE_CODE_MODEL)}",
        f"export ANTHROPIC_DEFAULT_HAIKU_MODEL={q(CLAUDE_CODE_SMALL_MODEL)}",
    ]
    # (Double quotes inside, so that each reads as written between single quotes.)
    boto3_call = (
        'import boto3; r = boto3.client("bedrock-runtime").converse('
        f'modelId="{TRY_IT_MODEL}", messages={json.dumps(message)}); '
        'print(r["output"]["message"]["content"][0]["text"])'
    )
    agent_call = (
        'import boto3; r = boto3.client("bedrock-agent-runtime").invoke_agent(agentId="AGENT12345",'
        ' agentAliasId="TSTALIASID", sessionId="s-1", inputText="Hello"); '
        'print(b"".join(e["chunk"]["bytes"] for e in r["completion"] if "chunk" in e).decode())'
    )
    node_call = (
        'const b = require("@aws-sdk/client-bedrock-runtime");'
        " new b.BedrockRuntimeClient({}).send(new b.ConverseCommand("
        f'{{modelId: "{TRY_IT_MODEL}", messages: {json.dumps(message)}}}))'
        ".then(r => console.log(r.output.message.content[0].text))"
    )
    lines += [
        "# boto3:",
        f"python3 -c {q(boto3_call)}",
        "# an agent (boto3):",
        f"python3 -c {q(agent_call)}",
        "# the AWS CLI:",
        f"aws bedrock-runtime converse --model-id {TRY_IT_MODEL} --messages "
        f"{q(json.dumps(message))} --query 'output.message.content[0].text' --output text",
        "# curl:",
        "curl -sS"
        + (' --cacert "$AWS_CA_BUNDLE"' if ca is not None else "")
        + ' -H "Authorization: Bearer $AWS_BEARER_TOKEN_BEDROCK"'
        + " -H 'Content-Type: application/json'"
        + f" -d {q(json.dumps({'messages': message}))}"
        + f" -w '\\n' {base}/bedrock/model/{TRY_IT_MODEL}/converse",
        "# Node (npm install @aws-sdk/client-bedrock-runtime):",
        f"node -e {q(node_call)}",
        "# Claude Code, in Anthropic's format:",
        "claude -p 'Say hello'",
    ]
    return lines
