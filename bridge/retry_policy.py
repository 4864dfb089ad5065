"""The retry policy: what to do next with a Letta turn, as one pure function.

    next_action(cause, attempt=..., batch_size=..., switches=..., letta_down=...) -> Action

`cause` is how the last attempt failed (bridge/errors.py's Disposition), or None before the
first attempt of this turn (then only the Letta-down hold matters). The switches are the
operator's: LETTA_FALLBACK_TO_MEMORY and LETTA_RETRY_ATTEMPTS. Table-tested in
tests/unit/test_retry_policy.py; the Letta turn (bridge/turn.py) asks it and acts.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from enum import Enum

from bridge.errors import Disposition


class Action(str, Enum):
    SEND = "send"  # go to Letta
    RETRY = "retry"  # wait (backoff with jitter) and try again
    SPLIT = "split"  # Letta refused a coalesced group outright: try its tasks one by one
    FALL_BACK = "fall_back"  # hand the tasks to memory-python (meta.letta_fallback)
    FALL_BACK_AND_HOLD = "fall_back_and_hold"  # Letta is down: fall back, and new tasks skip Letta a while
    DEAD_LETTER = "dead_letter"  # the task itself is the problem
    GIVE_UP = "give_up"  # retried enough with no fallback: dead-letter ("gave up after n attempts")


@dataclass(frozen=True)
class Switches:
    fallback: bool  # LETTA_FALLBACK_TO_MEMORY
    retry_attempts: int  # LETTA_RETRY_ATTEMPTS: retries after the first attempt


def next_action(cause: Disposition | None, *, attempt: int, batch_size: int, switches: Switches, letta_down: bool) -> Action:
    """What to do after attempt number `attempt` (1 = the first) of a turn of `batch_size` tasks
    failed with `cause`; with cause None, whether to send at all (`letta_down`: the hold of
    VTL_BRIDGE_LETTA_DOWN_HOLD seconds after Letta was found down is running)."""
    if cause is None:
        return Action.FALL_BACK if switches.fallback and letta_down else Action.SEND
    if cause is Disposition.GIVE_UP:
        # one of a group may be what Letta refuses: the others deserve their own try
        return Action.SPLIT if batch_size > 1 else Action.DEAD_LETTER
    if attempt <= switches.retry_attempts:
        return Action.RETRY
    if cause is Disposition.RETRY:
        return Action.FALL_BACK if switches.fallback else Action.GIVE_UP
    # UNAVAILABLE: with the fallback off, the task waits for Letta to come back (retried forever)
    return Action.FALL_BACK_AND_HOLD if switches.fallback else Action.RETRY


def backoff(attempt: int, *, base: float, cap: float, rand: float | None = None) -> float:
    """Exponential backoff (base * 2^(attempt-1), capped at `cap`) with jitter: a delay in
    [limit/2, limit]. `rand` in [0, 1) (random by default)."""
    limit = min(cap, base * (2 ** max(0, attempt - 1)))
    return limit * (0.5 + (random.random() if rand is None else rand) / 2)
