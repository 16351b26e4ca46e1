"""HTTPS for the listener: current AWS SDKs send Bedrock API keys only over TLS.

One SSLContext lives for the whole process. Reloading loads the new certificate chain into
that same context, so new handshakes get the new certificate while connections already open
(and the streams on them) carry on untouched.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import ssl
from typing import Any

# TLS 1.2 suites with forward secrecy and AEAD only; TLS 1.3 suites are fixed by OpenSSL.
_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20:DHE+AESGCM:!aNULL:!eNULL:!MD5:!DSS:!SHA1"


class TLSConfigError(Exception):
    pass


def server_context(cert_file: str, key_file: str) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers(_CIPHERS)
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE
    # HTTP/2 by ALPN on the same listener (the AWS SDK for JavaScript asks only for h2).
    context.set_alpn_protocols(["h2", "http/1.1"])
    load_chain(context, cert_file, key_file)
    return context


def load_chain(context: ssl.SSLContext, cert_file: str, key_file: str) -> None:
    for label, path in (("tls_cert", cert_file), ("tls_key", key_file)):
        if not os.path.isfile(path):
            raise TLSConfigError(f"{label}: no such file {path}")
    try:
        context.load_cert_chain(cert_file, key_file)
    except (ssl.SSLError, OSError) as exc:
        reason = getattr(exc, "reason", None) or exc.strerror or str(exc)
        raise TLSConfigError(
            f"tls_cert/tls_key: cannot load {cert_file} with {key_file}: {reason}"
        ) from None


def write_self_signed(out_dir: str, days: int = 365) -> tuple[str, str]:
    """A certificate for localhost, 127.0.0.1 and ::1, for local use and tests."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    public_key = key.public_key()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(
            x509.SubjectAlternativeName(
                [
                    x509.DNSName("localhost"),
                    x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                    x509.IPAddress(ipaddress.ip_address("::1")),
                ]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(public_key), critical=False
        )
        .sign(key, hashes.SHA256())
    )
    return _write_pem(out_dir, cert, key)


def _write_pem(out_dir: str, cert: Any, key: Any) -> tuple[str, str]:
    """The certificate, and its key readable by the owner only."""
    from cryptography.hazmat.primitives import serialization

    os.makedirs(out_dir, exist_ok=True)
    cert_path = os.path.join(out_dir, "cert.pem")
    key_path = os.path.join(out_dir, "key.pem")
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
    with open(cert_path, "wb") as fh:
        fh.write(cert.public_bytes(serialization.Encoding.PEM))
    return cert_path, key_path
