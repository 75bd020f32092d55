"""Dispatch service: builds ports from Settings and routes topics to handlers.

Two routes in one process: ``frs-dispatch-probes`` keeps the claim check of every
ProbeSubmitted (and purges) in the ledger; ``frs-dispatch`` sends on PolicyCleared."""

from __future__ import annotations

import asyncio
import functools
import importlib
import socket
import uuid
from collections.abc import Callable, Coroutine
from contextlib import AsyncExitStack, ExitStack
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import SettingsConfigDict

from schemas.catalog import POLICY_DECISIONS, PROBE_EVENTS
from schemas.events import ImagePurged, PolicyCleared, ProbeSubmitted
from schemas.types import Transport, utcnow
from services.dispatch import handlers
from services.dispatch.breaker import ProviderGuards
from services.dispatch.delivery import RetryPolicy
from services.dispatch.images import ImageSource, StaticImageSource, VaultImageSource
from services.dispatch.ledger import SqliteLedger
from services.dispatch.metrics import dispatch_metrics
from services.dispatch.transports.base import ProviderTransport
from services.dispatch.transports.https import HttpsTransport, client_tls_context
from services.dispatch.transports.rekognition import RekognitionTransport
from services.dispatch.transports.smime_email import SmimeEmailTransport
from services.kit.bus import Processor, Publisher, Route, bind
from services.kit.registry import Registries
from services.kit.service import dlq_for, processor
from services.kit.settings import ServiceSettings


class DispatchSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="FRS_DISPATCH_", frozen=True, extra="ignore",
                                      populate_by_name=True)
    service: str = "dispatch"
    metrics_port: int = Field(9302, description="Port for /metrics.")
    # Dispatch waits on providers, not on CPU: hold many clearances at once (ordered per key).
    concurrency: int = Field(256, ge=1, description="Clearances handled at once.")
    group_id: str = Field("frs-dispatch", description="Consumer group; probes use <group>-probes.")
    instance_id: str = Field(
        default_factory=socket.gethostname,
        description="This host's dispatch instance: every instance reads every probe's claim "
                    "check into its own ledger (group <group>-probes-<instance>).")
    claim_lease_s: float = Field(5.0, gt=0, description="Another instance's claim without a "
                                                        "heartbeat this long is taken over.")
    ledger_file: Path | None = Field(None, description="Default: <state dir>/dispatch/ledger.db")
    image_source: Literal["vault", "test-file"] = Field(
        "vault", description="Where probe images are read; test-file only in local mode.")
    test_image_file: Path | None = Field(None, description="The test photo for test-file.")
    probe_wait_s: float = Field(10.0, gt=0, description="Wait for a clearance's submission.")
    # HTTPS
    ca_file: Path | None = Field(None, description="CA bundle vendors' servers must chain to.")
    client_cert_file: Path | None = Field(None, description="Client certificate (mutual TLS).")
    client_key_file: Path | None = Field(None, description="Client key for mutual TLS.")
    https_timeout_s: float = Field(10.0, gt=0, description="Whole-request timeout.")
    # S/MIME email
    smtp_host: str = Field("127.0.0.1", description="Outbound SMTP relay.")
    smtp_port: int = Field(25, ge=1, le=65535, description="Port of the outbound SMTP relay.")
    smtp_from: str = Field("frs-dispatch@frs-broker.local", description="Envelope sender.")
    smtp_starttls: bool = Field(False, description="STARTTLS to the relay (required outside "
                                                   "local mode).")
    smtp_username: str | None = Field(None, description="SMTP AUTH user, if the relay wants one.")
    smtp_password: SecretStr | None = Field(
        None, description="SMTP AUTH password (kept as a secret, never logged).")
    smtp_timeout_s: float = Field(30.0, gt=0, description="Timeout of one SMTP session, s.")
    unknown_outcome_email: Literal["resend", "fail"] = Field(
        "resend", description="After a crash mid-send: resend with the same Message-ID, or "
                              "fail with outcome_unknown.")
    # Rekognition
    rekognition_region: str = Field("us-east-1", description="AWS region of Rekognition.")
    rekognition_endpoint_url: str | None = Field(None, description="Tests: a moto server.")
    rekognition_threshold: float = Field(
        80.0, ge=0, le=100, description="FaceMatchThreshold sent to SearchFacesByImage.")
    rekognition_quality_filter: str = Field(
        "AUTO", description="QualityFilter sent to SearchFacesByImage.")
    # Resilience
    retry_max_attempts: int = Field(5, ge=1, description="Attempts per send before failing.")
    retry_base_delay_s: float = Field(
        0.2, ge=0, description="First retry delay, s; doubles, with jitter.")
    retry_max_delay_s: float = Field(10.0, ge=0, description="Longest retry delay, s.")
    attempt_timeout_s: float = Field(30.0, gt=0, description="Timeout of one attempt, s.")
    provider_concurrency: int = Field(256, ge=1, description="Sends in flight per provider.")
    breaker_failures: int = Field(5, ge=1, description="Transient failures that open it.")
    breaker_open_s: float = Field(10.0, gt=0, description="Open time before a trial call.")

    @model_validator(mode="after")
    def _secure_dispatch(self) -> DispatchSettings:
        if not self.local_mode:
            if self.image_source != "vault":
                raise ValueError("FRS_DISPATCH_IMAGE_SOURCE must be vault outside local mode")
            if not self.smtp_starttls:
                raise ValueError("FRS_DISPATCH_SMTP_STARTTLS must be true outside local mode")
        if self.image_source == "test-file" and self.test_image_file is None:
            raise ValueError("FRS_DISPATCH_TEST_IMAGE_FILE is required with test-file")
        return self


