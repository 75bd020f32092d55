"""SMTP provider inbox (aiosmtpd): stores every mail it receives, as received, and can
answer on the provider's reply channel.

Mails are kept in memory and, with ``--maildir``, written one file per mail (they are
S/MIME envelopes, so nothing is in clear at rest). Knobs: latency per mail and a rate of
``451`` temporary refusals. ``copies(message_id)`` counts raw deliveries per Message-ID.

With a ``MailReply`` the inbox plays the provider: it decrypts each request with the
provider's key, then mails the results inbox (the results S/MIME reply contract) an
answer ``{"kind": "answer", "request_ref", <candidate list>}`` and a deletion receipt
``{"kind": "deletion", "request_ref"}``, each signed with the provider's key (detached
``multipart/signed``) and encrypted with AES-256 to the broker's certificate, from the
provider's mailbox. A ``451`` (request not known yet) is retried.

Run: ``python -m services.simulators.inbox --port 2525 --maildir .state/inbox`` prints one
JSON line with host and port, then serves until SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import email
import email.policy
import json
import random
import sys
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiosmtplib
from aiosmtpd.controller import Controller
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.ciphers import algorithms
from cryptography.hazmat.primitives.serialization import pkcs7

from services.simulators import until_signalled
from services.simulators.answers import candidate_list


@dataclass(frozen=True)
class Mail:
    mail_from: str
    rcpt_tos: tuple[str, ...]
    message_id: str | None
    content: bytes


@dataclass
class InboxBehaviour:
    latency_s: float = 0.0
    temp_fail_rate: float = 0.0
    candidates: int = 5
    answer_twice: bool = False
    deletion_receipt: bool = True
    hang_after_accept_s: float = 0.0  # take the mail, then answer late (a lost 250)


@dataclass(frozen=True)
class MailReply:
    """How the simulated provider answers: its identity and the results inbox."""

    smtp_host: str
    smtp_port: int
    results_address: str
    provider_address: str
    provider_cert_pem: bytes
    provider_key_pem: bytes
    broker_cert_pem: bytes

    def seal(self, payload: dict[str, Any]) -> bytes:
        cert = x509.load_pem_x509_certificate(self.provider_cert_pem)
        key = serialization.load_pem_private_key(self.provider_key_pem, None)
        assert isinstance(key, rsa.RSAPrivateKey)
        signed = pkcs7.PKCS7SignatureBuilder().set_data(json.dumps(payload).encode()) \
            .add_signer(cert, key, hashes.SHA256()) \
            .sign(serialization.Encoding.SMIME, [pkcs7.PKCS7Options.DetachedSignature])
        sealed = pkcs7.PKCS7EnvelopeBuilder().set_data(signed) \
            .set_content_encryption_algorithm(algorithms.AES256) \
            .add_recipient(x509.load_pem_x509_certificate(self.broker_cert_pem)) \
            .encrypt(serialization.Encoding.SMIME, [])
        headers = (f"From: <{self.provider_address}>\r\nTo: <{self.results_address}>\r\n"
                   f"Subject: FRS reply\r\nMessage-ID: <{uuid.uuid4()}@sim.provider>\r\n")
        return headers.encode() + sealed.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")

    def request_ref_of(self, content: bytes) -> str | None:
        cert = x509.load_pem_x509_certificate(self.provider_cert_pem)
        key = serialization.load_pem_private_key(self.provider_key_pem, None)
        assert isinstance(key, rsa.RSAPrivateKey)
        try:
            inner = pkcs7.pkcs7_decrypt_smime(content, cert, key, [])
            part = email.message_from_bytes(inner, policy=email.policy.default)
            body = json.loads(str(part.get_payload()))
        except ValueError:
            return None
        ref = body.get("request_ref") if isinstance(body, dict) else None
        return ref if isinstance(ref, str) else None


@dataclass
class InboxState:
    mails: list[Mail] = field(default_factory=list)
    copies: Counter[str] = field(default_factory=Counter)
    refused: int = 0
    replies_sent: int = 0
    reply_failures: int = 0


class _Handler:
    def __init__(self, inbox: InboxSimulator) -> None:
        self.inbox = inbox

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        inbox = self.inbox
        b = inbox.behaviour
        if b.latency_s:
            await asyncio.sleep(b.latency_s)
        if inbox._rng.random() < b.temp_fail_rate:
            inbox.state.refused += 1
            return "451 4.3.0 try again later"
        content = bytes(envelope.original_content or envelope.content)
        parsed = email.message_from_bytes(content, policy=email.policy.default)
        message_id = str(parsed["Message-ID"]) if parsed["Message-ID"] else None
        mail = Mail(str(envelope.mail_from), tuple(envelope.rcpt_tos), message_id, content)
        inbox.state.mails.append(mail)
        inbox.state.copies[message_id or ""] += 1
        if inbox.maildir is not None:
            (inbox.maildir / f"{uuid.uuid4()}.eml").write_bytes(content)
        if inbox.reply is not None:
            task = asyncio.create_task(inbox.answer(content))
            inbox._tasks.add(task)
            task.add_done_callback(inbox._tasks.discard)
        if b.hang_after_accept_s:
            await asyncio.sleep(b.hang_after_accept_s)
        return "250 OK"


class InboxSimulator:
    def __init__(self, *, host: str = "127.0.0.1", port: int = 0,
                 maildir: Path | None = None, behaviour: InboxBehaviour | None = None,
                 seed: int | None = None, reply: MailReply | None = None) -> None:
        self.host = host
        self.port = port or _free_port()
        self.maildir = maildir
        if maildir is not None:
            maildir.mkdir(parents=True, exist_ok=True)
        self.behaviour = behaviour or InboxBehaviour()
        self.state = InboxState()
        self._rng = random.Random(seed)
        self.reply = reply
        self._tasks: set[asyncio.Task[None]] = set()
        self._controller = Controller(_Handler(self), hostname=host, port=self.port,
                                      data_size_limit=64 * 1024 * 1024)

    def start(self) -> InboxSimulator:
        self._controller.start()
        return self

    def stop(self) -> None:
        self._controller.stop()

    def __enter__(self) -> InboxSimulator:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def copies(self, message_id: str) -> int:
        return self.state.copies[message_id]

    async def answer(self, request_mail: bytes) -> None:
        reply = self.reply
        assert reply is not None
        ref = reply.request_ref_of(request_mail)
        if ref is None:
            self.state.reply_failures += 1
            return
        b = self.behaviour
        answer = {"kind": "answer", **candidate_list(ref, b.candidates)}
        payloads = [answer, answer] if b.answer_twice else [answer]
        if b.deletion_receipt:
            payloads.append({"kind": "deletion", "request_ref": ref})
        for payload in payloads:
            await self._send(reply, reply.seal(payload))

    async def _send(self, reply: MailReply, message: bytes) -> None:
        for attempt in range(6):
            try:
                await aiosmtplib.send(message, sender=reply.provider_address,
                                      recipients=[reply.results_address],
                                      hostname=reply.smtp_host, port=reply.smtp_port,
                                      timeout=10)
                self.state.replies_sent += 1
                return
            except aiosmtplib.SMTPResponseException as exc:
                if exc.code != 451:
                    break
            except (aiosmtplib.SMTPException, OSError):
                pass
            await asyncio.sleep(0.2 * 2 ** attempt)
        self.state.reply_failures += 1


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def _main(args: argparse.Namespace) -> None:
    inbox = InboxSimulator(host=args.host, port=args.port, maildir=args.maildir,
                           behaviour=InboxBehaviour(args.latency, args.temp_fail_rate))
    inbox.start()
    sys.stdout.write(json.dumps({"host": inbox.host, "port": inbox.port}) + "\n")
    sys.stdout.flush()
    await until_signalled()
    inbox.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m services.simulators.inbox",
                                     description="SMTP provider inbox simulator")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--maildir", type=Path, default=None)
    parser.add_argument("--latency", type=float, default=0.0)
    parser.add_argument("--temp-fail-rate", type=float, default=0.0)
    asyncio.run(_main(parser.parse_args()))
