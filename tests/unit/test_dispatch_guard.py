"""A woken zombie sends nothing (issue 18), without I/O: the guard an attempt carries from
its record to its last bytes, the HTTPS body that asks it before each slice, and the
delivery that ends an attempt the guard refused (the vendor side, with real sockets:
tests/integration/test_dispatch_transports.py; the frozen process:
tests/integration/stores/test_dispatch_zombie.py)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import cast

import pytest
from aiohttp.abc import AbstractStreamWriter

from schemas.events import ProviderRecord
from schemas.types import OutboundField, Transport
from services.dispatch.breaker import ProviderGuards
from services.dispatch.delivery import ClaimLost, Delivered, RetryPolicy, deliver
from services.dispatch.payloads import build_payload
from services.dispatch.transports.base import SendGuard, SendRequest, SendResult
from services.dispatch.transports.https import GuardedBody
from services.kit.fencing import Fenced
from tests.unit.fakes import no_sleep

REF = "ref-" + "2" * 36
FROZEN_S = 60.0  # how far the loop's clock moved while the process was stopped


class Asked:
    """The guard's ``confirm``: counts the questions, answers with ``refusal`` (None: held)."""

    def __init__(self, refusal: Exception | None = None) -> None:
        self.refusal = refusal
        self.times = 0

    async def __call__(self) -> None:
        self.times += 1
        if self.refusal is not None:
            raise self.refusal


def _now() -> float:
    return asyncio.get_running_loop().time()


# --- the body ---------------------------------------------------------------------------


class _Transport:
    def __init__(self) -> None:
        self.buffered = 0

    def is_closing(self) -> bool:
        return False

    def get_write_buffer_size(self) -> int:
        return self.buffered


@dataclass
class FakeWriter:
    """aiohttp's stream writer as the body sees it; ``on_write`` runs after each slice
    (a freeze between two slices moves the guard's clock)."""

    written: list[bytes] = field(default_factory=list)
    transport: _Transport = field(default_factory=_Transport)
    on_write: list[object] = field(default_factory=list)

    async def write(self, chunk: memoryview | bytes) -> None:
        self.written.append(bytes(chunk))
        for hook in self.on_write:
            assert callable(hook)
            hook()


async def _write(body: GuardedBody, writer: FakeWriter, length: int | None) -> None:
    await body.write_with_length(cast(AbstractStreamWriter, writer), length)


BODY = bytes(range(256)) * 600  # 150 KiB: three slices and the last few bytes


async def test_a_fresh_attempt_writes_its_body_without_asking() -> None:
    asked = Asked(Fenced("g", [0]))
    writer = FakeWriter()
    await _write(GuardedBody(BODY, SendGuard(_now(), 2.5, asked)), writer, None)
    assert b"".join(writer.written) == BODY
    assert len(writer.written) == 4 and len(writer.written[-1]) == GuardedBody.LAST
    assert asked.times == 0


async def test_a_body_not_started_before_a_freeze_is_refused_whole() -> None:
    asked = Asked(Fenced("g", [1]))
    guard = SendGuard(_now() - FROZEN_S, 2.5, asked)
    writer = FakeWriter()
    with pytest.raises(Fenced):
        await _write(GuardedBody(BODY, guard), writer, None)
    assert writer.written == [] and asked.times == 1
    assert isinstance(guard.refused, Fenced)


async def test_a_freeze_in_mid_body_leaves_the_request_incomplete() -> None:
    guard = SendGuard(_now(), 2.5, Asked(ClaimLost("p1")))
    writer = FakeWriter()

    def freeze() -> None:
        if len(writer.written) == 1:
            guard.confirmed_at -= FROZEN_S
    writer.on_write.append(freeze)
    with pytest.raises(ClaimLost):
        await _write(GuardedBody(BODY, guard), writer, None)
    assert writer.written == [BODY[:GuardedBody.SLICE]]  # the vendor never gets the end


async def test_a_late_attempt_still_held_is_confirmed_once_and_sent() -> None:
    asked = Asked()
    guard = SendGuard(_now() - FROZEN_S, 2.5, asked)
    writer = FakeWriter()
    await _write(GuardedBody(BODY, guard), writer, None)
    assert b"".join(writer.written) == BODY
    assert asked.times == 1 and guard.confirmations == 1 and guard.refused is None


async def test_the_last_bytes_wait_for_the_ones_before_to_leave_the_process() -> None:
    guard = SendGuard(_now(), 2.5, Asked(Fenced("g", [2])))
    writer = FakeWriter()
    writer.transport.buffered = 4096  # a slow link: the socket has not taken it all

    def drained_after_a_freeze() -> None:
        guard.confirmed_at -= FROZEN_S  # frozen while the tail sat in our buffer
        writer.transport.buffered = 0

    def after_the_slices() -> None:
        if len(writer.written) == 3:  # every slice but the last is in
            asyncio.get_running_loop().call_later(0.02, drained_after_a_freeze)
    writer.on_write.append(after_the_slices)
    with pytest.raises(Fenced):
        await _write(GuardedBody(BODY, guard), writer, None)
    assert len(writer.written) == 3  # the last slice never went


