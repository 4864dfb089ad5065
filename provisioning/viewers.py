"""One Letta agent per viewer: find it, create it from the template, list, export, forget.

Letta keeps names and tags non-unique and has no get-or-create, so creation is
serialised per viewer with a Redis lock (across threads, processes and bridge
replicas): under the lock we look in the viewer->agent map, then in Letta by the
viewer's tag, and only then create. The map (`vtl:viewer_agents`) never expires;
if Redis loses it, it is rebuilt from Letta, which remains the source of truth.
Only a definite 404 from Letta means "this agent is gone" — any other error is
raised, never taken as a reason to create a second agent.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import redis
from letta_client import Letta, NotFoundError

from agent_templates.persona import avatar_secrets
from agent_templates.render import render_human_block, render_system
from provisioning.blueprint import Blueprint, ProvisioningError, find_shared_block, load_blueprint
from provisioning.forget import ForgetReport, Forgetter
from provisioning.naming import PRODUCT_TAG, VIEWER_TAG, agent_name, viewer_tag, viewer_tags
from provisioning.tier_files import tier_path, write_tier_file
from provisioning.upgrade import FINGERPRINT_KEY, template_state
from tools.memory_client import GATE_TOKEN_ENV as MEMORY_TOKEN_ENV
from tools.memory_gate import memory_token
from vtuber_letta import redis_keys
from vtuber_letta.letta_api import letta_client
from vtuber_letta.private_files import write_private
from vtuber_letta.redis_api import bytes_client, redis_client
from vtuber_letta.settings import Settings
from vtuber_letta.viewer_ids import UNKNOWN_PLATFORM, check_viewer_id, platform_of

LOCK_TTL_S = 60  # longer than any agent creation; a crashed holder frees it by expiry
LOCK_WAIT_S = 120


@dataclass(frozen=True)
class ViewerAgent:
    viewer_id: str
    agent_id: str
    name: str
    created: bool = False


class ViewerAgents:
    def __init__(self, settings: Settings, *, client: Letta | None = None, redis_conn: redis.Redis | None = None,
                 blueprint: Blueprint | None = None):
        self.settings = settings
        self.client = client or letta_client(settings)
        self.redis = redis_conn or redis_client(settings)
        self._blueprint = blueprint
        self._create_kwargs: dict | None = None
        self._fingerprint = ""

    @property
    def blueprint(self) -> Blueprint:
        if self._blueprint is None:
            self._blueprint = load_blueprint(self.settings)
        return self._blueprint

    # ---------------- ensure ----------------
    def ensure(self, viewer_id: str, display_name: str | None = None, platform: str | None = None,
               *, verify: bool = False) -> ViewerAgent:
        """The viewer's agent, created from the template on first contact. Safe to call concurrently."""
        check_viewer_id(viewer_id)
        platform = platform_of(viewer_id, platform) or UNKNOWN_PLATFORM
        known = self._mapped(viewer_id, verify=verify)
        if known:
            return known
        with self.redis.lock(redis_keys.viewer_lock(viewer_id), timeout=LOCK_TTL_S, blocking_timeout=LOCK_WAIT_S):
            known = self._mapped(viewer_id, verify=True) or self._find_in_letta(viewer_id)
            if known:
                self.redis.hset(redis_keys.VIEWER_AGENTS, viewer_id, known.agent_id)
                return known
            agent = self._create(viewer_id, display_name, platform)
            self.redis.hset(redis_keys.VIEWER_AGENTS, viewer_id, agent.id)
            return ViewerAgent(viewer_id, agent.id, agent.name, created=True)

    def _mapped(self, viewer_id: str, *, verify: bool) -> ViewerAgent | None:
        agent_id = self.redis.hget(redis_keys.VIEWER_AGENTS, viewer_id)
        if not agent_id:
            return None
        if not verify:
            return ViewerAgent(viewer_id, agent_id, agent_name(viewer_id))
        try:
            agent = self.client.agents.retrieve(agent_id)
        except NotFoundError:
            self.redis.hdel(redis_keys.VIEWER_AGENTS, viewer_id)
            return None
        return ViewerAgent(viewer_id, agent.id, agent.name)

    def _find_in_letta(self, viewer_id: str) -> ViewerAgent | None:
        for agent in self._agents_tagged([viewer_tag(viewer_id)]):
            if (agent.metadata or {}).get("viewer_id") == viewer_id:
                return ViewerAgent(viewer_id, agent.id, agent.name)
        return None

    def _agents_tagged(self, tags: list[str]):
        # Oldest first: if two agents ever exist for one viewer, the first one keeps the memory.
        return self.client.agents.list(tags=tags, match_all_tags=True, order="asc", order_by="created_at",
                                       include=["agent.tags"])

    def _create(self, viewer_id: str, display_name: str | None, platform: str):
        bp = self.blueprint
        human = bp.template.block("human")
        shared = self._shared_create_kwargs()
        metadata = {"viewer_id": viewer_id, "display_name": display_name or viewer_id,
                    "platform": platform, "template": bp.template.name, FINGERPRINT_KEY: self._fingerprint}
        # No SDK retry for the create: one that timed out may have made the agent anyway, and a
        # resend would make a second one. The caller's next ensure finds it by its tag instead.
        agent = self.client.with_options(max_retries=0).agents.create(
            name=agent_name(viewer_id),
            memory_blocks=[{
                "label": human.label,
                "value": render_human_block(viewer_id, metadata["display_name"], metadata["platform"],
                                            datetime.now(timezone.utc), template=bp.template),
                "limit": human.limit,
                "description": human.description,
            }],
            tags=viewer_tags(viewer_id, bp.template.name) + [t for t in bp.template.tags if t not in (PRODUCT_TAG,)],
            metadata=metadata,
            **shared,
        )
        # The memory tools' token is bound to the agent id, known only now (tools/memory_gate.py).
        self.client.agents.update(agent.id, secrets=self.agent_secrets(agent.id))
        return agent

    def agent_secrets(self, agent_id: str) -> dict[str, str]:
        """The agent's whole tool environment (an update replaces the set): avatar names, memory token."""
        return {**avatar_secrets(self.blueprint.config),
                MEMORY_TOKEN_ENV: memory_token(self.settings.memory_gate_secret, agent_id)}

    def _shared_create_kwargs(self) -> dict:
        """Everything every viewer's agent gets alike, looked up once per process."""
        if self._create_kwargs is None:
            bp = self.blueprint
            block_ids = []
            shared_ids: dict[str, str | None] = {}
            for spec in bp.template.memory_blocks:
                if spec.shared:
                    block = find_shared_block(self.client, bp.template.name, spec.label)
                    if block is None:
                        raise ProvisioningError(f"the shared {spec.label!r} block is missing: run `vtuber-letta provision`")
                    block_ids.append(block.id)
                    shared_ids[spec.label] = block.id
            # What `provision` compares later to tell that this agent is of the current template.
            self._fingerprint = template_state(bp, shared_ids, self.settings.memory_gate_secret).fingerprint
            tools = {t.name: t.id for t in self.client.tools.list(names=bp.template.custom_tools)}
            missing = [name for name in bp.template.custom_tools if name not in tools]
            if missing:
                raise ProvisioningError(f"tools {', '.join(missing)} are not registered: run `vtuber-letta provision`")
            self._create_kwargs = dict(
                agent_type=bp.template.agent_type,
                system=render_system(bp.template, bp.config),
                block_ids=block_ids,
                tool_ids=list(tools.values()),
                tools=bp.template.letta_tools,
                include_base_tools=bp.template.include_base_tools,
                include_base_tool_rules=bp.template.include_base_tool_rules,
                tool_rules=bp.template.letta_tool_rules(),
                parallel_tool_calls=bp.template.parallel_tool_calls,
                model=bp.model,
                embedding=bp.embedding,
                context_window_limit=bp.template.context_window_limit,
            )
        return self._create_kwargs

    # ---------------- list / show / export / forget ----------------
    def list(self) -> list[dict]:
        """Every viewer agent Letta has (the source of truth), re-filling the Redis map as it goes."""
        rows = []
        for agent in self._agents_tagged([PRODUCT_TAG, VIEWER_TAG]):
            meta = agent.metadata or {}
            viewer_id = meta.get("viewer_id")
            if not viewer_id:
                continue
            self.redis.hsetnx(redis_keys.VIEWER_AGENTS, viewer_id, agent.id)
            rows.append({"viewer_id": viewer_id, "agent_id": agent.id, "name": agent.name,
                         "display_name": meta.get("display_name"), "platform": meta.get("platform")})
        return rows

    def find(self, viewer_id: str) -> ViewerAgent | None:
        check_viewer_id(viewer_id)
        known = self._mapped(viewer_id, verify=True) or self._find_in_letta(viewer_id)
        if known:
            self.redis.hset(redis_keys.VIEWER_AGENTS, viewer_id, known.agent_id)
        return known

    def show(self, viewer_id: str) -> dict | None:
        known = self.find(viewer_id)
        if known is None:
            return None
        agent = self.client.agents.retrieve(known.agent_id, include=["agent.blocks", "agent.tools", "agent.tags"])
        return {
            "viewer_id": viewer_id, "agent_id": agent.id, "name": agent.name, "metadata": agent.metadata,
            "tags": agent.tags, "tools": sorted(t.name for t in agent.tools or []),
            "blocks": {b.label: {"id": b.id, "read_only": b.read_only, "limit": b.limit, "value": b.value}
                       for b in agent.blocks or []},
        }

    def export(self, viewer_id: str, path: Path) -> tuple[Path, Path, int]:
        """The viewer's Agent File at path and their long-term tier beside it: (af, tier file, passages)."""
        known = self.find(viewer_id)
        if known is None:
            raise ProvisioningError(f"viewer {viewer_id!r} has no agent")
        exported = self.client.agents.export_file(known.agent_id)
        text = exported if isinstance(exported, str) else json.dumps(exported)
        write_private(path, text)  # the viewer's whole memory
        count = write_tier_file(self.client, viewer_id, known.agent_id, tier_path(path))
        return path, tier_path(path), count

    def forget(self, viewer_id: str) -> ForgetReport:
        """Everything kept about the viewer, in Letta and in Redis ("forget me": provisioning/forget.py)."""
        check_viewer_id(viewer_id)

        def their_agents() -> list[str]:
            ids = []
            mapped = self.redis.hget(redis_keys.VIEWER_AGENTS, viewer_id)
            if mapped:
                ids.append(mapped)
            ids += [a.id for a in self._agents_tagged([viewer_tag(viewer_id)])
                    if (a.metadata or {}).get("viewer_id") == viewer_id and a.id not in ids]
            return ids

        shared_labels = {spec.label for spec in self.blueprint.template.memory_blocks if spec.shared}
        forgetter = Forgetter(self.settings, self.client, bytes_client(self.redis),
                              creation_lock_ttl=LOCK_TTL_S, lock_wait=LOCK_WAIT_S)
        return forgetter.run(viewer_id, their_agents, shared_labels)

