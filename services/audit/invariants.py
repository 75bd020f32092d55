"""REQ-INVARIANTS: compliance rules checked continuously as events reach the audit log.

State lives in the audit store's database (SQLite, or PostgreSQL's tables of migration
0008), written in the same transaction as the batch's leaves, so a redelivered record
(already a leaf) is never evaluated twice.
Topics are consumed concurrently, so an event may arrive before the one it depends on
(a dispatch before its clearance): rules that need an earlier event wait a grace period
before they fire; rules about time (dispatch after purge) compare event timestamps.

Liveness (clearance_without_end): each provider a PolicyCleared lists owes an end by its
answer deadline plus ``liveness_grace_s``. The deadline is the dispatch's
``response_due_at`` (what the results tracker times NoResponse from) once the dispatch is
on the log, before that the clearance's ``decided_at`` plus the provider's
``response_deadline_s`` (from the decision's inputs, else the providers registry topic).
A provider's end is CandidatesReceived, NoResponse or DispatchFailed; the probe's end is
ProbeSettled, or ReviewRequested, which hands it to an examiner whose pace is no liveness
matter. A provider that ended still owes its probe's settlement by the last deadline of
the probe's providers plus the grace: the tracker settles once all of them are final, and
a tracker that believes a probe done without saying so is the failure this rule is for.
An ImagePurged is no end: dispatch answers a cleared send of a purged image with
DispatchFailed(image_purged), so a purge that leaves the probe silent is a stall too.

Decisions (unverified_decision, purpose_not_allowed): every PolicyCleared and PolicyDenied
must carry a signature that verifies against an active policy-decisions key from
frs.registry.trusted_keys, as the log has them (schemas/decisions.py); an unsigned or
badly signed one is flagged at once, one signed with a key the log has not shown yet
waits ``clearance_grace_s`` for that key's record. A clearance is flagged for each
provider whose entry, in the decision's own snapshot or as frs.registry.providers last
said, does not allow the probe's purpose."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import cache
from typing import Any

from prometheus_client import Counter

from schemas.decisions import Decision, purpose_faults, unverified
from schemas.envelope import DecodeError, Envelope, Headers
from schemas.events import (
    LEAD_MARKING,
    CandidatesReceived,
    ComplianceViolation,
    DispatchFailed,
    ImagePurged,
    Invariant,
    NoResponse,
    PolicyCleared,
    PolicyDenied,
    ProbeSettled,
    ProbeSubmitted,
    ProviderDispatched,
    ProviderRecord,
    ReviewRequested,
    SupervisorReviewRecorded,
    TrustedKey,
)
from schemas.types import MINIMAL_FIELDS
from services.audit.store import AuditLog

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
CREATE TABLE IF NOT EXISTS inv_liveness (
  probe_id TEXT NOT NULL, provider_id TEXT NOT NULL, clearance_id TEXT,
  cleared_due_at TEXT, dispatched_due_at TEXT, ended TEXT,
  probe_ended INTEGER NOT NULL DEFAULT 0, flagged INTEGER NOT NULL DEFAULT 0,
  PRIMARY KEY (probe_id, provider_id)
);
CREATE INDEX IF NOT EXISTS inv_liveness_open ON inv_liveness(probe_id)
  WHERE clearance_id IS NOT NULL AND probe_ended = 0 AND flagged = 0;
CREATE TABLE IF NOT EXISTS inv_probe_ends (probe_id TEXT PRIMARY KEY, how TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS inv_providers (
  provider_id TEXT PRIMARY KEY, response_deadline_s INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS inv_trusted_keys (key_id TEXT PRIMARY KEY, record TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS inv_provider_purposes (
  provider_id TEXT PRIMARY KEY, purposes TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS inv_decisions_waiting (
  event_id TEXT PRIMARY KEY, probe_id TEXT NOT NULL, key_id TEXT NOT NULL,
  decision_type TEXT NOT NULL, decision TEXT NOT NULL, seen_at TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS inv_decisions_waiting_key ON inv_decisions_waiting(key_id);
CREATE TABLE IF NOT EXISTS inv_violations (
  offending_event_id TEXT NOT NULL, invariant TEXT NOT NULL, probe_id TEXT NOT NULL,
  detected_at TEXT NOT NULL, PRIMARY KEY (offending_event_id, invariant)
);
"""

