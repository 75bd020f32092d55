"""RFC 9162 Merkle tree: our hashlib implementation against pymerkle 7 (an independent
implementation, configured with the 0x00/0x01 domain-separation prefixes)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pymerkle import InmemoryTree, InvalidProof

from services.audit import merkle as m

leaves_st = st.lists(st.binary(min_size=0, max_size=40), min_size=1, max_size=70)


def reference(leaves: list[bytes]) -> InmemoryTree:
    tree = InmemoryTree(algorithm="sha256")  # security=True: RFC 9162 prefixes
    assert tree.security and tree.leaf_prefix == b"\x00" and tree.node_prefix == b"\x01"
    for leaf in leaves:
        tree.append_entry(leaf)
    return tree


def test_empty_tree_root_is_hash_of_nothing() -> None:
    assert m.root_of([]) == m.EMPTY_ROOT == reference([]).get_root(0)
    assert m.Frontier().root() == m.EMPTY_ROOT


def test_known_vector() -> None:
    # RFC 6962 / 9162 style leaf and node hashing on a hand-computed three-leaf tree.
    import hashlib
    a, b, c = (hashlib.sha256(b"\x00" + x).digest() for x in (b"a", b"b", b"c"))
    ab = hashlib.sha256(b"\x01" + a + b).digest()
    assert m.root_of([a, b, c]) == hashlib.sha256(b"\x01" + ab + c).digest()


@settings(max_examples=150, deadline=None)
@given(leaves_st)
def test_roots_agree_at_every_size(leaves: list[bytes]) -> None:
    tree = reference(leaves)
    hashes = [m.leaf_hash(x) for x in leaves]
    frontier = m.Frontier()
    for size in range(1, len(leaves) + 1):
        frontier.append(hashes[size - 1])
        expected = tree.get_root(size)
        assert m.root_of(hashes[:size]) == expected
        assert frontier.root() == expected
        assert m.Frontier.from_bytes(size, frontier.to_bytes()).root() == expected


@settings(max_examples=150, deadline=None)
@given(leaves_st, st.data())
def test_inclusion_proofs_agree(leaves: list[bytes], data: st.DataObject) -> None:
    tree = reference(leaves)
    hashes = [m.leaf_hash(x) for x in leaves]
    size = data.draw(st.integers(1, len(leaves)), label="size")
    index = data.draw(st.integers(0, size - 1), label="index")
    ours = m.inclusion_proof(index, hashes[:size])
    theirs = tree.prove_inclusion(index + 1, size)
    # pymerkle's path starts with the leaf hash itself; the rest is the RFC audit path.
    assert theirs.path[0] == hashes[index]
    assert theirs.path[1:] == ours
    root = tree.get_root(size)
    m.verify_inclusion(index, size, hashes[index], ours, root)
    theirs.verify(hashes[index], root)
    # Any other leaf or root must fail (flipped bits: a fixed "other" value can be drawn).
    def flip(h: bytes) -> bytes:
        return bytes([h[0] ^ 1]) + h[1:]

    with pytest.raises(m.ProofError):
        m.verify_inclusion(index, size, flip(hashes[index]), ours, root)
    with pytest.raises(m.ProofError):
        m.verify_inclusion(index, size, hashes[index], ours, flip(root))
    if ours:
        bad = list(ours)
        bad[-1] = flip(bad[-1])
        with pytest.raises(m.ProofError):
            m.verify_inclusion(index, size, hashes[index], bad, root)


@settings(max_examples=150, deadline=None)
@given(leaves_st, st.data())
def test_consistency_proofs_agree(leaves: list[bytes], data: st.DataObject) -> None:
    tree = reference(leaves)
    hashes = [m.leaf_hash(x) for x in leaves]
    new = data.draw(st.integers(1, len(leaves)), label="new")
    old = data.draw(st.integers(1, new), label="old")
    old_root, new_root = tree.get_root(old), tree.get_root(new)
    ours = m.consistency_proof(old, hashes[:new])
    # Ours verifies against pymerkle's roots, and pymerkle's proof against our roots.
    m.verify_consistency(old, new, old_root, new_root, ours)
    tree.prove_consistency(old, new).verify(m.root_of(hashes[:old]), m.root_of(hashes[:new]))
    if old < new:
        forged = m.root_of([*hashes[:old - 1], m.leaf_hash(b"forged")])
        with pytest.raises(m.ProofError):
            m.verify_consistency(old, new, forged, new_root, ours)
        with pytest.raises(InvalidProof):
            tree.prove_consistency(old, new).verify(forged, new_root)
        for i in range(len(ours)):
            bad = list(ours)
            bad[i] = m.leaf_hash(bad[i])
            with pytest.raises(m.ProofError):
                m.verify_consistency(old, new, old_root, new_root, bad)
        with pytest.raises(m.ProofError):
            m.verify_consistency(old, new, old_root, new_root, ours[:-1])
        with pytest.raises(m.ProofError):
            m.verify_consistency(old, new, old_root, new_root, [*ours, new_root])


@settings(max_examples=100, deadline=None)
@given(leaves_st, st.data())
def test_cached_tree_gives_the_same_proofs(leaves: list[bytes], data: st.DataObject) -> None:
    hashes = [m.leaf_hash(x) for x in leaves]
    tree = m.Tree(hashes)
    new = data.draw(st.integers(1, len(leaves)), label="new")
    old = data.draw(st.integers(1, new), label="old")
    index = data.draw(st.integers(0, new - 1), label="index")
    assert tree.root(new) == m.root_of(hashes[:new]) == reference(leaves).get_root(new)
    assert tree.inclusion_proof(index, new) == m.inclusion_proof(index, hashes[:new])
    assert tree.consistency_proof(old, new) == m.consistency_proof(old, hashes[:new])
