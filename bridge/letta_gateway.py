"""The real LettaGateway: provisioning's `ensure` for agents, LettaTurns for messages,
and the human block's verified section for platform events.

Agent ids are cached per process: a viewer's agent changes only when the viewer is
forgotten, and the cache saves a Redis round trip per task. `agent forget` publishes the
viewer on `vtl:agent_invalidations` and the bridge drops the entry (`forget_cached_agent`).
A bridge that missed it (not subscribed at that moment) gets a 404 on the viewer's next
turn: the agent is then re-resolved (`ensure`, which creates a fresh agent for a forgotten
viewer) and the call made once more with it, in the same attempt: never a dead letter.
"""

from __future__ import annotations

import asyncio
from typing import Sequence

from letta_client import AsyncLetta, NotFoundError

from bridge.errors import LettaError, LettaRetryable, LettaUnavailable, letta_error
from bridge.gateway import CueSink, TextSink, TurnMessage, TurnResult, VerifiedEvent, WordsDoneSink
from bridge.letta_turns import LettaTurns
from provisioning.blueprint import ProvisioningError
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
        self._profile: dict[str, tuple[str | None, str | None]] = {}  # viewer id -> (display name, platform)

    async def ensure_agent(self, viewer_id: str, display_name: str | None, platform: str | None,
                           *, verify: bool = False) -> str:
        agent_id = self._agents.get(viewer_id)
        if agent_id is None:
            try:
                agent = await asyncio.to_thread(self._viewers.ensure, viewer_id, display_name, platform, verify=verify)
            except ProvisioningError as exc:  # the shared blocks or tools are missing: no viewer can be answered
                raise LettaUnavailable(f"cannot make the viewer's agent: {exc}") from exc
            except Exception as exc:  # letta_error passes our own errors through unchanged
                raise letta_error(exc) from exc
            agent_id = agent.agent_id
            self._agents[viewer_id] = agent_id
            self._viewer_of[agent_id] = viewer_id
            self._profile[viewer_id] = (display_name, platform)
        return agent_id

    def forget_cached_agent(self, viewer_id: str) -> bool:
        """Drop the cached agent id of a viewer (it was forgotten); True if one was cached."""
        agent_id = self._agents.pop(viewer_id, None)
        if agent_id is not None:
            self._viewer_of.pop(agent_id, None)
        self._profile.pop(viewer_id, None)
        return agent_id is not None

    async def send_turn(self, agent_id: str, messages: Sequence[TurnMessage], *, sender_name: str | None,
                        on_text: TextSink | None = None, on_words_done: WordsDoneSink | None = None,
                        on_cue: CueSink | None = None) -> TurnResult:
        try:
            return await self._turns.send_turn(agent_id, messages, sender_name=sender_name, on_text=on_text,
                                               on_words_done=on_words_done, on_cue=on_cue)
        except LettaError as exc:
            if not exc.agent_gone:
                raise
            # The agent is gone (forgotten, and this bridge missed the invalidation): the new one has
            # never seen these messages, so sending them to it is no second turn.
            fresh = await self._reresolve(agent_id, exc)
            return await self._turns.send_turn(fresh, messages, sender_name=sender_name, on_text=on_text,
                                               on_words_done=on_words_done, on_cue=on_cue)

    async def continue_turn(self, agent_id: str, task_id: str, so_far: TurnResult, *,
                            on_text: TextSink | None = None, on_words_done: WordsDoneSink | None = None,
                            on_cue: CueSink | None = None) -> TurnResult:
        try:
            return await self._turns.continue_turn(agent_id, task_id, so_far, on_text=on_text,
                                                   on_words_done=on_words_done, on_cue=on_cue)
        except LettaError as exc:
            if not exc.agent_gone:
                raise
            # Gone mid-turn: the retry finds nothing in the new agent's history and sends the task anew.
            await self._reresolve(agent_id, exc)
            raise LettaRetryable(f"agent {agent_id} is gone mid-turn; the task goes to the new one") from exc

    async def settle_runs(self, agent_id: str) -> int:
        try:
            return await self._turns.settle_runs(agent_id)
        except LettaError as exc:
            if exc.agent_gone:
                return 0  # a deleted agent runs nothing
            raise

    async def find_answered(self, agent_id: str, task_ids: Sequence[str]) -> TurnResult | None:
        try:
            return await self._turns.find_answered(agent_id, task_ids)
        except LettaError as exc:
            if exc.agent_gone:
                return None  # a deleted agent has answered nothing
            raise

    async def serves(self) -> bool:
        try:
            # Once, at once: the SDK's own retries would let the database come back mid-probe.
            await self._client.with_options(max_retries=0).agents.list(limit=1)
        except Exception:  # noqa: BLE001 - any failure of a plain read means "not now"
            return False
        return True

    async def record_verified_event(self, agent_id: str, event: VerifiedEvent) -> None:
        try:
            await self._record(agent_id, event)
        except NotFoundError as exc:  # the agent was forgotten: record into the viewer's fresh agent
            fresh = await self._reresolve(agent_id, exc)
            try:
                await self._record(fresh, event)
            except Exception as again:
                raise letta_error(again) from again
        except Exception as exc:
            raise letta_error(exc) from exc

    async def _record(self, agent_id: str, event: VerifiedEvent) -> None:
        block = await self._client.agents.blocks.retrieve(HUMAN_LABEL, agent_id=agent_id)
        value = set_fields(block.value, "verified", event.totals.as_block_fields())
        if value != block.value:
            await self._client.blocks.update(block.id, value=value)

    async def _reresolve(self, agent_id: str, cause: BaseException) -> str:
        """The viewer's agent after a 404 for agent_id: verified against Letta, created if gone."""
        viewer_id = self._viewer_of.get(agent_id)
        if viewer_id is None:  # not ours to re-resolve (cannot happen: every id comes from ensure_agent)
            raise LettaRetryable(f"agent {agent_id} is gone") from cause
        display_name, platform = self._profile.get(viewer_id, (None, None))
        self.forget_cached_agent(viewer_id)
        fresh = await self.ensure_agent(viewer_id, display_name, platform, verify=True)
        if fresh == agent_id:  # Letta says 404 yet the agent is there: let the retry policy decide
            raise LettaRetryable(f"agent {agent_id} answered 404 but exists") from cause
        return fresh
