"""Every request member that names a resource, derived from botocore's service models.

A virtual key's allow-lists are only as good as the fields they are checked against, and an
attacker tries the field nobody thought of. So the fields are not listed by hand: every
input member of every operation of the three services, at any depth (lists, maps and unions
included), is classified by its shape, and the result is committed as a reviewed table
(``data/resource_fields.json``). A test re-derives it from the botocore models installed and
fails when an operation gains a member that names something and is not classified.

Classification is by shape name, which AWS chooses per meaning (``S3Uri``,
``BedrockRerankingModelArn``, ``GuardrailIdentifierWithArn``); a few generic shapes
(``String``, ``Arn``) are classified per member. A member is *suspect* when its name or its
shape's name mentions a resource word; every suspect must be classified, as a kind or as
``none`` (reviewed: not a resource an allow-list governs).

Run ``python -m proxy.access.resources`` to print the table, ``--write`` to update the file.
"""

from __future__ import annotations

import json
import re
import sys
from dataclasses import dataclass
from importlib import resources as importlib_resources
from typing import Any

# What a field names, as the policy checks it.
MODEL = "model"  # model id or ARN, inference profile, prompt router, custom/imported model
GUARDRAIL = "guardrail"
KNOWLEDGE_BASE = "knowledge base"
AGENT = "agent"
AGENT_ALIAS_ARN = "agent alias arn"  # arn:...:agent-alias/AGENT/ALIAS: the agent is checked
FLOW = "flow"
S3_URI = "s3"  # s3://bucket/key
S3_OBJECT = "s3 object"  # a structure {s3BucketName, s3ObjectKey}
S3_BUCKET = "s3 bucket"  # a bare bucket name
ARN = "arn"  # any ARN: checked by its resource type
# Bedrock AgentCore's data plane: each an id or an ARN of the resource.
AGENT_RUNTIME = "agent runtime"
MEMORY = "memory"
CODE_INTERPRETER = "code interpreter"
BROWSER = "browser"
EVALUATOR = "evaluator"
GATEWAY = "gateway"
REGISTRY = "registry"
AGENTCORE_KINDS = (AGENT_RUNTIME, MEMORY, CODE_INTERPRETER, BROWSER, EVALUATOR, GATEWAY, REGISTRY)
NONE = "none"

SERVICES = ("bedrock-runtime", "bedrock-agent-runtime", "bedrock", "bedrock-agentcore")
# A member is suspect when its name or its shape's name ends like a reference to something.
_SUSPECT = re.compile(
    r"(id|ids|idstring|identifier|arn|arns|uri|uris|bucket|bucketname|objectkey|model"
    r"|modelid|source|lambda|location|profile|router|endpoint)$",
    re.IGNORECASE,
)

