"""Bedrock AgentCore's data plane through the proxy: boto3's bedrock-agentcore client,
signed with a virtual key's pair, against a fake that verifies SigV4 and speaks the wire
formats; every operation routed and classified; allow-lists by path, query, ARN form and
nested field; sessions owned per key; credential and payment operations refused."""

from __future__ import annotations

import re
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import boto3
import botocore.session
import pytest
from botocore.exceptions import ClientError

from proxy.access import policy
from proxy.wire.routing import AGENTCORE, Router, load_operations
from tests.conftest import REGION, SERVICES, client_config, start_server
from tests.fake_agentcore import FakeAgentCore
from tests.helpers.admin import admin, new_key

ACCOUNT = "123456789012"
RUNTIME = f"arn:aws:bedrock-agentcore:{REGION}:{ACCOUNT}:runtime/support_agent-AbCdEf1234"
OTHER_RUNTIME = f"arn:aws:bedrock-agentcore:{REGION}:{ACCOUNT}:runtime/billing_agent-ZyXw987654"


def new_session() -> str:
    """A session id of its own for each use (AgentCore wants 33 characters or more)."""
    return "session-" + secrets.token_hex(16)


README = Path(__file__).resolve().parent.parent / "README.md"


@pytest.fixture(scope="module")
def agentcore(bg) -> Iterator[tuple[FakeAgentCore, str]]:
    fake = FakeAgentCore()
    url, runner = bg.run(start_server(fake.app()))
    yield fake, url
    bg.run(runner.cleanup())


@pytest.fixture(scope="module")
def proxy_ac(start_proxy, agentcore, fake_server, fake_s3_server):
    endpoints = {name: fake_server[1] for name in SERVICES}
    return start_proxy(
        endpoints={
            **endpoints,
            "s3": fake_s3_server[1],
            "bedrock-agentcore": agentcore[1],
            "bedrock-agentcore-control": agentcore[1],
        },
        request_prices={"InvokeAgentRuntime": 0.002},
        ledger_flush_interval=0.1,
    )


@pytest.fixture
def fake(agentcore) -> FakeAgentCore:
    agentcore[0].reset()
    return agentcore[0]


def client(server: Any, key: dict, service: str = AGENTCORE) -> Any:
    return boto3.client(
        service,
        endpoint_url=f"{server.url}/{service}",
        region_name=REGION,
        aws_access_key_id=key["access_key_id"],
        aws_secret_access_key=key["secret_access_key"],
        config=client_config(),
    )


def denied(call: Any, **kwargs: Any) -> ClientError:
    with pytest.raises(ClientError) as caught:
        call(**kwargs)
    assert caught.value.response["Error"]["Code"] == "AccessDeniedException", caught.value
    return caught.value


# ---------------------------------------------------------------- every operation


def test_every_operation_is_routed_classified_and_grouped():
    model = botocore.session.get_session().get_service_model(AGENTCORE)
    router = Router(load_operations((AGENTCORE,)))
    fields = policy.load_fields()
    for name in model.operation_names:
        op = model.operation_model(name)
        path = re.sub(r"\{[^}]+\}", "x1", op.http["requestUri"].split("?", 1)[0])
        found = router.match(op.http["method"], path)
        assert found is not None and found.operation.name == name, name
        group = policy.operation_group(found.operation)
        assert group.startswith("agentcore-"), (name, group)
        members = op.input_shape.members if op.input_shape else {}
        for member in ("memoryId", "agentRuntimeArn", "codeInterpreterIdentifier"):
            if member in members:  # each names a resource an allow-list governs
                assert f"{AGENTCORE}:{name}" in fields, name


# ---------------------------------------------------------------- clients


