"""Every Redis key and channel name vtuber-letta reads or writes, in one place.

Host-owned names (user_input_queue, tts_requests, task_response:{id}) come from
Free-Agent-Vtuber and must not change; ours are prefixed `vtl:` so they can
never collide with the host's keys.

Per-viewer names embed the viewer id as it is (any printable text that passes
vtuber_letta/viewer_ids.py, at most 512 bytes, so every key stays short): Redis keys are
binary-safe, and no name here is ever used as a SCAN/KEYS pattern with an id inside it, so
`*`, `?`, `[`, `{`, spaces and `/` in an id are just bytes.
"""

from __future__ import annotations

PREFIX = "vtl"

# --- names owned by the host (wire-compatible, do not rename) ---
USER_INPUT_QUEUE = "user_input_queue"  # memory-python's list (short-term memory path)
TTS_REQUESTS = "tts_requests"  # tts service's list
LETTA_REQUESTS = "letta_requests"  # list: tasks for Letta (the plan's name)
LETTA_RESPONSES = "letta_responses"  # pub/sub: Letta's replies (the plan's name)
LIVE2D_EVENTS = "live2d_events"  # pub/sub: avatar events from set_expression/play_motion


def task_response_channel(task_id: str) -> str:
    """The host's output-handler channel for one task."""
    return f"task_response:{task_id}"


# --- names owned by vtuber-letta ---
VIEWER_AGENTS = f"{PREFIX}:viewer_agents"  # hash viewer_id -> agent_id, never expires


def viewer_lock(viewer_id: str) -> str:
    """Lock held while a viewer's agent is created (and while one of their turns runs)."""
    return f"{PREFIX}:lock:viewer:{viewer_id}"


# ---------------------------------------------------------------------------
# bridge (bridge/): the reliable per-viewer queue. Owned by the bridge; every
# name below is written only by the bridge (bridge/) and its Lua scripts.
# Flow: request list --BLMOVE--> STAGING --route.lua--> viewer_queue(v) (+ PENDING, READY)
#       or --> TRIAGE (unroutable, dead-lettered by Python) --> DEAD_LETTERS.
# ---------------------------------------------------------------------------
BRIDGE_STAGING = f"{PREFIX}:staging"  # list: shared intake buffer, drained oldest-first (RIGHT)
BRIDGE_TRIAGE = f"{PREFIX}:triage"  # list: payloads the route script could not place (no sane user_id)
BRIDGE_READY = f"{PREFIX}:ready"  # list of viewer ids with queued work and no worker
BRIDGE_PENDING = f"{PREFIX}:pending"  # set of viewer ids whose queue may be non-empty
BRIDGE_DEAD_LETTERS = f"{PREFIX}:dead_letters"  # list of DeadLetter JSON, newest at the LEFT
# the sum of the dead letters' lengths in bytes, kept by every script that adds or removes one
# (vtuber_letta/dead_letter_list.py): what bounds the list in bytes
BRIDGE_DEAD_LETTER_BYTES = f"{PREFIX}:dead_letters:bytes"
BRIDGE_ATTEMPTS = f"{PREFIX}:attempts"  # hash task_id -> attempts so far (deleted on acknowledge)
BRIDGE_COUNTED = f"{PREFIX}:counted"  # hash task_id -> 1 once its viewer stats were counted
# hash task_id -> when ROUTE put it in its viewer queue (Redis TIME, ms; deleted on acknowledge):
# a chat task's age when its turn comes (VTL_BRIDGE_STALE_CHAT_AFTER)
BRIDGE_INTAKE = f"{PREFIX}:intake"
# list of the newest task outcomes (bridge/outcome_log.py: ids, outcome, seconds; no text), newest at
# the LEFT, capped; the console's Live page shows it and `agent forget` removes the viewer's entries.
BRIDGE_OUTCOMES = f"{PREFIX}:outcomes"
VIEWER_QUEUE_PREFIX = f"{PREFIX}:vq:"
VIEWER_ACTIVE_PREFIX = f"{PREFIX}:active:"
TASK_DONE_PREFIX = f"{PREFIX}:done:"
TASK_SPOKEN_PREFIX = f"{PREFIX}:spoken:"
TASK_CUED_PREFIX = f"{PREFIX}:cued:"
BRIDGE_HEARTBEAT_PREFIX = f"{PREFIX}:bridge:"
VIEWER_STATS_PREFIX = f"{PREFIX}:viewer_stats:"
VIEWER_TASKS_PREFIX = f"{PREFIX}:viewer_tasks:"
# pub/sub: a viewer id whose agent was deleted (`agent forget`); every bridge drops its cached agent id.
AGENT_INVALIDATIONS = f"{PREFIX}:agent_invalidations"
# hash viewer hash (provisioning.naming.viewer_hash) -> when forgotten (ISO time); never expires.
# A restore applies it to the backup it restores (provisioning/backup.py): no raw id is kept.
FORGOTTEN = f"{PREFIX}:forgotten"


