"""The operator's console in a real browser: Debian's Chromium, driven headless by
Selenium through Debian's chromedriver (nothing is downloaded at run time). Every page's
screenshot is kept under test-artifacts/console/, and no page may log a console error
(a Content-Security-Policy violation is one)."""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

import pytest

from tests.conftest import MASTER_KEY, boto_client
from tests.helpers.admin import admin, new_key
from tests.helpers.browser import Page
from tests.helpers.console import _call
from tests.helpers.console import console_get as _get
from tests.helpers.console import console_post as _post
from tests.helpers.console import sign_in as _sign_in

HAIKU = "anthropic.claude-3-haiku-20240307-v1:0"


@pytest.fixture(scope="module")
def console(start_proxy, tmp_path_factory):
    return start_proxy(
        sqlite_path=str(tmp_path_factory.mktemp("console") / "console.db"),
        ledger_flush_interval=0.1,
    )


def test_sign_in_create_use_see_spend_block_and_sign_out(browser, console, fake):
    page = Page(browser, console)
    page.open("/ui/keys")
    assert page.path == "/ui/signin"  # no session: the sign-in page
    page.shot("signin")
    page.sign_in(MASTER_KEY)
    assert page.path == "/ui/keys"
    page.shot("keys")
    assert all(c["httpOnly"] and c["sameSite"] == "Strict" for c in browser.get_cookies())
    assert MASTER_KEY not in json.dumps(browser.get_cookies())

    # Create a key with limits: its secrets are shown once, with snippets.
    page.click("#new-key")
    page.fill(
        {
            "key_alias": "console-made",
            "team_id": "web",
            "models": "anthropic.*",
            "max_budget": "5",
            "rpm_limit": "100",
        }
    )
    page.shot("key-new")
    page.click("#save")
    token = page.find("#token").text
    access_key_id = page.find("#access-key-id").text
    assert token.startswith("sk-bp-") and access_key_id.startswith("BPK")
    assert page.find("#secret-access-key").text
    snippets = " ".join(p.text for p in page.all(".snippet pre"))
    assert token in snippets and access_key_id in snippets
    for client in ("boto3", "OpenAI", "Anthropic", "bedrock-proxy login", "BedrockRuntimeClient",
                   '"bedrock-agentcore"'):  # fmt: skip
        assert client in snippets, client  # a snippet for every client the proxy serves
    assert len(page.all("button.copy")) >= 11
    page.shot("key-created")
    page.click("#key-page")
    assert token not in browser.page_source  # shown once only
    key_id = page.path.rsplit("/", 1)[-1]
    # Every field the API has is on the form: metadata too.
    page.fill({"metadata": '{"cost_center": "cc-42"}'})
    page.click("#save")
    _, info = admin(console, "GET", f"/key/info?key={key_id}")
    assert info["info"]["metadata"] == {"cost_center": "cc-42"}
    assert info["info"]["rpm_limit"] == 100 and info["info"]["team_id"] == "web"
    # The form shows the metadata whole (quotes and all) and saves it unchanged.
    page.open(f"/ui/keys/{key_id}")
    shown = page.find('input[name="metadata"]').get_attribute("value")
    assert json.loads(shown) == {"cost_center": "cc-42"}
    page.click("#save")
    _, info = admin(console, "GET", f"/key/info?key={key_id}")
    assert info["info"]["metadata"] == {"cost_center": "cc-42"}

    # Use it with boto3; its spend appears in the chart and the table.
    client = boto_client("bedrock-runtime", console, key=token)
    console.clock.fresh_minute()  # the three calls and the limits page share a minute
    for _ in range(3):
        client.converse(modelId=HAIKU, messages=[{"role": "user", "content": [{"text": "hi"}]}])
    console.settle()
    page.open("/ui/spend?by=key")
    points = page.all("#chart rect.point")
    assert points, "the chart has no data points"
    rows = {
        r.get_attribute("data-group"): float(r.get_attribute("data-cost"))
        for r in page.all("#spend-table tbody tr")
    }
    _, report = admin(console, "GET", "/spend/report?group_by=key")
    expected = {r["group"]: r["cost"] for r in report["rows"]}
    assert set(rows) == set(expected)
    for group, cost in rows.items():
        assert round(cost, 2) == round(expected[group], 2)  # to the cent
    mine = next(
        r for r in page.all("#spend-table tbody tr") if r.get_attribute("data-group") == key_id
    )
    assert "console-made" in mine.text  # the alias beside the key's id
    assert sum(float(p.get_attribute("data-value")) for p in points) == pytest.approx(
        sum(expected.values())
    )
    page.shot("spend-by-key")
    # Each bar has its legend's colour.
    legend = {
        li.text: li.find_element("css selector", "rect").get_attribute("fill")
        for li in page.all("ul.legend li")
    }
    for point in points:
        assert point.get_attribute("fill") == legend[point.get_attribute("data-series")]
    page.open("/ui/spend?by=model")
    assert {p.get_attribute("data-series") for p in page.all("#chart rect.point")} >= {HAIKU}
    page.shot("spend-by-model")
    # Drill down: team, then its keys, then the key's requests (no bodies).
    page.open("/ui/spend?by=team")
    page.click('#spend-table tr[data-group="web"] a')
    assert [r.get_attribute("data-group") for r in page.all("#spend-table tbody tr")] == [key_id]
    page.click(f'#spend-table tr[data-group="{key_id}"] a')
    requests = page.all("#requests tbody tr")
    assert len(requests) == 3 and all("Converse" in r.text for r in requests)
    page.shot("spend-requests")
    # Every table exports as CSV: the requests, the keys.
    cookie = {c["name"]: c["value"] for c in browser.get_cookies()}
    status, text = _get(console, f"/ui/spend.csv?table=requests&key_id={key_id}", cookie)
    lines = text.splitlines()
    assert status == 200 and lines[0].startswith("time,request_id,operation") and len(lines) == 4
    status, text = _get(console, "/ui/keys.csv?q=console-made", cookie)
    assert status == 200 and len(text.splitlines()) == 2 and key_id in text

    # CSV export of the table, with the same figures.
    cookie = {c["name"]: c["value"] for c in browser.get_cookies()}
    status, text = _get(console, "/ui/spend.csv?by=key", cookie)
    assert status == 200 and text.splitlines()[0] == "key,requests,total_tokens,cost_usd"

    # Limits and live pages.
    status, _ = admin(
        console,
        "POST",
        "/limit/new",
        {"limit_id": "web-team", "max_budget": 4, "team_ids": ["web"]},
    )
    assert status == 200
    page.open("/ui/limits")
    assert browser.title == "Limits · bedrock-proxy console"
    assert "console-made" in page.find("#budgets").text
    assert "limit web-team" in page.find("#budgets").text  # a named limit's budget too
    assert "team_ids=['web']" in page.find("#named").text  # and its members
    window = page.find(f'#rates tr[data-key-id="{key_id}"]').text
    assert "3 / 100" in window  # this minute's requests against the key's RPM
    assert "No alert webhook" in page.find("#alerts").text
    page.shot("limits")
    page.open("/ui/live")
    _wait(lambda: page.find("#live").get_attribute("data-updated"))
    assert "Converse" in page.find("#recent").text
    page.shot("live")

    # Block it: boto3 is refused.
    page.open("/ui/keys?q=console-made")
    page.click("#keys tbody a")
    page.click("#block")
    assert page.find(".tag.blocked")
    page.shot("key-blocked")
    with pytest.raises(client.exceptions.AccessDeniedException):
        client.converse(modelId=HAIKU, messages=[{"role": "user", "content": [{"text": "hi"}]}])

    # Delete asks for the key id first.
    page.find("#confirm-delete").send_keys("not-the-id")
    page.click("#delete")
    assert "type its id" in page.find("#error").text
    page.open(f"/ui/keys/{key_id}")
    page.find("#confirm-delete").send_keys(key_id)
    page.click("#delete")
    assert page.path == "/ui/keys" and key_id not in browser.page_source

    # Sign out: the session is gone, and Back does not show the signed-in page again.
    page.click("#signout")
    assert page.path == "/ui/signin"
    browser.back()
    _wait(lambda: page.path == "/ui/signin")
    assert page.find("#signin")
    page.open("/ui/keys")
    assert page.path == "/ui/signin"


