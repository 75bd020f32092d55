"""HTTPS webhook for API vendors (aiohttp, TLS only).

Contract (also in services/results/README.md):

``POST /v1/answers``   a candidate list, the body is the answer format of ``normalize.py``
                       plus ``"request_ref"`` (the opaque id the provider was sent).
``POST /v1/deletion``  a deletion receipt: ``{"request_ref": "..."}``.

Every call carries three headers:

- ``X-FRS-Provider``: the provider id (selects the shared secret);
- ``X-FRS-Timestamp``: Unix time in seconds, within ``FRS_RESULTS_WEBHOOK_WINDOW_S`` of ours;
- ``X-FRS-Signature``: ``sha256=`` + hex HMAC-SHA256(secret, ``provider + "\\n" + timestamp +
  "\\n" + path + "\\n"`` + raw body). The path is signed so a receipt cannot be replayed
  as an answer or the other way round.

Authentication comes before the body. The signature covers the body, so it cannot be
checked before the body is read; what is checked from the headers alone, before a byte of
body is read, is everything else: all three headers present, the provider id known, the
timestamp a number within the window, the signature header well-formed (``sha256=`` and 64
lowercase hex digits), that signature not already accepted (replay), and a
``Content-Length`` (if sent) within ``FRS_RESULTS_WEBHOOK_MAX_BODY``. Only then is the body
read, capped by bytes read too (a chunked body) and by ``FRS_RESULTS_WEBHOOK_BODY_TIMEOUT_S``,
and its MAC verified. A refusal before the body closes the connection.

Connections are bounded by aiohttp's own server options (header line and field sizes,
header count, ``keepalive_timeout`` which also closes a connection that has not delivered its
headers, ``handler_cancellation``, ``lingering_time``), by the TLS handshake timeout, and by
``ConnectionCap`` (at most ``FRS_RESULTS_WEBHOOK_MAX_CONNECTIONS``).

Answers: 202 accepted (published); 400 malformed_signature or malformed_timestamp (a header
that is not the format above, non-ASCII bytes included), not_json, json_too_deep,
lone_surrogate (a JSON string escape that is half a surrogate pair), bad_body (not a JSON
object or no request_ref); 401 unsigned, unknown_provider, bad_signature or stale; 403 the
request_ref belongs to another provider; 404 unknown request_ref after waiting
``FRS_RESULTS_WEBHOOK_UNKNOWN_HOLD_S`` for dispatch's record of it (retry later); 408
body_timeout; 409 replay of an accepted call; 413 too_large; 503 unavailable (the bus did
not take it, or the shared state did not answer; retry) or busy (every connection slot is
serving a request; retry). A call that is refused is not remembered, so the same call may be
retried. Every outcome is counted in
``frs_results_webhook_requests_total`` (busy in ``frs_results_webhook_connections_shed_total``).

Candidate photos are not taken in yet: a ``photo`` field on a candidate is dropped before
anything reaches the bus (image bytes never travel on the bus) and counted.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import hashlib
import hmac
import json
import logging
import re
import ssl
import time
from collections.abc import Awaitable, Callable, Mapping
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from aiohttp import web
from aiokafka.errors import MessageSizeTooLargeError
from prometheus_client import Counter

from schemas.events import DeletionConfirmed, Event, ProviderAnswered
from schemas.types import utcnow
from services.kit.private_files import check_private
from services.kit.publisher import EventTooLarge, Publisher
from services.kit.registry import Registries
from services.kit.signals import store_unavailable
from services.results.store import Arrivals, Nonces, NonceStore, RefLookup, RequestRefs

if TYPE_CHECKING:
    from services.results.settings import ResultsSettings

log = logging.getLogger("frs.results.webhook")

REQUESTS = Counter("frs_results_webhook_requests_total",
                   "Webhook calls by outcome (accepted or the refusal reason).", ["outcome"])
CONNECTIONS_SHED = Counter(
    "frs_results_webhook_connections_shed_total",
    "Webhook connections over FRS_RESULTS_WEBHOOK_MAX_CONNECTIONS: an idle one closed to make "
    "room (evicted) or the new one refused with 503 (busy).", ["reason"])
PHOTOS_DROPPED = Counter("frs_results_candidate_photos_dropped_total",
                         "Candidate photos received and dropped (not taken in yet).", ["channel"])

PROVIDER_HEADER = "X-FRS-Provider"
TIMESTAMP_HEADER = "X-FRS-Timestamp"
SIGNATURE_HEADER = "X-FRS-Signature"
ANSWERS_PATH = "/v1/answers"
DELETION_PATH = "/v1/deletion"

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def sign(secret: bytes, provider_id: str, timestamp: str, path: str, body: bytes) -> str:
    """The signature a provider sends (also used by tests and simulators)."""
    message = f"{provider_id}\n{timestamp}\n{path}\n".encode() + body
    return "sha256=" + hmac.new(secret, message, hashlib.sha256).hexdigest()


def load_secrets(path: Path) -> dict[str, bytes]:
    data = json.loads(path.read_text())
    if not isinstance(data, dict) or not all(
        isinstance(k, str) and isinstance(v, str) and len(v) >= 16 for k, v in data.items()
    ):
        raise ValueError(f"{path}: want a JSON object of provider id -> secret (>= 16 chars)")
    return {k: v.encode() for k, v in data.items()}


def strip_photos(payload: dict[str, Any], channel: str) -> dict[str, Any]:
    """Drop candidate photos: bytes never go on the bus (vault intake is not built yet)."""
    candidates = payload.get("candidates")
    if not isinstance(candidates, list):
        return payload
    kept: list[Any] = []
    for candidate in candidates:
        if isinstance(candidate, dict) and "photo" in candidate:
            PHOTOS_DROPPED.labels(channel).inc()
            kept.append({k: v for k, v in candidate.items() if k != "photo"})
        else:
            kept.append(candidate)
    return {**payload, "candidates": kept}


class BadJson(ValueError):
    """An answer body that is not a JSON object this service can carry; ``reason`` is the
    machine-readable refusal code."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


