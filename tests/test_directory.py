"""Teams and users as records (LiteLLM's routes and field names), team policy on every
key minted or changed, per-user spend caps across all of a user's keys and APIs, and the
calls LiteLLM users try first: /key/block, /v1/models, a key's own value."""

from __future__ import annotations

import pytest
from botocore.exceptions import ClientError

from proxy.wire import errors
from tests.conftest import boto_client
from tests.helpers.admin import admin, new_key

HAIKU = "anthropic.claude-3-haiku-20240307-v1:0"
HELLO = [{"role": "user", "content": [{"text": "hi"}]}]


def _ok(server, method: str, path: str, body: dict | None = None, **kw) -> dict:
    status, answer = admin(server, method, path, body, **kw)
    assert status == 200, (path, answer)
    return answer


def test_teams_and_users_with_litellms_calls(start_proxy):
    server = start_proxy()
    team = _ok(
        server,
        "POST",
        "/team/new",
        {
            "team_alias": "Machine learning",
            "models": ["anthropic.*"],
            "max_budget": 100,
            "budget_duration": "30d",
            "members_with_roles": [{"role": "admin", "user_id": "lena@example.com"}],
            "metadata": {"cost_center": "42"},
        },
    )
    team_id = team["team_id"]
    assert team["team_alias"] == "Machine learning"
    assert team["members_with_roles"] == [{"user_id": "lena@example.com", "role": "admin"}]
    added = _ok(
        server,
        "POST",
        "/team/member_add",
        {"team_id": team_id, "member": {"role": "user", "user_id": "eve@example.com"}},
    )
    assert {m["user_id"] for m in added["members_with_roles"]} == {
        "lena@example.com",
        "eve@example.com",
    }
    user = _ok(server, "GET", "/user/info?user_id=eve@example.com")
    assert user["teams"] == [team_id] and user["user_email"] == "eve@example.com"
    _ok(
        server,
        "POST",
        "/user/new",
        {"user_id": "sam", "user_email": "sam@example.com", "user_role": "internal_user",
         "teams": [team_id], "max_budget": 5, "budget_duration": "1d"},
    )  # fmt: skip
    _ok(server, "POST", "/user/update", {"user_id": "sam", "max_budget": 7})
    assert _ok(server, "GET", "/user/info?user_id=sam")["max_budget"] == 7
    assert {u["user_id"] for u in _ok(server, "GET", "/user/list")["users"]} >= {"sam"}
    _ok(server, "POST", "/team/member_delete", {"team_id": team_id, "user_id": "sam"})
    assert _ok(server, "GET", "/user/info?user_id=sam")["teams"] == []
    assert _ok(server, "POST", "/user/delete", {"user_ids": ["sam"]}) == {"deleted_users": ["sam"]}
    assert admin(server, "GET", "/user/info?user_id=sam")[0] == 404
    teams = _ok(server, "GET", "/team/list")["teams"]
    assert [t["team_id"] for t in teams] == [team_id]
    # Unknown fields stay refused, in LiteLLM's calls as in ours.
    assert admin(server, "POST", "/team/new", {"team_alias": "x", "colour": "red"})[0] == 400
    assert admin(server, "POST", "/user/new", {"user_id": "x", "colour": "red"})[0] == 400

    # /key/block and /key/unblock, by token, id or alias.
    key = new_key(server, key_alias="to-block")
    client = boto_client("bedrock-runtime", server, key=key["key"])
    client.converse(modelId=HAIKU, messages=HELLO)
    assert _ok(server, "POST", "/key/block", {"key": key["key"]})["blocked"] is True
    with pytest.raises(ClientError) as refused:
        client.converse(modelId=HAIKU, messages=HELLO)
    assert refused.value.response["Error"]["Code"] == "AccessDeniedException"
    assert _ok(server, "POST", "/key/unblock", {"key": "to-block"})["blocked"] is False
    client.converse(modelId=HAIKU, messages=HELLO)

    _ok(server, "POST", "/team/delete", {"team_ids": [team_id]})
    actions = [r["action"] for r in reversed(_ok(server, "GET", "/audit/logs?size=100")["logs"])]
    for expected in ("team.new", "team.member_add", "user.new", "user.update",
                     "team.member_delete", "user.delete", "team.delete"):  # fmt: skip
        assert expected in actions, (expected, actions)
    assert actions.count("key.update") == 2  # block, unblock


