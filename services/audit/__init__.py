"""Audit: append-only log of every event, Merkle tree, checkpoints, verifier, replay."""