_WATCHED = (PolicyCleared, PolicyDenied, ProviderDispatched, ImagePurged, ProbeSubmitted,
            SupervisorReviewRecorded, CandidatesReceived, DispatchFailed, NoResponse,
            ProbeSettled, ReviewRequested, ProviderRecord, TrustedKey)
_DECISION_TYPES: dict[str, type[PolicyCleared] | type[PolicyDenied]] = {
    PolicyCleared.TYPE: PolicyCleared, PolicyDenied.TYPE: PolicyDenied}
_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")
_ALLOWED = frozenset(f.value for f in MINIMAL_FIELDS)
# A provider the audit has no record of answers by the registry's own default deadline.
_DEFAULT_RESPONSE_DEADLINE_S = int(ProviderRecord.model_fields["response_deadline_s"].default)
# Covers the results tracker's timer and the consumer lag between the services and the
# audit; the audit's own lag after downtime counts too, since deadlines are judged on its
# clock.
LIVENESS_GRACE_S = 300.0


@cache
def violations_metric() -> Counter:
    return Counter("frs_audit_violations_total", "Compliance violations found, by invariant.",
                   ["invariant"])


@dataclass(frozen=True)
class InvariantSettings:
    clearance_grace_s: float
    expiry_grace_s: float
    exigent_review_s: float = 72 * 3600.0
    liveness_grace_s: float = LIVENESS_GRACE_S


