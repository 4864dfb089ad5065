"""Recall before the turn: the viewer's long-term memory (tier 2) searched with their message's words,
and the closest passages sent beside it, so the model can use an old fact in the same step.

Without it, a turn that needs an old fact costs two model steps and a tool run: the model calls
recall_viewer_facts, then answers from the result (docs/RELIABILITY.md "Memory that lasts": 2.49×
a plain turn). With it, the bridge asks the memory gate (tools/memory_gate.py, operation
`prefetch`, the agent's own token, the same search the tool makes: that agent's passages only) and
puts its note into the turn as a system message (bridge/letta_turns.py). The tool stays for what
the model wants to look up on its own.

Cost, and why it is bounded:
- a viewer with nothing in tier 2 (most viewers) costs one gate call, then nothing for
  NOT_SEARCHABLE_TTL_S: the gate says so (`searchable: false`) and this cache remembers it; a turn
  that wrote memory forgets the entry (the write may have moved facts out);
- a viewer with a tier costs one search per turn (an embedding of the message and a query over
  that agent's passages; from its second turn on, the gate runs it beside its block read) and
  at most RECALL_TOP_K passages in the prompt, fewer when some were already sent in this
  agent's last turns (the note stays in the agent's history, so the model still has them): a
  conversation that stays on one topic does not fill the context with copies;
- the gate is asked for at most PREFETCH_TIMEOUT_S: slower, failing or refusing, the turn goes on
  without a note (never an error of the turn: the tool is still there).
"""

from __future__ import annotations

import logging
import re
import time
from collections import OrderedDict, deque
from typing import Callable, Sequence

import httpx

from tools.memory_gate import memory_token

log = logging.getLogger("vtuber_letta.bridge")

PREFETCH_TIMEOUT_S = 1.5
NOT_SEARCHABLE_TTL_S = 300.0
MAX_QUERY_CHARS = 500
RECENT_LINES = 15  # passages remembered as sent, per agent
MAX_AGENTS = 10_000  # agents this cache holds at once (least recently used dropped)
# A live event's own marker line says nothing to search for; the viewer's words after it do.
_EVENT_LINE = re.compile(r"^\[platform event:[^\]]*\]\s*")


def search_words(texts: Sequence[str]) -> str:
    """The words of a turn's messages worth searching for ('' when there are none)."""
    words = " ".join(_EVENT_LINE.sub("", text) for text in texts)
    return " ".join(words.split())[:MAX_QUERY_CHARS]


class RecallPrefetch:
    def __init__(self, gate_url: str, secret: str, *, clock: Callable[[], float] = time.monotonic,
                 transport: httpx.AsyncBaseTransport | None = None):
        self._url = gate_url.rstrip("/") + "/v1/prefetch"
        self._secret = secret
        self._clock = clock
        # No proxy: the gate is this deployment's own service and the body carries a token.
        self._http = httpx.AsyncClient(timeout=PREFETCH_TIMEOUT_S, trust_env=False, transport=transport)
        # agent id -> what the gate said last: True (has a tier) or, for none, until when not to ask again
        self._tier: OrderedDict[str, bool | float] = OrderedDict()
        self._sent: OrderedDict[str, deque[str]] = OrderedDict()  # agent id -> passage lines sent lately

    @classmethod
    def from_settings(cls, settings) -> "RecallPrefetch | None":
        if not settings.bridge_recall_before_turn:
            return None
        return cls(settings.memory_gate_url, settings.memory_gate_secret)

    async def note_for(self, agent_id: str, texts: Sequence[str]) -> str | None:
        """The note to send beside these messages, or None (nothing found, no tier, gate unavailable)."""
        query = search_words(texts)
        known = self._tier.get(agent_id)
        if not query or (known is not True and known is not None and known > self._clock()):
            return None
        body = {"agent_id": agent_id, "token": memory_token(self._secret, agent_id), "query": query,
                "expect_tier": known is True}
        try:
            response = await self._http.post(self._url, json=body)
            answer = response.json()
        except (httpx.HTTPError, ValueError) as exc:
            log.info("recall before the turn skipped for agent=%s: %s", agent_id, type(exc).__name__)
            return None
        if not isinstance(answer, dict) or response.status_code != 200:
            log.info("recall before the turn skipped for agent=%s: gate answered HTTP %s", agent_id,
                     response.status_code)
            return None
        if answer.get("searchable") is False:
            _put(self._tier, agent_id, self._clock() + NOT_SEARCHABLE_TTL_S)
        elif answer.get("searchable") is True:
            _put(self._tier, agent_id, True)  # the gate may search at once next time
        note = answer.get("message")
        return self._unsent(agent_id, note) if isinstance(note, str) and note else None

    def _unsent(self, agent_id: str, note: str) -> str | None:
        """The note without the passages sent in this agent's last turns; None if none is left."""
        head, *lines = note.splitlines()
        sent = self._sent.get(agent_id, ())
        fresh = [line for line in lines if line not in sent]
        return "\n".join([head, *fresh]) if fresh else None

    def delivered(self, agent_id: str, note: str) -> None:
        """A turn with this note reached the agent (it is in its history now): its passages count as
        sent. Not before: a turn that failed is sent again with the same note."""
        sent = self._sent.get(agent_id) or deque(maxlen=RECENT_LINES)
        sent.extend(note.splitlines()[1:])
        _put(self._sent, agent_id, sent)

    def memory_changed(self, agent_id: str) -> None:
        """A turn of this agent wrote memory: it may have a tier now."""
        if self._tier.get(agent_id) is not True:
            self._tier.pop(agent_id, None)

    async def aclose(self) -> None:
        await self._http.aclose()


def _put(cache: OrderedDict, key: str, value) -> None:
    cache[key] = value
    cache.move_to_end(key)
    while len(cache) > MAX_AGENTS:
        cache.popitem(last=False)
