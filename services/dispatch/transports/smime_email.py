"""S/MIME email: the payload encrypted with AES-256 to the provider's certificate.

The inner MIME entity is ``application/json`` holding exactly the cleared fields (the
same strict schema as the HTTPS body). It is wrapped in a CMS EnvelopedData
(``cryptography``'s PKCS7EnvelopeBuilder, AES-256-CBC content key, RSA key transport to
the provider's certificate) and sent with aiosmtplib. Only the envelope headers are in
clear: From, To, a fixed Subject, Date and ``Message-ID: <dispatch id@domain>``.

Guarantee: none against duplicates after an unknown outcome (the SMTP server may have
queued the mail before the connection dropped). A resend reuses the same Message-ID, so
a provider that deduplicates by Message-ID keeps one copy; one that does not may get two.
"""

from __future__ import annotations

import email.utils
import ssl

import aiosmtplib
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.ciphers import algorithms
from cryptography.hazmat.primitives.serialization import pkcs7

from services.dispatch.payloads import payload_body
from services.dispatch.transports.base import (
    AmbiguousError,
    PermanentError,
    SendRequest,
    SendResult,
    TransientError,
)

SUBJECT = "FRS search request (S/MIME)"


def recipient_certificate(pem: str | None) -> x509.Certificate:
    if not pem:
        raise PermanentError("no_certificate", "provider has no S/MIME certificate")
    try:
        cert = x509.load_pem_x509_certificate(pem.encode())
    except ValueError as exc:
        raise PermanentError("bad_certificate") from exc
    if not isinstance(cert.public_key(), rsa.RSAPublicKey):
        raise PermanentError("bad_certificate", "S/MIME recipients must be RSA")
    return cert


def mailbox(endpoint: str) -> str:
    address = endpoint.removeprefix("mailto:")
    if "@" not in address or any(c in address for c in "\r\n <>,"):
        raise PermanentError("bad_mailbox")
    return address


def build_message(request: SendRequest, sender: str, domain: str) -> tuple[str, bytes]:
    """Returns (recipient, RFC 5322 message bytes). The body is only the CMS envelope."""
    recipient = mailbox(request.provider.endpoint)
    cert = recipient_certificate(request.provider.certificate_pem)
    inner = (b"Content-Type: application/json\r\n"
             b"Content-Transfer-Encoding: 7bit\r\n\r\n" + payload_body(request.payload))
    smime = (
        pkcs7.PKCS7EnvelopeBuilder()
        .set_data(inner)
        .set_content_encryption_algorithm(algorithms.AES256)
        .add_recipient(cert)
        .encrypt(serialization.Encoding.SMIME, [])
    )
    headers = (
        f"From: {sender}\r\n"
        f"To: {recipient}\r\n"
        f"Subject: {SUBJECT}\r\n"
        f"Date: {email.utils.formatdate(usegmt=True)}\r\n"
        f"Message-ID: <{request.dispatch_id}@{domain}>\r\n"
    ).encode()
    # cryptography emits "\n" line ends; SMTP wants CRLF.
    body = smime.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    return recipient, headers + body


class SmimeEmailTransport:
    idempotent_resend = False

    def __init__(self, host: str, port: int, sender: str, *, starttls: bool = False,
                 tls: ssl.SSLContext | None = None, username: str | None = None,
                 password: str | None = None, timeout_s: float = 30.0) -> None:
        self.host = host
        self.port = port
        self.sender = sender
        self.domain = sender.rsplit("@", 1)[-1]
        self.starttls = starttls
        self.tls = tls
        self.username = username
        self.password = password
        self.timeout_s = timeout_s

    async def send(self, request: SendRequest) -> SendResult:
        recipient, message = build_message(request, self.sender, self.domain)
        client = aiosmtplib.SMTP(
            hostname=self.host, port=self.port, start_tls=self.starttls, use_tls=False,
            tls_context=self.tls, username=self.username, password=self.password,
            timeout=self.timeout_s)
        in_data = False  # once DATA has begun, a lost answer may hide a delivered mail
        try:
            async with client:
                await client.mail(self.sender)
                await client.rcpt(recipient)
                if request.guard is not None:  # a late session asks before the mail goes
                    await request.guard.ensure()
                in_data = True
                await client.data(message)
        except aiosmtplib.SMTPRecipientRefused as exc:
            if 400 <= exc.code < 500:
                raise TransientError("smtp_recipient_4xx") from exc
            raise PermanentError("smtp_recipient_refused") from exc
        except aiosmtplib.SMTPResponseException as exc:
            # The server answered: whatever the code, it did not take the message.
            if 400 <= exc.code < 500:
                raise TransientError(f"smtp_{exc.code}") from exc
            raise PermanentError(f"smtp_{exc.code}") from exc
        except (aiosmtplib.SMTPException, TimeoutError, OSError) as exc:
            if in_data:
                raise AmbiguousError("smtp_data_unconfirmed", type(exc).__name__) from exc
            raise TransientError("smtp_connection", type(exc).__name__) from exc
        return SendResult(detail={"message_id": f"<{request.dispatch_id}@{self.domain}>"})

    async def close(self) -> None:
        return None
