"""on_probe_requested: one outcome per request id, the right reason, a vaulted probe."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from schemas.envelope import DecodeError
from schemas.events import ProbeRejected, ProbeRequested, ProbeSubmitted, RejectReason
from schemas.types import ImageSource, Purpose, probe_id_for
from services.intake import handlers
from services.intake.crypto import encrypt_image
from services.intake.outcomes import OutcomeLog
from services.intake.sanitize import sanitize
from services.intake.vault import FileObjectStore, LocalKek, Vault, VaultIndex, open_db
from services.kit.bus import NotYet
from tests import intake_samples as s

T0 = datetime(2026, 1, 1, tzinfo=UTC)


@pytest.fixture
def ports(tmp_path: Path) -> handlers.IntakePorts:
    conn = open_db(tmp_path / "intake.db")
    vault = Vault(VaultIndex(conn), FileObjectStore(tmp_path / "objects"),
                  LocalKek(tmp_path / "kek"))
    return handlers.IntakePorts(private_key=X25519PrivateKey.generate(), clock=lambda: T0,
                                image_ttl=timedelta(hours=72), vault=vault,
                                outcomes=OutcomeLog(conn))


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


async def test_redelivery_yields_the_original_outcome(ports: handlers.IntakePorts) -> None:
    req = request(ports, s.face_jpeg())
    [first] = await handlers.on_probe_requested(req, ports)
    [again] = await handlers.on_probe_requested(req, ports)
    assert again == first
    # Same request id, different image: still the first outcome, no second object.
    [third] = await handlers.on_probe_requested(request(ports, s.no_face_jpeg()), ports)
    assert third == first
    n = ports.vault.index.conn.execute("SELECT COUNT(*) FROM vault_objects").fetchone()[0]
    assert n == 1


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
    n = ports.vault.index.conn.execute("SELECT COUNT(*) FROM vault_objects").fetchone()[0]
    assert n == 0  # nothing rejected reaches the vault


async def test_invalid_record_gets_one_recorded_outcome(ports: handlers.IntakePorts) -> None:
    err = DecodeError("invalid_event", "purpose: enum")
    [first] = await handlers.on_invalid_request(b"req-bad", err, ports)
    assert isinstance(first, ProbeRejected) and first.reason == RejectReason.INVALID_FIELDS
    [again] = await handlers.on_invalid_request(b"req-bad", err, ports)
    assert again == first


async def test_image_work_off_the_event_loop(ports: handlers.IntakePorts) -> None:
    import dataclasses
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
    assert ports.outcomes.get(req.request_id) is None  # no outcome yet: it is retried
    ports.vault.store.put = put  # type: ignore[method-assign]
    [out] = await handlers.on_probe_requested(req, ports)
    assert isinstance(out, ProbeSubmitted) and ports.vault.get(out.vault_ref)
