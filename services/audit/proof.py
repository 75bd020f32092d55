"""Offline inclusion proofs: `frs audit proof <event-id>` writes a bundle (the leaf, its
index, an RFC 9162 audit path and a signed checkpoint); `frs audit verify-proof` checks it
with nothing but the bundle and the log's verifier key."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

from services.audit.checkpoint import CheckpointError, Verifier, open_checkpoint
from services.audit.merkle import ProofError, Tree, leaf_hash, verify_inclusion
from services.audit.store import PgLocation, open_store


class ProofUnavailable(LookupError):
    pass


def inclusion_bundle(directory: Path | PgLocation, event_id: str) -> dict[str, Any]:
    store = open_store(directory, readonly=True)
    try:
        found = store.index_of(event_id)
        if found is None:
            raise ProofUnavailable(f"event {event_id} is not in the audit log")
        index = found
        checkpoint = store.last_checkpoint()
        if checkpoint is None or checkpoint.tree_size <= index:
            raise ProofUnavailable(f"no signed checkpoint covers leaf {index} yet; retry later")
        size = checkpoint.tree_size
        hashes = store.leaf_hashes(size)
        (leaf,) = store.leaves(index, index + 1)
        path = Tree(hashes).inclusion_proof(index, size)
    finally:
        store.close()
    return {"event_id": event_id, "leaf_index": index, "tree_size": size,
            "leaf": leaf.decode(), "inclusion_path": [base64.b64encode(p).decode() for p in path],
            "checkpoint": checkpoint.note}


def verify_bundle(bundle: dict[str, Any], verifier: Verifier) -> str:
    """Returns a one-line confirmation; raises ProofError or CheckpointError."""
    try:
        head = open_checkpoint(str(bundle["checkpoint"]), verifier)
        index, size = int(bundle["leaf_index"]), int(bundle["tree_size"])
        leaf = str(bundle["leaf"]).encode()
        path = [base64.b64decode(p, validate=True) for p in bundle["inclusion_path"]]
    except (KeyError, TypeError, ValueError) as exc:
        if isinstance(exc, CheckpointError):
            raise
        raise ProofError(f"malformed proof bundle: {type(exc).__name__}") from None
    if head.tree_size != size:
        raise ProofError(f"bundle says size {size}, its checkpoint signs {head.tree_size}")
    body = json.loads(leaf)
    if body.get("index") != index or body.get("id") != bundle.get("event_id"):
        raise ProofError("the leaf is not the one the bundle names")
    verify_inclusion(index, size, leaf_hash(leaf), path, head.root)
    return (f"event {bundle['event_id']} is leaf {index} of the log {head.origin} "
            f"at size {size}, signed by {verifier.name}")
