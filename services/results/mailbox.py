"""SMTP inbox (aiosmtpd) for providers that answer by S/MIME mail.

What a reply must be, and what is checked, in order:

1. The envelope sender (MAIL FROM) and the ``From:`` header name the same mailbox, and that
   mailbox is the registered endpoint of an ``smime_email`` provider
   (``ProviderRecord.endpoint``, with or without ``mailto:``). Otherwise 550.
2. The message is S/MIME enveloped data encrypted to the broker's certificate; it is
   decrypted with the broker's RSA key (cryptography ``pkcs7_decrypt_smime``). Otherwise 554.
3. The decrypted content is an S/MIME signed message (``multipart/signed`` or opaque
   signed data) whose signature verifies (``openssl smime -verify``; cryptography has no
   PKCS#7 verification API) and whose signer certificate is exactly the provider's
   registered ``certificate_pem`` (the provider that owns the request_ref, see 4) and is
   within its validity period. Chain building is not
   done: the registered certificate is pinned. Otherwise 554. (With
   ``FRS_RESULTS_SMTP_REQUIRE_SIGNATURE=false`` an unsigned body is accepted on checks 1-2
   alone; the default refuses it.)
4. The signed content is a JSON object ``{"kind": "answer" | "deletion", "request_ref": ...}``
   plus, for an answer, the answer format of ``normalize.py``. The request_ref must belong
   to a provider whose mailbox is the sender (550 otherwise; 451 while still unknown, so
   the sending server retries).

Mail is taken over plain SMTP on the loopback/inner network: confidentiality and origin
come from S/MIME, not from the SMTP session (STARTTLS is not configured yet).

An answer becomes ``ProviderAnswered(channel="email")``, a deletion receipt
``DeletionConfirmed``. Outcomes are counted in ``frs_results_mail_messages_total``.
"""

from __future__ import annotations

import asyncio
import email
import email.policy
import email.utils
import json
import logging
import tempfile
from contextlib import AsyncExitStack
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aiosmtpd.smtp import SMTP, Envelope, Session
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.serialization import pkcs7
from prometheus_client import Counter

from schemas.events import DeletionConfirmed, Event, ProviderAnswered, ProviderRecord
from schemas.types import Transport, utcnow
from services.kit.bus import Publisher
from services.kit.registry import Registries
from services.results.store import RequestRefs
from services.results.webhook import strip_photos

if TYPE_CHECKING:
    from services.results.app import ResultsSettings

log = logging.getLogger("frs.results.mailbox")

MESSAGES = Counter("frs_results_mail_messages_total",
                   "Inbound provider mails by outcome (accepted or the refusal reason).",
                   ["outcome"])


class MailRefused(Exception):
    def __init__(self, reply: str, outcome: str) -> None:
        super().__init__(outcome)
        self.reply = reply
        self.outcome = outcome


def mailbox_of(provider: ProviderRecord) -> str:
    return provider.endpoint.removeprefix("mailto:").strip().lower()


