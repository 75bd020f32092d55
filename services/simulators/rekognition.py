"""A local stand-in for AWS Rekognition's ``SearchFacesByImage`` (JSON 1.1 protocol over
HTTP), for running the dispatch service end to end where AWS is out of reach (moto does
not implement this operation). Point ``FRS_DISPATCH_REKOGNITION_ENDPOINT_URL`` at it.

Answers a ranked ``FaceMatches`` list (``MaxFaces`` long, similarities above the asked
``FaceMatchThreshold``); ``fail_with`` queues AWS error codes to answer first (e.g.
``ThrottlingException``). Keeps each request's parameters (image as SHA-256 only).
"""

from __future__ import annotations

import base64
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

_STATUS = {"ThrottlingException": 400, "ProvisionedThroughputExceededException": 400,
           "InvalidParameterException": 400, "ResourceNotFoundException": 400,
           "InternalServerError": 500}


@dataclass
class RekognitionState:
    requests: list[dict[str, Any]] = field(default_factory=list)
    fail_with: list[str] = field(default_factory=list)


class RekognitionSimulator:
    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self.host = host
        self.port = port
        self.state = RekognitionState()
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    async def start(self) -> RekognitionSimulator:
        app = web.Application(client_max_size=16 * 1024 * 1024)
        app.router.add_post("/", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        server = site._server
        assert server is not None and hasattr(server, "sockets")
        self.port = int(server.sockets[0].getsockname()[1])
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def __aenter__(self) -> RekognitionSimulator:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def _handle(self, request: web.Request) -> web.Response:
        target = request.headers.get("X-Amz-Target", "")
        body = json.loads(await request.read())
        if target != "RekognitionService.SearchFacesByImage":
            return _error("UnknownOperationException", 400)
        image = base64.b64decode(body.get("Image", {}).get("Bytes", ""))
        self.state.requests.append({
            **{k: v for k, v in body.items() if k != "Image"},
            "image_sha256": hashlib.sha256(image).hexdigest(),
            "authorized": request.headers.get("Authorization", "").startswith("AWS4-HMAC"),
        })
        if self.state.fail_with:
            code = self.state.fail_with.pop(0)
            return _error(code, _STATUS.get(code, 400))
        threshold = float(body.get("FaceMatchThreshold", 80.0))
        n = int(body.get("MaxFaces", 20))
        digest = hashlib.sha256(image).digest()
        matches = [{"Similarity": round(99.9 - i * (99.9 - threshold) / max(n, 1), 3),
                    "Face": {"FaceId": f"{digest.hex()[:8]}-0000-4000-8000-{i:012d}",
                             "ExternalImageId": f"sim-subject-{i + 1}", "Confidence": 99.5,
                             "ImageId": f"{digest.hex()[8:16]}-0000-4000-8000-{i:012d}"}}
                   for i in range(n)]
        return web.json_response({
            "SearchedFaceBoundingBox": {"Width": 0.4, "Height": 0.5, "Left": 0.3, "Top": 0.2},
            "SearchedFaceConfidence": 99.8, "FaceMatches": matches, "FaceModelVersion": "7.0",
        }, content_type="application/x-amz-json-1.1")


def _error(code: str, status: int) -> web.Response:
    return web.json_response({"__type": code, "message": code}, status=status,
                             content_type="application/x-amz-json-1.1")
