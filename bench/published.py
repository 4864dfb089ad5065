"""The one listener of the benchmarks: pushes tasks the host's way and records, stamped on
arrival, what the bridge publishes for them: the reply chunks (`letta_response_chunks`) and the
final responses (`letta_responses`); with `watch_speech`, also what it hands to speech, taken off
`tts_requests` the way the host's TTS service takes it (BRPOP); with `watch_avatar`, the avatar
cues (`AvatarEvent`s on the avatar channel, default `live2d_events`).

Subscribe (enter the context) before pushing anything. Times are time.perf_counter() of this
process, so they compare with the push times taken here.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from dataclasses import dataclass, field

from vtuber_letta.redis_api import async_redis_client
from vtuber_letta.settings import Settings

# redis-py 8's asyncio pool raises instead of waiting when it is exhausted: 128 viewers pushing at
# once need more than its default.
REDIS_POOL = 1024


@dataclass
class Seen:
    pushed: float
    final_future: asyncio.Future
    chunks: list[tuple[float, dict]] = field(default_factory=list)
    speech: list[tuple[float, dict]] = field(default_factory=list)  # TTS requests, as taken off the queue
    avatar: list[tuple[float, dict]] = field(default_factory=list)  # avatar cues, as they arrived

    @property
    def final(self) -> tuple[float, dict] | None:
        """(arrival time, body) of the final response, once it came."""
        return self.final_future.result() if self.final_future.done() else None


class Published:
    def __init__(self, settings: Settings, *, watch_speech: bool = False, watch_avatar: bool = False):
        self.settings = settings
        self.redis = async_redis_client(settings, max_connections=REDIS_POOL)
        self.pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
        self.tasks: dict[str, Seen] = {}
        self._watch_speech = watch_speech
        self._watch_avatar = watch_avatar

    async def __aenter__(self) -> "Published":
        channels = [self.settings.bridge_response_channel, self.settings.bridge_chunk_channel]
        if self._watch_avatar:
            channels.append(self.settings.bridge_avatar_channel)
        await self.pubsub.subscribe(*channels)
        self._readers = [asyncio.create_task(self._read())]
        if self._watch_speech:
            self._readers.append(asyncio.create_task(self._take_speech()))
        return self

    async def __aexit__(self, *exc_info) -> None:
        for reader in self._readers:
            reader.cancel()
        await asyncio.gather(*self._readers, return_exceptions=True)
        await self.pubsub.aclose()
        await self.redis.aclose()

    async def _read(self) -> None:
        chunk_channel, avatar_channel = self.settings.bridge_chunk_channel, self.settings.bridge_avatar_channel
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
            channel = channel.decode() if isinstance(channel, bytes) else channel
            if channel == chunk_channel:
                seen.chunks.append((arrived, body))
            elif channel == avatar_channel:
                seen.avatar.append((arrived, body))
            elif not seen.final_future.done():
                seen.final_future.set_result((arrived, body))

    async def _take_speech(self) -> None:
        while True:
            popped = await self.redis.brpop([self.settings.bridge_tts_queue], timeout=1)
            if popped is None:
                continue
            arrived = time.perf_counter()
            body = json.loads(popped[1])
            seen = self.tasks.get(body.get("task_id"))
            if seen is not None:
                seen.speech.append((arrived, body))

    async def push(self, viewer_id: str, text: str) -> str:
        """LPUSH one chat task the host's way; returns its task id."""
        task_id = f"bench-{uuid.uuid4().hex}"
        task = {"task_id": task_id, "type": "text", "user_id": viewer_id, "content": text, "source": "user",
                "meta": {"memory_type": "permanent"}}
        self.tasks[task_id] = Seen(pushed=time.perf_counter(), final_future=asyncio.get_running_loop().create_future())
        await self.redis.lpush(self.settings.bridge_request_queue, json.dumps(task, ensure_ascii=False))
        return task_id

    async def wait_final(self, task_ids: list[str], timeout: float = 600.0) -> None:
        """Until every task has its final response; TimeoutError after `timeout` seconds."""
        futures = [self.tasks[t].final_future for t in task_ids]
        _, pending = await asyncio.wait(futures, timeout=timeout)
        if pending:
            raise TimeoutError(f"{len(pending)} of {len(task_ids)} tasks got no response in {timeout:.0f}s")