def test_a_virtual_key_sees_only_its_own(browser, console, fake):
    page = Page(browser, console)
    mine = new_key(console, key_alias="mine-only", max_budget=2)
    other = new_key(console, key_alias="someone-else")
    boto_client("bedrock-runtime", console, key=mine["key"]).converse(
        modelId=HAIKU, messages=[{"role": "user", "content": [{"text": "hi"}]}]
    )
    console.settle()
    page.sign_in(mine["key"])
    assert page.path == "/ui/me"
    source = browser.page_source
    assert "mine-only" in source and mine["key_id"] in source
    assert other["key_id"] not in source and "someone-else" not in source
    assert mine["key"] not in source  # the token is never shown again
    assert page.all("rect.point")
    page.shot("me")
    for path in ("/ui/keys", "/ui/spend", f"/ui/keys/{other['key_id']}", "/ui/live.json"):
        page.open(path)
        assert "master key" in browser.page_source, path
        assert other["key_id"] not in browser.page_source or path.endswith(other["key_id"])


def test_forms_need_their_csrf_token_and_a_session(browser, console):
    page = Page(browser, console)
    page.sign_in(MASTER_KEY)
    cookie = {c["name"]: c["value"] for c in browser.get_cookies()}
    status, _ = _post(console, "/ui/keys/new", {"key_alias": "forged"}, cookie)
    assert status == 403
    status, _ = _post(console, "/ui/keys/new", {"key_alias": "forged", "csrf": "x" * 32}, cookie)
    assert status == 403
    status, _ = _post(console, "/ui/keys/new", {"key_alias": "forged", "csrf": "x"}, {})
    assert status == 401
    # Another site's page posting here is refused, even the sign-in form.
    request = urllib.request.Request(
        console.url + "/ui/signin",
        data=urllib.parse.urlencode({"key": MASTER_KEY}).encode(),
        headers={"Origin": "https://evil.example"},
    )
    assert _call(request, {})[0] == 403
    _, listing = admin(console, "GET", "/key/list?return_full_object=true")
    assert "forged" not in json.dumps(listing)
    status, _ = _get(console, "/ui/keys", cookie)
    assert status == 200


