"""client_options(): one place for bootstrap, TLS and SASL; the password stays secret."""

from __future__ import annotations

import ssl
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from services.kit.kafka import KafkaSettings, client_options
from services.kit.settings import ServiceSettings
from tests.conftest import ROOT

PASSWORD = "s3cret-never-shown-7f3a"


def _pki(tmp_path: Path) -> Path:
    """A real CA and principal certificates from deploy/kafka/pki.py."""
    acls = tmp_path / "acls.json"
    acls.write_text('{"super_users": ["broker"], "principals": {"intake": {}}}')
    subprocess.run([sys.executable, str(ROOT / "deploy/kafka/pki.py"), str(tmp_path),
                    "--acls", str(acls)], check=True, capture_output=True)
    return tmp_path


def _secured(tmp_path: Path) -> KafkaSettings:
    state = _pki(tmp_path)
    secret = tmp_path / "intake.password"
    secret.write_text(PASSWORD + "\n")
    return KafkaSettings(
        kafka_bootstrap="127.0.0.1:1", kafka_security_protocol="SASL_SSL",
        kafka_ca_file=state / "pki/ca.pem", kafka_cert_file=state / "pki/intake.pem",
        kafka_key_file=state / "pki/intake.key", kafka_sasl_username="intake",
        kafka_sasl_password_file=secret,
    )


def test_plaintext_is_the_local_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FRS_KAFKA_BOOTSTRAP", "127.0.0.1:9999")
    monkeypatch.delenv("FRS_KAFKA_SECURITY_PROTOCOL", raising=False)
    assert client_options() == {"bootstrap_servers": "127.0.0.1:9999",
                                "security_protocol": "PLAINTEXT"}
    assert client_options(bootstrap="127.0.0.1:1")["bootstrap_servers"] == "127.0.0.1:1"


def test_sasl_ssl_options_carry_tls_and_the_password_from_its_file(tmp_path: Path) -> None:
    settings = _secured(tmp_path)
    options = client_options(settings)
    assert options["security_protocol"] == "SASL_SSL"
    assert options["sasl_mechanism"] == "SCRAM-SHA-512"
    assert options["sasl_plain_username"] == "intake"
    assert options["sasl_plain_password"] == PASSWORD
    context = options["ssl_context"]
    assert isinstance(context, ssl.SSLContext)
    assert context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname


def test_the_password_never_shows_in_settings_or_their_repr(tmp_path: Path) -> None:
    settings = _secured(tmp_path)
    assert PASSWORD not in repr(settings)
    assert PASSWORD not in str(settings.model_dump())
    assert PASSWORD not in repr(settings.sasl_password())
    assert "**********" in str(settings.sasl_password())


def test_env_settings_are_read_by_every_service(monkeypatch: pytest.MonkeyPatch,
                                                tmp_path: Path) -> None:
    s = _secured(tmp_path)
    for name, value in {
        "FRS_KAFKA_SECURITY_PROTOCOL": "SASL_SSL", "FRS_KAFKA_CA_FILE": s.kafka_ca_file,
        "FRS_KAFKA_CERT_FILE": s.kafka_cert_file, "FRS_KAFKA_KEY_FILE": s.kafka_key_file,
        "FRS_KAFKA_SASL_USERNAME": "intake",
        "FRS_KAFKA_SASL_PASSWORD_FILE": s.kafka_sasl_password_file,
    }.items():
        monkeypatch.setenv(name, str(value))
    from services.intake.settings import IntakeSettings

    # The policy gate in the intake process must have its own principal on SASL_SSL.
    with pytest.raises(ValidationError, match="policy identity needs its own principal"):
        IntakeSettings()
    policy_password = tmp_path / "policy.password"
    policy_password.write_text("policy-secret")
    policy_password.chmod(0o600)
    monkeypatch.setenv("FRS_POLICY_KAFKA_SASL_USERNAME", "policy")
    monkeypatch.setenv("FRS_POLICY_KAFKA_SASL_PASSWORD_FILE", str(policy_password))
    settings = IntakeSettings()
    assert client_options(settings)["sasl_plain_username"] == "intake"
    assert client_options()["sasl_plain_password"] == PASSWORD
    policy = client_options(settings.policy.over(settings, "policy"))
    assert (policy["sasl_plain_username"], policy["sasl_plain_password"]) == (
        "policy", "policy-secret")
    assert policy["bootstrap_servers"] == settings.kafka_bootstrap
    # Its own identity entirely: no certificate of the intake's is borrowed.
    assert settings.policy.over(settings, "policy").kafka_cert_file is None
    assert "policy-secret" not in repr(settings)


def test_incomplete_security_settings_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="FRS_KAFKA_CA_FILE"):
        KafkaSettings(kafka_security_protocol="SSL")
    with pytest.raises(ValidationError, match="FRS_KAFKA_SASL_USERNAME"):
        KafkaSettings(kafka_security_protocol="SASL_SSL", kafka_ca_file=tmp_path / "ca.pem")
    missing = KafkaSettings(
        kafka_security_protocol="SASL_SSL", kafka_ca_file=tmp_path / "ca.pem",
        kafka_sasl_username="x", kafka_sasl_password_file=tmp_path / "nope")
    with pytest.raises(ValueError, match="cannot read"):
        missing.sasl_password()


def test_outside_local_mode_the_bus_must_be_secured() -> None:
    with pytest.raises(ValidationError, match="SASL_SSL outside local mode"):
        ServiceSettings(local_mode=False, kafka_bootstrap="10.0.0.1:9093")
