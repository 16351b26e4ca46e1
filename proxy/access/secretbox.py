"""Encryption at rest for the virtual keys' SigV4 secrets.

A SigV4 verifier needs the plaintext secret, so unlike bearer tokens it cannot be stored as
a hash. It is stored AES-256-GCM encrypted under a key derived from the server's
``secret_key`` (or the master key) with scrypt, a memory-hard KDF: a copied database is
no shortcut to guessing a weak secret, every guess costs scrypt's time and memory. Each
ciphertext carries the random salt its key was derived with, and nothing else about the
key: no fingerprint to test guesses against.

The server secret can be rotated: put the new one in ``secret_key`` and the old one in
``previous_secret_keys``; old ciphertexts still open (each configured secret is tried, and
AES-GCM's tag says which one fits), and the store re-seals them under the new secret at
startup. Ciphertexts of the first format (``v1``: HKDF, with a key fingerprint) still open
and are re-sealed the same way. Clients keep their secrets throughout.
"""

from __future__ import annotations

import base64
import os

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

_VERSION = "v2"
# scrypt's cost: 2**15 x 8 x 128 bytes = 32 MiB and ~0.1 s per derivation (OWASP's floor
# for scrypt is N=2**17 with r=8 and p=1 for passwords; these secrets are machine-made and
# long, so the point is a floor under a weak one, paid once per salt per process).
_SCRYPT_N = 2**15
_SCRYPT_R = 8
_SCRYPT_P = 1
_AAD = b"bedrock-proxy/secretbox/v2"


class SecretBoxError(Exception):
    """A ciphertext cannot be opened with any configured key."""


def _scrypt(secret: str, salt: bytes) -> AESGCM:
    key = Scrypt(salt=salt, length=32, n=_SCRYPT_N, r=_SCRYPT_R, p=_SCRYPT_P).derive(
        secret.encode()
    )
    return AESGCM(key)


def _hkdf_v1(secret: str) -> AESGCM:
    key = HKDF(
        algorithm=hashes.SHA256(), length=32, salt=b"bedrock-proxy/secretbox", info=b"sigv4-secret"
    ).derive(secret.encode())
    return AESGCM(key)


class TransientBox:
    """Short-lived values the server hands a browser or a CLI and reads back (single
    sign-on's pending cookie, a login's code): AES-256-GCM under keys derived from the
    server's secrets with HKDF, once per process. Not scrypt, as ``SecretBox`` is: anyone
    may send such a value back, and a forged one must cost a failed tag check, not 0.1 s of
    the event loop and a derived key kept for its salt (ten forged sign-in cookies took
    0.84 s and grew the key cache by ten)."""

    _PREFIX = "t1:"

    def __init__(self, secrets: list[str]) -> None:
        self._keys = [
            AESGCM(
                HKDF(
                    algorithm=hashes.SHA256(),
                    length=32,
                    salt=b"bedrock-proxy/transient",
                    info=b"transient-v1",
                ).derive(secret.encode())
            )
            for secret in secrets
        ]

    def seal(self, plaintext: str) -> str:
        nonce = os.urandom(12)
        sealed = self._keys[0].encrypt(nonce, plaintext.encode(), _AAD)
        return self._PREFIX + base64.urlsafe_b64encode(nonce + sealed).decode()

    def open(self, token: str) -> str:
        if not token.startswith(self._PREFIX) or len(token) > 64 * 1024:
            raise SecretBoxError("malformed sealed value")
        try:
            raw = base64.urlsafe_b64decode(token[len(self._PREFIX) :])
        except ValueError:
            raise SecretBoxError("malformed sealed value") from None
        for key in self._keys:  # the current secret, then the previous ones
            try:
                return key.decrypt(raw[:12], raw[12:], _AAD).decode()
            except (InvalidTag, ValueError):
                continue
        raise SecretBoxError("no configured secret_key opens this value")


class SecretBox:
    def __init__(self, secret: str, previous: list[str] | None = None) -> None:
        self._secrets = [secret, *[p for p in previous or [] if p != secret]]
        self._salt = os.urandom(16)
        self._current = _scrypt(secret, self._salt)
        # (secret index, salt) -> key: each salt in the store is derived once per process.
        self._derived: dict[tuple[int, bytes], AESGCM] = {(0, self._salt): self._current}

    def transient(self) -> TransientBox:
        """A box for short-lived values clients send back (``TransientBox``)."""
        return TransientBox(self._secrets)

    def seal(self, plaintext: str) -> str:
        nonce = os.urandom(12)
        sealed = self._current.encrypt(nonce, plaintext.encode(), _AAD)
        salt = base64.b64encode(self._salt).decode()
        return f"{_VERSION}:{salt}:{base64.b64encode(nonce + sealed).decode()}"

    def open(self, token: str) -> str:
        return self._open(token)[0]

    def needs_reseal(self, token: str) -> bool:
        """True when the current secret did not seal it (an old secret or format)."""
        return self._open(token)[1] != 0 or not token.startswith(_VERSION + ":")

    def _open(self, token: str) -> tuple[str, int]:
        """The plaintext and the index of the secret that opened it."""
        try:
            version, salt_or_id, data = token.split(":", 2)
            raw = base64.b64decode(data, validate=True)
        except ValueError:
            raise SecretBoxError("malformed ciphertext") from None
        if version == "v1":
            for index, secret in enumerate(self._secrets):
                try:
                    return _hkdf_v1(secret).decrypt(
                        raw[:12], raw[12:], salt_or_id.encode()
                    ).decode(), index
                except InvalidTag:
                    continue
            raise SecretBoxError("no configured secret_key opens this ciphertext")
        if version != _VERSION:
            raise SecretBoxError(f"unknown ciphertext version {version!r}")
        try:
            salt = base64.b64decode(salt_or_id, validate=True)
        except ValueError:
            raise SecretBoxError("malformed ciphertext") from None
        for index, secret in enumerate(self._secrets):
            aead = self._derived.get((index, salt))
            if aead is None:
                aead = self._derived[(index, salt)] = _scrypt(secret, salt)
            try:
                return aead.decrypt(raw[:12], raw[12:], _AAD).decode(), index
            except InvalidTag:
                continue
        raise SecretBoxError("no configured secret_key opens this ciphertext")
