"""The Letta side of the console for unit tests: agents in a dict, and the REAL memory gate
(tools/memory_gate.py MemoryGate) over an in-memory block store, so every fact change in these
tests goes through the rules the tools obey."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from console.errors import ConsoleError
from console.memory import ChatLine, SharedBlock, ViewerMemory, card_of, gate_answer, strip_secrets
from tools.human_block import format_human_block
from tools.memory_gate import HumanBlock, MemoryGate, memory_token

SECRET = "unit-test-gate-secret"


@dataclass
class FakeAgent:
    agent_id: str
    viewer_id: str
    display_name: str
    platform: str
    block: str
    messages: list[ChatLine] = field(default_factory=list)


class _Blocks:
    def __init__(self, owner: "FakeMemory"):
        self.owner = owner

    def read(self, agent_id):
        agent = self.owner.by_agent.get(agent_id)
        return None if agent is None else HumanBlock(f"block-{agent_id}", agent.block, 4000)

    def write(self, block, value):
        self.owner.writes += 1
        self.owner.by_agent[block.block_id.removeprefix("block-")].block = value


class FakeMemory:
    def __init__(self):
        self.agents: dict[str, FakeAgent] = {}  # viewer id -> agent
        self.by_agent: dict[str, FakeAgent] = {}
        self.forgotten: list[str] = []
        self.shared = {"persona": "You are Luna.\nYou love stars.", "stream": "Title: Chill"}
        self.template = {"persona": "You are Luna.\nYou love stars.", "stream": "Title: Chill"}
        self.stream_fields = {"title": "Chill", "topic": "", "game": "", "language": "en", "schedule": ""}
        self.card_calls: list[list[str]] = []
        self.writes = 0  # human-block writes the gate made
        self._gate = MemoryGate(_Blocks(self), SECRET)

    def add(self, viewer_id: str, display_name: str, platform: str = "bilibili", facts=None) -> FakeAgent:
        agent_id = f"agent-{len(self.agents) + 1}"
        block = format_human_block(viewer_id, display_name, platform, "2026-01-01T00:00:00Z", facts=facts or {})
        agent = FakeAgent(agent_id, viewer_id, display_name, platform, block)
        self.agents[viewer_id] = self.by_agent[agent_id] = agent
        return agent

    # ---- ConsoleMemory ----
    def cards(self, viewer_ids):
        self.card_calls.append(list(viewer_ids))
        return {v: card_of({"display_name": a.display_name, "platform": a.platform}, a.block, v)
                for v in viewer_ids if (a := self.agents.get(v))}

    def viewer(self, viewer_id):
        agent = self.agents.get(viewer_id)
        if agent is None:
            return None
        return ViewerMemory(viewer_id, agent.agent_id, agent.block, 4000, list(agent.messages))

    def gate(self, operation, agent_id, fields):
        status, answer = self._gate.handle(operation, {"agent_id": agent_id, "token": memory_token(SECRET, agent_id),
                                                       **fields})
        return gate_answer(answer)

    def forget_viewer(self, viewer_id):
        agent = self.agents.pop(viewer_id, None)
        if agent is None:
            return f"viewer {viewer_id!r} had no agent and nothing else was stored"
        self.by_agent.pop(agent.agent_id)
        self.forgotten.append(viewer_id)
        return f"forgot {viewer_id!r}: 1 agent"

    def export(self, viewer_id):
        agent = self.agents.get(viewer_id)
        if agent is None:
            raise ConsoleError("this viewer has no agent")
        return json.dumps(strip_secrets({"agents": [{"id": agent.agent_id, "tool_exec_environment_variables":
                                                     {"VTL_MEMORY_TOKEN": "secret-token-value"}}]}))

    def shared_blocks(self):
        return [SharedBlock("persona", self.shared["persona"], 5000, self.template["persona"]),
                SharedBlock("stream", self.shared["stream"], 2000, self.template["stream"], dict(self.stream_fields))]

    def update_shared(self, label, value):
        if label not in self.shared or label == "stream":
            raise ConsoleError(f"there is no shared block {label!r}")
        if len(value) > 5000:
            raise ConsoleError("over the limit")
        self.shared[label] = value

    def update_stream(self, changes):
        self.stream_fields.update(changes)
        self.shared["stream"] = f"Title: {self.stream_fields['title']}"
