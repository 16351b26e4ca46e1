"""curl, as virtual-key holders call the proxy from a shell."""

from __future__ import annotations

import subprocess


def curl(url: str, *args: str, data: str | None = None) -> tuple[int, dict[str, str], bytes]:
    """curl, as virtual-key holders call the proxy; returns status, headers, body."""
    cmd = ["curl", "-sS", "-D", "-", "--max-time", "20", url, *args]
    if data is not None:
        cmd += ["-H", "Content-Type: application/json", "--data-binary", data]
    out = subprocess.run(cmd, capture_output=True, check=True, timeout=30).stdout
    head, _, body = out.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return status, headers, body
