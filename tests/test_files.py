"""Files and batch: a boto3 s3 client on /bedrock/files and the batch workflow, with real
clients, virtual keys signing SigV4, and a fake S3 that checks signatures as S3 does."""

from __future__ import annotations

import gzip
import io
import json
import time

import boto3
import pytest
from botocore.config import Config
from botocore.exceptions import ClientError

from tests.conftest import MASTER_KEY, REGION
from tests.helpers.admin import ledger_row, new_key, s3_client, sigv4_client

HAIKU = "anthropic.claude-3-haiku-20240307-v1:0"


@pytest.fixture(scope="module")
def files_proxy(start_proxy):
    return start_proxy(key_cache_ttl=0.5)


@pytest.fixture
def fake_s3(fake_s3_server):
    fake_s3_server[0].reset()
    return fake_s3_server[0]


def _code(info) -> tuple[str, int]:
    response = info.value.response
    return response["Error"]["Code"], response["ResponseMetadata"]["HTTPStatusCode"]


def test_batch_workflow_end_to_end(files_proxy, fake, fake_s3):
    """The seed's workflow: JSONL, put_object, create the job, poll, list, fetch output."""
    fake.s3 = fake_s3
    key = new_key(files_proxy, file_buckets=["batch-in", "batch-out"], models=["anthropic.*"])
    s3 = s3_client(files_proxy, key)
    bedrock = sigv4_client("bedrock", files_proxy, key)
    records = [
        {"recordId": f"r{i}", "modelInput": {"messages": [{"role": "user", "content": f"q{i}"}]}}
        for i in range(3)
    ]
    jsonl = "".join(json.dumps(r) + "\n" for r in records).encode()
    s3.put_object(Bucket="batch-in", Key="jobs/input.jsonl", Body=jsonl)
    assert fake_s3.buckets["batch-in"]["jobs/input.jsonl"].data == jsonl
    job = bedrock.create_model_invocation_job(
        jobName="nightly",
        roleArn="arn:aws:iam::123456789012:role/batch",
        modelId=HAIKU,
        inputDataConfig={"s3InputDataConfig": {"s3Uri": "s3://batch-in/jobs/input.jsonl"}},
        outputDataConfig={"s3OutputDataConfig": {"s3Uri": "s3://batch-out/results/"}},
    )
    arn = job["jobArn"]
    deadline = time.monotonic() + 10
    while (status := bedrock.get_model_invocation_job(jobIdentifier=arn)["status"]) != "Completed":
        assert time.monotonic() < deadline
        time.sleep(0.1)
    listed = bedrock.list_model_invocation_jobs()["invocationJobSummaries"]
    assert arn in [j["jobArn"] for j in listed] and status == "Completed"
    outputs = s3.list_objects_v2(Bucket="batch-out", Prefix="results/")["Contents"]
    (output,) = [o["Key"] for o in outputs if o["Key"].endswith("input.jsonl.out")]
    lines = s3.get_object(Bucket="batch-out", Key=output)["Body"].read().decode().splitlines()
    assert [json.loads(line)["recordId"] for line in lines] == ["r0", "r1", "r2"]


def test_object_operations(files_proxy, fake_s3):
    key = new_key(files_proxy)
    s3 = s3_client(files_proxy, key)
    body = bytes(range(256)) * 64
    put = s3.put_object(
        Bucket="objects", Key="data/blob.bin", Body=body, ContentType="application/x-test"
    )
    etag = put["ETag"]
    assert etag == fake_s3.buckets["objects"]["data/blob.bin"].etag  # passed through unchanged
    got = s3.get_object(Bucket="objects", Key="data/blob.bin", Range="bytes=100-199")
    assert (
        got["Body"].read() == body[100:200] and got["ContentRange"] == f"bytes 100-199/{len(body)}"
    )
    head = s3.head_object(Bucket="objects", Key="data/blob.bin", IfMatch=etag)
    assert head["ContentLength"] == len(body) and head["ContentType"] == "application/x-test"
    with pytest.raises(ClientError) as info:
        s3.head_object(Bucket="objects", Key="data/blob.bin", IfMatch='"not-the-etag"')
    assert _code(info)[1] == 412
    with pytest.raises(ClientError) as info:
        s3.get_object(Bucket="objects", Key="data/blob.bin", IfMatch='"not-the-etag"')
    assert _code(info) == ("PreconditionFailed", 412)
    with pytest.raises(ClientError) as info:
        s3.head_object(Bucket="objects", Key="data/blob.bin", IfNoneMatch=etag)
    assert _code(info)[1] == 304
    for i in range(5):
        s3.put_object(Bucket="objects", Key=f"list/item-{i}", Body=b"x")
    page = s3.list_objects_v2(Bucket="objects", Prefix="list/", MaxKeys=2)
    keys = [o["Key"] for o in page["Contents"]]
    while page.get("IsTruncated"):
        page = s3.list_objects_v2(
            Bucket="objects",
            Prefix="list/",
            MaxKeys=2,
            ContinuationToken=page["NextContinuationToken"],
        )
        keys += [o["Key"] for o in page["Contents"]]
    assert keys == [f"list/item-{i}" for i in range(5)]
    s3.delete_object(Bucket="objects", Key="data/blob.bin")
    with pytest.raises(ClientError) as info:
        s3.get_object(Bucket="objects", Key="data/blob.bin")
    assert _code(info) == ("NoSuchKey", 404)


