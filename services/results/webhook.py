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

Answers: 202 accepted (published); 400 body not a JSON object or no request_ref;
401 unsigned, unknown provider, bad signature or stale timestamp; 403 the request_ref
belongs to another provider; 404 unknown request_ref after waiting
``FRS_RESULTS_WEBHOOK_UNKNOWN_HOLD_S`` for dispatch's record of it (retry later); 409 replay
of an accepted call; 413 body too large; 503 the bus did not take it (retry). Every refusal
is counted in ``frs_results_webhook_requests_total``.

Candidate photos are not taken in yet: a ``photo`` field on a candidate is dropped before
anything reaches the bus (image bytes never travel on the bus) and counted.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import ssl
import time
from collections.abc import Callable, Mapping
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aiohttp import web
from prometheus_client import Counter

from schemas.events import DeletionConfirmed, Event, ProviderAnswered
from schemas.types import utcnow
from services.kit.bus import Publisher
from services.kit.registry import Registries
from services.results.store import NonceStore, RequestRefs

if TYPE_CHECKING:
    from services.results.app import ResultsSettings

log = logging.getLogger("frs.results.webhook")

REQUESTS = Counter("frs_results_webhook_requests_total",
                   "Webhook calls by outcome (accepted or the refusal reason).", ["outcome"])
PHOTOS_DROPPED = Counter("frs_results_candidate_photos_dropped_total",
                         "Candidate photos received and dropped (not taken in yet).", ["channel"])

PROVIDER_HEADER = "X-FRS-Provider"
TIMESTAMP_HEADER = "X-FRS-Timestamp"
SIGNATURE_HEADER = "X-FRS-Signature"
ANSWERS_PATH = "/v1/answers"
DELETION_PATH = "/v1/deletion"


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


class Refused(Exception):
    def __init__(self, status: int, outcome: str) -> None:
        super().__init__(outcome)
        self.status = status
        self.outcome = outcome


@dataclass
class Webhook:
    secrets: Mapping[str, bytes]
    nonces: NonceStore
    refs: RequestRefs
    publisher: Publisher
    registries: Registries
    window_s: int
    clock: Callable[[], float] = time.time
    # A vendor that answers at once can beat dispatch's record of the send to us: such an
    # answer waits this long for the record before it is refused with 404 (retry later).
    unknown_hold_s: float = 2.0

    def authenticate(self, request: web.Request, body: bytes) -> tuple[str, str]:
        """Returns (provider id, replay digest) or raises Refused."""
        provider_id = request.headers.get(PROVIDER_HEADER)
        timestamp = request.headers.get(TIMESTAMP_HEADER)
        signature = request.headers.get(SIGNATURE_HEADER)
        if not provider_id or not timestamp or not signature:
            raise Refused(401, "unsigned")
        secret = self.secrets.get(provider_id)
        if secret is None:
            raise Refused(401, "unknown_provider")
        expected = sign(secret, provider_id, timestamp, request.path, body)
        # Compare first, then look at the time: a forger learns nothing from the order.
        if not hmac.compare_digest(expected.encode(), signature.encode()):
            raise Refused(401, "bad_signature")
        try:
            sent = int(timestamp)
        except ValueError:
            raise Refused(401, "stale") from None
        if abs(self.clock() - sent) > self.window_s:
            raise Refused(401, "stale")
        return provider_id, hashlib.sha256(expected.encode()).hexdigest()

    async def handle(self, request: web.Request) -> web.Response:
        try:
            body = await request.read()
        except web.HTTPRequestEntityTooLarge:
            return self._refuse(Refused(413, "too_large"), request)
        try:
            provider_id, digest = self.authenticate(request, body)
        except Refused as refused:
            return self._refuse(refused, request)
        if not self.nonces.claim(digest, self.clock(), self.window_s):
            return self._refuse(Refused(409, "replayed"), request)
        try:
            event = await self._event(request.path, provider_id, body)
            await asyncio.wait_for(self.publisher.publish([event]), 30)
        except Refused as refused:
            if refused.status in (403, 404):
                self.nonces.release(digest)  # the provider may retry the same call later
            return self._refuse(refused, request)
        except (TimeoutError, OSError, RuntimeError) as exc:
            self.nonces.release(digest)
            log.error("webhook publish failed", extra={"error": type(exc).__name__})
            return self._refuse(Refused(503, "unavailable"), request)
        REQUESTS.labels("accepted").inc()
        log.info("webhook accepted", extra={"provider": provider_id, "path": request.path,
                                            "type": event.TYPE})
        return web.json_response({"status": "accepted"}, status=202)

    async def _lookup(self, request_ref: str) -> tuple[str, str] | None:
        found = self.refs.lookup(request_ref)
        deadline = time.monotonic() + self.unknown_hold_s
        while found is None and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
            found = self.refs.lookup(request_ref)
        return found

    async def _event(self, path: str, provider_id: str, body: bytes) -> Event:
        try:
            payload = json.loads(body)
        except (UnicodeDecodeError, ValueError):
            raise Refused(400, "bad_body") from None
        if not isinstance(payload, dict) or not isinstance(payload.get("request_ref"), str):
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

    def _refuse(self, refused: Refused, request: web.Request) -> web.Response:
        REQUESTS.labels(refused.outcome).inc()
        log.warning("webhook refused", extra={"outcome": refused.outcome,
                                              "status": refused.status, "path": request.path})
        return web.json_response({"error": refused.outcome}, status=refused.status)


def tls_context(cert_file: Path, key_file: Path | None) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(cert_file, key_file)
    return context


def make_app(webhook: Webhook, max_body: int) -> web.Application:
    app = web.Application(client_max_size=max_body)
    app.router.add_post(ANSWERS_PATH, webhook.handle)
    app.router.add_post(DELETION_PATH, webhook.handle)
    return app


async def start_webhook(settings: ResultsSettings, publisher: Publisher,
                        registries: Registries, stack: AsyncExitStack) -> None:
    """Bind now (a bad certificate or a taken port fails the start, not later); the stack
    stops the server and closes the stores."""
    if settings.webhook_secrets_file is None or settings.webhook_cert_file is None:
        raise ValueError("FRS_RESULTS_WEBHOOK_CERT_FILE and FRS_RESULTS_WEBHOOK_SECRETS_FILE "
                         "are both required for the webhook")
    if not settings.local_mode and settings.webhook_secrets_file.stat().st_mode & 0o077:
        raise ValueError(f"{settings.webhook_secrets_file}: shared secrets must not be "
                         "readable by group or others (chmod 600)")
    context = tls_context(settings.webhook_cert_file, settings.webhook_key_file)
    # Read once at start: rotating a secret means a restart.
    secrets = load_secrets(settings.webhook_secrets_file)
    nonces = NonceStore(settings.nonce_path())
    stack.callback(nonces.close)
    refs = RequestRefs(settings.tracker_path())
    stack.callback(refs.close)
    webhook = Webhook(secrets, nonces, refs, publisher, registries, settings.webhook_window_s,
                      unknown_hold_s=settings.webhook_unknown_hold_s)
    runner = web.AppRunner(make_app(webhook, settings.webhook_max_body), access_log=None)
    await runner.setup()
    stack.push_async_callback(runner.cleanup)
    site = web.TCPSite(runner, settings.webhook_host, settings.webhook_port,
                       ssl_context=context)
    await site.start()
    log.info("webhook listening", extra={"host": settings.webhook_host,
                                         "port": settings.webhook_port})
