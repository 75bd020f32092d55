"""The HTTPS webhook on the real broker, with real TLS (a local CA): signed answers become
lead-marked CandidatesReceived cut to the provider's cap; forged, unsigned, stale and
replayed calls are refused and counted; deletion receipts become DeletionConfirmed."""

from __future__ import annotations

import asyncio
import base64
import json
import secrets
import socket
import ssl
import time
import urllib.request
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from schemas.catalog import PROVIDER_RESPONSES, RESULTS_EVENTS
from schemas.envelope import Envelope
from schemas.events import LEAD_MARKING, CandidatesReceived, DeletionConfirmed
from services.kit.reader import read_topic
from services.results.webhook import ANSWERS_PATH, DELETION_PATH, sign
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
from tests.integration.results.pki import LocalCA

pytestmark = pytest.mark.integration
HOLD_S = 4.0

@dataclass
class Hook:
    url: str
    ssl: ssl.SSLContext
    secrets: dict[str, bytes]
    metrics_port: int
    session: aiohttp.ClientSession
    service: ServiceProcess
    env: dict[str, str]

    def restart(self) -> None:
        assert self.service.stop() == 0
        self.service.start(**self.env)
        self.service.wait_log("webhook listening", count=2)

    async def post(self, path: str, provider: str, body: dict[str, Any], *,
                   timestamp: int | None = None, secret: bytes | None = None,
                   headers: dict[str, str] | None = None) -> tuple[int, dict[str, Any]]:
        raw = json.dumps(body).encode()
        ts = str(timestamp if timestamp is not None else int(time.time()))
        sig = sign(secret or self.secrets[provider], provider, ts, path, raw)
        hdrs = headers if headers is not None else {
            "X-FRS-Provider": provider, "X-FRS-Timestamp": ts, "X-FRS-Signature": sig,
            "Content-Type": "application/json"}
        async with self.session.post(self.url + path, data=raw, headers=hdrs,
                                     ssl=self.ssl) as resp:
            return resp.status, await resp.json()

    async def post_when_known(self, path: str, provider: str, body: dict[str, Any]
                              ) -> tuple[int, dict[str, Any]]:
        """Retry while the tracker has not recorded the dispatch yet (404)."""
        async def known() -> tuple[int, dict[str, Any]] | None:
            status, reply = await self.post(path, provider, body)
            return (status, reply) if status != 404 else None

        return await wait_for_async(known, timeout=30.0, interval=0.5,
                                    what="the request_ref to be known")

    def metric(self, outcome: str) -> float:
        text = urllib.request.urlopen(
            f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5).read().decode()
        needle = f'frs_results_webhook_requests_total{{outcome="{outcome}"}} '
        for line in text.splitlines():
            if line.startswith(needle):
                return float(line[len(needle):])
        return 0.0


@pytest.fixture
async def hook(services: dict[str, ServiceProcess], tmp_path: Path) -> AsyncIterator[Hook]:
    ca = LocalCA()
    cert, key = ca.server("127.0.0.1").write(tmp_path / "tls", "webhook")
    shared = {f"pw-{i}": secrets.token_hex(32).encode() for i in range(3)}
    secrets_file = tmp_path / "webhook-secrets.json"
    secrets_file.write_text(json.dumps({k: v.decode() for k, v in shared.items()}))
    secrets_file.chmod(0o600)  # shared secrets others may read are refused
    port, metrics_port = free_port(), free_port()
    results = services["results"]
    env = {"FRS_RESULTS_WEBHOOK_CERT_FILE": str(cert), "FRS_RESULTS_WEBHOOK_KEY_FILE": str(key),
           "FRS_RESULTS_WEBHOOK_SECRETS_FILE": str(secrets_file),
           "FRS_RESULTS_WEBHOOK_PORT": str(port), "FRS_RESULTS_WEBHOOK_WINDOW_S": "60",
           "FRS_RESULTS_WEBHOOK_UNKNOWN_HOLD_S": str(HOLD_S),
           "FRS_RESULTS_METRICS_PORT": str(metrics_port)}
    results.start(**env)
    results.wait_log("webhook listening")
    results.wait_log("consumer started")
    client_ssl = ssl.create_default_context(cadata=ca.cert_pem.decode())
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as session:
        yield Hook(f"https://127.0.0.1:{port}", client_ssl, shared, metrics_port, session,
                   results, env)
    assert results.stop() == 0


