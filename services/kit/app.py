"""What a service declares, the same in all four: its routes (topic → handler), its jobs
(time-driven work with a period), its servers (inbound HTTP or SMTP listeners) and the
checks that must pass before any of them runs. ``services/<name>/app.py`` returns a
``ServiceApp`` from ``build(settings)``; ``services.kit.runtime.run`` runs every one the
same way. Imports no Kafka client: an app declares, the kit runs."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from services.kit.routing import Route

if TYPE_CHECKING:
    from services.kit.kafka import KafkaSettings
    from services.kit.publisher import Publisher
    from services.kit.registry import Registries
    from services.kit.settings import ServiceSettings

Step = Callable[[], Awaitable[object]]


@dataclass(frozen=True)
class Job:
    """Time-driven work (purge sweep, deadline watch, review watch, checkpoint signer):
    ``tick`` runs every ``period_s`` for the life of the service, after ``ready`` (if
    given) has returned. A failed tick is logged and the next one comes on time."""

    name: str
    period_s: float
    tick: Step
    ready: Step | None = None


@dataclass(frozen=True)
class Server:
    """An inbound listener: ``start`` binds it (a failure to bind fails the service's
    start) and pushes its stop onto the stack it is given."""

    name: str
    start: Callable[[AsyncExitStack], Awaitable[None]]


@dataclass(frozen=True)
class Wiring:
    routes: Sequence[Route]
    jobs: Sequence[Job] = ()
    servers: Sequence[Server] = ()
    # Must succeed before any route, job or server runs (intake: the broker's clock).
    preflight: Sequence[Step] = ()


@dataclass(frozen=True)
class Context:
    """What the kit has started for the app before wiring it: the publisher, the
    registries (followed from their compacted topics), and the stack that closes the app's
    own resources (stores, clients, pools) after everything else has stopped.
    ``publishers`` holds one more publisher per identity the app declared."""

    publisher: Publisher
    registries: Registries
    stack: AsyncExitStack
    publishers: Mapping[str, Publisher] = field(default_factory=dict)

    def publisher_as(self, identity: str | None) -> Publisher:
        """The publisher of one of the app's identities (None: the service's own)."""
        return self.publisher if identity is None else self.publishers[identity]


@dataclass(frozen=True)
class ServiceApp:
    settings: ServiceSettings
    wire: Callable[[Context], Wiring]
    # Audit reads the registry topics as events, not as state: it needs no follower.
    follows_registries: bool = True
    # More principals this service acts as, by name (a route's ``identity``): each gets
    # its own publisher, and the consumers of the routes that name it connect as it.
    identities: Mapping[str, KafkaSettings] = field(default_factory=dict)
