"""Materialized views of the compacted registry topics (cases, agents, providers, provider
suspensions, trusted keys), fed by ``services.kit.follower``. ``versions`` are the offsets
applied so far: a decision records them so it can be reproduced. Handlers read it, so it
imports no Kafka client."""

from __future__ import annotations

from schemas.events import (
    AgentRecord,
    CaseRecord,
    ProviderRecord,
    ProviderSuspensionRequested,
    RegistryVersions,
    TrustedKey,
)

RegistryEntry = CaseRecord | AgentRecord | ProviderRecord | ProviderSuspensionRequested | TrustedKey


def effective_provider(record: ProviderRecord,
                       suspension: ProviderSuspensionRequested | None) -> ProviderRecord:
    """The entry as every service must see it: a suspension requested at or after the
    entry was written suspends it; a newer entry from the operator (``frs registry
    activate``) lifts it. Both times are on the records, so every view agrees."""
    if (suspension is not None and record.status == "active"
            and suspension.requested_at >= record.updated_at):
        return record.model_copy(update={"status": "suspended"})
    return record


class Registries:
    """In-memory registry state. Pure: fed records by ``RegistryFollower`` or by tests.

    ``providers`` is the effective view (suspensions applied); ``trusted_keys`` are the
    operator's enrolled public keys by key id."""

    def __init__(self) -> None:
        self.cases: dict[str, CaseRecord] = {}
        self.agents: dict[str, AgentRecord] = {}
        self.providers: dict[str, ProviderRecord] = {}
        self.suspensions: dict[str, ProviderSuspensionRequested] = {}
        self.trusted_keys: dict[str, TrustedKey] = {}
        self._provider_records: dict[str, ProviderRecord] = {}
        self._offsets = {"cases": -1, "agents": -1, "providers": -1, "suspensions": -1}

    def apply(self, record: RegistryEntry, offset: int = -1) -> None:
        if isinstance(record, CaseRecord):
            self.cases[record.case_id] = record
            self._offsets["cases"] = max(self._offsets["cases"], offset)
        elif isinstance(record, AgentRecord):
            self.agents[record.agent_id] = record
            self._offsets["agents"] = max(self._offsets["agents"], offset)
        elif isinstance(record, ProviderRecord):
            self._provider_records[record.provider_id] = record
            self._refresh(record.provider_id)
            self._offsets["providers"] = max(self._offsets["providers"], offset)
        elif isinstance(record, ProviderSuspensionRequested):
            self.suspensions[record.provider_id] = record
            self._refresh(record.provider_id)
            self._offsets["suspensions"] = max(self._offsets["suspensions"], offset)
        else:
            self.trusted_keys[record.key_id] = record

    def _refresh(self, provider_id: str) -> None:
        record = self._provider_records.get(provider_id)
        if record is not None:
            self.providers[provider_id] = effective_provider(
                record, self.suspensions.get(provider_id))

    @property
    def versions(self) -> RegistryVersions:
        return RegistryVersions(**self._offsets)
