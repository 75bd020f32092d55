"""The one interface every transport implements, and the errors that drive retries.

``send`` delivers one payload to one provider and either returns a ``SendResult`` or raises
``TransientError`` (worth retrying: 5xx, timeouts, throttling, connection errors) or
``PermanentError`` (retrying cannot help: 4xx, bad certificate, invalid image). It must be
safe to call again with the same ``SendRequest`` after an unknown outcome: each transport
says in its docstring how far that holds."""

from __future__ import annotations

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


@dataclass(frozen=True)
class SendRequest:
    provider: ProviderRecord
    payload: Outbound
    dispatch_id: str  # stable per (probe, provider): the idempotency key on the wire
    request_ref: str


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
