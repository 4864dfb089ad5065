"""The Letta turn of one task (or of a burst coalesced with it): what to send, how often to try,
and what came of it. It acknowledges nothing: it returns a decision (bridge/decisions.py) that
the viewer's worker acts on.

Per turn: the chat messages waiting behind the head join it (coalescing); each attempt is
counted (and the viewer's verified stats with it, once per task); the retry policy
(bridge/retry_policy.py) says whether to send at all, and after a failure whether to retry, split
the group, fall back or dead-letter. A turn: ensure the viewer's agent, record a live event in
memory, replay the answer if an earlier attempt already reached the agent, else send it.
One LettaTurn serves every worker of a replica (it keeps the replica's Letta-down hold).
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import replace
from typing import Awaitable, Callable, TypeVar

from redis.asyncio import Redis
from redis.exceptions import RedisError

from bridge.decisions import Abandoned, Answered, Chat, DeadLetter, Decision, FallBack, Outcome, Stale
from bridge.errors import Disposition, classify_error, describe_error
from bridge.gateway import LettaGateway, TurnMessage, TurnResult, VerifiedEvent
from bridge.queue import TaskAge, cancel_point
from bridge.replica import Replica, loggable
from bridge.reply_stream import ReplyStream, already_cued, already_spoken, persona_avatar_names, unpublished
from bridge.retry_policy import Action, Switches, backoff, next_action
from bridge.turn_text import compose_turn_text
from bridge.viewer_stats import stats_ops, totals_from_stats
from bridge.wire import CHAT_TYPES, TaskRequest, WireError, parse_request, read_input_file
from vtuber_letta.viewer_ids import split_platform

log = logging.getLogger("vtuber_letta.bridge")
T = TypeVar("T")

MAX_BURST_WAIT_S = 1.0  # the longest a mid-burst group waits for more of the burst
EMPTY_TEXT = "content is empty once control characters are removed"


class _StaleUnsent(Exception):
    """The stale head was attempted before, but no attempt reached the agent: it ends stale."""


def too_old(age: TaskAge, limit: float) -> bool:
    """A chat task waited longer than `limit` seconds (0: no limit) since it was routed."""
    return bool(limit) and age.waited_s is not None and age.waited_s > limit


class LettaTurn:
    def __init__(self, replica: Replica, redis: Redis, gateway: LettaGateway):
        self.replica = replica
        self.settings = replica.settings
        self.redis = redis
        self.gateway = gateway
        self.switches = Switches(fallback=self.settings.letta_fallback_to_memory,
                                 retry_attempts=self.settings.letta_retry_attempts)
        self._letta_down_until = 0.0
        # What the avatar tools accept: a cue the tool will accept is published as soon as it is written.
        self.avatar_names = persona_avatar_names(self.settings)

    async def decide(self, raw: bytes, request: TaskRequest, *, queued: list[bytes], mid_burst: bool,
                     on_attempt: Callable[[int], None]) -> Decision:
        """The head `raw` (parsed: `request`) of a viewer's queue, as last read (`queued`, head first);
        mid_burst: the viewer's previous turn ended with messages already waiting. on_attempt is told
        each attempt's number as it starts (for the task's log line)."""
        s = self.settings
        try:
            viewer_text = await self._viewer_text(request)
        except WireError as exc:
            return DeadLetter([raw], exc.reason, "validate", attempt=0)
        head = Chat(raw, request, compose_turn_text(request, viewer_text))
        if not head.text:  # e.g. content of control characters only: nothing to send, and no agent made for it
            return DeadLetter([raw], EMPTY_TEXT, "validate", attempt=0)
        coalesce = True
        unavailable_at = 0  # the last attempt that found Letta unable to answer
        while True:
            cancel_point()
            # Stale chat: measured when the turn is decided, and again before each retry (an
            # outage can last longer than the limit). An attempted task may already be in the
            # agent's history: it ends stale only once the history shows it is not (_turn).
            stale_unless_sent = False
            if s.bridge_stale_chat_after and not request.is_event:
                [age] = await self.replica.queues.ages([request.task_id])
                if too_old(age, s.bridge_stale_chat_after):
                    if not age.attempted:
                        return Stale(raw, request, age.waited_s or 0.0, attempt=0)
                    stale_unless_sent = True
            batch = [head] + (await self._followers(head, queued, mid_burst) if coalesce else [])
            now = self.replica.clock()
            attempts, stats = await self.replica.queues.begin_attempt(
                request.user_id, [(chat.task_id, stats_ops(chat.request, now)) for chat in batch]
            )
            attempt = attempts[0]
            on_attempt(attempt)
            letta_down = time.monotonic() < self._letta_down_until
            if next_action(None, attempt=attempt, batch_size=len(batch), switches=self.switches,
                           letta_down=letta_down) is Action.FALL_BACK:
                return FallBack(batch, attempt)
            try:
                result, outcome, stream = await self._turn(batch, stats, now, check_history=max(attempts) > 1,
                                                           stale_unless_sent=stale_unless_sent)
            except _StaleUnsent:
                [age] = await self.replica.queues.ages([request.task_id])
                return Stale(raw, request, age.waited_s or 0.0, attempt=attempt)
            except RedisError:
                raise  # our own store failed, not Letta: the worker leaves the task at the head
            except Exception as exc:  # every Letta failure is classified; none is swallowed silently
                cause = classify_error(exc)
                reason = describe_error(exc)
                if cause is Disposition.RETRY and not await self.gateway.serves():
                    # Letta 0.16.8 answers a database outage with a bare 500 ("An unknown error
                    # occurred"), like a refusal of this task: a failed plain read tells them apart.
                    cause, reason = Disposition.UNAVAILABLE, f"{reason} (and Letta cannot read its database)"
                if cause is Disposition.UNAVAILABLE:
                    unavailable_at = attempt
                # LETTA_RETRY_ATTEMPTS counts refusals by a Letta that serves: a 500 just after an
                # outage (the failed call may have met the outage, the probe the recovery) starts afresh.
                counted = attempt - unavailable_at if cause is Disposition.RETRY else attempt
                action = next_action(cause, attempt=counted, batch_size=len(batch), switches=self.switches,
                                     letta_down=letta_down)
                raws = [chat.raw for chat in batch]
                if action is Action.SPLIT:
                    coalesce = False  # one of them may be what Letta refuses: try them one by one
                    continue
                if action is Action.DEAD_LETTER:
                    return DeadLetter(raws, reason, "letta", attempt=attempt, attempts=attempt)
                if action is Action.GIVE_UP:
                    return DeadLetter(raws, f"gave up after {attempt} attempts: {reason}", "letta", attempt=attempt,
                                      attempts=attempt)
                if action is Action.FALL_BACK:
                    return FallBack(batch, attempt)
                if action is Action.FALL_BACK_AND_HOLD:
                    self._letta_down_until = time.monotonic() + s.bridge_letta_down_hold
                    log.warning("bridge %s: Letta unavailable (%s); falling back for %.0fs",
                                self.replica.replica_id, loggable(reason), s.bridge_letta_down_hold)
                    return FallBack(batch, attempt)
                delay = backoff(attempt, base=s.bridge_retry_base_delay, cap=s.bridge_retry_max_delay)
                self.replica.metrics.retries.labels(cause.value).inc()
                log.warning(
                    "retrying task %s of viewer %s in %.2fs: attempt %d failed (%s): %s",
                    request.task_id, request.user_id, delay, attempt, cause.value, loggable(reason),
                )
                if await self.replica.pause(delay):
                    return Abandoned(attempt)
                continue
            self._letta_down_until = 0.0
            if result.answered:  # replayed from history: answer exactly the tasks that turn carried
                batch = batch[:_carried(batch, result.answered)]
            if stream is None:
                return Answered(batch, result, outcome, attempt)
            return Answered(batch, result, outcome, attempt, tail=stream.tail, spoken=stream.spoken)

    async def _followers(self, head: Chat, queued: list[bytes], mid_burst: bool) -> list[Chat]:
        """Chat messages waiting behind the head in the viewer's queue that can join its turn.

        They must be consecutive, valid, chat (not events), routed to Letta and not done yet; the
        first one that is not ends the group (it is handled on its own, in order, afterwards).
        A viewer is mid-burst when messages are waiting behind the head, or when the head itself
        arrived while the viewer's previous turn ran: then the rest of the burst is likely on its
        way: the bridge waits in steps of VTL_BRIDGE_COALESCE_WAIT_MS for as long as each step brings
        another message (at most MAX_BURST_WAIT_S). A lone message (the usual case) is never delayed."""
        s = self.settings
        if s.bridge_coalesce_max <= 1 or head.request.type not in CHAT_TYPES:
            return []
        raws = queued[:s.bridge_coalesce_max]  # as read when claiming or by the last FINISH
        if (mid_burst or len(raws) > 1) and s.bridge_coalesce_wait_ms:
            # Debounce: wait while the burst is still arriving (each pause must bring a new message),
            # until the group is full or MAX_BURST_WAIT_S has passed.
            waited = 0.0
            while len(raws) < s.bridge_coalesce_max and waited < MAX_BURST_WAIT_S:
                pause = s.bridge_coalesce_wait_ms / 1000
                if await self.replica.pause(pause):
                    break
                waited += pause
                more = await self.replica.queues.peek(head.request.user_id, s.bridge_coalesce_max)
                grew, raws = len(more) > len(raws), more
                if not grew:
                    break
        if not raws or raws[0] != head.raw:
            return []
        candidates: list[TaskRequest] = []
        seen = {head.task_id}
        for raw in raws[1:]:
            try:
                request = parse_request(raw, max_bytes=s.bridge_max_payload_bytes)
            except WireError:
                break
            if (request.user_id != head.request.user_id or request.type not in CHAT_TYPES
                    or request.task_id in seen or self.replica.route_of(request) != "letta"):
                break
            seen.add(request.task_id)
            candidates.append(request)
        followers = []
        ids = [r.task_id for r in candidates]
        done = await self.replica.queues.done_flags(ids) if candidates else []
        limit = s.bridge_stale_chat_after
        ages = await self.replica.queues.ages(ids) if candidates and limit else [TaskAge(None, False)] * len(ids)
        for raw, request, is_done, age in zip(raws[1:], candidates, done, ages):
            if is_done or (too_old(age, limit) and not age.attempted):
                break  # a stale one ends stale when it becomes the head; the fresh ones after it follow
            try:
                text = await self._viewer_text(request)
            except WireError:
                break
            chat = Chat(raw, request, compose_turn_text(request, text))
            if not chat.text:
                break  # dead-lettered when it becomes the head
            followers.append(chat)
        return followers

    async def _viewer_text(self, request: TaskRequest) -> str | None:
        if request.content and request.content.strip():
            return request.content
        if request.input_file:
            s = self.settings
            return await asyncio.to_thread(read_input_file, request.input_file, s.bridge_uploads_path, s.bridge_max_input_file_bytes)
        return None

    async def _timed(self, op: str, call: Awaitable[T]) -> T:
        with self.replica.metrics.letta_latency.labels(op).time():
            return await call

    async def _turn(
        self, batch: list[Chat], stats: dict[str, str], now: float, *, check_history: bool,
        stale_unless_sent: bool = False,
    ) -> tuple[TurnResult, Outcome, ReplyStream | None]:
        """Everything Letta does for one turn (one task, or a coalesced burst); safe to repeat
        (at-least-once). check_history: a task of the batch was attempted before, so its turn may
        already be in the agent's history. Returns the result, the outcome and the stream that
        published it (if any). `stats`: the viewer's counters once this batch was counted.
        stale_unless_sent: the head is a stale chat attempted before: _StaleUnsent unless the
        history shows an earlier attempt reached the agent (then that turn is replayed or finished)."""
        request = batch[0].request
        viewer, task_id = request.user_id, request.task_id
        agent_id = await self._timed(
            "ensure_agent", self.gateway.ensure_agent(viewer, request.meta.display_name, request.platform)
        )
        recorded = False
        if request.is_event:
            meta = request.meta
            event = VerifiedEvent(
                task_id=task_id, viewer_id=viewer, kind=request.type, at=now,
                totals=totals_from_stats(stats, now), platform=request.platform, display_name=meta.display_name,
                amount=meta.amount, currency=meta.currency, gift_name=meta.gift_name, count=meta.count, tier=meta.tier,
            )
            await self._timed("record_event", self.gateway.record_verified_event(agent_id, event))
            recorded = True
            if request.type not in self.settings.bridge_event_turns:
                return TurnResult(reply_text="", silent=True, memory_updated=True), Outcome.RECORDED, None
        task_ids = [chat.task_id for chat in batch]
        if check_history:
            # An earlier attempt may have reached the agent before failing or dying: never a 2nd turn.
            # Its run may still be going on in Letta (it outlives its client): let it end first.
            await self._timed("settle_runs", self.gateway.settle_runs(agent_id))
            found = await self._timed("find_answered", self.gateway.find_answered(agent_id, task_ids))
            answering = found.answered[-1] if found is not None and found.answered else task_ids[-1]
            # An earlier attempt may have handed its words to speech, or published avatar cues, before
            # it failed: never again.
            spoken_before = await already_spoken(self.redis, answering)
            cued_before = await already_cued(self.redis, answering)
            if found is not None and not found.unfinished:
                muted = self._stream(answering, viewer, spoken_before=True) if spoken_before else None
                found = replace(found, avatar_calls=unpublished(found.avatar_calls, cued_before))
                return replace(found, memory_updated=found.memory_updated or recorded), Outcome.REPLAYED, muted
            if found is None and stale_unless_sent and not spoken_before:
                raise _StaleUnsent()
        else:
            found, answering, spoken_before, cued_before = None, task_ids[-1], False, frozenset()
        stream = None
        if self.settings.bridge_streaming or spoken_before:
            stream = self._stream(answering, viewer, spoken_before=spoken_before, cued_before=cued_before)
        sinks = ({"on_text": stream.feed, "on_words_done": stream.words_done, "on_cue": stream.cue}
                 if self.settings.bridge_streaming else {})
        if found is not None:
            # The earlier attempt's tools ran but it died before the agent spoke: finish that turn
            # (its next step), never send the message again. It answers the tasks it carried.
            result = await self._timed("continue_turn", self.gateway.continue_turn(agent_id, task_ids[0], found, **sinks))
        else:
            result = await self._timed(
                "send_turn",
                self.gateway.send_turn(
                    agent_id, [TurnMessage(chat.task_id, chat.text) for chat in batch],
                    sender_name=_sender_name(request), **sinks,
                ),
            )
        if stream is not None and stream.handed_off and result.silent and stream.text:
            # stay_silent came after words that already went to speech: the record says what she said.
            result = replace(result, silent=False, reply_text=stream.text)
        if stream is not None and not result.silent:
            stream.tail = stream.close()
        # FINISH publishes only the cues that did not go out while the turn ran (nor in an earlier attempt).
        result = replace(result, avatar_calls=unpublished(result.avatar_calls, stream.cued if stream else cued_before))
        outcome = Outcome.SILENT if result.silent else Outcome.ANSWERED
        answered = result.answered if found is not None else ()
        return replace(result, memory_updated=result.memory_updated or recorded, answered=answered), outcome, stream

    def _stream(self, task_id: str, viewer: str, *, spoken_before: bool,
                cued_before: frozenset[str] = frozenset()) -> ReplyStream:
        return ReplyStream(self.redis, self.settings, task_id=task_id, user_id=viewer, clock=self.replica.clock,
                           spoken_before=spoken_before, avatar_names=self.avatar_names, cued_before=cued_before)


def _sender_name(request: TaskRequest) -> str:
    """'小明@bilibili': the display name (else the id after the platform) and the platform."""
    name = request.meta.display_name or split_platform(request.user_id)[1] or request.user_id
    platform = request.platform
    return f"{name}@{platform}" if platform else name


def _carried(batch: list[Chat], answered: tuple[str, ...]) -> int:
    """How many tasks at the start of batch a replayed turn carried (the head always)."""
    count = 1
    while count < len(batch) and batch[count].task_id in answered:
        count += 1
    return count
