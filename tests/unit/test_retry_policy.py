"""bridge/retry_policy.py: every row of the retry policy."""

from __future__ import annotations

import pytest

from bridge.errors import Disposition
from bridge.retry_policy import Action, Switches, backoff, next_action

U, R, G = Disposition.UNAVAILABLE, Disposition.RETRY, Disposition.GIVE_UP
ON, OFF = Switches(fallback=True, retry_attempts=2), Switches(fallback=False, retry_attempts=2)

TABLE = [
    # cause, attempt, batch, switches, letta down -> action
    (None, 1, 1, ON, False, Action.SEND),
    (None, 1, 3, ON, True, Action.FALL_BACK),  # the hold after an outage: no try
    (None, 5, 1, OFF, True, Action.SEND),  # no fallback: the hold means nothing
    (G, 1, 1, ON, False, Action.DEAD_LETTER),
    (G, 9, 1, OFF, False, Action.DEAD_LETTER),
    (G, 1, 2, ON, False, Action.SPLIT),  # a group refused: one by one
    (G, 3, 8, OFF, True, Action.SPLIT),
    (R, 1, 1, ON, False, Action.RETRY),
    (R, 2, 1, OFF, False, Action.RETRY),  # attempts 1..retry_attempts are retried
    (R, 3, 1, ON, False, Action.FALL_BACK),  # exhausted, fallback on
    (R, 3, 4, OFF, False, Action.GIVE_UP),  # exhausted, fallback off: dead letter
    (U, 1, 1, ON, False, Action.RETRY),
    (U, 2, 1, ON, True, Action.RETRY),
    (U, 3, 1, ON, False, Action.FALL_BACK_AND_HOLD),
    (U, 3, 1, OFF, False, Action.RETRY),  # fallback off: wait for Letta, however long
    (U, 50, 2, OFF, False, Action.RETRY),
    (U, 1, 1, Switches(fallback=True, retry_attempts=0), False, Action.FALL_BACK_AND_HOLD),
    (R, 1, 1, Switches(fallback=False, retry_attempts=0), False, Action.GIVE_UP),
]


@pytest.mark.parametrize("cause, attempt, batch, switches, down, expected", TABLE)
def test_next_action(cause, attempt, batch, switches, down, expected):
    assert next_action(cause, attempt=attempt, batch_size=batch, switches=switches, letta_down=down) is expected


@pytest.mark.parametrize("attempt, rand, expected", [
    (1, 0.0, 0.05), (1, 0.999999, 0.1), (2, 0.0, 0.1), (3, 0.0, 0.2), (4, 0.0, 0.4), (5, 0.0, 0.5), (40, 0.0, 0.5), (0, 0.0, 0.05),
])
def test_backoff_doubles_up_to_the_cap_with_jitter_in_the_upper_half(attempt, rand, expected):
    assert backoff(attempt, base=0.1, cap=1.0, rand=rand) == pytest.approx(expected, abs=1e-5)


def test_backoff_is_random_within_its_bounds():
    delays = {backoff(3, base=0.1, cap=1.0) for _ in range(50)}
    assert all(0.2 <= d <= 0.4 for d in delays) and len(delays) > 1