# Reviewed: shape name -> kind. Every suspect shape must be here (or in _MEMBER_KINDS).
SHAPE_KINDS: dict[str, str] = {
    # models, in every spelling the models use
    "AdvancedPromptOptimizationModelIdentifier": MODEL,
    "AsyncInvokeIdentifier": MODEL,
    "BaseModelIdentifier": MODEL,
    "BedrockModelArn": MODEL,
    "BedrockModelId": MODEL,
    "BedrockRerankingModelArn": MODEL,
    "ConversationalModelId": MODEL,
    "CustomModelArn": MODEL,
    "CustomModelDeploymentIdentifier": MODEL,
    "EvaluationBedrockModelIdentifier": MODEL,
    "EvaluatorModelIdentifier": MODEL,
    "FoundationModelArn": MODEL,
    "FoundationModelVersionIdentifier": MODEL,
    "GetFoundationModelIdentifier": MODEL,
    "ImportedModelIdentifier": MODEL,
    "IncludedModelId": MODEL,
    "InferenceProfileIdentifier": MODEL,
    "InvokeModelIdentifier": MODEL,
    "ModelArn": MODEL,
    "ModelId": MODEL,
    "ModelIdentifier": MODEL,
    "ModelSourceIdentifier": MODEL,
    "OptimizePromptRequestTargetModelIdString": MODEL,
    "PromptRouterArn": MODEL,
    "PromptRouterTargetModelArn": MODEL,
    "ProvisionedModelId": MODEL,
    "InferenceProfileModelSourceArn": MODEL,
    "TeacherModelIdentifier": MODEL,
    # guardrails
    "AgenticRetrieveBedrockGuardrailConfigurationGuardrailIdString": GUARDRAIL,
    "GuardrailConfigurationGuardrailIdString": GUARDRAIL,
    "GuardrailIdentifier": GUARDRAIL,
    "GuardrailIdentifierWithArn": GUARDRAIL,
    # knowledge bases, agents, flows
    "KnowledgeBaseArn": KNOWLEDGE_BASE,
    "KnowledgeBaseId": KNOWLEDGE_BASE,
    "KnowledgeBaseIdentifier": KNOWLEDGE_BASE,
    "AgentId": AGENT,
    "AgentAliasArn": AGENT_ALIAS_ARN,
    "FlowIdentifier": FLOW,
    # S3
    "S3Uri": S3_URI,
    "S3UriFolder": S3_URI,
    "kBS3Uri": S3_URI,
    "S3Identifier": S3_OBJECT,
    "BucketName": S3_BUCKET,
    # ARNs of any resource type: checked by the type the ARN names
    "AWSResourceARN": ARN,
    "ResourcePolicyResourceArn": ARN,
    "TaggableResourcesArn": ARN,
    # Reviewed as not governed by a key's allow-lists: versions, names the caller chooses,
    # jobs (batch and async-invoke jobs are owned per key, see jobs.py), sessions, IAM roles
    # and KMS keys the caller names (AWS checks the server's own rights on those), enums,
    # free text, and account ids.
    "AccountId": NONE,
    "AdvancedPromptOptimizationJobIdentifier": NONE,
    "AgentAliasId": NONE,  # an alias of an agent named beside it
    "AgentCollaboration": NONE,
    "AgenticRetrieveBedrockGuardrailConfigurationGuardrailVersionString": NONE,
    "AgenticRetrieveRerankingModelType": NONE,
    "Arn": NONE,  # marketplace endpoint ARNs (control-plane only)
    "AutomatedReasoningPolicyArn": NONE,
    "AutomatedReasoningPolicyBuildWorkflowId": NONE,
    "AutomatedReasoningPolicyBuildWorkflowType": NONE,
    "BasePromptTemplate": NONE,
    "CollaborationInstruction": NONE,
    "CreationMode": NONE,
    "CustomModelName": NONE,
    "DataSourceId": NONE,  # a data source inside a knowledge base named beside it
    "EvaluationJobIdentifier": NONE,
    "EvaluationPrecomputedInferenceSourceIdentifier": NONE,
    "EvaluationPrecomputedRagSourceIdentifier": NONE,
    "ExcludedModelId": NONE,  # narrows a selection, never widens it
    "ExternalSourceType": NONE,
    "FileSourceType": NONE,
    "FlowAliasIdentifier": NONE,  # an alias of a flow named beside it
    "FlowExecutionIdentifier": NONE,
    "FlowExecutionName": NONE,
    "FoundationModelType": NONE,
    "GuardrailConfigurationGuardrailVersionString": NONE,
    "GuardrailCrossRegionGuardrailProfileIdentifier": NONE,  # AWS-defined routing profile
    "GuardrailContentSource": NONE,
    "GuardrailNumericalVersion": NONE,
    "GuardrailVersion": NONE,
    "Identifier": NONE,
    "ImportedModelName": NONE,
    "InferenceProfileName": NONE,
    "InvocationArn": NONE,  # async-invoke jobs: owned per key
    "InvocationIdentifier": NONE,
    "KmsKeyArn": NONE,
    "KmsKeyId": NONE,
    "LambdaArn": NONE,
    "ModelCopyJobArn": NONE,
    "ModelCustomizationJobIdentifier": NONE,
    "ModelDeploymentName": NONE,
    "ModelImportJobIdentifier": NONE,
    "ModelInvocationJobIdentifier": NONE,  # batch jobs: owned per key
    "ModelInvocationType": NONE,
    "ModelPackageArn": NONE,
    "ModelStatus": NONE,
    "Name": NONE,
    "PromptRouterName": NONE,
    "PromptState": NONE,
    "PromptType": NONE,
    "ProvisionedModelName": NONE,
    "RerankingModelType": NONE,
    "ResourcePolicyDocument": NONE,
    "RoleArn": NONE,
    "S3BucketName": NONE,  # only inside S3Identifier, checked there
    "S3InputFormat": NONE,
    "S3ObjectKey": NONE,  # likewise
    "SageMakerFlowDefinitionArn": NONE,
    "SecurityGroupId": NONE,
    "SessionIdentifier": NONE,
    "TextPromptTemplate": NONE,
    "SessionId": NONE,
    "AutomatedReasoningPolicyTestCaseId": NONE,
    "SubnetId": NONE,
    "MemoryId": NONE,
    "DocumentId": NONE,
    "AutomatedReasoningPolicyDefinitionRuleId": NONE,
    "ToolUseId": NONE,
    "Uuid": NONE,
    "AccountEnforcedGuardrailConfigurationId": NONE,
    "LambdaResourceArn": NONE,
    "AgentCoreMemoryId": NONE,
    "AgentCoreMemoryActorId": NONE,
    "AgentCoreMemorySessionId": NONE,
    "MemoryStrategyId": NONE,
    "RetrievalInstructionId": NONE,
    "FlowExecutionId": NONE,
    "AutomatedReasoningPolicyBuildResultAssetId": NONE,
    "MantleProjectId": NONE,
    "AgenticRetrieveMemoryMetadataKey": NONE,
}

