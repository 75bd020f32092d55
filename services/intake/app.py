"""Intake service: builds ports from Settings and routes topics to handlers."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import AsyncExitStack
from datetime import datetime, timedelta
from pathlib import Path
from typing import Literal

import cv2
from pydantic import Field, model_validator
from pydantic_settings import SettingsConfigDict

from schemas.catalog import POLICY_DECISIONS, PROBE_EVENTS, PROBE_REQUESTS
from schemas.envelope import DecodeError
from schemas.events import (
    Event,
    PolicyCleared,
    ProbeRequested,
    ProbeSubmitted,
    SupervisorReviewRecorded,
)
from schemas.types import utcnow
from services.intake import handlers
from services.intake.crypto import load_or_create_private_key
from services.intake.outcomes import OutcomeLog
from services.intake.policy import handlers as policy
from services.intake.policy.engine import PolicyEngine
from services.intake.policy.reviews import ReviewStore
from services.intake.policy.settings import PolicySettings
from services.intake.policy.watch import start_overdue_watch
from services.intake.purge import Purger
from services.intake.quality import QualityGate
from services.intake.sanitize import DEFAULT_MAX_BYTES, DEFAULT_MAX_PIXELS, SanitizeLimits
from services.intake.vault import (
    FileObjectStore,
    KeyWrapper,
    KmsKek,
    LocalKek,
    ObjectStore,
    S3ObjectStore,
    Vault,
    VaultIndex,
    open_db,
)
from services.kit.bus import Processor, Publisher, RawRecord, Route, bind
from services.kit.clock import BrokerClock, kafka_stamp
from services.kit.registry import Registries
from services.kit.service import dlq_for, processor
from services.kit.settings import ServiceSettings


class IntakeSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="FRS_INTAKE_", frozen=True, extra="ignore",
                                      populate_by_name=True)
    service: str = "intake"
    metrics_port: int = Field(9301, description="Port for /metrics.")
    private_key_file: Path = Field(Path(".state/keys/intake.key.pem"),
                                   description="The intake's X25519 private key (PEM).")
    image_ttl_hours: float = Field(72.0, gt=0, description="Image lifetime after submission.")
    # Sanitizer (REQ-SANITIZE)
    max_image_bytes: int = Field(DEFAULT_MAX_BYTES, gt=0,
                                 description="Byte cap on a received image (10 MB).")
    max_image_pixels: int = Field(DEFAULT_MAX_PIXELS, gt=0,
                                  description="Pixel cap; Pillow's bomb guard is lowered to it.")
    jpeg_quality: int = Field(92, ge=50, le=100, description="Quality of the JPEG re-encode.")
    image_workers: int = Field(2, ge=1, le=64, description="Threads for image work (sanitize, "
                               "quality); each holds one decoded image. One per core.")
    # Quality gate (REQ-QUALITY)
    quality_gate_enabled: bool = Field(True, description="Reject on a failed quality check.")
    quality_max_faces: int = Field(1, ge=1, description="Most faces a probe may show.")
    quality_min_face_px: int = Field(64, ge=1, description="Smallest usable face, pixels.")
    quality_min_sharpness: float = Field(40.0, ge=0, description="Least Laplacian variance "
                                         "of the face at 112 px.")
    quality_min_exposure: float = Field(0.15, ge=0, le=1, description="Darkest mean luminance.")
    quality_max_exposure: float = Field(0.90, ge=0, le=1,
                                        description="Brightest mean luminance.")
    # Vault (REQ-ENCRYPT) and purge (REQ-TTL)
    vault_dir: Path | None = Field(None, description="Vault index and filesystem objects; "
                                   "default <FRS_STATE_DIR>/vault.")
    vault_backend: Literal["filesystem", "s3"] = Field("filesystem",
                                                       description="Where ciphertexts live.")
    s3_bucket: str = Field("frs-vault", description="S3 bucket for the s3 backend.")
    s3_prefix: str = Field("", description="Key prefix inside the bucket.")
    s3_endpoint_url: str | None = Field(None, description="S3-compatible endpoint; None: AWS.")
    kek_backend: Literal["local", "kms"] = Field("local", description="What wraps data keys.")
    kek_file: Path | None = Field(None, description="Local key-encryption key (0600); "
                                  "default <FRS_STATE_DIR>/keys/vault.kek.")
    kms_key_id: str | None = Field(None, description="KMS key id or ARN for the kms backend.")
    kms_endpoint_url: str | None = Field(None, description="KMS endpoint; None: AWS.")
    aws_region: str = Field("us-east-1", description="Region for S3 and KMS clients.")
    purge_interval_s: float = Field(60.0, gt=0, description="Seconds between purge sweeps.")
    # Trusted time (services/kit/clock.py): expiries are stamped and judged by the broker's.
    clock_resample_s: float = Field(30.0, gt=0, description="Seconds between samples of the "
                                    "broker's clock (a record on frs.clock).")
    clock_max_age_s: float = Field(300.0, gt=0, description="Age of the broker clock "
                                   "sample past which a purge sweep warns (it still purges "
                                   "by the sample's lower bound).")
    clock_skew_warn_s: float = Field(5.0, ge=0, description="Local-vs-broker clock skew, "
                                     "seconds, above which the purger logs a warning.")
    fault_kill_mid_purge: int = Field(
        0, ge=0, description="Tests only: SIGKILL after shredding the Nth object, "
        "before announcing it.")

    @model_validator(mode="after")
    def _vault_secure_outside_local(self) -> IntakeSettings:
        if not self.local_mode and self.kek_backend == "local":
            raise ValueError("FRS_INTAKE_KEK_BACKEND=kms is required outside local mode")
        if self.kek_backend == "kms" and not self.kms_key_id:
            raise ValueError("FRS_INTAKE_KMS_KEY_ID is required with the kms key backend")
        if self.clock_max_age_s <= self.clock_resample_s:
            # Samples would go stale before the next is due: every other sweep warns.
            raise ValueError("FRS_INTAKE_CLOCK_MAX_AGE_S must exceed FRS_INTAKE_CLOCK_RESAMPLE_S")
        return self

    @property
    def vault_root(self) -> Path:
        return self.vault_dir or self.state_dir / "vault"


def _key_wrapper(settings: IntakeSettings) -> KeyWrapper:
    if settings.kek_backend == "kms":
        import boto3

        assert settings.kms_key_id is not None
        kms = boto3.client("kms", endpoint_url=settings.kms_endpoint_url,
                           region_name=settings.aws_region)
        return KmsKek(kms, settings.kms_key_id)
    return LocalKek(settings.kek_file or settings.state_dir / "keys" / "vault.kek")


def _object_store(settings: IntakeSettings) -> ObjectStore:
    if settings.vault_backend == "s3":
        import boto3

        s3 = boto3.client("s3", endpoint_url=settings.s3_endpoint_url,
                          region_name=settings.aws_region)
        store = S3ObjectStore(s3, settings.s3_bucket, settings.s3_prefix)
        store.refuse_versioned_bucket()
        return store
    return FileObjectStore(settings.vault_root / "objects")


def open_vault(settings: IntakeSettings, stack: AsyncExitStack) -> tuple[Vault, OutcomeLog]:
    """The vault and the request-outcome log share one local SQLite file."""
    conn = open_db(settings.vault_root / "intake.db")
    stack.callback(conn.close)
    vault = Vault(VaultIndex(conn), _object_store(settings), _key_wrapper(settings))
    return vault, OutcomeLog(conn)


def broker_clock(settings: IntakeSettings, publisher: Publisher) -> BrokerClock:
    return BrokerClock(kafka_stamp(publisher, settings.service),
                       resample_s=settings.clock_resample_s, max_age_s=settings.clock_max_age_s)


def build_purger(settings: IntakeSettings, publisher: Publisher, registries: Registries,
                 vault: Vault, trusted: BrokerClock) -> Purger:
    async def publish(events: Sequence[Event]) -> None:
        await publisher.publish(events)

    return Purger(vault, lambda: registries.cases, publish, utcnow,
                  interval_s=settings.purge_interval_s,
                  fault_kill_mid_purge=settings.fault_kill_mid_purge,
                  trusted=trusted, skew_warn_s=settings.clock_skew_warn_s)


def build(settings: IntakeSettings, publisher: Publisher, registries: Registries,
          stack: AsyncExitStack, vault: tuple[Vault, OutcomeLog] | None = None,
          admission_clock: Callable[[], datetime] = utcnow) -> list[Processor]:
    """``admission_clock`` stamps submission times and expiries; the service passes the
    broker clock's lower bound (an expiry a little early, never late)."""
    probe_vault, outcomes = vault or open_vault(settings, stack)
    # OpenCV releases the GIL, so threads give the image work both cores; its own thread
    # pool would only add contention on top of ours.
    cv2.setNumThreads(1)
    image_worker = ThreadPoolExecutor(max_workers=settings.image_workers,
                                      thread_name_prefix="intake-image")
    stack.callback(image_worker.shutdown, wait=True, cancel_futures=True)
    intake_ports = handlers.IntakePorts(
        private_key=load_or_create_private_key(settings.private_key_file),
        clock=admission_clock, image_ttl=timedelta(hours=settings.image_ttl_hours),
        vault=probe_vault, outcomes=outcomes,
        limits=SanitizeLimits(max_bytes=settings.max_image_bytes,
                              max_pixels=settings.max_image_pixels,
                              jpeg_quality=settings.jpeg_quality),
        gate=QualityGate(enabled=settings.quality_gate_enabled,
                         max_faces=settings.quality_max_faces,
                         min_face_px=settings.quality_min_face_px,
                         min_sharpness=settings.quality_min_sharpness,
                         min_exposure=settings.quality_min_exposure,
                         max_exposure=settings.quality_max_exposure),
        image_worker=image_worker,
    )
    # Policy: the Cedar set is loaded and type-checked once; a bad set stops the start.
    policy_settings = PolicySettings()
    engine = PolicyEngine.load(policy_settings.dir)
    policy_ports = handlers.PolicyPorts(registries=registries, clock=utcnow, engine=engine)
    store = ReviewStore(policy_settings.review_db
                        or settings.state_dir / "policy" / "exigent_reviews.sqlite")
    stack.callback(store.close)
    review_ports = policy.ReviewPorts(
        store=store, registries=registries, clock=utcnow,
        review_window=timedelta(hours=policy_settings.review_window_hours))
    start_overdue_watch(store, publisher, utcnow, policy_settings.review_check_interval_s,
                        stack)

    async def invalid_request(raw: RawRecord, err: DecodeError) -> list[Event]:
        return await handlers.on_invalid_request(raw.key, raw.value, err, intake_ports)

    intake = Route("intake", "frs-intake", (PROBE_REQUESTS.name,),
                   dict([bind(ProbeRequested, handlers.on_probe_requested, intake_ports)]),
                   dlq_for("intake"), on_invalid=invalid_request)
    gate = Route("policy", "frs-policy", (PROBE_EVENTS.name,),
                 dict([bind(ProbeSubmitted, handlers.on_probe_submitted, policy_ports)]),
                 dlq_for("policy"))
    reviews = Route("policy", "frs-policy-reviews", (POLICY_DECISIONS.name,),
                    dict([bind(PolicyCleared, policy.on_decision_for_review, review_ports),
                          bind(SupervisorReviewRecorded, policy.on_supervisor_review,
                               review_ports)]),
                    dlq_for("policy"))
    return [processor(settings, intake, publisher), processor(settings, gate, publisher),
            processor(settings, reviews, publisher)]