async def verify_signed(content: bytes) -> tuple[bytes, x509.Certificate]:
    """Verify an S/MIME signed message; returns (signed content, signer certificate)."""
    with tempfile.TemporaryDirectory(prefix="frs-smime-") as tmp:
        signer_file = Path(tmp) / "signer.pem"
        proc = await asyncio.create_subprocess_exec(
            "openssl", "smime", "-verify", "-noverify", "-signer", str(signer_file),
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, _err = await proc.communicate(content)
        if proc.returncode != 0 or not signer_file.exists():
            raise MailRefused("554 5.7.5 signature does not verify", "bad_signature")
        signers = x509.load_pem_x509_certificates(signer_file.read_bytes())
    if len(signers) != 1:
        raise MailRefused("554 5.7.5 exactly one signer expected", "bad_signature")
    return out, signers[0]


@dataclass
class MailboxHandler:
    """aiosmtpd handler: ``handle_DATA`` returns the SMTP reply line."""

    broker_cert: x509.Certificate
    broker_key: rsa.RSAPrivateKey
    registries: Registries
    refs: RequestRefs
    publisher: Publisher
    require_signature: bool = True

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        try:
            event = await self._accept(envelope)
            await asyncio.wait_for(self.publisher.publish([event]), 30)
        except MailRefused as refused:
            MESSAGES.labels(refused.outcome).inc()
            log.warning("mail refused", extra={"outcome": refused.outcome})
            return refused.reply
        except (TimeoutError, OSError, RuntimeError) as exc:
            MESSAGES.labels("unavailable").inc()
            log.error("mail publish failed", extra={"error": type(exc).__name__})
            return "451 4.3.0 try again later"
        MESSAGES.labels("accepted").inc()
        log.info("mail accepted", extra={"provider": getattr(event, "provider_id", "-"),
                                         "type": event.TYPE})
        return "250 2.0.0 accepted"

    def _sender(self, envelope: Envelope, raw: bytes) -> str:
        sender = (envelope.mail_from or "").strip().lower()
        header = email.message_from_bytes(raw, policy=email.policy.compat32).get("From", "")
        from_addr = email.utils.parseaddr(str(header))[1].strip().lower()
        if not sender or sender != from_addr:
            raise MailRefused("550 5.7.1 envelope sender and From: differ", "sender_mismatch")
        if not any(p.transport == Transport.SMIME_EMAIL and mailbox_of(p) == sender
                   for p in self.registries.providers.values()):
            raise MailRefused("550 5.7.1 sender is not a registered provider", "unknown_sender")
        return sender

    async def _accept(self, envelope: Envelope) -> Event:
        raw = envelope.original_content or envelope.content
        if not isinstance(raw, bytes):
            raw = str(raw).encode()
        sender = self._sender(envelope, raw)
        try:
            content = pkcs7.pkcs7_decrypt_smime(raw, self.broker_cert, self.broker_key, [])
        except ValueError:
            raise MailRefused("554 5.7.5 not encrypted to the broker's certificate",
                              "undecryptable") from None
        body, signer = await self._signed_body(content)
        try:
            payload = json.loads(body)
        except (UnicodeDecodeError, ValueError):
            raise MailRefused("550 5.6.0 body is not JSON", "bad_body") from None
        if not isinstance(payload, dict) or not isinstance(payload.get("request_ref"), str) \
                or payload.get("kind") not in ("answer", "deletion"):
            raise MailRefused("550 5.6.0 want a JSON object with kind and request_ref",
                              "bad_body")
        found = self.refs.lookup(payload["request_ref"])
        if found is None:
            raise MailRefused("451 4.7.1 unknown request_ref, retry later", "unknown_request")
        probe_id, owner = found
        provider = self.registries.providers.get(owner)
        # The request's own provider must be the one that wrote: its mailbox, its key.
        if provider is None or mailbox_of(provider) != sender:
            raise MailRefused("550 5.7.1 request belongs to another provider", "wrong_provider")
        self._check_signer(signer, provider)
        if payload["kind"] == "deletion":
            return DeletionConfirmed(probe_id=probe_id, provider_id=owner,
                                     confirmed_at=utcnow())
        answer = {k: v for k, v in payload.items() if k != "kind"}
        return ProviderAnswered(probe_id=probe_id, provider_id=owner, channel="email",
                                payload=strip_photos(answer, "email"), received_at=utcnow())

    async def _signed_body(self, content: bytes) -> tuple[bytes, x509.Certificate | None]:
        part = email.message_from_bytes(content, policy=email.policy.compat32)
        ctype = part.get_content_type()
        signed = ctype == "multipart/signed" or (
            ctype in ("application/pkcs7-mime", "application/x-pkcs7-mime")
            and "signed-data" in str(part.get_param("smime-type", "")))
        if signed:
            return await verify_signed(content)
        if self.require_signature:
            raise MailRefused("554 5.7.5 reply must be signed", "unsigned")
        # Unsigned (allowed by setting): the decrypted content may carry MIME headers.
        payload = part.get_payload(decode=True) if part.keys() else content
        return (payload if isinstance(payload, bytes) else content), None

    def _check_signer(self, signer: x509.Certificate | None, provider: ProviderRecord) -> None:
        if signer is None:
            return  # unsigned, allowed by FRS_RESULTS_SMTP_REQUIRE_SIGNATURE=false
        if provider.certificate_pem is None:
            raise MailRefused("554 5.7.5 provider has no registered certificate",
                              "no_certificate")
        registered = x509.load_pem_x509_certificate(provider.certificate_pem.encode())
        if signer.public_bytes(serialization.Encoding.DER) != \
                registered.public_bytes(serialization.Encoding.DER):
            raise MailRefused("554 5.7.5 signer is not the provider's certificate",
                              "wrong_signer")
        now = datetime.now(UTC)
        if not signer.not_valid_before_utc <= now <= signer.not_valid_after_utc:
            raise MailRefused("554 5.7.5 signer certificate is not valid now", "expired_signer")


def _load_key(path: Path) -> rsa.RSAPrivateKey:
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    if not isinstance(key, rsa.RSAPrivateKey):
        raise ValueError("the broker's S/MIME key must be RSA (PKCS#7 key transport)")
    return key


async def start_mailbox(settings: ResultsSettings, publisher: Publisher,
                        registries: Registries, stack: AsyncExitStack) -> None:
    """Bind now (a bad key or a taken port fails the start); the stack closes it."""
    if settings.smime_cert_file is None or settings.smime_key_file is None:
        raise ValueError("FRS_RESULTS_SMIME_CERT_FILE and FRS_RESULTS_SMIME_KEY_FILE are "
                         "both required for the SMTP inbox")
    cert = x509.load_pem_x509_certificate(settings.smime_cert_file.read_bytes())
    key = _load_key(settings.smime_key_file)
    refs = RequestRefs(settings.tracker_path())
    stack.callback(refs.close)
    handler = MailboxHandler(cert, key, registries, refs, publisher,
                             settings.smtp_require_signature)
    limit = settings.smtp_max_message

    def protocol() -> Any:
        return SMTP(handler, data_size_limit=limit, hostname="frs-results",
                    decode_data=False)

    server = await asyncio.get_running_loop().create_server(
        protocol, settings.smtp_host, settings.smtp_port)

    async def close() -> None:
        server.close()
        await server.wait_closed()

    stack.push_async_callback(close)
    log.info("smtp inbox listening", extra={"host": settings.smtp_host,
                                            "port": settings.smtp_port})
