"""``bedrock-proxy demo`` (``make demo``): the proxy on the built-in simulator with a little
traffic already sent, so the console opens with keys, spend and live figures."""

from __future__ import annotations

import asyncio
import logging
import random
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
