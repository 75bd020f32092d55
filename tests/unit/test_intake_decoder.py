"""The JPEG scan cap (counted from SOS markers before any decode) and how image work that
runs out of memory, CPU time or a worker maps to a refusal with its own reason."""

from __future__ import annotations

import pickle
import signal
import struct
from concurrent.futures import Executor, Future
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import cv2
import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from PIL import Image

from schemas.events import ProbeRejected, ProbeRequested, RejectReason
from schemas.sealed import encrypt_image
from schemas.types import ImageSource, Purpose
from services.intake import decoder, handlers, sanitize
from services.intake.decoder import DecodeLimitExceeded, Examined, examine
from services.intake.outcomes import OutcomeLog
from services.intake.quality import QualityGate
from services.intake.sanitize import SanitizeError, SanitizeLimits
from tests import intake_samples as s
from tests.image_bombs import scan_bomb, scan_count
from tests.unit.fakes import index_db, tmp_vault

LIMITS = SanitizeLimits()
GATE = QualityGate()


# --- the scan counter ----------------------------------------------------------------

def test_scans_are_counted_like_a_decoder_sees_them() -> None:
    grey = Image.new("L", (64, 64), 90)
    assert sanitize._walk_jpeg(s.to_jpeg(grey)) == 1  # baseline: one scan
    assert sanitize._walk_jpeg(s.to_jpeg(grey, progressive=True)) == 6
    assert sanitize._walk_jpeg(s.to_jpeg(s.astronaut(), progressive=True)) == 10
    bomb = scan_bomb(side=256, scans=80)
    assert sanitize._walk_jpeg(bomb) == scan_count(bomb) == 80


def test_one_scan_over_the_cap_is_refused_and_the_cap_itself_is_not() -> None:
    bomb = scan_bomb(side=256, scans=40)
    assert sanitize._walk_jpeg(bomb, max_scans=40) == 40
    with pytest.raises(SanitizeError) as err:
        sanitize._walk_jpeg(bomb, max_scans=39)
    assert err.value.reason is RejectReason.TOO_MANY_SCANS
    assert err.value.detail == "JPEG has more than 39 scans"


def test_sos_bytes_inside_a_segment_or_entropy_data_are_not_scans() -> None:
    # A COM segment full of FF DA, inserted after SOI: skipped by its length.
    body = b"\xff\xda\x00\x08" * 500
    jpeg = s.face_jpeg()
    with_comment = jpeg[:2] + b"\xff\xfe" + struct.pack(">H", len(body) + 2) + body + jpeg[2:]
    assert sanitize._walk_jpeg(with_comment, max_scans=1) == 1


def test_a_scan_bomb_is_refused_before_it_is_decoded(monkeypatch: pytest.MonkeyPatch) -> None:
    def never(*_a: object) -> None:
        raise AssertionError("decoded")

    monkeypatch.setattr(sanitize, "_open_checked", never)
    refused = examine(scan_bomb(side=512, scans=2000), LIMITS, GATE)
    assert isinstance(refused, SanitizeError)
    assert refused.reason is RejectReason.TOO_MANY_SCANS
    assert refused.detail == f"JPEG has more than {sanitize.DEFAULT_MAX_JPEG_SCANS} scans"


def test_a_progressive_photo_within_the_cap_is_accepted() -> None:
    out = examine(s.to_jpeg(s.astronaut(), progressive=True), LIMITS, GATE)
    assert isinstance(out, Examined) and out.quality.passed and out.format == "jpeg"


# --- limits and their reasons --------------------------------------------------------

def test_running_out_of_memory_anywhere_is_the_memory_limit(
        monkeypatch: pytest.MonkeyPatch) -> None:
    def no_memory(*_a: object) -> None:
        raise MemoryError

    monkeypatch.setattr(decoder, "sanitize", no_memory)
    with pytest.raises(DecodeLimitExceeded) as err:
        examine(s.face_jpeg(), LIMITS, GATE)
    assert err.value.limit == "memory"


