"""Everything the bridge publishes for some tasks, stamped on arrival: the reply chunks
(`letta_response_chunks`) and the final responses (`letta_responses`).

Subscribe (enter the context) before pushing anything; `wait_final(task_ids)` returns once every
task has its final response. Times are time.perf_counter() of this process, so they compare with
the push times taken here.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from dataclasses import dataclass, field

from vtuber_letta.redis_api import async_redis_client
from vtuber_letta.settings import Settings


@dataclass
class Seen:
    pushed: float = 0.0
    chunks: list[tuple[float, dict]] = field(default_factory=list)
    final: tuple[float, dict] | None = None


class Published:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.redis = async_redis_client(settings)
        self.pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
        self.tasks: dict[str, Seen] = {}
        self._changed = asyncio.Event()

    async def __aenter__(self) -> "Published":
        await self.pubsub.subscribe(self.settings.bridge_response_channel, self.settings.bridge_chunk_channel)
        self._reader = asyncio.create_task(self._read())
        return self

    async def __aexit__(self, *exc_info) -> None:
        self._reader.cancel()
        await asyncio.gather(self._reader, return_exceptions=True)
        await self.pubsub.aclose()
        await self.redis.aclose()

    async def _read(self) -> None:
        chunk_channel = self.settings.bridge_chunk_channel
        async for message in self.pubsub.listen():
            arrived = time.perf_counter()
            try:
                body = json.loads(message["data"])
            except (TypeError, ValueError):
                continue
            seen = self.tasks.get(body.get("task_id"))
            if seen is None:
                continue
            channel = message["channel"]
            if (channel.decode() if isinstance(channel, bytes) else channel) == chunk_channel:
                seen.chunks.append((arrived, body))
            else:
                seen.final = (arrived, body)
            self._changed.set()

    async def push(self, viewer_id: str, text: str) -> str:
        """LPUSH one chat task the host's way; returns its task id."""
        task_id = f"bench-{uuid.uuid4().hex}"
        task = {"task_id": task_id, "type": "text", "user_id": viewer_id, "content": text, "source": "user",
                "meta": {"memory_type": "permanent"}}
        self.tasks[task_id] = seen = Seen()
        seen.pushed = time.perf_counter()
        await self.redis.lpush(self.settings.bridge_request_queue, json.dumps(task, ensure_ascii=False))
        return task_id

    async def wait_final(self, task_ids: list[str], timeout: float = 600.0) -> None:
        deadline = time.perf_counter() + timeout
        while any(self.tasks[t].final is None for t in task_ids):
            self._changed.clear()
            left = deadline - time.perf_counter()
            if left <= 0:
                missing = sum(self.tasks[t].final is None for t in task_ids)
                raise TimeoutError(f"{missing} of {len(task_ids)} tasks got no response in {timeout:.0f}s")
            try:
                await asyncio.wait_for(self._changed.wait(), left)
            except asyncio.TimeoutError:
                pass