async def test_answer_that_beats_the_dispatch_record_is_held_not_refused(
    kafka_bootstrap: str, hook: Hook
) -> None:
    """A vendor answering at once can arrive before results has seen ProviderDispatched:
    the call waits for the record instead of a 404 and a retry."""
    probe, pid = uid("prb"), "pw-1"
    sent = dispatched(probe, pid)
    await publish(kafka_bootstrap, [provider_record(pid, max_candidates=20), cleared(probe, pid)])
    body = {"request_ref": sent.request_ref, "candidates": candidates(3), "threshold": 0.0,
            "algorithm": "vendor-x", "algorithm_version": "7.2"}
    call = asyncio.create_task(hook.post(ANSWERS_PATH, pid, body))
    await asyncio.sleep(0.5)
    assert not call.done(), "the answer was decided before its dispatch was recorded"
    await publish(kafka_bootstrap, [sent])
    status, reply = await call
    assert (status, reply) == (202, {"status": "accepted"})
    events = await wait_results(kafka_bootstrap, probe,
                                lambda es: count(es, CandidatesReceived) >= 1)
    assert count(events, CandidatesReceived) == 1
    # A reference that never gets a record: refused after the hold, and counted.
    before = hook.metric("unknown_request")
    started = time.monotonic()
    status, reply = await hook.post(ANSWERS_PATH, pid, {"request_ref": uid("never-sent"),
                                                        "candidates": []})
    assert (status, reply) == (404, {"error": "unknown_request"})
    assert time.monotonic() - started >= HOLD_S - 0.1
    assert hook.metric("unknown_request") == before + 1


def candidates(n: int) -> list[dict[str, Any]]:
    return [{"rank": r, "score": round(1 - r / 100, 3), "score_scale": "0-1",
             "gallery": "dl-photos", "candidate_ref": f"cand-{r}"} for r in range(n, 0, -1)]


async def test_signed_answer_becomes_capped_lead(kafka_bootstrap: str, hook: Hook) -> None:
    probe, pid = uid("prb"), "pw-0"
    sent = dispatched(probe, pid)
    await publish(kafka_bootstrap, [provider_record(pid, max_candidates=20),
                                    cleared(probe, pid), sent])
    listed = candidates(27)
    # A candidate photo is not taken in yet: it must be dropped, never put on the bus.
    listed[-1]["photo"] = base64.b64encode(b"\xff\xd8PHOTO-BYTES-MARKER").decode()
    body = {"request_ref": sent.request_ref, "candidates": listed, "threshold": 0.0,
            "algorithm": "vendor-x", "algorithm_version": "7.2"}
    status, _ = await hook.post_when_known(ANSWERS_PATH, pid, body)
    assert status == 202
    events = await wait_results(kafka_bootstrap, probe,
                                lambda es: count(es, CandidatesReceived) >= 1)
    [got] = [e for e in events if isinstance(e, CandidatesReceived)]
    assert got.channel == "webhook" and got.provider_id == pid
    assert got.lead_marking == LEAD_MARKING and got.mode == "investigative"
    assert got.list_size == 20 and got.truncated_from == 27
    assert [c.rank for c in got.candidates] == list(range(1, 21))
    assert hook.metric("accepted") >= 1
    raw = await read_topic(kafka_bootstrap, [PROVIDER_RESPONSES.name, RESULTS_EVENTS.name])
    mine = [r for r, d in raw if isinstance(d, Envelope) and d.subject == probe]
    assert len(mine) >= 2
    assert not any(listed[-1]["photo"].encode() in (r.value or b"") for r in mine)
    assert not any(b'"photo"' in (r.value or b"") for r in mine)


