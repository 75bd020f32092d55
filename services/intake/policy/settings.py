"""Policy settings (env prefix ``FRS_POLICY_``). Read once when the intake builds its
routes; kept apart from ``IntakeSettings`` so the policy gate configures itself."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from services.intake.policy.engine import POLICY_DIR


class PolicySettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="FRS_POLICY_", frozen=True, extra="ignore")

    dir: Path = Field(POLICY_DIR, description="Directory of policies.cedar and frs.cedarschema.")
    review_window_hours: float = Field(
        24.0, gt=0, description="Time a supervisor has to review an exigent clearance.")
    review_check_interval_s: float = Field(
        30.0, gt=0, description="How often overdue exigent reviews are looked for.")
    review_db: Path | None = Field(
        None, description="SQLite file of exigent-review flags; default <state dir>/policy/.")
