"""Client for upstream systems: encrypt a probe to the intake's key, publish it, and wait
for its outcome (ProbeSubmitted or ProbeRejected on frs.probe.events)."""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import TracebackType

from aiokafka import AIOKafkaConsumer

from schemas.catalog import PROBE_EVENTS, PROBE_REQUESTS
from schemas.envelope import CAUSATION_EXT, DecodeError, decode, encode
from schemas.events import (
    AgentRecord,
    CaseRecord,
    Event,
    ProbeRejected,
    ProbeRequested,
    ProbeSubmitted,
    ProviderRecord,
)
from schemas.sealed import encrypt_image, load_public_key
from schemas.types import ImageSource, Purpose, Transport
from services.kit.kafka import KafkaSettings, client_options
from services.kit.publisher import Publisher
from services.kit.reader import all_partitions

Outcome = ProbeSubmitted | ProbeRejected
_CAUSATION_HEADER = f"ce_{CAUSATION_EXT}"


def build_request(
    image: bytes, public_key_file: Path, *, case_id: str, agent_id: str, purpose: Purpose,
    roi_refs: list[str], image_source: ImageSource, nexus: list[str] | None = None,
    request_id: str | None = None, exigent: bool = False,
    exigent_justification: str | None = None, exigent_bypass: list[str] | None = None,
    unedited_attestation: bool = True, review_required: bool = False,
) -> ProbeRequested:
    request_id = request_id or f"req-{uuid.uuid4()}"
    return ProbeRequested(
        request_id=request_id, case_id=case_id, agent_id=agent_id, purpose=purpose,
        roi_refs=roi_refs, image_source=image_source, nexus=nexus or [], exigent=exigent,
        exigent_justification=exigent_justification, exigent_bypass=exigent_bypass or [],
        unedited_attestation=unedited_attestation, review_required=review_required,
        image=encrypt_image(image, load_public_key(public_key_file), request_id),
    )


async def submit_probe(bootstrap: str, public_key_file: Path, image: bytes,
                       **fields: object) -> ProbeRequested:
    request = build_request(image, public_key_file, **fields)  # type: ignore[arg-type]
    async with Publisher(bootstrap, source="/frs/upstream") as publisher:
        await publisher.publish([request])
    return request


class OutcomeWatch:
    """The outcomes of requests sent after it started: reads frs.probe.events from where
    every partition ended at start. Assigned partitions, no consumer group (as
    ``read_topic``): READ on the topic is all the identity needs, and nothing is committed.

    An outcome is recognized by its causation id, the CloudEvents id of the request it
    answers, so neither an earlier outcome of the same request id nor a rejection under a
    probe id of its own (``request_id_reused``) is mistaken for another's."""

    def __init__(self, bootstrap: str, kafka: KafkaSettings | None = None) -> None:
        self._consumer = AIOKafkaConsumer(
            **client_options(kafka, bootstrap), group_id=None, enable_auto_commit=False,
            isolation_level="read_committed")

    async def __aenter__(self) -> OutcomeWatch:
        await self._consumer.start()
        try:
            partitions = await all_partitions(self._consumer, [PROBE_EVENTS.name])
            self._consumer.assign(partitions)
            for tp, end in (await self._consumer.end_offsets(partitions)).items():
                self._consumer.seek(tp, end)
        except BaseException:
            await self._consumer.stop()
            raise
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self._consumer.stop()

    async def wait(self, request_id: str, cause_id: str, timeout_s: float) -> Outcome | None:
        """The outcome of the request published with CloudEvents id ``cause_id``, or None
        when none came within ``timeout_s`` seconds."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        wanted = cause_id.encode()
        while (left := deadline - loop.time()) > 0:
            batch = await self._consumer.getmany(timeout_ms=max(1, int(min(left, 1.0) * 1000)))
            for record in (r for records in batch.values() for r in records):
                headers = [(k, bytes(v)) for k, v in record.headers or ()]
                if (_CAUSATION_HEADER, wanted) not in headers:
                    continue  # another request's event: not decoded
                try:
                    event = decode(headers, record.key, record.value).event
                except DecodeError:
                    continue
                if isinstance(event, Outcome) and event.request_id == request_id:
                    return event
        return None


@dataclass(frozen=True)
class Submission:
    request: ProbeRequested
    outcome: Outcome | None  # None: not waited for, or no outcome in time


async def submit_and_wait(bootstrap: str, public_key_file: Path, image: bytes, *,
                          wait_s: float | None = 60.0, kafka: KafkaSettings | None = None,
                          **fields: object) -> Submission:
    """Publish one request and, unless ``wait_s`` is None, wait up to that many seconds for
    the intake's outcome of it."""
    request = build_request(image, public_key_file, **fields)  # type: ignore[arg-type]
    async with Publisher(bootstrap, source="/frs/upstream", kafka=kafka) as publisher:
        if wait_s is None:
            await _send(publisher, request)
            return Submission(request, None)
        # Started before the send, so an outcome however quick is not missed.
        async with OutcomeWatch(bootstrap, kafka) as watch:
            cause_id = await _send(publisher, request)
            return Submission(request, await watch.wait(request.request_id, cause_id, wait_s))


async def _send(publisher: Publisher, request: ProbeRequested) -> str:
    """Publish under a CloudEvents id known here: the causation id of its outcome."""
    event_id = str(uuid.uuid4())
    record = encode(request, publisher.source, event_id=event_id)
    await (await publisher.send_raw(PROBE_REQUESTS.name, record.key, record.value,
                                    record.headers))
    return event_id


def demo_registry(provider_id: str, name: str, endpoint: str,
                  response_deadline_s: int = 3600) -> list[Event]:
    """One open case (CASE-1), a trained agent (agent-7) with supervisor (sup-1), and one
    active HTTPS provider: what `frs registry demo` and the pipeline rig seed."""
    now = datetime.now(UTC)
    year = now + timedelta(days=365)
    return [
        CaseRecord(case_id="CASE-1", status="open",
                   offense_category=Purpose.HUMAN_TRAFFICKING, roi_refs=["ROI-1"],
                   updated_at=now),
        AgentRecord(agent_id="agent-7", role="agent", training_valid_until=year,
                    supervisor_id="sup-1", updated_at=now),
        AgentRecord(agent_id="sup-1", role="supervisor", training_valid_until=year,
                    updated_at=now),
        ProviderRecord(provider_id=provider_id, name=name, kind="federal",
                       transport=Transport.HTTPS, endpoint=endpoint,
                       attestation_valid_until=year, response_deadline_s=response_deadline_s,
                       updated_at=now),
    ]
