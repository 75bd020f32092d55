"""Throw-away PKI for the simulators, made with ``cryptography`` at start: a CA, a server
certificate for 127.0.0.1/localhost, client certificates, and S/MIME recipient identities."""

from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from services.kit.private_files import write_private

_PEM = serialization.Encoding.PEM


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _key_pem(key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey) -> bytes:
    return key.private_bytes(_PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


@dataclass(frozen=True)
class Issued:
    cert_pem: bytes
    key_pem: bytes

    def write(self, directory: Path, stem: str) -> tuple[Path, Path]:
        directory.mkdir(parents=True, exist_ok=True)
        cert, key = directory / f"{stem}.crt", directory / f"{stem}.key"
        cert.write_bytes(self.cert_pem)
        write_private(key, self.key_pem)
        return cert, key


class SimulatorCA:
    def __init__(self, name: str = "frs simulator CA") -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(dt.UTC)
        self.cert = (
            x509.CertificateBuilder().subject_name(_name(name)).issuer_name(_name(name))
            .public_key(self.key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=2))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False,
                                         False), critical=True)
            .sign(self.key, hashes.SHA256())
        )

    @property
    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(_PEM)

    def _issue(self, cn: str, key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey,
               usage: list[x509.ObjectIdentifier], san: list[x509.GeneralName]) -> Issued:
        now = dt.datetime.now(dt.UTC)
        builder = (
            x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(self.cert.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage(usage), critical=False)
        )
        if san:
            builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
        cert = builder.sign(self.key, hashes.SHA256())
        return Issued(cert.public_bytes(_PEM), _key_pem(key))

    def server(self, cn: str = "127.0.0.1") -> Issued:
        return self._issue(cn, ec.generate_private_key(ec.SECP256R1()),
                           [ExtendedKeyUsageOID.SERVER_AUTH],
                           [x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                            x509.DNSName("localhost")])

    def client(self, cn: str = "frs-dispatch") -> Issued:
        return self._issue(cn, ec.generate_private_key(ec.SECP256R1()),
                           [ExtendedKeyUsageOID.CLIENT_AUTH], [])

    def smime(self, mailbox: str) -> Issued:
        """An RSA recipient identity (CMS key transport needs RSA)."""
        return self._issue(mailbox, rsa.generate_private_key(65537, 2048),
                           [ExtendedKeyUsageOID.EMAIL_PROTECTION], [x509.RFC822Name(mailbox)])
