"""SMTP inbox (aiosmtpd) for providers that answer by S/MIME mail.

What a reply must be, and what is checked, in order; the cheap checks come first and
nothing is parsed in full on the event loop:

0. At ``MAIL FROM``, before any of the message is sent: the envelope sender is the
   registered endpoint of an ``smime_email`` provider (``ProviderRecord.endpoint``, with or
   without ``mailto:``). Otherwise 550. The message itself is at most
   ``FRS_RESULTS_SMTP_MAX_MESSAGE`` bytes (aiosmtpd's ``data_size_limit``: 552) and arrives
   within ``FRS_RESULTS_SMTP_TIMEOUT_S``.
1. Headers only (``email.parser.BytesHeaderParser``, linear in the size): ``From:`` names the
   envelope sender (550); the Message-ID was not accepted before (550 replayed); the
   message is S/MIME enveloped data (``application/pkcs7-mime``), else 554.
2. It is decrypted with the broker's RSA key (cryptography ``pkcs7_decrypt_smime``, in a
   thread: bounded by the size cap). Otherwise 554.
3. The decrypted content's MIME structure is parsed in full (stdlib ``email``) in a worker
   *process*, not a thread: the parse can be quadratic (nesting times lines) and a thread
   cannot be stopped, a process can be killed. The worker has an address-space and CPU
   limit and is killed after ``FRS_RESULTS_SMTP_PARSE_TIMEOUT_S``; more than
   ``FRS_RESULTS_SMTP_MAX_MIME_DEPTH`` levels or ``FRS_RESULTS_SMTP_MAX_MIME_PARTS`` parts
   is refused (554), a message with more ``multipart/`` declarations than parts allowed
   before it is parsed at all.
4. The content is an S/MIME signed message (``multipart/signed`` or opaque signed data)
   whose signature verifies (``openssl smime -verify``, killed at the same time limit;
   cryptography has no PKCS#7 verification API) and whose signer certificate is exactly
   the registered ``certificate_pem`` of a provider with the sender's mailbox, within its
   validity period. This is checked before the signed body is looked at. Chain building is
   not done: the registered certificate is pinned. Otherwise 554. (With
   ``FRS_RESULTS_SMTP_REQUIRE_SIGNATURE=false`` an unsigned body is accepted on checks
   0-3 alone; the default refuses it.)
5. The decrypted content was not accepted before (550 replayed). A captured mail cannot be
   re-encrypted by whoever replays it, so its decrypted bytes (signature included) are the
   replay key; a provider that signs the same answer again makes new bytes and is let in
   (the tracker ignores a repeated answer).
6. The signed content is a JSON object ``{"kind": "answer" | "deletion", "request_ref": ...}``
   plus, for an answer, the answer format of ``normalize.py`` (at most
   ``FRS_RESULTS_MAX_JSON_DEPTH`` deep, no lone surrogates: 550 with the reason). The
   request_ref must belong to a provider whose mailbox is the sender and whose certificate
   signed it (550/554; 451 while still unknown, so the sending server retries).

Accepted replies (Message-ID and content digest) are kept in the nonce store for
``FRS_RESULTS_SMTP_REPLAY_KEEP_DAYS``, so a replay is refused across restarts too.

Mail is taken over plain SMTP on the loopback/inner network: confidentiality and origin
come from S/MIME, not from the SMTP session (STARTTLS is not configured yet).

An answer becomes ``ProviderAnswered(channel="email")``, a deletion receipt
``DeletionConfirmed``. Outcomes are counted in ``frs_results_mail_messages_total``.
"""

from __future__ import annotations

import asyncio
import base64
import email
import email.message
import email.policy
import email.utils
import hashlib
import json
import logging
import math
import re
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.parser import BytesHeaderParser
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aiokafka.errors import MessageSizeTooLargeError
from aiosmtpd.smtp import SMTP, Envelope, Session
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.serialization import pkcs7
from prometheus_client import Counter

from schemas.events import DeletionConfirmed, Event, ProviderAnswered, ProviderRecord
from schemas.types import Transport, utcnow
from services.kit.private_files import read_private
from services.kit.publisher import EventTooLarge, Publisher
from services.kit.registry import Registries
from services.results.store import Nonces, NonceStore, RefLookup, RequestRefs
from services.results.webhook import BadJson, FreeMemory, parse_json_object, strip_photos

if TYPE_CHECKING:
    from services.results.settings import ResultsSettings

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