# Shapes whose name means something else in one service: AgentCore's ``MemoryId`` is an
# AgentCore memory (an allow-list names it), bedrock-agent-runtime's an agent's memory.
_SERVICE_SHAPE_KINDS: dict[str, dict[str, str]] = {
    "bedrock-agentcore": {
        "MemoryId": MEMORY,
        "EvaluatorId": EVALUATOR,
        "EvaluatorArn": EVALUATOR,
        "GatewayArn": GATEWAY,
        "HarnessArn": AGENT_RUNTIME,  # a harness runs as an agent runtime does
        "HarnessBrowserArn": BROWSER,
        "HarnessCodeInterpreterArn": CODE_INTERPRETER,
        "RegistryIdentifier": REGISTRY,
        "HarnessSkillS3Uri": S3_URI,
        "S3LocationBucketString": S3_BUCKET,
        # Reviewed as not governed by allow-lists: what lives inside a memory named
        # beside it (actors, events, records; sessions are owned per key, see
        # access.sessions), sessions of a runtime, code interpreter or browser named
        # beside them (owned per key), traces, jobs, tests, recommendations, the
        # identity and payment operations' own ids (those operations are refused unless
        # a key is granted their groups), and resources AWS checks against the server's
        # own rights (secrets, file systems, credential providers, KMS).
        "ABTestId": NONE,
        "ActorId": NONE,
        "ApiKeyArn": NONE,
        "BatchEvaluationArn": NONE,
        "BatchEvaluationId": NONE,
        "BrowserProfileId": NONE,
        "BrowserSessionId": NONE,
        "CapacityProviderId": NONE,
        "CodeInterpreterSessionId": NONE,
        "ConfigurationBundleArn": NONE,
        "ConfigurationBundleVersionId": NONE,
        "EfsAccessPointArn": NONE,
        "EfsFileSystemArn": NONE,
        "EventId": NONE,
        "HarnessToolUseId": NONE,
        "InsightId": NONE,
        "InvokeAgentRuntimeCommandRequestAccountIdString": NONE,
        "InvokeAgentRuntimeCommandRequestTraceIdString": NONE,
        "InvokeAgentRuntimeRequestAccountIdString": NONE,
        "InvokeAgentRuntimeRequestTraceIdString": NONE,
        "InvokeCodeInterpreterRequestTraceIdString": NONE,
        "InvokeHarnessRequestRuntimeSessionIdString": NONE,
        "InvokeHarnessRequestTraceIdString": NONE,
        "JwtKeyId": NONE,
        "MemoryRecordId": NONE,
        "OAuthCredentialProviderArn": NONE,
        "OnlineEvaluationConfigArn": NONE,
        "PaymentConnectorId": NONE,
        "PaymentInstrumentId": NONE,
        "PaymentManagerArn": NONE,
        "PaymentSessionId": NONE,
        "RecommendationId": NONE,
        "RequestIdentifier": NONE,
        "RequestUri": NONE,
        "S3FilesAccessPointArn": NONE,
        "S3FilesFileSystemArn": NONE,
        "S3LocationVersionIdString": NONE,
        "SaveBrowserSessionProfileRequestTraceIdString": NONE,
        "SecretArn": NONE,
        "SessionType": NONE,
        "SpanId": NONE,
        "StartBrowserSessionRequestTraceIdString": NONE,
        "StartCodeInterpreterSessionRequestTraceIdString": NONE,
        "StopBrowserSessionRequestTraceIdString": NONE,
        "StringType": NONE,
        "TraceId": NONE,
        "MaxLenString": NONE,
    },
}
# Generic shapes (String and the like) classified per member name, per service.
_SERVICE_MEMBER_KINDS: dict[str, dict[str, str]] = {
    "bedrock-agentcore": {
        "agentRuntimeArn": AGENT_RUNTIME,
        "codeInterpreterIdentifier": CODE_INTERPRETER,
        "browserIdentifier": BROWSER,
        "actorId": NONE,
        "sessionId": NONE,
        "sessionIds": NONE,
        "spanId": NONE,
        "traceId": NONE,
        "traceIds": NONE,
        "strategyId": NONE,
        "testScenarioId": NONE,
        "logGroupArns": NONE,
        "runtimeUserId": NONE,
        "jobId": NONE,
    },
}