def test_gzip_object_is_stored_as_uploaded(files_proxy, fake_s3):
    s3 = s3_client(files_proxy, new_key(files_proxy))
    body = gzip.compress(b'{"recordId": "1"}\n' * 100, mtime=0)
    s3.put_object(Bucket="objects", Key="data/in.jsonl.gz", Body=body, ContentEncoding="gzip")
    assert fake_s3.buckets["objects"]["data/in.jsonl.gz"].data == body


def test_multipart_upload_and_abort(files_proxy, fake_s3):
    s3 = s3_client(files_proxy, new_key(files_proxy))
    upload = s3.create_multipart_upload(Bucket="mp-bucket", Key="big/file.bin")
    parts = []
    for number, payload in enumerate((b"a" * (5 * 1024 * 1024), b"b" * 1024), start=1):
        part = s3.upload_part(
            Bucket="mp-bucket",
            Key="big/file.bin",
            UploadId=upload["UploadId"],
            PartNumber=number,
            Body=payload,
        )
        parts.append({"PartNumber": number, "ETag": part["ETag"]})
    listed = s3.list_parts(Bucket="mp-bucket", Key="big/file.bin", UploadId=upload["UploadId"])
    assert [p["PartNumber"] for p in listed["Parts"]] == [1, 2]
    done = s3.complete_multipart_upload(
        Bucket="mp-bucket",
        Key="big/file.bin",
        UploadId=upload["UploadId"],
        MultipartUpload={"Parts": parts},
    )
    assert done["ETag"].endswith('-2"')
    assert len(fake_s3.buckets["mp-bucket"]["big/file.bin"].data) == 5 * 1024 * 1024 + 1024
    other = s3.create_multipart_upload(Bucket="mp-bucket", Key="big/abandoned.bin")
    s3.abort_multipart_upload(
        Bucket="mp-bucket", Key="big/abandoned.bin", UploadId=other["UploadId"]
    )
    assert other["UploadId"] not in fake_s3.uploads


@pytest.mark.parametrize(
    "name", ["with spaces/and more.txt", "ünïcödé/文件.jsonl", "a+b=c&d?e#f.txt"]
)
def test_keys_with_spaces_and_unicode(files_proxy, fake_s3, name):
    s3 = s3_client(files_proxy, new_key(files_proxy))
    s3.put_object(Bucket="names", Key=name, Body=name.encode())
    assert fake_s3.buckets["names"][name].data == name.encode()
    assert s3.get_object(Bucket="names", Key=name)["Body"].read() == name.encode()
    assert name in [o["Key"] for o in s3.list_objects_v2(Bucket="names")["Contents"]]


def test_bucket_and_prefix_allow_lists(files_proxy, fake_s3):
    key = new_key(files_proxy, file_buckets=["team-a"], file_prefixes=["inputs/"])
    s3 = s3_client(files_proxy, key)
    s3.put_object(Bucket="team-a", Key="inputs/ok.jsonl", Body=b"{}")
    for bucket, name in (("team-b", "inputs/x"), ("team-a", "other/x")):
        with pytest.raises(ClientError) as info:
            s3.put_object(Bucket=bucket, Key=name, Body=b"{}")
        assert _code(info) == ("AccessDenied", 403)
    with pytest.raises(ClientError) as info:
        s3.list_objects_v2(Bucket="team-a", Prefix="other/")
    assert _code(info) == ("AccessDenied", 403)
    with pytest.raises(ClientError) as info:
        s3.list_buckets()
    assert _code(info) == ("AccessDenied", 403)
    bedrock = sigv4_client("bedrock", files_proxy, key)
    with pytest.raises(bedrock.exceptions.AccessDeniedException, match="s3://team-b"):
        _start_job(bedrock, "s3://team-b/inputs/x.jsonl", "s3://team-a/inputs/out/")