_SURROGATE = re.compile("[\ud800-\udfff]")


def parse_json_object(body: bytes, max_depth: int) -> dict[str, Any]:
    """Parse an answer body: a JSON object, at most ``max_depth`` arrays/objects deep, no
    lone surrogates (they cannot be encoded again, so the event could never be published).
    Walks iteratively: a deep document cannot exhaust the stack here."""
    try:
        value = json.loads(body)
    except RecursionError:
        raise BadJson("json_too_deep") from None
    except (UnicodeDecodeError, ValueError):
        raise BadJson("not_json") from None
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            if depth > max_depth:
                raise BadJson("json_too_deep")
            for key, child in item.items():
                if _SURROGATE.search(key):
                    raise BadJson("lone_surrogate")
                stack.append((child, depth + 1))
        elif isinstance(item, list):
            if depth > max_depth:
                raise BadJson("json_too_deep")
            stack.extend((child, depth + 1) for child in item)
        elif isinstance(item, str) and _SURROGATE.search(item):
            raise BadJson("lone_surrogate")
    if not isinstance(value, dict):
        raise BadJson("bad_body")
    return value


class Refused(Exception):
    def __init__(self, status: int, outcome: str) -> None:
        super().__init__(outcome)
        self.status = status
        self.outcome = outcome


_TIMESTAMP = re.compile(r"[0-9]{1,12}")
_SIGNATURE = re.compile(r"sha256=[0-9a-f]{64}")


@dataclass(frozen=True)
class Caller:
    """What the headers say, checked before the body is read."""

    provider_id: str
    secret: bytes
    timestamp: str
    signature: str
    digest: str  # replay key: sha256 of the signature


