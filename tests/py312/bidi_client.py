"""The Python SDK for Bedrock (aws-sdk-bedrock-runtime, Python >= 3.12, the CRT transport)
opening a bidirectional stream through the proxy over TLS.

    python bidi_client.py ENDPOINT MODEL CAFILE TURNS

Credentials from AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (a virtual key pair). Each event
is sent only after the previous answer arrived. Prints one JSON line.
"""

import asyncio
import json
import os
import sys

from aws_sdk_bedrock_runtime.client import AsyncBedrockRuntimeClient
from aws_sdk_bedrock_runtime.config import AsyncBedrockRuntimeConfig
from aws_sdk_bedrock_runtime.models import (
    BidirectionalInputPayloadPart,
    InvokeModelWithBidirectionalStreamInputChunk,
    InvokeModelWithBidirectionalStreamOperationInput,
)
from awscrt import io as crt_io
from smithy_http.aio.crt import AWSCRTHTTPClient


async def main(endpoint: str, model: str, cafile: str, turns: int) -> dict:
    transport = AWSCRTHTTPClient()
    # The CRT client trusts the system store only; the test's certificate is private.
    options = crt_io.TlsContextOptions()
    options.override_default_trust_store_from_path(ca_filepath=cafile)
    transport._tls_ctx = crt_io.ClientTlsContext(options)
    config = await AsyncBedrockRuntimeConfig.resolve(
        endpoint_uri=endpoint,
        region="us-east-1",
        aws_access_key_id=os.environ["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=os.environ["AWS_SECRET_ACCESS_KEY"],
        transport=transport,
    )
    client = AsyncBedrockRuntimeClient(config=config)
    stream = await client.invoke_model_with_bidirectional_stream(
        InvokeModelWithBidirectionalStreamOperationInput(model_id=model)
    )
    answers = []
    output = None
    for turn in range(turns):
        event = {"event": {"turn": turn, "text": f"py {turn}"}}
        await stream.input_stream.send(
            InvokeModelWithBidirectionalStreamInputChunk(
                value=BidirectionalInputPayloadPart(bytes_=json.dumps(event).encode())
            )
        )
        if output is None:
            _, output = await stream.await_output()
        while True:  # this turn's answer: its text, then its usage
            received = await output.receive()
            payload = json.loads(received.value.bytes_)
            answers.append(payload)
            if "usageEvent" in payload["event"]:
                break
    await stream.input_stream.close()
    return {"ok": True, "answers": answers}


if __name__ == "__main__":
    endpoint, model, cafile, turns = sys.argv[1:5]
    try:
        result = asyncio.run(main(endpoint, model, cafile, int(turns)))
    except Exception as exc:  # reported to the test
        result = {"ok": False, "error": type(exc).__name__, "message": str(exc)}
    print(json.dumps(result))
