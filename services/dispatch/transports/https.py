"""HTTPS upload to a vendor's web service (aiohttp, TLS verified against a configured CA).

Vendor contract (also in services/dispatch/README.md):

    POST <provider.endpoint>            (https only)
    Content-Type: application/json
    Idempotency-Key: <dispatch id>      (stable per probe and provider)
    {"photo": "<base64 JPEG/PNG>", "agent_id": "...", "request_ref": "ref-..."}
                                         (only the fields policy cleared)

    202 or 200 {"request_ref": "ref-..."}  accepted (200: a duplicate key, already accepted)
    408, 429, 5xx, timeout, connection error   transient: retried with the same key
    other 4xx                                   permanent
    2xx without the request_ref echoed          malformed: retried with the same key

Guarantee: resending after an unknown outcome reuses the Idempotency-Key, so a vendor
that honours the contract keeps exactly one copy. The answer comes later, on the
provider's reply channel (webhook), never in this response.

A request leaves only while its attempt's guard holds (``SendGuard``, issue 18): the body
goes out by ``GuardedBody``, which asks the guard before each slice; a process frozen
before or while writing (SIGSTOP past its partition's move) wakes to a refusal, and the
vendor sees at most a request cut short, never a send.
"""

from __future__ import annotations

import asyncio
import json
import ssl
from pathlib import Path

import aiohttp
from aiohttp.abc import AbstractStreamWriter

from services.dispatch.payloads import payload_body
from services.dispatch.transports.base import (
    PermanentError,
    SendGuard,
    SendRequest,
    SendResult,
    TransientError,
)

_TRANSIENT_STATUS = {408, 425, 429}


def client_tls_context(ca_file: Path | None, cert_file: Path | None = None,
                       key_file: Path | None = None) -> ssl.SSLContext:
    """Verify the server against ``ca_file`` (system roots if None); client cert optional."""
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH,
                                     cafile=str(ca_file) if ca_file else None)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if cert_file is not None:
        ctx.load_cert_chain(str(cert_file), str(key_file) if key_file else None)
    return ctx


# A vendor's acknowledgement is a small JSON object; a reply larger than this is refused
# while it is read (a 1 GiB reply once took dispatch to 2.1 GB resident).
MAX_REPLY_BYTES = 64 * 1024


async def _read_capped(response: aiohttp.ClientResponse, limit: int) -> bytes:
    """The body, read up to ``limit`` bytes: past it the reply is malformed, not held."""
    declared = response.content_length
    if declared is not None and declared > limit:
        raise TransientError("reply_too_large", f"content-length {declared}")
    body = bytearray()
    async for chunk in response.content.iter_chunked(16 * 1024):
        body += chunk
        if len(body) > limit:
            raise TransientError("reply_too_large", f"over {limit} bytes")
    return bytes(body)


def _unsent(writer: AbstractStreamWriter) -> int:
    """Bytes written but still in this process: the transport's buffer, and under TLS the
    socket's own one beneath it (asyncio keeps that one private)."""
    transport = getattr(writer, "transport", None)
    if transport is None or transport.is_closing():
        return 0
    size = int(transport.get_write_buffer_size())
    inner = getattr(getattr(transport, "_ssl_protocol", None), "_transport", None)
    if isinstance(inner, asyncio.WriteTransport) and not inner.is_closing():
        size += inner.get_write_buffer_size()
    return size


class GuardedBody(aiohttp.payload.Payload):
    """The request body, handed to the socket in slices, each after the guard allows it.
    The last slice (a few bytes, without which the vendor has no request) goes only once
    everything before it has left this process: frozen at any point before, the process
    holds an incomplete request, and on waking the guard refuses its end. Normal sends pay
    one clock read per slice; only a late one asks the store."""

    SLICE = 64 * 1024
    LAST = 512

    def __init__(self, body: bytes, guard: SendGuard | None) -> None:
        super().__init__(body, content_type="application/json")
        self._size = len(body)
        self._guard = guard

    def decode(self, encoding: str = "utf-8", errors: str = "strict") -> str:
        return bytes(self._value).decode(encoding, errors)

    async def write(self, writer: AbstractStreamWriter) -> None:
        await self.write_with_length(writer, None)

    async def write_with_length(self, writer: AbstractStreamWriter,
                                content_length: int | None) -> None:
        body = memoryview(self._value)[:content_length]
        last = max(0, len(body) - self.LAST)
        for start in range(0, last, self.SLICE):
            await self._allowed()
            await writer.write(body[start:min(start + self.SLICE, last)])
        # Rare (a slow link; a fast one takes it all at once), and asyncio has no event
        # for an emptied buffer: polled.
        while _unsent(writer):  # noqa: ASYNC110
            await asyncio.sleep(0.005)
        await self._allowed()
        await writer.write(body[last:])  # no wait between the guard and the bytes

    async def _allowed(self) -> None:
        if self._guard is not None:
            await self._guard.ensure()


class HttpsTransport:
    idempotent_resend = True

    def __init__(self, tls: ssl.SSLContext, timeout_s: float = 10.0,
                 connect_timeout_s: float = 5.0, max_reply_bytes: int = MAX_REPLY_BYTES) -> None:
        self._tls = tls
        self._max_reply = max_reply_bytes
        self._timeout = aiohttp.ClientTimeout(total=timeout_s, sock_connect=connect_timeout_s)
        self._session: aiohttp.ClientSession | None = None

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None:
            # limit=0: concurrency is bounded per provider by the dispatcher, not here.
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(ssl=self._tls, limit=0),
                timeout=self._timeout,
            )
        return self._session

    async def send(self, request: SendRequest) -> SendResult:
        url = request.provider.endpoint
        if not url.startswith("https://"):
            raise PermanentError("not_https", "provider endpoint must be an https URL")
        headers = {"Content-Type": "application/json", "Idempotency-Key": request.dispatch_id}
        try:
            # No redirects: aiohttp would resend the photo (307/308 keep the body) to
            # wherever Location points, plain http included; only the registered endpoint
            # is approved.
            data = GuardedBody(payload_body(request.payload), request.guard)
            async with self._client().post(url, data=data,
                                           headers=headers, allow_redirects=False) as response:
                status = response.status
                raw = await _read_capped(response, self._max_reply)
        except TimeoutError as exc:
            raise TransientError("timeout") from exc
        except aiohttp.ClientConnectorCertificateError as exc:
            raise PermanentError("tls_verify_failed") from exc
        except aiohttp.ClientSSLError as exc:
            raise PermanentError("tls_error") from exc
        except (aiohttp.ClientError, OSError) as exc:
            raise TransientError("connection", type(exc).__name__) from exc
        if status >= 500 or status in _TRANSIENT_STATUS:
            raise TransientError(f"http_{status}")
        if status >= 300:
            raise PermanentError(f"http_{status}")
        try:
            body = json.loads(raw)  # bytes: a body that is not UTF-8 is malformed, not a crash
        except ValueError:
            body = None
        if not isinstance(body, dict) or body.get("request_ref") != request.request_ref:
            raise TransientError("malformed_answer", f"http_{status}")
        return SendResult(detail={"status": str(status)})

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