def test_runtime_memory_and_code_interpreter_through_boto3(proxy_ac, fake):
    session_id = new_session()
    key = new_key(proxy_ac)
    ac = client(proxy_ac, key)
    # A streamed answer, relayed as it came, with its session header.
    answer = ac.invoke_agent_runtime(
        agentRuntimeArn=RUNTIME, runtimeSessionId=session_id, payload=b'{"prompt": "Hi"}'
    )
    assert answer["runtimeSessionId"] == session_id
    assert answer["contentType"] == "text/event-stream"
    lines = [line for line in answer["response"].iter_lines() if line]
    assert lines == [f'data: {{"text": "{w}"}}'.encode() for w in ("Hello", "from", "the", "agent")]
    assert fake.invocations[-1] == (RUNTIME, session_id, b'{"prompt": "Hi"}')  # bytes as sent
    # Memory: events in a session, and long-term records.
    memory = "support_memory-AbCdEf1234"
    made = ac.create_event(
        memoryId=memory,
        actorId="alice",
        sessionId=session_id,
        eventTimestamp=1_800_000_000,
        payload=[{"conversational": {"content": {"text": "Hi"}, "role": "USER"}}],
    )
    assert made["event"]["sessionId"] == session_id
    events = ac.list_events(memoryId=memory, actorId="alice", sessionId=session_id)["events"]
    assert [e["eventId"] for e in events] == [made["event"]["eventId"]]
    records = ac.retrieve_memory_records(
        memoryId=memory, namespace="/users/alice", searchCriteria={"searchQuery": "style"}
    )["memoryRecordSummaries"]
    assert records[0]["content"]["text"] == "The user prefers short answers."
    # A code interpreter's session: started, used (an event stream), stopped.
    ci = "aws.codeinterpreter.v1"
    session = ac.start_code_interpreter_session(codeInterpreterIdentifier=ci)["sessionId"]
    ran = ac.invoke_code_interpreter(
        codeInterpreterIdentifier=ci,
        sessionId=session,
        name="executeCode",
        arguments={"language": "python", "code": "print(1)"},
    )
    results = [event["result"] for event in ran["stream"]]
    assert results[0]["content"][0]["text"] == "ran: print(1)"
    ac.stop_code_interpreter_session(codeInterpreterIdentifier=ci, sessionId=session)
    assert fake.ci_sessions[(ci, session)] == "TERMINATED"
    proxy_ac.settle()
    _, logs = admin(proxy_ac, "GET", f"/spend/logs?api_key={key['key_id']}&size=100")
    operations = [row["operation"] for row in logs["logs"]]
    assert {"InvokeAgentRuntime", "CreateEvent", "InvokeCodeInterpreter"} <= set(operations)
    (invoked,) = [r for r in logs["logs"] if r["operation"] == "InvokeAgentRuntime"]
    assert invoked["cost"] == pytest.approx(0.002)  # request_prices.InvokeAgentRuntime


# ---------------------------------------------------------------- allow-lists


def test_a_key_limited_to_one_runtime_and_one_memory_reaches_no_other(proxy_ac, fake):
    session_id = new_session()
    key = new_key(
        proxy_ac,
        agent_runtime_arns=[RUNTIME],
        memory_ids=["support_memory-AbCdEf1234"],
        code_interpreter_ids=["aws.codeinterpreter.v1"],
    )
    ac = client(proxy_ac, key)
    ac.invoke_agent_runtime(agentRuntimeArn=RUNTIME, runtimeSessionId=session_id, payload=b"{}")
    runtime_id = OTHER_RUNTIME.rsplit("/", 1)[1]
    other_partition = OTHER_RUNTIME.replace("arn:aws:", "arn:aws-us-gov:")
    for other in (
        OTHER_RUNTIME,
        runtime_id,
        other_partition,
        OTHER_RUNTIME + "/runtime-endpoint/DEFAULT",
    ):
        denied(
            ac.invoke_agent_runtime,
            agentRuntimeArn=other,
            runtimeSessionId=new_session(),
            payload=b"{}",
        )
    denied(ac.list_events, memoryId="billing_memory-ZyXw987654", actorId="a", sessionId=session_id)
    denied(
        ac.create_event,
        memoryId="billing_memory-ZyXw987654",
        actorId="a",
        sessionId=session_id,
        eventTimestamp=1_800_000_000,
        payload=[],
    )
    # The ARN decoded in the path (some SDKs send it so), and the query's harness.
    raw = quote(OTHER_RUNTIME, safe=":/")
    status = _raw_post(proxy_ac, key, f"/bedrock-agentcore/runtimes/{raw}/invocations")
    assert status == 403
    # A nested field: a harness's code interpreter tool.
    denied(
        ac.invoke_harness,
        harnessArn=RUNTIME,
        runtimeSessionId=new_session(),
        messages=[{"role": "user", "content": [{"text": "hi"}]}],
        tools=[
            {
                "type": "agentcore_code_interpreter",
                "name": "ci",
                "config": {
                    "agentCoreCodeInterpreter": {
                        "codeInterpreterArn": f"arn:aws:bedrock-agentcore:{REGION}:"
                        f"{ACCOUNT}:code-interpreter/custom_ci-Zz99999999"
                    }
                },
            }
        ],
    )
    assert not [r for r in fake.requests if OTHER_RUNTIME.rsplit("/", 1)[1] in r.raw_path]


