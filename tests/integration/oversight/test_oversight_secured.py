"""The oversight worker on the secured bus as its own principal (SASL_SSL SCRAM through
faust.SASLCredentials on the kit's TLS context), under the ACLs of services/kit/acls.json:
it reads the pipeline's topics and its own, writes its alerts, and may do nothing else."""

from __future__ import annotations

import asyncio
import os
from datetime import UTC, datetime

import pytest

from schemas.catalog import OVERSIGHT_ALERTS, topic_for
from schemas.envelope import encode
from schemas.events import UsageAlert
from services.kit.publisher import Publisher
from services.kit.reader import read_topic
from services.oversight.handlers import MemoryTables
from tests.conftest import ROOT, ServiceProcess
from tests.helpers import wait_for
from tests.integration.test_acl_bus import SecureBroker, secure, try_write  # noqa: F401
from tests.oversight_scenarios import HITS, LIMIT_ENV, LIMITS

pytestmark = pytest.mark.integration


def test_oversight_runs_as_its_own_principal_on_the_secured_bus(
        secure: SecureBroker) -> None:  # noqa: F811
    events = [e for rule in HITS for e in HITS[rule]("sec-").events]
    tables = MemoryTables(LIMITS)
    want = {a.alert_id for i, e in events for a in tables.feed(i, e)}
    want |= {a.alert_id for a in tables.due(datetime.now(UTC))}

    async def publish() -> None:
        # The admin stands in for the services that write these topics.
        async with Publisher("", "/test/oversight", kafka=secure.settings("admin")) as pub:
            futures = []
            for event_id, event in events:
                record = encode(event, "/test", event_id=event_id)
                futures.append(await pub.send_raw(topic_for(event).name, record.key,
                                                  record.value, record.headers))
            await asyncio.gather(*futures)

    asyncio.run(publish())
    log = secure.state / "oversight.log"
    secure.logs.append(log)
    env = {**os.environ, **LIMIT_ENV, "FRS_OVERSIGHT_METRICS_PORT": "0",
           "FRS_OVERSIGHT_REVIEW_QUIET_S": "2", "FRS_OVERSIGHT_TICK_S": "0.5",
           "FRS_LOCAL_MODE": "false", **secure.env("oversight"), "PYTHONPATH": str(ROOT)}
    worker = ServiceProcess("oversight", env, log).start()
    try:
        found: set[str] = set()

        def complete() -> bool:
            records = asyncio.run(read_topic("", [OVERSIGHT_ALERTS.name],
                                             kafka=secure.settings("auditor")))
            found.update(env_.event.alert_id for _raw, env_ in records
                         if not isinstance(env_, Exception)
                         and isinstance(env_.event, UsageAlert))
            return found >= want

        wait_for(complete, timeout=120, interval=1.0,
                 what=lambda: f"alerts {sorted(want - found)}; log:\n"
                 + log.read_text()[-3000:])
        assert found == want
        # Least privilege: its principal may not write what the pipeline's services write.
        with pytest.raises(Exception, match="uthoriz"):
            asyncio.run(try_write(secure.settings("oversight"), "frs.policy.decisions"))
    finally:
        worker.kill()
