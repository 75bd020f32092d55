"""on_probe_requested: one outcome per request id, the right reason, a vaulted probe; a
request id bound to its request's content."""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import sqlite3
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from schemas.envelope import DecodeError
from schemas.events import ProbeRejected, ProbeRequested, ProbeSubmitted, RejectReason
from schemas.sealed import encrypt_image
from schemas.types import ImageSource, Purpose, probe_id_for, reused_probe_id
from services.intake import handlers
from services.intake.outcomes import OutcomeLog
from services.intake.sanitize import sanitize
from services.kit.signals import NotYet
from tests import intake_samples as s
from tests.unit.fakes import index_db, tmp_vault

T0 = datetime(2026, 1, 1, tzinfo=UTC)


@pytest.fixture
def ports(tmp_path: Path) -> handlers.IntakePorts:
    vault = tmp_vault(tmp_path)
    return handlers.IntakePorts(private_key=X25519PrivateKey.generate(), clock=lambda: T0,
                                image_ttl=timedelta(hours=72), vault=vault,
                                outcomes=OutcomeLog(index_db(vault)))


def request(ports: handlers.IntakePorts, image: bytes, request_id: str = "req-1",
            **fields: object) -> ProbeRequested:
    values: dict[str, object] = dict(
        request_id=request_id, case_id="CASE-1", agent_id="agent-7",
        purpose=Purpose.HUMAN_TRAFFICKING, roi_refs=["ROI-1"],
        image_source=ImageSource.SURVEILLANCE, unedited_attestation=True,
        image=encrypt_image(image, ports.private_key.public_key(), request_id),
    )
    values.update(fields)
    return ProbeRequested.model_validate(values)


async def test_valid_request_is_vaulted_and_submitted(ports: handlers.IntakePorts) -> None:
    image = s.jpeg_with_metadata()
    [out] = await handlers.on_probe_requested(request(ports, image), ports)
    assert isinstance(out, ProbeSubmitted)
    assert out.probe_id == probe_id_for("req-1")
    assert out.received_sha256 == hashlib.sha256(image).hexdigest()
    assert out.sanitized_sha256 == sanitize(image).sanitized_sha256
    assert out.quality is not None and out.quality.passed and out.quality.faces_found == 1
    assert out.expires_at == T0 + timedelta(hours=72) and out.image_format == "jpeg"
    stored = ports.vault.get(out.vault_ref)
    assert hashlib.sha256(stored).hexdigest() == out.sanitized_sha256
    assert b"SecretCam" not in stored


def vault_objects(ports: handlers.IntakePorts) -> int:
    n: int = index_db(ports.vault).execute("SELECT COUNT(*) FROM vault_objects").fetchone()[0]
    return n


async def test_redelivery_yields_the_original_outcome_without_decrypting(
        ports: handlers.IntakePorts, monkeypatch: pytest.MonkeyPatch) -> None:
    req = request(ports, s.face_jpeg())
    decrypted: list[str] = []
    real = handlers.decrypt_image

    def counting(*args: object) -> bytes:
        decrypted.append("x")
        return real(*args)  # type: ignore[arg-type]
    monkeypatch.setattr(handlers, "decrypt_image", counting)
    [first] = await handlers.on_probe_requested(req, ports)
    [again] = await handlers.on_probe_requested(req, ports)
    assert isinstance(first, ProbeSubmitted) and again == first
    assert len(decrypted) == 1  # the identical record is recognized by its digest
    assert vault_objects(ports) == 1


async def test_the_same_photo_re_encrypted_gets_the_same_outcome(
        ports: handlers.IntakePorts) -> None:
    first_req = request(ports, s.face_jpeg())
    [first] = await handlers.on_probe_requested(first_req, ports)
    # A client retry: the same fields and photo, a fresh encryption and a later clock.
    retry = request(ports, s.face_jpeg(), requested_at=T0 + timedelta(minutes=5))
    assert retry.image.ciphertext != first_req.image.ciphertext
    [again] = await handlers.on_probe_requested(retry, ports)
    assert isinstance(first, ProbeSubmitted) and again == first
    assert vault_objects(ports) == 1


