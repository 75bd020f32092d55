"""Inbound limits of the results channels, without servers: what the webhook checks from the
headers before a byte of body, the JSON a channel will carry, the connection cap's choice
of whom to close, the mail replay store, and the header block a mail is first judged by."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import psycopg
import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request

from services.results.mailbox import _head
from services.results.store import NonceStore
from services.results.webhook import (
    ANSWERS_PATH,
    BadJson,
    ConnectionCap,
    Refused,
    Webhook,
    parse_json_object,
    sign,
)

SECRET = b"s" * 32


@pytest.mark.parametrize(("body", "reason"), [
    (b"[" * 100_000 + b"]" * 100_000, "json_too_deep"),  # would exhaust the C scanner
    (b'{"a": ' + b"[" * 16 + b"]" * 16 + b"}", "json_too_deep"),  # 17 deep, cap 16
    (b'{"a": "\\ud800"}', "lone_surrogate"),
    (b'{"\\udfff": 1}', "lone_surrogate"),
    (b'{"a": ["ok", {"b": "\\udc80x"}]}', "lone_surrogate"),
    (b"\xff\xfe{", "not_json"),
    (b"1" * 5000, "not_json"),  # past Python's int digit limit
    (b'["an", "array"]', "bad_body"),
])
def test_json_a_channel_will_not_carry(body: bytes, reason: str) -> None:
    with pytest.raises(BadJson) as refused:
        parse_json_object(body, max_depth=16)
    assert refused.value.reason == reason


def test_json_within_limits_is_taken() -> None:
    text = '{"a": ' + "[" * 15 + "]" * 15 + ', "pair": "\\ud83d\\ude00", "n": 1}'
    assert parse_json_object(text.encode(), max_depth=16)["pair"] == "\U0001F600"


@dataclass
class Seen:
    digests: set[str] = field(default_factory=set)

    async def seen(self, digest: str, now: float, keep_s: float) -> bool:
        return digest in self.digests


def webhook(seen: Seen | None = None) -> Webhook:
    return Webhook(secrets={"p1": SECRET}, nonces=cast(NonceStore, seen or Seen()),
                   refs=cast(Any, None), publisher=cast(Any, None), registries=cast(Any, None),
                   window_s=60, max_body=1024)


def headers(body: bytes = b"{}", **override: str) -> dict[str, str]:
    ts = str(int(time.time()))
    out = {"X-FRS-Provider": "p1", "X-FRS-Timestamp": ts,
           "X-FRS-Signature": sign(SECRET, "p1", ts, ANSWERS_PATH, body),
           "Content-Length": str(len(body))}
    out.update(override)
    return out


@pytest.mark.parametrize(("override", "status", "outcome"), [
    ({"X-FRS-Signature": ""}, 401, "unsigned"),
    ({"X-FRS-Provider": "nobody"}, 401, "unknown_provider"),
    ({"X-FRS-Timestamp": "12x"}, 400, "malformed_timestamp"),
    ({"X-FRS-Timestamp": "\u0661\u0662"}, 400, "malformed_timestamp"),  # digits, not ASCII
    ({"X-FRS-Timestamp": "1"}, 401, "stale"),
    ({"X-FRS-Signature": "sha256=" + "\u00e9" * 64}, 400, "malformed_signature"),
    ({"X-FRS-Signature": "sha256=" + "A" * 64}, 400, "malformed_signature"),
    ({"Content-Length": "99999999999"}, 413, "too_large"),
])
async def test_refused_from_headers_alone(override: dict[str, str], status: int,
                                          outcome: str) -> None:
    request = make_mocked_request("POST", ANSWERS_PATH, headers=headers(**override))
    with pytest.raises(Refused) as refused:
        await webhook().check_headers(request)
    assert (refused.value.status, refused.value.outcome) == (status, outcome)


async def test_a_replay_is_refused_before_its_body_and_a_forgery_after() -> None:
    hdrs = headers(b'{"x": 1}')
    request = make_mocked_request("POST", ANSWERS_PATH, headers=hdrs)
    hook = webhook()
    caller = await hook.check_headers(request)
    hook.verify(caller, ANSWERS_PATH, b'{"x": 1}')  # the MAC needs the body: checked after
    with pytest.raises(Refused) as forged:
        hook.verify(caller, ANSWERS_PATH, b'{"x": 2}')
    assert forged.value.outcome == "bad_signature"
    with pytest.raises(Refused) as replayed:
        await webhook(Seen({caller.digest})).check_headers(request)
    assert (replayed.value.status, replayed.value.outcome) == (409, "replayed")


class StateDown:
    async def seen(self, digest: str, now: float, keep_s: float) -> bool:
        raise psycopg.OperationalError("the database system is shutting down")


async def test_a_store_that_does_not_answer_is_a_503_to_retry_not_a_500() -> None:
    request = make_mocked_request("POST", ANSWERS_PATH, headers=headers())
    response = await webhook(cast(Seen, StateDown())).handle(request)
    assert response.status == 503 and response.text == '{"error": "unavailable"}'


@dataclass(eq=False)
class FakeConnection:
    closed: bool = False

    def force_close(self) -> None:
        self.closed = True


@dataclass
class FakeRequest:
    protocol: FakeConnection


@dataclass
class FakeServer:
    connections: list[FakeConnection] = field(default_factory=list)

    def __call__(self) -> FakeConnection:
        return FakeConnection()


async def test_the_cap_closes_the_oldest_idle_connection_then_refuses_when_all_are_busy(
) -> None:
    server = FakeServer([FakeConnection() for _ in range(3)])
    cap = ConnectionCap(3)
    cap.server = cast(web.Server, server)
    oldest, middle, newest = server.connections
    # A request in progress on the oldest: the middle one (idle, oldest of the idle) goes.
    request = cast(web.Request, FakeRequest(oldest))

    async def handler(_request: web.Request) -> web.StreamResponse:
        assert isinstance(cap(), FakeConnection)
        assert middle.closed and not oldest.closed and not newest.closed
        # Closed but not gone yet: not counted, and not closed twice.
        server.connections.append(FakeConnection())
        assert isinstance(cap(), FakeConnection) and newest.closed
        server.connections.append(FakeConnection())
        # Every live connection busy now: a new one is refused.
        cap._busy.update(c for c in server.connections if not c.closed)
        assert not isinstance(cap(), FakeConnection)
        return web.Response()

    await cap.mark_busy(request, handler)
    assert oldest not in cap._busy  # its request is over


async def test_mail_replays_are_kept_apart_from_webhook_nonces(tmp_path: Path) -> None:
    path = tmp_path / "nonces.sqlite3"
    nonces, mails = NonceStore(path), NonceStore(path, table="mail_replies")
    assert await mails.claim("sha256:abc", now=1000.0, keep_s=86400)
    assert not await mails.claim("sha256:abc", now=1001.0, keep_s=86400)
    assert await mails.seen("sha256:abc", now=2000.0, keep_s=86400)
    # A webhook claim prunes its own table only.
    assert await nonces.claim("d1", now=100_000.0, keep_s=600)
    assert await mails.seen("sha256:abc", now=2000.0, keep_s=86400)
    await mails.release("sha256:abc")
    assert not await mails.seen("sha256:abc", now=2000.0, keep_s=86400)
    nonces.close()
    mails.close()
    reopened = NonceStore(path, table="mail_replies")
    assert await reopened.claim("mid:1", now=5.0, keep_s=10)
    reopened.close()
    assert await NonceStore(path, table="mail_replies").seen("mid:1", now=6.0, keep_s=10)
    with pytest.raises(ValueError, match="table"):
        NonceStore(path, table="x; DROP TABLE nonces")


def test_a_mail_is_first_judged_by_its_header_block_alone() -> None:
    body = b"x\r\n" * 1000
    assert _head(b"From: <a@b>\r\nTo: <c@d>\r\n\r\n" + body) == b"From: <a@b>\r\nTo: <c@d>\r\n\r\n"
    assert _head(b"From: <a@b>\n\n" + body) == b"From: <a@b>\n\n"
    assert _head(b"\r\n" + body) == b""
