"""The independent verifier: recompute the log from the store's bytes, trust nothing but
the log's public key.

Checks, in order: the index rows are contiguous and point at contiguous segment bytes;
each leaf hashes to the hash the index recorded and names its own index (a deleted or
reordered leaf shows at once); every checkpoint carries a valid signature, matches the
row it is stored in, covers leaves that exist and has the root recomputed from them;
no two checkpoints of one size disagree; successive checkpoints are consistent (an RFC
9162 consistency proof from the recomputed tree verifies against both signed roots).
``first_bad_index`` is the first leaf that evidence points at: exact for a leaf whose
bytes, index or position disagree, and otherwise the first leaf not covered by a
checkpoint that still agrees with the leaves (exact when checkpoints are dense)."""

from __future__ import annotations

import base64
import itertools
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from services.audit.checkpoint import CheckpointError, Verifier, open_checkpoint
from services.audit.merkle import ProofError, Tree, leaf_hash, verify_consistency
from services.audit.store import AuditLog, PgLocation, open_store

_INDEX_KEY = b'"index":'


@dataclass(frozen=True)
class Finding:
    kind: str
    detail: str
    leaf_index: int | None = None
    checkpoint: int | None = None  # position in the store's checkpoint list


@dataclass
class VerifyReport:
    tree_size: int = 0
    root: str = ""
    checkpoints: int = 0
    findings: list[Finding] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.findings

    @property
    def first_bad_index(self) -> int | None:
        indexes = [f.leaf_index for f in self.findings if f.leaf_index is not None]
        return min(indexes) if indexes else None

    def to_json(self) -> dict[str, Any]:
        return {"ok": self.ok, "tree_size": self.tree_size, "root": self.root,
                "checkpoints": self.checkpoints, "first_bad_index": self.first_bad_index,
                "findings": [asdict(f) for f in self.findings],
                "seconds": round(self.seconds, 3)}


def _named_index(leaf: bytes) -> int | None:
    # The top-level "index" is the last one: every key after it holds a scalar.
    at = leaf.rfind(_INDEX_KEY)
    if at < 0:
        return None
    digits = leaf[at + len(_INDEX_KEY):at + len(_INDEX_KEY) + 20].split(b",")[0].rstrip(b"}")
    return int(digits) if digits.isdigit() else None


def verify_store(directory: Path | PgLocation, verifier: Verifier,
                 origin: str | None = None,
                 *, max_findings: int = 100, external: list[str] | None = None,
                 progress: Callable[[int, int], None] | None = None) -> VerifyReport:
    """``external``: checkpoint notes kept outside the store (the frs.audit.checkpoints
    topic, a witness, an auditor's own copies). They count like stored ones, so deleting
    checkpoints from the store hides nothing; notes by other keys are ignored."""
    started = time.perf_counter()
    report = VerifyReport()
    store = open_store(directory, readonly=True)
    try:
        with store.snapshot():
            _verify(store, verifier, origin, report, max_findings, external or [],
                    progress or (lambda done, total: None))
    finally:
        store.close()
    report.seconds = time.perf_counter() - started
    return report


def _verify(store: AuditLog, verifier: Verifier, origin: str | None, report: VerifyReport,
            max_findings: int, external: list[str], progress: Callable[[int, int], None]
            ) -> None:
    add = report.findings.append
    hashes: list[bytes] = []
    total = store.size
    expected_pos = 0
    for row, leaf in store.iter_leaves():
        i = len(hashes)
        if i % 65536 == 0:
            progress(i, total)
        idx, pos, length, stored_hash = int(row[0]), int(row[1]), int(row[2]), bytes(row[3])
        if len(report.findings) < max_findings:
            if idx != i:
                add(Finding("index_gap", f"index row {idx} where {i} was expected", i))
            if pos != expected_pos:
                add(Finding("segment_gap", f"leaf {idx} starts at byte {pos}, the previous "
                                           f"leaf ended at {expected_pos}", i))
            if len(leaf) != length:
                add(Finding("segment_short", f"leaf {idx} has {len(leaf)} of {length} bytes",
                            i))
        lh = leaf_hash(leaf)
        if len(report.findings) < max_findings:
            if lh != stored_hash:
                add(Finding("leaf_hash_mismatch", f"leaf {i}'s bytes do not hash to the hash "
                                                  "recorded when it was appended", i))
            named = _named_index(leaf)
            if named != i:
                add(Finding("leaf_index_mismatch", f"leaf at position {i} names index "
                                                   f"{named}", i))
        hashes.append(lh)
        expected_pos = pos + length
    n = len(hashes)
    progress(n, total)
    report.tree_size = n
    tree = Tree(hashes)
    report.root = base64.b64encode(tree.root()).decode()
    _verify_checkpoints(store, verifier, origin, tree, report, external)


