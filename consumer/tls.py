"""TLS client contexts from configured files (a CA bundle, a client certificate and key), each fault named."""

from __future__ import annotations

import ssl
from pathlib import Path


class TlsFileError(Exception):
    """A configured TLS file is missing, unreadable or not what it should be; `field` names the setting."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field
        self.message = message


def read_file(path: Path, field: str) -> bytes:
    """The file's bytes, or TlsFileError saying why it cannot be read (never its content)."""
    if not path.exists():
        raise TlsFileError(field, f"no such file: {str(path)!r}")
    if not path.is_file():
        raise TlsFileError(field, f"not a regular file: {str(path)!r}")
    try:
        return path.read_bytes()
    except OSError as exc:
        raise TlsFileError(field, f"cannot read {str(path)!r}: {exc.strerror}") from None


def _has_certificate(pem: bytes) -> bool:
    return b"-----BEGIN CERTIFICATE-----" in pem or b"-----BEGIN TRUSTED CERTIFICATE-----" in pem


def _has_key(pem: bytes) -> bool:
    return b"PRIVATE KEY-----" in pem


def _is_encrypted(pem: bytes) -> bool:
    # PKCS#8 ("BEGIN ENCRYPTED PRIVATE KEY") or the traditional OpenSSL form ("Proc-Type: 4,ENCRYPTED").
    return b"-----BEGIN ENCRYPTED PRIVATE KEY-----" in pem or b"Proc-Type: 4,ENCRYPTED" in pem


def client_context(
    ca_bundle: Path | None = None,
    client_cert: Path | None = None,
    client_key: Path | None = None,
    client_key_password: str | None = None,
) -> ssl.SSLContext:
    """A verifying client context: `ca_bundle` (if set) is trusted instead of the system's CAs.

    `client_key` may be left out when the key is in `client_cert`'s file. Raises TlsFileError
    whose field is "ca_bundle", "client_cert", "client_key" or "client_key_password".
    """
    if ca_bundle is None:
        ctx = ssl.create_default_context()
    else:
        if not _has_certificate(read_file(ca_bundle, "ca_bundle")):
            raise TlsFileError("ca_bundle", f"{str(ca_bundle)!r} holds no PEM certificate")
        try:
            # Given a cafile, the default context trusts only it: the system's CAs are not loaded.
            ctx = ssl.create_default_context(cafile=str(ca_bundle))
        except ssl.SSLError as exc:
            raise TlsFileError("ca_bundle", f"{str(ca_bundle)!r} is not a usable CA bundle ({exc.reason})") from None
    if client_key is not None and client_cert is None:
        raise TlsFileError("client_key", "is set without client_cert")
    if client_key_password is not None and client_cert is None:
        raise TlsFileError("client_key_password", "is set without client_cert")
    if client_cert is not None:
        cert_pem = read_file(client_cert, "client_cert")
        if not _has_certificate(cert_pem):
            raise TlsFileError("client_cert", f"{str(client_cert)!r} holds no PEM certificate")
        key_field = "client_key" if client_key is not None else "client_cert"
        key_pem = read_file(client_key, "client_key") if client_key is not None else cert_pem
        key_path = client_key or client_cert
        if not _has_key(key_pem):
            raise TlsFileError(key_field, f"{str(key_path)!r} holds no PEM private key")
        encrypted = _is_encrypted(key_pem)
        if encrypted and not client_key_password:
            raise TlsFileError("client_key_password", f"is required: the key in {str(key_path)!r} is encrypted")
        try:
            # A password (even empty) is always passed: without one OpenSSL would prompt on the terminal.
            ctx.load_cert_chain(str(client_cert), None if client_key is None else str(client_key),
                                password=client_key_password or "")
        except ssl.SSLError as exc:
            if exc.reason == "KEY_VALUES_MISMATCH":
                raise TlsFileError(key_field, f"the key in {str(key_path)!r} does not match client_cert") from None
            if encrypted:
                raise TlsFileError("client_key_password", f"does not decrypt the key in {str(key_path)!r}") from None
            raise TlsFileError(key_field, f"cannot load the certificate and key ({exc.reason or 'PEM'})") from None
    return ctx
