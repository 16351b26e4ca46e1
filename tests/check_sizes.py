"""Small modules and short functions in ``proxy/server``: at most 350 lines a module and
60 lines a function. What is larger today is listed below with its size, and may only
shrink (a ratchet): a new large module or function, or a listed one that grows, fails
``make lint`` and ``make test``. Shrink an entry when you split it; delete it once it fits.

    .venv/bin/python tests/check_sizes.py
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SERVER = ROOT / "proxy" / "server"
MAX_MODULE, MAX_FUNCTION = 350, 60

# Today's exceptions (lines), to split: issue 32.
MODULES: dict[str, int] = {}
FUNCTIONS = {
    # A stream is relayed in its frame, not a coroutine of its own (one frame less each).
    "proxy/server/fronts/bedrock.py:forward": 75,
}


def problems() -> list[str]:
    found: list[str] = []
    for path in sorted(SERVER.rglob("*.py")):
        name = path.relative_to(ROOT).as_posix()
        text = path.read_text()
        lines = len(text.splitlines())
        allowed = MODULES.get(name, MAX_MODULE)
        if lines > allowed:
            found.append(f"{name}: {lines} lines (at most {allowed})")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                assert node.end_lineno is not None
                length = node.end_lineno - node.lineno + 1
                key = f"{name}:{node.name}"
                limit = FUNCTIONS.get(key, MAX_FUNCTION)
                if length > limit:
                    found.append(f"{key}: {length} lines (at most {limit})")
    return found


if __name__ == "__main__":
    issues = problems()
    for line in issues:
        print(line, file=sys.stderr)
    sys.exit(1 if issues else 0)
