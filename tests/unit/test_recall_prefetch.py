"""Recall before the turn (bridge/recall_prefetch.py): what the bridge asks the memory gate, what it
sends beside the viewer's message, and what it never lets fail a turn."""

from __future__ import annotations

import asyncio
import functools
import json

import httpx
import pytest

from bridge.gateway import TurnMessage
from bridge.letta_turns import LettaTurns, otid_for
from bridge.recall_prefetch import NOT_SEARCHABLE_TTL_S, RecallPrefetch, search_words
from tools.memory_gate import memory_token
from tools.memory_tiers import PREFETCH_HEADER

SECRET = "prefetch-secret"
NOTE = f"{PREFETCH_HEADER} What this viewer told you earlier:\n- (pets) has a cat named Mochi\n- (games) plays Tetris"


class Gate:
    """The memory gate's /v1/prefetch as an httpx transport: answers in order, records requests."""

    def __init__(self, *answers):
        self.answers = list(answers)
        self.requests: list[dict] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append({"url": str(request.url), **json.loads(request.content)})
        answer = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        if isinstance(answer, Exception):
            raise answer
        status, body = answer
        return httpx.Response(status, json=body) if isinstance(body, dict) else httpx.Response(status, text=body)


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def run(test):
    """Run an async test body in its own event loop (the suite has no async plugin)."""
    @functools.wraps(test)
    def wrapper(*args, **kwargs):
        return asyncio.run(test(*args, **kwargs))
    return wrapper


def prefetch(gate: Gate, clock: Clock | None = None) -> RecallPrefetch:
    return RecallPrefetch("http://gate:8285/", SECRET, clock=clock or Clock(), transport=httpx.MockTransport(gate))


@pytest.mark.parametrize("texts, words", [
    (["what did I name my cat?"], "what did I name my cat?"),
    (["[platform event: super chat ¥30] remember my cat?"], "remember my cat?"),
    (["[platform event: entered the stream]"], ""),
    (["hi  there", "my\ncat"], "hi there my cat"),
])
def test_search_words(texts, words):
    assert search_words(texts) == words


@run
async def test_the_gate_is_asked_with_the_agents_own_token_and_its_note_comes_back():
    gate = Gate((200, {"message": NOTE, "searchable": True}))
    recall = prefetch(gate)
    assert await recall.note_for("agent-1", ["what did I name my cat?"]) == NOTE
    [sent] = gate.requests
    assert sent == {"url": "http://gate:8285/v1/prefetch", "agent_id": "agent-1",
                    "token": memory_token(SECRET, "agent-1"), "query": "what did I name my cat?", "expect_tier": False}
    await recall.note_for("agent-1", ["and my dog?"])
    assert gate.requests[-1]["expect_tier"] is True  # the gate said it has a tier: it may search at once
    await recall.aclose()


@run
async def test_a_viewer_without_a_tier_is_not_asked_again_until_the_ttl_or_a_memory_write():
    gate, clock = Gate((200, {"message": "", "searchable": False})), Clock()
    recall = prefetch(gate, clock)
    assert await recall.note_for("agent-1", ["hello"]) is None
    assert await recall.note_for("agent-1", ["hello again"]) is None
    assert len(gate.requests) == 1
    recall.memory_changed("agent-1")  # a turn wrote memory: facts may have moved to the tier
    assert await recall.note_for("agent-1", ["hello"]) is None
    assert len(gate.requests) == 2
    clock.now += NOT_SEARCHABLE_TTL_S + 1
    assert await recall.note_for("agent-1", ["hello"]) is None
    assert len(gate.requests) == 3
    assert await recall.note_for("agent-2", ["hello"]) is None  # per agent
    assert len(gate.requests) == 4
    await recall.aclose()


@run
async def test_passages_delivered_in_recent_turns_are_not_sent_again():
    other = f"{PREFETCH_HEADER} What this viewer told you earlier:\n- (pets) has a cat named Mochi\n- (food) likes mango"
    gate = Gate((200, {"message": NOTE, "searchable": True}), (200, {"message": NOTE, "searchable": True}),
                (200, {"message": other, "searchable": True}))
    recall = prefetch(gate)
    first = await recall.note_for("agent-1", ["my cat?"])
    assert first == NOTE
    assert await recall.note_for("agent-1", ["my cat?"]) == NOTE  # the first turn never reached the agent
    recall.delivered("agent-1", first)
    assert await recall.note_for("agent-1", ["my cat and food?"]) == (
        f"{PREFETCH_HEADER} What this viewer told you earlier:\n- (food) likes mango")
    gate.answers = [(200, {"message": NOTE, "searchable": True})]
    assert await recall.note_for("agent-1", ["my cat?"]) is None  # nothing new: no note at all
    await recall.aclose()


@pytest.mark.parametrize("answer", [
    httpx.ConnectError("refused"),
    httpx.ReadTimeout("slow"),
    (503, {"error": "the memory service cannot reach the memory store right now."}),
    (403, {"error": "this tool is not allowed"}),
    (200, {"error": "say what to look for"}),
    (200, "not json"),
    (200, {"message": 5}),
])
@run
async def test_a_gate_that_fails_or_refuses_leaves_the_turn_without_a_note(answer):
    recall = prefetch(Gate(answer))
    assert await recall.note_for("agent-1", ["my cat?"]) is None
    await recall.aclose()


@run
async def test_nothing_to_search_asks_nothing():
    gate = Gate((200, {"message": NOTE, "searchable": True}))
    recall = prefetch(gate)
    assert await recall.note_for("agent-1", ["[platform event: entered the stream]"]) is None
    assert gate.requests == []
    await recall.aclose()


def test_the_note_goes_first_as_a_system_message_with_its_own_otid():
    body = LettaTurns.request_messages([TurnMessage("t-1", "my cat?"), TurnMessage("t-2", "and?")], "Mia", NOTE)
    assert body[0] == {"role": "system", "content": NOTE, "otid": otid_for("t-1#recalled")}
    assert [m["otid"] for m in body[1:]] == [otid_for("t-1"), otid_for("t-2")]
    assert [m["role"] for m in body[1:]] == ["user", "user"]
    assert LettaTurns.request_messages([TurnMessage("t-1", "hi")], None)[0]["role"] == "user"
