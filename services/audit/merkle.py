"""Merkle tree hashing and proofs per RFC 9162 section 2.1, with hashlib only.

Leaf hash SHA-256(0x00 || leaf), node hash SHA-256(0x01 || left || right); the tree of n
leaves splits at k, the largest power of two smaller than n. ``Frontier`` keeps the roots
of the tree's maximal perfect subtrees (its right edge) so that an append costs
O(log n) hashes, never a recomputation of the tree.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field

HASH_SIZE = 32
EMPTY_ROOT = hashlib.sha256(b"").digest()
_sha256 = hashlib.sha256


class ProofError(ValueError):
    """A proof that does not verify, or a request no proof can answer."""


def leaf_hash(leaf: bytes) -> bytes:
    return _sha256(b"\x00" + leaf).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    return _sha256(b"\x01" + left + right).digest()


def _split(n: int) -> int:
    """Largest power of two strictly smaller than n (n >= 2)."""
    return 1 << ((n - 1).bit_length() - 1)


def root_of(hashes: Sequence[bytes]) -> bytes:
    """MTH over leaf hashes, bottom-up: a lone last node moves up unchanged, which is
    the same tree as RFC 9162's recursive split."""
    if not hashes:
        return EMPTY_ROOT
    level = list(hashes)
    while len(level) > 1:
        nxt = [_sha256(b"\x01" + level[i] + level[i + 1]).digest()
               for i in range(0, len(level) - 1, 2)]
        if len(level) % 2:
            nxt.append(level[-1])
        level = nxt
    return level[0]


@dataclass
class Frontier:
    """Right edge of the tree: roots of its maximal perfect subtrees, largest first."""

    size: int = 0
    nodes: list[bytes] = field(default_factory=list)

    def append(self, lh: bytes) -> None:
        node = lh
        # Each trailing 1 bit of the old size is a perfect subtree the new leaf completes.
        size = self.size
        while size & 1:
            node = node_hash(self.nodes.pop(), node)
            size >>= 1
        self.nodes.append(node)
        self.size += 1

    def root(self) -> bytes:
        if not self.nodes:
            return EMPTY_ROOT
        acc = self.nodes[-1]
        for node in reversed(self.nodes[:-1]):
            acc = node_hash(node, acc)
        return acc

    def copy(self) -> Frontier:
        return Frontier(self.size, list(self.nodes))

    def to_bytes(self) -> bytes:
        return b"".join(self.nodes)

    @classmethod
    def from_bytes(cls, size: int, blob: bytes) -> Frontier:
        nodes = [blob[i:i + HASH_SIZE] for i in range(0, len(blob), HASH_SIZE)]
        if len(nodes) != bin(size).count("1"):
            raise ValueError("frontier does not match the tree size")
        return cls(size, nodes)

    @classmethod
    def of(cls, hashes: Sequence[bytes]) -> Frontier:
        f = cls()
        for h in hashes:
            f.append(h)
        return f


# --- inclusion proofs (RFC 9162 2.1.3) -----------------------------------------------


def inclusion_proof(index: int, hashes: Sequence[bytes]) -> list[bytes]:
    """PATH(m, D[n]) over leaf hashes, bottom-up (the sibling nearest the leaf first)."""
    n = len(hashes)
    if not 0 <= index < n:
        raise ProofError(f"index {index} out of range for tree size {n}")
    path: list[bytes] = []
    lo, hi = 0, n
    while hi - lo > 1:
        k = _split(hi - lo)
        if index < lo + k:
            path.append(root_of(hashes[lo + k:hi]))
            hi = lo + k
        else:
            path.append(root_of(hashes[lo:lo + k]))
            lo += k
    path.reverse()
    return path


def root_from_inclusion(index: int, size: int, lh: bytes, proof: Sequence[bytes]) -> bytes:
    """RFC 9162 2.1.3.2: the root that ``proof`` implies for leaf hash ``lh``."""
    if not 0 <= index < size:
        raise ProofError(f"index {index} out of range for tree size {size}")
    fn, sn, r = index, size - 1, lh
    for p in proof:
        if sn == 0:
            raise ProofError("inclusion proof too long")
        if fn & 1 or fn == sn:
            r = node_hash(p, r)
            if not fn & 1:
                while fn & 1 == 0 and fn != 0:
                    fn >>= 1
                    sn >>= 1
        else:
            r = node_hash(r, p)
        fn >>= 1
        sn >>= 1
    if sn != 0:
        raise ProofError("inclusion proof too short")
    return r


def verify_inclusion(index: int, size: int, lh: bytes, proof: Sequence[bytes],
                     root: bytes) -> None:
    if root_from_inclusion(index, size, lh, proof) != root:
        raise ProofError("inclusion proof does not lead to the root")


# --- consistency proofs (RFC 9162 2.1.4) ---------------------------------------------