def test_the_console_answers_over_http2(console):
    import subprocess

    done = subprocess.run(
        ["curl", "-s", "-i", "--http2-prior-knowledge", console.url + "/ui/signin"],
        capture_output=True,
        text=True,
        timeout=20,
    )
    assert done.stdout.startswith("HTTP/2 200")
    assert "content-security-policy: default-src 'none'" in done.stdout.lower()


def test_every_page_sends_a_strict_policy(console):
    request = urllib.request.Request(console.url + "/ui/signin")
    with urllib.request.urlopen(request, timeout=10) as response:
        policy = response.headers["Content-Security-Policy"]
        assert "default-src 'none'" in policy and "script-src 'self'" in policy
        assert "frame-ancestors 'none'" in policy
        assert response.headers["X-Frame-Options"] == "DENY"


def test_a_wrong_key_is_refused_then_rate_limited(browser, start_proxy):
    server = start_proxy()
    page = Page(browser, server)
    for _ in range(5):
        page.sign_in("sk-bp-not-a-key")
        assert page.find("#error").text == "That key is not valid."
    page.shot("signin-refused")
    page.sign_in(MASTER_KEY)  # even the right key waits out the window
    assert "Too many failed sign-ins" in page.find("#error").text
    page.shot("signin-throttled")


def _wait(predicate, timeout: float = 10.0) -> None:
    import time

    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


# ---------------------------------------------------------------- the simulator and make demo


def _start(args: list[str], port: int, env: dict[str, str] | None = None):
    import subprocess
    import sys
    import time

    bin_ = os.path.join(os.path.dirname(sys.executable), "bedrock-proxy")
    proc = subprocess.Popen(
        [bin_, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**{k: v for k, v in os.environ.items() if not k.startswith("AWS_")}, **(env or {})},
    )
    # Bounded, with room for a machine running another suite beside this one.
    deadline = time.monotonic() + 90
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health/readiness", timeout=1):
                return proc
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise AssertionError(proc.stderr.read()) from None
            time.sleep(0.1)


