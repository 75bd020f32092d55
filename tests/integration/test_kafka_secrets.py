"""The Kafka password stays out of the `frs` command's help and its connection errors.
Integration, not unit: the command runs as a process and connects to a port where
nothing listens."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT
from tests.unit.test_kafka_options import PASSWORD, _secured

pytestmark = pytest.mark.integration


def test_help_and_errors_never_show_the_password(tmp_path: Path) -> None:
    settings = _secured(tmp_path)
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT),
           "FRS_KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
           "FRS_KAFKA_CA_FILE": str(settings.kafka_ca_file),
           "FRS_KAFKA_CERT_FILE": str(settings.kafka_cert_file),
           "FRS_KAFKA_KEY_FILE": str(settings.kafka_key_file),
           "FRS_KAFKA_SASL_USERNAME": "intake",
           "FRS_KAFKA_SASL_PASSWORD_FILE": str(settings.kafka_sasl_password_file),
           "FRS_KAFKA_BOOTSTRAP": "127.0.0.1:9"}  # nothing listens: a connection error
    for args in (["--help"], ["acl", "apply", "--help"], ["submit", "--help"],
                 ["timeline", "prb-x", "--wait", "0"]):
        done = subprocess.run([sys.executable, "-m", "services.cli", *args], cwd=ROOT,
                              env=env, capture_output=True, text=True, timeout=60)
        assert PASSWORD not in done.stdout + done.stderr, args
    assert done.returncode == 2 and "cannot reach Kafka" in done.stderr