async def test_a_body_cut_at_the_declared_length() -> None:
    writer = FakeWriter()
    await _write(GuardedBody(BODY, None), writer, 1000)
    assert b"".join(writer.written) == BODY[:1000]


# --- delivery ---------------------------------------------------------------------------


def _request() -> SendRequest:
    provider = ProviderRecord(provider_id="p1", name="p1", kind="commercial",
                              transport=Transport.HTTPS, endpoint="https://127.0.0.1:1/s",
                              updated_at=datetime(2026, 1, 1, tzinfo=UTC))
    return SendRequest(provider, build_payload(Transport.HTTPS, list(OutboundField),
                                               photo=b"i", agent_id="a", request_ref=REF),
                       "dsp-1", REF)


@dataclass
class FrozenBeforeWriting:
    """A transport whose process was stopped between the attempt's record and its write:
    it asks the guard, as the HTTPS body does, and counts what it put on the wire."""

    idempotent_resend: bool = True
    frozen: bool = True
    sent: list[SendRequest] = field(default_factory=list)
    guards: list[SendGuard | None] = field(default_factory=list)

    async def send(self, request: SendRequest) -> SendResult:
        self.guards.append(request.guard)
        if request.guard is not None:
            if self.frozen:
                request.guard.confirmed_at -= FROZEN_S
            try:
                await request.guard.ensure()
            except Exception as exc:  # as aiohttp wraps a body that failed to write
                raise ConnectionResetError("body not written") from exc
        self.sent.append(request)
        return SendResult()

    async def close(self) -> None:
        return None


def _guards() -> ProviderGuards:
    return ProviderGuards(concurrency=4, failure_threshold=10, open_s=1)


async def _counter() -> int:
    return 1


@pytest.mark.parametrize("refusal", [Fenced("frs-dispatch", [0]), ClaimLost("p1")])
async def test_a_woken_attempt_whose_lease_or_claim_moved_sends_nothing(
        refusal: Exception) -> None:
    transport = FrozenBeforeWriting()
    asked = Asked(refusal)
    guards = _guards()
    with pytest.raises(type(refusal)):
        await deliver(_request(), transport, guards, RetryPolicy(max_attempts=5),
                      record_attempt=_counter, still_active=lambda: True,
                      confirm_attempt=asked, sleep=no_sleep)
    assert transport.sent == [] and asked.times == 1
    assert len(transport.guards) == 1, "no retry after a refusal"
    guards.breaker("p1").acquire()  # the attempt gave its breaker slot back


async def test_a_woken_attempt_still_held_is_sent_after_one_confirmation() -> None:
    transport = FrozenBeforeWriting()
    asked = Asked()
    out = await deliver(_request(), transport, _guards(), RetryPolicy(),
                        record_attempt=_counter, still_active=lambda: True,
                        confirm_attempt=asked, sleep=no_sleep)
    assert isinstance(out, Delivered) and len(transport.sent) == 1 and asked.times == 1


async def test_a_prompt_attempt_asks_nothing() -> None:
    transport = FrozenBeforeWriting(frozen=False)
    asked = Asked(Fenced("g", [0]))
    out = await deliver(_request(), transport, _guards(), RetryPolicy(),
                        record_attempt=_counter, still_active=lambda: True,
                        confirm_attempt=asked, sleep=no_sleep)
    assert isinstance(out, Delivered) and asked.times == 0
    guard = transport.guards[0]
    assert guard is not None and guard.fresh_s == RetryPolicy().confirm_after_s


@dataclass
class TimesOutOnce:
    """The first attempt's timeout fires when the process wakes (its deadline passed while
    it was stopped), before the answer that had arrived is read."""

    idempotent_resend: bool = True
    sends: int = 0

    async def send(self, request: SendRequest) -> SendResult:
        self.sends += 1
        if self.sends == 1:
            raise TimeoutError
        return SendResult()

    async def close(self) -> None:
        return None


async def test_a_retry_after_a_wake_is_refused_by_its_record() -> None:
    """The retry's record is the fenced write: refused there, the retry never starts."""
    records = 0

    async def record_attempt() -> int:
        nonlocal records
        records += 1
        if records > 1:
            raise Fenced("frs-dispatch", [0])
        return records

    transport = TimesOutOnce()
    with pytest.raises(Fenced):
        await deliver(replace(_request()), transport, _guards(), RetryPolicy(),
                      record_attempt=record_attempt, still_active=lambda: True,
                      sleep=no_sleep)
    assert transport.sends == 1 and records == 2


async def test_a_late_rekognition_search_is_refused_before_the_image_goes() -> None:
    from tests.unit.test_dispatch_rekognition import _setup

    _, stubber, transport, req = _setup("rekognition://eu-west-1/gallery-a")
    refused = replace(req, guard=SendGuard(_now() - FROZEN_S, 2.5, Asked(Fenced("g", [0]))))
    with stubber, pytest.raises(Fenced):
        await transport.send(refused)  # no stubbed response: a call would fail otherwise
    stubber.assert_no_pending_responses()