# Generic shapes (String and the like) classified per member name.
_MEMBER_KINDS: dict[str, str] = {
    "agentId": NONE,  # returnControlInvocationResults echo the agent being invoked
    "source": NONE,  # citation and search-result sources: free text
    "promptSessionAttributes": NONE,  # free text
    "userId": NONE,  # the end user's id, for the knowledge base's own filtering
    "invocationId": NONE,
    "additionalModelResponseFieldPaths": NONE,  # JSON pointers into the response
}


@dataclass(frozen=True, slots=True)
class Field:
    """One member that names a resource: where it is and what it names."""

    location: str  # "uri", "header", "querystring" or "body"
    name: str  # the label, header or query name; for the body, the dotted path
    kind: str

    @property
    def path(self) -> tuple[str, ...]:
        return tuple(self.name.split("."))


class Unclassified(Exception):
    """A member names something and the reviewed classification does not say what."""


def derive(loader: Any = None) -> dict[str, list[list[str]]]:
    """``{"service:Operation": [[location, name, kind], ...]}`` from the botocore models."""
    from botocore.loaders import create_loader

    loader = loader or create_loader()
    table: dict[str, list[list[str]]] = {}
    problems: list[str] = []
    for service in SERVICES:
        model = loader.load_service_model(service, "service-2")
        for op_name, op in sorted(model["operations"].items()):
            if "input" not in op:
                continue
            walker = _Walker(model["shapes"], op_name, service=service)
            walker.walk(op["input"]["shape"], (), None, frozenset({op["input"]["shape"]}))
            problems += walker.problems
            fields = sorted({tuple(f) for f in walker.found if f[2] != NONE})
            if fields:
                table[f"{service}:{op_name}"] = [list(f) for f in fields]
    if problems:
        raise Unclassified(
            "members that may name a resource are not classified in proxy/access/resources.py:\n  "
            + "\n  ".join(sorted(set(problems)))
        )
    return table


