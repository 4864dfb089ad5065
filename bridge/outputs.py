"""What the bridge writes for a task, built without touching Redis: the reply's outputs, the
fallback's, the forward to memory-python's, a stale chat's, the dead letter's. Pure: the worker
hands them to FINISH, which writes them atomically with acknowledging the task (bridge/queue.py).

A task's done marker (`vtl:done:{task}`) holds only the outcome word (`done_markers`): only its
existence is ever read, and a reply kept for the marker's whole TTL would cost Redis memory."""

from __future__ import annotations

import json
from typing import Any, Sequence

from bridge.decisions import Chat, Outcome
from bridge.gateway import AvatarCall, TurnResult
from bridge.queue import Output
from bridge.wire import AvatarEvent, DeadLetter, Stage, TaskReply, TaskRequest, TaskResponse, TtsRequest, dump
from vtuber_letta import redis_keys as keys
from vtuber_letta.settings import Settings


def speech_outputs(settings: Settings, task_id: str, text: str) -> list[Output]:
    """The whole reply's way to speech: a TTS request, or the text-only response without TTS."""
    channel = keys.task_response_channel(task_id)
    if settings.bridge_tts_handoff:
        speech = TtsRequest(message_id=f"letta-{task_id}", task_id=task_id, text=text, response_channel=channel)
        return [Output("lpush", settings.bridge_tts_queue, dump(speech))]
    return [Output("publish", channel, dump(TaskResponse(text=text)))]


def done_markers(batch_size: int, outcome: Outcome) -> list[str]:
    """The done marker of each task of a turn that ended with `outcome`: the last task carries the
    turn's reply (its outcome), each earlier one was answered by it (coalesced)."""
    return [Outcome.COALESCED.value] * (batch_size - 1) + [outcome.value]


def avatar_output(settings: Settings, call: AvatarCall, *, task_id: str, user_id: str, now: float) -> Output:
    """One avatar cue on the avatar channel (at FINISH, or as soon as its call was written: reply_stream.py)."""
    event = AvatarEvent(tool=call.tool, args=call.args, task_id=task_id, user_id=user_id, timestamp=now)
    return Output("publish", settings.bridge_avatar_channel, dump(event))


def reply_outputs(
    settings: Settings, batch: Sequence[Chat], result: TurnResult, *, tail: Sequence[Output], spoken: bool, now: float
) -> list[Output]:
    """The outputs of an answered turn.

    The last task of the batch carries the reply (avatar events, words); each earlier one gets an
    empty response naming the task that answered it. `tail`: the stream's last sentences, first;
    `spoken`: the reply already went to speech (sentence by sentence, or whole before the tools),
    so it is not queued for speech again."""
    s = settings
    answering = batch[-1].task_id
    viewer = batch[0].request.user_id
    outputs: list[Output] = list(tail)
    for chat in batch[:-1]:
        response = TaskReply(task_id=chat.task_id, user_id=viewer, response_text="", memory_updated=False,
                             timestamp=now, answered_by=answering)
        outputs.append(Output("publish", s.bridge_response_channel, dump(response)))
        outputs.append(Output("publish", keys.task_response_channel(chat.task_id),
                              dump(TaskResponse(text="", answered_by=answering))))
    response = TaskReply(
        task_id=answering, user_id=viewer, response_text=result.reply_text, memory_updated=result.memory_updated,
        timestamp=now, silent=result.silent, answers=[chat.task_id for chat in batch] if len(batch) > 1 else None,
    )
    outputs.append(Output("publish", s.bridge_response_channel, dump(response)))
    for call in result.avatar_calls:  # those not published before the turn ended (bridge/turn.py)
        outputs.append(avatar_output(s, call, task_id=answering, user_id=viewer, now=now))
    if result.silent and not spoken:
        outputs.append(Output("publish", keys.task_response_channel(answering), dump(TaskResponse(text="", silent=True))))
    elif not spoken:
        outputs += speech_outputs(s, answering, result.reply_text)
    return outputs


def stale_outputs(settings: Settings, request: TaskRequest, *, now: float) -> list[Output]:
    """A chat task not answered because it waited too long: its record on the response channel
    says so, and its `task_response:{task}` gets an empty message (the host's output handler waits
    for one), as a silent turn's does. Nothing goes to speech."""
    record = TaskReply(task_id=request.task_id, user_id=request.user_id, response_text="", memory_updated=False,
                       timestamp=now, stale=True)
    return [Output("publish", settings.bridge_response_channel, dump(record)),
            Output("publish", keys.task_response_channel(request.task_id), dump(TaskResponse(text="", stale=True)))]


def forward_output(settings: Settings, raw: bytes) -> Output:
    """A task for memory-python, byte for byte."""
    return Output("lpush", settings.bridge_memory_queue, raw)


def fallback_outputs(settings: Settings, batch: Sequence[Chat]) -> list[Output]:
    """Letta is down: the tasks for memory-python, marked meta.letta_fallback = true."""
    outputs = []
    for chat in batch:
        payload: dict[str, Any] = json.loads(chat.raw)
        meta = payload.get("meta")
        payload["meta"] = {**(meta if isinstance(meta, dict) else {}), "letta_fallback": True}
        outputs.append(Output("lpush", settings.bridge_memory_queue, json.dumps(payload, ensure_ascii=False)))
    return outputs


def dead_letter_entry(
    raw: bytes, reason: str, *, stage: Stage, task_id: str | None, user_id: str | None, attempts: int | None,
    replica_id: str, at: float, max_bytes: int,
) -> str:
    """One dead letter: the reason, the raw payload (cut at max_bytes), where it failed and who wrote it."""
    text = raw[:max_bytes].decode("utf-8", "replace") + ("…[truncated]" if len(raw) > max_bytes else "")
    return dump(DeadLetter(
        reason=reason, raw=text, task_id=task_id, user_id=user_id, stage=stage,
        attempts=attempts, replica_id=replica_id, at=at,
    ))


def task_id_of(raw: bytes) -> str | None:
    """The task id of a raw payload, if it has one (an earlier member of a failing group)."""
    try:
        return json.loads(raw).get("task_id")
    except (ValueError, AttributeError):
        return None
