"""Dispatch service: ``build(settings)`` declares one route (``frs-dispatch`` sends on
PolicyCleared, from the claim check the clearance carries) and the claim heartbeat."""

from __future__ import annotations

import functools
import uuid
from contextlib import AsyncExitStack, ExitStack
from dataclasses import replace
from typing import Any

from schemas.catalog import POLICY_DECISIONS
from schemas.events import PolicyCleared
from schemas.types import Transport, utcnow
from services.dispatch import handlers
from services.dispatch.breaker import ProviderGuards
from services.dispatch.delivery import RetryPolicy
from services.dispatch.images import ImageSource, StaticImageSource, VaultImageSource
from services.dispatch.ledger import Ledger, PgLedger, SqliteLedger
from services.dispatch.metrics import dispatch_metrics
from services.dispatch.settings import DispatchSettings
from services.dispatch.transports.base import ProviderTransport
from services.dispatch.transports.https import HttpsTransport, client_tls_context
from services.dispatch.transports.rekognition import RekognitionTransport
from services.dispatch.transports.smime_email import SmimeEmailTransport
from services.kit.app import Context, Job, ServiceApp, Wiring
from services.kit.fencing import PgLeases
from services.kit.registry import Registries
from services.kit.routing import Route, RouteProgress, bind, dlq_for
from services.kit.state import PostgresState, State, open_state
from services.vault import ObjectPurged, UnknownObject, Vault, open_index, open_vault


def build_image_source(settings: DispatchSettings, stack: AsyncExitStack) -> ImageSource:
    if settings.image_source == "test-file":
        assert settings.test_image_file is not None
        return StaticImageSource.from_file(settings.test_image_file)
    vault_stack = ExitStack()  # closed on the vault's own thread

    def opener() -> Vault:
        # FRS_STATE_URL: the shared database's index (read only, as the dispatch role) or
        # the intake's SQLite file; the vault thread is its only user.
        index = open_index(settings.vault, settings.state(), settings.state_password_file,
                           name="dispatch-vault", max_size=2)
        vault_stack.callback(index.close)
        return open_vault(settings.vault, index)

    source = VaultImageSource(opener, (ObjectPurged, UnknownObject), vault_stack.close)
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


def build_ledger(settings: DispatchSettings, shared: State, stack: AsyncExitStack) -> Ledger:
    """The shared database's ledger (no file under the state dir), or SQLite's."""
    # Claim owner: per process, so another live process's claims are waited for.
    owner = f"{settings.instance_id}-{uuid.uuid4().hex[:12]}"
    if isinstance(shared, PostgresState):
        return PgLedger(shared.pool, owner=owner)
    ledger = SqliteLedger(settings.ledger_file or settings.state_dir / "dispatch" / "ledger.db",
                          owner=owner)
    stack.callback(ledger.close)
    return ledger


def build_ports(settings: DispatchSettings, registries: Registries,
                stack: AsyncExitStack, ledger: Ledger) -> handlers.DispatchPorts:
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
                          resend_ambiguous=settings.unknown_outcome_email == "resend",
                          # Half the claim lease: another instance resends a claim only
                          # after a whole lease without a heartbeat of it.
                          confirm_after_s=settings.claim_lease_s / 2),
        hooks=metrics,
        unknown_outcome_email=settings.unknown_outcome_email,
        claim_lease_s=settings.claim_lease_s,
    )


def build(settings: DispatchSettings) -> ServiceApp:
    def wire(ctx: Context) -> Wiring:
        sends_progress = RouteProgress()
        # FRS_STATE_URL: the ledger in the shared PostgreSQL database (every instance on
        # every host sees every claim), or SQLite in the state dir.
        shared = open_state(settings.state(), settings.state_password_file, ctx.stack,
                            name="dispatch")
        ledger = build_ledger(settings, shared, ctx.stack)
        ports = replace(build_ports(settings, ctx.registries, ctx.stack, ledger),
                        stopping=lambda: sends_progress.stopping)
        # On PostgreSQL the sends are fenced by partition leases: a stale instance (a
        # zombie whose partitions moved) cannot claim or send (services/kit/fencing.py).
        sends = Route("dispatch", settings.group_id, (POLICY_DECISIONS.name,),
                      dict([bind(PolicyCleared, handlers.on_policy_cleared, ports)]),
                      dlq_for("dispatch"), progress=sends_progress,
                      leases=PgLeases(shared.pool, "dispatch")
                      if isinstance(shared, PostgresState) else None)
        # The heartbeat keeps this instance's claims alive while it sends.
        heartbeat = Job("claim heartbeat", settings.claim_lease_s / 5, ports.ledger.heartbeat)
        # The shared state's schema first: a wrong one stops the start in one line.
        return Wiring(routes=[sends], jobs=[heartbeat],
                      preflight=[shared.preflight] if isinstance(shared, PostgresState) else [])

    return ServiceApp(settings, wire)