def test_team_policy_binds_whoever_mints_the_key(start_proxy):
    server = start_proxy()
    _ok(
        server,
        "POST",
        "/team/new",
        {"team_id": "ml", "models": ["anthropic.*"], "key_max_budget": 10,
         "key_rpm_limit": 5, "key_max_duration": "7d", "key_operation_groups": ["inference"]},
    )  # fmt: skip
    for body, field in (
        ({"models": ["amazon.nova-*"]}, "models"),
        ({"max_budget": 20}, "max_budget"),
        ({"rpm_limit": 50}, "rpm_limit"),
        ({"duration": "30d"}, "duration"),
        ({"operation_groups": ["inference", "control-write"]}, "operation_groups"),
    ):
        status, answer = admin(server, "POST", "/key/generate", {"team_id": "ml", **body})
        assert status == 403 and answer["message"].startswith(field), answer
    # What a key of the team leaves open, the policy fills in at its most.
    key = _ok(server, "POST", "/key/generate", {"team_id": "ml"})
    assert key["models"] == ["anthropic.*"] and key["max_budget"] == 10
    assert key["rpm_limit"] == 5 and key["operation_groups"] == ["inference"] and key["expires"]
    # A team-admin's token meets the same policy, and so does a change to a key.
    status, token = admin(
        server, "POST", "/token/new", {"name": "lead", "role": "team-admin", "team_id": "ml"}
    )
    status, answer = admin(server, "POST", "/key/generate", {"max_budget": 11}, key=token["token"])
    assert status == 403 and "key_max_budget" in answer["message"]
    status, answer = admin(server, "POST", "/key/update", {"key": key["key_id"], "max_budget": 99})
    assert status == 403
    # Allow-lists: a key of the team stays within the team's; an open one gets them.
    lists = {"knowledge_base_ids": ["kb-1", "kb-2"], "file_prefixes": ["ml/"]}
    _ok(server, "POST", "/team/update", {"team_id": "ml", "key_allow_lists": lists})
    for body, field in (
        ({"knowledge_base_ids": ["kb-1", "kb-3"]}, "knowledge_base_ids"),
        ({"file_prefixes": ["ml-other/"]}, "file_prefixes"),
        ({"file_prefixes": ["ml"]}, None),
        ({"file_prefixes": ["ml/models/"], "knowledge_base_ids": ["kb-2"]}, None),
    ):
        status, answer = admin(server, "POST", "/key/generate", {"team_id": "ml", **body})
        if field is None:
            assert status == 200, (body, answer)
        else:
            assert status == 403 and answer["message"].startswith(field), answer
    key = _ok(server, "POST", "/key/generate", {"team_id": "ml"})
    assert key["knowledge_base_ids"] == ["kb-1", "kb-2"] and key["file_prefixes"] == ["ml/"]
    status, answer = admin(server, "POST", "/team/update",
                           {"team_id": "ml", "key_allow_lists": {"model_ids": ["x"]}})  # fmt: skip
    assert status == 400 and "key_allow_lists" in answer["message"], answer


def test_a_users_cap_spans_all_their_keys_and_apis(start_proxy, fake):
    server = start_proxy(user_spend_cap={"max_budget": 1000, "budget_duration": "1d"})
    _ok(server, "POST", "/user/new", {"user_id": "alice", "max_budget": 0.000001,
                                     "budget_duration": "1d"})  # fmt: skip
    first = boto_client("bedrock-runtime", server, key=new_key(server, user_id="alice")["key"])
    second = boto_client("bedrock-runtime", server, key=new_key(server, user_id="alice")["key"])
    first.converse(modelId=HAIKU, messages=HELLO)  # spends past the cap
    server.settle()
    for client in (first, second):
        with pytest.raises(ClientError) as refused:
            client.converse(modelId=HAIKU, messages=HELLO)
        error = refused.value.response["Error"]
        assert error["Code"] == "ServiceQuotaExceededException"
        assert "user alice" in error["Message"] and "resets at" in error["Message"]
    # The OpenAI-compatible API of the same user: refused in the OpenAI error's shape.
    import openai

    third = new_key(server, user_id="alice")
    chat = openai.OpenAI(
        api_key=third["key"], base_url=server.url + "/bedrock/openai/v1", max_retries=0
    )
    with pytest.raises(openai.BadRequestError) as shaped:
        chat.chat.completions.create(model=HAIKU, messages=[{"role": "user", "content": "x"}])
    assert "user alice" in str(shaped.value)
    # The next day the cap is whole again.
    server.clock.advance(86400)
    second.converse(modelId=HAIKU, messages=HELLO)
    # Without a record of their own, a user has the organisation's cap.
    bob = boto_client("bedrock-runtime", server, key=new_key(server, user_id="bob")["key"])
    bob.converse(modelId=HAIKU, messages=HELLO)


