"""REQ-INVARIANTS: compliance rules checked continuously as events reach the audit log.

State lives in the audit store's SQLite database, written in the same transaction as
the batch's leaves, so a redelivered record (already a leaf) is never evaluated twice.
Topics are consumed concurrently, so an event may arrive before the one it depends on
(a dispatch before its clearance): rules that need an earlier event wait a grace period
before they fire; rules about time (dispatch after purge) compare event timestamps."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import cache
from typing import Any

from prometheus_client import Counter

from schemas.envelope import DecodeError, Envelope, Headers
from schemas.events import (
    LEAD_MARKING,
    CandidatesReceived,
    ComplianceViolation,
    ImagePurged,
    Invariant,
    PolicyCleared,
    ProbeSubmitted,
    ProviderDispatched,
    SupervisorReviewRecorded,
)
from schemas.types import MINIMAL_FIELDS
from services.audit.store import AuditStore

SCHEMA = """
CREATE TABLE IF NOT EXISTS inv_cleared (
  probe_id TEXT NOT NULL, provider_id TEXT NOT NULL, fields TEXT NOT NULL,
  PRIMARY KEY (probe_id, provider_id)
);
CREATE TABLE IF NOT EXISTS inv_dispatches (
  event_id TEXT PRIMARY KEY, probe_id TEXT NOT NULL, provider_id TEXT NOT NULL,
  fields TEXT NOT NULL, sent_at TEXT NOT NULL, seen_at TEXT NOT NULL,
  cleared INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS inv_dispatches_probe ON inv_dispatches(probe_id);
CREATE TABLE IF NOT EXISTS inv_purged (probe_id TEXT PRIMARY KEY, purged_at TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS inv_probes (
  probe_id TEXT PRIMARY KEY, expires_at TEXT NOT NULL, flagged INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS inv_exigent (
  probe_id TEXT PRIMARY KEY, due_at TEXT NOT NULL, reviewed INTEGER NOT NULL DEFAULT 0,
  flagged INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS inv_violations (
  offending_event_id TEXT NOT NULL, invariant TEXT NOT NULL, probe_id TEXT NOT NULL,
  detected_at TEXT NOT NULL, PRIMARY KEY (offending_event_id, invariant)
);
"""

_WATCHED = (PolicyCleared, ProviderDispatched, ImagePurged, ProbeSubmitted,
            SupervisorReviewRecorded, CandidatesReceived)
_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")
_ALLOWED = frozenset(f.value for f in MINIMAL_FIELDS)


@cache
def violations_metric() -> Counter:
    return Counter("frs_audit_violations_total", "Compliance violations found, by invariant.",
                   ["invariant"])


@dataclass(frozen=True)
class InvariantSettings:
    clearance_grace_s: float
    expiry_grace_s: float
    exigent_review_s: float = 72 * 3600.0


class Invariants:
    def __init__(self, store: AuditStore, settings: InvariantSettings,
                 clock: Callable[[], datetime]) -> None:
        self.store = store
        self.settings = settings
        self.clock = clock
        if not store.readonly:
            # Every invariant's series exists from the start at 0, so increase() sees the
            # first violation as a change rather than as a new series.
            for invariant in Invariant:
                violations_metric().labels(invariant.value)
            for stmt in SCHEMA.split(";"):
                if stmt.strip():
                    store.execute(stmt)
            store.commit()

    # --- per record --------------------------------------------------------------------

    def concerns(self, topic: str, decoded: Envelope | DecodeError) -> bool:
        """Whether ``observe`` has anything to do with this record (most have not)."""
        if topic.startswith("frs.dlq."):
            return False
        if isinstance(decoded, DecodeError):
            return True
        return isinstance(decoded.event, _WATCHED)

    def observe(self, topic: str, headers: Headers | None, value: bytes | None,
                decoded: Envelope | DecodeError) -> list[ComplianceViolation]:
        if topic.startswith("frs.dlq."):
            return []  # a copy of a record already seen on its own topic
        if isinstance(decoded, DecodeError):
            return self._raw(headers or [], value)
        event, eid = decoded.event, decoded.id
        if isinstance(event, PolicyCleared):
            return self._cleared(event)
        if isinstance(event, ProviderDispatched):
            return self._dispatched(event, eid)
        if isinstance(event, ImagePurged):
            return self._purged(event)
        if isinstance(event, ProbeSubmitted):
            self.store.execute(
                "INSERT OR IGNORE INTO inv_probes (probe_id, expires_at) VALUES (?, ?)",
                (event.probe_id, event.expires_at.isoformat()))
            if event.exigent:
                due = event.submitted_at + timedelta(seconds=self.settings.exigent_review_s)
                self.store.execute(
                    "INSERT OR IGNORE INTO inv_exigent (probe_id, due_at) VALUES (?, ?)",
                    (event.probe_id, due.isoformat()))
            return []
        if isinstance(event, SupervisorReviewRecorded):
            # The review may be consumed before the submission: remember it either way.
            self.store.execute(
                "INSERT INTO inv_exigent (probe_id, due_at, reviewed) VALUES (?, ?, 1)"
                " ON CONFLICT DO UPDATE SET reviewed = 1",
                (event.probe_id, event.reviewed_at.isoformat()))
            return []
        if isinstance(event, CandidatesReceived):
            # The model already enforces the marking; the raw bytes are what was sent.
            return self._raw_candidates(_json(value), eid, event.probe_id)
        return []

    def _cleared(self, event: PolicyCleared) -> list[ComplianceViolation]:
        for c in event.cleared:
            fields = sorted({f.value for f in c.fields})
            self.store.execute(
                "INSERT INTO inv_cleared (probe_id, provider_id, fields) VALUES (?,?,?)"
                " ON CONFLICT DO UPDATE SET fields = excluded.fields",
                (event.probe_id, c.provider_id, json.dumps(fields)))
        out = []
        # Dispatches that arrived before this clearance are judged now.
        for eid, provider, fields_json in self.store.query(
                "SELECT event_id, provider_id, fields FROM inv_dispatches"
                " WHERE probe_id = ? AND cleared = 0", (event.probe_id,)):
            cleared = self._cleared_fields(event.probe_id, provider)
            if cleared is None:
                continue
            self.store.execute("UPDATE inv_dispatches SET cleared = 1 WHERE event_id = ?",
                               (eid,))
            out += self._check_fields(event.probe_id, provider, json.loads(fields_json),
                                      cleared, eid)
        return out

    def _cleared_fields(self, probe_id: str, provider_id: str) -> set[str] | None:
        row = self.store.query(
            "SELECT fields FROM inv_cleared WHERE probe_id = ? AND provider_id = ?",
            (probe_id, provider_id))
        return set(json.loads(row[0][0])) if row else None

    def _dispatched(self, event: ProviderDispatched, eid: str) -> list[ComplianceViolation]:
        fields = sorted(f.value for f in event.fields_sent)
        # One query for both facts this rule needs: the clearance and any purge.
        ((cleared_json, purged_at),) = self.store.query(
            "SELECT (SELECT fields FROM inv_cleared WHERE probe_id = ?1 AND provider_id = ?2),"
            " (SELECT purged_at FROM inv_purged WHERE probe_id = ?1)",
            (event.probe_id, event.provider_id))
        cleared = set(json.loads(cleared_json)) if cleared_json is not None else None
        self.store.execute(
            "INSERT OR IGNORE INTO inv_dispatches (event_id, probe_id, provider_id, fields,"
            " sent_at, seen_at, cleared) VALUES (?,?,?,?,?,?,?)",
            (eid, event.probe_id, event.provider_id, json.dumps(fields),
             event.sent_at.isoformat(), self.clock().isoformat(), int(cleared is not None)))
        out = []
        if cleared is not None:
            out += self._check_fields(event.probe_id, event.provider_id, fields, cleared, eid)
        if purged_at is not None and datetime.fromisoformat(purged_at) <= event.sent_at:
            out += self._violation(event.probe_id, Invariant.DISPATCH_AFTER_PURGE, eid,
                                   f"sent to {event.provider_id} at {event.sent_at.isoformat()}"
                                   f" after the image was purged at {purged_at}")
        return out

    def _check_fields(self, probe_id: str, provider: str, sent: list[str],
                      cleared: set[str], eid: str) -> list[ComplianceViolation]:
        extra = sorted(set(sent) - (cleared & _ALLOWED))
        if not extra:
            return []
        return self._violation(probe_id, Invariant.EXTRA_FIELDS_SENT, eid,
                               f"sent {extra} to {provider} outside the cleared fields "
                               f"{sorted(cleared & _ALLOWED)}")

    def _purged(self, event: ImagePurged) -> list[ComplianceViolation]:
        if event.object_kind != "probe":
            return []
        self.store.execute(
            "INSERT OR IGNORE INTO inv_purged (probe_id, purged_at) VALUES (?, ?)",
            (event.probe_id, event.purged_at.isoformat()))
        out = []
        # Dispatches consumed before the purge record but sent after the purge.
        for eid, provider, sent_at in self.store.query(
                "SELECT event_id, provider_id, sent_at FROM inv_dispatches WHERE probe_id = ?",
                (event.probe_id,)):
            if datetime.fromisoformat(sent_at) >= event.purged_at:
                out += self._violation(event.probe_id, Invariant.DISPATCH_AFTER_PURGE, eid,
                                       f"sent to {provider} at {sent_at} after the image was"
                                       f" purged at {event.purged_at.isoformat()}")
        return out

    # --- records the models refuse: judged from their raw JSON ---------------------------

    def _raw(self, headers: Headers, value: bytes | None) -> list[ComplianceViolation]:
        header = dict(headers)
        ce_type = header.get("ce_type", b"").decode(errors="replace")
        eid = header.get("ce_id", b"").decode(errors="replace") or "unknown"
        data = _json(value)
        probe_id = _probe_id(data, header)
        if ce_type == CandidatesReceived.TYPE:
            return self._raw_candidates(data, eid, probe_id)
        if ce_type == ProviderDispatched.TYPE:
            sent = data.get("fields_sent")
            names = [str(f) for f in sent] if isinstance(sent, list) else []
            extra = sorted(set(names) - _ALLOWED)
            if extra or not isinstance(sent, list):
                return self._violation(probe_id, Invariant.EXTRA_FIELDS_SENT, eid,
                                       f"dispatch record lists fields outside the minimal "
                                       f"set: {extra[:10] or 'unreadable fields_sent'}")
        return []

    def _raw_candidates(self, data: dict[str, Any], eid: str,
                        probe_id: str) -> list[ComplianceViolation]:
        marking, mode = data.get("lead_marking"), data.get("mode")
        if marking == LEAD_MARKING and mode == "investigative":
            return []
        return self._violation(probe_id, Invariant.CANDIDATES_WITHOUT_LEAD_MARKING, eid,
                               f"candidate list with lead_marking={str(marking)[:80]!r} "
                               f"mode={str(mode)[:40]!r}")

    # --- timers ------------------------------------------------------------------------

    def tick(self) -> list[ComplianceViolation]:
        """Rules that fire on the absence of an event after a deadline."""
        now = self.clock()
        out = []
        seen_before = (now - timedelta(seconds=self.settings.clearance_grace_s)).isoformat()
        for eid, probe_id, provider in self.store.query(
                "SELECT event_id, probe_id, provider_id FROM inv_dispatches"
                " WHERE cleared = 0 AND seen_at <= ?", (seen_before,)):
            self.store.execute("UPDATE inv_dispatches SET cleared = -1 WHERE event_id = ?",
                               (eid,))
            out += self._violation(probe_id, Invariant.DISPATCH_WITHOUT_CLEARANCE, eid,
                                   f"dispatched to {provider} without a PolicyCleared "
                                   f"listing that provider")
        expired_before = now - timedelta(seconds=self.settings.expiry_grace_s)
        for probe_id, expires_at in self.store.query(
                "SELECT p.probe_id, p.expires_at FROM inv_probes p WHERE p.flagged = 0 AND"
                " NOT EXISTS (SELECT 1 FROM inv_purged u WHERE u.probe_id = p.probe_id)"):
            if datetime.fromisoformat(expires_at) > expired_before:
                continue
            self.store.execute("UPDATE inv_probes SET flagged = 1 WHERE probe_id = ?",
                               (probe_id,))
            out += self._violation(probe_id, Invariant.IMAGE_PAST_EXPIRY, probe_id,
                                   f"image expired at {expires_at} and no purge was recorded "
                                   f"within {self.settings.expiry_grace_s:g}s")
        for probe_id, due_at in self.store.query(
                "SELECT probe_id, due_at FROM inv_exigent WHERE reviewed = 0 AND flagged = 0"):
            if datetime.fromisoformat(due_at) > now:
                continue
            self.store.execute("UPDATE inv_exigent SET flagged = 1 WHERE probe_id = ?",
                               (probe_id,))
            out += self._violation(probe_id, Invariant.EXIGENT_WITHOUT_REVIEW, probe_id,
                                   f"exigent probe without a supervisor review by {due_at}")
        return out

    def _violation(self, probe_id: str, invariant: Invariant, eid: str,
                   detail: str) -> list[ComplianceViolation]:
        now = self.clock()
        cur = self.store.execute(
            "INSERT OR IGNORE INTO inv_violations (offending_event_id, invariant, probe_id,"
            " detected_at) VALUES (?,?,?,?)", (eid, invariant.value, probe_id, now.isoformat()))
        if cur.rowcount == 0:
            return []  # already reported
        violations_metric().labels(invariant.value).inc()
        return [ComplianceViolation(probe_id=probe_id, invariant=invariant, detail=detail[:2000],
                                    offending_event_id=eid, detected_at=now)]


def _json(value: bytes | None) -> dict[str, Any]:
    try:
        data = json.loads(value or b"")
    except (ValueError, UnicodeDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def _probe_id(data: dict[str, Any], header: dict[str, bytes]) -> str:
    for candidate in (data.get("probe_id"), header.get("ce_subject", b"").decode(errors="replace")):
        if isinstance(candidate, str) and _ID.match(candidate):
            return candidate
    return "unknown"
