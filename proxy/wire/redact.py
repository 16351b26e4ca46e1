"""What an upstream error must not tell a client: the server's own AWS principal.

AWS names the caller in an access-denied message ("User: arn:aws:sts::123456789012:
assumed-role/BedrockProxy/session is not authorized to perform: bedrock:InvokeModel on
resource: ..."). Relayed as it is, that tells any key holder the server's account id,
role name and session name. The principal's ARN is replaced in the bytes (the rest of
the body, the action and the resource, stays as AWS wrote it); nothing is re-serialised.
"""

from __future__ import annotations

import re

# An IAM or STS principal: a user, a role, an assumed-role session, a federated user, the
# root; in any partition (aws, aws-cn, aws-us-gov).
_PRINCIPAL = re.compile(
    rb"arn:aws[a-z-]*:(?:sts|iam)::\d{12}:"
    rb"(?:assumed-role|role|user|federated-user|root)[^\s\"'<>,;]*"
)
PLACEHOLDER = b"(the proxy's AWS principal)"


def redact_principals(body: bytes) -> bytes:
    """``body`` with every IAM or STS principal ARN replaced by ``PLACEHOLDER``."""
    if body.find(b"arn:aws") < 0:  # (``in`` formats a TypeError first: see access.compat)
        return body
    return _PRINCIPAL.sub(PLACEHOLDER, body)
