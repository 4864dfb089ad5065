"""An in-memory LettaGateway for the unit tests (no Letta server).

It behaves like the real thing where the bridge depends on it: turns are stored in a per-agent
history before the reply comes back (so `find_answered` sees a turn whose client died), and it
counts overlapping turns per agent, which must never happen.
"""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass, field, replace
from typing import Callable, Sequence

from bridge.errors import LettaUnavailable
from bridge.gateway import AvatarCall, CueSink, TextSink, TurnMessage, TurnResult, VerifiedEvent, WordsDoneSink


@dataclass
class SentTurn:
    agent_id: str
    viewer_id: str
    task_ids: tuple[str, ...]
    text: str
    sender_name: str | None


def stream_pieces(text: str, size: int) -> list[str]:
    """text cut into pieces of `size` characters, like tokens arriving one by one."""
    return [text[i:i + size] for i in range(0, len(text), size)]


def tools_after_words(result: TurnResult) -> bool:
    """The fake's model writes its words first and then the calls that made these results."""
    return bool(result.avatar_calls) or result.memory_updated


async def stream_step(result: TurnResult, piece_chars: int, on_text: TextSink | None,
                      on_words_done: WordsDoneSink | None, on_cue: CueSink | None,
                      refused: tuple[AvatarCall, ...] = ()) -> int:
    """Stream one step as the fake's model writes it: the words, then its calls (each avatar call
    handed to on_cue once written; `refused`: calls it writes that the tool then refuses, so they
    are not in the result). Returns the pieces of text streamed."""
    pieces = 0
    if on_text is None:
        return pieces
    if not result.silent:
        for piece in stream_pieces(result.reply_text, piece_chars):
            await on_text(piece)
            pieces += 1
        if tools_after_words(result) and on_words_done is not None:
            await on_words_done()
    for call in refused + result.avatar_calls:
        if on_cue is not None:
            await on_cue(call)
    return pieces


def echo_reply(viewer_id: str, message: TurnMessage) -> TurnResult:
    return TurnResult(reply_text=f"echo: {message.text}")


def continued_reply(so_far: TurnResult) -> TurnResult:
    """The step after a tool-only one: the tools' effects kept, and words at last."""
    return replace(so_far, reply_text="(after the tools)", silent=False, unfinished=False, steps=so_far.steps + 1)


@dataclass
class FakeGateway:
    reply: Callable[[str, TurnMessage], TurnResult] = echo_reply
    delay: tuple[float, float] = (0.0, 0.0)  # random extra latency per send, seconds
    seed: int = 0
    down: bool = False  # every call raises LettaUnavailable while True
    failures: list[Exception] = field(default_factory=list)  # raised by the next sends, in order
    hold: asyncio.Event | None = None  # when set: sends store the turn, then wait for this event
    piece_chars: int = 3  # a streamed reply is handed to on_text in pieces of this many characters
    continuation: Callable[[TurnResult], TurnResult] = continued_reply
    refused_calls: tuple[AvatarCall, ...] = ()  # avatar calls the model writes and the tool refuses
    database_down: bool = False  # `serves` says no (the failures above are then Letta's database)

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)
        self.agents: dict[str, str] = {}
        self.made = 0
        self.sent: list[SentTurn] = []
        self.history: dict[str, dict[str, TurnResult]] = {}
        self.events: list[tuple[str, VerifiedEvent]] = []
        self.find_calls: list[tuple[str, str]] = []
        self.settled: list[str] = []  # agents whose runs were settled before a lookup
        self.continued: list[tuple[str, str]] = []
        self.overlaps = 0
        self.in_flight = 0
        self.max_in_flight = 0  # the most sends running at once
        self._busy: set[str] = set()
        self.send_started = asyncio.Event()
        self.pieces_streamed = 0
        self.probes = 0  # `serves` calls

    def _check_up(self) -> None:
        if self.down:
            raise LettaUnavailable("fake Letta is down")

    def viewer_of(self, agent_id: str) -> str:
        return next(viewer for viewer, agent in self.agents.items() if agent == agent_id)

    async def ensure_agent(self, viewer_id: str, display_name: str | None, platform: str | None) -> str:
        self._check_up()
        if viewer_id not in self.agents:
            self.made += 1  # a forgotten viewer gets a new id, never one already used
            self.agents[viewer_id] = f"agent-{self.made}"
        return self.agents[viewer_id]

    def forget_cached_agent(self, viewer_id: str) -> bool:
        return self.agents.pop(viewer_id, None) is not None

    async def send_turn(self, agent_id: str, messages: Sequence[TurnMessage], *, sender_name: str | None,
                        on_text: TextSink | None = None, on_words_done: WordsDoneSink | None = None,
                        on_cue: CueSink | None = None) -> TurnResult:
        self._check_up()
        if self.failures:
            raise self.failures.pop(0)
        if agent_id in self._busy:
            self.overlaps += 1
        self._busy.add(agent_id)
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            viewer = self.viewer_of(agent_id)
            self.sent.append(SentTurn(agent_id, viewer, tuple(m.task_id for m in messages), messages[-1].text, sender_name))
            result = self.reply(viewer, messages[-1])
            carried = tuple(m.task_id for m in messages)
            for message in messages:
                self.history.setdefault(agent_id, {})[message.task_id] = replace(result, answered=carried)
            self.send_started.set()
            self.pieces_streamed += await stream_step(result, self.piece_chars, on_text, on_words_done, on_cue,
                                                     self.refused_calls)
            if self.hold is not None:
                await self.hold.wait()
            low, high = self.delay
            if high > 0:
                await asyncio.sleep(self.rng.uniform(low, high))
            return result
        finally:
            self.in_flight -= 1
            self._busy.discard(agent_id)

    async def continue_turn(self, agent_id: str, task_id: str, so_far: TurnResult, *,
                            on_text: TextSink | None = None, on_words_done: WordsDoneSink | None = None,
                            on_cue: CueSink | None = None) -> TurnResult:
        """The agent's next step after a tool-only one: `continuation` (default: it says "…")."""
        self._check_up()
        self.continued.append((agent_id, task_id))
        step = self.continuation(so_far)
        await stream_step(step, self.piece_chars, on_text, on_words_done, on_cue)
        self.history.setdefault(agent_id, {})[task_id] = replace(step, answered=so_far.answered or (task_id,))
        return step

    async def settle_runs(self, agent_id: str) -> int:
        """The fake's runs end with their send (a killed client's run is over at once)."""
        self._check_up()
        self.settled.append(agent_id)
        return 0

    async def find_answered(self, agent_id: str, task_ids: Sequence[str]) -> TurnResult | None:
        self._check_up()
        self.find_calls.append((agent_id, task_ids[0]))
        found = self.history.get(agent_id, {}).get(task_ids[0])
        if found is None:
            return None
        return replace(found, answered=tuple(t for t in task_ids if t in found.answered))

    async def serves(self) -> bool:
        self.probes += 1
        return not self.down and not self.database_down

    async def record_verified_event(self, agent_id: str, event: VerifiedEvent) -> None:
        self._check_up()
        self.events.append((agent_id, event))

    def sends_of(self, task_id: str) -> int:
        return sum(task_id in turn.task_ids for turn in self.sent)