def _raw_post(server: Any, key: dict, path: str) -> int:
    """A request signed with the key's pair by botocore, on a path boto3 would encode."""
    import urllib.error
    import urllib.request

    from botocore.auth import SigV4Auth
    from botocore.awsrequest import AWSRequest
    from botocore.credentials import Credentials

    url = server.url + path
    request = AWSRequest(
        method="POST", url=url, data=b"{}", headers={"Content-Type": "application/json"}
    )
    SigV4Auth(
        Credentials(key["access_key_id"], key["secret_access_key"]), AGENTCORE, REGION
    ).add_auth(request)
    prepared = urllib.request.Request(url, data=b"{}", method="POST", headers=dict(request.headers))
    try:
        with urllib.request.urlopen(prepared, timeout=10) as answer:
            return answer.status
    except urllib.error.HTTPError as exc:
        return exc.code


# ---------------------------------------------------------------- ownership


def test_sessions_belong_to_the_key_that_started_them(proxy_ac, fake):
    session_id = new_session()
    owner, other = new_key(proxy_ac), new_key(proxy_ac)
    mine, theirs = client(proxy_ac, owner), client(proxy_ac, other)
    ci = "aws.codeinterpreter.v1"
    session = mine.start_code_interpreter_session(codeInterpreterIdentifier=ci)["sessionId"]
    kwargs = {"codeInterpreterIdentifier": ci, "sessionId": session}
    denied(theirs.invoke_code_interpreter, name="executeCode", arguments={"code": "x"}, **kwargs)
    denied(theirs.stop_code_interpreter_session, **kwargs)
    assert fake.ci_sessions[(ci, session)] == "READY"  # untouched
    listed = theirs.list_code_interpreter_sessions(codeInterpreterIdentifier=ci)["items"]
    assert session not in [item["sessionId"] for item in listed]
    listed = mine.list_code_interpreter_sessions(codeInterpreterIdentifier=ci)["items"]
    assert session in [item["sessionId"] for item in listed]
    # A runtime session and a memory session: the first key to use one has it.
    runtime_session = "runtime-session-" + secrets.token_hex(12)
    mine.invoke_agent_runtime(
        agentRuntimeArn=RUNTIME, runtimeSessionId=runtime_session, payload=b"{}"
    )
    denied(
        theirs.invoke_agent_runtime,
        agentRuntimeArn=RUNTIME,
        runtimeSessionId=runtime_session,
        payload=b"{}",
    )
    denied(theirs.stop_runtime_session, agentRuntimeArn=RUNTIME, runtimeSessionId=runtime_session)
    memory = "support_memory-AbCdEf1234"
    mine.create_event(
        memoryId=memory,
        actorId="bob",
        sessionId=session_id + "b",
        eventTimestamp=1_800_000_000,
        payload=[],
    )
    denied(theirs.list_events, memoryId=memory, actorId="bob", sessionId=session_id + "b")
    # The same memory by ARN is the same session: no second claim on it that way.
    memory_arn = f"arn:aws:bedrock-agentcore:{REGION}:{ACCOUNT}:memory/{memory}"
    denied(
        theirs.create_event,
        memoryId=memory_arn,
        actorId="bob",
        sessionId=session_id + "b",
        eventTimestamp=1_800_000_000,
        payload=[],
    )
    denied(theirs.list_events, memoryId=memory_arn, actorId="bob", sessionId=session_id + "b")


