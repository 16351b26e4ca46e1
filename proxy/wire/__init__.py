"""Bytes and protocols: SigV4, event streams, the HTTP/1.1 client, headers, routing from the
service models, endpoints, model ids, AWS-shaped errors, the clock. Imports nothing of ours."""
