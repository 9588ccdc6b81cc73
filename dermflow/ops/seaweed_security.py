"""The embedded SeaweedFS's `security.toml`: JWT keys and gRPC certificates made at each start.

With it the volume server serves nothing without a JWT that only the master (over gRPC) hands
out, and the gRPC ports accept only clients with a certificate of the CA made here. Everything
is written owner-only into the server's working directory, where SeaweedFS reads it.
"""

from __future__ import annotations

import os
from pathlib import Path


SEAWEED_SECURITY_TOML = """# Written by dermflow at each start of SeaweedFS; fresh random keys each time.
# Volume server: every read and write needs a JWT that only the master (over gRPC) hands out.
[jwt.signing]
key = "{write}"
expires_after_seconds = 10
[jwt.signing.read]
key = "{read}"
expires_after_seconds = 10
# Filer: HTTP is off (-filer.disableHttp); these keys also gate its IAM gRPC service.
[jwt.filer_signing]
key = "{filer_write}"
expires_after_seconds = 10
[jwt.filer_signing.read]
key = "{filer_read}"
expires_after_seconds = 10
[access]
ui = false
[filer.expose_directory_metadata]
enabled = false
# gRPC (master, volume, filer, S3 talk to each other on the +10000 ports): mutual TLS with a
# certificate of a CA made for this start, so an outside gRPC client (`weed shell`, say) can
# neither list nor delete.
[grpc]
ca = "{ca}"
[grpc.volume]
cert = "{cert}"
key = "{key}"
[grpc.master]
cert = "{cert}"
key = "{key}"
[grpc.filer]
cert = "{cert}"
key = "{key}"
[grpc.s3]
cert = "{cert}"
key = "{key}"
[grpc.client]
cert = "{cert}"
key = "{key}"
"""


def write_grpc_certificates(directory: Path) -> dict[str, Path]:
    """A throwaway CA and one certificate it signs (server and client use), owner-only files."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.timezone.utc)

    def certificate(name: str, key, issuer_name, issuer_key, ca: bool):
        builder = (x509.CertificateBuilder()
                   .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
                   .issuer_name(issuer_name).public_key(key.public_key())
                   .serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(minutes=5))
                   .not_valid_after(now + datetime.timedelta(days=3650))
                   .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if not ca:
            import ipaddress

            builder = (builder
                       .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                                             ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
                       .add_extension(x509.SubjectAlternativeName([
                           x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False))
        return builder.sign(issuer_key, hashes.SHA256())

    ca_key, leaf_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "dermflow-seaweedfs-ca")])
    ca_cert = certificate("dermflow-seaweedfs-ca", ca_key, ca_name, ca_key, ca=True)
    leaf_cert = certificate("dermflow-seaweedfs", leaf_key, ca_name, ca_key, ca=False)
    pem = serialization.Encoding.PEM
    files = {
        "ca": (directory / "ca.pem", ca_cert.public_bytes(pem)),
        "cert": (directory / "seaweedfs.pem", leaf_cert.public_bytes(pem)),
        "key": (directory / "seaweedfs.key", leaf_key.private_bytes(
            pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())),
    }
    for path, data in files.values():
        _write_private(path, data)
    return {name: path for name, (path, _) in files.items()}


def _write_private(path: Path, data: bytes) -> None:
    """Write `data` to a new owner-only file (an old one is replaced)."""
    path.unlink(missing_ok=True)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "wb") as handle:
        handle.write(data)


def write_security_config(directory: Path) -> Path:
    """A `security.toml` in `directory` (made owner-only) with fresh random JWT keys and gRPC
    certificates (all of SeaweedFS runs in one process, started right after, so they need not
    outlive it). Returns its path."""
    import secrets

    directory.mkdir(parents=True, exist_ok=True)
    directory.chmod(0o700)
    path = directory / "security.toml"
    certificates = write_grpc_certificates(directory)
    _write_private(path, SEAWEED_SECURITY_TOML.format(
        **{name: secrets.token_hex(32) for name in ("write", "read", "filer_write", "filer_read")},
        **{name: str(file) for name, file in certificates.items()}).encode())
    return path
