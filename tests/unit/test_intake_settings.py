"""IntakeSettings: documented defaults, env prefix, secure refusals outside local mode."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from services.intake.app import IntakeSettings
from tests.conftest import secured_bus


def test_defaults_and_env_prefix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FRS_STATE_DIR", "/tmp/frs-state-x")
    monkeypatch.setenv("FRS_INTAKE_MAX_IMAGE_BYTES", "12345")
    s = IntakeSettings()
    assert s.max_image_bytes == 12345
    assert s.image_ttl_hours == 72.0 and s.vault_backend == "filesystem"
    assert s.kek_backend == "local" and s.max_image_pixels == 50_000_000
    assert s.vault_root == Path("/tmp/frs-state-x/vault")
    for name, field in IntakeSettings.model_fields.items():
        if name != "service":  # the service's own name, not a setting
            assert field.description, f"{name} has no documented meaning"


def test_refuses_local_key_outside_local_mode(tmp_path: Path) -> None:
    bus = secured_bus(tmp_path)
    with pytest.raises(ValidationError, match="KEK_BACKEND=kms"):
        IntakeSettings(local_mode=False, **bus)
    with pytest.raises(ValidationError, match="KMS_KEY_ID"):
        IntakeSettings(kek_backend="kms")
    ok = IntakeSettings(local_mode=False, **bus, kek_backend="kms", kms_key_id="alias/frs-vault")
    assert ok.kms_key_id == "alias/frs-vault"


def test_broker_clock_samples_must_not_go_stale_between_resamples() -> None:
    s = IntakeSettings()
    assert (s.clock_resample_s, s.clock_max_age_s, s.clock_skew_warn_s) == (30.0, 300.0, 5.0)
    with pytest.raises(ValidationError, match="CLOCK_MAX_AGE_S"):
        IntakeSettings(clock_resample_s=60, clock_max_age_s=30)
