"""A throw-away PKI for TLS tests, made with the `openssl` CLI: a CA, a loopback server certificate, a client one."""

from __future__ import annotations

import ssl
import subprocess
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Pki:
    ca: Path  # the CA certificate: what a client is told to trust (a ca_bundle)
    server_cert: Path  # for 127.0.0.1 and localhost, signed by the CA
    server_key: Path
    client_cert: Path  # a client certificate (extendedKeyUsage clientAuth), signed by the CA
    client_key: Path
    client_key_encrypted: Path  # the same key under a passphrase
    passphrase: str
    other_ca: Path  # a second CA that signed nothing here: trusting it alone must fail verification

    def server_context(self, *, require_client_cert: bool = False) -> ssl.SSLContext:
        """A server-side context with the loopback certificate; optionally demanding a CA-signed client cert."""
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(self.server_cert, self.server_key)
        if require_client_cert:
            ctx.load_verify_locations(cafile=self.ca)
            ctx.verify_mode = ssl.CERT_REQUIRED
        return ctx


def _openssl(*args: str | Path, cwd: Path) -> None:
    subprocess.run(["openssl", *map(str, args)], cwd=cwd, check=True, capture_output=True, timeout=60)


def _ca(directory: Path, name: str) -> tuple[Path, Path]:
    key, cert = directory / f"{name}.key", directory / f"{name}.pem"
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
             "-keyout", key, "-out", cert, "-days", "2", "-subj", f"/CN=offline-conversions {name}",
             "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign",
             cwd=directory)
    return cert, key


def _leaf(directory: Path, name: str, ca: tuple[Path, Path], extensions: str) -> tuple[Path, Path]:
    key, csr, cert, ext = (directory / f"{name}{s}" for s in (".key", ".csr", ".pem", ".ext"))
    ext.write_text(extensions + "subjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid\n")
    _openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-keyout", key,
             "-out", csr, "-subj", f"/CN={name}", cwd=directory)
    _openssl("x509", "-req", "-in", csr, "-CA", ca[0], "-CAkey", ca[1], "-CAcreateserial", "-out", cert,
             "-days", "2", "-extfile", ext, cwd=directory)
    return cert, key


def make_pki(directory: Path) -> Pki:
    """Everything under `directory` (a tmp_path): takes well under a second (EC P-256 keys)."""
    directory.mkdir(parents=True, exist_ok=True)
    ca = _ca(directory, "ca")
    other_ca, _ = _ca(directory, "other-ca")
    server = _leaf(directory, "server", ca, "subjectAltName=IP:127.0.0.1,DNS:localhost\n"
                   "extendedKeyUsage=serverAuth\nkeyUsage=critical,digitalSignature\n")
    client = _leaf(directory, "client", ca, "extendedKeyUsage=clientAuth\nkeyUsage=critical,digitalSignature\n")
    passphrase = "pki-passphrase-7"
    encrypted = directory / "client-encrypted.key"
    _openssl("pkey", "-in", client[1], "-out", encrypted, "-aes256", "-passout", f"pass:{passphrase}", cwd=directory)
    return Pki(ca[0], server[0], server[1], client[0], client[1], encrypted, passphrase, other_ca)