def _stop(proc) -> tuple[str, str]:
    import signal

    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=20)
    return out, err


def test_serve_simulate_answers_every_client_and_says_so(tmp_path):
    import anthropic
    import boto3

    from tests.conftest import client_config
    from tests.helpers.processes import free_port

    port = free_port()
    proc = _start(
        ["serve", "--simulate", "--host", "127.0.0.1", "--port", str(port)],
        port,
        {
            "BEDROCK_PROXY_MASTER_KEY": MASTER_KEY,
            "BEDROCK_PROXY_SQLITE_PATH": str(tmp_path / "sim.db"),
            "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
            "AWS_CONFIG_FILE": os.devnull,
            "AWS_EC2_METADATA_DISABLED": "true",
        },
    )
    try:

        def client(service: str):
            c = boto3.client(
                service,
                endpoint_url=f"http://127.0.0.1:{port}/bedrock",
                region_name="us-east-1",
                aws_access_key_id="x",
                aws_secret_access_key="y",
                config=client_config(),
            )
            from tests.conftest import with_key_header

            return with_key_header(c, MASTER_KEY)

        runtime = client("bedrock-runtime")
        answers = [
            runtime.converse(
                modelId=HAIKU, messages=[{"role": "user", "content": [{"text": "hi"}]}]
            ),
            runtime.invoke_model(
                modelId=HAIKU, body=b'{"anthropic_version": "bedrock-2023-05-31"}'
            ),
        ]
        stream = runtime.converse_stream(
            modelId=HAIKU, messages=[{"role": "user", "content": [{"text": "hi"}]}]
        )
        events = list(stream["stream"])
        assert events[-1]["metadata"]["usage"]["outputTokens"] == 9
        # InvokeModel streams in each family's own format: the text where its SDK reads it.
        for model, read in (
            (HAIKU, lambda c: c.get("delta", {}).get("text", "")),
            (
                "amazon.nova-lite-v1:0",
                lambda c: c.get("contentBlockDelta", {}).get("delta", {}).get("text", ""),
            ),
            ("meta.llama3-1-8b-instruct-v1:0", lambda c: c.get("generation", "")),
            ("amazon.titan-text-express-v1", lambda c: c.get("outputText", "")),
        ):
            body = runtime.invoke_model_with_response_stream(modelId=model, body=b"{}")["body"]
            chunks = [json.loads(e["chunk"]["bytes"]) for e in body]
            assert "".join(read(c) for c in chunks) == "one two three", (model, chunks)
            assert chunks[-1]["amazon-bedrock-invocationMetrics"]["outputTokenCount"] == 3
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/key/generate",
            data=json.dumps({"max_budget": 1.0}).encode(),
            headers={"Authorization": f"Bearer {MASTER_KEY}", "Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=5) as made:
            key = json.loads(made.read())
        claude = anthropic.AnthropicBedrock(
            aws_access_key=key["access_key_id"],
            aws_secret_key=key["secret_access_key"],
            aws_region="us-east-1",
            base_url=f"http://127.0.0.1:{port}/bedrock",
            max_retries=0,
        )
        with claude.messages.stream(
            model=HAIKU, max_tokens=50, messages=[{"role": "user", "content": "hi"}]
        ) as streamed:
            assert "".join(streamed.text_stream) == "one two three"
            assert streamed.get_final_message().usage.output_tokens == 3
        agent = client("bedrock-agent-runtime").invoke_agent(
            agentId="AGENT12345", agentAliasId="TSTALIASID", sessionId="s1", inputText="hi"
        )
        said = b"".join(e["chunk"]["bytes"] for e in agent["completion"] if "chunk" in e)
        assert said == b"agent AGENT12345 says: hiagent AGENT12345 says: done"
        listed = client("bedrock").list_foundation_models()["modelSummaries"]
        assert {m["providerName"] for m in listed} >= {"Anthropic", "Amazon", "Meta"}
        answers += [stream]
        answers.append(
            client("bedrock-agent-runtime").retrieve(
                knowledgeBaseId="KB12345678", retrievalQuery={"text": "q"}
            )
        )
        for answer in answers:
            assert answer["ResponseMetadata"]["HTTPHeaders"]["x-bedrock-proxy-simulated"] == "true"
        assert answers[0]["usage"]["totalTokens"] == 18
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/ui/signin", timeout=5) as page:
            assert 'id="simulated"' in page.read().decode()
        # Operators see it as plainly: readiness, a metric, and every ledger row.
        with urllib.request.urlopen(
            f"http://127.0.0.1:{port}/health/readiness", timeout=5
        ) as ready:
            assert json.loads(ready.read())["simulated"] is True
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/metrics", headers={"Authorization": f"Bearer {MASTER_KEY}"}
        )
        with urllib.request.urlopen(request, timeout=5) as metrics:
            assert "bedrock_proxy_simulated 1" in metrics.read().decode().splitlines()

        def ledger() -> list[dict]:
            request = urllib.request.Request(
                f"http://127.0.0.1:{port}/spend/logs?size=100",
                headers={"Authorization": f"Bearer {MASTER_KEY}"},
            )
            with urllib.request.urlopen(request, timeout=5) as answer:
                return json.loads(answer.read())["logs"]

        _wait(lambda: len(ledger()) >= 5)
        assert {row["account"] for row in ledger()} == {"simulated"}
    finally:
        _, err = _stop(proc)
    assert "SIMULATED upstream" in err
    assert "Traceback" not in err and "BadHttpMessage" not in err, err[-2000:]


