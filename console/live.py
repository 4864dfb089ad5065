"""The bridge's state as the console shows it, and "send again" for a dead letter.

Read from Redis, where every replica leaves it: heartbeats (`vtl:bridge:{replica}`, with the
turns each has in flight), the queue depths (bridge.queue.ViewerQueues.depths, the same numbers as
the bridge's metrics), the dead letters (bridge.wire.DeadLetter, newest first), the newest task
outcomes of every replica (bridge/outcome_log.py: when, viewer, task, outcome, seconds). Outcome
counters (answered, fallback, dead_letter, ...) exist only in a replica's Prometheus endpoint, so
they are read from the one at VTL_BRIDGE_METRICS_HOST:PORT when it answers.
"""

from __future__ import annotations

import json
import re
import time
import urllib.request
from dataclasses import dataclass

from pydantic import ValidationError

from bridge import outcome_log
from bridge.outcome_log import TaskOutcome
from bridge.queue import ViewerQueues
from bridge.wire import DeadLetter
from console.errors import ConsoleError
from vtuber_letta import redis_keys as keys
from vtuber_letta.dead_letter_list import SEND_AGAIN

DEAD_LETTERS_SHOWN = 50
TRUNCATED_MARK = "…[truncated]"  # bridge/service.py cuts a dead letter's raw at the payload limit
_OUTCOME_LINE = re.compile(r'^vtl_bridge_tasks_total\{outcome="([a-z_]+)"\}\s+([0-9.eE+]+)$', re.MULTILINE)



@dataclass(frozen=True)
class Replica:
    replica_id: str
    host: str
    pid: int | None
    in_flight: int
    beat_age_s: float  # seconds since its last heartbeat
    started: float | None


@dataclass(frozen=True)
class DeadLetterRow:
    entry: str  # the list item exactly (what "send again" names)
    letter: DeadLetter | None  # None: not a DeadLetter document
    resendable: bool


@dataclass(frozen=True)
class LiveState:
    replicas: list[Replica]
    depths: dict[str, int]
    outcomes: dict[str, int] | None  # None: no metrics endpoint answered
    dead_letters: list[DeadLetterRow]
    recent: list[TaskOutcome]  # newest first

    @property
    def in_flight(self) -> int:
        return sum(r.in_flight for r in self.replicas)


async def live_state(redis_async, settings) -> LiveState:
    """Everything the live page shows. redis_async: an asyncio client (bytes or decoded)."""
    queues = ViewerQueues(redis_async, request_queue=settings.bridge_request_queue,
                          max_payload_bytes=settings.bridge_max_payload_bytes,
                          dead_letter_max=settings.bridge_dead_letter_max)
    depths = await queues.depths()
    replicas = []
    now = time.time()
    async for key in redis_async.scan_iter(match=keys.BRIDGE_HEARTBEAT_PREFIX + "*", count=200):
        raw = await redis_async.get(key)
        beat = _json(raw)
        if beat is None:
            continue
        replicas.append(Replica(str(beat.get("replica_id", "?")), str(beat.get("host", "")), beat.get("pid"),
                                int(beat.get("in_flight") or 0), max(0.0, now - float(beat.get("at") or now)),
                                beat.get("started")))
    replicas.sort(key=lambda r: r.replica_id)
    entries = await redis_async.lrange(keys.BRIDGE_DEAD_LETTERS, 0, DEAD_LETTERS_SHOWN - 1)
    recent = await outcome_log.recent(redis_async)
    return LiveState(replicas, depths, bridge_outcomes(settings), [dead_letter_row(e) for e in entries], recent)


def dead_letter_row(entry: bytes | str) -> DeadLetterRow:
    text = entry.decode("utf-8", "replace") if isinstance(entry, bytes) else entry
    try:
        letter = DeadLetter.model_validate_json(text)
    except ValidationError:
        return DeadLetterRow(text, None, False)
    return DeadLetterRow(text, letter, not letter.raw.endswith(TRUNCATED_MARK))


def bridge_outcomes(settings, timeout: float = 0.3) -> dict[str, int] | None:
    """Tasks by outcome since that replica started, from its /metrics; None when it does not answer."""
    if not settings.bridge_metrics_port:
        return None
    host = "127.0.0.1" if settings.bridge_metrics_host in ("0.0.0.0", "::") else settings.bridge_metrics_host
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(f"http://{host}:{settings.bridge_metrics_port}/metrics", timeout=timeout) as response:
            text = response.read().decode("utf-8", "replace")
    except (OSError, ValueError):
        return None
    return {name: int(float(value)) for name, value in _OUTCOME_LINE.findall(text)}


async def send_again(redis_async, settings, entry: str) -> str:
    """Put a dead letter's payload back on the request list; the message to show."""
    row = dead_letter_row(entry)
    if row.letter is None:
        raise ConsoleError("this entry is not a dead letter the bridge wrote; it cannot be sent again")
    if not row.resendable:
        raise ConsoleError("this dead letter's payload was cut at the size limit; sending it again would send a different task")
    # one step, which keeps the dead letters' byte counter too: sent once however often it is clicked
    moved = await redis_async.eval(SEND_AGAIN, 3, keys.BRIDGE_DEAD_LETTERS, keys.BRIDGE_DEAD_LETTER_BYTES,
                                   settings.bridge_request_queue, entry, row.letter.raw)
    if not int(moved):
        raise ConsoleError("that dead letter is no longer in the list (already sent again or forgotten)")
    return f"task {row.letter.task_id or '(no id)'} is back on {settings.bridge_request_queue}"


def _json(raw) -> dict | None:
    try:
        value = json.loads(raw)
    except (TypeError, ValueError):
        return None
    return value if isinstance(value, dict) else None
