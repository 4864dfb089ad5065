"""Publish a reply sentence by sentence while the agent is still generating it, and hand the whole
reply to speech as soon as its words are complete.

The gateway hands every new piece of reply text to `ReplyStream.feed`; each completed sentence is
published at once as a `ReplyChunk` on the chunk channel and, with per-sentence speech, LPUSHed
to the TTS queue, both in one Redis round trip. These writes are not part of the atomic FINISH of
the task: they are a preview that lets speech start early, and after a retry a sentence may be
published again (consumers key on task_id + index). The final `TaskReply` stays the authority.

Speech never waits for tools: when the model moves on from its words to tool calls (an avatar cue,
a memory write), the gateway calls `words_done` and the reply goes to speech then — the last
sentence, and the whole-reply TTS request (or the text-only response) — in one MULTI with the
task's spoken marker, while Letta still receives the calls' arguments and runs the tools. FINISH
then publishes the final response, the avatar events and the done marker as usual, but no speech
again; a retry or a replay of the same task reads the marker and speaks nothing either. Words that
come after the hand-off anyway (rare: text after a tool call) are spoken sentence by sentence.
"""

from __future__ import annotations

from typing import Callable

from redis.asyncio import Redis

from bridge.outputs import speech_outputs
from bridge.queue import Output
from bridge.sentences import SentenceSplitter
from bridge.wire import ReplyChunk, TtsRequest, dump
from vtuber_letta import redis_keys as keys
from vtuber_letta.settings import Settings


async def already_spoken(redis: Redis, task_id: str) -> bool:
    """True when an earlier attempt handed this task's reply to speech before its turn ended."""
    return bool(await redis.exists(keys.task_spoken(task_id)))


class ReplyStream:
    def __init__(self, redis: Redis, settings: Settings, *, task_id: str, user_id: str,
                 clock: Callable[[], float], spoken_before: bool = False):
        self._redis = redis
        self._settings = settings
        self._task_id = task_id
        self._user_id = user_id
        self._clock = clock
        self._chunk_channel = settings.bridge_chunk_channel
        per_sentence = settings.bridge_tts_handoff and settings.bridge_tts_per_sentence
        self._tts_queue = settings.bridge_tts_queue if per_sentence and not spoken_before else None
        self._splitter = SentenceSplitter()
        self._text = ""
        self.sentences = 0  # chunks made so far
        self.tail: list[Output] = []  # the last chunks, sent with the FINISH of the task
        # An earlier attempt of this task already went to speech: this one only previews (chunks).
        self._mute = spoken_before
        self.handed_off = spoken_before  # the whole reply went to speech before FINISH

    @property
    def spoken(self) -> bool:
        """True once speech has the reply (sentence by sentence, or whole by words_done): FINISH
        must not queue it for speech again."""
        return self.handed_off or (self._tts_queue is not None and self.sentences > 0)

    @property
    def text(self) -> str:
        """The reply text streamed so far."""
        return self._text.strip()

    async def feed(self, delta: str) -> None:
        self._text += delta
        await self._send(self._outputs(self._splitter.feed(delta)))

    async def words_done(self) -> None:
        """The words are complete while the turn goes on: hand the reply to speech now."""
        if self.handed_off or not self.text:
            return
        outputs = self._outputs(self._splitter.flush())
        if self._tts_queue is None:  # whole-reply speech (per-sentence speech already has it all)
            outputs += speech_outputs(self._settings, self._task_id, self.text)
        outputs.append(Output("set", keys.task_spoken(self._task_id), "1"))
        await self._send(outputs, transaction=True)
        self.handed_off = True
        if self._settings.bridge_tts_handoff and not self._mute:
            # Anything said after this is late: it can only go to speech sentence by sentence.
            self._tts_queue = self._settings.bridge_tts_queue

    def close(self) -> list[Output]:
        """The last, unterminated sentence as outputs: they go out with the task's FINISH (one round
        trip less, and still before the final response)."""
        return self._outputs(self._splitter.flush())

    async def _send(self, outputs: list[Output], *, transaction: bool = False) -> None:
        if not outputs:
            return
        async with self._redis.pipeline(transaction=transaction) as pipe:
            for out in outputs:
                if out.op == "publish":
                    pipe.publish(out.key, out.value)
                elif out.op == "lpush":
                    pipe.lpush(out.key, out.value)
                else:  # the spoken marker
                    pipe.set(out.key, out.value, ex=self._settings.bridge_done_ttl)
            await pipe.execute()

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
