"""Tier 2 of a viewer's memory on a real Letta server: that viewer's agent's own archival passages.

The memory gate (tools/memory_gate.py) is the only caller; what moves and when is decided by the
pure policy of tools/memory_tiers.py. Every call names the agent whose token the gate checked.

Why passages cannot cross viewers (Letta 0.16.8, read in .letta-server/letta-0.16.8):
- a passage belongs to an archive (`archival_passages.archive_id`); an agent reaches archives only
  through `archives_agents`. Search (`GET /v1/agents/{id}/archival-memory/search`,
  AgentManager.search_agent_archival_memory_async -> query_agent_passages_async ->
  build_agent_passage_query) and listing (`GET /v1/agents/{id}/archival-memory`) join
  `archives_agents` and keep only rows `WHERE archives_agents.agent_id = <that agent>`;
- an agent's first passage creates its own default archive, attached to it alone
  (ArchiveManager.get_or_create_default_archive_for_agent_async).
So one viewer could see another's passages only if one archive were attached to both agents.
We never attach an archive to an agent, and `_check_own_archive` refuses to search an agent
whose archive has any other agent attached (checked once per agent per ARCHIVE_CHECK_TTL_S).
- `DELETE /v1/agents/{id}/archival-memory/{passage}` does NOT check that the passage is the
  agent's (SyncServer.delete_archival_memory_async takes only the passage id): `delete` is only
  ever given ids this class listed from the same agent.
- Search applies its tag filter after its LIMIT, so we do not filter by tag server-side: we ask
  for more than we show and keep our own fact passages.
"""

from __future__ import annotations

import threading
import time
from typing import Any, Protocol

from tools.letta_store import letta_call
from tools.memory_tiers import FACT_TAG, StoredFact, category_of_tags, is_fact_passage, is_tier_passage, passage_tags

ARCHIVE_CHECK_TTL_S = 300.0
FIND_LIMIT = 50  # passages containing a forget/remember text; more than any real overlap
SEARCH_OVERFETCH = 3  # search top_k * this, then our own tag filter (Letta filters after its limit)


class FactTier(Protocol):
    def add(self, agent_id: str, category: str, text: str, kind: str = FACT_TAG) -> None:
        """Store one fact (or, kind=EPISODE_TAG, one episode) as a passage of the agent."""

    def find(self, agent_id: str, text: str) -> list[StoredFact]:
        """The agent's fact passages whose text contains text (case-insensitive)."""

    def search(self, agent_id: str, query: str, top_k: int) -> list[StoredFact]:
        """The agent's fact and episode passages closest in meaning to query, best first."""

    def delete(self, agent_id: str, passage_id: str) -> None:
        """Delete one passage that find/search returned for this agent."""


class TierUnsafe(Exception):
    """The agent's archive is not its own: searching it could show another viewer's facts."""


class LettaFactTier:
    """Tier 2 on Letta 0.16.8 through letta-client 1.12.1."""

    def __init__(self, client: Any):
        self._client = client
        self._checked: dict[str, float] = {}
        self._guard = threading.Lock()

    def add(self, agent_id: str, category: str, text: str, kind: str = FACT_TAG) -> None:
        with letta_call():
            self._client.agents.passages.create(agent_id, text=text, tags=passage_tags(category, kind))

    def find(self, agent_id: str, text: str) -> list[StoredFact]:
        with letta_call():
            passages = self._client.agents.passages.list(agent_id, search=text, limit=FIND_LIMIT)
        return [_stored(p.id, p.text, p.tags, p.created_at) for p in passages if is_fact_passage(p.tags)]

    def search(self, agent_id: str, query: str, top_k: int) -> list[StoredFact]:
        self._check_own_archive(agent_id)
        with letta_call():
            answer = self._client.agents.passages.search(agent_id, query=query, top_k=top_k * SEARCH_OVERFETCH)
        found = [_stored(r.id, r.content, r.tags, r.timestamp) for r in answer.results if is_tier_passage(r.tags)]
        return found[:top_k]

    def delete(self, agent_id: str, passage_id: str) -> None:
        with letta_call():
            self._client.agents.passages.delete(passage_id, agent_id=agent_id)

    def _check_own_archive(self, agent_id: str) -> None:
        with self._guard:
            if time.monotonic() - self._checked.get(agent_id, -ARCHIVE_CHECK_TTL_S) < ARCHIVE_CHECK_TTL_S:
                return
        with letta_call():
            archives = [a.id for a in self._client.archives.list(agent_id=agent_id)]
            for archive_id in archives:
                # No SDK method for GET /v1/archives/{id}/agents in letta-client 1.12.1.
                agents = self._client.get(f"/v1/archives/{archive_id}/agents", cast_to=object)
                others = [a.get("id") for a in agents or [] if isinstance(a, dict) and a.get("id") != agent_id]
                if others:
                    raise TierUnsafe(f"archive {archive_id} of agent {agent_id} is shared with "
                                     f"{len(others)} other agent(s)")
        if len(archives) > 1:
            raise TierUnsafe(f"agent {agent_id} has {len(archives)} archives")
        with self._guard:
            self._checked[agent_id] = time.monotonic()


def _stored(passage_id: Any, text: Any, tags: Any, when: Any) -> StoredFact:
    stamp = when.isoformat() if hasattr(when, "isoformat") else str(when or "")
    return StoredFact(str(passage_id), category_of_tags(tags), str(text or ""), stamp)
