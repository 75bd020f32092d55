"""SMTP provider inbox (aiosmtpd): stores every mail it receives, as received.

Mails are kept in memory and, with ``--maildir``, written one file per mail (they are
S/MIME envelopes, so nothing is in clear at rest). Knobs: latency per mail and a rate of
``451`` temporary refusals. ``copies(message_id)`` counts raw deliveries per Message-ID.

Run: ``python -m deploy.simulators.inbox --port 2525 --maildir .state/inbox`` prints one
JSON line with host and port, then serves until SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import email
import email.policy
import json
import random
import signal
import sys
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiosmtpd.controller import Controller


@dataclass(frozen=True)
class Mail:
    mail_from: str
    rcpt_tos: tuple[str, ...]
    message_id: str | None
    content: bytes


@dataclass
class InboxBehaviour:
    latency_s: float = 0.0
    temp_fail_rate: float = 0.0


@dataclass
class InboxState:
    mails: list[Mail] = field(default_factory=list)
    copies: Counter[str] = field(default_factory=Counter)
    refused: int = 0


class _Handler:
    def __init__(self, inbox: InboxSimulator) -> None:
        self.inbox = inbox

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        inbox = self.inbox
        b = inbox.behaviour
        if b.latency_s:
            await asyncio.sleep(b.latency_s)
        if inbox._rng.random() < b.temp_fail_rate:
            inbox.state.refused += 1
            return "451 4.3.0 try again later"
        content = bytes(envelope.original_content or envelope.content)
        parsed = email.message_from_bytes(content, policy=email.policy.default)
        message_id = str(parsed["Message-ID"]) if parsed["Message-ID"] else None
        mail = Mail(str(envelope.mail_from), tuple(envelope.rcpt_tos), message_id, content)
        inbox.state.mails.append(mail)
        inbox.state.copies[message_id or ""] += 1
        if inbox.maildir is not None:
            (inbox.maildir / f"{uuid.uuid4()}.eml").write_bytes(content)
        return "250 OK"


class InboxSimulator:
    def __init__(self, *, host: str = "127.0.0.1", port: int = 0,
                 maildir: Path | None = None, behaviour: InboxBehaviour | None = None,
                 seed: int | None = None) -> None:
        self.host = host
        self.port = port or _free_port()
        self.maildir = maildir
        if maildir is not None:
            maildir.mkdir(parents=True, exist_ok=True)
        self.behaviour = behaviour or InboxBehaviour()
        self.state = InboxState()
        self._rng = random.Random(seed)
        self._controller = Controller(_Handler(self), hostname=host, port=self.port,
                                      data_size_limit=64 * 1024 * 1024)

    def start(self) -> InboxSimulator:
        self._controller.start()
        return self

    def stop(self) -> None:
        self._controller.stop()

    def __enter__(self) -> InboxSimulator:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def copies(self, message_id: str) -> int:
        return self.state.copies[message_id]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def _main(args: argparse.Namespace) -> None:
    inbox = InboxSimulator(host=args.host, port=args.port, maildir=args.maildir,
                           behaviour=InboxBehaviour(args.latency, args.temp_fail_rate))
    inbox.start()
    sys.stdout.write(json.dumps({"host": inbox.host, "port": inbox.port}) + "\n")
    sys.stdout.flush()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    with contextlib.suppress(asyncio.CancelledError):
        await stop.wait()
    inbox.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m deploy.simulators.inbox",
                                     description="SMTP provider inbox simulator")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--maildir", type=Path, default=None)
    parser.add_argument("--latency", type=float, default=0.0)
    parser.add_argument("--temp-fail-rate", type=float, default=0.0)
    asyncio.run(_main(parser.parse_args()))
