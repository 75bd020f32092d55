"""Every local state file is created 0600 in a 0700 directory (issue 17 item 6): before,
the audit index and leaves, the tracker, the ledger and the reviews were 0644."""

from __future__ import annotations

import stat
from pathlib import Path

from services.audit.store import AuditStore
from services.dispatch.ledger import SqliteLedger
from services.intake.policy.reviews import ReviewStore
from services.results.store import NonceStore, RequestRefs, TrackerStore
from services.vault import open_db


def _modes(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): stat.S_IMODE(p.stat().st_mode)
            for p in [root, *root.rglob("*")]}


def test_every_store_file_and_directory_is_private(tmp_path: Path) -> None:
    state = tmp_path / "state"
    closers = [
        AuditStore(state / "audit").close,
        open_db(state / "vault" / "intake.db").close,
        SqliteLedger(state / "dispatch" / "ledger.db").close,
        ReviewStore(state / "policy" / "exigent_reviews.sqlite").close,
        TrackerStore(state / "results" / "tracker.sqlite3").close,
        NonceStore(state / "results" / "nonces.sqlite3").close,
    ]
    refs = RequestRefs(state / "results" / "tracker.sqlite3")
    for close in [*closers, refs.close]:
        close()
    modes = _modes(state)
    assert any(name.endswith("leaves.seg") for name in modes), modes
    for name, mode in modes.items():
        path = state / name
        if path.is_dir() and path != state:
            assert mode == 0o700, (name, oct(mode))
        elif path.is_file():
            assert mode & 0o077 == 0, (name, oct(mode))
