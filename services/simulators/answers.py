"""What the simulated providers answer, in the results service's answer format
(services/results/README.md on the results branch): a ranked candidate list, then a
deletion receipt. Deterministic per request_ref so tests can predict it."""

from __future__ import annotations

import hashlib
import hmac
from typing import Any

# Real vendors send more than asked: a gallery photo and the person's details per
# candidate, and their own debugging. None of it may pass the results service's edge
# (schemas/answers.py); the simulators send it so every test run proves that.
OVERSHARED_MARK = "SIM-OVERSHARED"


def candidate_list(request_ref: str, n: int) -> dict[str, Any]:
    digest = hashlib.sha256(request_ref.encode()).digest()
    scores = sorted((0.5 + (digest[i % 32] / 255) * 0.49 for i in range(n)), reverse=True)
    return {
        "request_ref": request_ref,
        "candidates": [{"rank": i + 1, "score": round(s, 4), "score_scale": "0-1",
                        "gallery": "sim-gallery",
                        "candidate_ref": f"sim-{digest.hex()[:8]}-{i + 1}",
                        "photo": "/9j/" + OVERSHARED_MARK,
                        "subject": {"name": f"{OVERSHARED_MARK} person {i + 1}",
                                    "date_of_birth": "1980-01-01"}}
                       for i, s in enumerate(scores)],
        "threshold": 0.5, "algorithm": "frs-provider-sim", "algorithm_version": "1.0",
        "vendor_trace": {"node": OVERSHARED_MARK, "query_ms": 12},
    }


def webhook_signature(secret: bytes, provider_id: str, timestamp: str, path: str,
                      body: bytes) -> str:
    """HMAC-SHA256 over provider, timestamp, path and body (the results webhook contract)."""
    message = f"{provider_id}\n{timestamp}\n{path}\n".encode() + body
    return "sha256=" + hmac.new(secret, message, hashlib.sha256).hexdigest()
