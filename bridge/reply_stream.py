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

The face does not wait for tools either: as soon as the model has written an avatar call
(set_expression / play_motion) whole, `cue` checks it by the tool's own rule against the
persona's names (tools/avatar_cues.py) and, if the tool will accept it, publishes its
`AvatarEvent` in one MULTI with the call's id in the task's cued marker (`vtl:cued:{task}`). FINISH
publishes only the cues not published so; a retry or a replay reads the marker and publishes none
of those again. A call the tool would refuse is not published early: the tool returns its error to
the model, and a call the tool accepted after all (the persona changed since the agent was
provisioned) still goes out with FINISH.
"""

from __future__ import annotations

import logging
from typing import Callable, Iterable

from redis.asyncio import Redis

from agent_templates.files import TemplateError
from agent_templates.persona import avatar_secrets, load_persona_config
from bridge.gateway import AvatarCall
from bridge.outputs import avatar_output, speech_outputs
from bridge.queue import Output
from bridge.sentences import SentenceSplitter
from bridge.wire import ReplyChunk, TtsRequest, dump
from tools.avatar_cues import AvatarNames, avatar_cue_problem
from tools.avatar_names import AVATAR_EXPRESSIONS_ENV, AVATAR_MOTIONS_ENV
from vtuber_letta import redis_keys as keys
from vtuber_letta.settings import Settings

log = logging.getLogger("vtuber_letta.bridge")


async def already_spoken(redis: Redis, task_id: str) -> bool:
    """True when an earlier attempt handed this task's reply to speech before its turn ended."""
    return bool(await redis.exists(keys.task_spoken(task_id)))


async def already_cued(redis: Redis, task_id: str) -> frozenset[str]:
    """The tool_call_ids of this task's avatar cues an earlier attempt published before its turn ended."""
    members = await redis.smembers(keys.task_cued(task_id))
    return frozenset(m.decode() if isinstance(m, bytes) else m for m in members)


def persona_avatar_names(settings: Settings) -> AvatarNames | None:
    """The avatar's names as provisioning gives them to the agents this bridge creates (the persona
    config, as provisioning/blueprint.py loads it); None (no cue published early) when it cannot be read."""
    try:
        secrets = avatar_secrets(load_persona_config(settings.persona_config, fallback_to_sample=True))
    except TemplateError as exc:
        log.warning("avatar cues go out when the turn ends: the persona config cannot be read (%s)", exc)
        return None
    return AvatarNames.from_secrets(secrets[AVATAR_EXPRESSIONS_ENV], secrets[AVATAR_MOTIONS_ENV])


def unpublished(calls: Iterable[AvatarCall], cued: Iterable[str]) -> tuple[AvatarCall, ...]:
    """The avatar calls whose cue has not gone out yet (FINISH publishes these)."""
    done = set(cued)
    return tuple(call for call in calls if call.call_id is None or call.call_id not in done)


class ReplyStream:
    def __init__(self, redis: Redis, settings: Settings, *, task_id: str, user_id: str,
                 clock: Callable[[], float], spoken_before: bool = False,
                 avatar_names: AvatarNames | None = None, cued_before: frozenset[str] = frozenset()):
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
        self._avatar_names = avatar_names
        self.cued: set[str] = set(cued_before)  # tool_call_ids of the cues already published

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

    async def cue(self, call: AvatarCall) -> None:
        """An avatar call the model has written whole: publish its cue now if the tool will accept it."""
        if self._avatar_names is None or call.call_id is None or call.call_id in self.cued:
            return
        problem = avatar_cue_problem(call.tool, call.args, self._avatar_names)
        if problem is not None:  # the tool refuses it too and tells the model why; nothing to show
            log.info("task=%s avatar cue %s not published early: %r", self._task_id, call.tool, problem[:200])
            return
        event = avatar_output(self._settings, call, task_id=self._task_id, user_id=self._user_id, now=self._clock())
        marker = keys.task_cued(self._task_id)
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.publish(event.key, event.value)
            pipe.sadd(marker, call.call_id)
            pipe.expire(marker, self._settings.bridge_done_ttl)
            await pipe.execute()
        self.cued.add(call.call_id)

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
