"""The one place Kafka clients get their connection options: bootstrap, TLS, SASL.

Every producer, consumer and admin client in the project is built with
``AIOKafkaX(**client_options(settings), ...)``, so a secured deployment needs nothing but
the shared ``FRS_KAFKA_*`` settings (the same names in every service and the ``frs``
command). ``settings=None`` reads them from the environment.

    PLAINTEXT  local default (tests, a laptop); refused outside local mode
    SSL        TLS with a client certificate (the admin, on the broker's internal listener)
    SASL_SSL   TLS with a client certificate plus SCRAM-SHA-512 (services and outside roles)

The password is read from a file when a client is built, held as ``SecretStr`` and handed
to aiokafka only: it never appears in settings, repr, logs, exceptions or ``--help``.

Importing this module also makes aiokafka raise an OffsetFetch answer's group-level error
(``guard_offset_fetch``), which it otherwise reads as "nothing committed".
"""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Any, Literal

import aiokafka.errors as kafka_errors
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.consumer.group_coordinator import GroupCoordinator
from aiokafka.helpers import create_ssl_context
from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from services.kit.env import shared

SecurityProtocol = Literal["PLAINTEXT", "SSL", "SASL_SSL"]
SASL_MECHANISM = "SCRAM-SHA-512"


class KafkaSettings(BaseSettings):
    """How to reach the broker and who to be there. Shared by every service and tool."""

    model_config = SettingsConfigDict(frozen=True, extra="ignore", populate_by_name=True)

    kafka_bootstrap: str = shared(
        "FRS_KAFKA_BOOTSTRAP", "127.0.0.1:19092", "Kafka bootstrap servers, host:port[,...]"
    )
    kafka_security_protocol: SecurityProtocol = shared(
        "FRS_KAFKA_SECURITY_PROTOCOL", "PLAINTEXT",
        "PLAINTEXT (local only) | SSL (client certificate) | SASL_SSL (certificate + SCRAM)",
    )
    kafka_ca_file: Path | None = shared(
        "FRS_KAFKA_CA_FILE", None, "PEM file of the CA that signed the broker's certificate."
    )
    kafka_cert_file: Path | None = shared(
        "FRS_KAFKA_CERT_FILE", None, "PEM client certificate (chain) of this identity."
    )
    kafka_key_file: Path | None = shared(
        "FRS_KAFKA_KEY_FILE", None, "PEM private key of the client certificate (mode 0600)."
    )
    kafka_sasl_username: str | None = shared(
        "FRS_KAFKA_SASL_USERNAME", None, "SCRAM-SHA-512 user (SASL_SSL); the certificate's CN."
    )
    kafka_sasl_password_file: Path | None = shared(
        "FRS_KAFKA_SASL_PASSWORD_FILE", None,
        "File holding the SCRAM password (mode 0600); the password itself is never a setting.",
    )

    @field_validator("kafka_ca_file", "kafka_cert_file", "kafka_key_file",
                     "kafka_sasl_password_file", "kafka_sasl_username", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: object) -> object:
        # VAR= in an env file means "not set", not "the current directory".
        return None if value == "" else value

    @model_validator(mode="after")
    def _complete(self) -> KafkaSettings:
        protocol = self.kafka_security_protocol
        if protocol == "PLAINTEXT":
            return self
        if self.kafka_ca_file is None:
            raise ValueError(f"FRS_KAFKA_CA_FILE is required with {protocol}")
        if (self.kafka_cert_file is None) != (self.kafka_key_file is None):
            raise ValueError("set both FRS_KAFKA_CERT_FILE and FRS_KAFKA_KEY_FILE, or neither")
        if protocol == "SASL_SSL" and (
            self.kafka_sasl_username is None or self.kafka_sasl_password_file is None
        ):
            raise ValueError("SASL_SSL needs FRS_KAFKA_SASL_USERNAME and "
                             "FRS_KAFKA_SASL_PASSWORD_FILE")
        return self

    def sasl_password(self) -> SecretStr:
        """Read the password file now (so a rotated password applies to the next client)."""
        if self.kafka_sasl_password_file is None:
            raise ValueError("FRS_KAFKA_SASL_PASSWORD_FILE is not set")
        try:
            text = self.kafka_sasl_password_file.read_text().strip()
        except OSError as exc:
            # The path is not secret; the reason (missing, unreadable) helps the operator.
            raise ValueError(f"cannot read FRS_KAFKA_SASL_PASSWORD_FILE "
                             f"{self.kafka_sasl_password_file}: {exc.strerror}") from None
        return SecretStr(text)


_IDENTITY_FIELDS = ("kafka_cert_file", "kafka_key_file", "kafka_sasl_username",
                    "kafka_sasl_password_file")


