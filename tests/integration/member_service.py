"""A minimal service on the kit alone, for ownership tests of the kit itself: one route
over MEMBER_TOPICS (comma-separated) in group MEMBER_GROUP, whose handler takes every
event; the kit logs each assignment ("partitions assigned") and the start check."""

from __future__ import annotations

import os
from typing import Any

from schemas.envelope import Envelope
from schemas.events import DispatchFailed, Event
from services.kit.app import ServiceApp, Wiring
from services.kit.routing import Route
from services.kit.runtime import main
from services.kit.settings import ServiceSettings


class MemberSettings(ServiceSettings):
    service: str = "member"


async def take(_event: Any, _envelope: Envelope) -> list[Event]:
    return []


def build(settings: MemberSettings) -> ServiceApp:
    route = Route("member", os.environ["MEMBER_GROUP"],
                  tuple(os.environ["MEMBER_TOPICS"].split(",")), {DispatchFailed: take},
                  "frs.test.member.dlq")
    return ServiceApp(settings, lambda _ctx: Wiring(routes=[route]),
                      follows_registries=False)


if __name__ == "__main__":
    main(build(MemberSettings()))
