"""Settings shared by every service. Each service subclasses ``ServiceSettings`` with its
own env prefix (``FRS_INTAKE_``, ...); the settings every service shares keep one name
everywhere (``FRS_KAFKA_BOOTSTRAP``, ...). Settings are frozen once read."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, model_validator
from pydantic_settings import SettingsConfigDict

# The Kafka connection settings (bootstrap, TLS, SASL) live with client_options().
from services.kit.env import default_instance_id, shared
from services.kit.kafka import KafkaSettings
from services.kit.state import StateUrl, parse_state_url

__all__ = ["KafkaSettings", "ServiceSettings", "shared"]


class ServiceSettings(KafkaSettings):
    # Errors name the setting, never echo its input (a URL may carry a secret by mistake).
    model_config = SettingsConfigDict(frozen=True, extra="ignore", populate_by_name=True,
                                      hide_input_in_errors=True)

    service: str = "frs"
    local_mode: bool = shared(
        "FRS_LOCAL_MODE", True, "Allow local-only defaults (key files on disk, plaintext bus)."
    )
    log_level: str = shared("FRS_LOG_LEVEL", "INFO", "Python log level name.")
    state_dir: Path = shared("FRS_STATE_DIR", Path(".state"), "Where local state lives.")
    state_url: str | None = shared(
        "FRS_STATE_URL", None, "Where shared state lives: sqlite:///DIR, the state dir, on one "
        "host (the default), or postgresql://ROLE@HOST:PORT/DB for many hosts "
        "(deploy/postgres/pg.sh prints each service's).")
    state_password_file: Path | None = shared(
        "FRS_STATE_PASSWORD_FILE", None, "The PostgreSQL role's password, in a file only its "
        "owner may read (never in FRS_STATE_URL).")
    metrics_host: str = shared("FRS_METRICS_HOST", "127.0.0.1", "Bind address for /metrics.")
    metrics_port: int = Field(0, description="Port for /metrics; 0 picks a free one.")
    instance_id: str = Field(
        default_factory=default_instance_id, description="This instance of the service: "
        "its consumers' client id (frs-<service>-<instance>, shown by `frs status`) and the "
        "instance label of its metrics; dispatch's ledger claims are owned by "
        "<instance>-<random>. Default: <host>-<pid>.")
    max_retries: int = Field(3, ge=0, description="Handler retries before the DLQ.")
    retry_backoff_s: float = Field(0.2, ge=0.0, description="First retry delay; doubles.")
    batch_max: int = Field(500, ge=1, description="Records fetched per poll.")
    concurrency: int = Field(64, ge=1, description="Probes handled at once (ordered per key).")
    commit_interval_s: float = Field(
        0.5, ge=0.0, description="Least time between offset commits of a consumer (done "
        "records only; a crash redelivers at most this much, a clean stop commits all).")
    # Batching at low rates (issue 21 item 3): each fetch response and produce request has
    # a fixed cost in client and broker, paid per record when records arrive one by one.
    fetch_min_bytes: int = Field(
        1, ge=1, description="Bytes the broker gathers for a fetch before it answers (or "
        "FETCH_MAX_WAIT_MS passes): above 1, records arriving close together come in one "
        "response, at up to FETCH_MAX_WAIT_MS more latency a hop.")
    fetch_max_wait_ms: int = Field(
        500, ge=0, le=30_000, description="Longest the broker holds a fetch short of "
        "FETCH_MIN_BYTES: with FETCH_MIN_BYTES 1, only how often an idle "
        "consumer asks again.")
    linger_ms: int = Field(
        2, ge=0, le=1000, description="How long the producer holds a send for others to the "
        "same broker, to go in one request (added to each output's latency).")
    fault_kill_before_commit: bool = Field(
        False, description="Tests only: SIGKILL itself after a batch's sends, before commit."
    )

    @model_validator(mode="after")
    def _secure_outside_local(self) -> ServiceSettings:
        # Outside local mode, nothing may silently fall back to a loopback dev broker.
        if not self.local_mode and self.kafka_bootstrap.startswith("127.0.0.1:19092"):
            raise ValueError("FRS_KAFKA_BOOTSTRAP must be set explicitly outside local mode")
        if not self.local_mode and self.kafka_security_protocol != "SASL_SSL":
            # Outside local mode every service holds its own identity on an encrypted bus.
            raise ValueError("FRS_KAFKA_SECURITY_PROTOCOL must be SASL_SSL outside local mode")
        self.state()  # a bad FRS_STATE_URL stops the start here, saying what to set
        return self

    def state(self) -> StateUrl:
        return parse_state_url(self.state_url, self.state_dir, local_mode=self.local_mode)