@pytest.mark.parametrize("change", ["purpose", "photo", "roi", "attestation"])
async def test_the_same_id_with_other_content_is_request_id_reused(
        ports: handlers.IntakePorts, change: str) -> None:
    [first] = await handlers.on_probe_requested(request(ports, s.face_jpeg()), ports)
    other = {
        "purpose": lambda: request(ports, s.face_jpeg(), purpose=Purpose.FINANCIAL_FRAUD),
        "photo": lambda: request(ports, s.face_png()),
        "roi": lambda: request(ports, s.face_jpeg(), roi_refs=["ROI-1", "ROI-2"]),
        "attestation": lambda: request(ports, s.face_jpeg(), unedited_attestation=False),
    }[change]()
    [out] = await handlers.on_probe_requested(other, ports)
    assert isinstance(out, ProbeRejected) and out.reason is RejectReason.REQUEST_ID_REUSED
    assert out.request_id == "req-1"
    # Its own probe id: nothing keyed by the original probe id sees this rejection.
    assert out.probe_id == reused_probe_id("req-1") != first.probe_id
    assert await ports.outcomes.get("req-1") == first  # the binding is unchanged
    assert vault_objects(ports) == 1
    # A redelivery of the refused request: the same rejection, even later.
    later = dataclasses.replace(ports, clock=lambda: T0 + timedelta(hours=1))
    assert await handlers.on_probe_requested(other, later) == [out]
    # The original request still gets its own outcome.
    assert await handlers.on_probe_requested(request(ports, s.face_jpeg()), ports) == [first]


async def test_a_rejected_request_id_is_bound_too(ports: handlers.IntakePorts) -> None:
    [first] = await handlers.on_probe_requested(request(ports, s.no_face_jpeg()), ports)
    assert isinstance(first, ProbeRejected) and first.reason is RejectReason.NO_FACE
    assert await handlers.on_probe_requested(request(ports, s.no_face_jpeg()), ports) == [first]
    [out] = await handlers.on_probe_requested(request(ports, s.face_jpeg()), ports)
    assert isinstance(out, ProbeRejected) and out.reason is RejectReason.REQUEST_ID_REUSED
    assert vault_objects(ports) == 0


async def test_an_undecryptable_request_is_bound_by_its_ciphertext(
        ports: handlers.IntakePorts) -> None:
    def wrong_key() -> ProbeRequested:
        return request(ports, s.face_jpeg()).model_copy(update={"image": encrypt_image(
            s.face_jpeg(), X25519PrivateKey.generate().public_key(), "req-1")})
    req = wrong_key()
    [first] = await handlers.on_probe_requested(req, ports)
    assert isinstance(first, ProbeRejected) and first.reason is RejectReason.UNDECRYPTABLE
    assert await handlers.on_probe_requested(req, ports) == [first]
    [out] = await handlers.on_probe_requested(wrong_key(), ports)
    assert isinstance(out, ProbeRejected) and out.reason is RejectReason.REQUEST_ID_REUSED


async def test_the_reuse_is_logged_without_image_or_key(
        ports: handlers.IntakePorts, caplog: pytest.LogCaptureFixture) -> None:
    await handlers.on_probe_requested(request(ports, s.face_jpeg()), ports)
    other = request(ports, s.face_jpeg(), purpose=Purpose.FINANCIAL_FRAUD)
    with caplog.at_level(logging.INFO, logger="frs.intake"):
        await handlers.on_probe_requested(other, ports)
    [line] = [r for r in caplog.records if r.getMessage() == "request id reused"]
    assert line.__dict__["probe_id"] == reused_probe_id("req-1")
    assert line.__dict__["original_probe_id"] == probe_id_for("req-1")
    logged = " ".join(str(v) for v in line.__dict__.values())
    for secret in (other.image.ciphertext[:40], other.image.ephemeral_public_key,
                   other.image.nonce):
        assert secret not in logged


def forget_digests(ports: handlers.IntakePorts) -> None:
    """Make the recorded rows look like rows written before the binding existed."""
    ports.outcomes.conn.execute(
        "UPDATE request_outcomes SET content_sha256 = NULL, record_sha256 = NULL")


