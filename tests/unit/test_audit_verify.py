"""Tamper tests: `frs audit verify` over a real store on disk, edited the ways an
operator with write access could, must fail and name the right leaf or checkpoint."""

from __future__ import annotations

import json
import sqlite3
from datetime import UTC, datetime
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from services.audit import handlers
from services.audit.checkpoint import Signer, sign_checkpoint
from services.audit.merkle import leaf_hash, root_of
from services.audit.store import AuditStore, LeafMeta
from services.audit.verify import verify_store
from services.cli.entry import main as frs

ORIGIN = "frs-broker.test/audit"


def _policy(signer: Signer, every: int) -> handlers.CheckpointPolicy:
    return handlers.CheckpointPolicy(signer, ORIGIN, every, 1e9, lambda: datetime.now(UTC))


def append(store: AuditStore, i: int, tag: str = "orig") -> None:
    meta = LeafMeta("frs.test", 0, i, f"id-{tag}-{i}", "frs.test.v1", f"prb-{i}", None)
    body = {"topic": "frs.test", "partition": 0, "offset": i, "id": f"id-{tag}-{i}",
            "data": {"n": i, "tag": tag}}
    assert store.append(meta, body) == store.size - 1


def build(directory: Path, signer: Signer, n: int, every: int, tag: str = "orig",
          start: int = 0) -> None:
    store = AuditStore(directory)
    policy = _policy(signer, every)
    for i in range(start, n):
        append(store, i, tag)
        if (i + 1) % every == 0:
            store.commit()
            handlers.make_checkpoint(store, policy)
    store.commit()
    store.close()


@pytest.fixture
def signer() -> Signer:
    return Signer(ORIGIN, Ed25519PrivateKey.generate())


@pytest.fixture
def log(tmp_path: Path, signer: Signer) -> Path:
    build(tmp_path / "audit", signer, 40, every=1)
    return tmp_path / "audit"


def db(directory: Path) -> sqlite3.Connection:
    return sqlite3.connect(directory / "index.sqlite3", isolation_level=None)


def run_cli(directory: Path, signer: Signer, capsys: pytest.CaptureFixture[str]
            ) -> tuple[int, dict[str, object]]:
    code = frs(["audit", "verify", "--json", "--store", str(directory), "--vkey",
                signer.verifier_key])
    return code, json.loads(capsys.readouterr().out)


