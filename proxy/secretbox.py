"""Encryption at rest for the virtual keys' SigV4 secrets.

A SigV4 verifier needs the plaintext secret, so unlike bearer tokens it cannot be stored as
a hash. It is stored AES-256-GCM encrypted under a key derived (HKDF-SHA256) from the
server's ``secret_key``. Each ciphertext names the key that sealed it, so the server secret
can be rotated: put the new one in ``secret_key`` and the old one in
``previous_secret_keys``; old ciphertexts still open, and the store re-seals them under the
new key at startup. Clients keep their secrets throughout.
"""

from __future__ import annotations

import base64
import hashlib
import os

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

_VERSION = "v1"


class SecretBoxError(Exception):
    """A ciphertext cannot be opened with any configured key."""


def _derive(secret: str) -> tuple[str, AESGCM]:
    key = HKDF(
        algorithm=hashes.SHA256(), length=32, salt=b"bedrock-proxy/secretbox", info=b"sigv4-secret"
    ).derive(secret.encode())
    key_id = hashlib.sha256(b"key-id:" + key).hexdigest()[:12]
    return key_id, AESGCM(key)


class SecretBox:
    def __init__(self, secret: str, previous: list[str] | None = None) -> None:
        self.key_id, self._current = _derive(secret)
        self._keys = {self.key_id: self._current}
        for old in previous or []:
            key_id, aead = _derive(old)
            self._keys.setdefault(key_id, aead)

    def seal(self, plaintext: str) -> str:
        nonce = os.urandom(12)
        sealed = self._current.encrypt(nonce, plaintext.encode(), self.key_id.encode())
        return f"{_VERSION}:{self.key_id}:{base64.b64encode(nonce + sealed).decode()}"

    def open(self, token: str) -> str:
        try:
            version, key_id, data = token.split(":", 2)
        except ValueError:
            raise SecretBoxError("malformed ciphertext") from None
        aead = self._keys.get(key_id)
        if version != _VERSION or aead is None:
            raise SecretBoxError(f"no configured secret_key opens key {key_id}")
        raw = base64.b64decode(data)
        try:
            return aead.decrypt(raw[:12], raw[12:], key_id.encode()).decode()
        except InvalidTag:
            raise SecretBoxError("ciphertext does not authenticate") from None

    def needs_reseal(self, token: str) -> bool:
        return token.split(":", 2)[1:2] != [self.key_id]
