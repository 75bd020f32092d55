"""C2SP signed-note / tlog-checkpoint: byte-for-byte the Go note package's own example."""

from __future__ import annotations

import base64
import os
import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from services.audit.checkpoint import (
    CheckpointError,
    Signer,
    Verifier,
    load_or_create_key,
    open_checkpoint,
    sign_checkpoint,
)

# From golang.org/x/mod/sumdb/note's package documentation.
GO_SKEY = "PRIVATE+KEY+PeterNeumann+c74f20a3+AYEKFALVFGyNhPJEMzD1QIDr+Y7hfZx09iUvxdXHKDFz"
GO_VKEY = "PeterNeumann+c74f20a3+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW"
GO_TEXT = ("If you think cryptography is the answer to your problem,\n"
           "then you don't know what your problem is.\n")
GO_NOTE = GO_TEXT + ("\n\u2014 PeterNeumann x08go/ZJkuBS9UG/SffcvIAQxVBtiFupLLr8pAcElZInNIuGUgYN1"
                     "FFYC2pZSNXgKvqfqdngotpRZb6KE6RyyBwJnAM=\n")


def go_signer() -> Signer:
    seed = base64.b64decode(GO_SKEY.split("+", 4)[4])[1:]
    return Signer("PeterNeumann", Ed25519PrivateKey.from_private_bytes(seed))


def test_signer_reproduces_the_go_example_byte_for_byte() -> None:
    signer = go_signer()
    assert signer.verifier_key == GO_VKEY
    assert signer.sign(GO_TEXT) == GO_NOTE
    assert Verifier.parse(GO_VKEY).hash.hex() == "c74f20a3"


def test_checkpoint_round_trip_and_rejections() -> None:
    signer = Signer("log.example/a", Ed25519PrivateKey.generate())
    root = os.urandom(32)
    note = sign_checkpoint(signer, "log.example/a", 42, root)
    lines = note.split("\n")
    assert lines[:4] == ["log.example/a", "42", base64.b64encode(root).decode(), ""]
    assert lines[4].startswith("\u2014 log.example/a ")
    verifier = Verifier.parse(signer.verifier_key)
    head = open_checkpoint(note, verifier, "log.example/a")
    assert (head.tree_size, head.root) == (42, root)
    with pytest.raises(CheckpointError):
        open_checkpoint(note.replace("\n42\n", "\n43\n"), verifier)
    with pytest.raises(CheckpointError):
        open_checkpoint(note, verifier, "another/origin")
    other = Verifier.parse(Signer("log.example/a", Ed25519PrivateKey.generate()).verifier_key)
    with pytest.raises(CheckpointError):
        open_checkpoint(note, other)


def test_key_file_is_private_and_reused(tmp_path: Path) -> None:
    path = tmp_path / "keys" / "audit.pem"
    key = load_or_create_key(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_or_create_key(path).public_key() == key.public_key()
    path.chmod(0o644)
    with pytest.raises(PermissionError):
        load_or_create_key(path)