@dataclass
class Webhook:
    secrets: Mapping[str, bytes]
    nonces: Nonces
    refs: RefLookup
    publisher: Publisher
    registries: Registries
    window_s: int
    clock: Callable[[], float] = time.time
    # A vendor that answers at once can beat dispatch's record of the send to us: such an
    # answer waits this long for the record before it is refused with 404 (retry later).
    unknown_hold_s: float = 2.0
    max_body: int = 1_048_576
    # The tracker's word that a ref was committed in this process (None: poll only).
    arrivals: Arrivals | None = None
    body_timeout_s: float = 10.0
    max_json_depth: int = 16

    async def check_headers(self, request: web.BaseRequest) -> Caller:
        """Everything that can be checked before the body: returns the caller or raises
        Refused. The MAC itself needs the body (see ``verify``)."""
        provider_id = request.headers.get(PROVIDER_HEADER)
        timestamp = request.headers.get(TIMESTAMP_HEADER)
        signature = request.headers.get(SIGNATURE_HEADER)
        if not provider_id or not timestamp or not signature:
            raise Refused(401, "unsigned")
        secret = self.secrets.get(provider_id)
        if secret is None:
            raise Refused(401, "unknown_provider")
        if not _TIMESTAMP.fullmatch(timestamp):
            raise Refused(400, "malformed_timestamp")
        now = self.clock()
        if abs(now - int(timestamp)) > self.window_s:
            raise Refused(401, "stale")
        if not _SIGNATURE.fullmatch(signature):
            raise Refused(400, "malformed_signature")
        digest = hashlib.sha256(signature.encode()).hexdigest()
        if await self.nonces.seen(digest, now, 2 * self.window_s):
            raise Refused(409, "replayed")
        if request.content_length is not None and request.content_length > self.max_body:
            raise Refused(413, "too_large")
        return Caller(provider_id, secret, timestamp, signature, digest)

    def verify(self, caller: Caller, path: str, body: bytes) -> None:
        expected = sign(caller.secret, caller.provider_id, caller.timestamp, path, body)
        if not hmac.compare_digest(expected, caller.signature):
            raise Refused(401, "bad_signature")

    async def read_body(self, request: web.BaseRequest) -> bytes:
        """The body, capped by bytes read (``client_max_size``) and by time."""
        try:
            async with asyncio.timeout(self.body_timeout_s):
                return await request.read()
        except web.HTTPRequestEntityTooLarge:
            raise Refused(413, "too_large") from None
        except TimeoutError:
            raise Refused(408, "body_timeout") from None

    async def handle(self, request: web.Request) -> web.Response:
        try:
            return await self._handle(request)
        except Exception as exc:
            if not store_unavailable(exc):
                raise
            # The shared state did not answer (a database restart, a failover): 503, so
            # the provider retries, as when the bus refuses; a 500 was taken as final and
            # the answer lost (found by the chaos set's PostgreSQL restart).
            log.error("webhook state unavailable", extra={"error": type(exc).__name__})
            return self._refuse(Refused(503, "unavailable"), request)

    async def _handle(self, request: web.Request) -> web.Response:
        try:
            caller = await self.check_headers(request)
        except Refused as refused:
            return self._refuse(refused, request, close=True)
        try:
            body = await self.read_body(request)
        except Refused as refused:
            return self._refuse(refused, request, close=True)
        try:
            self.verify(caller, request.path, body)
            event = await self._event(request.path, caller.provider_id, body)
        except Refused as refused:
            return self._refuse(refused, request)
        # Claimed and published as one step that a client disconnect cannot cut in half
        # (handler cancellation is on): a claimed call is always a published one.
        accepted = await asyncio.shield(self._accept(caller, event))
        if isinstance(accepted, Refused):
            return self._refuse(accepted, request)
        REQUESTS.labels("accepted").inc()
        log.info("webhook accepted", extra={"provider": caller.provider_id,
                                            "path": request.path, "type": event.TYPE})
        return web.json_response({"status": "accepted"}, status=202)

    async def _accept(self, caller: Caller, event: Event) -> Refused | None:
        if not await self.nonces.claim(caller.digest, self.clock(), 2 * self.window_s):
            return Refused(409, "replayed")
        try:
            await asyncio.wait_for(self.publisher.publish([event]), 30)
        except (EventTooLarge, MessageSizeTooLargeError) as exc:
            # Permanent: a retry of the same answer would be refused again, forever.
            await self.nonces.release(caller.digest)
            log.warning("webhook answer too large for the bus", extra={"error": str(exc)})
            return Refused(413, "too_large")
        except (TimeoutError, OSError, RuntimeError) as exc:
            await self.nonces.release(caller.digest)  # not accepted: the provider may retry
            log.error("webhook publish failed", extra={"error": type(exc).__name__})
            return Refused(503, "unavailable")
        except BaseException:
            await self.nonces.release(caller.digest)
            raise
        return None

    async def _lookup(self, request_ref: str) -> tuple[str, str] | None:
        deadline = time.monotonic() + self.unknown_hold_s
        pause = 0.01
        while True:
            # Watched before the lookup, so a commit between the two is not missed.
            arrived = self.arrivals.watch(request_ref) if self.arrivals is not None else None
            try:
                found = await self.refs.lookup(request_ref)
                left = deadline - time.monotonic()
                if found is not None or left <= 0:
                    return found
                if arrived is None:
                    await asyncio.sleep(min(pause, left))
                else:
                    # Woken by this process's commit of the ref; another instance's
                    # tracker may commit it instead: looked for again after a pause.
                    await asyncio.wait({arrived}, timeout=min(pause, left))
                    pause = min(pause * 2, 0.05)
            finally:
                if arrived is not None and self.arrivals is not None:
                    self.arrivals.forget(request_ref, arrived)

    async def _event(self, path: str, provider_id: str, body: bytes) -> Event:
        try:
            payload = parse_json_object(body, self.max_json_depth)
        except BadJson as bad:
            raise Refused(400, bad.reason) from None
        if not isinstance(payload.get("request_ref"), str):
            raise Refused(400, "bad_body")
        found = await self._lookup(payload["request_ref"])
        if found is None:
            raise Refused(404, "unknown_request")
        probe_id, owner = found
        if owner != provider_id:
            raise Refused(403, "wrong_provider")
        if path == DELETION_PATH:
            return DeletionConfirmed(probe_id=probe_id, provider_id=provider_id,
                                     confirmed_at=utcnow())
        return ProviderAnswered(probe_id=probe_id, provider_id=provider_id, channel="webhook",
                                payload=strip_photos(payload, "webhook"),
                                received_at=utcnow())

    def _refuse(self, refused: Refused, request: web.BaseRequest,
                close: bool = False) -> web.Response:
        REQUESTS.labels(refused.outcome).inc()
        log.warning("webhook refused", extra={"outcome": refused.outcome,
                                              "status": refused.status, "path": request.path})
        response = web.json_response({"error": refused.outcome}, status=refused.status)
        if close:
            response.force_close()  # the body was not read: this connection is done
        return response


