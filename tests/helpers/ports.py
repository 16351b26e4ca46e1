"""Ports for the processes a test starts."""

from __future__ import annotations

import secrets
import socket


def free_port() -> int:
    """A port for a process started next, free now. Chosen below the ephemeral range
    (32768-60999 on Linux): a port the kernel hands out for any outgoing connection, to
    this suite or one running beside it, was taken between this check and the child's
    bind ("address already in use"). Random, so two suites rarely pick the same."""
    for _ in range(200):
        port = secrets.randbelow(32768 - 20000) + 20000
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise AssertionError("no free port between 20000 and 32767")
