"""AWS Rekognition ``SearchFacesByImage`` (boto3): a synchronous 1:N search.

Provider endpoint: ``rekognition://<region>/<collection-id>?threshold=80&quality=AUTO``
or a bare collection id (region, threshold and quality filter from the settings).
MaxFaces is the provider's ``max_candidates``. Only the image bytes leave (AWS receives
neither the agent id nor the request reference).

The answer is returned as ``SendResult.answer`` and becomes ``ProviderAnswered``
(channel "rekognition") on frs.provider.responses. Its payload is the API's own fields:
``FaceMatches`` (Similarity, Face.FaceId, Face.ExternalImageId, Face.Confidence),
``SearchedFaceConfidence``, ``FaceModelVersion``, plus the ``FaceMatchThreshold`` and
``MaxFaces`` that were asked for and the ``request_ref``.

Guarantee: the search is read-only, so a resend after an unknown outcome is harmless
(at most a second identical search is billed).
"""

from __future__ import annotations

import asyncio
import functools
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, urlsplit

from botocore.exceptions import BotoCoreError, ClientError, HTTPClientError
from botocore.exceptions import ConnectionError as BotoConnError

from services.dispatch.payloads import RekognitionPayload
from services.dispatch.transports.base import (
    PermanentError,
    SendRequest,
    SendResult,
    TransientError,
)

# Throttling and service-side faults are worth retrying; everything else is not.
TRANSIENT_CODES = frozenset({
    "ProvisionedThroughputExceededException", "ThrottlingException", "InternalServerError",
    "ServiceUnavailableException", "LimitExceededException", "RequestTimeout",
})
QUALITY_FILTERS = frozenset({"NONE", "AUTO", "LOW", "MEDIUM", "HIGH"})


@dataclass(frozen=True)
class SearchTarget:
    region: str | None
    collection_id: str
    threshold: float
    quality_filter: str


def parse_endpoint(endpoint: str, default_threshold: float,
                   default_quality: str) -> SearchTarget:
    if not endpoint.startswith("rekognition://"):
        return SearchTarget(None, endpoint, default_threshold, default_quality)
    parts = urlsplit(endpoint)
    query = parse_qs(parts.query)
    collection = parts.path.strip("/")
    try:
        threshold = float(query.get("threshold", [default_threshold])[0])
    except ValueError as exc:
        raise PermanentError("bad_endpoint", "threshold is not a number") from exc
    quality = query.get("quality", [default_quality])[0].upper()
    if not collection or quality not in QUALITY_FILTERS or not 0 <= threshold <= 100:
        raise PermanentError("bad_endpoint")
    return SearchTarget(parts.hostname or None, collection, threshold, quality)


class RekognitionTransport:
    idempotent_resend = True

    def __init__(self, client_for: Any, *, default_threshold: float = 80.0,
                 default_quality: str = "AUTO", max_workers: int = 16) -> None:
        """``client_for(region | None)`` returns a boto3 Rekognition client (cached)."""
        self._client_for = client_for
        # boto3 blocks: its calls get threads of their own, not the loop's default pool
        # (6 threads on 2 cores), where they would queue behind each other and delay
        # every other to_thread user (the HTTPS resolver among them).
        self._pool = ThreadPoolExecutor(max_workers=max_workers,
                                        thread_name_prefix="rekognition")
        self.default_threshold = default_threshold
        self.default_quality = default_quality

    def search_request(self, request: SendRequest) -> tuple[Any, dict[str, Any]]:
        payload = request.payload
        if not isinstance(payload, RekognitionPayload):
            raise PermanentError("wrong_payload")
        target = parse_endpoint(request.provider.endpoint, self.default_threshold,
                                self.default_quality)
        params = {
            "CollectionId": target.collection_id,
            "Image": {"Bytes": payload.photo},
            "MaxFaces": request.provider.max_candidates,
            "FaceMatchThreshold": target.threshold,
            "QualityFilter": target.quality_filter,
        }
        return self._client_for(target.region), params

    async def send(self, request: SendRequest) -> SendResult:
        client, params = self.search_request(request)
        if request.guard is not None:  # a late attempt asks before the image goes
            await request.guard.ensure()
        try:
            # boto3 is synchronous: keep the event loop free while AWS answers.
            response = await asyncio.get_running_loop().run_in_executor(
                self._pool, functools.partial(client.search_faces_by_image, **params))
        except ClientError as exc:
            code = str(exc.response.get("Error", {}).get("Code", "Unknown"))
            if code in TRANSIENT_CODES:
                raise TransientError(code) from exc
            raise PermanentError(code) from exc
        except (BotoConnError, HTTPClientError) as exc:
            raise TransientError("connection", type(exc).__name__) from exc
        except BotoCoreError as exc:
            raise PermanentError("botocore", type(exc).__name__) from exc
        matches = [
            {"Similarity": m.get("Similarity"),
             "Face": {k: m["Face"][k] for k in ("FaceId", "ExternalImageId", "Confidence")
                      if k in m.get("Face", {})}}
            for m in response.get("FaceMatches", [])
        ]
        answer = {
            "request_ref": request.request_ref,
            "FaceMatches": matches,
            "SearchedFaceConfidence": response.get("SearchedFaceConfidence"),
            "FaceModelVersion": response.get("FaceModelVersion"),
            "FaceMatchThreshold": params["FaceMatchThreshold"],
            "MaxFaces": params["MaxFaces"],
        }
        return SendResult(answer=answer)

    async def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
