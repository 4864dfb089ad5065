"""What the bridge needs from Letta, as an interface.

The bridge's service never calls the Letta SDK: it talks to a `LettaGateway`. The real
one is composed by the CLI from provisioning (`ensure_agent`, `record_verified_event`) and
`bridge.letta_turns.LettaTurns` (`send_turn`, `find_answered`); tests use
`FakeGateway` (tests/unit/fake_gateway.py).

Error contract (bridge/errors.py, where the errors live): a gateway raises a `LettaError`:
- `LettaUnavailable`  Letta cannot be reached or is overloaded (connection refused,
                      timeouts, 502/503/504, the model endpoint down): retried, then
                      the fallback (or waiting, when the fallback is off);
- `LettaRetryable`    a transient refusal from a live server (429, 409, 500, a turn that
                      stopped with an error): retried a few times, then given up;
- `LettaPermanentError` the request itself is wrong (400, 404, 422, ...): dead-lettered
                      at once.
Anything else is classified by `classify_error` too (raw SDK errors included).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Protocol, Sequence, runtime_checkable

from bridge.viewer_stats import ViewerTotals


@dataclass(frozen=True)
class AvatarCall:
    """One avatar tool call the agent made, e.g. AvatarCall("set_expression", {"expression": "happy"}).
    call_id: Letta's tool_call_id (the model's), the same in the stream and in the stored history:
    what marks a cue published early, so nothing publishes it again."""

    tool: str
    args: dict[str, Any]
    call_id: str | None = None


@dataclass(frozen=True)
class TurnResult:
    """What one agent turn produced.

    reply_text      the words to speak ("" when silent)
    avatar_calls    successful set_expression / play_motion calls, in order
    silent          True when the agent called stay_silent or said nothing
    memory_updated  True when a memory tool succeeded during the turn
    message_ids     Letta message ids of the reply (for tracing)
    answered        from find_answered: the asked task ids this turn carried
    unfinished      the agent's last step called tools and said nothing yet: it needs another step
    steps           model steps (requests) the turn has taken so far
    """

    reply_text: str
    avatar_calls: tuple[AvatarCall, ...] = ()
    silent: bool = False
    memory_updated: bool = False
    message_ids: tuple[str, ...] = ()
    answered: tuple[str, ...] = ()
    unfinished: bool = False
    steps: int = 1


@dataclass(frozen=True)
class TurnMessage:
    """One viewer task inside a turn. A coalesced turn (a burst) carries several, each as its own
    user message with its own otid, so the turn can be found again from any of their task ids."""

    task_id: str
    text: str


@dataclass(frozen=True)
class VerifiedEvent:
    """A live event the platform vouches for (not typed by the viewer).

    kind is one of super_chat, gift, membership, enter. `totals` are the viewer's counters
    *after* this event was counted: writing them is idempotent, so a gateway may be asked to
    record the same event twice (at-least-once) without double counting.
    """

    task_id: str
    viewer_id: str
    kind: str
    at: float
    totals: ViewerTotals
    platform: str | None = None
    display_name: str | None = None
    amount: float | None = None
    currency: str | None = None
    gift_name: str | None = None
    count: int | None = None
    tier: str | None = None


TextSink = Callable[[str], Awaitable[None]]
# Called once when the reply's words are complete but the turn goes on (the model moved on to tool
# calls after speaking): the speech can be handed off before the tools have run.
WordsDoneSink = Callable[[], Awaitable[None]]
# Called for each avatar tool call as soon as its arguments are complete in the stream, before
# Letta has run the tool: the cue can be published before the turn ends.
CueSink = Callable[[AvatarCall], Awaitable[None]]


@runtime_checkable
class LettaGateway(Protocol):
    async def ensure_agent(self, viewer_id: str, display_name: str | None, platform: str | None) -> str:
        """Return the viewer's agent id, creating the agent on first contact. Called for every task:
        implementations should cache (the mapping never changes once made)."""
        ...

    async def send_turn(
        self,
        agent_id: str,
        messages: Sequence[TurnMessage],
        *,
        sender_name: str | None,
        on_text: TextSink | None = None,
        on_words_done: WordsDoneSink | None = None,
        on_cue: CueSink | None = None,
    ) -> TurnResult:
        """Send one turn (no automatic retries: the bridge owns the retry policy). Each message must be
        findable afterwards by its task id (`find_answered`). With on_text, the reply is streamed:
        on_text gets each new piece of the reply text as it is generated (an exception it raises
        is passed through unchanged); the result still carries the whole reply. on_words_done (only
        with on_text) is called once when the words are complete while the turn still runs tools; on_cue
        (only with on_text) with each avatar call whose arguments are complete, once per call."""
        ...

    async def continue_turn(
        self, agent_id: str, task_id: str, so_far: TurnResult, *, on_text: TextSink | None = None,
        on_words_done: WordsDoneSink | None = None, on_cue: CueSink | None = None,
    ) -> TurnResult:
        """Finish a turn whose last step called tools without speaking (`so_far.unfinished`, e.g. one
        find_answered found half done after a crash): the agent's next steps, merged into so_far."""
        ...

    async def settle_runs(self, agent_id: str) -> int:
        """Wait until none of the agent's runs is in flight (an earlier attempt's outlives its
        client); how many were. Raises LettaUnavailable if one still is after LETTA_TIMEOUT.
        Called before find_answered and any resend, so a task is never in two live runs."""
        ...

    async def find_answered(self, agent_id: str, task_ids: Sequence[str]) -> TurnResult | None:
        """The turn that already answered task_ids[0], if the agent's history has it, else None;
        `answered` lists which of task_ids that turn carried."""
        ...

    async def serves(self) -> bool:
        """Whether Letta answers a plain read of its database now (one cheap call, never raises).
        Asked after a turn failed in a way a live server can (a 500): if even this fails, Letta
        cannot answer now (its database is down), whatever this task holds."""
        ...

    async def record_verified_event(self, agent_id: str, event: VerifiedEvent) -> None:
        """Write the viewer's verified totals into their memory (idempotent: absolute values)."""
        ...

    def forget_cached_agent(self, viewer_id: str) -> bool:
        """The viewer was forgotten (`agent forget`): drop any cached agent id of theirs, so the next
        ensure_agent resolves (creates) it again. True if one was cached."""
        ...