def _start_job(bedrock, input_uri: str, output_uri: str) -> dict:
    return bedrock.create_model_invocation_job(
        jobName="j",
        roleArn="arn:aws:iam::123456789012:role/r",
        modelId=HAIKU,
        inputDataConfig={"s3InputDataConfig": {"s3Uri": input_uri}},
        outputDataConfig={"s3OutputDataConfig": {"s3Uri": output_uri}},
    )


def test_a_prefix_is_a_folder_never_its_siblings(files_proxy, fake_s3):
    key = new_key(files_proxy, file_buckets=["shared"], file_prefixes=["team-a"])
    s3 = s3_client(files_proxy, key)
    s3.put_object(Bucket="shared", Key="team-a/in.jsonl", Body=b"{}")
    assert s3.list_objects_v2(Bucket="shared", Prefix="team-a/")["KeyCount"] == 1
    for name in ("team-ab/in.jsonl", "team-a-old/in.jsonl", "team"):
        with pytest.raises(ClientError) as info:
            s3.put_object(Bucket="shared", Key=name, Body=b"{}")
        assert _code(info) == ("AccessDenied", 403)
    # A listing of "team-a" (no slash) would show team-ab/ too.
    for prefix in ("team-a", "team-", ""):
        with pytest.raises(ClientError) as info:
            s3.list_objects_v2(Bucket="shared", Prefix=prefix)
        assert _code(info) == ("AccessDenied", 403)
    bedrock = sigv4_client("bedrock", files_proxy, key)
    with pytest.raises(bedrock.exceptions.AccessDeniedException, match="team-ab"):
        _start_job(bedrock, "s3://shared/team-ab/x.jsonl", "s3://shared/team-a/out/")


def test_key_without_files_group_is_refused(files_proxy):
    key = new_key(files_proxy, operation_groups=["inference"])
    s3 = s3_client(files_proxy, key)
    with pytest.raises(ClientError) as info:
        s3.put_object(Bucket="any", Key="x", Body=b"x")
    code, status = _code(info)
    assert (code, status) == ("AccessDenied", 403)


def test_another_keys_job_is_refused(files_proxy, fake):
    owner, other = new_key(files_proxy), new_key(files_proxy)
    job = sigv4_client("bedrock", files_proxy, owner).create_model_invocation_job(
        jobName="mine",
        roleArn="arn:aws:iam::123456789012:role/r",
        modelId=HAIKU,
        inputDataConfig={"s3InputDataConfig": {"s3Uri": "s3://in/x.jsonl"}},
        outputDataConfig={"s3OutputDataConfig": {"s3Uri": "s3://out/"}},
    )
    intruder = sigv4_client("bedrock", files_proxy, other)
    for call in (intruder.get_model_invocation_job, intruder.stop_model_invocation_job):
        with pytest.raises(intruder.exceptions.AccessDeniedException, match="jobs it created"):
            call(jobIdentifier=job["jobArn"])
    job_id = job["jobArn"].rsplit("/", 1)[-1]
    with pytest.raises(intruder.exceptions.AccessDeniedException):
        intruder.get_model_invocation_job(jobIdentifier=job_id)
    sigv4_client("bedrock", files_proxy, owner).stop_model_invocation_job(
        jobIdentifier=job["jobArn"]
    )