# ---------------------------------------------------------------- credentials and money


def test_credential_and_payment_operations_are_refused_unless_granted(proxy_ac, fake):
    ac = client(proxy_ac, new_key(proxy_ac))
    denied(ac.get_workload_access_token, workloadName="agent")
    denied(ac.get_resource_api_key, workloadIdentityToken="t", resourceCredentialProviderName="p")
    denied(
        ac.get_resource_oauth2_token,
        workloadIdentityToken="t",
        resourceCredentialProviderName="p",
        scopes=["s"],
        oauth2Flow="M2M",
    )
    error = denied(
        ac.list_payment_sessions,
        paymentManagerArn=f"arn:aws:bedrock-agentcore:{REGION}:{ACCOUNT}:payment-manager/pm",
    )
    assert "agentcore-payments" in str(error)
    assert not fake.requests  # none reached AgentCore


def test_a_budgeted_key_is_refused_an_unpriced_operation(proxy_ac, fake):
    ac = client(proxy_ac, new_key(proxy_ac, max_budget=1))
    error = denied(
        ac.retrieve_memory_records,
        memoryId="m-AbCdEf1234",
        namespace="/",
        searchCriteria={"searchQuery": "q"},
    )
    assert "request_prices.RetrieveMemoryRecords" in str(error)
    assert not fake.requests


def test_the_control_plane_reads_and_writes_only_when_granted(proxy_ac, fake):
    def control(key: dict) -> Any:
        return client(proxy_ac, key, "bedrock-agentcore-control")

    plain = control(new_key(proxy_ac))
    denied(
        plain.create_agent_runtime,
        agentRuntimeName="agent",
        agentRuntimeArtifact={"containerConfiguration": {"containerUri": "x.dkr.ecr/x:1"}},
        roleArn=f"arn:aws:iam::{ACCOUNT}:role/r",
        networkConfiguration={"networkMode": "PUBLIC"},
    )
    held = control(new_key(proxy_ac, memory_ids=["support_memory-AbCdEf1234"]))
    error = denied(held.get_agent_runtime, agentRuntimeId="other_agent-AbCdEf1234")
    assert "do not extend to the control plane" in str(error)
    assert not fake.requests
    with pytest.raises(ClientError):  # a read goes through, signed (the fake has no such op)
        plain.get_agent_runtime(agentRuntimeId="support_agent-AbCdEf1234")
    (read,) = fake.requests
    assert read.raw_path == "/runtimes/support_agent-AbCdEf1234/"
    assert "/bedrock-agentcore/aws4_request" in read.headers["Authorization"]


# ---------------------------------------------------------------- the README's snippet


def test_the_readme_agentcore_snippet_runs_as_written(proxy_ac, fake, monkeypatch):
    key = new_key(proxy_ac)
    text = README.read_text()
    section = text.split("**Agents on Bedrock AgentCore**", 1)[1]
    snippet = section.split("```python\n", 1)[1].split("```", 1)[0]
    monkeypatch.setenv("AWS_ENDPOINT_URL_BEDROCK_AGENTCORE", proxy_ac.url + "/bedrock-agentcore")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", key["access_key_id"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", key["secret_access_key"])
    namespace: dict[str, Any] = {}
    exec(compile(snippet, "README.md", "exec"), namespace)
    assert fake.invocations and fake.invocations[-1][0].endswith("/my_agent-abc1234567")