def test_make_demo_opens_a_populated_console(browser, tmp_path):
    from tests.helpers.processes import free_port

    port = free_port()
    proc = _start(
        [
            "demo",
            "--port",
            str(port),
            "--tls-port",  # its own (the default, 4443, is another suite's too)
            str(free_port()),
            "--sqlite-path",
            str(tmp_path / "demo.db"),
            "--requests",
            "24",
        ],
        port,
        {"BEDROCK_PROXY_MASTER_KEY": MASTER_KEY},
    )
    try:
        server = type("Demo", (), {"url": f"http://127.0.0.1:{port}"})()
        page = Page(browser, server)
        _wait(lambda: _demo_spent(port))
        page.sign_in(MASTER_KEY)
        aliases = {a.text for a in page.all("#keys tbody a")}
        assert {"web-frontend", "search-indexer", "ci-evals"} <= aliases
        page.open("/ui/spend?by=team")
        assert page.find("#simulated")
        assert {p.get_attribute("data-series") for p in page.all("#chart rect.point")} == {
            "web",
            "search",
            "platform",
        }
        page.shot("demo-spend-by-team")
    finally:
        out, _ = _stop(proc)
    assert f"Console: http://127.0.0.1:{port}/ui" in out


def _demo_spent(port: int) -> bool:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/spend/report?group_by=team",
        headers={"Authorization": f"Bearer {MASTER_KEY}"},
    )
    with urllib.request.urlopen(request, timeout=5) as response:
        report = json.loads(response.read())
    return report["totals"].get("requests", 0) >= 25


def test_sessions_are_shared_by_replicas_and_end_when_idle(start_proxy, store_settings):
    from tests.conftest import OffsetClock

    clock = OffsetClock()
    replicas = [
        start_proxy(console_idle_timeout=600, clock=clock, **store_settings) for _ in range(2)
    ]
    request = urllib.request.Request(
        replicas[0].url + "/ui/signin",
        data=urllib.parse.urlencode({"key": MASTER_KEY}).encode(),
        method="POST",
    )

    class NoRedirect(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *args: Any) -> None:
            return None

    opener = urllib.request.build_opener(NoRedirect)
    with pytest.raises(urllib.error.HTTPError) as caught:
        opener.open(request, timeout=10)
    assert caught.value.code == 303
    set_cookie = caught.value.headers["Set-Cookie"]
    assert "HttpOnly" in set_cookie and "SameSite=Strict" in set_cookie
    sid = set_cookie.split(";")[0].split("=", 1)[1]
    for replica in replicas:  # signed in on one, known to both
        status, text = _get(replica, "/ui/keys", {"bp_console": sid})
        assert status == 200 and 'id="keys"' in text
    clock.advance(500)
    assert _get(replicas[1], "/ui/keys", {"bp_console": sid})[0] == 200  # moves the deadline
    clock.advance(500)
    assert _get(replicas[0], "/ui/keys", {"bp_console": sid})[0] == 200
    clock.advance(601)  # idle past the timeout: gone everywhere
    for replica in replicas:
        status, text = _get(replica, "/ui/keys", {"bp_console": sid})
        assert 'id="signin"' in text