async def test_a_submission_recorded_without_digest_is_bound_by_its_fields(
        ports: handlers.IntakePorts) -> None:
    [first] = await handlers.on_probe_requested(request(ports, s.face_jpeg()), ports)
    forget_digests(ports)
    # A ProbeSubmitted carries the request's fields and received image digest: enough.
    [out] = await handlers.on_probe_requested(
        request(ports, s.face_jpeg(), purpose=Purpose.FINANCIAL_FRAUD), ports)
    assert isinstance(out, ProbeRejected) and out.reason is RejectReason.REQUEST_ID_REUSED
    [again] = await handlers.on_probe_requested(request(ports, s.face_jpeg()), ports)
    assert again == first
    found = await ports.outcomes.find("req-1")
    assert found is not None and found.content_sha256 is not None  # bound from now on
    [other_photo] = await handlers.on_probe_requested(request(ports, s.face_png()), ports)
    assert isinstance(other_photo, ProbeRejected)
    assert other_photo.reason is RejectReason.REQUEST_ID_REUSED


async def test_a_rejection_recorded_without_digest_stands(ports: handlers.IntakePorts) -> None:
    [first] = await handlers.on_probe_requested(request(ports, s.no_face_jpeg()), ports)
    forget_digests(ports)
    # Its content is unknown: the recorded rejection, never a second kind of outcome.
    assert await handlers.on_probe_requested(request(ports, s.face_jpeg()), ports) == [first]
    assert vault_objects(ports) == 0


async def test_an_outcome_file_from_before_the_binding_keeps_working(tmp_path: Path) -> None:
    old = ProbeRejected(probe_id=probe_id_for("r-old"), request_id="r-old",
                        reason=RejectReason.NO_FACE, detail="d", rejected_at=T0)
    conn = sqlite3.connect(tmp_path / "intake.db", isolation_level=None)
    conn.executescript("CREATE TABLE request_outcomes (request_id TEXT PRIMARY KEY, "
                       "probe_id TEXT NOT NULL, event_type TEXT NOT NULL, "
                       "event_json TEXT NOT NULL);")
    conn.execute("INSERT INTO request_outcomes VALUES (?,?,?,?)",
                 ("r-old", old.probe_id, old.TYPE, old.model_dump_json()))
    log = OutcomeLog(conn)
    found = await log.find("r-old")
    assert found is not None and found.event == old and found.content_sha256 is None
    await log.record("r-new", old.model_copy(update={"request_id": "r-new"}),
                     content_sha256="c", record_sha256="r")
    found = await OutcomeLog(conn).find("r-new")  # a second open adds nothing twice
    assert found is not None and (found.content_sha256, found.record_sha256) == ("c", "r")


async def test_rejections(ports: handlers.IntakePorts) -> None:
    cases: list[tuple[ProbeRequested, RejectReason]] = [
        (request(ports, s.face_jpeg(), "r-attest", unedited_attestation=False),
         RejectReason.NOT_ATTESTED_UNEDITED),
        (request(ports, s.gif_bytes(), "r-gif"), RejectReason.UNSUPPORTED_FORMAT),
        (request(ports, s.png_bomb(), "r-bomb"), RejectReason.TOO_MANY_PIXELS),
        (request(ports, s.jpeg_zip_polyglot(), "r-zip"), RejectReason.POLYGLOT),
        (request(ports, s.no_face_jpeg(), "r-noface"), RejectReason.NO_FACE),
        (request(ports, s.blurred_face_jpeg(), "r-blur"), RejectReason.TOO_BLURRED),
    ]
    wrong_key = request(ports, s.face_jpeg(), "r-key").model_copy(update={
        "image": encrypt_image(s.face_jpeg(), X25519PrivateKey.generate().public_key(),
                               "r-key")})
    cases.append((wrong_key, RejectReason.UNDECRYPTABLE))
    for req, reason in cases:
        [out] = await handlers.on_probe_requested(req, ports)
        assert isinstance(out, ProbeRejected), req.request_id
        assert out.reason == reason, (req.request_id, out.detail)
        assert out.probe_id == probe_id_for(req.request_id)
    n = index_db(ports.vault).execute("SELECT COUNT(*) FROM vault_objects").fetchone()[0]
    assert n == 0  # nothing rejected reaches the vault


