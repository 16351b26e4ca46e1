"""The route table against botocore's own serializer: every operation of the three
services, with awkward label values, routes back to itself with the labels intact."""

from __future__ import annotations

import pytest
from botocore.serialize import create_serializer
from botocore.session import get_session

from proxy.wire.routing import SERVICE_NAMES, Router, load_operations

ROUTER = Router(load_operations())
VALUES = [
    "plain-id",
    "arn:aws:bedrock:us-east-1:123456789012:inference-profile/us.anthropic.claude-3-haiku-20240307-v1:0",
    "space and ünïcode/slash",
]


def _cases():
    session = get_session()
    for service in SERVICE_NAMES:
        model = session.get_service_model(service)
        for name in model.operation_names:
            yield pytest.param(model.operation_model(name), id=f"{service}.{name}")


@pytest.mark.parametrize("operation", list(_cases()))
def test_every_operation_routes_to_itself(operation):
    serializer = create_serializer("rest-json", include_validation=False)
    members = operation.input_shape.members if operation.input_shape else {}
    uri_members = {n: s for n, s in members.items() if s.serialization.get("location") == "uri"}
    for value in VALUES:
        params = {n: value for n in uri_members}
        request = serializer.serialize_to_request(params, operation)
        match = ROUTER.match(request["method"], request["url_path"])
        assert match is not None, request["url_path"]
        assert match.operation.name == operation.name
        assert match.operation.service.name == operation.service_model.service_name
        assert set(match.labels.values()) <= {value}
        assert match.path == request["url_path"]  # re-encoding is botocore's encoding


def test_unknown_paths_do_not_match():
    assert ROUTER.match("POST", "/model/x/unknown") is None
    assert ROUTER.match("DELETE", "/model/x/converse") is None
    assert ROUTER.match("GET", "/") is None