class Invariants:
    def __init__(self, store: AuditLog, settings: InvariantSettings,
                 clock: Callable[[], datetime]) -> None:
        self.store = store
        self.settings = settings
        self.clock = clock
        # Off while a batch that may be rolled back and redone runs (the sequencer): its
        # violations are counted once it commits (``count``).
        self.counting = True
        if not store.readonly:
            # Every invariant's series exists from the start at 0, so increase() sees the
            # first violation as a change rather than as a new series.
            for invariant in Invariant:
                violations_metric().labels(invariant.value)
            store.prepare(SCHEMA)

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
            return self._signed(event, eid) + self._purposes(event, eid) \
                + self._cleared(event, eid)
        if isinstance(event, PolicyDenied):
            return self._signed(event, eid)
        if isinstance(event, TrustedKey):
            return self._trusted_key(event)
        if isinstance(event, ProviderDispatched):
            self._unit_dispatched(event)
            return self._dispatched(event, eid)
        if isinstance(event, ImagePurged):
            return self._purged(event)
        if isinstance(event, ProbeSubmitted):
            self.store.execute(
                "INSERT INTO inv_probes (probe_id, expires_at) VALUES (?, ?)"
                " ON CONFLICT (probe_id) DO NOTHING",
                (event.probe_id, event.expires_at.isoformat()))
            if event.exigent:
                due = event.submitted_at + timedelta(seconds=self.settings.exigent_review_s)
                self.store.execute(
                    "INSERT INTO inv_exigent (probe_id, due_at) VALUES (?, ?)"
                    " ON CONFLICT (probe_id) DO NOTHING", (event.probe_id, due.isoformat()))
            return []
        if isinstance(event, SupervisorReviewRecorded):
            # The review may be consumed before the submission: remember it either way.
            self.store.execute(
                "INSERT INTO inv_exigent (probe_id, due_at, reviewed) VALUES (?, ?, 1)"
                " ON CONFLICT (probe_id) DO UPDATE SET reviewed = 1",
                (event.probe_id, event.reviewed_at.isoformat()))
            return []
        if isinstance(event, CandidatesReceived):
            self._unit_ended(event.probe_id, event.provider_id, "answered")
            # The model already enforces the marking; the raw bytes are what was sent.
            return self._raw_candidates(_json(value), eid, event.probe_id)
        if isinstance(event, NoResponse):
            self._unit_ended(event.probe_id, event.provider_id, "no_response")
        elif isinstance(event, DispatchFailed):
            self._unit_ended(event.probe_id, event.provider_id, "failed")
        elif isinstance(event, ProbeSettled | ReviewRequested):
            self._probe_ended(event.probe_id,
                              "settled" if isinstance(event, ProbeSettled) else "review")
        elif isinstance(event, ProviderRecord):
            self.store.execute(
                "INSERT INTO inv_providers (provider_id, response_deadline_s) VALUES (?, ?)"
                " ON CONFLICT (provider_id) DO UPDATE"
                " SET response_deadline_s = excluded.response_deadline_s",
                (event.provider_id, event.response_deadline_s))
            self.store.execute(
                "INSERT INTO inv_provider_purposes (provider_id, purposes) VALUES (?, ?)"
                " ON CONFLICT (provider_id) DO UPDATE SET purposes = excluded.purposes",
                (event.provider_id, json.dumps([p.value for p in event.allowed_purposes])))
        return []

    # --- decisions: who decided, and for which purpose ----------------------------------

    def _keys(self, key_id: str | None) -> dict[str, TrustedKey]:
        if key_id is None:
            return {}
        row = self.store.query("SELECT record FROM inv_trusted_keys WHERE key_id = ?",
                               (key_id,))
        return {key_id: TrustedKey.model_validate_json(row[0][0])} if row else {}

    def _signed(self, event: Decision, eid: str) -> list[ComplianceViolation]:
        keys = self._keys(event.key_id)
        why = unverified(event, keys)
        if why is None:
            return []
        if event.signature is not None and event.key_id is not None and not keys:
            # The key's record may be on the log, not read yet (topics interleave): the
            # decision waits for it, and is judged when it comes or when the grace ends.
            self.store.execute(
                "INSERT INTO inv_decisions_waiting (event_id, probe_id, key_id,"
                " decision_type, decision, seen_at) VALUES (?,?,?,?,?,?)"
                " ON CONFLICT (event_id) DO NOTHING",
                (eid, event.probe_id, event.key_id, event.TYPE, event.model_dump_json(),
                 self.clock().isoformat()))
            return []
        return self._violation(event.probe_id, Invariant.UNVERIFIED_DECISION, eid,
                               f"{type(event).__name__}: {why}")

    def _trusted_key(self, event: TrustedKey) -> list[ComplianceViolation]:
        self.store.execute(
            "INSERT INTO inv_trusted_keys (key_id, record) VALUES (?, ?)"
            " ON CONFLICT (key_id) DO UPDATE SET record = excluded.record",
            (event.key_id, event.model_dump_json()))
        out = []
        for eid, kind, text in self.store.query(
                "SELECT event_id, decision_type, decision FROM inv_decisions_waiting"
                " WHERE key_id = ?", (event.key_id,)):
            self.store.execute("DELETE FROM inv_decisions_waiting WHERE event_id = ?", (eid,))
            decision = _DECISION_TYPES[kind].model_validate_json(text)
            why = unverified(decision, {event.key_id: event})
            if why is not None:
                out += self._violation(decision.probe_id, Invariant.UNVERIFIED_DECISION, eid,
                                       f"{type(decision).__name__}: {why}")
        return out

    def _purposes(self, event: PolicyCleared, eid: str) -> list[ComplianceViolation]:
        ids = sorted({c.provider_id for c in event.cleared})
        marks = ",".join("?" * len(ids))
        allowed = {pid: json.loads(purposes) for pid, purposes in self.store.query(
            f"SELECT provider_id, purposes FROM inv_provider_purposes"
            f" WHERE provider_id IN ({marks})", tuple(ids))}
        out = []
        for pid, why in purpose_faults(event, allowed).items():
            # One violation per provider: the offending id names the pair.
            out += self._violation(event.probe_id, Invariant.PURPOSE_NOT_ALLOWED,
                                   f"{eid}/{pid}", f"cleared {pid}: {why}")
        return out

    def _cleared(self, event: PolicyCleared, clearance_id: str) -> list[ComplianceViolation]:
        for c in event.cleared:
            fields = sorted({f.value for f in c.fields})
            self.store.execute(
                "INSERT INTO inv_cleared (probe_id, provider_id, fields) VALUES (?,?,?)"
                " ON CONFLICT (probe_id, provider_id) DO UPDATE SET fields = excluded.fields",
                (event.probe_id, c.provider_id, json.dumps(fields)))
            due = event.decided_at + timedelta(
                seconds=self._response_deadline_s(event, c.provider_id))
            # The first clearance names the obligation: a later copy neither resets its
            # deadline nor renames its violation.
            self.store.execute(
                _UNIT.format(columns="clearance_id, cleared_due_at", values="?, ?",
                             update="clearance_id = COALESCE(l.clearance_id, ?),"
                                    " cleared_due_at = COALESCE(l.cleared_due_at, ?)"),
                (event.probe_id, c.provider_id, clearance_id, due.isoformat(), event.probe_id,
                 clearance_id, due.isoformat()))
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
            "SELECT (SELECT fields FROM inv_cleared WHERE probe_id = ? AND provider_id = ?),"
            " (SELECT purged_at FROM inv_purged WHERE probe_id = ?)",
            (event.probe_id, event.provider_id, event.probe_id))
        cleared = set(json.loads(cleared_json)) if cleared_json is not None else None
        self.store.execute(
            "INSERT INTO inv_dispatches (event_id, probe_id, provider_id, fields,"
            " sent_at, seen_at, cleared) VALUES (?,?,?,?,?,?,?) ON CONFLICT (event_id) DO NOTHING",
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

    def _response_deadline_s(self, event: PolicyCleared, provider_id: str) -> int:
        """The provider's answer deadline as the decision read it, else as the providers
        registry topic last said, else the registry's default."""
        for record in event.inputs.providers if event.inputs is not None else ():
            if record.provider_id == provider_id:
                return record.response_deadline_s
        row = self.store.query(
            "SELECT response_deadline_s FROM inv_providers WHERE provider_id = ?",
            (provider_id,))
        return int(row[0][0]) if row else _DEFAULT_RESPONSE_DEADLINE_S

    def _unit_dispatched(self, event: ProviderDispatched) -> None:
        # A resend may move the deadline later: the latest one is the tracker's.
        due = event.response_due_at.isoformat()
        self.store.execute(
            _UNIT.format(columns="dispatched_due_at", values="?",
                         update="dispatched_due_at = CASE WHEN l.dispatched_due_at >= ?"
                                " THEN l.dispatched_due_at ELSE ? END"),
            (event.probe_id, event.provider_id, due, event.probe_id, due, due))

    def _unit_ended(self, probe_id: str, provider_id: str, how: str) -> None:
        self.store.execute(
            _UNIT.format(columns="ended", values="?", update="ended = COALESCE(l.ended, ?)"),
            (probe_id, provider_id, how, probe_id, how))

    def _probe_ended(self, probe_id: str, how: str) -> None:
        # Kept per probe as well: a clearance consumed after its settlement is born ended.
        self.store.execute("INSERT INTO inv_probe_ends (probe_id, how) VALUES (?, ?)"
                           " ON CONFLICT (probe_id) DO NOTHING", (probe_id, how))
        self.store.execute("UPDATE inv_liveness SET probe_ended = 1 WHERE probe_id = ?",
                           (probe_id,))

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
            "INSERT INTO inv_purged (probe_id, purged_at) VALUES (?, ?)"
            " ON CONFLICT (probe_id) DO NOTHING", (event.probe_id, event.purged_at.isoformat()))
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
        """Every rule that fires on the absence of an event after a deadline, judged at the
        clock: for a log that is read whole (replay, tests)."""
        now = self.clock()
        return self.deadline_rules(now) + self.liveness(now)

    def deadline_rules(self, now: datetime) -> list[ComplianceViolation]:
        """The other rules on absences, judged as of ``now``: a time before which the log
        holds every event (the service's complete-until; the clock for a whole log).
        ``seen_at`` is when the audit took a dispatch in, after it was written, so its
        clearance (written before it) is in a log complete until ``seen_at``."""
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
        for eid, probe_id, key_id in self.store.query(
                "SELECT event_id, probe_id, key_id FROM inv_decisions_waiting"
                " WHERE seen_at <= ?", (seen_before,)):
            self.store.execute("DELETE FROM inv_decisions_waiting WHERE event_id = ?", (eid,))
            out += self._violation(probe_id, Invariant.UNVERIFIED_DECISION, eid,
                                   f"signed with key {key_id}, which the trusted-keys "
                                   f"registry did not show within "
                                   f"{self.settings.clearance_grace_s:g}s")
        for probe_id, due_at in self.store.query(
                "SELECT probe_id, due_at FROM inv_exigent WHERE reviewed = 0 AND flagged = 0"):
            if datetime.fromisoformat(due_at) > now:
                continue
            self.store.execute("UPDATE inv_exigent SET flagged = 1 WHERE probe_id = ?",
                               (probe_id,))
            out += self._violation(probe_id, Invariant.EXIGENT_WITHOUT_REVIEW, probe_id,
                                   f"exigent probe without a supervisor review by {due_at}")
        return out

    def liveness(self, complete_until: datetime) -> list[ComplianceViolation]:
        """clearance_without_end, judged as of ``complete_until``: a time before which every
        record is in the log. An end lives on other topics than its clearance, so a
        lagging audit (a restart, a rebuild) must not take ends it has not read yet for
        missing ones."""
        grace = self.settings.liveness_grace_s
        cutoff = (complete_until - timedelta(seconds=grace)).isoformat()
        out = []
        for probe_id, provider, clearance_id, due, ended, last_due in self.store.query(
                "SELECT probe_id, provider_id, clearance_id, COALESCE(dispatched_due_at,"
                " cleared_due_at) AS due, ended, (SELECT MAX(COALESCE(o.dispatched_due_at,"
                " o.cleared_due_at)) FROM inv_liveness o WHERE o.probe_id = l.probe_id"
                " AND o.clearance_id IS NOT NULL) FROM inv_liveness l"
                " WHERE clearance_id IS NOT NULL AND probe_ended = 0 AND flagged = 0"
                " AND COALESCE(dispatched_due_at, cleared_due_at) <= ?", (cutoff,)):
            if ended is None:
                detail = (f"cleared for {provider}: no answer, NoResponse or DispatchFailed"
                          f" by its deadline {due} + {grace:g}s")
            elif last_due <= cutoff:
                detail = (f"{provider} ended ({ended}) but the probe did not settle by its"
                          f" last deadline {last_due} + {grace:g}s")
            else:
                continue  # this provider is done; another's deadline is still open
            self.store.execute(
                "UPDATE inv_liveness SET flagged = 1 WHERE probe_id = ? AND provider_id = ?",
                (probe_id, provider))
            # One clearance may list several providers: each is its own obligation.
            out += self._violation(probe_id, Invariant.CLEARANCE_WITHOUT_END,
                                   f"{clearance_id}/{provider}", detail)
        return out

    def _violation(self, probe_id: str, invariant: Invariant, eid: str,
                   detail: str) -> list[ComplianceViolation]:
        # Asked, not told by the insert's row count: the sequencer sends its writes without
        # waiting for their answers (pg_store.pipelined). One writer at a time, so the
        # answer holds until the insert.
        if self.store.query("SELECT 1 FROM inv_violations WHERE offending_event_id = ?"
                            " AND invariant = ?", (eid, invariant.value)):
            return []  # already reported
        now = self.clock()
        self.store.execute(
            "INSERT INTO inv_violations (offending_event_id, invariant, probe_id,"
            " detected_at) VALUES (?,?,?,?) ON CONFLICT (offending_event_id, invariant)"
            " DO NOTHING", (eid, invariant.value, probe_id, now.isoformat()))
        if self.counting:
            violations_metric().labels(invariant.value).inc()
        return [ComplianceViolation(probe_id=probe_id, invariant=invariant, detail=detail[:2000],
                                    offending_event_id=eid, detected_at=now)]


def count(violations: list[ComplianceViolation]) -> None:
    """The metric for violations found while ``Invariants.counting`` was off."""
    for violation in violations:
        violations_metric().labels(violation.invariant.value).inc()


# One row per (probe, provider) obligation, made by whichever of its events comes first
# (topics interleave); every insert asks whether the probe has already ended. Arguments:
# probe, provider, the values, probe again, then the update's. The same text runs on
# SQLite and PostgreSQL (``l.`` names the row already there).
_UNIT = ("INSERT INTO inv_liveness AS l (probe_id, provider_id, {columns}, probe_ended)"
         " VALUES (?, ?, {values}, CASE WHEN EXISTS (SELECT 1 FROM inv_probe_ends e"
         " WHERE e.probe_id = ?) THEN 1 ELSE 0 END)"
         " ON CONFLICT (probe_id, provider_id) DO UPDATE SET {update}")


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
