"""One normalization for every channel: a provider's raw answer becomes a provider-neutral,
capped candidate list marked as an investigative lead, or a rejection with a reason code.

The answer format every channel carries (webhook body, decrypted mail body, or the
payload dispatch builds from a Rekognition reply)::

    {"candidates": [{"rank": 1, "score": 0.97, "score_scale": "0-1",
                     "gallery": "state-dl", "candidate_ref": "opaque-id"}, ...],
     "threshold": 0.0, "algorithm": "vendor-x", "algorithm_version": "7.2"}

Pure functions, no I/O: tested without a broker."""

from __future__ import annotations

import math
from collections.abc import Mapping
from datetime import datetime
from enum import StrEnum
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from schemas.events import (
    LEAD_MARKING,
    Candidate,
    CandidatesReceived,
    ProviderRecord,
    ProviderResponseRejected,
)

DEFAULT_MAX_CANDIDATES = 20
# A list longer than this is not a candidate list; refuse it rather than sort it.
MAX_RAW_CANDIDATES = 1000
M = TypeVar("M", bound=BaseModel)
# Keys a channel may add around the answer (the webhook's request reference).
ENVELOPE_KEYS = frozenset({"request_ref"})


class RejectCode(StrEnum):
    """Machine-readable reasons in ProviderResponseRejected.reason."""

    UNKNOWN_PROVIDER = "unknown_provider"
    NOT_AN_OBJECT = "not_an_object"
    INVALID_ANSWER = "invalid_answer"
    INVALID_CANDIDATE = "invalid_candidate"
    DUPLICATE_RANK = "duplicate_rank"
    TOO_MANY_CANDIDATES = "too_many_candidates"