class IdentitySettings(BaseSettings):
    """Another principal on the same bus, for a part of a service that must act as itself
    (the policy gate in the intake process publishes decisions as ``policy``). Only who to
    be: bootstrap, protocol and CA are the service's. A subclass sets the env prefix:
    ``FRS_POLICY_`` reads FRS_POLICY_KAFKA_CERT_FILE, ..._KEY_FILE, ..._SASL_USERNAME,
    ..._SASL_PASSWORD_FILE."""

    model_config = SettingsConfigDict(frozen=True, extra="ignore")

    kafka_cert_file: Path | None = Field(
        None, description="PEM client certificate of this part's own principal.")
    kafka_key_file: Path | None = Field(
        None, description="PEM private key of that certificate (mode 0600).")
    kafka_sasl_username: str | None = Field(
        None, description="SCRAM-SHA-512 user of this part's own principal (SASL_SSL; "
        "required there, and not the service's own).")
    kafka_sasl_password_file: Path | None = Field(
        None, description="File holding that principal's SCRAM password (mode 0600).")

    @field_validator(*_IDENTITY_FIELDS, mode="before")
    @classmethod
    def _empty_is_unset(cls, value: object) -> object:
        return None if value == "" else value

    def over(self, bus: KafkaSettings, name: str) -> KafkaSettings:
        """This identity on the service's bus. Unset on a plaintext bus: the service's
        own connection (there are no identities there). On SASL_SSL the identity must be
        set and differ from the service's: the broker's ACLs tell the two apart."""
        own = {f: getattr(bus, f) for f in KafkaSettings.model_fields}
        mine = {f: getattr(self, f) for f in _IDENTITY_FIELDS}
        if bus.kafka_security_protocol == "SASL_SSL" and (
                mine["kafka_sasl_username"] in (None, bus.kafka_sasl_username)):
            raise ValueError(f"the {name} identity needs its own principal on SASL_SSL: set "
                             f"its KAFKA_SASL_USERNAME, KAFKA_SASL_PASSWORD_FILE, "
                             f"KAFKA_CERT_FILE and KAFKA_KEY_FILE")
        if all(v is None for v in mine.values()):
            return KafkaSettings(**own)
        return KafkaSettings(**{**own, **mine})


def ssl_context(settings: KafkaSettings) -> ssl.SSLContext:
    """TLS 1.2+ client context: verifies the broker against the CA and its address."""
    context: ssl.SSLContext = create_ssl_context(
        cafile=str(settings.kafka_ca_file) if settings.kafka_ca_file else None,
        certfile=str(settings.kafka_cert_file) if settings.kafka_cert_file else None,
        keyfile=str(settings.kafka_key_file) if settings.kafka_key_file else None,
    )
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


def client_options(settings: KafkaSettings | None = None, bootstrap: str | None = None
                   ) -> dict[str, Any]:
    """Keyword arguments for any aiokafka client (producer, consumer, admin).

    ``bootstrap`` overrides the settings' bootstrap (callers that were handed one)."""
    s = settings if settings is not None else KafkaSettings()
    options: dict[str, Any] = {
        "bootstrap_servers": bootstrap or s.kafka_bootstrap,
        "security_protocol": s.kafka_security_protocol,
    }
    if s.kafka_security_protocol == "PLAINTEXT":
        return options
    options["ssl_context"] = ssl_context(s)
    if s.kafka_security_protocol == "SASL_SSL":
        options["sasl_mechanism"] = SASL_MECHANISM
        options["sasl_plain_username"] = s.kafka_sasl_username
        options["sasl_plain_password"] = s.sasl_password().get_secret_value()
    return options


# --- aiokafka's committed-offset fetch ------------------------------------------------

_OFFSET_FETCH = 9  # the OffsetFetch API key


def offset_fetch_error(response: Any) -> kafka_errors.KafkaError | None:
    """The group-level error of an OffsetFetch response, None for any other response.

    From version 2 the broker answers a group it cannot serve now (its coordinator still
    loading the offsets, moved, or timed out: KAFKA-17267 maps that to NOT_COORDINATOR)
    with the error at the top and no partitions (OffsetFetchRequest.getErrorResponse).
    aiokafka 0.14 reads only the partitions' errors, so it took such an answer for "this
    group committed nothing": its consumer fell back to auto_offset_reset (a replay of the
    topic from its start) and its admin client returned no offsets."""
    if getattr(response, "API_KEY", None) != _OFFSET_FETCH:
        return None
    code = getattr(response, "error_code", 0)  # absent before version 2
    if not code:
        return None
    error: kafka_errors.KafkaError = kafka_errors.for_code(code)()
    return error


def guard_offset_fetch() -> None:
    """Raise the group-level error of every OffsetFetch answer, in the consumer's group
    coordinator and the admin client, as aiokafka does a partition's: the consumer's own
    loops retry the retriable ones (load in progress, not coordinator: it finds the
    coordinator again); the admin's callers retry on ``KafkaError``. Idempotent."""
    if getattr(GroupCoordinator._send_req, "_frs_guarded", False):
        return
    coordinator_send = GroupCoordinator._send_req
    admin_send = AIOKafkaAdminClient._send_request

    async def send_req(self: GroupCoordinator, request: Any) -> Any:
        response = await coordinator_send(self, request)
        error = offset_fetch_error(response)
        if error is not None:
            if isinstance(error, (kafka_errors.NotCoordinatorForGroupError,
                                  kafka_errors.CoordinatorNotAvailableError)):
                self.coordinator_dead()  # as for a partition's NOT_COORDINATOR
            raise error
        return response

    async def send_request(self: AIOKafkaAdminClient, request: Any,
                           node_id: int | None = None) -> Any:
        response = await admin_send(self, request, node_id)
        error = offset_fetch_error(response)
        if error is not None:
            raise error
        return response

    send_req._frs_guarded = True  # type: ignore[attr-defined]
    GroupCoordinator._send_req = send_req
    AIOKafkaAdminClient._send_request = send_request


guard_offset_fetch()
