"""Signed tree heads in the C2SP tlog-checkpoint format, a C2SP signed-note.

Body: origin line, decimal tree size, base64 root hash, each ending in a newline. Then a
blank line and one signature line per signer: "— <name> <base64(key hash || signature)>".
For Ed25519 the key hash is the first 4 bytes of SHA-256(name || 0x0A || 0x01 || public
key), and the verifier key is "<name>+<hash as 8 hex digits>+<base64(0x01 || public key)>",
exactly as golang.org/x/mod/sumdb/note reads them."""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from services.kit.private_files import load_or_create_key as _load_or_create

ALG_ED25519 = 0x01
SIG_PREFIX = "\u2014 "  # em dash and a space
_NAME = re.compile(r"^[^\s+]+$")


class CheckpointError(ValueError):
    """A note that is malformed or whose signature does not verify."""


@dataclass(frozen=True)
class Checkpoint:
    origin: str
    tree_size: int
    root: bytes


def key_hash(name: str, public_key: bytes) -> bytes:
    return hashlib.sha256(name.encode() + b"\n" + bytes([ALG_ED25519]) + public_key).digest()[:4]


def public_bytes(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def verifier_key(name: str, key: Ed25519PublicKey) -> str:
    pub = public_bytes(key)
    return (f"{name}+{key_hash(name, pub).hex()}+"
            f"{base64.b64encode(bytes([ALG_ED25519]) + pub).decode()}")


@dataclass(frozen=True)
class Verifier:
    name: str
    hash: bytes
    key: Ed25519PublicKey

    @classmethod
    def parse(cls, vkey: str) -> Verifier:
        parts = vkey.strip().split("+", 2)  # the base64 key may hold "+"
        if len(parts) != 3 or not _NAME.match(parts[0]) or len(parts[1]) != 8:
            raise CheckpointError("verifier key is not <name>+<hash>+<key>")
        try:
            raw = base64.b64decode(parts[2], validate=True)
            khash = bytes.fromhex(parts[1])
        except (binascii.Error, ValueError):
            raise CheckpointError("verifier key is not valid base64/hex") from None
        if len(raw) != 33 or raw[0] != ALG_ED25519:
            raise CheckpointError("verifier key is not an Ed25519 key")
        if key_hash(parts[0], raw[1:]) != khash:
            raise CheckpointError("verifier key hash does not match its name and key")
        return cls(parts[0], khash, Ed25519PublicKey.from_public_bytes(raw[1:]))


class Signer:
    def __init__(self, name: str, key: Ed25519PrivateKey) -> None:
        if not _NAME.match(name):
            raise ValueError("a note key name holds no spaces and no '+'")
        self.name = name
        self._key = key
        self.hash = key_hash(name, public_bytes(key.public_key()))

    @property
    def verifier_key(self) -> str:
        return verifier_key(self.name, self._key.public_key())

    def sign(self, text: str) -> str:
        """The signed note: text (ending in a newline), a blank line, our signature."""
        if not text.endswith("\n"):
            raise ValueError("note text must end with a newline")
        sig = self._key.sign(text.encode())
        return f"{text}\n{SIG_PREFIX}{self.name} {base64.b64encode(self.hash + sig).decode()}\n"


def checkpoint_text(origin: str, tree_size: int, root: bytes) -> str:
    return f"{origin}\n{tree_size}\n{base64.b64encode(root).decode()}\n"


def sign_checkpoint(signer: Signer, origin: str, tree_size: int, root: bytes) -> str:
    return signer.sign(checkpoint_text(origin, tree_size, root))


def open_checkpoint(note: str, verifier: Verifier, origin: str | None = None) -> Checkpoint:
    """Check our signature on a checkpoint note and parse its body."""
    split = note.rfind("\n\n")
    if split < 0 or not note.endswith("\n"):
        raise CheckpointError("malformed note: no signature block")
    text, sig_block = note[:split + 1], note[split + 2:]
    verified = False
    for line in sig_block.splitlines():
        if not line.startswith(SIG_PREFIX):
            raise CheckpointError("malformed signature line")
        name, _, b64 = line[len(SIG_PREFIX):].partition(" ")
        try:
            raw = base64.b64decode(b64, validate=True)
        except binascii.Error:
            raise CheckpointError("signature is not base64") from None
        if len(raw) < 5 or name != verifier.name or raw[:4] != verifier.hash:
            continue  # somebody else's signature (a witness): not ours to check
        try:
            verifier.key.verify(raw[4:], text.encode())
        except InvalidSignature:
            raise CheckpointError("signature does not verify") from None
        verified = True
    if not verified:
        raise CheckpointError(f"no signature by {verifier.name}")
    lines = text.split("\n")
    if len(lines) < 4:
        raise CheckpointError("checkpoint body needs origin, size and root")
    if origin is not None and lines[0] != origin:
        raise CheckpointError(f"origin {lines[0]!r} is not {origin!r}")
    if not lines[1].isdigit() or (lines[1] != "0" and lines[1].startswith("0")):
        raise CheckpointError("tree size is not a decimal number")
    try:
        root = base64.b64decode(lines[2], validate=True)
    except binascii.Error:
        raise CheckpointError("root hash is not base64") from None
    if len(root) != 32:
        raise CheckpointError("root hash is not 32 bytes")
    return Checkpoint(lines[0], int(lines[1]), root)


def load_or_create_key(path: Path) -> Ed25519PrivateKey:
    """The log's signing key, created once with mode 0600; the key never leaves the file."""
    return _load_or_create(path, Ed25519PrivateKey, Ed25519PrivateKey.generate)
