"""The intake's X25519 key pair (REQ-ENCRYPT): the private key opens sealed probe images
(``schemas.sealed``); the public key is what upstream systems seal to."""

from __future__ import annotations

from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from services.kit.private_files import read_private, write_private


def load_or_create_private_key(path: Path) -> X25519PrivateKey:
    """Local mode: the intake's key pair lives in a 0600 file, created on first use; a
    key file others may read is refused, not used."""
    if path.exists():
        key = serialization.load_pem_private_key(read_private(path), password=None)
        if not isinstance(key, X25519PrivateKey):
            raise ValueError(f"{path} does not hold an X25519 private key")
        return key
    key = X25519PrivateKey.generate()
    write_private(path, key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ), exclusive=True)
    public_path = path.with_suffix(".pub.pem")
    public_path.write_bytes(key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ))
    return key
