"""The sealed image of a ProbeRequested (``EncryptedImage``): hybrid encryption to the
intake's X25519 key (REQ-ENCRYPT). Part of the contract: both ends use this module, the
upstream client (``frs submit``, any publisher) to seal and the intake to open.

Sender: ephemeral X25519 key agreement with the intake's public key, HKDF-SHA256 to a
256-bit key, AES-256-GCM with the request id as associated data, so a ciphertext cannot
be replayed under another request. Only the intake holds the private key."""

from __future__ import annotations

import base64
import hashlib
import os
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from schemas.events import EncryptedImage

_INFO = b"frs-broker probe image v1"


class DecryptError(Exception):
    """The payload could not be decrypted; carries no detail about its content."""


def key_id(public: X25519PublicKey) -> str:
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def _kdf(shared: bytes, eph: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=eph, info=_INFO).derive(shared)


def encrypt_image(image: bytes, recipient: X25519PublicKey, request_id: str) -> EncryptedImage:
    ephemeral = X25519PrivateKey.generate()
    eph_raw = ephemeral.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )
    key = _kdf(ephemeral.exchange(recipient), eph_raw)
    nonce = os.urandom(12)
    ciphertext = AESGCM(key).encrypt(nonce, image, request_id.encode())
    return EncryptedImage(
        key_id=key_id(recipient),
        ephemeral_public_key=base64.b64encode(eph_raw).decode(),
        nonce=base64.b64encode(nonce).decode(),
        ciphertext=base64.b64encode(ciphertext).decode(),
    )


def decrypt_image(blob: EncryptedImage, private: X25519PrivateKey, request_id: str) -> bytes:
    try:
        eph_raw = base64.b64decode(blob.ephemeral_public_key, validate=True)
        nonce = base64.b64decode(blob.nonce, validate=True)
        ciphertext = base64.b64decode(blob.ciphertext, validate=True)
        shared = private.exchange(X25519PublicKey.from_public_bytes(eph_raw))
        return AESGCM(_kdf(shared, eph_raw)).decrypt(nonce, ciphertext, request_id.encode())
    except (InvalidTag, ValueError, TypeError):
        raise DecryptError("probe image could not be decrypted") from None


def load_public_key(path: Path) -> X25519PublicKey:
    key = serialization.load_pem_public_key(path.read_bytes())
    if not isinstance(key, X25519PublicKey):
        raise ValueError(f"{path} does not hold an X25519 public key")
    return key