async def test_forged_unsigned_stale_and_replayed_calls_are_refused(
    kafka_bootstrap: str, hook: Hook
) -> None:
    probe, pid = uid("prb"), "pw-1"
    sent = dispatched(probe, pid)
    await publish(kafka_bootstrap, [provider_record(pid), cleared(probe, pid), sent])
    body = {"request_ref": sent.request_ref, "candidates": candidates(2), "threshold": 0.5,
            "algorithm": "a", "algorithm_version": "1"}
    # Forged: signed with a key that is not the provider's.
    status, reply = await hook.post(ANSWERS_PATH, pid, body, secret=b"x" * 32)
    assert (status, reply["error"]) == (401, "bad_signature")
    # Unsigned.
    status, reply = await hook.post(ANSWERS_PATH, pid, body, headers={})
    assert (status, reply["error"]) == (401, "unsigned")
    # Stale: correctly signed, but an hour old.
    status, reply = await hook.post(ANSWERS_PATH, pid, body, timestamp=int(time.time()) - 3600)
    assert (status, reply["error"]) == (401, "stale")
    # Another provider's secret for this provider's request: 403.
    status, reply = await hook.post_when_known(ANSWERS_PATH, "pw-2", body)
    assert (status, reply["error"]) == (403, "wrong_provider")
    # Accepted once, then the identical call again is a replay.
    ts = int(time.time())
    status, _ = await hook.post(ANSWERS_PATH, pid, body, timestamp=ts)
    assert status == 202
    status, reply = await hook.post(ANSWERS_PATH, pid, body, timestamp=ts)
    assert (status, reply["error"]) == (409, "replayed")
    for outcome in ("bad_signature", "unsigned", "stale", "replayed", "wrong_provider"):
        assert hook.metric(outcome) >= 1, outcome
    # The replay store is durable: still refused after a restart of the service.
    hook.restart()
    status, reply = await hook.post(ANSWERS_PATH, pid, body, timestamp=ts)
    assert (status, reply["error"]) == (409, "replayed")
    events = await wait_results(kafka_bootstrap, probe,
                                lambda es: count(es, CandidatesReceived) >= 1)
    await asyncio.sleep(1.5)
    events = await wait_results(kafka_bootstrap, probe, lambda es: True)
    assert count(events, CandidatesReceived) == 1  # only the one accepted call


async def test_deletion_receipt_by_webhook(kafka_bootstrap: str, hook: Hook) -> None:
    probe, pid = uid("prb"), "pw-0"
    sent = dispatched(probe, pid)
    await publish(kafka_bootstrap, [provider_record(pid), cleared(probe, pid), sent])
    status, _ = await hook.post_when_known(DELETION_PATH, pid,
                                           {"request_ref": sent.request_ref})
    assert status == 202
    events = await wait_results(kafka_bootstrap, probe,
                                lambda es: count(es, DeletionConfirmed) >= 1)
    [receipt] = [e for e in events if isinstance(e, DeletionConfirmed)]
    assert receipt.provider_id == pid


async def test_webhook_that_cannot_bind_fails_the_start(
    kafka_bootstrap: str, services: dict[str, ServiceProcess], tmp_path: Path
) -> None:
    cert, key = LocalCA().server("127.0.0.1").write(tmp_path / "tls2", "webhook")
    secrets_file = tmp_path / "s.json"
    secrets_file.write_text(json.dumps({"p": secrets.token_hex(16)}))
    secrets_file.chmod(0o600)  # shared secrets others may read are refused
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        results = services["results"]
        results.start(FRS_RESULTS_WEBHOOK_CERT_FILE=str(cert),
                      FRS_RESULTS_WEBHOOK_KEY_FILE=str(key),
                      FRS_RESULTS_WEBHOOK_SECRETS_FILE=str(secrets_file),
                      FRS_RESULTS_WEBHOOK_PORT=str(port))
        assert results.proc is not None
        code = await asyncio.to_thread(results.proc.wait, 60)
    assert code != 0
    assert "webhook listening" not in results.log_path.read_text()
