"""The results service's one Settings: every setting is FRS_RESULTS_<NAME>."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, model_validator
from pydantic_settings import SettingsConfigDict

from services.kit.settings import ServiceSettings


class ResultsSettings(ServiceSettings):
    """Every setting is FRS_RESULTS_<NAME> (e.g. FRS_RESULTS_WEBHOOK_PORT)."""

    model_config = SettingsConfigDict(env_prefix="FRS_RESULTS_", frozen=True, extra="ignore",
                                      populate_by_name=True)
    service: str = "results"
    metrics_port: int = Field(9303, description="Port for /metrics.")
    tracker_db: Path | None = Field(
        None, description="SQLite file of per-probe tracking state; default "
                          "<FRS_STATE_DIR>/results/tracker.sqlite3.")
    tick_s: float = Field(1.0, gt=0, description="How often deadlines are checked, seconds.")
    timer_arm_max_wait_s: float = Field(
        60.0, gt=0, description="At start, deadlines wait until the tracker has consumed the "
                                "backlog, at most this long, seconds.")
    suspend_on_deletion_overdue: bool = Field(
        False, description="Suspend a provider (registry status 'suspended') when it misses "
                           "a deletion deadline.")
    # HTTPS webhook for API vendors (off unless a certificate is configured).
    webhook_host: str = Field("127.0.0.1", description="Webhook bind address.")
    webhook_port: int = Field(8444, ge=0, le=65535, description="Webhook TLS port.")
    webhook_cert_file: Path | None = Field(
        None, description="PEM certificate chain of the webhook; the webhook runs only when "
                          "this is set.")
    webhook_key_file: Path | None = Field(None, description="PEM private key of the webhook.")
    webhook_secrets_file: Path | None = Field(
        None, description='JSON {"provider_id": "shared secret", ...} for HMAC-SHA256.')
    webhook_window_s: int = Field(
        300, ge=1, description="Accepted clock skew of X-FRS-Timestamp, seconds; also how "
                               "long accepted signatures are remembered against replay.")
    webhook_max_body: int = Field(
        1_048_576, ge=1024, description="Largest body, bytes: a larger Content-Length is "
        "refused at once (413) and no body is read past this many bytes.")
    webhook_max_connections: int = Field(
        128, ge=1, description="Open webhook connections (TLS done) at most. When full, the "
        "connection waiting longest without a complete request is closed to make room; if "
        "every one is busy with a request, a new connection gets 503 busy.")
    webhook_header_timeout_s: float = Field(
        10.0, gt=0, description="A connection must finish its TLS handshake, and then its "
        "request headers, within this long; an idle keep-alive connection is closed after "
        "it too, seconds.")
    webhook_body_timeout_s: float = Field(
        10.0, gt=0, description="The whole body must arrive within this long of its "
        "headers, else 408 body_timeout, seconds.")
    webhook_max_header_size: int = Field(
        8190, ge=1024, description="Longest request line or header field, bytes (aiohttp "
        "max_line_size, max_field_size).")
    webhook_max_headers: int = Field(32, ge=8, description="Most header fields in a request.")
    webhook_linger_s: float = Field(
        1.0, ge=0, description="After a reply sent before the body was read (a refusal), "
        "unread body bytes are read and dropped for at most this long so the client sees "
        "the reply, then the connection closes, seconds.")
    max_json_depth: int = Field(
        16, ge=4, le=200, description="Deepest nesting of arrays and objects in an answer "
        "(webhook or mail); deeper is refused (json_too_deep).")
    webhook_unknown_hold_s: float = Field(
        2.0, ge=0, le=30, description="How long an answer for a request_ref not yet "
        "recorded waits for dispatch's record of the send before a 404.")
    nonce_db: Path | None = Field(
        None, description="SQLite file of accepted webhook signatures and reply mails; "
                          "default <FRS_STATE_DIR>/results/nonces.sqlite3.")
    # SMTP inbox for S/MIME replies (off unless the broker's S/MIME key is configured).
    smtp_host: str = Field("127.0.0.1", description="SMTP inbox bind address.")
    smtp_port: int = Field(8025, ge=0, le=65535, description="SMTP inbox port.")
    smime_cert_file: Path | None = Field(
        None, description="The broker's S/MIME certificate (PEM); the inbox runs only when "
                          "this and the key are set.")
    smime_key_file: Path | None = Field(
        None, description="The broker's S/MIME RSA private key (PEM).")
    smtp_require_signature: bool = Field(
        True, description="Refuse replies not signed with the provider's registered "
                          "certificate (ProviderRecord.certificate_pem).")
    smtp_max_message: int = Field(
        4_194_304, ge=1024, description="Largest mail, bytes (announced as SIZE; a larger "
        "DATA is dropped as it arrives and refused with 552).")
    smtp_max_connections: int = Field(
        16, ge=1, description="Open SMTP connections at most; more get 421 and are closed.")
    smtp_max_transfers: int = Field(
        2, ge=1, description="Mails received (DATA) at once; further senders wait for "
        "their 354. Receiving keeps each line as an object: a 4 MB mail of short lines "
        "costs about 100 MB while it arrives.")
    smtp_timeout_s: float = Field(
        60.0, gt=0, description="Idle time allowed between SMTP commands, and the time a "
        "whole DATA transfer may take, seconds.")
    smtp_max_mime_depth: int = Field(
        8, ge=2, description="Deepest MIME nesting of a decrypted reply.")
    smtp_max_mime_parts: int = Field(
        32, ge=2, description="Most MIME parts in a decrypted reply.")
    smtp_parse_timeout_s: float = Field(
        5.0, gt=0, description="Wall time allowed to the MIME parse worker (a process, "
        "killed at the limit) and to the signature check, each, seconds.")
    smtp_parse_memory_mb: int = Field(
        512, ge=64, description="Address-space limit of the MIME parse worker, MiB.")
    smtp_parse_workers: int = Field(
        2, ge=1, description="MIME parse workers running at once; further mails wait.")
    smtp_replay_keep_days: int = Field(
        400, ge=1, description="How long accepted replies (Message-ID and digest of the "
        "signed content) are remembered; the same reply again is refused (replayed).")

    @model_validator(mode="after")
    def _secure_outside_local_mode(self) -> ResultsSettings:
        if not self.local_mode and not self.smtp_require_signature:
            raise ValueError("FRS_RESULTS_SMTP_REQUIRE_SIGNATURE=false is for local mode only")
        if self.webhook_key_file is not None and self.webhook_cert_file is None:
            raise ValueError("FRS_RESULTS_WEBHOOK_KEY_FILE without a certificate file")
        return self

    def tracker_path(self) -> Path:
        return self.tracker_db or self.state_dir / "results" / "tracker.sqlite3"

    def nonce_path(self) -> Path:
        return self.nonce_db or self.state_dir / "results" / "nonces.sqlite3"
