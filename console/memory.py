"""What the console asks of Letta and the memory gate, behind one small interface.

`ConsoleMemory` is the whole surface; `LettaMemory` is the real one (letta-client 1.12.1 plus the
memory gate over HTTP) and tests/unit/console_fakes.py has the one the unit tests use. Every write
goes through the owner of its rule:

- a fact: the memory gate (tools/memory_gate.py), exactly as a memory tool asks it, with the
  agent's own token — the block format, its limit, the contact-detail refusal and the per-agent
  serialisation are the gate's, so the console cannot write what the agent could not;
- forgetting a viewer: provisioning/viewers.py `ViewerAgents.forget` (= `vtuber-letta agent forget`);
- the stream block: provisioning/stream.py `set_stream` (= `vtuber-letta stream set`);
- a shared block's text: Letta's block update, within the block's own limit.
"""

from __future__ import annotations

import difflib
import json
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from typing import Any, Protocol

from console.errors import ConsoleError
from tools.human_block import DEFAULT_HUMAN_LIMIT, HUMAN_LABEL, HumanBlockError, parse_facts, parse_fields

# Agent File fields that can carry secrets (the memory token is one of an agent's secrets): never
# sent. Letta 0.16.8 leaves the secrets' values out of its export already (the browser test checks
# the console's download); blanking them here keeps it so whatever a later version exports.
SECRET_EXPORT_FIELDS = ("tool_exec_environment_variables", "secrets")
GATE_TIMEOUT_S = 10
# The list answers from Redis whatever Letta does: its names and fact counts are worth a short wait only.
CARDS_TIMEOUT_S = 3
RECENT_MESSAGES = 30


@dataclass(frozen=True)
class ViewerCard:
    """What the list shows of one viewer from its agent (the rest comes from Redis)."""

    display_name: str
    platform: str
    facts: int | None  # None: the block is not in the viewer-profile format


@dataclass(frozen=True)
class ChatLine:
    role: str  # "viewer" | "vtuber"
    text: str
    at: str


@dataclass
class ViewerMemory:
    viewer_id: str
    agent_id: str
    block: str  # the human block as Letta has it now
    limit: int
    messages: list[ChatLine] = field(default_factory=list)

    @property
    def facts(self) -> dict[str, list[str]]:
        try:
            return parse_facts(self.block)
        except HumanBlockError:
            return {}

    @property
    def format_error(self) -> str | None:
        try:
            parse_facts(self.block)
        except HumanBlockError as exc:
            return str(exc)
        return None

    def fields(self, section: str) -> dict[str, str]:
        try:
            return parse_fields(self.block, section)
        except HumanBlockError:
            return {}


@dataclass(frozen=True)
class SharedBlock:
    label: str
    value: str
    limit: int
    template_value: str  # what the template renders from the persona config today
    stream: dict[str, str] | None = None  # the stream block's fields

    @property
    def diff(self) -> list[str]:
        """Unified diff from the template's text to the text in force ([] when equal)."""
        return list(difflib.unified_diff(self.template_value.splitlines(), self.value.splitlines(),
                                         "template", "in force", lineterm=""))


class ConsoleMemory(Protocol):
    def cards(self, viewer_ids: list[str]) -> dict[str, ViewerCard]:
        """Display name, platform and fact count of these viewers (one page), by viewer id."""

    def viewer(self, viewer_id: str) -> ViewerMemory | None:
        """The viewer's human block and recent conversation; None when they have no agent."""

    def gate(self, operation: str, agent_id: str, fields: dict[str, str]) -> str:
        """Ask the memory gate (remember / forget / edit) for this agent: its message; ConsoleError when refused."""

    def forget_viewer(self, viewer_id: str) -> str:
        """Everything kept about the viewer, as `agent forget` does: its report."""

    def export(self, viewer_id: str) -> str:
        """The viewer's Agent File (JSON), without secrets."""

    def shared_blocks(self) -> list[SharedBlock]:
        """The shared blocks every agent reads (persona, stream), with the template's text."""

    def update_shared(self, label: str, value: str) -> None:
        """Replace a shared block's text (ConsoleError over its limit or when it is missing)."""

    def update_stream(self, changes: dict[str, str]) -> None:
        """Change fields of the stream block through its template."""


