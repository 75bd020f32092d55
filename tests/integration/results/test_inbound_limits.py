"""Issue 19, items 2, 3 and 8 (results): the attacks that were reproduced on a running
pipeline, run again against the real results service process (webhook and SMTP inbox on,
limits tightened only where a default would make the test slow).

- Webhook exhaustion: hundreds of slow connections (headers trickled, or a plausible call
  whose body stalls) and a ``Content-Length: 99999999999`` call. Each ends within its limit,
  a provider's answer still goes through during and after, and resident memory comes back
  within 20% of its baseline.
- One email stalling results: a ~4 MB deeply nested multipart mail, in clear and encrypted
  to the broker, is refused with a reason in seconds while mail and webhook answers keep
  being taken.
- A replayed reply mail is refused, also after a restart.
- Hostile bytes get 400 with a machine-readable reason, never 500, and the same call again
  gets the same answer (not 409).
"""

from __future__ import annotations

import asyncio
import json
import secrets
import ssl
import time
import urllib.request
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import aiosmtplib
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.ciphers import algorithms
from cryptography.hazmat.primitives.serialization import pkcs7

from schemas.events import CandidatesReceived
from services.results.mailbox import MailRefused, MimeLimits, parse_mime
from services.results.webhook import ANSWERS_PATH, sign
from tests.conftest import ServiceProcess
from tests.helpers import free_port
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
from tests.integration.results.test_mailbox import (
    INBOX,
    VENDOR,
    Inbox,
    answer,
    mail,
    send,
    send_when_known,
    setup_probe,
)
from tests.integration.results.test_webhook import Hook, candidates

pytestmark = pytest.mark.integration

LIMIT_S = 4.0  # header and body timeouts of the service under test
MAX_CONNECTIONS = 100


@dataclass
class Results:
    hook: Hook
    smtp_port: int
    broker: Issued
    vendor: Issued
    ca: LocalCA

    @property
    def pid(self) -> int:
        assert self.hook.service.proc is not None
        return self.hook.service.proc.pid

    def rss_kb(self) -> int:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise AssertionError("no VmRSS")


@pytest.fixture
async def results(services: dict[str, ServiceProcess], tmp_path: Path
                  ) -> AsyncIterator[Results]:
    ca = LocalCA()
    cert, key = ca.server("127.0.0.1").write(tmp_path / "tls", "webhook")
    broker, vendor = ca.smime(INBOX), ca.smime(VENDOR)
    smime_cert, smime_key = broker.write(tmp_path / "smime", "broker")
    shared = {f"pw-{i}": secrets.token_hex(32).encode() for i in range(2)}
    secrets_file = tmp_path / "webhook-secrets.json"
    secrets_file.write_text(json.dumps({k: v.decode() for k, v in shared.items()}))
    secrets_file.chmod(0o600)  # shared secrets others may read are refused
    port, smtp_port, metrics_port = free_port(), free_port(), free_port()
    env = {"FRS_RESULTS_WEBHOOK_CERT_FILE": str(cert), "FRS_RESULTS_WEBHOOK_KEY_FILE": str(key),
           "FRS_RESULTS_WEBHOOK_SECRETS_FILE": str(secrets_file),
           "FRS_RESULTS_WEBHOOK_PORT": str(port), "FRS_RESULTS_WEBHOOK_WINDOW_S": "60",
           "FRS_RESULTS_WEBHOOK_HEADER_TIMEOUT_S": str(LIMIT_S),
           "FRS_RESULTS_WEBHOOK_BODY_TIMEOUT_S": str(LIMIT_S),
           "FRS_RESULTS_WEBHOOK_MAX_CONNECTIONS": str(MAX_CONNECTIONS),
           # Above the bus's 1 MB: an answer can pass the webhook and still not fit a record.
           "FRS_RESULTS_WEBHOOK_MAX_BODY": str(2 * 1024 * 1024),
           "FRS_RESULTS_SMIME_CERT_FILE": str(smime_cert),
           "FRS_RESULTS_SMIME_KEY_FILE": str(smime_key),
           "FRS_RESULTS_SMTP_PORT": str(smtp_port),
           "FRS_RESULTS_METRICS_PORT": str(metrics_port)}
    service = services["results"]
    service.start(**env)
    service.wait_log("webhook listening")
    service.wait_log("smtp inbox listening")
    service.wait_log("consumer started")
    client_ssl = ssl.create_default_context(cadata=ca.cert_pem.decode())
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as session:
        hook = Hook(f"https://127.0.0.1:{port}", client_ssl, shared, metrics_port, session,
                    service, env)
        yield Results(hook, smtp_port, broker, vendor, ca)
    assert service.stop() == 0


