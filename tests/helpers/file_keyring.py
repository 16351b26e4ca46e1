"""A keyring backend for tests, chosen with ``PYTHON_KEYRING_BACKEND`` (as a user would
choose theirs): the keyring package's own API over a JSON file at
``BEDROCK_PROXY_TEST_KEYRING``, standing in for an OS keyring this machine has none of."""

from __future__ import annotations

import json
import os
from pathlib import Path

from keyring.backend import KeyringBackend


class FileKeyring(KeyringBackend):
    priority = 1  # type: ignore[assignment]

    @property
    def _path(self) -> Path:
        return Path(os.environ["BEDROCK_PROXY_TEST_KEYRING"])

    def _all(self) -> dict[str, str]:
        return json.loads(self._path.read_text()) if self._path.exists() else {}

    def get_password(self, service: str, username: str) -> str | None:
        return self._all().get(f"{service}/{username}")

    def set_password(self, service: str, username: str, password: str) -> None:
        stored = self._all()
        stored[f"{service}/{username}"] = password
        self._path.write_text(json.dumps(stored))

    def delete_password(self, service: str, username: str) -> None:
        stored = self._all()
        stored.pop(f"{service}/{username}", None)
        self._path.write_text(json.dumps(stored))
