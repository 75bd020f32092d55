"""The services on FRS_STATE_URL=postgresql://…, on the real broker: two results instances
with state dirs of their own (two hosts) share webhook nonces and request refs, so a call
accepted by one is a replay at the other and each finds the sends the other tracked; the
intake keeps its request outcomes in the database; a service on a database whose schema is
not its build's stops at start in one line."""

from __future__ import annotations

import json
import secrets
import ssl
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import psycopg
import pytest

from schemas.events import ProbeSubmitted
from services.kit.migrate import latest
from services.results.webhook import ANSWERS_PATH, sign
from tests import intake_samples as s
from tests.conftest import ServiceProcess
from tests.helpers import free_port, log_text, wait_for_async
from tests.integration.intake_support import new_id, start_intake
from tests.integration.results.conftest import cleared, dispatched, provider_record, publish, uid
from tests.integration.results.pki import LocalCA
from tests.integration.stores.conftest import conninfo, empty_tables
from tests.integration.test_intake_request_binding import submit
from tests.pg import PgServer, start_server, stop_server

pytestmark = pytest.mark.integration


def on_postgres(server: PgServer, role: str) -> dict[str, str]:
    return {"FRS_STATE_URL": server.url(role),
            "FRS_STATE_PASSWORD_FILE": server.settings(role)["FRS_STATE_PASSWORD_FILE"]}


def rows(server: PgServer, role: str, query: str, *params: object) -> list[tuple[Any, ...]]:
    with psycopg.connect(**conninfo(server, role)) as conn:
        return conn.execute(query.encode(), params).fetchall()


async def test_two_results_instances_share_nonces_and_request_refs(
        kafka_bootstrap: str, service_env: dict[str, str], pg_migrated: PgServer,
        tmp_path: Path) -> None:
    await empty_tables(pg_migrated)
    ca = LocalCA()
    cert, key = ca.server("127.0.0.1").write(tmp_path / "tls", "webhook")
    shared = {"pg-1": secrets.token_hex(32).encode()}
    secrets_file = tmp_path / "webhook-secrets.json"
    secrets_file.write_text(json.dumps({k: v.decode() for k, v in shared.items()}))
    secrets_file.chmod(0o600)
    hosts: list[tuple[ServiceProcess, int]] = []
    for host in ("a", "b"):
        port = free_port()
        proc = ServiceProcess("results", {**service_env, **on_postgres(pg_migrated, "results"),
                                          "FRS_STATE_DIR": str(tmp_path / host / "state")},
                              tmp_path / f"results-{host}.log")
        proc.start(FRS_RESULTS_WEBHOOK_CERT_FILE=str(cert), FRS_RESULTS_WEBHOOK_KEY_FILE=str(key),
                   FRS_RESULTS_WEBHOOK_SECRETS_FILE=str(secrets_file),
                   FRS_RESULTS_WEBHOOK_PORT=str(port), FRS_RESULTS_WEBHOOK_WINDOW_S="60")
        hosts.append((proc, port))
    try:
        for proc, _ in hosts:
            proc.wait_log("webhook listening", timeout=60)
        probes = [uid("prb-pg") for _ in range(4)]
        sends = [dispatched(p, "pg-1") for p in probes]
        await publish(kafka_bootstrap, [provider_record("pg-1"),
                                        *(cleared(p, "pg-1") for p in probes), *sends])
        # Each send is tracked by whichever instance owns its partition; both see all refs.
        await wait_for_async(
            lambda: len(rows(pg_migrated, "results", "SELECT 1 FROM request_refs")) == 4,
            timeout=60, what="both trackers to record their sends' refs")
        context = ssl.create_default_context(cadata=ca.cert_pem.decode())
        async with aiohttp.ClientSession() as session:
            async def post(port: int, body: dict[str, Any], ts: int) -> int:
                raw = json.dumps(body).encode()
                headers = {"X-FRS-Provider": "pg-1", "X-FRS-Timestamp": str(ts),
                           "X-FRS-Signature": sign(shared["pg-1"], "pg-1", str(ts),
                                                   ANSWERS_PATH, raw)}
                async with session.post(f"https://127.0.0.1:{port}{ANSWERS_PATH}", data=raw,
                                        headers=headers, ssl=context) as resp:
                    return resp.status

            for n, sent in enumerate(sends):
                body = {"request_ref": sent.request_ref, "candidates": [], "threshold": 0.5,
                        "algorithm": "a", "algorithm_version": "1"}
                ts = int(time.time())
                first, other = hosts[n % 2][1], hosts[(n + 1) % 2][1]
                assert await post(first, body, ts) == 202, n  # the ref, from either tracker
                assert await post(other, body, ts) == 409, n  # the same call: a replay there
        assert len(rows(pg_migrated, "results", "SELECT 1 FROM webhook_nonces")) == 4
        for host in ("a", "b"):  # nothing of it in either host's state dir
            assert not (tmp_path / host / "state" / "results" / "nonces.sqlite3").exists()
    finally:
        for proc, _ in hosts:
            assert proc.stop() == 0


async def test_the_intake_keeps_request_outcomes_in_the_database(
        kafka_bootstrap: str, services: dict[str, ServiceProcess],
        service_env: dict[str, str], pg_migrated: PgServer) -> None:
    await empty_tables(pg_migrated)
    start_intake(services, **on_postgres(pg_migrated, "intake"))
    request_id = new_id("req-pg")
    first = await submit(kafka_bootstrap, service_env, s.face_jpeg(), request_id)
    assert isinstance(first.outcome, ProbeSubmitted), first.outcome
    [(event_type,)] = rows(pg_migrated, "intake", "SELECT event_type FROM request_outcomes "
                           "WHERE request_id = %s", request_id)
    assert event_type == "frs.probe.submitted.v1"
    again = await submit(kafka_bootstrap, service_env, s.face_jpeg(), request_id)
    assert again.outcome == first.outcome  # the recorded outcome, from the database


@pytest.fixture
def unmigrated() -> Iterator[PgServer]:
    server = start_server()
    try:
        yield server
    finally:
        stop_server(server)


def test_a_service_stops_at_start_on_a_schema_it_was_not_built_for(
        kafka_bootstrap: str, services: dict[str, ServiceProcess],
        unmigrated: PgServer) -> None:
    intake = services["intake"]
    intake.start(**on_postgres(unmigrated, "intake"))
    assert intake.proc is not None
    assert intake.proc.wait(timeout=120) == 1
    text = log_text(intake.log_path)
    wanted = f"database schema is at 0, this build needs {latest()}: run frs db migrate"
    assert [line for line in text.splitlines() if "database schema" in line] == [
        line for line in text.splitlines() if wanted in line]
    assert text.count(wanted) == 1 and "Traceback" not in text
    assert unmigrated.password("intake") not in text
