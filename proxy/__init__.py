"""bedrock-proxy: a streaming, re-signing gateway in front of AWS Bedrock."""

__version__ = "0.1.0"
