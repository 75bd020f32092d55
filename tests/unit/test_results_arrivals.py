"""An inbound answer that came before its request ref waits for the tracker's commit of
the ref in this process, not a 10 ms poll; another instance's commit is still found."""

from __future__ import annotations

import asyncio
import time
from typing import Any, cast

from services.results.store import Arrivals, Nonces
from services.results.webhook import Webhook


class Refs:
    def __init__(self) -> None:
        self.known: dict[str, tuple[str, str]] = {}
        self.lookups = 0

    async def lookup(self, request_ref: str) -> tuple[str, str] | None:
        self.lookups += 1
        return self.known.get(request_ref)


def _webhook(refs: Refs, arrivals: Arrivals | None, hold_s: float = 2.0) -> Webhook:
    return Webhook(secrets={}, nonces=cast(Nonces, None), refs=refs,
                   publisher=cast(Any, None), registries=cast(Any, None), window_s=300,
                   unknown_hold_s=hold_s, arrivals=arrivals)


async def test_a_commit_in_this_process_wakes_the_wait_at_once() -> None:
    refs, arrivals = Refs(), Arrivals()
    hook = _webhook(refs, arrivals, hold_s=30.0)
    waiting = asyncio.create_task(hook._lookup("ref-1"))
    await asyncio.sleep(0.3)  # no commit: a few looks at most (backoff to 50 ms)
    assert refs.lookups <= 9
    refs.known["ref-1"] = ("prb-1", "p1")
    arrivals.written(["ref-1", "ref-2"])
    started = time.monotonic()
    arrivals.committed()
    assert await waiting == ("prb-1", "p1")
    assert time.monotonic() - started < 0.04
    assert not arrivals._waiting  # nothing left behind


async def test_another_instances_commit_is_found_by_looking_again() -> None:
    refs = Refs()
    hook = _webhook(refs, Arrivals())
    waiting = asyncio.create_task(hook._lookup("ref-9"))
    await asyncio.sleep(0.05)
    refs.known["ref-9"] = ("prb-9", "p1")  # committed elsewhere: no word here
    assert await asyncio.wait_for(waiting, 1.0) == ("prb-9", "p1")


async def test_an_unknown_ref_is_given_up_after_the_hold() -> None:
    refs = Refs()
    started = time.monotonic()
    assert await _webhook(refs, Arrivals(), hold_s=0.2)._lookup("nope") is None
    assert 0.19 < time.monotonic() - started < 1.0


async def test_a_cancelled_wait_leaves_no_waiter() -> None:
    arrivals = Arrivals()
    waiting = asyncio.create_task(_webhook(Refs(), arrivals, hold_s=30.0)._lookup("ref-3"))
    await asyncio.sleep(0.02)
    waiting.cancel()
    await asyncio.gather(waiting, return_exceptions=True)
    assert not arrivals._waiting
