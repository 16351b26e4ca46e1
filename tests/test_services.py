"""bedrock-agent-runtime and the bedrock control plane, with boto3 and aiobotocore."""

from __future__ import annotations

from aiobotocore.session import get_session

from tests.conftest import MASTER_KEY, REGION, boto_client, client_config, with_key_header


def test_retrieve_and_generate(proxy, fake):
    client = boto_client("bedrock-agent-runtime", proxy)
    found = client.retrieve(knowledgeBaseId="KB12345678", retrievalQuery={"text": "q"})
    assert found["retrievalResults"][0]["content"]["text"] == "doc from KB12345678"
    generated = client.retrieve_and_generate(
        input={"text": "q"},
        retrieveAndGenerateConfiguration={
            "type": "KNOWLEDGE_BASE",
            "knowledgeBaseConfiguration": {
                "knowledgeBaseId": "KB12345678",
                "modelArn": "arn:aws:bedrock:us-east-1::foundation-model/anthropic.claude-v2",
            },
        },
    )
    assert generated["output"]["text"] == "generated answer"


def test_invoke_agent_streams_chunks(proxy, fake):
    # Exactly the setup users copy from the other gateway's docs: dummy AWS keys plus a
    # litellm_user_api_key header added in a hook.
    client = boto_client("bedrock-agent-runtime", proxy)
    reply = client.invoke_agent(
        agentId="L1RT58GYRW", agentAliasId="MFPSBCXYTW", sessionId="12345", inputText="Who?"
    )
    text = "".join(e["chunk"]["bytes"].decode() for e in reply["completion"] if "chunk" in e)
    assert text == "agent L1RT58GYRW says: Who?agent L1RT58GYRW says: done"
    assert reply["sessionId"] == "12345"
    assert fake.requests[-1].operation == "InvokeAgent"


def test_batch_job_lifecycle_and_model_listing(proxy, fake):
    client = boto_client("bedrock", proxy)
    created = client.create_model_invocation_job(
        jobName="nightly",
        roleArn="arn:aws:iam::123456789012:role/batch",
        modelId="anthropic.claude-3-haiku-20240307-v1:0",
        inputDataConfig={"s3InputDataConfig": {"s3Uri": "s3://in/batch.jsonl"}},
        outputDataConfig={"s3OutputDataConfig": {"s3Uri": "s3://out/"}},
    )
    arn = created["jobArn"]
    job = client.get_model_invocation_job(jobIdentifier=arn)
    assert job["status"] == "Completed" and job["jobName"] == "nightly"
    assert fake.requests[-1].raw_path.startswith("/model-invocation-job/arn%3Aaws%3Abedrock")
    listed = client.list_model_invocation_jobs()
    assert arn in [j["jobArn"] for j in listed["invocationJobSummaries"]]
    client.stop_model_invocation_job(jobIdentifier=arn)
    models = client.list_foundation_models()
    assert models["modelSummaries"][0]["providerName"] == "Anthropic"


async def test_aiobotocore_converse_and_stream(proxy, fake):
    session = get_session()
    async with session.create_client(
        "bedrock-runtime",
        endpoint_url=proxy.base,
        region_name=REGION,
        aws_access_key_id="dummy",
        aws_secret_access_key="dummy",
        config=client_config(),
    ) as client:
        with_key_header(client, MASTER_KEY, "x-api-key")
        reply = await client.converse(
            modelId="amazon.nova-lite-v1:0",
            messages=[{"role": "user", "content": [{"text": "hi"}]}],
        )
        assert reply["output"]["message"]["content"][0]["text"] == "model=amazon.nova-lite-v1:0"
        stream = await client.converse_stream(
            modelId="amazon.nova-lite-v1:0",
            messages=[{"role": "user", "content": [{"text": "hi"}]}],
        )
        events = [event async for event in stream["stream"]]
        assert "metadata" in events[-1]
