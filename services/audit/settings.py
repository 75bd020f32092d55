"""The audit service's one Settings: every setting is FRS_AUDIT_<NAME>."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from services.audit.invariants import LIVENESS_GRACE_S, InvariantSettings
from services.audit.store import PgLocation
from services.kit.settings import ServiceSettings
from services.kit.state import read_password


class AuditSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="FRS_AUDIT_", frozen=True, extra="ignore",
                                      populate_by_name=True)
    service: str = "audit"
    metrics_port: int = Field(9304, description="Port for /metrics.")
    group_id: str = Field("frs-audit", description="Consumer group of the audit log.")
    store_dir: Path = Field(Path(".state/audit"), description="Audit segment files and index.")
    origin: str = Field("frs-broker.local/audit", pattern=r"^[^\s+]+$",
                        description="Checkpoint origin line and note key name.")
    signing_key_file: Path | None = Field(
        None, description="Ed25519 checkpoint key (PEM, 0600); default "
                          "<FRS_STATE_DIR>/keys/audit-checkpoint.pem.")
    checkpoint_every_n: int = Field(1000, ge=1, description="Sign a checkpoint every N leaves.")
    checkpoint_interval_s: float = Field(10.0, gt=0, description="...or every T seconds.")
    clearance_grace_s: float = Field(
        30.0, ge=0, description="How long a dispatch may precede its clearance in the log.")
    expiry_grace_s: float = Field(
        300.0, ge=0, description="How long past expires_at an image may stay unpurged.")
    exigent_review_s: float = Field(
        72 * 3600.0, ge=0, description="How long an exigent probe may wait for its review.")
    liveness_grace_s: float = Field(
        LIVENESS_GRACE_S, ge=0,
        description="How long past a cleared provider's answer deadline its probe may go "
                    "without an end (answer, NoResponse or DispatchFailed, then settled).")
    tick_s: float = Field(1.0, gt=0, description="Timer rules and time checkpoints, period.")

    def key_file(self) -> Path:
        return self.signing_key_file or self.state_dir / "keys" / "audit-checkpoint.pem"

    def store_at(self) -> Path | PgLocation:
        """Where the log is: ``store_dir``, or the shared database when FRS_STATE_URL
        names PostgreSQL (then nothing of it is kept under the state dir)."""
        url = self.state()
        if not url.postgres:
            return self.store_dir
        return PgLocation(url.conninfo, read_password(self.state_password_file))

    def invariant_settings(self) -> InvariantSettings:
        return InvariantSettings(self.clearance_grace_s, self.expiry_grace_s,
                                 self.exigent_review_s, self.liveness_grace_s)
