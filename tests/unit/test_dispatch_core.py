"""Dispatch core without I/O: payload schemas, breaker, retries, handlers, the SQLite
ledger's group commit (the ledger's states: tests/integration/stores/test_ledger_contract.py)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from pydantic import ValidationError

from schemas.events import (
    ClaimCheck,
    ClearedProvider,
    DispatchFailed,
    DispatchFailure,
    PolicyCleared,
    ProviderAnswered,
    ProviderDispatched,
    ProviderRecord,
    RegistryVersions,
)
from schemas.types import OutboundField, Transport
from services.dispatch import handlers
from services.dispatch.breaker import CircuitBreaker, CircuitState, ProviderGuards
from services.dispatch.delivery import Delivered, Failed, RetryPolicy, deliver
from services.dispatch.images import StaticImageSource
from services.dispatch.ledger import SqliteLedger
from services.dispatch.payloads import (
    HttpsPayload,
    PhotoNotCleared,
    RekognitionPayload,
    build_payload,
)
from services.dispatch.transports.base import (
    AmbiguousError,
    PermanentError,
    SendRequest,
    SendResult,
    TransientError,
)
from services.kit.registry import Registries
from tests.factories import inputs_for, signed, trusting_registries
from tests.unit.fakes import BrokenTransport, HangingTransport, ScriptedTransport, no_sleep

NOW = datetime(2026, 1, 1, tzinfo=UTC)
REF = "ref-" + "1" * 36


# --- payloads ---------------------------------------------------------------------------

def test_payload_admits_only_cleared_fields() -> None:
    p = build_payload(Transport.HTTPS, [OutboundField.PHOTO, OutboundField.REQUEST_REF],
                      photo=b"img", agent_id="agent-7", request_ref=REF)
    assert sorted(p.fields_sent()) == ["photo", "request_ref"]
    assert "agent_id" not in p.model_dump_json(exclude_unset=True)
    with pytest.raises(ValidationError):
        HttpsPayload(photo="aW1n", agent_id="a", request_ref=REF, case_id="C-1")  # type: ignore[call-arg]
    with pytest.raises(PhotoNotCleared):
        build_payload(Transport.HTTPS, [OutboundField.AGENT_ID], photo=b"i", agent_id="a",
                      request_ref=REF)
    r = build_payload(Transport.REKOGNITION, list(OutboundField), photo=b"img",
                      agent_id="agent-7", request_ref=REF)
    assert isinstance(r, RekognitionPayload) and r.fields_sent() == ["photo"]


# --- breaker ----------------------------------------------------------------------------

def test_breaker_opens_half_opens_and_closes() -> None:
    t = [0.0]
    changes: list[CircuitState] = []
    b = CircuitBreaker(failure_threshold=3, open_s=10, clock=lambda: t[0],
                       on_change=changes.append)
    for _ in range(3):
        b.acquire()
        b.failure()
    assert b.state is CircuitState.OPEN
    with pytest.raises(Exception, match="circuit open"):
        b.acquire()
    t[0] = 10.0
    assert b.state is CircuitState.HALF_OPEN
    b.acquire()
    with pytest.raises(Exception, match="circuit open"):
        b.acquire()  # one trial at a time
    b.failure()
    assert b.state is CircuitState.OPEN
    t[0] = 20.0
    b.acquire()
    b.success()
    assert b.state is CircuitState.CLOSED
    assert changes == [CircuitState.OPEN, CircuitState.HALF_OPEN, CircuitState.OPEN,
                       CircuitState.HALF_OPEN, CircuitState.CLOSED]


# --- delivery ---------------------------------------------------------------------------

def _provider(pid: str = "p1", transport: Transport = Transport.HTTPS,
              status: str = "active") -> ProviderRecord:
    return ProviderRecord(provider_id=pid, name=pid, kind="commercial", transport=transport,
                          endpoint="https://127.0.0.1:1/search", status=status,  # type: ignore[arg-type]
                          updated_at=NOW)


def _request() -> SendRequest:
    return SendRequest(_provider(), build_payload(Transport.HTTPS, list(OutboundField),
                                                  photo=b"i", agent_id="a", request_ref=REF),
                       "dsp-1", REF)


def _counter() -> Callable[[], Any]:
    n = [0]

    async def bump() -> int:
        n[0] += 1
        return n[0]
    return bump


async def test_retries_transient_then_succeeds() -> None:
    transport = ScriptedTransport([TransientError("http_503"), TransientError("timeout"), None])
    guards = ProviderGuards(concurrency=4, failure_threshold=10, open_s=1)
    out = await deliver(_request(), transport, guards, RetryPolicy(max_attempts=5),
                        record_attempt=_counter(), still_active=lambda: True, sleep=no_sleep)
    assert isinstance(out, Delivered) and out.attempts == 3


async def test_retries_exhausted_and_permanent() -> None:
    guards = ProviderGuards(concurrency=4, failure_threshold=10, open_s=1)
    out = await deliver(_request(), ScriptedTransport([TransientError("http_503")]), guards,
                        RetryPolicy(max_attempts=3), record_attempt=_counter(),
                        still_active=lambda: True, sleep=no_sleep)
    assert isinstance(out, Failed) and out.reason is DispatchFailure.RETRIES_EXHAUSTED
    assert out.attempts == 3 and "http_503" in out.detail
    out = await deliver(_request(), ScriptedTransport([PermanentError("http_400")]), guards,
                        RetryPolicy(max_attempts=3), record_attempt=_counter(),
                        still_active=lambda: True, sleep=no_sleep)
    assert isinstance(out, Failed) and out.reason is DispatchFailure.PERMANENT_ERROR
    assert out.attempts == 1


async def test_open_circuit_ends_in_circuit_open_and_suspension_stops_retries() -> None:
    guards = ProviderGuards(concurrency=4, failure_threshold=2, open_s=1000)
    transport = ScriptedTransport([TransientError("http_503")])
    out = await deliver(_request(), transport, guards, RetryPolicy(max_attempts=5),
                        record_attempt=_counter(), still_active=lambda: True, sleep=no_sleep)
    assert isinstance(out, Failed) and out.reason is DispatchFailure.CIRCUIT_OPEN
    assert transport.calls == 2
    active = iter([True, False])
    out = await deliver(_request(), ScriptedTransport([TransientError("x")]),
                        ProviderGuards(concurrency=1, failure_threshold=9, open_s=1),
                        RetryPolicy(max_attempts=5), record_attempt=_counter(),
                        still_active=lambda: next(active), sleep=no_sleep)
    assert isinstance(out, Failed) and out.reason is DispatchFailure.SUSPENDED


async def test_a_retry_never_sends_an_image_purged_meanwhile() -> None:
    # The first attempt hangs past its timeout; the purger destroys the image meanwhile:
    # the retry must not go out (chaos finding: dispatch_after_purge).
    transport = ScriptedTransport([TransientError("timeout"), None])
    windows = iter([30.0, 0.0])

    async def send_window() -> float:
        return next(windows)

    out = await deliver(_request(), transport,
                        ProviderGuards(concurrency=1, failure_threshold=9, open_s=1),
                        RetryPolicy(max_attempts=5), record_attempt=_counter(),
                        still_active=lambda: True, send_window=send_window,
                        sleep=no_sleep)
    assert isinstance(out, Failed) and out.reason is DispatchFailure.IMAGE_PURGED
    assert transport.calls == 1 and out.attempts == 1


async def test_an_image_that_expires_while_waiting_for_a_send_slot_is_not_sent() -> None:
    # Every slot is held (a hanging vendor); the image expires meanwhile: once a slot
    # frees, the check runs again and nothing goes out (chaos finding at 1,000 probes).
    guards = ProviderGuards(concurrency=1, failure_threshold=9, open_s=1)
    transport = ScriptedTransport([None])
    expired = asyncio.Event()

    async def send_window() -> float:
        return 0.0 if expired.is_set() else 30.0

    request = _request()
    slot = guards.limit(request.provider.provider_id)
    await slot.acquire()
    send = asyncio.create_task(deliver(
        request, transport, guards, RetryPolicy(max_attempts=3), record_attempt=_counter(),
        still_active=lambda: True, send_window=send_window, sleep=no_sleep))
    await asyncio.sleep(0.05)
    assert not send.done()
    expired.set()
    slot.release()
    out = await send
    assert isinstance(out, Failed) and out.reason is DispatchFailure.IMAGE_PURGED
    assert transport.calls == 0 and out.attempts == 0


def test_backoff_is_exponential_with_full_jitter() -> None:
    policy = RetryPolicy(base_delay_s=0.5, max_delay_s=3)
    assert [policy.delay(r, lambda: 1.0) for r in range(4)] == [0.5, 1.0, 2.0, 3.0]
    assert policy.delay(3, lambda: 0.25) == 0.75


# --- handlers ---------------------------------------------------------------------------

@dataclass
class Env:
    ledger: SqliteLedger
    registries: Registries = field(default_factory=trusting_registries)
    https: ScriptedTransport = field(default_factory=lambda: ScriptedTransport([None]))
    email: ScriptedTransport = field(
        default_factory=lambda: ScriptedTransport([None], idempotent_resend=False))

    def ports(self, **over: Any) -> handlers.DispatchPorts:
        answer = ScriptedTransport([None])

        class Rek:
            idempotent_resend = True

            async def send(self, request: SendRequest) -> SendResult:
                await answer.send(request)
                return SendResult(answer={"FaceMatches": []})

            async def close(self) -> None:
                return None
        base: dict[str, Any] = dict(
            registries=self.registries, ledger=self.ledger,
            images=StaticImageSource(b"jpeg-bytes", gone=frozenset({"vault:gone"})),
            transports={Transport.HTTPS: self.https, Transport.SMIME_EMAIL: self.email,
                        Transport.REKOGNITION: Rek()},
            guards=ProviderGuards(concurrency=8, failure_threshold=5, open_s=1),
            clock=lambda: NOW, retry=RetryPolicy(max_attempts=2),
            sleep=no_sleep)
        base.update(over)
        return handlers.DispatchPorts(**base)


def _cleared(*providers: tuple[str, Transport], probe: str = "prb-1",
             vault_ref: str = "vault:1", expires_at: datetime = NOW + timedelta(days=1),
             claim: bool = True) -> PolicyCleared:
    check = ClaimCheck(vault_ref=vault_ref, agent_id="agent-7", sanitized_sha256="a" * 64,
                       expires_at=expires_at)
    return signed(PolicyCleared(
        probe_id=probe, case_id="C-1",
        cleared=[ClearedProvider(provider_id=p, transport=t, fields=list(OutboundField))
                 for p, t in providers],
        policy_digest="0" * 64, registry_versions=RegistryVersions(), decided_at=NOW,
        inputs=inputs_for(*(p for p, _ in providers)), claim=check if claim else None))


@pytest.fixture
def env(tmp_path: Any) -> Any:
    e = Env(SqliteLedger(tmp_path / "l.db"))
    yield e
    e.ledger.close()


async def test_handler_sends_once_and_reemits_on_redelivery(env: Env) -> None:
    env.registries.apply(_provider("web"))
    env.registries.apply(_provider("aws", Transport.REKOGNITION))
    ports = env.ports()
    event = _cleared(("web", Transport.HTTPS), ("aws", Transport.REKOGNITION))
    first = await handlers.on_policy_cleared(event, ports)
    types = sorted(type(e).__name__ for e in first)
    assert types == ["ProviderAnswered", "ProviderDispatched", "ProviderDispatched"]
    sent = next(e for e in first if isinstance(e, ProviderDispatched) and e.provider_id == "web")
    assert sent.fields_sent == list(OutboundField) and sent.attempts == 1
    assert sent.payload_sha256 is not None and sent.claimed_at is not None
    answered = next(e for e in first if isinstance(e, ProviderAnswered))
    assert answered.channel == "rekognition"
    again = await handlers.on_policy_cleared(event, ports)
    assert again == first and env.https.calls == 1


async def test_handler_failures(env: Env) -> None:
    env.registries.apply(_provider("web"))
    env.registries.apply(_provider("off", status="suspended"))
    ports = env.ports()
    out = await handlers.on_policy_cleared(
        _cleared(("off", Transport.HTTPS), ("ghost", Transport.HTTPS)), ports)
    reasons = {e.provider_id: e.reason for e in out if isinstance(e, DispatchFailed)}
    assert reasons == {"off": DispatchFailure.SUSPENDED,
                       "ghost": DispatchFailure.UNKNOWN_PROVIDER}
    # Reactivating the provider later does not turn a recorded failure into a send.
    env.registries.apply(_provider("off"))
    await handlers.on_policy_cleared(_cleared(("off", Transport.HTTPS)), ports)
    assert env.https.calls == 0

    out = await handlers.on_policy_cleared(_cleared(("web", Transport.HTTPS), probe="prb-2",
                                                    vault_ref="vault:gone"), ports)
    assert [e.reason for e in out if isinstance(e, DispatchFailed)] == [
        DispatchFailure.IMAGE_PURGED]
    # Past its expiry by the claim check: never sent, whatever the vault still holds.
    out = await handlers.on_policy_cleared(_cleared(("web", Transport.HTTPS), probe="prb-3",
                                                    expires_at=NOW), ports)
    assert [e.reason for e in out if isinstance(e, DispatchFailed)] == [
        DispatchFailure.IMAGE_PURGED]
    # A clearance without a claim check (an older policy gate's) is refused, not guessed.
    out = await handlers.on_policy_cleared(_cleared(("web", Transport.HTTPS), probe="prb-4",
                                                    claim=False), ports)
    [refused] = [e for e in out if isinstance(e, DispatchFailed)]
    assert refused.reason is DispatchFailure.PERMANENT_ERROR and "claim check" in refused.detail
    assert env.https.calls == 0


async def test_unknown_outcome_resolution(env: Env) -> None:
    env.registries.apply(_provider("web"))
    env.registries.apply(_provider("mail", Transport.SMIME_EMAIL))
    ports = env.ports(unknown_outcome_email="fail")
    # A previous run claimed and attempted both sends, then crashed before recording.
    for pid in ("web", "mail"):
        await env.ledger.claim("prb-1", pid)
        await env.ledger.record_attempt("prb-1", pid)
    out = await handlers.on_policy_cleared(
        _cleared(("web", Transport.HTTPS), ("mail", Transport.SMIME_EMAIL)), ports)
    by = {e.provider_id: e for e in out}
    assert isinstance(by["web"], ProviderDispatched) and by["web"].attempts == 2
    assert isinstance(by["mail"], DispatchFailed)
    assert by["mail"].reason is DispatchFailure.OUTCOME_UNKNOWN
    assert (env.https.calls, env.email.calls) == (1, 0)


async def test_per_provider_concurrency_limit() -> None:
    import asyncio

    peak = [0, 0]

    class Slow:
        idempotent_resend = True

        async def send(self, request: SendRequest) -> SendResult:
            peak[0] += 1
            peak[1] = max(peak)
            await asyncio.sleep(0.01)
            peak[0] -= 1
            return SendResult()

        async def close(self) -> None:
            return None
    guards = ProviderGuards(concurrency=3, failure_threshold=5, open_s=1)
    outs = await asyncio.gather(*(
        deliver(_request(), Slow(), guards, RetryPolicy(), record_attempt=_counter(),
                still_active=lambda: True) for _ in range(12)))
    assert all(isinstance(o, Delivered) for o in outs)
    assert peak[1] == 3


async def test_another_live_owner_is_awaited_and_a_dead_one_taken_over(tmp_path: Any) -> None:
    import asyncio

    from schemas.types import utcnow

    path = tmp_path / "shared.db"
    a, b = SqliteLedger(path, owner="a"), SqliteLedger(path, owner="b")
    env = Env(b)
    env.registries.apply(_provider("web"))
    ports = env.ports(clock=utcnow, sleep=asyncio.sleep, claim_lease_s=0.6)
    failed = DispatchFailed(probe_id="prb-1", provider_id="web",
                            reason=DispatchFailure.PERMANENT_ERROR, detail="x", failed_at=NOW)
    try:
        await a.claim("prb-1", "web")
        await a.record_attempt("prb-1", "web")

        async def a_finishes() -> None:
            for _ in range(3):  # a is alive and says so
                await asyncio.sleep(0.25)
                assert await a.heartbeat() == 1
            await a.complete("prb-1", "web", [failed])
        later = utcnow() + timedelta(days=1)  # this test runs on the real clock
        out, _ = await asyncio.gather(
            handlers.on_policy_cleared(_cleared(("web", Transport.HTTPS), expires_at=later),
                                       ports), a_finishes())
        assert out == [failed] and env.https.calls == 0, "b waited for a's outcome"

        await a.claim("prb-2", "web")
        await a.record_attempt("prb-2", "web")  # ... and a dies here
        out = await handlers.on_policy_cleared(_cleared(("web", Transport.HTTPS),
                                                        probe="prb-2", expires_at=later), ports)
        assert isinstance(out[0], ProviderDispatched) and out[0].attempts == 2
        assert env.https.calls == 1, "b took the stale claim over and resent once"
    finally:
        a.close()
        b.close()


async def test_ledger_group_commit_is_durable_per_write(tmp_path: Any) -> None:
    import asyncio

    path = tmp_path / "group.db"
    ledger = SqliteLedger(path)
    claims = await asyncio.gather(*(ledger.claim(f"prb-{i}", "p1") for i in range(200)))
    assert {c.state for c in claims} == {"new"}
    assert ledger.transactions < 200, "concurrent writes shared fsyncs"

    def boom() -> None:
        raise ValueError("bad write")
    results = await asyncio.gather(ledger._write(boom), ledger.record_attempt("prb-1", "p1"),
                                   return_exceptions=True)
    assert isinstance(results[0], ValueError) and results[1] == 1
    ledger.close()
    reopened = SqliteLedger(path)
    assert await reopened.counts() == {"claimed": 200}
    assert (await reopened.claim("prb-1", "p1")).attempts == 1
    reopened.close()


async def test_email_unknown_outcome_resends_by_default_and_purge_blocks_sends(env: Env) -> None:
    env.registries.apply(_provider("mail", Transport.SMIME_EMAIL))
    ports = env.ports()  # unknown_outcome_email="resend"
    await env.ledger.claim("prb-1", "mail")
    await env.ledger.record_attempt("prb-1", "mail")
    [sent] = await handlers.on_policy_cleared(_cleared(("mail", Transport.SMIME_EMAIL)), ports)
    assert isinstance(sent, ProviderDispatched) and sent.attempts == 2
    assert env.email.calls == 1

    # Purged in the vault (case closed): the vault is the one truth, the send fails.
    [failed] = await handlers.on_policy_cleared(
        _cleared(("mail", Transport.SMIME_EMAIL), probe="prb-2", vault_ref="vault:gone"),
        ports)
    assert isinstance(failed, DispatchFailed)
    assert failed.reason is DispatchFailure.IMAGE_PURGED and env.email.calls == 1


def test_settings_refuse_test_images_and_plain_smtp_outside_local_mode(tmp_path: Any) -> None:
    from services.dispatch.settings import DispatchSettings
    from tests.conftest import secured_bus

    image = tmp_path / "x.jpg"
    image.write_bytes(b"x")
    # Outside local mode the bus itself must be secured (services/kit/kafka.py).
    base = {"local_mode": False, **secured_bus(tmp_path)}
    with pytest.raises(ValidationError, match="IMAGE_SOURCE"):
        DispatchSettings(**base, image_source="test-file", test_image_file=image,
                         smtp_starttls=True)
    with pytest.raises(ValidationError, match="STARTTLS"):
        DispatchSettings(**base)
    assert DispatchSettings(**base, smtp_starttls=True).image_source == "vault"


async def test_vault_image_source_stays_on_the_vault_thread() -> None:
    import sqlite3

    from services.dispatch.images import ImageGone, VaultImageSource

    class Purged(Exception):
        pass

    class ThreadBoundVault:
        """Like the intake vault: a default sqlite3 connection refuses other threads."""

        def __init__(self) -> None:
            self.db = sqlite3.connect(":memory:")
            self.db.execute("CREATE TABLE o (ref TEXT PRIMARY KEY, data BLOB)")
            self.db.execute("INSERT INTO o VALUES ('vault:1', x'ffd8')")

        def get(self, ref: str) -> bytes:
            row = self.db.execute("SELECT data FROM o WHERE ref = ?", (ref,)).fetchone()
            if row is None:
                raise Purged(ref)
            return bytes(row[0])

    holder: list[ThreadBoundVault] = []

    def opener() -> ThreadBoundVault:
        holder.append(ThreadBoundVault())
        return holder[0]
    def closer() -> None:
        holder[0].db.close()  # raises ProgrammingError if called from another thread
    source = VaultImageSource(opener, (Purged,), closer)
    assert await source.get("vault:1") == b"\xff\xd8"
    with pytest.raises(ImageGone):
        await source.get("vault:2")
    source.close()


async def test_a_failing_handler_stops_heartbeating_its_claim(env: Env) -> None:
    env.registries.apply(_provider("web"))

    class Broken:
        async def get(self, vault_ref: str) -> bytes:
            raise OSError("vault unreachable")
    ports = env.ports(images=Broken())
    with pytest.raises(OSError):
        await handlers.on_policy_cleared(_cleared(("web", Transport.HTTPS)), ports)
    assert await env.ledger.heartbeat() == 0
    assert (await env.ledger.claim("prb-1", "web")).state == "unknown"
    assert await env.ledger.heartbeat() == 1, "working on its own claim again: vouch for it"


# --- review findings: sibling failures, the breaker's trial, takeover fencing ------------

async def test_a_failing_provider_waits_for_its_siblings_so_a_retry_never_resends(
    env: Env,
) -> None:
    env.registries.apply(_provider("mail", Transport.SMIME_EMAIL))
    env.registries.apply(_provider("web"))
    slow = HangingTransport()
    ports = env.ports(transports={Transport.SMIME_EMAIL: slow,
                                  Transport.HTTPS: BrokenTransport()},
                      retry=RetryPolicy(max_attempts=1), sleep=asyncio.sleep)
    event = _cleared(("mail", Transport.SMIME_EMAIL), ("web", Transport.HTTPS),
                     ("mail", Transport.SMIME_EMAIL))  # named twice: still one send
    first = asyncio.create_task(handlers.on_policy_cleared(event, ports))
    await asyncio.sleep(0.2)
    assert not first.done(), "the web failure must not return while mail is in flight"
    slow.release.set()
    with pytest.raises(UnicodeDecodeError):
        await first
    # The kit's retry finds mail done (re-emitted, not resent) and tries web again.
    with pytest.raises(UnicodeDecodeError):
        await handlers.on_policy_cleared(event, ports)
    assert slow.calls == 1
    assert (await env.ledger.claim("prb-1", "mail")).state == "done"


async def test_an_unexpected_error_gives_the_half_open_trial_back() -> None:
    now = [0.0]
    guards = ProviderGuards(concurrency=4, failure_threshold=1, open_s=1,
                            clock=lambda: now[0])
    breaker = guards.breaker("p1")
    breaker.acquire()
    breaker.failure()
    now[0] = 5.0  # open period over: the next call is the half-open trial

    async def attempt() -> int:
        return 1
    with pytest.raises(UnicodeDecodeError):
        await deliver(_request(), BrokenTransport(), guards, RetryPolicy(max_attempts=1),
                      record_attempt=attempt, still_active=lambda: True, sleep=no_sleep)
    breaker.acquire()  # raised CircuitOpen forever when the trial was never given back


async def test_a_claim_taken_over_mid_send_keeps_only_the_new_owners_outcome(
    tmp_path: Any,
) -> None:
    path = tmp_path / "shared.db"
    a, b = SqliteLedger(path, owner="a"), SqliteLedger(path, owner="b")
    env = Env(a)
    env.registries.apply(_provider("mail", Transport.SMIME_EMAIL))
    slow = HangingTransport()
    ports = env.ports(transports={Transport.SMIME_EMAIL: slow}, sleep=asyncio.sleep)
    try:
        sending = asyncio.create_task(handlers.on_policy_cleared(
            _cleared(("mail", Transport.SMIME_EMAIL)), ports))
        await asyncio.wait_for(slow.started.wait(), 5)
        # a's heartbeat stopped long enough: b takes the claim over and finishes it.
        seen = await b.claim("prb-1", "mail")
        assert await b.take_over("prb-1", "mail", seen)
        failed = DispatchFailed(probe_id="prb-1", provider_id="mail",
                                reason=DispatchFailure.RETRIES_EXHAUSTED, detail="b",
                                failed_at=NOW)
        assert await b.complete("prb-1", "mail", [failed])
        slow.release.set()
        # a's late outcome is not recorded, and a emits the one on record instead.
        assert await sending == [failed]
        assert (await a.claim("prb-1", "mail")).outcome == [failed]
    finally:
        a.close()
        b.close()


async def test_an_attempt_is_cut_off_before_its_image_expires() -> None:
    # The vendor hangs and the image has 0.2 s left: the attempt is cancelled inside that
    # window (not after the 30 s attempt timeout), and no retry goes out after it.
    windows = iter([0.2, 0.0])

    async def send_window() -> float:
        return next(windows)
    hanging = HangingTransport()
    started = asyncio.get_running_loop().time()
    out = await deliver(_request(), hanging,
                        ProviderGuards(concurrency=1, failure_threshold=9, open_s=1),
                        RetryPolicy(max_attempts=5, attempt_timeout_s=30),
                        record_attempt=_counter(), still_active=lambda: True,
                        send_window=send_window, sleep=no_sleep)
    assert asyncio.get_running_loop().time() - started < 5
    assert isinstance(out, Failed) and out.reason is DispatchFailure.IMAGE_PURGED
    assert hanging.calls == 1


@pytest.mark.parametrize("resend", [True, False])
async def test_a_mail_that_may_have_arrived_is_resent_only_when_allowed(resend: bool) -> None:
    async def twice(first: Exception) -> tuple[Delivered | Failed, int]:
        transport = ScriptedTransport([first, None], idempotent_resend=False)
        out = await deliver(_request(), transport,
                            ProviderGuards(concurrency=1, failure_threshold=9, open_s=1),
                            RetryPolicy(max_attempts=3, resend_ambiguous=resend),
                            record_attempt=_counter(), still_active=lambda: True,
                            sleep=no_sleep)
        return out, transport.calls

    out, calls = await twice(AmbiguousError("smtp_data_unconfirmed"))
    if resend:
        assert isinstance(out, Delivered) and calls == 2
    else:
        assert isinstance(out, Failed) and out.reason is DispatchFailure.OUTCOME_UNKNOWN
        assert calls == 1
    # A failure before DATA (nothing can have arrived) is retried in both modes.
    out, calls = await twice(TransientError("smtp_connection"))
    assert isinstance(out, Delivered) and calls == 2