def test_untouched_store_verifies(log: Path, signer: Signer,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    code, out = run_cli(log, signer, capsys)
    assert code == 0, out
    assert out["ok"] is True and out["tree_size"] == 40 and out["checkpoints"] == 40
    assert out["first_bad_index"] is None


def test_the_stored_root_is_the_rfc9162_root(log: Path) -> None:
    store = AuditStore(log, readonly=True)
    leaves = store.leaves()
    assert store.frontier.root() == root_of([leaf_hash(x) for x in leaves])
    assert b"image" not in b"".join(leaves)
    store.close()


def test_another_key_fails_every_signature(log: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    other = Signer(ORIGIN, Ed25519PrivateKey.generate())
    code, out = run_cli(log, other, capsys)
    assert code == 1
    assert {f["kind"] for f in out["findings"]} == {"checkpoint_signature"}  # type: ignore[union-attr,index]


def _segment_edit(directory: Path, index: int, old: bytes, new: bytes) -> None:
    pos, length = db(directory).execute(
        "SELECT seg_pos, seg_len FROM leaves WHERE idx = ?", (index,)).fetchone()
    seg = directory / "leaves.seg"
    data = bytearray(seg.read_bytes())
    leaf = bytes(data[pos:pos + length])
    assert old in leaf and len(old) == len(new)
    data[pos:pos + length] = leaf.replace(old, new)
    seg.write_bytes(bytes(data))


def test_edited_leaf_is_named(log: Path, signer: Signer,
                              capsys: pytest.CaptureFixture[str]) -> None:
    _segment_edit(log, 17, b'"tag":"orig"', b'"tag":"evil"')
    code, out = run_cli(log, signer, capsys)
    assert code == 1 and out["first_bad_index"] == 17


def test_edited_leaf_with_forged_index_hash_is_named(log: Path, signer: Signer,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    # The attacker also rewrites the hash the index recorded: only the signed
    # checkpoints can tell, and with a checkpoint per leaf they name it exactly.
    _segment_edit(log, 23, b'"tag":"orig"', b'"tag":"evil"')
    con = db(log)
    pos, length = con.execute("SELECT seg_pos, seg_len FROM leaves WHERE idx = 23").fetchone()
    leaf = (log / "leaves.seg").read_bytes()[pos:pos + length]
    con.execute("UPDATE leaves SET leaf_hash = ? WHERE idx = 23", (leaf_hash(leaf),))
    code, out = run_cli(log, signer, capsys)
    assert code == 1 and out["first_bad_index"] == 23
    assert "checkpoint_root_mismatch" in {f["kind"] for f in out["findings"]}  # type: ignore[union-attr,index]


def test_deleted_leaf_is_named(log: Path, signer: Signer,
                               capsys: pytest.CaptureFixture[str]) -> None:
    con = db(log)
    con.execute("DELETE FROM leaves WHERE idx = 9")
    # Renumber the rest so that the index has no hole (in ascending order: unique key).
    for idx in range(10, 40):
        con.execute("UPDATE leaves SET idx = ? WHERE idx = ?", (idx - 1, idx))
    code, out = run_cli(log, signer, capsys)
    assert code == 1 and out["first_bad_index"] == 9


def test_reordered_leaves_are_named(log: Path, signer: Signer,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    con = db(log)
    a = con.execute("SELECT seg_pos, seg_len, leaf_hash FROM leaves WHERE idx = 30").fetchone()
    b = con.execute("SELECT seg_pos, seg_len, leaf_hash FROM leaves WHERE idx = 31").fetchone()
    con.execute("UPDATE leaves SET seg_pos=?, seg_len=?, leaf_hash=? WHERE idx = 30", b)
    con.execute("UPDATE leaves SET seg_pos=?, seg_len=?, leaf_hash=? WHERE idx = 31", a)
    code, out = run_cli(log, signer, capsys)
    assert code == 1 and out["first_bad_index"] == 30


def _truncate(directory: Path, size: int) -> None:
    con = db(directory)
    (end,) = con.execute("SELECT seg_pos FROM leaves WHERE idx = ?", (size,)).fetchone()
    con.execute("DELETE FROM leaves WHERE idx >= ?", (size,))
    con.execute("DELETE FROM tree")
    con.close()
    with open(directory / "leaves.seg", "r+b") as f:
        f.truncate(end)


@pytest.mark.parametrize("every", [1, 5])
def test_truncated_and_re_extended_log_is_named(tmp_path: Path, signer: Signer, every: int,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    directory = tmp_path / "audit"
    build(directory, signer, 40, every=every)
    _truncate(directory, 12)
    # Re-extend through the store itself: every local check is consistent again.
    store = AuditStore(directory)
    assert store.size == 12
    for i in range(12, 42):
        append(store, i, "new")
    store.commit()
    store.close()
    report = verify_store(directory, handlers_verifier(signer))
    assert not report.ok
    assert {f.kind for f in report.findings} <= {"checkpoint_root_mismatch",
                                                 "checkpoint_inconsistent"}
    if every == 1:
        assert report.first_bad_index == 12
    else:  # named to checkpoint resolution: the last checkpoint that still agrees
        assert report.first_bad_index == 10
    code, out = run_cli(directory, signer, capsys)
    assert code == 1 and out["first_bad_index"] == report.first_bad_index


def test_truncation_alone_is_named(log: Path, signer: Signer,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    _truncate(log, 33)
    code, out = run_cli(log, signer, capsys)
    assert code == 1 and out["first_bad_index"] == 33
    assert "checkpoint_beyond_log" in {f["kind"] for f in out["findings"]}  # type: ignore[union-attr,index]


def test_two_checkpoints_of_one_size_with_different_roots(
        log: Path, signer: Signer, capsys: pytest.CaptureFixture[str]) -> None:
    # A log that signs a second, different tree of size 25 (a fork shown to someone else).
    store = AuditStore(log, readonly=True)
    forked = [leaf_hash(x) for x in store.leaves(0, 25)]
    store.close()
    forked[20] = leaf_hash(b"another history")
    root = root_of(forked)
    con = db(log)
    con.execute("INSERT INTO checkpoints (tree_size, root, note, created_at) VALUES (?,?,?,?)",
                (25, root, sign_checkpoint(signer, ORIGIN, 25, root), "now"))
    code, out = run_cli(log, signer, capsys)
    assert code == 1
    kinds = {f["kind"]: f for f in out["findings"]}  # type: ignore[union-attr]
    assert kinds["checkpoint_fork"]["checkpoint"] == 40  # the forged one, not the honest 24
    assert kinds["checkpoint_root_mismatch"]["checkpoint"] == 40
    assert out["first_bad_index"] == 24  # every leaf below 24 is vouched for by a checkpoint


def handlers_verifier(signer: Signer):  # type: ignore[no-untyped-def]
    from services.audit.checkpoint import Verifier

    return Verifier.parse(signer.verifier_key)


def test_inclusion_proof_bundle_verifies_offline(log: Path, signer: Signer, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    bundle = tmp_path / "proof.json"
    assert frs(["audit", "proof", "id-orig-17", "--store", str(log), "--out", str(bundle)]) == 0
    capsys.readouterr()
    assert frs(["audit", "verify-proof", str(bundle), "--json", "--vkey",
                signer.verifier_key]) == 0
    assert json.loads(capsys.readouterr().out)["ok"] is True
    data = json.loads(bundle.read_text())
    data["leaf"] = data["leaf"].replace('"tag":"orig"', '"tag":"evil"')
    bundle.write_text(json.dumps(data))
    assert frs(["audit", "verify-proof", str(bundle), "--vkey", signer.verifier_key]) == 1
    assert frs(["audit", "proof", "no-such-event", "--store", str(log)]) == 1


def test_idle_log_does_not_sign_its_own_checkpoints_forever(tmp_path: Path,
                                                            signer: Signer) -> None:
    store = AuditStore(tmp_path / "audit")
    policy = handlers.CheckpointPolicy(signer, ORIGIN, 1000, 10.0, lambda: datetime.now(UTC))
    append(store, 0)
    store.commit()
    assert handlers.checkpoint_due(store, policy, last_at=0.0, now=100.0)  # interval passed
    handlers.make_checkpoint(store, policy)
    # Only the checkpoint's own event comes back as a leaf: nothing new to sign.
    store.append(LeafMeta("frs.audit.checkpoints", 0, 0, "cp", None, None, None), {"cp": 1})
    store.commit()
    assert not handlers.checkpoint_due(store, policy, last_at=0.0, now=100.0)
    append(store, 1)
    store.commit()
    assert handlers.checkpoint_due(store, policy, last_at=0.0, now=100.0)
    assert not handlers.checkpoint_due(store, policy, last_at=95.0, now=100.0)
    store.close()


def test_deleting_checkpoints_from_the_store_hides_nothing_from_saved_copies(
        log: Path, signer: Signer, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # The auditor kept two of the published notes; the operator then truncates the log,
    # re-extends it and deletes every checkpoint the store held.
    store = AuditStore(log, readonly=True)
    saved = [cp.note for cp in store.checkpoints() if cp.tree_size in (20, 40)]
    store.close()
    files = []
    for i, note in enumerate(saved):
        files += ["--checkpoint", str(tmp_path / f"cp{i}.note")]
        (tmp_path / f"cp{i}.note").write_text(note)
    _truncate(log, 30)
    store = AuditStore(log)
    for i in range(30, 40):
        append(store, i, "new")
    store.commit()
    store.close()
    db(log).execute("DELETE FROM checkpoints")
    code, out = run_cli(log, signer, capsys)
    assert code == 0  # nothing left inside the store to contradict the leaves
    code = frs(["audit", "verify", "--json", "--store", str(log), "--vkey",
                signer.verifier_key, *files])
    out = json.loads(capsys.readouterr().out)
    assert code == 1 and out["first_bad_index"] == 20  # the last size an outside copy vouches
    # A note from another log is ignored, not a finding.
    other = Signer("another.log/x", Ed25519PrivateKey.generate())
    (tmp_path / "other.note").write_text(sign_checkpoint(other, "another.log/x", 3, b"\0" * 32))
    store = AuditStore(tmp_path / "fresh")
    append(store, 0)
    store.commit()
    store.close()
    assert frs(["audit", "verify", "--store", str(tmp_path / "fresh"), "--vkey",
                signer.verifier_key, "--checkpoint", str(tmp_path / "other.note")]) == 0


def test_missing_segment_fails_at_leaf_zero(log: Path, signer: Signer,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    (log / "leaves.seg").unlink()
    code, out = run_cli(log, signer, capsys)
    assert code == 1 and out["first_bad_index"] == 0