async def webhook_probe(bootstrap: str, pid: str = "pw-0") -> tuple[str, dict[str, Any]]:
    probe = uid("prb")
    sent = dispatched(probe, pid)
    await publish(bootstrap, [provider_record(pid, max_candidates=20), cleared(probe, pid),
                              sent])
    return probe, {"request_ref": sent.request_ref, "candidates": candidates(3),
                   "threshold": 0.0, "algorithm": "vendor-x", "algorithm_version": "7.2"}


async def answer_in_time(hook: Hook, body: dict[str, Any], within_s: float) -> float:
    """Post a provider's answer on a fresh connection (retrying 404 until the dispatch is
    recorded, and 503 busy, as the contract says); returns how long acceptance took."""
    started = time.monotonic()
    while True:
        status, reply = await asyncio.wait_for(hook.post(ANSWERS_PATH, "pw-0", body), within_s)
        if status == 202:
            return time.monotonic() - started
        assert status in (404, 503), (status, reply)
        assert time.monotonic() - started < within_s, (status, reply)
        await asyncio.sleep(0.2)


async def tls_connect(hook: Hook) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    host, port = hook.url.removeprefix("https://").split(":")
    return await asyncio.open_connection(host, int(port), ssl=hook.ssl)


def request_head(path: str, headers: dict[str, str], content_length: int) -> bytes:
    lines = [f"POST {path} HTTP/1.1", "Host: 127.0.0.1", "Content-Type: application/json",
             f"Content-Length: {content_length}", *(f"{k}: {v}" for k, v in headers.items())]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


async def status_of(reader: asyncio.StreamReader, within_s: float) -> tuple[int, Any]:
    """The server's reply (status, JSON body), or (0, None) when it closed without one."""
    raw = await asyncio.wait_for(reader.read(), within_s)
    if not raw:
        return 0, None
    head, _, body = raw.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    try:
        return status, json.loads(body)
    except ValueError:
        return status, body


def metric(hook: Hook, name: str, label: str) -> float:
    text = urllib.request.urlopen(
        f"http://127.0.0.1:{hook.metrics_port}/metrics", timeout=5).read().decode()
    for line in text.splitlines():
        if line.startswith(f"frs_results_{name}_total{{") and f'"{label}"' in line:
            return float(line.rsplit(" ", 1)[1])
    return 0.0