async def test_invalid_record_gets_one_recorded_outcome(ports: handlers.IntakePorts) -> None:
    err = DecodeError("invalid_event", "purpose: enum")
    [first] = await handlers.on_invalid_request(b"req-bad", b"{1}", err, ports)
    assert isinstance(first, ProbeRejected) and first.reason == RejectReason.INVALID_FIELDS
    [again] = await handlers.on_invalid_request(b"req-bad", b"{1}", err, ports)
    assert again == first
    [other] = await handlers.on_invalid_request(b"req-bad", b"{2}", err, ports)
    assert isinstance(other, ProbeRejected) and other.reason is RejectReason.REQUEST_ID_REUSED


async def test_an_invalid_record_under_a_used_id_is_request_id_reused(
        ports: handlers.IntakePorts) -> None:
    [first] = await handlers.on_probe_requested(request(ports, s.face_jpeg()), ports)
    err = DecodeError("invalid_event", "purpose: enum")
    [out] = await handlers.on_invalid_request(b"req-1", b"{}", err, ports)
    assert isinstance(out, ProbeRejected) and out.reason is RejectReason.REQUEST_ID_REUSED
    assert out.probe_id != first.probe_id


async def test_image_work_off_the_event_loop(ports: handlers.IntakePorts) -> None:
    import threading
    from concurrent.futures import ThreadPoolExecutor

    seen: list[str] = []
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="intake-image") as worker:
        def run(fn: object, *args: object) -> object:
            seen.append(threading.current_thread().name)
            return fn(*args)  # type: ignore[operator]

        threaded = dataclasses.replace(ports, image_worker=worker)
        original = handlers._examine
        handlers._examine = lambda *a: run(original, *a)  # type: ignore[assignment]
        try:
            [ok] = await handlers.on_probe_requested(request(ports, s.face_jpeg(), "t-ok"),
                                                     threaded)
            [bad] = await handlers.on_probe_requested(
                request(ports, s.jpeg_zip_polyglot(), "t-bad"), threaded)
        finally:
            handlers._examine = original  # type: ignore[assignment]
    assert isinstance(ok, ProbeSubmitted)
    assert isinstance(bad, ProbeRejected) and bad.reason == RejectReason.POLYGLOT
    assert seen and all(name.startswith("intake-image") for name in seen)


async def test_a_purged_image_is_never_stored_again(ports: handlers.IntakePorts) -> None:
    req = request(ports, s.face_jpeg())
    # The first delivery vaulted the image and died before recording its outcome; the
    # purger then destroyed it. The redelivered request must not bring it back.
    [first] = await handlers.on_probe_requested(req, ports)
    assert isinstance(first, ProbeSubmitted)
    ports.outcomes.conn.execute("DELETE FROM request_outcomes")
    ports.vault.purge(first.vault_ref, "expired", T0 + timedelta(days=4))
    [again] = await handlers.on_probe_requested(req, ports)
    assert isinstance(again, ProbeRejected) and again.reason is RejectReason.IMAGE_PURGED
    entry = ports.vault.index.get(first.vault_ref)
    assert entry is not None and entry.state == "purged"
    assert ports.vault.index.wrapped_key(first.vault_ref)[1] is None


async def test_a_duplicate_after_the_purge_does_not_resubmit(
        ports: handlers.IntakePorts) -> None:
    req = request(ports, s.face_jpeg())
    [first] = await handlers.on_probe_requested(req, ports)
    assert isinstance(first, ProbeSubmitted)
    assert await handlers.on_probe_requested(req, ports) == [first]  # still stored
    ports.vault.purge(first.vault_ref, "expired", T0 + timedelta(days=4))
    assert await handlers.on_probe_requested(req, ports) == []


async def test_a_vault_outage_holds_the_request_instead_of_dead_lettering_it(
        ports: handlers.IntakePorts) -> None:
    def refuse(name: str, blob: bytes) -> None:
        raise ConnectionError("object store unreachable")
    put = ports.vault.store.put
    ports.vault.store.put = refuse  # type: ignore[method-assign]
    req = request(ports, s.face_jpeg())
    with pytest.raises(handlers.VaultUnavailable) as caught:
        await handlers.on_probe_requested(req, ports)
    assert isinstance(caught.value, NotYet)
    assert isinstance(caught.value.__cause__, ConnectionError)
    assert await ports.outcomes.get(req.request_id) is None  # no outcome yet: retried
    ports.vault.store.put = put  # type: ignore[method-assign]
    [out] = await handlers.on_probe_requested(req, ports)
    assert isinstance(out, ProbeSubmitted) and ports.vault.get(out.vault_ref)