def build_image_source(settings: DispatchSettings, stack: AsyncExitStack) -> ImageSource:
    if settings.image_source == "test-file":
        assert settings.test_image_file is not None
        return StaticImageSource.from_file(settings.test_image_file)
    # The vault is the intake's (services/intake/vault.py): opened the way it documents,
    # imported by name so this module does not depend on the intake at import time.
    try:
        intake_app = importlib.import_module("services.intake.app")
        vault_module = importlib.import_module("services.intake.vault")
        open_vault = intake_app.open_vault
        gone = (vault_module.ObjectPurged, vault_module.UnknownObject)
    except (ImportError, AttributeError):
        raise SystemExit("dispatch: this build has no vault (services/intake/vault.py); in "
                         "local mode set FRS_DISPATCH_IMAGE_SOURCE=test-file and "
                         "FRS_DISPATCH_TEST_IMAGE_FILE") from None
    vault_stack = ExitStack()  # closed on the vault's own thread

    def opener() -> Any:
        vault, _outcomes = open_vault(intake_app.IntakeSettings(), vault_stack)
        return vault

    source = VaultImageSource(opener, gone, vault_stack.close)
    stack.callback(source.close)
    return source


def build_transports(settings: DispatchSettings) -> dict[Transport, ProviderTransport]:
    tls = client_tls_context(settings.ca_file, settings.client_cert_file,
                             settings.client_key_file)

    @functools.cache
    def rekognition_client(region: str | None) -> Any:
        import boto3
        from botocore.config import Config

        # Our own retry loop decides: botocore must not retry behind its back.
        return boto3.client(
            "rekognition", region_name=region or settings.rekognition_region,
            endpoint_url=settings.rekognition_endpoint_url,
            config=Config(retries={"total_max_attempts": 1, "mode": "standard"},
                          connect_timeout=5, read_timeout=settings.attempt_timeout_s),
        )

    return {
        Transport.HTTPS: HttpsTransport(tls, timeout_s=settings.https_timeout_s),
        Transport.SMIME_EMAIL: SmimeEmailTransport(
            settings.smtp_host, settings.smtp_port, settings.smtp_from,
            starttls=settings.smtp_starttls, username=settings.smtp_username,
            password=settings.smtp_password.get_secret_value() if settings.smtp_password
            else None, timeout_s=settings.smtp_timeout_s),
        Transport.REKOGNITION: RekognitionTransport(
            rekognition_client, default_threshold=settings.rekognition_threshold,
            default_quality=settings.rekognition_quality_filter),
    }


def build_ports(settings: DispatchSettings, registries: Registries,
                stack: AsyncExitStack) -> handlers.DispatchPorts:
    # Claim owner: per process, so another live process's claims are waited for.
    ledger = SqliteLedger(settings.ledger_file or settings.state_dir / "dispatch" / "ledger.db",
                          owner=f"{settings.instance_id}-{uuid.uuid4().hex[:12]}")
    stack.callback(ledger.close)
    transports = build_transports(settings)
    for transport in transports.values():
        stack.push_async_callback(transport.close)
    metrics = dispatch_metrics()
    guards = ProviderGuards(concurrency=settings.provider_concurrency,
                            failure_threshold=settings.breaker_failures,
                            open_s=settings.breaker_open_s, on_change=metrics.circuit_changed)
    return handlers.DispatchPorts(
        registries=registries, ledger=ledger, images=build_image_source(settings, stack),
        transports=transports, guards=guards, clock=utcnow,
        retry=RetryPolicy(settings.retry_max_attempts, settings.retry_base_delay_s,
                          settings.retry_max_delay_s, settings.attempt_timeout_s,
                          resend_ambiguous=settings.unknown_outcome_email == "resend"),
        hooks=metrics, probe_wait_s=settings.probe_wait_s,
        unknown_outcome_email=settings.unknown_outcome_email,
        claim_lease_s=settings.claim_lease_s,
    )


def probes_group(settings: DispatchSettings) -> str:
    return f"{settings.group_id}-probes-{settings.instance_id}"


@dataclass(frozen=True)
class DispatchApp:
    processors: list[Processor]
    background: list[Callable[[], Coroutine[Any, Any, None]]]


def build(settings: DispatchSettings, publisher: Publisher, registries: Registries,
          stack: AsyncExitStack) -> DispatchApp:
    ports = build_ports(settings, registries, stack)
    ledger = ports.ledger

    async def heartbeat() -> None:
        while True:
            await ledger.heartbeat()
            await asyncio.sleep(settings.claim_lease_s / 5)

    # Not shared between instances: clearances and submissions of one probe may be assigned
    # to different instances, so each one keeps every claim check.
    probes = processor(settings, Route(
        "dispatch", probes_group(settings), (PROBE_EVENTS.name,),
        dict([bind(ProbeSubmitted, handlers.on_probe_submitted, ports),
              bind(ImagePurged, handlers.on_image_purged, ports)]),
        dlq_for("dispatch")), publisher)
    # A clearance waits while that route is behind, rather than take its probe for unknown.
    sends = processor(settings, Route(
        "dispatch", settings.group_id, (POLICY_DECISIONS.name,),
        dict([bind(PolicyCleared, handlers.on_policy_cleared, replace(ports, probes=probes))]),
        dlq_for("dispatch")), publisher)
    return DispatchApp([probes, sends], [heartbeat])