class Trickle:
    """A slow client: sends its request head a header line at a time, forever."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.opened = time.monotonic()
        self.closed_after: float | None = None
        self.task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        self.writer.write(b"POST /v1/answers HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        watch = asyncio.create_task(self.reader.read())
        try:
            while not watch.done():
                self.writer.write(b"X-Slow: 1\r\n")
                await asyncio.wait({watch}, timeout=1.0)
        except (ConnectionError, ssl.SSLError):
            pass
        finally:
            await asyncio.wait({watch}, timeout=30)
            self.closed_after = time.monotonic() - self.opened

    def close(self) -> None:
        self.task.cancel()
        self.writer.close()


async def test_slow_connections_and_a_huge_length_end_within_limits(
    kafka_bootstrap: str, results: Results
) -> None:
    hook = results.hook
    _probe, body = await webhook_probe(kafka_bootstrap)
    await answer_in_time(hook, body, 30)  # warm: TLS, the producer, the stores
    await asyncio.sleep(1.0)
    baseline = results.rss_kb()
    peak = baseline
    sampling = True

    async def sample() -> None:
        nonlocal peak
        while sampling:
            peak = max(peak, results.rss_kb())
            await asyncio.sleep(0.1)

    sampler = asyncio.create_task(sample())
    slow_bodies: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    trickles: list[Trickle] = []
    try:
        # 1. Plausible calls (known provider, fresh timestamp, well-formed signature) whose
        # body stalls after 200 KB: each is read under the body time limit, then 408.
        ts = str(int(time.time()))
        for _ in range(40):
            reader, writer = await tls_connect(hook)
            writer.write(request_head(ANSWERS_PATH, {
                "X-FRS-Provider": "pw-0", "X-FRS-Timestamp": ts,
                "X-FRS-Signature": "sha256=" + secrets.token_hex(32)}, 1_000_000))
            writer.write(b"[" * 200_000)
            slow_bodies.append((reader, writer))
        # 2. 500 connections trickling their headers: more than the cap, so the oldest
        # idle ones are closed to make room; the rest close at the header time limit.
        sem = asyncio.Semaphore(50)

        refused_at_connect = 0

        async def open_trickle() -> None:
            nonlocal refused_at_connect
            async with sem:
                try:
                    trickles.append(Trickle(*await tls_connect(hook)))
                except (ConnectionError, ssl.SSLError) as exc:
                    print("connect", type(exc).__name__, exc)
                    refused_at_connect += 1

        await asyncio.gather(*(open_trickle() for _ in range(500)))
        # 3. A Content-Length of 99999999999: refused at once, nothing read.
        reader, writer = await tls_connect(hook)
        started = time.monotonic()
        writer.write(request_head(ANSWERS_PATH, {
            "X-FRS-Provider": "pw-0", "X-FRS-Timestamp": str(int(time.time())),
            "X-FRS-Signature": "sha256=" + secrets.token_hex(32)}, 99_999_999_999))
        status_line = await asyncio.wait_for(reader.readline(), 5)
        huge_s = time.monotonic() - started
        assert status_line.startswith(b"HTTP/1.1 413 "), status_line
        writer.close()
        # 4. A provider's answer during the attack goes through.
        _probe, body = await webhook_probe(kafka_bootstrap)
        during_s = await answer_in_time(hook, body, 10)
        # Every stalled body ends in 408 at the body time limit.
        replies = await asyncio.gather(*(status_of(r, LIMIT_S + 10) for r, _ in slow_bodies))
        assert {status for status, _ in replies} == {408}, replies
        assert all(reply == {"error": "body_timeout"} for _, reply in replies)
        # Every trickling connection is closed by the server: evicted or timed out.
        await asyncio.gather(*(t.task for t in trickles))
        closed = [t.closed_after for t in trickles]
        assert all(c is not None and c <= LIMIT_S + 5 for c in closed), max(
            c or 1e9 for c in closed)
    finally:
        for t in trickles:
            t.close()
        for _, writer in slow_bodies:
            writer.close()
    # 5. After: memory back within 20% of baseline, answers still taken.
    deadline = time.monotonic() + 20
    after = results.rss_kb()
    while after > baseline * 1.2 and time.monotonic() < deadline:
        await asyncio.sleep(0.5)
        after = results.rss_kb()
    sampling = False
    await sampler
    _probe, body = await webhook_probe(kafka_bootstrap)
    after_s = await answer_in_time(hook, body, 10)
    print(f"\nwebhook attack: rss baseline {baseline} kB, peak {peak} kB, after {after} kB; "
          f"413 in {huge_s:.2f}s; answer during {during_s:.2f}s, after {after_s:.2f}s; "
          f"trickles closed within {max(c or 0 for c in closed):.1f}s; "
          f"connections evicted {metric(hook, 'webhook_connections_shed', 'evicted'):.0f}")
    assert after <= baseline * 1.2, (baseline, peak, after)


# --- hostile bytes on the webhook: 400 with a reason, and the same answer again ------------


async def raw_call(hook: Hook, headers: dict[bytes, bytes], body: bytes) -> tuple[int, Any]:
    reader, writer = await tls_connect(hook)
    head = (b"POST %s HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
            b"Content-Type: application/json\r\nContent-Length: %d\r\n"
            % (ANSWERS_PATH.encode(), len(body)))
    writer.write(head + b"".join(k + b": " + v + b"\r\n" for k, v in headers.items())
                 + b"\r\n" + body)
    try:
        return await status_of(reader, 10)
    finally:
        writer.close()


async def test_hostile_bytes_get_400_with_a_reason_and_the_same_answer_again(
    kafka_bootstrap: str, results: Results
) -> None:
    hook = results.hook
    _probe, answer_body = await webhook_probe(kafka_bootstrap)
    secret = hook.secrets["pw-0"]

    def signed(raw: bytes) -> dict[bytes, bytes]:
        ts = str(int(time.time()))
        return {b"X-FRS-Provider": b"pw-0", b"X-FRS-Timestamp": ts.encode(),
                b"X-FRS-Signature": sign(secret, "pw-0", ts, ANSWERS_PATH, raw).encode()}

    good = json.dumps(answer_body).encode()
    ref = json.dumps(answer_body["request_ref"]).encode()
    surrogate = good.replace(b'"dl-photos"', b'"\\ud800 photos"', 1)
    assert surrogate != good
    cases: dict[str, tuple[dict[bytes, bytes], bytes, str]] = {
        "non-UTF-8 signature": ({**signed(good), b"X-FRS-Signature": b"sha256=" + b"\xff" * 64},
                                good, "malformed_signature"),
        "non-UTF-8 timestamp": ({**signed(good), b"X-FRS-Timestamp": b"\xc3\x28"}, good,
                                "malformed_timestamp"),
        "deep JSON": (signed(deep := b'{"request_ref": %s, "x": %s%s}' % (
            ref, b"[" * 100_000, b"]" * 100_000)), deep, "json_too_deep"),
        "JSON deeper than the cap": (signed(over := b'{"request_ref": %s, "x": %s%s}' % (
            ref, b"[" * 20, b"]" * 20)), over, "json_too_deep"),
        "lone surrogate": (signed(surrogate), surrogate, "lone_surrogate"),
        "not JSON": (signed(b"\xff\xfe{"), b"\xff\xfe{", "not_json"),
    }
    for case, (headers, body, reason) in cases.items():
        first = await raw_call(hook, headers, body)
        assert first == (400, {"error": reason}), case
        again = await raw_call(hook, headers, body)  # the identical call: not a replay
        assert again == first, case
    # The provider's real answer is still taken.
    assert await answer_in_time(hook, answer_body, 30) < 30


# --- poison that never drains: an answer too large for the bus ---------------------------


async def test_an_answer_too_large_for_the_bus_is_refused_once_not_retried_forever(
    kafka_bootstrap: str, results: Results
) -> None:
    """Before: the bus refused the record, the webhook said 503 and the provider retried
    forever. Now the event's size is checked before it is sent: 413, a permanent answer."""
    hook = results.hook
    _probe, body = await webhook_probe(kafka_bootstrap)
    text = "\u0001" * 256  # 6 bytes each once encoded as JSON
    body["candidates"] = [{"rank": i + 1, "score": 0.5, "score_scale": text,
                           "gallery": text, "candidate_ref": text} for i in range(300)]
    assert 1_100_000 < len(json.dumps(body)) < 2 * 1024 * 1024
    for _ in range(2):  # the same answer again: the same permanent refusal
        status, reply = await hook.post_when_known(ANSWERS_PATH, "pw-0", body)
        assert (status, reply) == (413, {"error": "too_large"})
    log = hook.service.log_path.read_text()
    assert "webhook answer too large for the bus" in log and "publish failed" not in log
    # The provider's real answer still goes through.
    _probe, fine = await webhook_probe(kafka_bootstrap)
    assert await answer_in_time(hook, fine, 30) < 30


