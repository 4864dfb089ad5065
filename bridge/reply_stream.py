"""Publish a reply sentence by sentence while the agent is still generating it.

The gateway hands every new piece of reply text to `ReplyStream.feed`; each completed sentence is
published at once as a `ReplyChunk` on the chunk channel and, with per-sentence speech, LPUSHed
to the TTS queue, both in one Redis round trip. `close()` publishes the last, unterminated
sentence when the turn ends. These writes are not part of the atomic FINISH of the task: they are
a preview that lets speech start early, and after a retry a sentence may be published again
(consumers key on task_id + index). The final `LettaResponse` stays the authority.
"""

from __future__ import annotations

from typing import Callable

from redis.asyncio import Redis

from bridge.queue import Output
from bridge.sentences import SentenceSplitter
from bridge.wire import ReplyChunk, TtsRequest, dump
from vtuber_letta import redis_keys as keys
from vtuber_letta.settings import Settings


class ReplyStream:
    def __init__(self, redis: Redis, settings: Settings, *, task_id: str, user_id: str,
                 clock: Callable[[], float]):
        self._redis = redis
        self._task_id = task_id
        self._user_id = user_id
        self._clock = clock
        self._chunk_channel = settings.bridge_chunk_channel
        self._tts_queue = settings.bridge_tts_queue if settings.bridge_tts_handoff and settings.bridge_tts_per_sentence else None
        self._splitter = SentenceSplitter()
        self.sentences = 0  # chunks made so far
        self.tail: list[Output] = []  # the last chunks, sent with the FINISH of the task

    @property
    def spoken(self) -> bool:
        """True once a sentence went to the TTS queue (the whole reply must not be spoken again)."""
        return self._tts_queue is not None and self.sentences > 0

    async def feed(self, delta: str) -> None:
        outputs = self._outputs(self._splitter.feed(delta))
        if outputs:
            async with self._redis.pipeline(transaction=False) as pipe:
                for out in outputs:
                    (pipe.publish if out.op == "publish" else pipe.lpush)(out.key, out.value)
                await pipe.execute()

    def close(self) -> list[Output]:
        """The last, unterminated sentence as outputs: they go out with the task's FINISH (one round
        trip less, and still before the final response)."""
        return self._outputs(self._splitter.flush())

    def _outputs(self, sentences: list[str]) -> list[Output]:
        out: list[Output] = []
        now = self._clock()
        channel = keys.task_response_channel(self._task_id)
        for text in sentences:
            index = self.sentences
            self.sentences += 1
            chunk = ReplyChunk(task_id=self._task_id, user_id=self._user_id, index=index, text=text, timestamp=now)
            out.append(Output("publish", self._chunk_channel, dump(chunk)))
            if self._tts_queue is not None:
                speech = TtsRequest(message_id=f"letta-{self._task_id}-{index}", task_id=self._task_id, text=text,
                                    response_channel=channel, sentence_index=index)
                out.append(Output("lpush", self._tts_queue, dump(speech)))
        return out
