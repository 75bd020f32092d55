"""A hostile vendor's reply cannot fill dispatch's memory (issue 19 item 8): a reply over
the cap is refused while it is read, whether it declares its length or streams it."""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from aiohttp import web

from schemas.events import ProviderRecord
from schemas.types import OutboundField, Transport
from services.dispatch.payloads import build_payload
from services.dispatch.transports.base import SendRequest, TransientError
from services.dispatch.transports.https import (
    MAX_REPLY_BYTES,
    HttpsTransport,
    client_tls_context,
)
from services.simulators.tls import SimulatorCA

HUGE = 200 * 1024 * 1024  # what the vendor would send; far more than dispatch may hold


@pytest.fixture
async def hostile_vendor(tmp_path: Path) -> AsyncIterator[tuple[str, Path, dict[str, int]]]:
    ca = SimulatorCA()
    cert, key = ca.server().write(tmp_path, "vendor")
    (tmp_path / "ca.pem").write_bytes(ca.cert_pem)
    written = {"bytes": 0}

    async def declared(_request: web.Request) -> web.Response:
        return web.Response(body=b"x", headers={"Content-Length": str(HUGE)})

    async def streamed(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        await response.prepare(request)
        chunk = b"{" * (64 * 1024)
        try:
            while written["bytes"] < HUGE:
                await response.write(chunk)
                written["bytes"] += len(chunk)
        except (ConnectionError, RuntimeError):
            pass  # the client hung up: what we want
        return response

    app = web.Application()
    app.router.add_post("/declared", declared)
    app.router.add_post("/streamed", streamed)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=context)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    yield f"https://127.0.0.1:{port}", tmp_path / "ca.pem", written
    await runner.cleanup()


REF = "ref-00000000-0000-4000-8000-000000000001"


def _request(endpoint: str) -> SendRequest:
    now = datetime.now(UTC)
    provider = ProviderRecord(provider_id="vendor", name="hostile", kind="commercial",
                              transport=Transport.HTTPS, endpoint=endpoint, status="active",
                              attestation_valid_until=now + timedelta(days=1), updated_at=now)
    payload = build_payload(Transport.HTTPS, list(OutboundField), photo=b"\xff\xd8jpeg",
                            agent_id="agent-7", request_ref=REF)
    return SendRequest(provider=provider, payload=payload, dispatch_id="d-1",
                       request_ref=REF)


async def test_a_reply_over_the_cap_is_refused_while_read(
        hostile_vendor: tuple[str, Path, dict[str, int]]) -> None:
    base, ca_file, written = hostile_vendor
    transport = HttpsTransport(client_tls_context(ca_file), timeout_s=30)
    try:
        with pytest.raises(TransientError) as declared:
            await transport.send(_request(f"{base}/declared"))
        assert declared.value.code == "reply_too_large"
        with pytest.raises(TransientError) as streamed:
            await transport.send(_request(f"{base}/streamed"))
        assert streamed.value.code == "reply_too_large"
    finally:
        await transport.close()
    # Dispatch stopped reading at the cap and hung up: what the vendor got out is what the
    # kernel's and TLS's buffers took (a few MB here), nowhere near its 200 MB.
    assert MAX_REPLY_BYTES < written["bytes"] < 16 * 1024 * 1024, written