# --- one email stalling results ------------------------------------------------------------


def nested_multipart(depth: int, size: int) -> bytes:
    """``depth`` multiparts inside each other around ``size`` bytes of three-byte lines: the
    stdlib parse costs lines times depth (900 deep, 400 KB: 8 s; 4 MB: minutes)."""
    head = b"".join(b'Content-Type: multipart/mixed; boundary="b%d"\r\n\r\n--b%d\r\n' % (i, i)
                    for i in range(depth))
    tail = b"".join(b"\r\n--b%d--\r\n" % i for i in reversed(range(depth)))
    return head + b"Content-Type: text/plain\r\n\r\n" + b"x\r\n" * (size // 3) + tail


def sealed(content: bytes, recipient: Issued, sender: str = VENDOR) -> bytes:
    """``content`` encrypted to ``recipient`` (anyone can: the certificate is public)."""
    data = pkcs7.PKCS7EnvelopeBuilder().set_data(content).set_content_encryption_algorithm(
        algorithms.AES256).add_recipient(recipient.cert).encrypt(
        serialization.Encoding.SMIME, [])
    return f"From: <{sender}>\r\nTo: <{INBOX}>\r\nSubject: FRS reply\r\n".encode() + data


def inbox_of(results: Results) -> Inbox:
    return Inbox(results.smtp_port, results.broker, results.vendor, results.ca)


async def refusal(inbox: Inbox, message: bytes) -> tuple[int, str, float]:
    started = time.monotonic()
    with pytest.raises(aiosmtplib.SMTPDataError) as refused:
        await send(inbox, message)
    return refused.value.code, refused.value.message, time.monotonic() - started


async def test_nested_multipart_mail_is_refused_in_seconds_while_answers_flow(
    kafka_bootstrap: str, results: Results
) -> None:
    inbox = inbox_of(results)
    probe, _pid, ref = await setup_probe(kafka_bootstrap, inbox)
    await send_when_known(inbox, mail({"kind": "deletion", "request_ref": ref}, inbox.vendor,
                                      inbox.broker))
    clear = f"From: <{VENDOR}>\r\nTo: <{INBOX}>\r\n".encode() + nested_multipart(900, 4_000_000)
    hidden = sealed(nested_multipart(900, 2_800_000), inbox.broker)
    deep = sealed(nested_multipart(12, 100_000), inbox.broker)
    assert 3_800_000 < len(clear) < 4_194_304 and 3_800_000 < len(hidden) < 4_194_304
    bad = asyncio.gather(refusal(inbox, clear), refusal(inbox, hidden), refusal(inbox, deep))
    await asyncio.sleep(0.5)  # the big ones are arriving
    started = time.monotonic()
    await send(inbox, mail(answer(ref, 3), inbox.vendor, inbox.broker))
    mail_s = time.monotonic() - started
    _probe, body = await webhook_probe(kafka_bootstrap)
    webhook_s = await answer_in_time(results.hook, body, 10)
    (clear_code, clear_why, clear_s), (hidden_code, hidden_why, hidden_s), \
        (deep_code, deep_why, deep_s) = await bad
    print(f"\nnested mail: in clear refused in {clear_s:.2f}s, encrypted in {hidden_s:.2f}s, "
          f"12 deep in {deep_s:.2f}s; meanwhile a mail answer took {mail_s:.2f}s and a "
          f"webhook answer {webhook_s:.2f}s")
    assert (clear_code, hidden_code, deep_code) == (554, 554, 554)
    assert "not encrypted" in clear_why
    assert "too many MIME parts" in hidden_why
    assert "MIME nesting too deep" in deep_why
    assert max(clear_s, hidden_s, deep_s) < 15
    assert mail_s < 10 and webhook_s < 5
    events = await wait_results(kafka_bootstrap, probe,
                                lambda es: count(es, CandidatesReceived) >= 1)
    assert count(events, CandidatesReceived) == 1


async def test_mime_parse_worker_is_killed_at_its_time_limit() -> None:
    started = time.monotonic()
    with pytest.raises(MailRefused) as refused:
        await parse_mime(nested_multipart(900, 400_000),
                         MimeLimits(max_depth=1000, max_parts=1000, timeout_s=1.0))
    assert refused.value.outcome == "mime_timeout"
    assert time.monotonic() - started < 3
    summary = await parse_mime(b"Content-Type: text/plain\r\n\r\nhello", MimeLimits())
    assert (summary.content_type, summary.payload) == ("text/plain", b"hello")


# --- replayed reply mail -------------------------------------------------------------------


def with_message_id(message: bytes, message_id: str) -> bytes:
    return message.replace(b"Subject: FRS reply\r\n",
                           f"Subject: FRS reply\r\nMessage-ID: {message_id}\r\n".encode(), 1)


async def test_replayed_reply_mail_is_refused_also_after_a_restart(
    kafka_bootstrap: str, results: Results
) -> None:
    inbox = inbox_of(results)
    probe, _pid, ref = await setup_probe(kafka_bootstrap, inbox)
    original = mail(answer(ref, 2), inbox.vendor, inbox.broker)
    first = with_message_id(original, f"<{uid('m')}@vendor.test>")
    await send_when_known(inbox, first)
    # The same mail again: refused by its Message-ID, before anything is decrypted.
    code, why, _ = await refusal(inbox, first)
    assert (code, "replayed") == (550, why.split(":")[0].split()[-1])
    # The same encrypted content under new headers: refused by its digest.
    code, why, _ = await refusal(inbox, with_message_id(original, f"<{uid('m')}@x.test>"))
    assert code == 550 and "replayed" in why
    # The provider signing the same answer anew is writing again, not a replay.
    await send(inbox, mail(answer(ref, 2), inbox.vendor, inbox.broker))
    # The record of accepted mail survives a restart.
    results.hook.restart()
    results.hook.service.wait_log("smtp inbox listening", count=2)
    code, why, _ = await refusal(inbox, first)
    assert code == 550 and "replayed" in why
    assert metric(results.hook, "mail_messages", "replayed") == 1  # counted since the restart
    events = await wait_results(kafka_bootstrap, probe,
                                lambda es: count(es, CandidatesReceived) >= 1)
    assert count(events, CandidatesReceived) >= 1


async def test_smtp_connections_over_the_cap_get_421(results: Results) -> None:
    async def banner() -> tuple[bytes, asyncio.StreamWriter]:
        reader, writer = await asyncio.open_connection("127.0.0.1", results.smtp_port)
        return await asyncio.wait_for(reader.readline(), 10), writer

    held = [await banner() for _ in range(16)]  # FRS_RESULTS_SMTP_MAX_CONNECTIONS default
    try:
        assert all(line.startswith(b"220 ") for line, _ in held)
        line, writer = await banner()
        writer.close()
        assert line.startswith(b"421 4.7.0 too many connections")
    finally:
        for _, w in held:
            w.close()
    await asyncio.sleep(0.5)
    line, writer = await banner()
    writer.close()
    assert line.startswith(b"220 ")
