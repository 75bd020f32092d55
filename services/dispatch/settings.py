"""The dispatch service's one Settings: every setting is FRS_DISPATCH_<NAME>."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import SettingsConfigDict

from services.kit.settings import ServiceSettings
from services.vault import VaultSettings


class DispatchSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="FRS_DISPATCH_", frozen=True, extra="ignore",
                                      populate_by_name=True)
    service: str = "dispatch"
    metrics_port: int = Field(9302, description="Port for /metrics.")
    # Dispatch waits on providers, not on CPU: hold many clearances at once (ordered per key).
    concurrency: int = Field(256, ge=1, description="Clearances handled at once.")
    group_id: str = Field("frs-dispatch", description="Consumer group of the clearances.")
    claim_lease_s: float = Field(5.0, gt=0, description="Another instance's claim without a "
                                                        "heartbeat this long is taken over.")
    ledger_file: Path | None = Field(None, description="Default: <state dir>/dispatch/ledger.db")
    image_source: Literal["vault", "test-file"] = Field(
        "vault", description="Where probe images are read; test-file only in local mode.")
    test_image_file: Path | None = Field(None, description="The test photo for test-file.")
    vault: VaultSettings = Field(default_factory=VaultSettings,
                                 description="The vault's settings (FRS_VAULT_*).")
    # HTTPS
    ca_file: Path | None = Field(None, description="CA bundle vendors' servers must chain to.")
    client_cert_file: Path | None = Field(None, description="Client certificate (mutual TLS).")
    client_key_file: Path | None = Field(None, description="Client key for mutual TLS.")
    https_timeout_s: float = Field(10.0, gt=0, description="Whole-request timeout.")
    # S/MIME email
    smtp_host: str = Field("127.0.0.1", description="Outbound SMTP relay.")
    smtp_port: int = Field(25, ge=1, le=65535, description="Port of the outbound SMTP relay.")
    smtp_from: str = Field("frs-dispatch@frs-broker.local", description="Envelope sender.")
    smtp_starttls: bool = Field(False, description="STARTTLS to the relay (required outside "
                                                   "local mode).")
    smtp_username: str | None = Field(None, description="SMTP AUTH user, if the relay wants one.")
    smtp_password: SecretStr | None = Field(
        None, description="SMTP AUTH password (kept as a secret, never logged).")
    smtp_timeout_s: float = Field(30.0, gt=0, description="Timeout of one SMTP session, s.")
    unknown_outcome_email: Literal["resend", "fail"] = Field(
        "resend", description="After a crash mid-send: resend with the same Message-ID, or "
                              "fail with outcome_unknown.")
    # Rekognition
    rekognition_region: str = Field("us-east-1", description="AWS region of Rekognition.")
    rekognition_endpoint_url: str | None = Field(None, description="Tests: a moto server.")
    rekognition_threshold: float = Field(
        80.0, ge=0, le=100, description="FaceMatchThreshold sent to SearchFacesByImage.")
    rekognition_quality_filter: str = Field(
        "AUTO", description="QualityFilter sent to SearchFacesByImage.")
    # Resilience
    retry_max_attempts: int = Field(5, ge=1, description="Attempts per send before failing.")
    retry_base_delay_s: float = Field(
        0.2, ge=0, description="First retry delay, s; doubles, with jitter.")
    retry_max_delay_s: float = Field(10.0, ge=0, description="Longest retry delay, s.")
    attempt_timeout_s: float = Field(30.0, gt=0, description="Timeout of one attempt, s.")
    provider_concurrency: int = Field(256, ge=1, description="Sends in flight per provider.")
    breaker_failures: int = Field(5, ge=1, description="Transient failures that open it.")
    breaker_open_s: float = Field(10.0, gt=0, description="Open time before a trial call.")

    @model_validator(mode="after")
    def _secure_dispatch(self) -> DispatchSettings:
        if not self.local_mode:
            if self.image_source != "vault":
                raise ValueError("FRS_DISPATCH_IMAGE_SOURCE must be vault outside local mode")
            if not self.smtp_starttls:
                raise ValueError("FRS_DISPATCH_SMTP_STARTTLS must be true outside local mode")
        if self.image_source == "test-file" and self.test_image_file is None:
            raise ValueError("FRS_DISPATCH_TEST_IMAGE_FILE is required with test-file")
        return self
