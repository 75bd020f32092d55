"""The audit sequencer's lease (services/audit/sequencer.py): one holder at a time, an
epoch bumped at each takeover, a standby taking an expired lease, a leader that stops
counting itself one at the local end of its lease, and a stale one that learns it lost.
The table is an in-memory stand-in with the SQL's semantics (tested on PostgreSQL in
tests/integration/stores/test_audit_sequencer.py)."""

from __future__ import annotations

from dataclasses import dataclass

from services.audit.sequencer import LEASE_TTL_S, RENEW_S, Lease, LeaseHolder
from services.cli.status import audit_leader


@dataclass
class Row:
    holder: str
    epoch: int
    expires_at: float


class FakeTable:
    """audit_sequencer_lease with the database's clock ``now``."""

    def __init__(self) -> None:
        self.now = 0.0
        self.row: Row | None = None
        self.calls = 0

    def acquire(self, holder: str, ttl_s: float) -> int | None:
        self.calls += 1
        if self.row is None:
            self.row = Row(holder, 1, self.now + ttl_s)
        elif self.row.expires_at < self.now:
            self.row = Row(holder, self.row.epoch + 1, self.now + ttl_s)
        else:
            return None
        return self.row.epoch

    def renew(self, holder: str, epoch: int, ttl_s: float) -> bool:
        self.calls += 1
        row = self.row
        if row is None or (row.holder, row.epoch) != (holder, epoch) \
                or row.expires_at < self.now:
            return False
        row.expires_at = self.now + ttl_s
        return True

    def release(self, holder: str, epoch: int) -> None:
        if self.row is not None and (self.row.holder, self.row.epoch) == (holder, epoch):
            self.row.expires_at = self.now - 1


def pair() -> tuple[FakeTable, Lease, Lease]:
    table = FakeTable()
    return (table, Lease(table, "frs-audit-a", LEASE_TTL_S, lambda: table.now),
            Lease(table, "frs-audit-b", LEASE_TTL_S, lambda: table.now))


def test_one_holder_at_a_time_and_renewals_keep_it() -> None:
    table, a, b = pair()
    assert a.keep() and a.epoch == 1
    assert not b.keep() and b.epoch is None
    for _ in range(20):  # renewed every RENEW_S, held well past one TTL
        table.now += RENEW_S
        assert a.keep() and not b.keep()
    assert a.epoch == 1 and table.row is not None and table.row.holder == "frs-audit-a"


def test_a_standby_takes_an_expired_lease_within_ttl_plus_one_renewal() -> None:
    table, a, b = pair()
    assert a.keep()
    died_at = table.now
    taken_at = None
    while taken_at is None:  # the standby tries every RENEW_S; the leader is dead
        table.now += RENEW_S
        if b.keep():
            taken_at = table.now
    assert b.epoch == 2
    assert taken_at - died_at <= LEASE_TTL_S + RENEW_S <= 15


def test_a_leader_stops_leading_at_its_local_lease_end_without_a_renewal() -> None:
    table, a, _ = pair()
    assert a.keep()
    table.now += LEASE_TTL_S - 0.1
    assert a.leading
    table.now += 0.2  # no renewal got through (the database unreachable, a stop)
    assert not a.leading


def test_a_stale_leader_learns_it_lost_and_does_not_take_it_back() -> None:
    table, a, b = pair()
    assert a.keep()
    table.now += LEASE_TTL_S + 1  # a is stopped (SIGSTOP) past its lease
    assert b.keep() and b.epoch == 2
    table.now += 0.5
    # a resumes: not leading (its own clock ran on too), and the renewal is refused.
    assert not a.leading
    assert not a.keep() and a.epoch is None
    assert table.row is not None and (table.row.holder, table.row.epoch) == ("frs-audit-b", 2)


def test_a_fenced_write_ends_leadership_and_a_release_hands_over_at_once() -> None:
    _, a, b = pair()
    assert a.keep()
    a.lost()  # what the app does when the store raises Fenced
    assert not a.leading
    a.epoch = 1  # as it was
    a.release()
    assert a.epoch is None
    assert b.keep() and b.epoch == 2  # no wait for the TTL


def test_status_names_the_lease_holder_and_its_epoch() -> None:
    live = audit_leader([], LeaseHolder("frs-audit-b", 4, "2026-12-04T17:00:00+00:00", True))
    assert live.leader == "frs-audit-b" and "epoch 4" in live.detail
    gone = audit_leader([], LeaseHolder("frs-audit-b", 4, "2026-12-04T17:00:00+00:00", False))
    assert gone.leader is None and "expired" in gone.detail and "frs-audit-b" in gone.detail
