"""What the Letta turn hands back to the viewer's worker: a decision, never an acknowledgement.

The turn (bridge/turn.py) asks Letta and the retry policy; the worker (bridge/worker.py)
acts on what it decides: answers, falls back, dead-letters, ends a stale chat, or leaves the task
where it is. That
the turn returns instead of acknowledging is what keeps the two from calling each other.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Union

from bridge.gateway import TurnResult
from bridge.queue import Output
from bridge.wire import Stage, TaskRequest


class Outcome(str, Enum):
    """How a task ended: the `outcome=` of its log line and the label of vtl_bridge_tasks_total."""

    ANSWERED = "answered"
    SILENT = "silent"  # the agent chose not to speak
    REPLAYED = "replayed"  # an earlier attempt's turn, found in the agent's history
    RECORDED = "recorded"  # a live event written to memory, no turn asked
    FORWARDED = "forwarded"  # routed to memory-python
    FALLBACK = "fallback"  # Letta down: handed to memory-python
    DUPLICATE = "duplicate"  # already done (a re-delivery)
    COALESCED = "coalesced"  # answered in another task's turn
    STALE = "stale"  # a chat task that waited too long (VTL_BRIDGE_STALE_CHAT_AFTER): not answered late
    DEAD_LETTER = "dead_letter"
    ABANDONED = "abandoned"  # stop was requested while it waited to be retried: left at the head
    LOCK_LOST = "lock_lost"  # another worker owns the viewer now: nothing acknowledged
    CANCELLED = "cancelled"
    ERROR = "error"  # our store failed: left at the head for the next try


@dataclass(frozen=True)
class Chat:
    """One validated task of a Letta turn and the text the agent reads for it."""

    raw: bytes
    request: TaskRequest
    text: str

    @property
    def task_id(self) -> str:
        return self.request.task_id


@dataclass(frozen=True)
class Answered:
    """Letta answered `batch` (a replayed turn: exactly the tasks it carried)."""

    batch: list[Chat]
    result: TurnResult
    outcome: Outcome  # answered, silent, replayed or recorded
    attempt: int
    tail: list[Output] = field(default_factory=list)  # the streamed reply's last sentences, sent with FINISH
    spoken: bool = False  # the reply already went to speech while it was generated: not again


@dataclass(frozen=True)
class FallBack:
    """Letta is down: the tasks go to memory-python."""

    batch: list[Chat]
    attempt: int


@dataclass(frozen=True)
class DeadLetter:
    """The tasks cannot be answered: dead-letter each with the reason."""

    raws: list[bytes]
    reason: str
    stage: Stage  # validate | letta
    attempt: int  # 0: never sent
    attempts: int | None = None  # recorded in the dead letter (Letta failures only)


@dataclass(frozen=True)
class Stale:
    """A chat task waited `waited_s` in its viewer's queue, longer than VTL_BRIDGE_STALE_CHAT_AFTER:
    it is not sent to Letta (nor to memory-python, which would answer it just as late)."""

    raw: bytes
    request: TaskRequest
    waited_s: float
    attempt: int  # 0: never sent


@dataclass(frozen=True)
class Abandoned:
    """Stop was requested while the task waited to be retried: it stays at the head for later."""

    attempt: int


Decision = Union[Answered, FallBack, DeadLetter, Stale, Abandoned]