def test_tampered_signature_and_body(files_proxy, fake_s3):
    key = new_key(files_proxy)
    s3 = s3_client(files_proxy, key)

    def tamper_body(request, **_):
        body = request.body.getvalue() if hasattr(request.body, "getvalue") else request.body
        request.body = body.replace(b"honest", b"hacked")  # same length, after signing

    s3.meta.events.register("before-send.s3.PutObject", tamper_body)
    with pytest.raises(ClientError) as info:
        s3.put_object(Bucket="tamper", Key="t.txt", Body=b"an honest body")
    assert _code(info) == ("XAmzContentSHA256Mismatch", 400)
    assert "t.txt" not in fake_s3.buckets.get("tamper", {})  # the upload never completed
    wrong = dict(key, secret_access_key="not-the-secret-000000000000000000000000")
    with pytest.raises(ClientError) as info:
        s3_client(files_proxy, wrong).put_object(Bucket="tamper", Key="t.txt", Body=b"x")
    assert _code(info) == ("SignatureDoesNotMatch", 403)
    unknown = dict(key, access_key_id="BPKNOSUCHKEY00000000")
    with pytest.raises(ClientError) as info:
        s3_client(files_proxy, unknown).get_object(Bucket="tamper", Key="t.txt")
    assert _code(info) == ("InvalidAccessKeyId", 403)


def test_cross_provider_routing_is_refused(files_proxy, fake, fake_s3):
    key = new_key(files_proxy)

    def provider(value):
        def hook(request, **_):
            request.headers["x-model-provider"] = value

        return hook

    bedrock = sigv4_client("bedrock", files_proxy, key)
    bedrock.meta.events.register("before-sign.*.*", provider("openai"))
    with pytest.raises(bedrock.exceptions.ValidationException, match="never translates"):
        bedrock.list_foundation_models()
    s3 = s3_client(files_proxy, key)
    s3.meta.events.register("before-sign.*.*", provider("gemini"))
    with pytest.raises(ClientError) as info:
        s3.put_object(Bucket="provider-test", Key="k", Body=b"x")
    assert _code(info) == ("InvalidRequest", 400)
    ok = sigv4_client("bedrock", files_proxy, key)
    ok.meta.events.register("before-sign.*.*", provider("bedrock"))
    assert ok.list_foundation_models()["modelSummaries"]
    assert "x-model-provider" not in {k.lower() for k in fake.requests[-1].headers}


