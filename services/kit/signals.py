"""Signals a handler may raise to the processor loop. Handlers import this module, so it
imports no Kafka client."""

from __future__ import annotations


class NotYet(Exception):
    """The record is valid but cannot be handled yet: something it needs is unavailable
    for now (intake: the vault is down; dispatch, at stop: another live instance holds the
    claim). Retried without limit while the processor runs, never sent to the DLQ; at stop
    the batch is left uncommitted, so the next owner handles it again."""