def consistency_proof(old_size: int, hashes: Sequence[bytes]) -> list[bytes]:
    """PROOF(m, D[n]): SUBPROOF(m, D[n], true), iteratively, bottom-up."""
    n = len(hashes)
    if not 0 <= old_size <= n:
        raise ProofError(f"old size {old_size} out of range for tree size {n}")
    if old_size in (0, n):
        return []
    path: list[bytes] = []
    m, lo, hi, complete = old_size, 0, n, True
    while m != hi - lo:
        k = _split(hi - lo)
        if m <= k:
            path.append(root_of(hashes[lo + k:hi]))
            hi = lo + k
        else:
            path.append(root_of(hashes[lo:lo + k]))
            lo += k
            m -= k
            complete = False
    if not complete:
        path.append(root_of(hashes[lo:hi]))
    path.reverse()
    return path


def verify_consistency(old_size: int, new_size: int, old_root: bytes, new_root: bytes,
                       proof: Sequence[bytes]) -> None:
    """RFC 9162 2.1.4.2."""
    if not 0 <= old_size <= new_size:
        raise ProofError("old size larger than new size")
    if old_size == new_size:
        if proof:
            raise ProofError("consistency proof between equal sizes must be empty")
        if old_root != new_root:
            raise ProofError("equal sizes with different roots")
        return
    if old_size == 0:
        if proof:
            raise ProofError("consistency proof from the empty tree must be empty")
        return
    path = list(proof)
    if old_size & (old_size - 1) == 0:  # a power of two: the old root is the first node
        path.insert(0, old_root)
    if not path:
        raise ProofError("empty consistency proof")
    fn, sn = old_size - 1, new_size - 1
    while fn & 1:
        fn >>= 1
        sn >>= 1
    fr = sr = path[0]
    for c in path[1:]:
        if sn == 0:
            raise ProofError("consistency proof too long")
        if fn & 1 or fn == sn:
            fr = node_hash(c, fr)
            sr = node_hash(c, sr)
            if not fn & 1:
                while fn & 1 == 0 and fn != 0:
                    fn >>= 1
                    sn >>= 1
        else:
            sr = node_hash(sr, c)
        fn >>= 1
        sn >>= 1
    if sn != 0:
        raise ProofError("consistency proof too short")
    if fr != old_root:
        raise ProofError("consistency proof does not lead to the old root")
    if sr != new_root:
        raise ProofError("consistency proof does not lead to the new root")


class Tree:
    """All levels of a tree held in memory, for proofs over large logs: any subtree root
    is a fold of at most log2(n) cached nodes instead of a rehash of its leaves."""

    def __init__(self, hashes: Sequence[bytes]) -> None:
        self.size = len(hashes)
        self.levels: list[list[bytes]] = [list(hashes)]
        level = self.levels[0]
        while len(level) > 1:
            level = [_sha256(b"\x01" + level[i] + level[i + 1]).digest()
                     for i in range(0, len(level) - 1, 2)]
            self.levels.append(level)

    def range_root(self, lo: int, hi: int) -> bytes:
        """MTH(D[lo:hi]) for a range that is a subtree of some RFC 9162 tree (lo aligned
        to a power of two at least hi - lo), or any prefix [0:hi)."""
        if lo >= hi:
            return EMPTY_ROOT
        nodes: list[bytes] = []
        while lo < hi:
            h = (hi - lo).bit_length() - 1
            while lo & ((1 << h) - 1):
                h -= 1
            nodes.append(self.levels[h][lo >> h])
            lo += 1 << h
        acc = nodes[-1]
        for node in reversed(nodes[:-1]):
            acc = node_hash(node, acc)
        return acc

    def root(self, size: int | None = None) -> bytes:
        return self.range_root(0, self.size if size is None else size)

    def inclusion_proof(self, index: int, size: int) -> list[bytes]:
        if not 0 <= index < size <= self.size:
            raise ProofError(f"index {index} out of range for tree size {size}")
        path: list[bytes] = []
        lo, hi = 0, size
        while hi - lo > 1:
            k = _split(hi - lo)
            if index < lo + k:
                path.append(self.range_root(lo + k, hi))
                hi = lo + k
            else:
                path.append(self.range_root(lo, lo + k))
                lo += k
        path.reverse()
        return path

    def consistency_proof(self, old_size: int, new_size: int) -> list[bytes]:
        if not 0 <= old_size <= new_size <= self.size:
            raise ProofError(f"sizes {old_size}, {new_size} out of range")
        if old_size in (0, new_size):
            return []
        path: list[bytes] = []
        m, lo, hi, complete = old_size, 0, new_size, True
        while m != hi - lo:
            k = _split(hi - lo)
            if m <= k:
                path.append(self.range_root(lo + k, hi))
                hi = lo + k
            else:
                path.append(self.range_root(lo, lo + k))
                lo += k
                m -= k
                complete = False
        if not complete:
            path.append(self.range_root(lo, hi))
        path.reverse()
        return path
