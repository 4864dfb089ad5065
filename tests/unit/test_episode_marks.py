"""Who is due an episode, and the marks that keep each conversation summarised once
(provisioning/episodes.py): the pure choices, and the marks in a real Redis beside the stats the
bridge counts (bridge/viewer_stats.py through its own COUNT script)."""

from __future__ import annotations

from datetime import datetime, timezone

import pytest
import redis

from bridge.viewer_stats import COUNT, stats_ops
from bridge.wire import TaskRequest
from provisioning import episodes
from provisioning.episodes import due_after_silence, read_marks, sweep_silent, unsummarised_since
from vtuber_letta import redis_keys as keys
from vtuber_letta.settings import Settings

H = 3600.0
NOW = 1_800_000_000.0


@pytest.mark.parametrize(("seen", "through", "earliest", "expected"), [
    (None, None, NOW - 6 * H, NOW - 6 * H),  # never counted by the bridge: Letta's history decides
    (None, NOW - H, NOW - 6 * H, NOW - H),  # ... after their last episode
    (NOW - H, None, NOW - 6 * H, NOW - 6 * H),  # spoke this stream, never summarised
    (NOW - H, NOW - 2 * H, NOW - 6 * H, NOW - 2 * H),  # spoke since their last episode: only what is new
    (NOW - H, NOW - H, NOW - 6 * H, None),  # their last turn is in their last episode
    (NOW - 2 * H, NOW - H, NOW - 6 * H, None),
    (NOW - 7 * H, None, NOW - 6 * H, None),  # did not speak in the window
    (NOW - H, NOW - 9 * H, NOW - 6 * H, NOW - 6 * H),  # an old episode does not widen the window
])
def test_unsummarised_since(seen, through, earliest, expected):
    assert unsummarised_since(seen, through, earliest) == expected


@pytest.mark.parametrize(("seen", "through", "expected"), [
    (NOW - 4 * H, None, NOW - 10 * H),  # silent 4 h, never summarised: up to 6 h before their last turn
    (NOW - 4 * H, NOW - 5 * H, NOW - 5 * H),  # silent, turns since their last episode
    (NOW - 4 * H, NOW - 4 * H, None),  # silent, but already summarised (a second sweep, or stream end did it)
    (NOW - 2 * H, None, None),  # still talking (last turn 2 h ago < 3 h)
    (NOW - 3 * H, None, NOW - 9 * H),  # exactly the silence: due
    (None, None, None),  # never counted by the bridge: the sweep cannot tell, stream end can
])
def test_due_after_silence(seen, through, expected):
    assert due_after_silence(seen, through, NOW, 3 * H, 6 * H) == expected


def test_marks_sit_beside_the_bridges_stats(redis_url):
    conn = redis.Redis.from_url(redis_url, decode_responses=True)
    count = conn.register_script(COUNT)
    chat = TaskRequest.model_validate({"task_id": "t1", "type": "text", "user_id": "twitch:a", "content": "hi",
                                       "meta": {"memory_type": "permanent"}})
    args = ["t1"] + [part for op in stats_ops(chat, NOW - 4 * H) for part in op]
    count(keys=[keys.BRIDGE_COUNTED, keys.viewer_stats("twitch:a")], args=args)
    conn.hset(keys.viewer_stats("twitch:b"), "last_seen", "not a number")

    marks = read_marks(conn, ["twitch:a", "twitch:b", "twitch:never"])
    assert marks == [(NOW - 4 * H, None), (None, None), (None, None)]
    episodes._mark(conn, "twitch:a", NOW - 4 * H + 5)
    assert read_marks(conn, ["twitch:a"]) == [(NOW - 4 * H, NOW - 4 * H + 5)]
    # the next task the bridge counts leaves the mark alone, and makes the viewer due again later
    later = TaskRequest.model_validate({**chat.model_dump(), "task_id": "t2"})
    count(keys=[keys.BRIDGE_COUNTED, keys.viewer_stats("twitch:a")],
          args=["t2"] + [part for op in stats_ops(later, NOW - H) for part in op])
    seen, through = read_marks(conn, ["twitch:a"])[0]
    assert (seen, through) == (NOW - H, NOW - 4 * H + 5)
    assert due_after_silence(seen, through, NOW + 3 * H, 3 * H, 6 * H) == through


def _settings(redis_url: str, tmp_path, **values) -> Settings:
    return Settings(_env_file=None, REDIS_URL=redis_url, LETTA_API_URL="http://127.0.0.1:9", LETTA_API_KEY="x",
                    VTL_DATA_DIR=str(tmp_path), **values)


def test_off_is_a_no_op_and_one_run_at_a_time(redis_url, tmp_path):
    conn = redis.Redis.from_url(redis_url, decode_responses=True)
    conn.hset(keys.VIEWER_AGENTS, "twitch:a", "agent-1")
    conn.hset(keys.viewer_stats("twitch:a"), "last_seen", repr(NOW - 4 * H))
    late = datetime.fromtimestamp(NOW, timezone.utc)
    off = sweep_silent(_settings(redis_url, tmp_path, VTL_EPISODES=False), now=late)
    assert off.render().startswith("episodes are off") and not conn.exists(keys.EPISODES_LOCK)

    held = conn.lock(keys.EPISODES_LOCK, timeout=60)
    assert held.acquire(blocking=False)
    busy = sweep_silent(_settings(redis_url, tmp_path), now=late)  # would ask Letta (unreachable) if it ran
    assert busy.busy and not busy.summarised and "in progress" in busy.render()
    held.release()
    assert conn.hget(keys.viewer_stats("twitch:a"), keys.STATS_EPISODE_THROUGH) is None
