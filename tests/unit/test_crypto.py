"""Probe images are encrypted to the intake's key and bound to their request id."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from schemas.sealed import DecryptError, decrypt_image, encrypt_image, load_public_key
from services.intake.crypto import load_or_create_private_key


def test_round_trip_and_binding() -> None:
    key = X25519PrivateKey.generate()
    blob = encrypt_image(b"\xff\xd8 image bytes", key.public_key(), "req-1")
    assert b"image bytes" not in base64.b64decode(blob.ciphertext)
    assert decrypt_image(blob, key, "req-1") == b"\xff\xd8 image bytes"
    with pytest.raises(DecryptError):  # replayed under another request id
        decrypt_image(blob, key, "req-2")
    with pytest.raises(DecryptError):  # someone else's key
        decrypt_image(blob, X25519PrivateKey.generate(), "req-1")
    tampered = blob.model_copy(update={"ciphertext": base64.b64encode(
        b"x" + base64.b64decode(blob.ciphertext)[1:]).decode()})
    with pytest.raises(DecryptError):
        decrypt_image(tampered, key, "req-1")
    with pytest.raises(DecryptError):
        decrypt_image(blob.model_copy(update={"nonce": "!!"}), key, "req-1")


def test_key_file_is_private_and_reused(tmp_path: Path) -> None:
    path = tmp_path / "keys" / "intake.key.pem"
    key = load_or_create_private_key(path)
    assert path.stat().st_mode & 0o777 == 0o600
    again = load_or_create_private_key(path)
    public = load_public_key(path.with_suffix(".pub.pem"))
    blob = encrypt_image(b"x", public, "r")
    assert decrypt_image(blob, again, "r") == decrypt_image(blob, key, "r") == b"x"
