"""Transports against real servers: the HTTPS vendor simulator over real TLS, and a real
SMTP server (aiosmtpd) whose mail is decrypted with openssl and with cryptography."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import email
import email.policy
import hashlib
import json
import shutil
import ssl
import subprocess
from datetime import UTC, datetime
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.serialization import pkcs7

from schemas.events import ProviderRecord
from schemas.types import OutboundField, Transport
from services.dispatch.ledger import dispatch_id_for, request_ref_for
from services.dispatch.payloads import build_payload, payload_body
from services.dispatch.transports.base import (
    AmbiguousError,
    PermanentError,
    SendGuard,
    SendRequest,
    TransientError,
)
from services.dispatch.transports.https import GuardedBody, HttpsTransport, client_tls_context
from services.dispatch.transports.smime_email import SmimeEmailTransport
from services.simulators.inbox import InboxBehaviour, InboxSimulator
from services.simulators.tls import SimulatorCA
from services.simulators.vendor import VendorBehaviour, VendorSimulator

ALL = list(OutboundField)


def provider(transport: Transport, endpoint: str, cert_pem: str | None = None) -> ProviderRecord:
    return ProviderRecord(provider_id="p1", name="p1", kind="commercial", transport=transport,
                          endpoint=endpoint, certificate_pem=cert_pem,
                          updated_at=datetime.now(UTC))


def request(prov: ProviderRecord, photo: bytes, fields: list[OutboundField] = ALL,
            probe: str = "prb-1") -> SendRequest:
    dispatch_id = dispatch_id_for(probe, prov.provider_id)
    ref = request_ref_for(dispatch_id)
    return SendRequest(prov, build_payload(prov.transport, fields, photo=photo,
                                           agent_id="agent-7", request_ref=ref),
                       dispatch_id, ref)


async def permanent_failure(tls: ssl.SSLContext, url: str, photo: bytes) -> str:
    """One HTTPS send that must fail for good: its error code."""
    transport = HttpsTransport(tls)
    try:
        with pytest.raises(PermanentError) as caught:
            await transport.send(request(provider(Transport.HTTPS, url), photo))
    finally:
        await transport.close()
    return caught.value.code


async def test_https_sends_only_cleared_fields_over_verified_tls(face_jpeg: bytes) -> None:
    async with VendorSimulator() as sim:
        transport = HttpsTransport(client_tls_context(sim.ca_file))
        try:
            req = request(provider(Transport.HTTPS, sim.url), face_jpeg)
            await transport.send(req)
            narrow = request(provider(Transport.HTTPS, sim.url), face_jpeg,
                             [OutboundField.PHOTO, OutboundField.REQUEST_REF], probe="prb-2")
            await transport.send(narrow)
        finally:
            await transport.close()
        first, second = sim.state.received
        assert first.accepted and first.fields == ("agent_id", "photo", "request_ref")
        assert first.values == {"agent_id": "agent-7", "request_ref": req.request_ref}
        assert first.photo_sha256 == hashlib.sha256(face_jpeg).hexdigest()
        assert first.idempotency_key == req.dispatch_id
        # Nothing identifying in headers either: only transport headers plus the key.
        assert set(first.header_names) <= {"Host", "Accept", "Accept-Encoding", "User-Agent",
                                           "Content-Type", "Content-Length",
                                           "Idempotency-Key"}
        assert second.fields == ("photo", "request_ref")
        assert "agent_id" not in second.values


async def test_https_never_follows_a_redirect_with_the_photo(face_jpeg: bytes) -> None:
    async with VendorSimulator() as elsewhere, \
            VendorSimulator(VendorBehaviour(redirect_to=elsewhere.url)) as vendor:
        code = await permanent_failure(client_tls_context(vendor.ca_file), vendor.url,
                                       face_jpeg)
        assert code == "http_307"
        assert len(vendor.state.received) == 1
        # A 307 keeps the body: following it would have sent the photo to an unapproved
        # host (aiohttp follows by default).
        assert elsewhere.state.received == []


async def test_https_refuses_an_untrusted_server(face_jpeg: bytes) -> None:
    async with VendorSimulator() as sim:
        other_ca = SimulatorCA("someone else")
        path = sim.pki_dir / "other-ca.crt"
        path.write_bytes(other_ca.cert_pem)
        code = await permanent_failure(client_tls_context(path), sim.url, face_jpeg)
        assert code == "tls_verify_failed"
        assert sim.state.received == []


async def test_https_mutual_tls(face_jpeg: bytes) -> None:
    async with VendorSimulator(require_client_cert=True) as sim:
        cert, key = sim.client_identity()
        with_cert = HttpsTransport(client_tls_context(sim.ca_file, cert, key))
        without = HttpsTransport(client_tls_context(sim.ca_file), timeout_s=5)
        try:
            await with_cert.send(request(provider(Transport.HTTPS, sim.url), face_jpeg))
            with pytest.raises((TransientError, PermanentError)):
                await without.send(request(provider(Transport.HTTPS, sim.url), face_jpeg,
                                           probe="prb-9"))
        finally:
            await with_cert.close()
            await without.close()
        assert [r.accepted for r in sim.state.received] == [True]


async def test_https_errors_are_classified_and_resend_is_deduplicated(face_jpeg: bytes) -> None:
    async with VendorSimulator(VendorBehaviour(error_rate=1.0)) as sim:
        transport = HttpsTransport(client_tls_context(sim.ca_file), timeout_s=1.0)
        req = request(provider(Transport.HTTPS, sim.url), face_jpeg)
        try:
            with pytest.raises(TransientError) as err:
                await transport.send(req)
            assert err.value.code == "http_503"
            sim.behaviour = VendorBehaviour(timeout_rate=1.0, hang_s=5)
            with pytest.raises(TransientError) as err:
                await transport.send(req)
            assert err.value.code == "timeout"
            sim.behaviour = VendorBehaviour(malformed_rate=1.0)
            with pytest.raises(TransientError) as err:
                await transport.send(req)
            assert err.value.code == "malformed_answer"
            sim.behaviour = VendorBehaviour()
            await transport.send(req)  # same Idempotency-Key: the vendor keeps one copy
            with pytest.raises(PermanentError):
                await transport.send(request(provider(Transport.HTTPS, "http://127.0.0.1:1/x"),
                                             face_jpeg))
        finally:
            await transport.close()
        assert sim.copies(req.request_ref) == 4
        assert len(sim.state.accepted) == 1


class FrozenAfter(SendGuard):
    """A guard whose process is stopped (its loop's clock jumps a minute) after ``asks``
    questions, and whose store then says the lease moved."""

    def __init__(self, asks: int) -> None:
        super().__init__(asyncio.get_running_loop().time(), 2.5, self._moved)
        self.asks = asks
        self.asked = 0

    async def ensure(self) -> None:
        self.asked += 1
        if self.asked == self.asks:
            self.confirmed_at -= 60.0
        await super().ensure()

    async def _moved(self) -> None:
        raise RuntimeError("lease moved")


@pytest.mark.parametrize("asks", [1, 2, 3], ids=["before-headers", "mid-body", "at-the-end"])
async def test_https_a_request_refused_by_its_guard_never_arrives(face_jpeg: bytes,
                                                                  asks: int) -> None:
    """Issue 18: frozen before its request was written, or in mid-body, a woken dispatch
    is refused by its guard; the vendor sees a request cut short (no copy) and then a
    confirmed one arrives whole."""
    assert len(payload_body_of(face_jpeg)) > GuardedBody.SLICE + GuardedBody.LAST  # 2 slices
    async with VendorSimulator() as sim:
        transport = HttpsTransport(client_tls_context(sim.ca_file), timeout_s=5)
        req = request(provider(Transport.HTTPS, sim.url), face_jpeg)
        guard = FrozenAfter(asks)
        try:
            with pytest.raises(TransientError):
                await transport.send(dataclasses.replace(req, guard=guard))
            assert isinstance(guard.refused, RuntimeError)
            await asyncio.sleep(0.3)  # the vendor reads what it got, and the close
            assert sim.state.copies == {} and sim.state.accepted == {}
            await transport.send(dataclasses.replace(req, guard=FrozenAfter(0)))
        finally:
            await transport.close()
        assert sim.copies(req.request_ref) == 1 and len(sim.state.accepted) == 1


def payload_body_of(photo: bytes) -> bytes:
    prov = provider(Transport.HTTPS, "https://127.0.0.1:1/x")
    return payload_body(request(prov, photo).payload)


def openssl(*args: str) -> bytes:
    return subprocess.run(["openssl", *args], check=True, capture_output=True).stdout


@pytest.fixture
def smime_identity(tmp_path: Path) -> tuple[str, Path, Path]:
    cert, key = SimulatorCA("provider CA").smime("inbox@provider.test").write(tmp_path, "p")
    return cert.read_text(), cert, key


async def test_smime_mail_decrypts_with_openssl_and_cryptography(
    face_jpeg: bytes, smime_identity: tuple[str, Path, Path], tmp_path: Path
) -> None:
    cert_pem, cert_file, key_file = smime_identity
    prov = provider(Transport.SMIME_EMAIL, "mailto:inbox@provider.test", cert_pem)
    req = request(prov, face_jpeg)
    with InboxSimulator() as inbox:
        transport = SmimeEmailTransport("127.0.0.1", inbox.port, "dispatch@frs.test")
        result = await transport.send(req)
    [mail] = inbox.state.mails
    assert mail.rcpt_tos == ("inbox@provider.test",)
    assert mail.message_id == f"<{req.dispatch_id}@frs.test>" == result.detail["message_id"]
    parsed = email.message_from_bytes(mail.content, policy=email.policy.default)
    assert parsed.get_content_type() == "application/pkcs7-mime"
    # Nothing readable outside the envelope: no field value, no photo bytes.
    assert b"agent-7" not in mail.content and req.request_ref.encode() not in mail.content

    mail_file = tmp_path / "mail.eml"
    mail_file.write_bytes(mail.content)
    assert shutil.which("openssl"), "openssl CLI is required"
    decrypted = openssl("cms", "-decrypt", "-in", str(mail_file), "-recip", str(cert_file),
                        "-inkey", str(key_file))
    structure = openssl("cms", "-cmsout", "-print", "-in", str(mail_file)).decode()
    assert "aes-256-cbc" in structure

    key = serialization.load_pem_private_key(key_file.read_bytes(), None)
    cert = x509.load_pem_x509_certificate(cert_pem.encode())
    by_cryptography = pkcs7.pkcs7_decrypt_smime(mail.content, cert, key, [])  # type: ignore[arg-type]
    assert by_cryptography.replace(b"\r\n", b"\n") == decrypted.replace(b"\r\n", b"\n")

    inner = email.message_from_bytes(decrypted, policy=email.policy.default)
    assert inner.get_content_type() == "application/json"
    text = inner.get_payload()
    assert isinstance(text, str)
    body = json.loads(text)
    assert sorted(body) == ["agent_id", "photo", "request_ref"]
    assert base64.b64decode(body["photo"]) == face_jpeg
    assert body["request_ref"] == req.request_ref


async def test_smime_errors(face_jpeg: bytes, smime_identity: tuple[str, Path, Path]) -> None:
    cert_pem, _, _ = smime_identity
    with InboxSimulator(behaviour=InboxBehaviour(temp_fail_rate=1.0)) as inbox:
        transport = SmimeEmailTransport("127.0.0.1", inbox.port, "dispatch@frs.test",
                                        timeout_s=5)
        with pytest.raises(TransientError) as refused:
            await transport.send(request(provider(Transport.SMIME_EMAIL, "inbox@provider.test",
                                                  cert_pem), face_jpeg))
        assert not isinstance(refused.value, AmbiguousError)  # a 451 answer: not delivered
        with pytest.raises(PermanentError) as err:
            await transport.send(request(provider(Transport.SMIME_EMAIL, "inbox@provider.test"),
                                         face_jpeg))
        assert err.value.code == "no_certificate"
    assert inbox.state.mails == [] and inbox.state.refused == 1
    closed = SmimeEmailTransport("127.0.0.1", inbox.port, "dispatch@frs.test", timeout_s=2)
    with pytest.raises(TransientError):
        await closed.send(request(provider(Transport.SMIME_EMAIL, "inbox@provider.test",
                                           cert_pem), face_jpeg))


async def test_vendor_simulator_answers_on_the_signed_webhook(face_jpeg: bytes) -> None:
    from aiohttp import web

    from services.simulators.answers import webhook_signature

    got: list[tuple[str, dict[str, object]]] = []
    arrived = asyncio.Event()
    unknown_once = [True]

    async def hook(request: web.Request) -> web.Response:
        body = await request.read()
        expected = webhook_signature(b"s3cret-s3cret-s3cret", "vendor-1",
                                     request.headers["X-FRS-Timestamp"], request.path, body)
        if request.headers.get("X-FRS-Signature") != expected \
                or request.headers.get("X-FRS-Provider") != "vendor-1":
            return web.json_response({"error": "bad_signature"}, status=401)
        if unknown_once[0]:  # dispatch not recorded yet: the vendor must retry
            unknown_once[0] = False
            return web.json_response({"error": "unknown_request"}, status=404)
        got.append((request.path, json.loads(body)))
        if len(got) == 3:
            arrived.set()
        return web.json_response({"status": "accepted"}, status=202)

    app = web.Application()
    app.router.add_post("/v1/answers", hook)
    app.router.add_post("/v1/deletion", hook)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        behaviour = VendorBehaviour(webhook_url=f"http://127.0.0.1:{port}",
                                    webhook_provider_id="vendor-1",
                                    webhook_secret="s3cret-s3cret-s3cret",
                                    answer_twice=True, candidates=4)
        async with VendorSimulator(behaviour) as sim:
            transport = HttpsTransport(client_tls_context(sim.ca_file))
            req = request(provider(Transport.HTTPS, sim.url), face_jpeg)
            try:
                await transport.send(req)
            finally:
                await transport.close()
            await asyncio.wait_for(arrived.wait(), 10)
    finally:
        await runner.cleanup()
    (p1, answer), (p2, twice), (p3, receipt) = got
    assert (p1, p2, p3) == ("/v1/answers", "/v1/answers", "/v1/deletion")
    assert answer == twice and answer["request_ref"] == req.request_ref
    # What a vendor sends, oversharing included (the results edge keeps only the answer).
    assert sorted(answer) == ["algorithm", "algorithm_version", "candidates", "request_ref",
                              "threshold", "vendor_trace"]
    ranks = [c["rank"] for c in answer["candidates"]]  # type: ignore[attr-defined]
    assert ranks == [1, 2, 3, 4]
    scores = [c["score"] for c in answer["candidates"]]  # type: ignore[attr-defined]
    assert scores == sorted(scores, reverse=True)
    assert receipt == {"request_ref": req.request_ref}


async def test_inbox_simulator_replies_signed_and_encrypted_to_the_broker(
    face_jpeg: bytes, tmp_path: Path
) -> None:
    from services.simulators.inbox import MailReply

    ca = SimulatorCA("mail CA")
    provider_id = ca.smime("inbox@provider.test")
    broker = ca.smime("results@frs.test")
    with InboxSimulator() as results_inbox:
        reply = MailReply("127.0.0.1", results_inbox.port, "results@frs.test",
                          "inbox@provider.test", provider_id.cert_pem, provider_id.key_pem,
                          broker.cert_pem)
        with InboxSimulator(reply=reply) as inbox:
            transport = SmimeEmailTransport("127.0.0.1", inbox.port, "dispatch@frs.test")
            req = request(provider(Transport.SMIME_EMAIL, "inbox@provider.test",
                                   provider_id.cert_pem.decode()), face_jpeg)
            await transport.send(req)
            for _ in range(100):
                if len(results_inbox.state.mails) >= 2:
                    break
                await asyncio.sleep(0.1)
    answer_mail, receipt_mail = results_inbox.state.mails
    assert answer_mail.mail_from == "inbox@provider.test"
    key = serialization.load_pem_private_key(broker.key_pem, None)
    cert = x509.load_pem_x509_certificate(broker.cert_pem)
    bodies = []
    for mail in (answer_mail, receipt_mail):
        signed = pkcs7.pkcs7_decrypt_smime(mail.content, cert, key, [])  # type: ignore[arg-type]
        signed_file = tmp_path / "signed.eml"
        signed_file.write_bytes(signed)
        signer_file = tmp_path / "signer.pem"
        bodies.append(json.loads(openssl("smime", "-verify", "-noverify", "-in",
                                         str(signed_file), "-signer", str(signer_file))))
        assert x509.load_pem_x509_certificate(signer_file.read_bytes()) == \
            x509.load_pem_x509_certificate(provider_id.cert_pem)
    answer, receipt = bodies
    assert answer["kind"] == "answer" and answer["request_ref"] == req.request_ref
    assert [c["rank"] for c in answer["candidates"]] == [1, 2, 3, 4, 5]
    assert receipt == {"kind": "deletion", "request_ref": req.request_ref}


async def test_smime_unconfirmed_data_is_ambiguous(
        face_jpeg: bytes, smime_identity: tuple[str, Path, Path]) -> None:
    cert_pem, _, _ = smime_identity
    with InboxSimulator(behaviour=InboxBehaviour(hang_after_accept_s=3)) as inbox:
        transport = SmimeEmailTransport("127.0.0.1", inbox.port, "dispatch@frs.test",
                                        timeout_s=1)
        with pytest.raises(AmbiguousError):
            await transport.send(request(provider(Transport.SMIME_EMAIL, "inbox@provider.test",
                                                  cert_pem), face_jpeg))
        # It did arrive: exactly why a resend could deliver a second copy.
        assert len(inbox.state.mails) == 1


async def test_smime_a_late_session_is_refused_before_data(
        face_jpeg: bytes, smime_identity: tuple[str, Path, Path]) -> None:
    """Issue 18: a session whose attempt was recorded before a freeze asks its guard before
    DATA; refused, no mail arrives (and the refusal is not an ambiguous send)."""
    cert_pem, _, _ = smime_identity
    req = request(provider(Transport.SMIME_EMAIL, "inbox@provider.test", cert_pem), face_jpeg)
    with InboxSimulator() as inbox:
        transport = SmimeEmailTransport("127.0.0.1", inbox.port, "dispatch@frs.test")
        guard = FrozenAfter(1)
        with pytest.raises(RuntimeError, match="lease moved"):
            await transport.send(dataclasses.replace(req, guard=guard))
        assert inbox.state.mails == [] and guard.refused is not None
        await transport.send(dataclasses.replace(req, guard=FrozenAfter(0)))
        assert len(inbox.state.mails) == 1
