"""Materialized views of the compacted registry topics (cases, agents, providers), fed by
``services.kit.follower``. ``versions`` are the offsets applied so far: a decision
records them so it can be reproduced. Handlers read it, so it imports no Kafka client."""

from __future__ import annotations

from schemas.events import AgentRecord, CaseRecord, ProviderRecord, RegistryVersions


class Registries:
    """In-memory registry state. Pure: fed records by ``RegistryFollower`` or by tests."""

    def __init__(self) -> None:
        self.cases: dict[str, CaseRecord] = {}
        self.agents: dict[str, AgentRecord] = {}
        self.providers: dict[str, ProviderRecord] = {}
        self._offsets = {"cases": -1, "agents": -1, "providers": -1}

    def apply(self, record: CaseRecord | AgentRecord | ProviderRecord, offset: int = -1) -> None:
        if isinstance(record, CaseRecord):
            self.cases[record.case_id] = record
            self._offsets["cases"] = max(self._offsets["cases"], offset)
        elif isinstance(record, AgentRecord):
            self.agents[record.agent_id] = record
            self._offsets["agents"] = max(self._offsets["agents"], offset)
        else:
            self.providers[record.provider_id] = record
            self._offsets["providers"] = max(self._offsets["providers"], offset)

    @property
    def versions(self) -> RegistryVersions:
        return RegistryVersions(**self._offsets)
