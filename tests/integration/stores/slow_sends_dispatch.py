"""``python -m tests.integration.stores.slow_sends_dispatch``: the dispatch service with a
fault in it, for test_dispatch_zombie: every HTTPS request starts ``FRS_TEST_SEND_DELAY_S``
after its attempt was recorded. A process frozen mid-run is then most likely frozen there,
between the record made under its lease and the request, which is where CI caught a woken
zombie sending (issue 18): the wait stands for a slow commit answer or connect."""

from __future__ import annotations

import asyncio
import os

from services.dispatch.app import build
from services.dispatch.settings import DispatchSettings
from services.dispatch.transports.base import SendRequest, SendResult
from services.dispatch.transports.https import HttpsTransport
from services.kit.runtime import main

DELAY_S = float(os.environ.get("FRS_TEST_SEND_DELAY_S", "0.5"))
_send = HttpsTransport.send


async def _late_send(self: HttpsTransport, request: SendRequest) -> SendResult:
    await asyncio.sleep(DELAY_S)
    return await _send(self, request)


if __name__ == "__main__":
    HttpsTransport.send = _late_send  # type: ignore[method-assign]
    main(build(DispatchSettings()))