class _Walker:
    """Walks one operation's input shape; records classified members and problems."""

    def __init__(
        self, shapes: dict[str, Any], op_name: str, probing: bool = False, service: str = ""
    ) -> None:
        self.shapes = shapes
        self.op_name = op_name
        self.probing = probing
        self.service = service
        self.shape_kinds = {**SHAPE_KINDS, **_SERVICE_SHAPE_KINDS.get(service, {})}
        self.member_kinds = {**_MEMBER_KINDS, **_SERVICE_MEMBER_KINDS.get(service, {})}
        self.found: list[list[str]] = []
        self.problems: list[str] = []

    def walk(
        self,
        shape_name: str,
        path: tuple[str, ...],
        location: tuple[str, str] | None,
        seen: frozenset[str],
    ) -> None:
        shape = self.shapes[shape_name]
        kind = self.shape_kinds.get(shape_name)
        shape_type = shape["type"]
        if shape_type == "structure":
            if kind is not None:
                self.found.append(["body", ".".join(path), kind])
                return
            if shape.get("document"):
                return  # free-form JSON the model reads (additionalModelRequestFields)
            for member_name, member in shape.get("members", {}).items():
                target = member["shape"]
                loc = location
                if not path and member.get("location") in ("uri", "header", "querystring"):
                    loc = (member["location"], member.get("locationName", member_name))
                raw_payload = shape.get("payload") == member_name and self.shapes[target][
                    "type"
                ] in ("blob", "string")
                if raw_payload and not path:
                    continue  # a raw payload (InvokeModel's body): not ours to read
                self._step(target, (*path, member_name), loc, seen)
        elif shape_type == "list":
            self._step(shape["member"]["shape"], (*path, "[]"), location, seen)
        elif shape_type == "map":
            self._step(shape["value"]["shape"], (*path, "{}"), location, seen)
        elif shape_type == "string" and "enum" not in shape:
            # A list item or map value is named by the member that holds it.
            member = next((p for p in reversed(path) if p not in ("[]", "{}")), "")
            if kind is None:
                kind = self.member_kinds.get(member)
            if kind is None:
                if _SUSPECT.search(member) or _SUSPECT.search(shape_name):
                    self.problems.append(f"{self.op_name}: {'.'.join(path)} ({shape_name})")
                return
            if location is not None:
                self.found.append([location[0], location[1], kind])
            else:
                self.found.append(["body", ".".join(path), kind])

    def _step(
        self,
        target: str,
        path: tuple[str, ...],
        location: tuple[str, str] | None,
        seen: frozenset[str],
    ) -> None:
        if target not in seen:
            self.walk(target, path, location, seen | {target})
            return
        if self.probing:
            return
        # A recursive shape (retrieval filters nest): its members were all met on the first
        # pass, but a fixed path cannot reach them deeper. None names a resource today; the
        # day one does, the table must learn recursion first.
        probe = _Walker(self.shapes, self.op_name, probing=True, service=self.service)
        probe.walk(target, (), None, frozenset({target}))
        if any(f[2] != NONE for f in probe.found) or probe.problems:
            self.problems.append(
                f"{self.op_name}: {'.'.join(path)} recurses into {target}, which names resources"
            )


def load_table() -> dict[str, tuple[Field, ...]]:
    """The committed table: ``"service:Operation"`` -> its resource fields."""
    text = importlib_resources.files("proxy").joinpath("data/resource_fields.json").read_text()
    raw: dict[str, list[list[str]]] = json.loads(text)["operations"]
    return {key: tuple(Field(*entry) for entry in entries) for key, entries in raw.items()}


def render(table: dict[str, list[list[str]]]) -> str:
    import botocore

    document = {
        "_comment": (
            "Generated by `python -m proxy.access.resources --write` from botocore's service "
            "models and the classification in proxy/access/resources.py; reviewed. "
            "Do not edit by hand."
        ),
        "botocore": botocore.__version__,
        "operations": table,
    }
    return json.dumps(document, indent=1, sort_keys=True) + "\n"


def main(argv: list[str]) -> int:
    text = render(derive())
    if "--write" in argv:
        target = importlib_resources.files("proxy").joinpath("data/resource_fields.json")
        with open(str(target), "w") as fh:
            fh.write(text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