def strip_secrets(agent_file: Any) -> Any:
    """The Agent File with every secret value blanked (names kept, so it still imports)."""
    if isinstance(agent_file, dict):
        out = {}
        for key, value in agent_file.items():
            if key in SECRET_EXPORT_FIELDS and isinstance(value, dict):
                out[key] = {name: "" for name in value}
            elif key in SECRET_EXPORT_FIELDS and isinstance(value, list):
                out[key] = [{**item, "value": ""} if isinstance(item, dict) else item for item in value]
            else:
                out[key] = strip_secrets(value)
        return out
    if isinstance(agent_file, list):
        return [strip_secrets(item) for item in agent_file]
    return agent_file


def card_of(metadata: dict | None, block: str | None, viewer_id: str) -> ViewerCard:
    meta = metadata or {}
    facts = None
    if block is not None:
        try:
            facts = sum(len(values) for values in parse_facts(block).values())
        except HumanBlockError:
            facts = None
    return ViewerCard(str(meta.get("display_name") or viewer_id), str(meta.get("platform") or ""), facts)


def gate_answer(answer: Any) -> str:
    """The gate's JSON answer as the console's result: its message, or ConsoleError(its error)."""
    if isinstance(answer, dict) and isinstance(answer.get("message"), str):
        return answer["message"]
    if isinstance(answer, dict) and isinstance(answer.get("error"), str):
        raise ConsoleError(answer["error"])
    raise ConsoleError("the memory gate gave no answer; nothing was changed")


