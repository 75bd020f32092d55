"""HTTPS vendor simulator: the vendor side of the contract in services/dispatch/README.md.

- TLS with a certificate from a throw-away CA made at start (``ca_file`` to trust);
  optionally requires a client certificate from that CA.
- ``POST /search`` with ``Idempotency-Key``: counts every request per request_ref (raw
  copies), deduplicates by key (a repeated key gets 200 and is not accepted twice).
- Behaviour knobs: latency, 5xx rate, timeout rate (hang), malformed-answer rate, answer
  twice, and the results webhook (base URL, provider id, HMAC secret, CA) that gets the
  answer (``POST /v1/answers``: a ranked candidate list) and then the deletion receipt
  (``POST /v1/deletion``), signed as the results webhook contract says.
- Keeps what it received, minus the photo (only its SHA-256 and size): field names and
  values, header names. ``GET /_sim/state`` shows it; ``POST /_sim/behaviour`` changes knobs.

Run: ``python -m services.simulators.vendor --port 8443 --pki-dir .state/sim`` prints one JSON
line with the URL and the CA file, then serves until SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import dataclasses
import hashlib
import json
import random
import ssl
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import ClientSession, ClientTimeout, TCPConnector, web

from services.simulators import until_signalled
from services.simulators.answers import candidate_list, webhook_signature
from services.simulators.tls import SimulatorCA


@dataclass
class VendorBehaviour:
    latency_s: float = 0.0
    error_rate: float = 0.0  # answer 503
    timeout_rate: float = 0.0  # hang for hang_s before answering
    hang_s: float = 30.0
    malformed_rate: float = 0.0  # accept, then answer garbage
    answer_twice: bool = False
    webhook_url: str | None = None  # base URL: answers to /v1/answers, receipts to /v1/deletion
    # More base URLs of the same webhook (many results instances): each post, retries
    # included, goes to the next one in turn, as a load balancer in front of them would.
    webhook_urls: tuple[str, ...] = ()
    webhook_provider_id: str = "sim-vendor"
    webhook_secret: str = "simulator-shared-secret"
    webhook_ca_file: str | None = None  # trust for an https webhook
    candidates: int = 5
    deletion_receipt: bool = True
    answer_delay_s: float = 0.0
    redirect_to: str | None = None  # answer 307 to this Location (a hostile or moved vendor)


@dataclass(frozen=True)
class Received:
    request_ref: str | None
    idempotency_key: str | None
    fields: tuple[str, ...]
    values: dict[str, Any]  # every field but the photo
    photo_sha256: str | None
    photo_bytes: int
    header_names: tuple[str, ...]
    accepted: bool


@dataclass
class VendorState:
    received: list[Received] = field(default_factory=list)
    copies: Counter[str] = field(default_factory=Counter)  # raw requests per request_ref
    accepted: dict[str, str] = field(default_factory=dict)  # idempotency key -> request_ref
    in_flight: int = 0
    peak_in_flight: int = 0
    webhook_posts: int = 0
    webhook_failures: int = 0
    first_request_at: float | None = None  # monotonic, for throughput
    last_accepted_at: float | None = None


class VendorSimulator:
    def __init__(self, behaviour: VendorBehaviour | None = None, *, host: str = "127.0.0.1",
                 port: int = 0, pki_dir: Path | None = None, require_client_cert: bool = False,
                 seed: int | None = None, ca: SimulatorCA | None = None) -> None:
        self.behaviour = behaviour or VendorBehaviour()
        self.state = VendorState()
        self.host = host
        self.port = port
        self.require_client_cert = require_client_cert
        self._rng = random.Random(seed)
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        if pki_dir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="frs-vendor-")
            pki_dir = Path(self._tmp.name)
        self.pki_dir = pki_dir
        self.ca = ca or SimulatorCA("frs vendor simulator CA")
        self.ca_file = pki_dir / "vendor-ca.crt"
        pki_dir.mkdir(parents=True, exist_ok=True)
        self.ca_file.write_bytes(self.ca.cert_pem)
        self._cert, self._key = self.ca.server().write(pki_dir, f"vendor-{id(self)}")
        self._runner: web.AppRunner | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._client: ClientSession | None = None
        self._posts = 0  # webhook posts so far: picks the next base URL

    @property
    def url(self) -> str:
        return f"https://{self.host}:{self.port}/search"

    def client_identity(self) -> tuple[Path, Path]:
        return self.ca.client().write(self.pki_dir, "dispatch-client")

    def copies(self, request_ref: str) -> int:
        return self.state.copies[request_ref]

    def reset(self) -> None:
        self.state = VendorState()

    async def start(self) -> VendorSimulator:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/search", self._search)
        app.router.add_get("/_sim/state", self._state)
        app.router.add_post("/_sim/behaviour", self._set_behaviour)
        app.router.add_post("/_sim/reset", self._reset)
        tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        tls.load_cert_chain(self._cert, self._key)
        if self.require_client_cert:
            tls.verify_mode = ssl.CERT_REQUIRED
            tls.load_verify_locations(cafile=str(self.ca_file))
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port, ssl_context=tls, backlog=1024)
        await site.start()
        server = site._server
        assert server is not None
        assert isinstance(server, asyncio.Server)
        self.port = int(server.sockets[0].getsockname()[1])
        return self

    async def stop(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._client is not None:
            await self._client.close()
        if self._runner is not None:
            await self._runner.cleanup()
        if self._tmp is not None:
            self._tmp.cleanup()

    async def __aenter__(self) -> VendorSimulator:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # --- the vendor API -------------------------------------------------------------

    async def _search(self, request: web.Request) -> web.StreamResponse:
        state = self.state
        if state.first_request_at is None:
            state.first_request_at = time.monotonic()
        state.in_flight += 1
        state.peak_in_flight = max(state.peak_in_flight, state.in_flight)
        try:
            return await self._handle(request)
        finally:
            state.in_flight -= 1

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        b = self.behaviour
        key = request.headers.get("Idempotency-Key")
        raw = await request.read()
        try:
            body = json.loads(raw)
        except ValueError:
            body = None
        if not isinstance(body, dict):
            return web.json_response({"error": "body must be a JSON object"}, status=400)
        ref = body.get("request_ref")
        ref = ref if isinstance(ref, str) else None
        photo = body.get("photo")
        try:
            photo_bytes = base64.b64decode(photo, validate=True) if isinstance(photo, str) \
                else b""
        except (binascii.Error, ValueError):
            photo_bytes = b""
        if ref is not None:
            self.state.copies[ref] += 1
        record = Received(
            request_ref=ref, idempotency_key=key, fields=tuple(sorted(body)),
            values={k: v for k, v in body.items() if k != "photo"},
            photo_sha256=hashlib.sha256(photo_bytes).hexdigest() if photo_bytes else None,
            photo_bytes=len(photo_bytes), header_names=tuple(sorted(request.headers)),
            accepted=False,
        )
        if b.redirect_to is not None:
            self.state.received.append(record)
            return web.Response(status=307, headers={"Location": b.redirect_to})
        if b.latency_s:
            await asyncio.sleep(b.latency_s)
        # Checked after the work, at accept time: a resend racing the original is a duplicate.
        duplicate = key is not None and key in self.state.accepted
        roll = self._rng.random()
        if roll < b.error_rate:
            self.state.received.append(record)
            return web.json_response({"error": "unavailable"}, status=503)
        if roll < b.error_rate + b.timeout_rate:
            self.state.received.append(record)
            await asyncio.sleep(b.hang_s)
            return web.json_response({"error": "too late"}, status=504)
        if key is None or ref is None or not photo_bytes:
            self.state.received.append(record)
            return web.json_response({"error": "Idempotency-Key, request_ref and photo are "
                                               "required"}, status=400)
        if duplicate:
            self.state.received.append(record)
            return web.json_response({"request_ref": self.state.accepted[key],
                                      "duplicate": True}, status=200)
        self.state.accepted[key] = ref
        self.state.last_accepted_at = time.monotonic()
        self.state.received.append(dataclasses.replace(record, accepted=True))
        if b.webhook_url:
            self._spawn(self._answer(ref, b))
        if roll < b.error_rate + b.timeout_rate + b.malformed_rate:
            return web.Response(text="<html>upstream glitch</html>", status=202,
                                content_type="text/html")
        return web.json_response({"request_ref": ref, "status": "accepted"}, status=202)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _answer(self, ref: str, b: VendorBehaviour) -> None:
        if b.answer_delay_s:
            await asyncio.sleep(b.answer_delay_s)
        answer = candidate_list(ref, b.candidates)
        calls = [("/v1/answers", answer)]
        if b.answer_twice:
            calls.append(("/v1/answers", answer))
        if b.deletion_receipt:
            calls.append(("/v1/deletion", {"request_ref": ref}))
        if self._client is None:
            tls = ssl.create_default_context(cafile=b.webhook_ca_file)
            self._client = ClientSession(timeout=ClientTimeout(total=10),
                                         connector=TCPConnector(ssl=tls))
        for path, body in calls:
            await self._post_signed(path, body, b)

    def _webhook_base(self, b: VendorBehaviour) -> str:
        """The next webhook base URL, round-robin over all of them."""
        assert b.webhook_url is not None
        bases = (b.webhook_url, *b.webhook_urls)
        self._posts += 1
        return bases[self._posts % len(bases)].rstrip("/")

    async def _post_signed(self, path: str, body: dict[str, Any], b: VendorBehaviour) -> None:
        raw = json.dumps(body).encode()
        assert self._client is not None
        # 404 (dispatch not recorded yet) and 5xx are retried, as a real vendor would.
        for attempt in range(6):
            ts = str(int(time.time()))
            headers = {"Content-Type": "application/json",
                       "X-FRS-Provider": b.webhook_provider_id, "X-FRS-Timestamp": ts,
                       "X-FRS-Signature": webhook_signature(
                           b.webhook_secret.encode(), b.webhook_provider_id, ts, path, raw)}
            try:
                async with self._client.post(self._webhook_base(b) + path, data=raw,
                                             headers=headers) as r:
                    status = r.status
            except Exception:  # a simulator keeps going
                status = 599
            if status < 300:
                self.state.webhook_posts += 1
                return
            if status not in (404, 503, 599):
                break
            await asyncio.sleep(0.2 * 2 ** attempt)
        self.state.webhook_failures += 1

    async def _state(self, _request: web.Request) -> web.Response:
        s = self.state
        return web.json_response({
            "copies": dict(s.copies), "accepted": len(s.accepted),
            "in_flight": s.in_flight, "peak_in_flight": s.peak_in_flight,
            "webhook_posts": s.webhook_posts, "webhook_failures": s.webhook_failures,
            "busy_s": (s.last_accepted_at - s.first_request_at)
            if s.first_request_at is not None and s.last_accepted_at is not None else None,
            "received": [dataclasses.asdict(r) for r in s.received],
        })

    async def _reset(self, _request: web.Request) -> web.Response:
        self.reset()
        return web.json_response({"reset": True})

    async def _set_behaviour(self, request: web.Request) -> web.Response:
        changes = await request.json()
        self.behaviour = dataclasses.replace(self.behaviour, **changes)
        return web.json_response(dataclasses.asdict(self.behaviour))


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m services.simulators.vendor",
                                description="HTTPS vendor simulator")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--pki-dir", type=Path, default=None, help="where the CA file is written")
    p.add_argument("--latency", type=float, default=0.0)
    p.add_argument("--error-rate", type=float, default=0.0)
    p.add_argument("--timeout-rate", type=float, default=0.0)
    p.add_argument("--hang", type=float, default=30.0)
    p.add_argument("--malformed-rate", type=float, default=0.0)
    p.add_argument("--answer-twice", action="store_true")
    p.add_argument("--webhook-url", default=None, help="results webhook base URL")
    p.add_argument("--webhook-provider-id", default="sim-vendor")
    p.add_argument("--webhook-secret", default="simulator-shared-secret")
    p.add_argument("--webhook-ca-file", default=None)
    p.add_argument("--candidates", type=int, default=5)
    p.add_argument("--require-client-cert", action="store_true")
    return p


async def _main(args: argparse.Namespace) -> None:
    behaviour = VendorBehaviour(
        latency_s=args.latency, error_rate=args.error_rate, timeout_rate=args.timeout_rate,
        hang_s=args.hang, malformed_rate=args.malformed_rate, answer_twice=args.answer_twice,
        webhook_url=args.webhook_url, webhook_provider_id=args.webhook_provider_id,
        webhook_secret=args.webhook_secret, webhook_ca_file=args.webhook_ca_file,
        candidates=args.candidates)
    sim = VendorSimulator(behaviour, host=args.host, port=args.port, pki_dir=args.pki_dir,
                          require_client_cert=args.require_client_cert)
    await sim.start()
    sys.stdout.write(json.dumps({"url": sim.url, "ca_file": str(sim.ca_file)}) + "\n")
    sys.stdout.flush()
    await until_signalled()
    await sim.stop()


if __name__ == "__main__":
    asyncio.run(_main(_parser().parse_args()))
