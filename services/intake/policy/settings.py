"""Policy settings (env prefix ``FRS_POLICY_``). Read once when the intake builds its
routes; kept apart from ``IntakeSettings`` so the policy gate configures itself. The
gate's own principal on the bus (``FRS_POLICY_KAFKA_*``, from ``IdentitySettings``) is
who its decisions are written as, not the intake."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from services.intake.policy.engine import POLICY_DIR
from services.kit.kafka import IdentitySettings


class PolicySettings(IdentitySettings):
    model_config = SettingsConfigDict(env_prefix="FRS_POLICY_", frozen=True, extra="ignore")

    dir: Path = Field(POLICY_DIR, description="Directory of policies.cedar and frs.cedarschema.")
    review_window_hours: float = Field(
        24.0, gt=0, description="Time a supervisor has to review an exigent clearance.")
    review_check_interval_s: float = Field(
        30.0, gt=0, description="How often overdue exigent reviews are looked for.")
    review_db: Path | None = Field(
        None, description="SQLite file of exigent-review flags; default <state dir>/policy/.")
    signing_key_file: Path | None = Field(
        None, description="Ed25519 key the gate signs every decision with (PEM, 0600, made "
        "on first start; public part beside it as .pub.pem, for `frs registry trust-key`); "
        "default <state dir>/keys/policy-decisions.pem.")

    def signing_key_path(self, state_dir: Path) -> Path:
        return self.signing_key_file or state_dir / "keys" / "policy-decisions.pem"
