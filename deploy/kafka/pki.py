"""Local PKI and SCRAM secrets for the secured broker (local use and tests only).

    python deploy/kafka/pki.py STATE_DIR --acls services/kit/acls.json

Creates, once (existing files are kept, so a rerun changes nothing):
  STATE_DIR/pki/ca.pem, ca.key              a local CA (EC P-256, 1 year)
  STATE_DIR/pki/<name>.pem, <name>.key      a certificate per principal, CN=<name>;
                                            the broker's has SAN 127.0.0.1 and localhost
  STATE_DIR/pki/<name>.keystore.pem         key + chain in one file (Kafka PEM keystore)
  STATE_DIR/secrets/<name>.password         random SCRAM password per SASL principal
Principals: broker, admin (certificate only) and every principal in the ACL file.
Private keys and passwords are 0600 in 0700 directories, never printed.
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import json
import os
import secrets
import sys
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CERT_ONLY = ("broker", "admin")
VALID = dt.timedelta(days=365)


def _write_private(path: Path, data: bytes) -> None:
    # Created 0600 from the start: never world-readable, not even briefly.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    # PKCS#8: the only private key encoding Kafka's PEM keystore reads.
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "frs-broker local"),
                      x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _ca(pki: Path) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key_file, cert_file = pki / "ca.key", pki / "ca.pem"
    if key_file.exists() and cert_file.exists():
        key = serialization.load_pem_private_key(key_file.read_bytes(), None)
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        return key, x509.load_pem_x509_certificate(cert_file.read_bytes())
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name("frs-broker local CA")).issuer_name(_name("frs-broker local CA"))
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + VALID)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False),
                       critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                       critical=False)
        .sign(key, hashes.SHA256())
    )
    _write_private(key_file, _key_pem(key))
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return key, cert


def _leaf(pki: Path, name: str, ca_key: ec.EllipticCurvePrivateKey,
          ca_cert: x509.Certificate) -> None:
    key_file, cert_file = pki / f"{name}.key", pki / f"{name}.pem"
    if key_file.exists() and cert_file.exists():
        return
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    # The broker is a server on every listener and a client of its own controller.
    usages = [ExtendedKeyUsageOID.CLIENT_AUTH]
    if name == "broker":
        usages.append(ExtendedKeyUsageOID.SERVER_AUTH)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(name)).issuer_name(ca_cert.subject)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + VALID)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(True, False, False, False, True, False, False, False, False),
                       critical=True)
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                       critical=False)
    )
    if name == "broker":
        builder = builder.add_extension(x509.SubjectAlternativeName([
            x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost"),
        ]), critical=False)
    cert = builder.sign(ca_key, hashes.SHA256())
    cert_pem = cert.public_bytes(serialization.Encoding.PEM)
    ca_pem = ca_cert.public_bytes(serialization.Encoding.PEM)
    _write_private(key_file, _key_pem(key))
    cert_file.write_bytes(cert_pem + ca_pem)
    _write_private(pki / f"{name}.keystore.pem", _key_pem(key) + cert_pem + ca_pem)


def principals(acls_file: Path) -> tuple[list[str], list[str]]:
    """(certificate-only principals, SASL principals) named by the ACL file."""
    doc = json.loads(acls_file.read_text())
    supers = list(doc.get("super_users", CERT_ONLY))
    return supers, [p for p in doc["principals"] if p not in supers]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("state", type=Path, help="state dir (pki/ and secrets/ go there)")
    parser.add_argument("--acls", type=Path, required=True, help="the ACL file (acls.json)")
    args = parser.parse_args(argv)
    cert_only, sasl = principals(args.acls)
    pki, secret_dir = args.state / "pki", args.state / "secrets"
    for d in (args.state, pki, secret_dir):
        d.mkdir(mode=0o700, parents=True, exist_ok=True)
        d.chmod(0o700)
    ca_key, ca_cert = _ca(pki)
    for name in [*cert_only, *sasl]:
        _leaf(pki, name, ca_key, ca_cert)
    for name in sasl:
        password = secret_dir / f"{name}.password"
        if not password.exists():
            _write_private(password, secrets.token_urlsafe(32).encode())
    sys.stdout.write(f"pki: CA and {len(cert_only) + len(sasl)} certificates in {pki}, "
                     f"{len(sasl)} SCRAM passwords in {secret_dir}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
