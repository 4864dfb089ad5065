"""The newest task outcomes, for the console's Live page: a short capped Redis list.

After each task's outcome (where it is counted, bridge/worker.py and the triage in service.py)
`record` LPUSHes one `TaskOutcome` on `vtl:outcomes` and LTRIMs the list to `KEPT`, in one MULTI
pipeline, in the background: it never delays or fails a turn (the task is already acknowledged or
left at the head by then; a Redis error here is logged and dropped, the counters in
bridge/metrics.py still count it).

An entry holds ids, the outcome and the seconds the task took, never the viewer's or the reply's
text. It does hold the raw viewer id, because the page links each entry to the viewer; `agent
forget` removes that viewer's entries (provisioning/forget.py, matching `user_id` as it does for
dead letters), so a forgotten viewer is not left in a list that, on a quiet channel, can hold
days of tasks.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from pydantic import BaseModel, ValidationError
from redis.exceptions import RedisError

from bridge.errors import describe_error
from bridge.wire import dump
from vtuber_letta import redis_keys as keys

log = logging.getLogger("vtuber_letta.bridge")

KEPT = 200  # entries in the list; the console shows the newest SHOWN of them
SHOWN = 100
DRAIN_TIMEOUT_S = 1.0


class TaskOutcome(BaseModel):
    """One entry of `vtl:outcomes`. Example: {"at": 1767000000.5, "outcome": "answered",
    "seconds": 1.42, "task_id": "3f0c9a", "user_id": "bilibili:12345", "replica_id": "host-1234-ab12"}"""

    at: float
    outcome: str  # a bridge.decisions.Outcome value
    seconds: float  # from the worker taking the task to its outcome (the turn, for a Letta task)
    task_id: str | None = None
    user_id: str | None = None
    replica_id: str


class OutcomeLog:
    """One replica's writer of the list: entries wait here and ONE background task writes them,
    all that waits in one pipeline, so a burst of outcomes takes one Redis connection, never one
    each from the pool the turns need (and at most KEPT wait: older ones are dropped first)."""

    def __init__(self) -> None:
        self._waiting: list[str] = []
        self._writer: asyncio.Task | None = None

    def note(self, redis: Any, entry: TaskOutcome) -> None:
        if len(self._waiting) >= KEPT:
            del self._waiting[0]
        self._waiting.append(dump(entry))
        if self._writer is None or self._writer.done():
            self._writer = asyncio.get_running_loop().create_task(self._write_waiting(redis))

    async def _write_waiting(self, redis: Any) -> None:
        while self._waiting:
            batch, self._waiting = self._waiting, []
            try:
                async with redis.pipeline(transaction=True) as pipe:
                    pipe.lpush(keys.BRIDGE_OUTCOMES, *batch)  # the last of the batch ends up first: newest
                    pipe.ltrim(keys.BRIDGE_OUTCOMES, 0, KEPT - 1)
                    await pipe.execute()
            except (RedisError, OSError) as exc:
                log.warning("bridge: %d task outcome(s) not recorded for the console: %s", len(batch), describe_error(exc))

    async def drain(self, timeout: float = DRAIN_TIMEOUT_S) -> None:
        """Let the writes under way end (a stopping replica's last outcomes); cancel them after `timeout`."""
        writer = self._writer
        if writer is None or writer.done():
            return
        _, late = await asyncio.wait({writer}, timeout=timeout)
        if late:
            writer.cancel()
            await asyncio.wait({writer}, timeout=timeout)


def record(replica: Any, viewer: str | None, task_id: str | None, outcome: str, seconds: float) -> None:
    """Count one task's outcome (the `vtl_bridge_tasks_total` counter) and put it on the list, in the
    background. Never raises: a failure of the list is the console's loss, never the turn's.
    replica: the bridge.replica.Replica that handled the task."""
    try:
        replica.metrics.outcomes.labels(outcome).inc()
        entry = TaskOutcome(at=replica.clock(), outcome=outcome, seconds=round(max(0.0, seconds), 3),
                            task_id=task_id, user_id=viewer, replica_id=replica.replica_id)
        replica.outcome_log.note(replica.queues.redis, entry)
    except Exception as exc:  # see the docstring
        log.warning("bridge: outcome of task %s not recorded for the console: %s", task_id or "-", describe_error(exc))


async def recent(redis: Any, count: int = SHOWN) -> list[TaskOutcome]:
    """The newest `count` outcomes, newest first (entries that are not a TaskOutcome are skipped)."""
    out = []
    for raw in await redis.lrange(keys.BRIDGE_OUTCOMES, 0, count - 1):
        try:
            out.append(TaskOutcome.model_validate_json(raw))
        except ValidationError:
            continue
    return out