def test_models_list_and_a_keys_own_value(start_proxy, fake):
    import openai

    server = start_proxy()
    key = new_key(server, models=[HAIKU, "amazon.nova-*"])
    client = openai.OpenAI(api_key=key["key"], base_url=server.url + "/v1", max_retries=0)
    ids = [m.id for m in client.models.list()]
    assert ids[0] == HAIKU and any(i.startswith("amazon.nova-") for i in ids)
    assert not any(i.startswith("meta.") for i in ids)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(api_key="nope", base_url=server.url + "/v1", max_retries=0).models.list()
    # A key's own value, as LiteLLM migrations set it: long enough, or refused.
    own = "sk-migrated-" + "x" * 32
    status, body = admin(server, "POST", "/key/generate", {"key": own, "key_alias": "moved"})
    assert status == 200 and body["key"] == own
    boto_client("bedrock-runtime", server, key=own).converse(modelId=HAIKU, messages=HELLO)
    status, body = admin(server, "POST", "/key/generate", {"key": "sk-short"})
    assert status == 400 and "at least 32" in body["message"]


def test_the_root_points_a_browser_to_the_console(start_proxy):
    import urllib.request

    server = start_proxy()

    class NoRedirect(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *args):  # type: ignore[no-untyped-def]
            return None

    opener = urllib.request.build_opener(NoRedirect)
    try:
        opener.open(server.url + "/", timeout=5)
    except urllib.error.HTTPError as answer:
        assert answer.code == 303 and answer.headers["Location"] == "/ui/"
    else:
        raise AssertionError("/ did not redirect")


async def test_a_users_short_lived_keys_are_bounded_and_all_end_with_them(tmp_path, monkeypatch):
    """At most SESSION_KEYS_PER_USER live at once (expired ones do not count); a user's
    keys end with them however many pages they fill."""
    from proxy.access import keyservice
    from proxy.access.secretbox import SecretBox
    from proxy.exchange import Identity
    from proxy.store import open_store
    from proxy.store.audit import SYSTEM
    from tests.conftest import OffsetClock

    monkeypatch.setattr(keyservice, "MAX_PAGE", 7)  # pages of 7: the limit spans three
    clock = OffsetClock()
    store = open_store(None, str(tmp_path / "keys.db"), clock=clock)
    await store.open()
    try:
        keys = keyservice.KeyService(store, SecretBox("a-secret-for-tests-0123456789"), clock=clock)
        dev = Identity("user", key_id="dev", role="member", email="dev@example.com")
        minted = [
            await keys.session_key(dev, SYSTEM) for _ in range(keyservice.SESSION_KEYS_PER_USER)
        ]
        with pytest.raises(errors.AwsError) as refused:
            await keys.session_key(dev, SYSTEM)
        assert refused.value.status == 403 and "live short-lived keys" in refused.value.message
        await keys.delete([minted[0]["key_id"]], actor=SYSTEM)
        await keys.session_key(dev, SYSTEM)  # one deleted: room for one
        clock.advance(9 * 3600)  # every one expired (8 h): none counts
        await keys.session_key(dev, SYSTEM)
        blocked = await keys.session_key(dev, SYSTEM)
        await keys.update(blocked["key_id"], {"blocked": True}, SYSTEM)
        with pytest.raises(errors.AwsError) as refused:  # a new one would undo the block
            await keys.session_key(dev, SYSTEM)
        assert "blocked" in refused.value.message
        clock.advance(9 * 3600)  # expired with it: the block is over
        await keys.session_key(dev, SYSTEM)
        await keys.generate({"user_id": "dev@example.com", "key_alias": "given"}, SYSTEM)
        # Keys expired a day or more go at the next mint; the rest stay until then.
        _, held = await store.keys.list({"user_id": "dev@example.com"}, 100, 0)
        assert held == keyservice.SESSION_KEYS_PER_USER + 4
        clock.advance(24 * 3600)
        await keys.session_key(dev, SYSTEM)
        ended = await keys.delete_user_keys("dev@example.com", SYSTEM)
        assert len(ended) == 3, ended  # the last two minted (one expired a day ago), and given
        assert (await store.keys.list({"user_id": "dev@example.com"}, 100, 0))[1] == 0
    finally:
        await store.close()