def test_master_key_bearer_can_use_files(files_proxy, fake_s3):
    import urllib.request

    request = urllib.request.Request(
        files_proxy.base + "/files/master-bucket/hello.txt",
        data=b"hi",
        method="PUT",
        headers={"Authorization": f"Bearer {MASTER_KEY}"},
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        assert response.status == 200
    assert fake_s3.buckets["master-bucket"]["hello.txt"].data == b"hi"


def test_large_multipart_upload_streams_with_bounded_memory(fake_server, fake_s3_server, tmp_path):
    """A 105 MiB file through a proxy process: its peak memory stays far below the file."""
    from tests.helpers.processes import BIN, free_port, running, server_env

    _, fake_url = fake_server
    fake_s3, s3_url = fake_s3_server
    port = free_port()
    env = server_env(
        fake_url,
        BEDROCK_PROXY_HOST="127.0.0.1",
        BEDROCK_PROXY_PORT=str(port),
        AWS_ENDPOINT_URL_S3=s3_url,
        BEDROCK_PROXY_SQLITE_PATH=str(tmp_path / "f.db"),
        BEDROCK_PROXY_ACCESS_LOG="false",
    )
    with running([BIN, "serve"], env, port) as proc:
        server = type(
            "Remote",
            (),
            {"url": f"http://127.0.0.1:{port}", "base": f"http://127.0.0.1:{port}/bedrock"},
        )()
        key = new_key(server)
        s3 = s3_client(server, key)
        size = 105 * 1024 * 1024
        data = bytes(range(256)) * (size // 256)
        idle = _status_kib(proc.pid, "VmRSS")
        with open(f"/proc/{proc.pid}/clear_refs", "w") as fh:
            fh.write("5")  # reset the peak
        from boto3.s3.transfer import TransferConfig

        s3.upload_fileobj(
            io.BytesIO(data),
            "large",
            "big/105mib.bin",
            Config=TransferConfig(
                multipart_threshold=16 * 1024 * 1024,
                multipart_chunksize=16 * 1024 * 1024,
                max_concurrency=2,
            ),
        )
        peak = _status_kib(proc.pid, "VmHWM")
    stored = fake_s3.buckets["large"]["big/105mib.bin"]
    assert stored.data == data and stored.etag.endswith('-7"')
    growth_mib = (peak - idle) / 1024
    print(f"proxy peak RSS growth for a 105 MiB multipart upload: {growth_mib:.1f} MiB")
    assert growth_mib < 40, f"proxy peak RSS grew by {growth_mib:.1f} MiB for a 105 MiB upload"


def _status_kib(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise AssertionError(field)


def test_s3_errors_from_the_proxy_are_xml(files_proxy):
    import urllib.error
    import urllib.request

    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(files_proxy.base + "/files/bucket/key", timeout=5)
    body = info.value.read().decode()
    assert info.value.code == 403 and info.value.headers["Content-Type"].startswith(
        "application/xml"
    )
    assert "<Error><Code>AccessDenied</Code>" in body and "<RequestId>" in body


def test_aws_chunked_uploads_with_trailing_checksums_survive(start_proxy, fake_s3, tmp_path):
    """Over HTTPS botocore streams uploads as aws-chunked with a CRC32 trailer; the proxy
    re-signs them as STREAMING-UNSIGNED-PAYLOAD-TRAILER and forwards the bytes untouched."""
    from proxy.server.listen.tls import server_context, write_self_signed

    cert, key_file = write_self_signed(str(tmp_path))
    store = {"sqlite_path": str(tmp_path / "keys.db")}
    https = start_proxy(tls=server_context(cert, key_file), **store)
    key = new_key(start_proxy(**store))  # minted over plain HTTP, used over HTTPS
    s3 = boto3.client(
        "s3",
        endpoint_url=https.base + "/files",
        region_name=REGION,
        verify=cert,
        aws_access_key_id=key["access_key_id"],
        aws_secret_access_key=key["secret_access_key"],
        config=Config(
            s3={"addressing_style": "path"},
            retries={"total_max_attempts": 1},
            request_checksum_calculation="when_supported",
        ),
    )
    before = fake_s3.chunked_uploads
    payload = b"chunked payload " * 5000
    s3.upload_fileobj(io.BytesIO(payload), "chunked", "streamed.bin")
    assert fake_s3.chunked_uploads == before + 1, "botocore did not send aws-chunked"
    assert fake_s3.buckets["chunked"]["streamed.bin"].data == payload
    headers = fake_s3.requests[-1][2]
    assert headers["x-amz-content-sha256"] == "STREAMING-UNSIGNED-PAYLOAD-TRAILER"
    assert headers["x-amz-trailer"] == "x-amz-checksum-crc32"
    assert s3.get_object(Bucket="chunked", Key="streamed.bin")["Body"].read() == payload


def test_a_stalled_upload_ends_at_the_body_timeout(start_proxy, fake_s3):
    import socket
    import time
    from urllib.parse import urlsplit

    proxy = start_proxy(body_timeout=1.0)
    parts = urlsplit(proxy.url)
    started = time.monotonic()
    with socket.create_connection((parts.hostname, parts.port), timeout=15) as sock:
        sock.sendall(
            b"PUT /bedrock/files/stalled/object.bin HTTP/1.1\r\n"
            b"Host: " + parts.netloc.encode() + b"\r\n"
            b"Authorization: Bearer " + MASTER_KEY.encode() + b"\r\n"
            b"Content-Length: 100000\r\n\r\n" + b"x" * 1000
        )  # and then nothing
        answer = b""
        while b"</Error>" not in answer:
            chunk = sock.recv(65536)
            if not chunk:
                break
            answer += chunk
    assert time.monotonic() - started < 10  # body_timeout, not never
    assert answer.startswith(b"HTTP/1.1 400") and b"<Code>RequestTimeout</Code>" in answer
    assert "object.bin" not in fake_s3.buckets.get("stalled", {})  # nothing half-stored


def test_files_requests_carry_their_spend_annotations(files_proxy, fake_s3):
    """The files endpoint passes the same gate as every front: its requests' annotations
    are recorded in the ledger, and never sent to S3."""
    key = new_key(files_proxy)
    s3 = s3_client(files_proxy, key)

    def annotate(request, **_):
        request.headers["x-bedrock-proxy-user-id"] = "alice"

    s3.meta.events.register_first("before-sign.s3.PutObject", annotate)
    put = s3.put_object(Bucket="objects", Key="annotated.txt", Body=b"x")
    request_id = put["ResponseMetadata"]["HTTPHeaders"]["x-bedrock-proxy-request-id"]
    row = ledger_row(files_proxy, request_id)
    assert row["operation"] == "PutObject" and row["end_user"] == "alice", row
    sent = {name.lower() for name in fake_s3.requests[-1][2]}
    assert "x-bedrock-proxy-user-id" not in sent