# ---------------------------------------------------------------- sessions, throttle, forms


def test_sessions_end_with_the_credential_they_were_opened_with(start_proxy, tmp_path):
    # The sealing key stays; the master key (the admin credential) is rotated.
    shared = {
        "sqlite_path": str(tmp_path / "rotation.db"),
        "secret_key": "sealing-0123456789abcdef",
    }
    before = start_proxy(**shared)
    key = new_key(before)
    status, master_sid = _sign_in(before, MASTER_KEY)
    assert status == 303 and master_sid
    status, key_sid = _sign_in(before, key["key"])
    assert status == 303 and key_sid
    assert 'id="keys"' in _get(before, "/ui/keys", {"bp_console": master_sid})[1]
    assert _get(before, "/ui/me", {"bp_console": key_sid})[0] == 200

    # The key regenerated through the API (not the console's button): its session ends.
    status, _ = admin(before, "POST", "/key/regenerate", {"key": key["key_id"]})
    assert status == 200
    assert 'id="signin"' in _get(before, "/ui/me", {"bp_console": key_sid})[1]

    # The master key rotated (a restart with a new one on the same store): the old
    # cookie opens nothing, the live page's JSON included.
    after = start_proxy(master_key="sk-master-rotated-0123456789", **shared)
    assert 'id="signin"' in _get(after, "/ui/keys", {"bp_console": master_sid})[1]
    assert _get(after, "/ui/live.json", {"bp_console": master_sid})[0] == 401


def test_the_sign_in_throttle_counts_attempts_not_just_failures(start_proxy):
    server = start_proxy()
    own = new_key(server)
    for _ in range(4):
        assert _sign_in(server, "sk-bp-a-guess")[0] == 401
    assert _sign_in(server, own["key"])[0] == 303  # a valid key of one's own...
    assert _sign_in(server, "sk-bp-a-guess")[0] == 401  # ...wipes no guess: this is the 5th
    assert _sign_in(server, "sk-bp-a-guess")[0] == 429


def test_forty_guesses_at_once_on_one_http2_connection_are_throttled(start_proxy):
    from tests.h2client import H2Client

    server = start_proxy()
    client = H2Client(server.url)
    try:
        streams = [
            client.request(
                "POST",
                "/ui/signin",
                headers=[("content-type", "application/x-www-form-urlencoded")],
                body=f"key=sk-bp-guess-{i}".encode(),
            )
            for i in range(40)
        ]
        client.pump(lambda: all(client.done(s) for s in streams), timeout=20)
        statuses = sorted(client.answers[s].status for s in streams)
        assert statuses.count(401) == 5 and statuses.count(429) == 35, statuses
    finally:
        client.close()


def test_anonymous_sign_in_bodies_are_bounded_in_bytes_and_time(start_proxy):
    from tests.h2client import H2Client

    server = start_proxy(body_timeout=1.0)
    client = H2Client(server.url, timeout=10)
    form = [("content-type", "application/x-www-form-urlencoded")]
    try:
        big = client.request("POST", "/ui/signin", headers=form, end=False)
        client.send_all(big, b"key=" + b"x" * 1_000_000, end=False)  # and never ends
        trickle = [
            client.request("POST", "/ui/signin", headers=form, body=b"key=sk", end=False)
            for _ in range(3)  # with the big one, within the sign-in throttle's five
        ]
        client.pump(lambda: all(client.done(s) for s in [big, *trickle]), timeout=10)
        assert client.answers[big].status == 413
        assert {client.answers[s].status for s in trickle} == {408}
    finally:
        client.close()


def _master_cookie(server) -> dict[str, str]:
    status, sid = _sign_in(server, MASTER_KEY)
    assert status == 303 and sid
    return {"bp_console": sid}


