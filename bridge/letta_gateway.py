"""The real LettaGateway: provisioning's `ensure` for agents, LettaTurns for messages,
and the human block's verified section for platform events.

Agent ids are cached per process: a viewer's agent never changes once made, and
this saves a Redis round trip per task. A 404 on a send means the cached agent was
deleted (e.g. the viewer asked to be forgotten, then spoke again): the cache entry
is dropped and the task retried, which re-creates the agent through `ensure`.
"""

from __future__ import annotations

import asyncio
from typing import Awaitable, Sequence

from letta_client import AsyncLetta, NotFoundError

from bridge.gateway import LettaError, LettaRetryable, TextSink, TurnMessage, TurnResult, VerifiedEvent
from bridge.letta_turns import LettaTurns, as_gateway_error
from provisioning.viewers import ViewerAgents
from tools.human_block import set_fields
from vtuber_letta.letta_api import async_letta_client
from vtuber_letta.settings import Settings

HUMAN_LABEL = "human"


class RealLettaGateway:
    def __init__(self, settings: Settings, *, viewers: ViewerAgents | None = None,
                 turns: LettaTurns | None = None, client: AsyncLetta | None = None):
        self._viewers = viewers or ViewerAgents(settings)
        self._turns = turns or LettaTurns.from_settings(settings)
        self._client = client or async_letta_client(settings)
        self._agents: dict[str, str] = {}  # viewer id -> agent id
        self._viewer_of: dict[str, str] = {}  # agent id -> viewer id

    async def ensure_agent(self, viewer_id: str, display_name: str | None, platform: str | None) -> str:
        agent_id = self._agents.get(viewer_id)
        if agent_id is None:
            try:
                agent = await asyncio.to_thread(self._viewers.ensure, viewer_id, display_name, platform)
            except Exception as exc:  # as_gateway_error passes our own errors through unchanged
                raise as_gateway_error(exc) from exc
            agent_id = agent.agent_id
            self._agents[viewer_id] = agent_id
            self._viewer_of[agent_id] = viewer_id
        return agent_id

    async def send_turn(self, agent_id: str, messages: Sequence[TurnMessage], *, sender_name: str | None,
                        on_text: TextSink | None = None) -> TurnResult:
        return await self._turn(agent_id, self._turns.send_turn(agent_id, messages, sender_name=sender_name,
                                                                on_text=on_text))

    async def continue_turn(self, agent_id: str, task_id: str, so_far: TurnResult, *,
                            on_text: TextSink | None = None) -> TurnResult:
        return await self._turn(agent_id, self._turns.continue_turn(agent_id, task_id, so_far, on_text=on_text))

    async def _turn(self, agent_id: str, call: Awaitable[TurnResult]) -> TurnResult:
        try:
            return await call
        except LettaError as exc:
            if isinstance(exc.__cause__, NotFoundError):
                await self._forget_stale(agent_id)
                raise LettaRetryable(f"agent {agent_id} is gone; re-creating it") from exc
            raise

    async def find_answered(self, agent_id: str, task_ids: Sequence[str]) -> TurnResult | None:
        try:
            return await self._turns.find_answered(agent_id, task_ids)
        except LettaError as exc:
            if isinstance(exc.__cause__, NotFoundError):
                return None  # a deleted agent has answered nothing
            raise

    async def record_verified_event(self, agent_id: str, event: VerifiedEvent) -> None:
        try:
            block = await self._client.agents.blocks.retrieve(HUMAN_LABEL, agent_id=agent_id)
            value = set_fields(block.value, "verified", event.totals.as_block_fields())
            if value != block.value:
                await self._client.blocks.update(block.id, value=value)
        except Exception as exc:
            raise as_gateway_error(exc) from exc

    async def _forget_stale(self, agent_id: str) -> None:
        viewer_id = self._viewer_of.pop(agent_id, None)
        if viewer_id is not None:
            self._agents.pop(viewer_id, None)
            # verify=True drops the Redis map entry after a definite 404, so the retry creates anew.
            await asyncio.to_thread(self._viewers.find, viewer_id)
