"""The policy gate's signing key: Ed25519, made on first start with mode 0600
(services/kit/private_files.py), its public part written beside it (``.pub.pem``) for the
operator to enroll (``frs registry trust-key``). The gate never enrolls its own key: a
compromised intake must not be able to make its signatures trusted."""

from __future__ import annotations

from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from services.kit.private_files import read_private, write_private


def public_key_path(private_path: Path) -> Path:
    """Where the public part lives: policy-decisions.pem -> policy-decisions.pub.pem."""
    return private_path.with_suffix(".pub.pem")


def load_or_create_signing_key(path: Path) -> Ed25519PrivateKey:
    """The key in ``path`` (refused if others may read it), or a new one written 0600."""
    if path.exists():
        key = serialization.load_pem_private_key(read_private(path), password=None)
        if not isinstance(key, Ed25519PrivateKey):
            raise ValueError(f"{path} does not hold an Ed25519 private key")
    else:
        key = Ed25519PrivateKey.generate()
        try:
            write_private(path, key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption()), exclusive=True)
        except FileExistsError:  # another process made it first: that one is the key
            return load_or_create_signing_key(path)
    public = public_key_path(path)
    if not public.exists():
        public.write_bytes(key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    return key


def load_public_key(path: Path) -> Ed25519PublicKey:
    """A public key file (PEM SubjectPublicKeyInfo) as ``frs registry trust-key`` reads it."""
    key = serialization.load_pem_public_key(path.read_bytes())
    if not isinstance(key, Ed25519PublicKey):
        raise ValueError(f"{path} does not hold an Ed25519 public key")
    return key