async def verify_signed(content: bytes, timeout_s: float = 5.0
                        ) -> tuple[bytes, x509.Certificate]:
    """Verify an S/MIME signed message; returns (signed content, signer certificate)."""
    with tempfile.TemporaryDirectory(prefix="frs-smime-") as tmp:
        signer_file = Path(tmp) / "signer.pem"
        proc = await asyncio.create_subprocess_exec(
            "openssl", "smime", "-verify", "-noverify", "-signer", str(signer_file),
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        try:
            async with asyncio.timeout(timeout_s):
                out, _err = await proc.communicate(content)
        except TimeoutError:
            raise MailRefused("554 5.7.5 signature check took too long",
                              "verify_timeout") from None
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        if proc.returncode != 0 or not signer_file.exists():
            raise MailRefused("554 5.7.5 signature does not verify", "bad_signature")
        signers = x509.load_pem_x509_certificates(signer_file.read_bytes())
    if len(signers) != 1:
        raise MailRefused("554 5.7.5 exactly one signer expected", "bad_signature")
    return out, signers[0]


# The MIME parse worker: stdlib only (``python -I -S``, so it starts in ~30 ms and imports
# nothing of the project), its limits set on itself before it reads a byte. Answers one
# JSON line: the root's type and, for a single part, its decoded payload; or an error code.
_PARSE_WORKER = r"""
import base64, email, email.policy, json, resource, sys
max_depth, max_parts, memory, cpu_s = map(int, sys.argv[1:5])
resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
resource.setrlimit(resource.RLIMIT_CPU, (cpu_s, cpu_s + 1))
content = sys.stdin.buffer.read()
def answer(**fields):
    sys.stdout.write(json.dumps(fields))
    sys.exit(0)
# Every multipart is a part: more declarations than parts allowed is refused unparsed.
if content.lower().count(b"multipart/") > max_parts:
    answer(error="too_many_parts")
root = email.message_from_bytes(content, policy=email.policy.compat32)
parts, todo = 0, [(root, 1)]
while todo:
    part, depth = todo.pop()
    parts += 1
    if depth > max_depth:
        answer(error="too_deep")
    if parts > max_parts:
        answer(error="too_many_parts")
    if part.is_multipart():
        todo.extend((child, depth + 1) for child in part.get_payload())
payload = None
if not root.is_multipart():
    body = root.get_payload(decode=True) if root.keys() else content
    payload = base64.b64encode(body if isinstance(body, bytes) else content).decode()
answer(type=root.get_content_type(), smime_type=str(root.get_param("smime-type", "")),
       payload=payload)
"""


@dataclass(frozen=True)
class MimeLimits:
    max_depth: int = 8
    max_parts: int = 32
    timeout_s: float = 5.0
    memory_mb: int = 512


@dataclass(frozen=True)
class MimeSummary:
    content_type: str
    smime_type: str
    payload: bytes | None  # decoded body of a single-part message


async def parse_mime(content: bytes, limits: MimeLimits) -> MimeSummary:
    """Parse ``content`` in a worker process within ``limits``; raises MailRefused."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-I", "-S", "-c", _PARSE_WORKER, str(limits.max_depth),
        str(limits.max_parts), str(limits.memory_mb * 1024 * 1024),
        str(math.ceil(limits.timeout_s) + 1),  # CPU backstop; the wall-time kill comes first
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        async with asyncio.timeout(limits.timeout_s):
            out, _ = await proc.communicate(content)
    except TimeoutError:
        raise MailRefused("554 5.6.0 MIME structure too costly to parse",
                          "mime_timeout") from None
    finally:
        if proc.returncode is None:  # timed out, or this mail's task was cancelled
            proc.kill()
            await proc.wait()
    try:
        if proc.returncode != 0:
            raise ValueError(f"worker exit {proc.returncode}")
        found = json.loads(out)
    except ValueError:
        # Out of memory or CPU (the worker's limits), or a crash: refused, not retried.
        raise MailRefused("554 5.6.0 MIME structure could not be parsed within limits",
                          "mime_failed") from None
    if "error" in found:
        reply = {"too_deep": "554 5.6.0 MIME nesting too deep",
                 "too_many_parts": "554 5.6.0 too many MIME parts"}[found["error"]]
        raise MailRefused(reply, f"mime_{found['error']}")
    payload = found["payload"]
    return MimeSummary(found["type"], found["smime_type"],
                       None if payload is None else base64.b64decode(payload))


_ENVELOPED = ("application/pkcs7-mime", "application/x-pkcs7-mime")
_BLANK_LINE = re.compile(rb"\r?\n\r?\n")


def _head(raw: bytes) -> bytes:
    """The header section alone: even a header-only parse splits everything it is given
    into lines (0.26 s for a 4 MB mail of short lines, on the event loop)."""
    if raw.startswith((b"\r\n", b"\n")):
        return b""  # no headers at all
    end = _BLANK_LINE.search(raw)
    return raw if end is None else raw[:end.end()]


@dataclass
class MailboxHandler:
    """aiosmtpd handler: ``handle_MAIL`` and ``handle_DATA`` return the SMTP reply line."""

    broker_cert: x509.Certificate
    broker_key: rsa.RSAPrivateKey
    registries: Registries
    refs: RefLookup
    publisher: Publisher
    require_signature: bool = True
    replays: Nonces | None = None
    replay_keep_s: float = 400 * 86400.0
    limits: MimeLimits = field(default_factory=MimeLimits)
    max_json_depth: int = 16
    workers: asyncio.Semaphore = field(default_factory=lambda: asyncio.Semaphore(2))
    clock: Callable[[], float] = time.time
    free_memory: FreeMemory = field(default_factory=FreeMemory)

    async def handle_MAIL(self, server: SMTP, session: Session, envelope: Envelope,
                          address: str, mail_options: list[str]) -> str:
        # Refused before a byte of the message is sent.
        if not self._providers_of(address.strip().lower()):
            MESSAGES.labels("unknown_sender").inc()
            log.warning("mail refused", extra={"outcome": "unknown_sender"})
            return "550 5.7.1 sender is not a registered provider"
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        try:
            return await self._handle_data(envelope)
        finally:
            self.free_memory.note()  # receiving a mail allocates many times its size

    async def _handle_data(self, envelope: Envelope) -> str:
        started = time.monotonic()
        keys: list[str] = []
        try:
            event, keys = await self._accept(envelope)
            await self._claim(keys)
        except MailRefused as refused:
            MESSAGES.labels(refused.outcome).inc()
            log.warning("mail refused", extra={"outcome": refused.outcome,
                                               "took_s": round(time.monotonic() - started, 3)})
            return refused.reply
        try:
            await asyncio.wait_for(self.publisher.publish([event]), 30)
        except BaseException as exc:
            await self._release(keys)  # not accepted: the sending server may retry it
            if isinstance(exc, EventTooLarge | MessageSizeTooLargeError):
                # Permanent (5xx): the same mail would be refused again on every retry.
                MESSAGES.labels("too_large").inc()
                log.warning("mail answer too large for the bus", extra={"error": str(exc)})
                return "552 5.3.4 answer too large to accept"
            if not isinstance(exc, TimeoutError | OSError | RuntimeError):
                raise
            MESSAGES.labels("unavailable").inc()
            log.error("mail publish failed", extra={"error": type(exc).__name__})
            return "451 4.3.0 try again later"
        MESSAGES.labels("accepted").inc()
        log.info("mail accepted", extra={"provider": getattr(event, "provider_id", "-"),
                                         "type": event.TYPE,
                                         "took_s": round(time.monotonic() - started, 3)})
        return "250 2.0.0 accepted"

    def _providers_of(self, mailbox: str) -> list[ProviderRecord]:
        return [p for p in self.registries.providers.values()
                if p.transport == Transport.SMIME_EMAIL and mailbox_of(p) == mailbox]

    def _sender(self, envelope: Envelope, headers: email.message.Message) -> str:
        sender = (envelope.mail_from or "").strip().lower()
        from_addr = email.utils.parseaddr(str(headers.get("From", "")))[1].strip().lower()
        if not sender or sender != from_addr:
            raise MailRefused("550 5.7.1 envelope sender and From: differ", "sender_mismatch")
        if not self._providers_of(sender):
            raise MailRefused("550 5.7.1 sender is not a registered provider", "unknown_sender")
        return sender

    async def _check_replay(self, key: str) -> None:
        if self.replays is not None and await self.replays.seen(key, self.clock(),
                                                                self.replay_keep_s):
            raise MailRefused("550 5.7.0 replayed: this reply was accepted before", "replayed")

    async def _claim(self, keys: list[str]) -> None:
        claimed: list[str] = []
        for key in keys:
            assert self.replays is not None
            if not await self.replays.claim(key, self.clock(), self.replay_keep_s):
                await self._release(claimed)
                raise MailRefused("550 5.7.0 replayed: this reply was accepted before",
                                  "replayed")
            claimed.append(key)

    async def _release(self, keys: list[str]) -> None:
        for key in keys:
            assert self.replays is not None
            await self.replays.release(key)

    async def _accept(self, envelope: Envelope) -> tuple[Event, list[str]]:
        raw = envelope.original_content or envelope.content
        if not isinstance(raw, bytes):
            raw = str(raw).encode()
        headers = BytesHeaderParser(policy=email.policy.compat32).parsebytes(_head(raw))
        sender = self._sender(envelope, headers)
        keys: list[str] = []
        message_id = str(headers.get("Message-ID", "")).strip()
        if message_id and self.replays is not None:
            keys.append("mid:" + hashlib.sha256(f"{sender}\n{message_id}".encode()).hexdigest())
            await self._check_replay(keys[-1])
        if headers.get_content_type() not in _ENVELOPED:
            raise MailRefused("554 5.7.5 not encrypted to the broker's certificate",
                              "undecryptable")
        try:
            content = await asyncio.to_thread(pkcs7.pkcs7_decrypt_smime, raw,
                                              self.broker_cert, self.broker_key, [])
        except ValueError:
            raise MailRefused("554 5.7.5 not encrypted to the broker's certificate",
                              "undecryptable") from None
        async with self.workers:
            summary = await parse_mime(content, self.limits)
        body, signer = await self._signed_body(content, summary)
        # The signer is checked before the body is looked at.
        candidates = self._providers_of(sender)
        if signer is not None:
            if not any(_same_certificate(signer, p) for p in candidates):
                raise MailRefused("554 5.7.5 signer is not the provider's certificate",
                                  "wrong_signer")
            _check_validity(signer)
        if self.replays is not None:
            keys.append("sha256:" + hashlib.sha256(content).hexdigest())
            await self._check_replay(keys[-1])
        try:
            payload = parse_json_object(body, self.max_json_depth)
        except BadJson as bad:
            raise MailRefused(f"550 5.6.0 body refused: {bad.reason}", bad.reason) from None
        if not isinstance(payload.get("request_ref"), str) \
                or payload.get("kind") not in ("answer", "deletion"):
            raise MailRefused("550 5.6.0 want a JSON object with kind and request_ref",
                              "bad_body")
        found = await self.refs.lookup(payload["request_ref"])
        if found is None:
            raise MailRefused("451 4.7.1 unknown request_ref, retry later", "unknown_request")
        probe_id, owner = found
        provider = self.registries.providers.get(owner)
        # The request's own provider must be the one that wrote: its mailbox, its key.
        if provider is None or mailbox_of(provider) != sender:
            raise MailRefused("550 5.7.1 request belongs to another provider", "wrong_provider")
        if signer is not None and not _same_certificate(signer, provider):
            raise MailRefused("554 5.7.5 signer is not the provider's certificate",
                              "wrong_signer")
        if payload["kind"] == "deletion":
            return DeletionConfirmed(probe_id=probe_id, provider_id=owner,
                                     confirmed_at=utcnow()), keys
        answer = {k: v for k, v in payload.items() if k != "kind"}
        return ProviderAnswered(probe_id=probe_id, provider_id=owner, channel="email",
                                payload=strip_photos(answer, "email"),
                                received_at=utcnow()), keys

    async def _signed_body(self, content: bytes, summary: MimeSummary
                           ) -> tuple[bytes, x509.Certificate | None]:
        signed = summary.content_type == "multipart/signed" or (
            summary.content_type in _ENVELOPED and "signed-data" in summary.smime_type)
        if signed:
            return await verify_signed(content, self.limits.timeout_s)
        if self.require_signature:
            raise MailRefused("554 5.7.5 reply must be signed", "unsigned")
        # Unsigned (allowed by setting): the decrypted content may carry MIME headers.
        return (summary.payload if summary.payload is not None else content), None


def _same_certificate(signer: x509.Certificate, provider: ProviderRecord) -> bool:
    if provider.certificate_pem is None:
        return False
    registered = x509.load_pem_x509_certificate(provider.certificate_pem.encode())
    return signer.public_bytes(serialization.Encoding.DER) == \
        registered.public_bytes(serialization.Encoding.DER)


def _check_validity(signer: x509.Certificate) -> None:
    now = datetime.now(UTC)
    if not signer.not_valid_before_utc <= now <= signer.not_valid_after_utc:
        raise MailRefused("554 5.7.5 signer certificate is not valid now", "expired_signer")


def _load_key(path: Path) -> rsa.RSAPrivateKey:
    # A key file others may read is refused, not used (services/kit/private_files.py).
    key = serialization.load_pem_private_key(read_private(path), password=None)
    if not isinstance(key, rsa.RSAPrivateKey):
        raise ValueError("the broker's S/MIME key must be RSA (PKCS#7 key transport)")
    return key


@dataclass
class InboxGate:
    """Shared by every connection of the inbox: how many are open, and DATA transfers."""

    max_connections: int
    transfers: asyncio.Semaphore
    open: int = 0


class InboxSMTP(SMTP):
    """aiosmtpd's server with two caps: open connections (more get 421 and are closed
    before aiosmtpd sees them) and DATA transfers at once (receiving keeps each line of a
    mail as its own object until the end, so a mail of short lines costs many times its
    size while it arrives; waiting senders get their 354 later)."""

    def __init__(self, handler: Any, gate: InboxGate, **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        self._gate = gate
        self._over_cap = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self._gate.open >= self._gate.max_connections:
            self._over_cap = True
            MESSAGES.labels("too_many_connections").inc()
            assert isinstance(transport, asyncio.WriteTransport)
            transport.write(b"421 4.7.0 too many connections, try again later\r\n")
            transport.close()
            return
        self._gate.open += 1
        super().connection_made(transport)

    def data_received(self, data: bytes) -> None:
        if not self._over_cap:
            super().data_received(data)

    def eof_received(self) -> bool | None:
        return False if self._over_cap else super().eof_received()

    def connection_lost(self, error: Exception | None) -> None:
        if self._over_cap:
            return
        self._gate.open -= 1
        super().connection_lost(error)

    async def smtp_DATA(self, arg: str) -> None:
        async with self._gate.transfers:
            await super().smtp_DATA(arg)


async def start_mailbox(settings: ResultsSettings, publisher: Publisher,
                        registries: Registries, stack: AsyncExitStack,
                        stores: tuple[Nonces, RefLookup] | None = None) -> None:
    """Bind now (a bad key or a taken port fails the start); the stack closes it.
    ``stores``: the shared ones (PostgreSQL); without, SQLite files in the state dir."""
    if settings.smime_cert_file is None or settings.smime_key_file is None:
        raise ValueError("FRS_RESULTS_SMIME_CERT_FILE and FRS_RESULTS_SMIME_KEY_FILE are "
                         "both required for the SMTP inbox")
    cert = x509.load_pem_x509_certificate(settings.smime_cert_file.read_bytes())
    key = _load_key(settings.smime_key_file)
    if stores is None:
        local_refs = RequestRefs(settings.tracker_path())
        stack.callback(local_refs.close)
        local_replays = NonceStore(settings.nonce_path(), table="mail_replies")
        stack.callback(local_replays.close)
        stores = local_replays, local_refs
    replays, refs = stores
    handler = MailboxHandler(
        cert, key, registries, refs, publisher, settings.smtp_require_signature,
        replays=replays, replay_keep_s=settings.smtp_replay_keep_days * 86400.0,
        limits=MimeLimits(settings.smtp_max_mime_depth, settings.smtp_max_mime_parts,
                          settings.smtp_parse_timeout_s, settings.smtp_parse_memory_mb),
        max_json_depth=settings.max_json_depth,
        workers=asyncio.Semaphore(settings.smtp_parse_workers))
    handler.free_memory.start(stack)
    gate = InboxGate(settings.smtp_max_connections,
                     asyncio.Semaphore(settings.smtp_max_transfers))

    def protocol() -> Any:
        return InboxSMTP(handler, gate, data_size_limit=settings.smtp_max_message,
                         hostname="frs-results", decode_data=False,
                         timeout=settings.smtp_timeout_s)

    server = await asyncio.get_running_loop().create_server(
        protocol, settings.smtp_host, settings.smtp_port)

    async def close() -> None:
        server.close()
        await server.wait_closed()

    stack.push_async_callback(close)
    log.info("smtp inbox listening", extra={"host": settings.smtp_host,
                                            "port": settings.smtp_port})