def viewer_queue(viewer_id: str) -> str:
    """List of one viewer's raw tasks, oldest at the LEFT (head = the task being worked on)."""
    return f"{VIEWER_QUEUE_PREFIX}{viewer_id}"


def viewer_active(viewer_id: str) -> str:
    """The bridge worker lock of one viewer (random token, PX TTL renewed while working).

    Distinct from viewer_lock(): provisioning may take that one inside a turn. `provision` (template
    upgrades) and `agent forget` take this one too (vtuber_letta.viewer_lock.ViewerHold), so they never change
    an agent while its viewer's turn is in flight.
    """
    return f"{VIEWER_ACTIVE_PREFIX}{viewer_id}"


def task_done(task_id: str) -> str:
    """Set (with a TTL) when a task was acknowledged; holds only how it ended, one word ("answered",
    "coalesced", "forwarded", "stale", ...): only its existence is ever read."""
    return f"{TASK_DONE_PREFIX}{task_id}"


def task_spoken(task_id: str) -> str:
    """Set (with the done markers' TTL, value "1") when a task's whole reply went to speech before
    its turn ended (the words were complete while tools still ran): a retry or a replay of that turn
    must not speak it again."""
    return f"{TASK_SPOKEN_PREFIX}{task_id}"


def task_cued(task_id: str) -> str:
    """Set (with the done markers' TTL) of the tool_call_ids of a task's avatar cues published before
    its turn ended (as soon as the model had written each call): FINISH, a retry or a replay of that
    turn must not publish them again."""
    return f"{TASK_CUED_PREFIX}{task_id}"


def viewer_tasks(viewer_id: str) -> str:
    """Set of one viewer's task ids that have a done marker (same TTL as the markers, refreshed by
    FINISH): how `agent forget` finds that viewer's markers, which are keyed by task id only."""
    return f"{VIEWER_TASKS_PREFIX}{viewer_id}"


def bridge_heartbeat(replica_id: str) -> str:
    """A live bridge replica's heartbeat (short TTL); `vtuber-letta bridge --check` looks for these."""
    return f"{BRIDGE_HEARTBEAT_PREFIX}{replica_id}"


def viewer_stats(viewer_id: str) -> str:
    """Hash of platform-verified counters of one viewer (first/last seen, visits, support), never expires.

    One field is not the bridge's: STATS_EPISODE_THROUGH, written by provisioning/episodes.py. It
    lives here so that `agent forget` removes it and a backup carries it with the viewer's stats.
    """
    return f"{VIEWER_STATS_PREFIX}{viewer_id}"


# Fields of the viewer stats hash read outside the bridge (epoch seconds, as repr(float)):
STATS_LAST_SEEN = "last_seen"  # the viewer's last task as the bridge counted it (bridge/viewer_stats.py)
STATS_EPISODE_THROUGH = "episode_through"  # their chat up to here is in an episode (provisioning/episodes.py)
# Held while episodes are written (`stream end`, `stream sweep`): one run at a time, so two never
# summarise the same conversation.
EPISODES_LOCK = f"{PREFIX}:lock:episodes"
