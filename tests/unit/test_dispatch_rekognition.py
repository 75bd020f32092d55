"""Rekognition transport against botocore's Stubber: real request shapes, real error codes."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import boto3
import pytest
from botocore.stub import Stubber

from schemas.events import ProviderRecord
from schemas.types import OutboundField, Transport
from services.dispatch.payloads import build_payload
from services.dispatch.transports.base import PermanentError, SendRequest, TransientError
from services.dispatch.transports.rekognition import RekognitionTransport, parse_endpoint

PHOTO = b"\xff\xd8\xff\xe0 not really a jpeg"


def _setup(endpoint: str, max_candidates: int = 20) -> tuple[Any, Stubber, RekognitionTransport,
                                                               SendRequest]:
    client = boto3.client("rekognition", region_name="us-east-1", aws_access_key_id="x",
                          aws_secret_access_key="y")
    stubber = Stubber(client)
    regions: list[str | None] = []

    def client_for(region: str | None) -> Any:
        regions.append(region)
        return client
    prov = ProviderRecord(provider_id="aws-1", name="aws", kind="commercial",
                          transport=Transport.REKOGNITION, endpoint=endpoint,
                          max_candidates=max_candidates, updated_at=datetime.now(UTC))
    payload = build_payload(Transport.REKOGNITION, list(OutboundField), photo=PHOTO,
                            agent_id="agent-7", request_ref="ref-" + "0" * 36)
    transport = RekognitionTransport(client_for, default_threshold=70.0)
    return client, stubber, transport, SendRequest(prov, payload, "dsp-1", "ref-" + "0" * 36)


async def test_search_request_shape_and_answer() -> None:
    _, stubber, transport, req = _setup("rekognition://eu-west-1/gallery-a?threshold=90"
                                        "&quality=high", max_candidates=7)
    expected = {"CollectionId": "gallery-a", "Image": {"Bytes": PHOTO}, "MaxFaces": 7,
                "FaceMatchThreshold": 90.0, "QualityFilter": "HIGH"}
    stubber.add_response("search_faces_by_image", {
        "SearchedFaceBoundingBox": {"Width": 0.5, "Height": 0.5, "Left": 0.1, "Top": 0.1},
        "SearchedFaceConfidence": 99.9,
        "FaceMatches": [
            {"Similarity": 97.5, "Face": {"FaceId": "11111111-1111-1111-1111-111111111111",
                                          "ExternalImageId": "subject-42", "Confidence": 99.0,
                                          "ImageId": "22222222-2222-2222-2222-222222222222"}},
            {"Similarity": 91.0, "Face": {"FaceId": "33333333-3333-3333-3333-333333333333",
                                          "Confidence": 98.0}},
        ],
        "FaceModelVersion": "7.0",
    }, expected)
    with stubber:
        result = await transport.send(req)
    stubber.assert_no_pending_responses()
    assert result.answer is not None
    assert result.answer["FaceModelVersion"] == "7.0"
    assert [m["Similarity"] for m in result.answer["FaceMatches"]] == [97.5, 91.0]
    assert result.answer["FaceMatches"][0]["Face"]["ExternalImageId"] == "subject-42"
    assert "ImageId" not in result.answer["FaceMatches"][0]["Face"]
    assert result.answer["MaxFaces"] == 7 and result.answer["FaceMatchThreshold"] == 90.0
    assert result.answer["request_ref"] == req.request_ref


@pytest.mark.parametrize(("code", "status", "kind"), [
    ("ProvisionedThroughputExceededException", 400, TransientError),
    ("ThrottlingException", 400, TransientError),
    ("InternalServerError", 500, TransientError),
    ("InvalidParameterException", 400, PermanentError),
    ("InvalidImageFormatException", 400, PermanentError),
    ("ImageTooLargeException", 400, PermanentError),
    ("ResourceNotFoundException", 400, PermanentError),
    ("AccessDeniedException", 400, PermanentError),
])
async def test_error_codes(code: str, status: int, kind: type[Exception]) -> None:
    _, stubber, transport, req = _setup("gallery-b")
    stubber.add_client_error("search_faces_by_image", service_error_code=code,
                             http_status_code=status, expected_params={
                                 "CollectionId": "gallery-b", "Image": {"Bytes": PHOTO},
                                 "MaxFaces": 20, "FaceMatchThreshold": 70.0,
                                 "QualityFilter": "AUTO"})
    with stubber, pytest.raises(kind) as err:
        await transport.send(req)
    assert err.value.code == code  # type: ignore[attr-defined]


def test_endpoint_parsing() -> None:
    assert parse_endpoint("plain", 80, "AUTO").collection_id == "plain"
    target = parse_endpoint("rekognition://us-west-2/c1", 80, "AUTO")
    assert (target.region, target.collection_id, target.threshold) == ("us-west-2", "c1", 80)
    for bad in ("rekognition://r/", "rekognition://r/c?quality=SHARP",
                "rekognition://r/c?threshold=abc", "rekognition://r/c?threshold=101"):
        with pytest.raises(PermanentError):
            parse_endpoint(bad, 80, "AUTO")
