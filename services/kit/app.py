"""What a service declares, the same in all four: its routes (topic → handler), its jobs
(time-driven work with a period), its servers (inbound HTTP or SMTP listeners) and the
checks that must pass before any of them runs. ``services/<name>/app.py`` returns a
``ServiceApp`` from ``build(settings)``; ``services.kit.runtime.run`` runs every one the
same way. Imports no Kafka client: an app declares, the kit runs."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass
from typing import TYPE_CHECKING

from services.kit.routing import Route

if TYPE_CHECKING:
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
    own resources (stores, clients, pools) after everything else has stopped."""

    publisher: Publisher
    registries: Registries
    stack: AsyncExitStack


@dataclass(frozen=True)
class ServiceApp:
    settings: ServiceSettings
    wire: Callable[[Context], Wiring]
    # Audit reads the registry topics as events, not as state: it needs no follower.
    follows_registries: bool = True
