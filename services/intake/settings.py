"""The intake service's one Settings: every setting is FRS_INTAKE_<NAME>; the policy
gate's, which runs in the same process, are FRS_POLICY_<NAME> (``policy``)."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, model_validator
from pydantic_settings import SettingsConfigDict

from services.intake.decoder import (
    DEFAULT_CPU_SECONDS,
    DEFAULT_MAX_IMAGES,
    DEFAULT_MEMORY_MB,
    DEFAULT_WORKERS,
)
from services.intake.policy.settings import PolicySettings
from services.intake.sanitize import DEFAULT_MAX_BYTES, DEFAULT_MAX_JPEG_SCANS, DEFAULT_MAX_PIXELS
from services.kit.settings import ServiceSettings
from services.vault import VaultSettings


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
    max_jpeg_scans: int = Field(DEFAULT_MAX_JPEG_SCANS, ge=1, description="Most scans a "
                                "JPEG may have; each progressive scan is a pass over the "
                                "whole image.")
    # Image workers (services/intake/decoder.py): processes under resource limits.
    image_workers: int = Field(DEFAULT_WORKERS, ge=1, le=64, description="Worker processes "
                               "for image work (sanitize, quality), one image each at a "
                               "time. One per core.")
    decode_cpu_seconds: int = Field(DEFAULT_CPU_SECONDS, ge=1, description="CPU seconds an "
                                    "image worker may spend on one image (RLIMIT_CPU); past "
                                    "it the worker is killed and the image refused "
                                    "(decode_limit_exceeded).")
    decode_memory_mb: int = Field(DEFAULT_MEMORY_MB, ge=64, description="Memory (address "
                                  "space, RLIMIT_AS) an image worker may add to its size at "
                                  "start; a 50 MP image needs ~700 MB. Past it the image is "
                                  "refused (decode_limit_exceeded).")
    decode_max_images: int = Field(DEFAULT_MAX_IMAGES, ge=1, description="Images a worker "
                                   "handles before a fresh one replaces it (memory back to "
                                   "baseline).")
    # Quality gate (REQ-QUALITY)
    quality_gate_enabled: bool = Field(True, description="Reject on a failed quality check.")
    quality_max_faces: int = Field(1, ge=1, description="Most faces a probe may show.")
    quality_min_face_px: int = Field(64, ge=1, description="Smallest usable face, pixels.")
    quality_min_sharpness: float = Field(40.0, ge=0, description="Least Laplacian variance "
                                         "of the face at 112 px.")
    quality_min_exposure: float = Field(0.15, ge=0, le=1, description="Darkest mean luminance.")
    quality_max_exposure: float = Field(0.90, ge=0, le=1,
                                        description="Brightest mean luminance.")
    # Vault (REQ-ENCRYPT, services/vault, FRS_VAULT_*) and purge (REQ-TTL)
    vault: VaultSettings = Field(default_factory=VaultSettings,
                                 description="The vault's settings (FRS_VAULT_*).")
    purge_interval_s: float = Field(60.0, gt=0, description="Seconds between purge sweeps.")
    # Trusted time (services/kit/clock.py): expiries are stamped and judged by the broker's.
    clock_resample_s: float = Field(30.0, gt=0, description="Seconds between samples of the "
                                    "broker's clock (a record on frs.clock).")
    clock_max_age_s: float = Field(300.0, gt=0, description="Age of the broker clock "
                                   "sample past which a purge sweep warns (it still purges "
                                   "by the sample's lower bound).")
    clock_skew_warn_s: float = Field(5.0, ge=0, description="Local-vs-broker clock skew, "
                                     "seconds, above which the purger logs a warning.")
    # The policy gate runs in this process with its own FRS_POLICY_* settings.
    policy: PolicySettings = Field(default_factory=PolicySettings,
                                   description="The policy gate's settings (FRS_POLICY_*).")
    fault_kill_mid_purge: int = Field(
        0, ge=0, description="Tests only: SIGKILL after shredding the Nth object, "
        "before announcing it.")

    @model_validator(mode="after")
    def _vault_secure_outside_local(self) -> IntakeSettings:
        if not self.local_mode and self.vault.kek_backend != "kms":
            raise ValueError("FRS_VAULT_KEK_BACKEND=kms is required outside local mode")
        # The policy gate's own principal: refused here, at start, when it is missing.
        self.policy.over(self, "policy")
        if self.clock_max_age_s <= self.clock_resample_s:
            # Samples would go stale before the next is due: every other sweep warns.
            raise ValueError("FRS_INTAKE_CLOCK_MAX_AGE_S must exceed FRS_INTAKE_CLOCK_RESAMPLE_S")
        return self

