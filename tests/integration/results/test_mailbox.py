"""The SMTP inbox on the real broker: a real aiosmtpd server in the results service, mail
sent with aiosmtplib, S/MIME signed by the provider and encrypted to the broker."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiosmtplib
import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.ciphers import algorithms
from cryptography.hazmat.primitives.serialization import pkcs7

from schemas.events import LEAD_MARKING, CandidatesReceived, DeletionConfirmed
from tests.conftest import ServiceProcess
from tests.helpers import free_port, wait_for_async
from tests.integration.results.conftest import (
    cleared,
    count,
    dispatched,
    provider_record,
    publish,
    uid,
    wait_results,
)
from tests.integration.results.pki import Issued, LocalCA

pytestmark = pytest.mark.integration

VENDOR = "replies@vendor.test"
INBOX = "results@frs.test"


@dataclass
class Inbox:
    port: int
    broker: Issued
    vendor: Issued
    ca: LocalCA

@pytest.fixture
def inbox(services: dict[str, ServiceProcess], tmp_path: Path) -> Iterator[Inbox]:
    ca = LocalCA()
    broker, vendor = ca.smime(INBOX), ca.smime(VENDOR)
    cert, key = broker.write(tmp_path / "smime", "broker")
    port = free_port()
    results = services["results"]
    results.start(FRS_RESULTS_SMIME_CERT_FILE=str(cert), FRS_RESULTS_SMIME_KEY_FILE=str(key),
                  FRS_RESULTS_SMTP_PORT=str(port))
    results.wait_log("smtp inbox listening")
    results.wait_log("consumer started")
    yield Inbox(port, broker, vendor, ca)
    assert results.stop() == 0


def mail(body: dict[str, Any], signer: Issued | None, recipient: Issued | None,
         sender: str = VENDOR) -> bytes:
    data = json.dumps(body).encode()
    if signer is not None:
        data = pkcs7.PKCS7SignatureBuilder().set_data(data).add_signer(
            signer.cert, signer.key, hashes.SHA256()
        ).sign(serialization.Encoding.SMIME, [pkcs7.PKCS7Options.DetachedSignature])
    if recipient is not None:
        data = pkcs7.PKCS7EnvelopeBuilder().set_data(data).set_content_encryption_algorithm(
            algorithms.AES256).add_recipient(recipient.cert).encrypt(
            serialization.Encoding.SMIME, [])
    else:
        data = b"Content-Type: application/json\r\n\r\n" + data
    return (f"From: <{sender}>\r\nTo: <{INBOX}>\r\nSubject: FRS reply\r\n").encode() + data


async def send(inbox: Inbox, message: bytes, sender: str = VENDOR) -> None:
    await aiosmtplib.send(message, sender=sender, recipients=[INBOX], hostname="127.0.0.1",
                          port=inbox.port, timeout=30)


async def send_when_known(inbox: Inbox, message: bytes) -> None:
    """Retry while the tracker has not recorded the dispatch yet (451)."""
    async def sent() -> bool:
        try:
            await send(inbox, message)
        except aiosmtplib.SMTPDataError as exc:
            if exc.code != 451:
                raise
            return False
        return True

    await wait_for_async(sent, timeout=30.0, interval=0.5, what="the request_ref to be known")


async def setup_probe(bootstrap: str, inbox: Inbox) -> tuple[str, str, str]:
    probe, pid = uid("prb"), uid("pm")
    sent = dispatched(probe, pid)
    await publish(bootstrap, [
        provider_record(pid, transport="smime_email", endpoint=f"mailto:{VENDOR}",
                        certificate_pem=inbox.vendor.cert_pem.decode(), max_candidates=5),
        cleared(probe, pid), sent,
    ])
    return probe, pid, sent.request_ref


def answer(ref: str, n: int) -> dict[str, Any]:
    return {"kind": "answer", "request_ref": ref, "threshold": 0.0, "algorithm": "mail-alg",
            "algorithm_version": "3",
            "candidates": [{"rank": r, "score": 100 - r, "score_scale": "0-100",
                            "gallery": "state", "candidate_ref": f"m-{r}"}
                           for r in range(1, n + 1)]}


async def test_encrypted_signed_mail_becomes_lead(kafka_bootstrap: str, inbox: Inbox) -> None:
    probe, pid, ref = await setup_probe(kafka_bootstrap, inbox)
    await send_when_known(inbox, mail(answer(ref, 7), inbox.vendor, inbox.broker))
    await send(inbox, mail({"kind": "deletion", "request_ref": ref}, inbox.vendor,
                           inbox.broker))
    events = await wait_results(kafka_bootstrap, probe, lambda es: count(
        es, CandidatesReceived) >= 1 and count(es, DeletionConfirmed) >= 1)
    [got] = [e for e in events if isinstance(e, CandidatesReceived)]
    assert got.channel == "email" and got.provider_id == pid
    assert got.lead_marking == LEAD_MARKING
    assert got.list_size == 5 and got.truncated_from == 7


@pytest.mark.parametrize("case", ["forged_signer", "unsigned", "not_encrypted",
                                  "sender_mismatch", "wrong_recipient"])
async def test_bad_mail_is_refused(kafka_bootstrap: str, inbox: Inbox, case: str) -> None:
    _probe, _pid, ref = await setup_probe(kafka_bootstrap, inbox)
    body = answer(ref, 1)
    # A certificate for the same mailbox from the same CA, but not the registered one.
    impostor = inbox.ca.smime(VENDOR)
    message, code, why = {
        "forged_signer": (mail(body, impostor, inbox.broker), 554, "signer is not"),
        "unsigned": (mail(body, None, inbox.broker), 554, "must be signed"),
        "not_encrypted": (mail(body, inbox.vendor, None), 554, "not encrypted"),
        "sender_mismatch": (mail(body, inbox.vendor, inbox.broker, sender="x@evil.test"),
                            550, "differ"),
        "wrong_recipient": (mail(body, inbox.vendor, inbox.ca.smime(INBOX)), 554,
                            "not encrypted"),
    }[case]
    with pytest.raises(aiosmtplib.SMTPDataError) as refused:
        await send(inbox, message)
    assert refused.value.code == code
    assert why in refused.value.message