def test_opencv_allocation_failure_is_the_memory_limit_other_errors_are_not(
        monkeypatch: pytest.MonkeyPatch) -> None:
    def failing(code: int) -> Any:
        def assess(*_a: object) -> None:
            err = cv2.error("OpenCV failed")
            err.code = code
            raise err
        return assess

    monkeypatch.setattr(decoder, "assess", failing(cv2.Error.StsNoMem))
    with pytest.raises(DecodeLimitExceeded) as err:
        examine(s.face_jpeg(), LIMITS, GATE)
    assert err.value.limit == "memory"
    monkeypatch.setattr(decoder, "assess", failing(cv2.Error.StsBadArg))
    with pytest.raises(cv2.error):
        examine(s.face_jpeg(), LIMITS, GATE)


def test_a_codec_out_of_memory_is_not_a_corrupt_image() -> None:
    class Failing:
        def load(self) -> None:
            raise OSError("out of memory error when reading image file")

    with pytest.raises(MemoryError):
        sanitize._decode_fully(Failing())  # type: ignore[arg-type]


@pytest.mark.parametrize(("exitcode", "limit"), [
    (-signal.SIGXCPU, "cpu_time"), (-signal.SIGKILL, "crashed"), (-signal.SIGSEGV, "crashed"),
    (1, "crashed")])
def test_how_a_worker_ended_names_the_limit(exitcode: int, limit: str) -> None:
    proc = SimpleNamespace(exitcode=exitcode, join=lambda timeout: None)
    worker = SimpleNamespace(proc=proc, limits=decoder.WorkerLimits(cpu_seconds=3))
    died = decoder._Worker._death(worker)  # type: ignore[arg-type]
    assert died.limit == limit
    if limit == "cpu_time":
        assert died.detail == "decoding the image took more than 3 s of CPU time"


def test_refusals_and_limits_cross_the_pipe_intact() -> None:
    for err in (SanitizeError(RejectReason.TOO_MANY_SCANS, "JPEG has more than 100 scans"),
                DecodeLimitExceeded("cpu_time", "took too long")):
        again = pickle.loads(pickle.dumps(err))
        assert type(again) is type(err) and again.args == err.args
        assert vars(again) == vars(err)


def test_the_default_wall_limit_leaves_room_for_a_loaded_machine() -> None:
    assert decoder.WorkerLimits(cpu_seconds=10).wall_limit_s == 50
    assert decoder.WorkerLimits(wall_seconds=2.5).wall_limit_s == 2.5


# --- the handler ---------------------------------------------------------------------

class LimitHit(Executor):
    """An image worker whose every image hits the CPU limit."""

    def submit(self, fn: Any, /, *args: Any, **kwargs: Any) -> Future[Any]:
        future: Future[Any] = Future()
        future.set_exception(DecodeLimitExceeded("cpu_time", "took more than 10 s"))
        return future


async def test_a_limit_hit_in_the_worker_is_a_rejection_with_its_reason(
        tmp_path: Path) -> None:
    vault = tmp_vault(tmp_path)
    key = X25519PrivateKey.generate()
    ports = handlers.IntakePorts(
        private_key=key, clock=lambda: datetime(2026, 1, 1, tzinfo=UTC),
        image_ttl=timedelta(hours=72), vault=vault, outcomes=OutcomeLog(index_db(vault)),
        image_worker=LimitHit())
    request = ProbeRequested(
        request_id="req-1", case_id="CASE-1", agent_id="agent-7",
        purpose=Purpose.HUMAN_TRAFFICKING, roi_refs=["ROI-1"],
        image_source=ImageSource.SURVEILLANCE, unedited_attestation=True,
        image=encrypt_image(s.face_jpeg(), key.public_key(), "req-1"))
    [out] = await handlers.on_probe_requested(request, ports)
    assert isinstance(out, ProbeRejected)
    assert out.reason is RejectReason.DECODE_LIMIT_EXCEEDED
    assert out.detail == "took more than 10 s"