def test_exports_are_whole_and_never_run_as_formulas(start_proxy, fake, monkeypatch):
    import proxy.server.fronts.console.keys as console_keys

    server = start_proxy(ledger_flush_interval=0.1)
    formula = new_key(server, key_alias='=HYPERLINK("http://evil.example","x")', user_id="@SUM(1)")
    others = [new_key(server) for _ in range(2)]
    client = boto_client("bedrock-runtime", server, key=formula["key"])
    for _ in range(120):  # more than a page of the ledger's listing (100)
        client.converse(modelId=HAIKU, messages=[{"role": "user", "content": [{"text": "hi"}]}])
    # A model id is the caller's text too (kept in the ledger whatever AWS answers).
    client.converse(modelId="-2+3", messages=[{"role": "user", "content": [{"text": "x"}]}])
    server.settle()
    cookie = _master_cookie(server)

    status, text = _get(server, f"/ui/spend.csv?table=requests&key_id={formula['key_id']}", cookie)
    lines = text.splitlines()
    assert status == 200 and len(lines) == 1 + 121, len(lines)
    assert any(",'-2+3," in line for line in lines)
    status, text = _get(server, "/ui/keys.csv", cookie)
    assert status == 200
    assert "'=HYPERLINK" in text and "'@SUM(1)" in text
    assert not any(
        cell.startswith(("=", "@")) for line in text.splitlines() for cell in line.split(",")
    )

    # The keys page pages (here two keys a page), and the CSV has every key.
    monkeypatch.setattr(console_keys, "_KEYS_PER_PAGE", 2)
    status, first = _get(server, "/ui/keys", cookie)
    assert status == 200 and 'id="keys-next"' in first and "page 1 of 2" in first
    status, second = _get(server, "/ui/keys?page=2", cookie)
    shown = [k["key_id"] for k in (formula, *others) if k["key_id"] in first + second]
    assert len(shown) == 3 and 'id="keys-prev"' in second


def test_a_keys_own_page_shows_its_last_twenty_requests(start_proxy, fake):
    server = start_proxy(ledger_flush_interval=0.1)
    key = new_key(server, max_budget=0.5, budget_duration="30d")
    client = boto_client("bedrock-runtime", server, key=key["key"])
    for _ in range(25):
        client.converse(modelId=HAIKU, messages=[{"role": "user", "content": [{"text": "hi"}]}])
    server.settle()
    status, sid = _sign_in(server, key["key"])
    status, text = _get(server, "/ui/me", {"bp_console": sid})
    assert status == 200
    table = text.split('id="requests"', 1)[1].split("</table>", 1)[0]
    assert table.count("<tr>") == 1 + 20  # the header row and twenty requests
    # Money with the digits that keep a small amount from reading as zero.
    summary = text.split('id="my-spend"', 1)[1].split("</p>", 1)[0]
    assert "$0.00<" not in summary and "of $0.50 this period" in summary, summary
    assert "<td>0.000000</td>" not in table and "<td>$0.0000" in table, table[:600]


def test_behind_a_trusted_tls_proxy_sign_in_works_and_the_cookie_is_secure(start_proxy):
    direct = start_proxy()
    behind = start_proxy(trusted_proxies=["127.0.0.1/32"])
    host = behind.url.split("://", 1)[1]

    def sign_in(server, headers: dict[str, str]) -> tuple[int, str]:
        request = urllib.request.Request(
            server.url + "/ui/signin",
            data=urllib.parse.urlencode({"key": MASTER_KEY}).encode(),
            headers={"Origin": f"https://{host}", **headers},
        )

        class NoRedirect(urllib.request.HTTPRedirectHandler):
            def redirect_request(self, *args: Any) -> None:
                return None

        try:
            with urllib.request.build_opener(NoRedirect).open(request, timeout=10) as answer:
                return answer.status, ""
        except urllib.error.HTTPError as exc:
            return exc.code, exc.headers.get("Set-Cookie") or ""

    status, cookie = sign_in(behind, {"X-Forwarded-Proto": "https"})
    assert status == 303 and "Secure" in cookie
    status, cookie = sign_in(behind, {"Forwarded": 'for=10.0.0.1;proto="https"'})
    assert status == 303 and "Secure" in cookie
    # From a client no one trusts, the header is anyone's: the connection says http.
    assert sign_in(direct, {"X-Forwarded-Proto": "https"})[0] == 403


