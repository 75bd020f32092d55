"""What of a provider's answer may be kept (issue 19: provider data kept in clear forever).

A provider may send anything: extra fields, images, personal data of people in its
gallery. Before an answer becomes an event (and so reaches the bus, the tracker and the
permanent audit log) it is reduced to the fields the normalizer reads, each a short
scalar; everything else is dropped and only named (its path, never its value). The raw
answer survives as its SHA-256 alone, so a dispute can still match a copy the provider
keeps."""

from __future__ import annotations

import hashlib
import json
from typing import Any

# The two answer shapes the normalizer reads (services/results/normalize.py), whatever the
# channel: the provider-neutral one, and Rekognition's as dispatch forwards it.
ANSWER_FIELDS = frozenset({"request_ref", "candidates", "threshold", "algorithm",
                            "algorithm_version", "FaceMatches", "FaceMatchThreshold",
                            "SearchedFaceConfidence", "FaceModelVersion", "MaxFaces"})
CANDIDATE_FIELDS = frozenset({"rank", "score", "score_scale", "gallery", "candidate_ref"})
_MATCH_FIELDS = frozenset({"Similarity", "Face"})
_FACE_FIELDS = frozenset({"FaceId", "ExternalImageId", "Confidence"})
MAX_TEXT = 256
MAX_ITEMS = 1000  # the normalizer refuses longer lists; more is not worth carrying
MAX_DROPPED = 50


def raw_digest(payload: Any) -> str:
    """SHA-256 of the answer as received (canonical JSON)."""
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=True,
                      default=repr)
    return hashlib.sha256(text.encode()).hexdigest()


def _scalar(value: Any) -> bool:
    if isinstance(value, str):
        return len(value) <= MAX_TEXT
    return value is None or isinstance(value, bool | int | float)


def _keep(obj: dict[str, Any], allowed: frozenset[str], path: str,
          dropped: list[str]) -> dict[str, Any]:
    kept: dict[str, Any] = {}
    for key, value in obj.items():
        # A name is kept only as a short path: a provider chooses key names too.
        where = (f"{path}.{key}" if path else str(key))[:100]
        if key not in allowed:
            dropped.append(where)
        elif _scalar(value):
            kept[key] = value
        elif isinstance(value, dict) and key == "Face":
            kept[key] = _keep(value, _FACE_FIELDS, where, dropped)
        elif isinstance(value, list) and key in ("candidates", "FaceMatches"):
            items = CANDIDATE_FIELDS if key == "candidates" else _MATCH_FIELDS
            kept[key] = [_keep(item, items, f"{where}[]", dropped) if isinstance(item, dict)
                         else None for item in value[:MAX_ITEMS]]
            if len(value) > MAX_ITEMS:
                dropped.append(f"{where}[{MAX_ITEMS}:]")
        else:
            dropped.append(where)  # a value too long or of a shape nothing reads
    return kept


def reduce_answer(payload: Any) -> tuple[dict[str, Any], list[str]]:
    """The answer with only the allowed fields, and the paths of what was dropped."""
    if not isinstance(payload, dict):
        return {}, ["(not an object)"]
    dropped: list[str] = []
    kept = _keep(payload, ANSWER_FIELDS, "", dropped)
    unique = list(dict.fromkeys(dropped))
    if len(unique) > MAX_DROPPED:
        unique = [*unique[:MAX_DROPPED - 1], f"(and {len(unique) - MAX_DROPPED + 1} more)"]
    return kept, unique
