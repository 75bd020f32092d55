"""IntakeSettings: documented defaults, env prefix, secure refusals outside local mode."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from services.intake.policy.settings import PolicySettings
from services.intake.settings import IntakeSettings
from services.vault import VaultSettings
from tests.conftest import secured_bus


def test_defaults_and_env_prefix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FRS_STATE_DIR", "/tmp/frs-state-x")
    monkeypatch.setenv("FRS_INTAKE_MAX_IMAGE_BYTES", "12345")
    s = IntakeSettings()
    assert s.max_image_bytes == 12345
    assert s.image_ttl_hours == 72.0 and s.vault.backend == "filesystem"
    assert s.vault.kek_backend == "epoch" and s.max_image_pixels == 50_000_000
    assert s.vault.root == Path("/tmp/frs-state-x/vault")
    for name, field in IntakeSettings.model_fields.items():
        if name != "service":  # the service's own name, not a setting
            assert field.description, f"{name} has no documented meaning"


def test_refuses_local_key_outside_local_mode(tmp_path: Path) -> None:
    bus = secured_bus(tmp_path)
    with pytest.raises(ValidationError, match="KEK_BACKEND=kms"):
        IntakeSettings(local_mode=False, **bus)
    with pytest.raises(ValidationError, match="KMS_KEY_ID"):
        VaultSettings(kek_backend="kms")
    kms = VaultSettings(kek_backend="kms", kms_key_id="alias/frs-vault")
    # The policy gate publishes decisions as its own principal, never the intake's.
    with pytest.raises(ValidationError, match="policy identity needs its own principal"):
        IntakeSettings(local_mode=False, **bus, vault=kms)
    same = PolicySettings(kafka_sasl_username="svc", kafka_sasl_password_file=tmp_path / "pw")
    with pytest.raises(ValidationError, match="policy identity needs its own principal"):
        IntakeSettings(local_mode=False, **bus, vault=kms, policy=same)
    own = PolicySettings(kafka_sasl_username="policy", kafka_sasl_password_file=tmp_path / "pw")
    ok = IntakeSettings(local_mode=False, **bus, vault=kms, policy=own)
    assert ok.vault.kms_key_id == "alias/frs-vault"
    assert ok.policy.over(ok, "policy").kafka_sasl_username == "policy"


def test_vault_settings_read_the_new_names_and_the_intake_ones(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FRS_INTAKE_S3_BUCKET", "old-name")
    assert VaultSettings().s3_bucket == "old-name"  # existing deployments keep their vault
    monkeypatch.setenv("FRS_VAULT_S3_BUCKET", "new-name")
    assert VaultSettings().s3_bucket == "new-name"
    assert IntakeSettings().vault.s3_bucket == "new-name"


def test_broker_clock_samples_must_not_go_stale_between_resamples() -> None:
    s = IntakeSettings()
    assert (s.clock_resample_s, s.clock_max_age_s, s.clock_skew_warn_s) == (30.0, 300.0, 5.0)
    with pytest.raises(ValidationError, match="CLOCK_MAX_AGE_S"):
        IntakeSettings(clock_resample_s=60, clock_max_age_s=30)