class _RawCandidate(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    rank: int = Field(ge=1, le=100_000)
    score: float = Field(ge=0.0)
    score_scale: str = Field(min_length=1, max_length=64)
    gallery: str = Field(min_length=1, max_length=128)
    candidate_ref: str = Field(min_length=1, max_length=256)

    @field_validator("score", mode="before")
    @classmethod
    def _number(cls, value: Any) -> Any:
        # JSON ints are fine as scores; bools are not numbers here.
        if isinstance(value, int) and not isinstance(value, bool):
            return float(value)
        return value

    @field_validator("score")
    @classmethod
    def _finite(cls, value: float) -> float:
        if not math.isfinite(value):
            raise ValueError("score must be finite")
        return value


class _RawAnswer(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    candidates: list[dict[str, Any]]
    threshold: float
    algorithm: str = Field(min_length=1, max_length=128)
    algorithm_version: str = Field(min_length=1, max_length=64)

    @field_validator("threshold", mode="before")
    @classmethod
    def _number(cls, value: Any) -> Any:
        if isinstance(value, int) and not isinstance(value, bool):
            return float(value)
        return value

    @field_validator("threshold")
    @classmethod
    def _finite(cls, value: float) -> float:
        if not math.isfinite(value) or value < 0:
            raise ValueError("threshold must be a finite number >= 0")
        return value


class Rejection(Exception):
    def __init__(self, code: RejectCode, detail: str) -> None:
        super().__init__(code.value)
        self.code = code
        self.detail = detail


def _errors(exc: ValidationError) -> str:
    # Locations and error types only: never echo the provider's values into events or logs.
    return "; ".join(f"{'.'.join(map(str, e['loc'])) or '-'}: {e['type']}"
                     for e in exc.errors()[:5])[:2000]


def _answer(model: type[M], payload: Mapping[str, Any]) -> M:
    """The answer's body (envelope keys dropped), strictly validated."""
    try:
        return model.model_validate({k: v for k, v in payload.items()
                                     if k not in ENVELOPE_KEYS})
    except ValidationError as exc:
        raise Rejection(RejectCode.INVALID_ANSWER, _errors(exc)) from None


def _each(model: type[M], items: list[Any], label: str) -> list[M]:
    """Every listed candidate strictly validated; too long a list is refused unread."""
    if len(items) > MAX_RAW_CANDIDATES:
        raise Rejection(RejectCode.TOO_MANY_CANDIDATES,
                        f"{len(items)} candidates > {MAX_RAW_CANDIDATES}")
    out: list[M] = []
    for i, raw in enumerate(items):
        try:
            out.append(model.model_validate(raw))
        except ValidationError as exc:
            raise Rejection(RejectCode.INVALID_CANDIDATE, f"{label} {i}: {_errors(exc)}") \
                from None
    return out


def parse_answer(payload: Any, cap: int) -> tuple[list[Candidate], int, _RawAnswer]:
    """Validate strictly, sort by rank, cut to ``cap``; returns (kept, received, answer)."""
    if not isinstance(payload, Mapping):
        raise Rejection(RejectCode.NOT_AN_OBJECT, "answer is not a JSON object")
    answer = _answer(_RawAnswer, payload)
    parsed = _each(_RawCandidate, answer.candidates, "candidate")
    ranks = [c.rank for c in parsed]
    if len(set(ranks)) != len(ranks):
        raise Rejection(RejectCode.DUPLICATE_RANK, "two candidates share a rank")
    parsed.sort(key=lambda c: c.rank)
    kept = [Candidate(rank=c.rank, score=c.score, score_scale=c.score_scale,
                      gallery=c.gallery, candidate_ref=c.candidate_ref)
            for c in parsed[:cap]]
    return kept, len(parsed), answer


class _RekognitionFace(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    FaceId: str = Field(min_length=1, max_length=256)
    ExternalImageId: str | None = Field(default=None, max_length=256)
    Confidence: float | None = None


class _RekognitionMatch(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    Similarity: float = Field(ge=0.0, le=100.0)
    Face: _RekognitionFace


class _RekognitionAnswer(BaseModel):
    """SearchFacesByImage's reply, as dispatch's Rekognition transport forwards it."""

    model_config = ConfigDict(extra="forbid", strict=True)
    FaceMatches: list[dict[str, Any]]
    FaceMatchThreshold: float = Field(ge=0.0, le=100.0)
    FaceModelVersion: str | None = Field(default=None, max_length=64)
    SearchedFaceConfidence: float | None = None
    MaxFaces: int | None = None


def from_rekognition(payload: Mapping[str, Any], gallery: str) -> dict[str, Any]:
    """AWS's shape -> the answer format. Rekognition ranks by similarity (0-100)."""
    answer = _answer(_RekognitionAnswer, payload)
    matches = _each(_RekognitionMatch, answer.FaceMatches, "match")
    matches.sort(key=lambda m: -m.Similarity)
    return {
        "candidates": [{"rank": i + 1, "score": m.Similarity, "score_scale": "0-100",
                        "gallery": gallery[:128] or "rekognition",
                        "candidate_ref": m.Face.FaceId} for i, m in enumerate(matches)],
        "threshold": answer.FaceMatchThreshold, "algorithm": "aws-rekognition",
        "algorithm_version": answer.FaceModelVersion or "unknown",
    }


def normalize(
    *, probe_id: str, provider: ProviderRecord | None, provider_id: str,
    channel: Literal["webhook", "email", "rekognition"], payload: Any,
    received_at: datetime, now: datetime,
) -> CandidatesReceived | ProviderResponseRejected:
    """The single normalization every channel goes through. Never raises on bad input."""
    try:
        if provider is None:
            raise Rejection(RejectCode.UNKNOWN_PROVIDER, "provider is not in the registry")
        cap = min(provider.max_candidates, 50)
        if channel == "rekognition" and isinstance(payload, Mapping) \
                and "FaceMatches" in payload:
            payload = from_rekognition(payload, provider.endpoint)
        kept, received, answer = parse_answer(payload, cap)
        return CandidatesReceived(
            probe_id=probe_id, provider_id=provider_id, channel=channel, candidates=kept,
            threshold=answer.threshold, list_size=len(kept), algorithm=answer.algorithm,
            algorithm_version=answer.algorithm_version, mode="investigative",
            lead_marking=LEAD_MARKING, truncated_from=received if received > cap else None,
            received_at=received_at,
        )
    except Rejection as rej:
        return ProviderResponseRejected(probe_id=probe_id, provider_id=provider_id,
                                        reason=rej.code.value, detail=rej.detail,
                                        rejected_at=now)
    except ValidationError as exc:  # the output model refused it: still a rejection
        return ProviderResponseRejected(probe_id=probe_id, provider_id=provider_id,
                                        reason=RejectCode.INVALID_ANSWER.value,
                                        detail=_errors(exc), rejected_at=now)