def test_teams_and_users_are_managed_in_the_console(browser, console):
    """Teams and users made, changed and deleted on their pages, through the admin API's
    own service: the API sees each change, the team's policy binds a key minted after it,
    and every change is audited."""
    page = Page(browser, console)
    page.sign_in(MASTER_KEY)
    page.open("/ui/teams")
    page.fill({"team_id": "console-team", "team_alias": "Console team", "models": "anthropic.*"})
    page.click("#team-new")
    assert page.path == "/ui/teams/console-team"
    page.fill({"key_max_budget": "2", "team_member_budget": "1",
               "allow.knowledge_base_ids": "kb-1, kb-2"})  # fmt: skip
    page.find("[name=team_member_budget_duration]").send_keys("1d")
    page.click("#save")
    assert page.path == "/ui/teams/console-team"
    status, team = admin(console, "GET", "/team/info?team_id=console-team")
    assert status == 200, team
    assert team["team_alias"] == "Console team" and team["models"] == ["anthropic.*"]
    assert team["key_max_budget"] == 2 and team["team_member_budget"] == 1
    assert team["team_member_budget_duration"] == "1d"
    assert team["key_allow_lists"] == {"knowledge_base_ids": ["kb-1", "kb-2"]}
    # A value the API refuses is refused on the page, in the page's words.
    page.fill({"key_max_budget": "lots"})
    page.click("#save")
    assert "not a number" in page.find("#error").text
    # The policy binds a key minted after it, whoever mints it.
    status, refused = admin(console, "POST", "/key/generate",
                            {"team_id": "console-team", "max_budget": 5})  # fmt: skip
    assert status == 403 and "key_max_budget" in refused["message"], refused

    page.open("/ui/teams/console-team")
    page.find("#member-form [name=user_id]").send_keys("ana@example.com")
    page.click("#member-add")
    assert 'data-user-id="ana@example.com"' in browser.page_source
    page.shot("team")
    status, team = admin(console, "GET", "/team/info?team_id=console-team")
    assert [m["user_id"] for m in team["members_with_roles"]] == ["ana@example.com"]

    page.open("/ui/users/ana@example.com")  # made a record when added
    page.fill({"max_budget": "0.5", "budget_duration": "7d"})
    page.click("#save")
    status, user = admin(console, "GET", "/user/info?user_id=ana@example.com")
    assert user["max_budget"] == 0.5 and user["budget_duration"] == "7d"
    assert user["teams"] == ["console-team"]
    page.shot("user")

    page.open("/ui/teams")
    page.fill({"user_id": "ben@example.com", "teams": "console-team", "max_budget": "3",
               "budget_duration": "30d"})  # fmt: skip
    page.click("#user-new")
    assert page.path == "/ui/users/ben@example.com"
    status, ben = admin(console, "GET", "/user/info?user_id=ben@example.com")
    assert ben["teams"] == ["console-team"] and ben["max_budget"] == 3

    page.open("/ui/teams/console-team")
    page.click('tr[data-user-id="ana@example.com"] button')
    status, team = admin(console, "GET", "/team/info?team_id=console-team")
    assert [m["user_id"] for m in team["members_with_roles"]] == ["ben@example.com"]

    page.open("/ui/users/ben@example.com")
    page.fill({"confirm": "not-ben"})
    page.click("#delete")
    assert "to confirm" in page.find("#error").text
    page.fill({"confirm": "ben@example.com"})
    page.click("#delete")
    assert admin(console, "GET", "/user/info?user_id=ben@example.com")[0] == 404

    page.open("/ui/teams/console-team")
    page.fill({"confirm": "console-team"})
    page.click("#delete")
    assert page.path == "/ui/teams"
    assert admin(console, "GET", "/team/info?team_id=console-team")[1].get("team_alias") is None
    _, audit = admin(console, "GET", "/audit/logs?target=console-team&size=50")
    actions = {row["action"] for row in audit["logs"]}
    assert {"team.new", "team.update", "team.member_add", "team.member_delete",
            "team.delete"} <= actions, actions  # fmt: skip
