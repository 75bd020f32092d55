"""Which topic feeds which handler: a Route, and ``bind`` for plain handlers of one event
type and their ports. Imports no Kafka client: handlers and apps declare, the kit runs."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from schemas.catalog import dlq_topic
from schemas.envelope import DecodeError, Envelope, Headers
from schemas.events import Event

if TYPE_CHECKING:
    from services.kit.fencing import Leases

Handler = Callable[[Any, Envelope], Awaitable[Sequence[Event]]]
InvalidHandler = Callable[["RawRecord", DecodeError], Awaitable[Sequence[Event]]]
# Sees every record, decodable or not (the audit log records everything, DLQs included).
RecordHandler = Callable[["RawRecord", "Envelope | DecodeError"], Awaitable[Sequence[Event]]]
BatchHook = Callable[[], Awaitable[None]]
# Called with the partition numbers (of every input topic) just assigned to this instance.
AssignHook = Callable[[Sequence[int]], Awaitable[None]]
E = TypeVar("E", bound=Event)
P = TypeVar("P")

# Consumer groups a former version ran and this one does not, each with the group that took
# its work over (``Route.offsets_from``). Their committed offsets stay until the broker
# expires them: ``frs status`` shows such a group as retired, not as partitions without an
# owner, and as a fault while an instance of the former version is still in it.
RETIRED_GROUPS: Mapping[str, str] = {
    "frs-results": "frs-results-tracker",  # the results normalizer, until issue 21
}

def bind(event_type: type[E], handler: Callable[[E, P], Awaitable[Sequence[Event]]],
         ports: P) -> tuple[type[Event], Handler]:
    """A Route entry for a plain handler of one event type and its ports."""

    async def call(event: Any, _envelope: Envelope) -> Sequence[Event]:
        if not isinstance(event, event_type):  # the Route maps types to handlers: a bug
            raise TypeError(f"{handler.__name__} got {type(event).__name__}")
        return await handler(event, ports)

    return event_type, call


@dataclass(frozen=True)
class RawRecord:
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: Headers


@dataclass(frozen=True)
class Route:
    """Which topics feed which handlers, for one consumer group."""

    service: str
    group_id: str
    topics: tuple[str, ...]
    handlers: Mapping[type[Event], Handler]
    dlq_topic: str
    # Answers a record that is not an event this route takes (undecodable, or of another
    # type); without it those go to the DLQ and other types are ignored.
    on_invalid: InvalidHandler | None = None
    on_record: RecordHandler | None = None
    # Runs after a batch's handlers and before its commit: make local effects durable.
    before_commit: BatchHook | None = None
    # Registry topics are read from the start by every instance; event topics by group.
    auto_offset_reset: str = "earliest"
    consumer_options: dict[str, Any] = field(default_factory=dict)
    # Where the route's processor stands, for ports that must know (bound by the kit).
    progress: RouteProgress | None = None
    # What the DLQ keeps of a record's value (default: all of it).
    dlq_value: Callable[[bytes | None], bytes | None] | None = None
    # Which of the app's identities (ServiceApp.identities) consumes this route and
    # publishes its outputs and dead letters; None: the service's own.
    identity: str | None = None
    # Where the processor takes the lease of each partition it is assigned (the shared
    # store's, services/kit/fencing.py), so a stale owner's writes are refused. None: no
    # fencing (SQLite: one host, nothing to fence against).
    leases: Leases | None = None
    # Runs once a rebalance has given this instance partitions (and their leases), before
    # their records are handled: load that partition's state.
    on_assigned: AssignHook | None = None
    # Topic -> the group that read it before this route took it over (an upgrade that
    # merges routes): a partition this group has never committed starts where that group
    # last committed, so no record is handled twice and none is skipped.
    offsets_from: Mapping[str, str] = field(default_factory=dict)


class Feed(Protocol):
    """A running route (the kit's Processor), as ports may see it."""

    @property
    def stopping(self) -> bool: ...

    async def mark(self) -> object: ...

    async def reached(self, mark: object) -> bool: ...

    async def committed_past(self, mark: object) -> bool: ...


class RouteProgress:
    """Where a route's processor stands in its topics: stopping or not, and whether it
    has read up to a mark taken earlier. The app creates it with its ports; the kit binds
    it to the processor it starts for the route. Unbound, it reports nothing read."""

    def __init__(self) -> None:
        self._feed: Feed | None = None

    def bind(self, feed: Feed) -> None:
        self._feed = feed

    @property
    def stopping(self) -> bool:
        return self._feed is not None and self._feed.stopping

    async def mark(self) -> object:
        return None if self._feed is None else await self._feed.mark()

    async def reached(self, mark: object) -> bool:
        return self._feed is not None and await self._feed.reached(mark)

    async def committed_past(self, mark: object) -> bool:
        return self._feed is not None and await self._feed.committed_past(mark)


def dlq_for(service: str) -> str:
    """The service's dead-letter topic, from the catalog."""
    return dlq_topic(service).name
