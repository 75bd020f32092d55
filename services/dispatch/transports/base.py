"""The one interface every transport implements, and the errors that drive retries.

``send`` delivers one payload to one provider and either returns a ``SendResult`` or raises
``TransientError`` (worth retrying: 5xx, timeouts, throttling, connection errors) or
``PermanentError`` (retrying cannot help: 4xx, bad certificate, invalid image). It must be
safe to call again with the same ``SendRequest`` after an unknown outcome: each transport
says in its docstring how far that holds."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from schemas.events import ProviderRecord
from services.dispatch.payloads import Outbound


class TransportError(Exception):
    """``code`` is a short machine-readable cause; messages never quote payloads."""

    def __init__(self, code: str, detail: str = "") -> None:
        super().__init__(f"{code}: {detail}" if detail else code)
        self.code = code
        self.detail = detail


class TransientError(TransportError):
    pass


class PermanentError(TransportError):
    pass


class AmbiguousError(TransientError):
    """The payload may have reached the provider, but nothing confirmed it (the connection
    dropped during SMTP DATA): a resend may deliver a second copy."""


class SendGuard:
    """Whether an attempt may still hand its last bytes to the wire (issue 18).

    The attempt is recorded, under this instance's partition lease, before it starts
    (``record_attempt``); a process frozen after that (SIGSTOP, a paused VM) resumes with
    the request still to write, after another instance may have taken the partition and
    the send over. So a transport calls ``ensure`` right before the bytes that complete its
    request: within ``fresh_s`` of the last confirmation on the event loop's clock (which
    runs on while a process is frozen) it costs nothing; later, ``confirm`` asks the store
    again (lease and claim) and raises to refuse. A refusal is kept in ``refused``, so the
    delivery ends the attempt with it whatever the transport's client made of it."""

    def __init__(self, confirmed_at: float, fresh_s: float,
                 confirm: Callable[[], Awaitable[None]]) -> None:
        self.confirmed_at = confirmed_at  # loop time, taken before the confirming call
        self.fresh_s = fresh_s
        self._confirm = confirm
        self.refused: Exception | None = None
        self.confirmations = 0

    async def ensure(self) -> None:
        loop = asyncio.get_running_loop()
        while loop.time() - self.confirmed_at > self.fresh_s:
            asked = loop.time()  # the check happens after this, never before
            try:
                await self._confirm()
            except Exception as exc:
                self.refused = exc
                raise
            self.confirmations += 1
            self.confirmed_at = asked  # frozen during the call: the loop asks again


@dataclass(frozen=True)
class SendRequest:
    provider: ProviderRecord
    payload: Outbound
    dispatch_id: str  # stable per (probe, provider): the idempotency key on the wire
    request_ref: str
    # Set per attempt by the delivery; None: nothing to confirm (tests, tools).
    guard: SendGuard | None = None


@dataclass(frozen=True)
class SendResult:
    # A synchronous answer (Rekognition), handed to results as ProviderAnswered.
    answer: dict[str, Any] | None = None
    detail: dict[str, str] = field(default_factory=dict)


class ProviderTransport(Protocol):
    # Whether resending after an unknown outcome is guaranteed not to deliver twice.
    idempotent_resend: bool

    async def send(self, request: SendRequest) -> SendResult: ...

    async def close(self) -> None: ...