_BUSY_REPLY = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
               b"Content-Length: 17\r\nRetry-After: 1\r\nConnection: close\r\n\r\n"
               b'{"error": "busy"}')


class _Busy(asyncio.Protocol):
    """Takes a connection over the cap: a fixed 503 busy, then close (nothing is read)."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.WriteTransport)
        transport.write(_BUSY_REPLY)
        transport.close()


def _malloc_trim() -> Callable[[int], int] | None:
    path = ctypes.util.find_library("c")
    trim = getattr(ctypes.CDLL(path), "malloc_trim", None) if path else None
    return cast("Callable[[int], int] | None", trim)  # None: not glibc


class FreeMemory:
    """Hands freed heap back to the OS (glibc ``malloc_trim``) after inbound work. What a
    closed connection or a parsed mail held is freed by CPython and OpenSSL, but glibc keeps
    the pages: without this, a flood of connections leaves the process at its peak size for
    good (measured: 70 MB before, 145 MB at the peak and 146 MB after 500 slow connections;
    73 MB after with the trim). It trims at the end of every period in which ``note`` was
    called or ``activity()`` changed (e.g. connections closed). Off glibc it does nothing."""

    def __init__(self, period_s: float = 5.0,
                 activity: Callable[[], object] | None = None) -> None:
        self.period_s = period_s
        self.activity = activity
        self._noted = 0
        self._trim = _malloc_trim()

    def note(self) -> None:
        self._noted += 1

    def start(self, stack: AsyncExitStack) -> None:
        task = asyncio.create_task(self._run(), name="free-memory")
        stack.callback(task.cancel)

    def _state(self) -> tuple[int, object]:
        return self._noted, self.activity() if self.activity is not None else None

    async def _run(self) -> None:
        last = self._state()
        while self._trim is not None:
            await asyncio.sleep(self.period_s)
            now = self._state()
            if now != last:
                last = now
                await asyncio.to_thread(self._trim, 0)


class ConnectionCap:
    """Protocol factory in front of aiohttp's low-level ``web.Server`` (which is documented
    as a protocol factory for ``loop.create_server``): at most ``limit`` connections past
    their TLS handshake. When full, the oldest connection with no request in progress (one
    still sending its headers, or an idle keep-alive) is closed to make room, so a flood of
    slow connections cannot lock out a provider that sends its request at once; if every
    connection is serving a request, the new one gets 503 busy. Connections still in the
    TLS handshake are not counted; the handshake timeout bounds them."""

    def __init__(self, limit: int, free_memory: FreeMemory | None = None) -> None:
        self.limit = limit
        self.free_memory = free_memory or FreeMemory()
        self.server: web.Server | None = None
        self._busy: set[web.RequestHandler] = set()
        self._closing: set[web.RequestHandler] = set()  # closed, not yet gone from the server

    @web.middleware
    async def mark_busy(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        protocol = request.protocol
        self._busy.add(protocol)
        try:
            return await handler(request)
        finally:
            self._busy.discard(protocol)

    def __call__(self) -> asyncio.BaseProtocol:
        assert self.server is not None, "set ConnectionCap.server before serving"
        self.free_memory.note()
        connections = self.server.connections
        self._closing.intersection_update(connections)
        live = [c for c in connections if c not in self._closing]
        if len(live) >= self.limit:
            idle = next((c for c in live if c not in self._busy), None)
            if idle is None:
                CONNECTIONS_SHED.labels("busy").inc()
                return _Busy()
            CONNECTIONS_SHED.labels("evicted").inc()
            self._closing.add(idle)
            idle.force_close()
        return self.server()


def tls_context(cert_file: Path, key_file: Path | None) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(cert_file, key_file)
    return context


def make_app(webhook: Webhook, cap: ConnectionCap) -> web.Application:
    app = web.Application(client_max_size=webhook.max_body, middlewares=[cap.mark_busy])
    app.router.add_post(ANSWERS_PATH, webhook.handle)
    app.router.add_post(DELETION_PATH, webhook.handle)
    return app


async def start_webhook(settings: ResultsSettings, publisher: Publisher,
                        registries: Registries, stack: AsyncExitStack,
                        stores: tuple[Nonces, RefLookup] | None = None,
                        arrivals: Arrivals | None = None) -> None:
    """Bind now (a bad certificate or a taken port fails the start, not later); the stack
    stops the server and closes the stores. ``stores``: the shared ones (PostgreSQL);
    without, SQLite files in the state dir."""
    if settings.webhook_secrets_file is None or settings.webhook_cert_file is None:
        raise ValueError("FRS_RESULTS_WEBHOOK_CERT_FILE and FRS_RESULTS_WEBHOOK_SECRETS_FILE "
                         "are both required for the webhook")
    # Shared secrets others may read are refused, in every mode (private_files).
    check_private(settings.webhook_secrets_file)
    context = tls_context(settings.webhook_cert_file, settings.webhook_key_file)
    # Read once at start: rotating a secret means a restart.
    secrets = load_secrets(settings.webhook_secrets_file)
    if stores is None:
        local_nonces = NonceStore(settings.nonce_path())
        stack.callback(local_nonces.close)
        local_refs = RequestRefs(settings.tracker_path())
        stack.callback(local_refs.close)
        stores = local_nonces, local_refs
    nonces, refs = stores
    webhook = Webhook(secrets, nonces, refs, publisher, registries, settings.webhook_window_s,
                      unknown_hold_s=settings.webhook_unknown_hold_s,
                      max_body=settings.webhook_max_body,
                      body_timeout_s=settings.webhook_body_timeout_s,
                      max_json_depth=settings.max_json_depth, arrivals=arrivals)
    cap = ConnectionCap(settings.webhook_max_connections)
    runner = web.AppRunner(
        make_app(webhook, cap), access_log=None,
        # A client that goes away cancels its handler instead of leaving it running.
        handler_cancellation=True,
        # Armed when a connection opens: no complete request headers by then, it is closed
        # (aiohttp's slow-header defence); also the idle time of a keep-alive connection.
        keepalive_timeout=settings.webhook_header_timeout_s,
        max_line_size=settings.webhook_max_header_size,
        max_field_size=settings.webhook_max_header_size,
        max_headers=settings.webhook_max_headers,
        lingering_time=settings.webhook_linger_s,
    )
    await runner.setup()
    stack.push_async_callback(runner.cleanup)
    assert runner.server is not None
    cap.server = runner.server
    cap.free_memory.activity = lambda: len(runner.server.connections) if runner.server else 0
    server = await asyncio.get_running_loop().create_server(
        cap, settings.webhook_host, settings.webhook_port, ssl=context,
        ssl_handshake_timeout=settings.webhook_header_timeout_s,
        ssl_shutdown_timeout=settings.webhook_header_timeout_s)

    async def close() -> None:
        server.close()
        await server.wait_closed()

    stack.push_async_callback(close)
    cap.free_memory.start(stack)
    log.info("webhook listening", extra={"host": settings.webhook_host,
                                         "port": settings.webhook_port})
