"""The intake's X25519 key pair (REQ-ENCRYPT): the private key opens sealed probe images
(``schemas.sealed``); the public key is what upstream systems seal to."""

from __future__ import annotations

from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from services.kit.private_files import load_or_create_key


def load_or_create_private_key(path: Path) -> X25519PrivateKey:
    """Local mode: the intake's key pair lives in a 0600 file, created on first use; a
    key file others may read is refused, not used."""
    created = not path.exists()
    key = load_or_create_key(path, X25519PrivateKey, X25519PrivateKey.generate)
    public_path = path.with_suffix(".pub.pem")
    if created or not public_path.exists():
        public_path.write_bytes(key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    return key