def _verify_checkpoints(store: AuditLog, verifier: Verifier, origin: str | None, tree: Tree,
                        report: VerifyReport, external: list[str]) -> None:
    add = report.findings.append
    n = tree.size
    stored = store.checkpoints()
    opened: list[tuple[int, int, bytes]] = []  # (position, size, root) of valid signatures
    # External notes are numbered after the stored ones.
    for k, note in enumerate(external):
        pos = len(stored) + k
        if not _signed_by_us(note, verifier):
            continue  # another log's, or a witness's: not ours to judge
        try:
            head = open_checkpoint(note, verifier, origin)
        except CheckpointError as exc:
            add(Finding("checkpoint_signature", f"external checkpoint {k}: {exc}",
                        checkpoint=pos))
            continue
        opened.append((pos, head.tree_size, head.root))
    external_opened = list(opened)
    opened = []
    report.checkpoints = len(stored) + len(external_opened)
    for pos, cp in enumerate(stored):
        try:
            head = open_checkpoint(cp.note, verifier, origin)
        except CheckpointError as exc:
            add(Finding("checkpoint_signature", f"checkpoint {pos}: {exc}", checkpoint=pos))
            continue
        if (head.tree_size, head.root) != (cp.tree_size, cp.root):
            add(Finding("checkpoint_row_mismatch", f"checkpoint {pos}: stored size/root differ"
                                                   " from the signed note", checkpoint=pos))
        opened.append((pos, head.tree_size, head.root))
    stored_opened = list(opened)
    opened += external_opened
    # The leaves agree with a checkpoint when the recomputed root at its size is its root.
    agrees = {pos: size <= n and tree.root(size) == root for pos, size, root in opened}
    good_sizes = sorted(size for pos, size, _ in opened if agrees[pos])

    def lower_bound(size: int) -> int:
        # First leaf not vouched for by an agreeing checkpoint below this size.
        below = [s for s in good_sizes if s < size]
        return below[-1] if below else 0

    for pos, size, _root in opened:
        if agrees[pos]:
            continue
        if size > n:
            add(Finding("checkpoint_beyond_log", f"checkpoint {pos} signs {size} leaves, the "
                                                 f"store holds {n}: leaves were removed",
                        min(n, lower_bound(size)) if good_sizes else n, pos))
        else:
            add(Finding("checkpoint_root_mismatch", f"checkpoint {pos} (size {size}) does not "
                                                    "match the root recomputed from the leaves",
                        lower_bound(size), pos))
    by_size: dict[int, tuple[int, bytes]] = {}
    for pos, size, root in opened:
        if size in by_size and by_size[size][1] != root:
            other = by_size[size][0]
            bad = pos if agrees[other] else other
            add(Finding("checkpoint_fork", f"checkpoints {other} and {pos} sign different roots"
                                           f" for size {size}", lower_bound(size), bad))
        by_size.setdefault(size, (pos, root))
    for (p1, s1, _), (p2, s2, _) in itertools.pairwise(stored_opened):
        if s2 < s1:
            add(Finding("checkpoint_shrank", f"checkpoint {p2} (size {s2}) follows checkpoint "
                                             f"{p1} (size {s1})", s2, p2))
    by_growth = sorted(opened, key=lambda c: c[1])
    for (p1, s1, r1), (p2, s2, r2) in itertools.pairwise(by_growth):
        if s1 == s2 or s2 > n:
            continue  # already reported: no leaves to build a proof from
        try:
            verify_consistency(s1, s2, r1, r2, tree.consistency_proof(s1, s2))
        except ProofError as exc:
            add(Finding("checkpoint_inconsistent", f"checkpoints {p1} (size {s1}) and {p2} "
                                                   f"(size {s2}): {exc}",
                        lower_bound(s2), p2))



def _signed_by_us(note: str, verifier: Verifier) -> bool:
    """Whether the note carries a signature line under our key name and hash."""
    import base64
    import binascii

    prefix = f"\u2014 {verifier.name} "
    for line in note.splitlines():
        if line.startswith(prefix):
            try:
                raw = base64.b64decode(line[len(prefix):], validate=True)
            except binascii.Error:
                continue
            if raw[:4] == verifier.hash:
                return True
    return False