class LettaMemory:
    """The real ConsoleMemory: one Letta client, the memory gate at settings.memory_gate_url."""

    def __init__(self, settings, client=None, redis_conn=None):
        from provisioning.viewers import ViewerAgents
        from vtuber_letta.letta_api import letta_client
        from vtuber_letta.redis_api import redis_client

        self.settings = settings
        self.client = client or letta_client(settings)
        self.viewers = ViewerAgents(settings, client=self.client, redis_conn=redis_conn or redis_client(settings))

    def cards(self, viewer_ids: list[str]) -> dict[str, ViewerCard]:
        from provisioning.naming import viewer_tag

        if not viewer_ids:
            return {}
        # One call for the page: agents carrying any of these viewers' tags, with their blocks.
        client = self.client.with_options(timeout=CARDS_TIMEOUT_S, max_retries=0)
        agents = client.agents.list(tags=[viewer_tag(v) for v in viewer_ids], match_all_tags=False,
                                    include=["agent.blocks"], limit=2 * len(viewer_ids))
        wanted, cards = set(viewer_ids), {}
        for agent in agents:
            viewer = (agent.metadata or {}).get("viewer_id")
            if viewer in wanted and viewer not in cards:
                human = next((b.value for b in agent.blocks or [] if b.label == HUMAN_LABEL), None)
                cards[viewer] = card_of(agent.metadata, human, viewer)
        return cards

    def viewer(self, viewer_id: str) -> ViewerMemory | None:
        from letta_client import NotFoundError

        known = self.viewers.find(viewer_id)
        if known is None:
            return None
        try:
            block = self.client.agents.blocks.retrieve(HUMAN_LABEL, agent_id=known.agent_id)
        except NotFoundError:
            return None
        limit = block.limit if isinstance(block.limit, int) and block.limit > 0 else DEFAULT_HUMAN_LIMIT
        memory = ViewerMemory(viewer_id, known.agent_id, block.value or "", limit)
        messages = self.client.agents.messages.list(known.agent_id, limit=RECENT_MESSAGES, order="desc")
        for message in reversed(list(messages)):
            role = {"user_message": "viewer", "assistant_message": "vtuber"}.get(getattr(message, "message_type", ""))
            if role:
                memory.messages.append(ChatLine(role, _text_of(getattr(message, "content", "")),
                                                str(getattr(message, "date", "") or "")))
        return memory

    def gate(self, operation: str, agent_id: str, fields: dict[str, str]) -> str:
        from tools.memory_gate import memory_token

        body = json.dumps({"agent_id": agent_id, "token": memory_token(self.settings.memory_gate_secret, agent_id),
                           **fields}).encode("utf-8")
        request = urllib.request.Request(f"{self.settings.memory_gate_url}/v1/{operation}", data=body, method="POST",
                                         headers={"Content-Type": "application/json"})
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # our own service, token inside
        try:
            with opener.open(request, timeout=GATE_TIMEOUT_S) as response:
                return gate_answer(json.loads(response.read().decode("utf-8")))
        except urllib.error.HTTPError as exc:
            try:
                return gate_answer(json.loads(exc.read().decode("utf-8")))
            except ValueError:
                raise ConsoleError(f"the memory gate answered HTTP {exc.code}; nothing was changed") from None
        except (OSError, ValueError) as exc:
            raise ConsoleError(f"the memory gate cannot be reached ({type(exc).__name__}); nothing was changed") from None

    def forget_viewer(self, viewer_id: str) -> str:
        from provisioning.forget import ForgetError

        try:
            return self.viewers.forget(viewer_id).render()
        except ForgetError as exc:
            raise ConsoleError(str(exc)) from None

    def export(self, viewer_id: str) -> str:
        known = self.viewers.find(viewer_id)
        if known is None:
            raise ConsoleError("this viewer has no agent")
        exported = self.client.agents.export_file(known.agent_id)
        data = json.loads(exported) if isinstance(exported, str) else exported
        return json.dumps(strip_secrets(data), ensure_ascii=False, indent=1)

    def _shared(self):
        from provisioning.blueprint import find_shared_block

        bp = self.viewers.blueprint
        for spec in bp.template.memory_blocks:
            if spec.shared:
                yield spec, bp, find_shared_block(self.client, bp.template.name, spec.label)

    def shared_blocks(self) -> list[SharedBlock]:
        out = []
        for spec, bp, block in self._shared():
            if block is not None:
                stream = (block.metadata or {}).get("stream") if spec.label == "stream" else None
                if spec.label == "stream" and not stream:
                    stream = bp.config.stream.model_dump()
                out.append(SharedBlock(spec.label, block.value or "", block.limit or spec.limit,
                                       bp.shared_values.get(spec.label, ""),
                                       {k: "" if v is None else str(v) for k, v in stream.items()} if stream else None))
        return out

    def update_shared(self, label: str, value: str) -> None:
        for spec, _, block in self._shared():
            if spec.label == label:
                if block is None:
                    raise ConsoleError(f"the shared {label!r} block is missing: run `vtuber-letta provision`")
                limit = block.limit or spec.limit
                if len(value) > limit:
                    raise ConsoleError(f"the {label} text is {len(value)} characters; its limit is {limit}. Nothing was saved.")
                self.client.blocks.update(block.id, value=value)
                return
        raise ConsoleError(f"there is no shared block {label!r}")

    def update_stream(self, changes: dict[str, str]) -> None:
        from provisioning.blueprint import ProvisioningError
        from provisioning.stream import set_stream

        try:
            set_stream(self.settings, changes, client=self.client)
        except ProvisioningError as exc:
            raise ConsoleError(str(exc)) from None


def _text_of(content: Any) -> str:
    """A message's text: a string, or the text parts of a list of content parts."""
    if isinstance(content, str):
        return content
    texts = []
    for part in content if isinstance(content, list) else []:
        text = part.get("text") if isinstance(part, dict) else getattr(part, "text", None)
        if isinstance(text, str):
            texts.append(text)
    return " ".join(texts)
