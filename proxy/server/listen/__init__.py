"""The listeners: HTTP/1.1 and HTTP/2 on one port, TLS, dispatch by path prefix, and
errors put on the wire."""
