"""A worker's lease on one viewer: the viewer's lock (`vtl:active:{viewer}`) held with its token.

While the lease holds, nobody else works on the viewer; the lease renews the lock, acknowledges
the head of the viewer's queue (FINISH: outputs, pop, done markers in one script) and lets the
viewer go (RELEASE). bridge/worker.py is its only user, so the worker is the only caller of FINISH.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Sequence

from redis.exceptions import RedisError

from bridge.errors import describe_error
from bridge.queue import Finished, FinishResult, FinishStatus, Output, ReleaseStatus, ViewerQueues, cancel_point
from bridge.replica import loggable

log = logging.getLogger("vtuber_letta.bridge")


class LeaseLost(Exception):
    """Another worker owns the viewer now: nothing was acknowledged."""


class ViewerLease:
    def __init__(self, queues: ViewerQueues, viewer: str, token: str, *, ttl_ms: int, done_ttl: int, peek: int):
        self.queues = queues
        self.viewer = viewer
        self.token = token
        self.ttl_ms = ttl_ms
        self.done_ttl = done_ttl
        self.peek_count = peek  # how much of the queue is read at once (VTL_BRIDGE_COALESCE_MAX)
        self.lost = asyncio.Event()

    async def keep(self, replica_id: str) -> None:
        """Renew the lock every third of its TTL until cancelled; set `lost` when it is not ours."""
        while True:
            await asyncio.sleep(self.ttl_ms / 3000)
            cancel_point()
            try:
                if not await self.queues.renew(self.viewer, self.token, self.ttl_ms):
                    log.warning("bridge %s: lost the lock of viewer %s", replica_id, loggable(self.viewer))
                    self.lost.set()
                    return
            except (RedisError, OSError) as exc:
                log.warning("bridge %s: lock renewal: %s", replica_id, describe_error(exc))

    async def finish(self, tasks: Sequence[Finished], outputs: Sequence[Output]) -> FinishResult:
        """Acknowledge the first len(tasks) of the queue with their outputs; LeaseLost if not ours."""
        after = await self.queues.finish(self.viewer, self.token, tasks, done_ttl=self.done_ttl, outputs=outputs,
                                         peek=self.peek_count)
        if after.status is not FinishStatus.FINISHED:
            raise LeaseLost()
        return after

    async def release(self, *, yield_turn: bool) -> ReleaseStatus:
        return await self.queues.release(self.viewer, self.token, yield_turn=yield_turn)

    async def peek(self) -> list[bytes]:
        return await self.queues.peek(self.viewer, self.peek_count)
