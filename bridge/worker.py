"""One viewer's worker: it holds the viewer's lease and works through the viewer's queue, head
first, until it is empty (or it is others' turn).

Per task: validate (bridge/wire.py) -> already done? -> route: memory-python (forward the raw
payload) or Letta (bridge/turn.py decides: answered, fall back, dead-letter, stale, or abandoned) ->
the outputs (bridge/outputs.py), the pop and the done marker in one atomic FINISH. The worker is
the only caller of FINISH; it writes the dead letters and the fallbacks, and one log line per task.
"""

from __future__ import annotations

import asyncio
import logging
import time
from contextlib import suppress
from dataclasses import dataclass, field

from redis.exceptions import RedisError

from bridge import outcome_log
from bridge.decisions import Abandoned, Answered, Chat, DeadLetter, Decision, FallBack, Outcome, Stale
from bridge.errors import describe_error
from bridge.lease import LeaseLost, ViewerLease
from bridge.outputs import dead_letter_entry, done_markers, fallback_outputs, forward_output, reply_outputs, stale_outputs, task_id_of
from bridge.queue import Finished, FinishResult, Output, ReleaseStatus, cancel_point
from bridge.replica import MEMORY_PYTHON, Replica, loggable
from bridge.turn import LettaTurn
from bridge.wire import Stage, WireError, parse_request
from vtuber_letta import redis_keys as keys

log = logging.getLogger("vtuber_letta.bridge")

_WARNINGS = (Outcome.DEAD_LETTER, Outcome.ERROR, Outcome.LOCK_LOST)  # logged as warnings


class _Abandon(Exception):
    """Stop was requested while a task waited to be retried: it stays at the head for later."""


@dataclass
class TaskState:
    """What the worker knows of the task in hand, for its log line and for what comes next."""

    viewer: str
    started: float
    task_id: str | None = None
    kind: str = "-"
    route: str = "-"
    attempt: int = 0
    reason: str = ""
    mid_burst: bool = False  # the viewer's previous turn ended with messages already waiting
    queued: list[bytes] = field(default_factory=list)  # the viewer's queue as last read, head first
    after: FinishResult | None = None  # what FINISH reported once the task was acknowledged


class ViewerWorker:
    def __init__(self, replica: Replica, turn: LettaTurn, lease: ViewerLease):
        self.replica = replica
        self.settings = replica.settings
        self.turn = turn
        self.lease = lease

    async def serve(self, queued: list[bytes]) -> None:
        """`queued`: the first tasks of the queue as read when claiming; FINISH hands back the next
        ones (or releases the viewer once the queue is empty), so no extra round trip is needed
        between tasks."""
        lease = self.lease
        keeper = asyncio.create_task(lease.keep(self.replica.replica_id))
        handled = 0
        mid_burst = False
        try:
            while not lease.lost.is_set():
                cancel_point()
                if self.replica.stopping.is_set() or handled >= self.settings.bridge_turns_per_claim:
                    await lease.release(yield_turn=True)
                    return
                if not queued:
                    if await lease.release(yield_turn=False) is not ReleaseStatus.KEEP_WORKING:
                        return
                    queued, mid_burst = await lease.peek(), False
                    continue
                # The head is handled here; a chat head takes the chat messages waiting behind it
                # into its turn (burst coalescing, see bridge/turn.py), and FINISH pops them all.
                try:
                    after = await self._handle_unless_lost(queued, mid_burst=mid_burst)
                except _Abandon:
                    await lease.release(yield_turn=True)
                    return
                except LeaseLost:
                    return
                except RedisError:
                    with suppress(RedisError, OSError):  # hand the viewer on now, not after the lock TTL
                        await lease.release(yield_turn=True)
                    raise
                handled += 1
                if after is None:  # not acknowledged (a bug was dead-lettered...): read the queue again
                    queued, mid_burst = await lease.peek(), False
                elif after.released:
                    return
                else:  # messages arrived while this turn ran: the viewer is mid-burst
                    queued, mid_burst = after.queued, True
        finally:
            keeper.cancel()

    async def _handle_unless_lost(self, queued: list[bytes], *, mid_burst: bool) -> FinishResult | None:
        """_handle, cancelled as soon as the viewer's lock is lost: another replica may be serving
        the viewer by then, so this one must neither speak nor acknowledge any more (its Letta run,
        if any, is waited out by whoever serves the task next)."""
        handling = asyncio.create_task(self._handle(queued, mid_burst=mid_burst))
        losing = asyncio.create_task(self.lease.lost.wait())
        try:
            await asyncio.wait({handling, losing}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            losing.cancel()
            if not handling.done():
                handling.cancel()
                await asyncio.gather(handling, return_exceptions=True)
        if handling.cancelled():
            raise LeaseLost()
        return handling.result()

    async def _handle(self, queued: list[bytes], *, mid_burst: bool) -> FinishResult | None:
        """The head of `queued` (and any task coalesced with it), start to finish, one log line per
        task. Returns what FINISH reported (None if nothing was acknowledged)."""
        state = TaskState(viewer=self.lease.viewer, started=time.monotonic(), mid_burst=mid_burst, queued=queued)
        raw = queued[0]
        metrics = self.replica.metrics
        self.replica.in_flight += 1
        metrics.in_flight.inc()
        outcome = Outcome.ERROR
        try:
            outcome = await self._process(state, raw)
        except _Abandon:
            outcome = Outcome.ABANDONED
            raise
        except LeaseLost:
            outcome = Outcome.LOCK_LOST
            raise
        except asyncio.CancelledError:
            outcome = Outcome.CANCELLED
            raise
        except RedisError as exc:  # not the task's fault: it stays at the head for the next try
            state.reason = describe_error(exc)
            raise
        except Exception as exc:  # a bug of ours: dead-letter the task rather than loop on it forever
            log.exception("bridge %s: internal error on task %s", self.replica.replica_id, state.task_id or "-")
            outcome = await self._dead_letter(state, [raw], f"internal error: {describe_error(exc)}", "internal",
                                              task_id=state.task_id, user_id=None)
        finally:
            self.replica.in_flight -= 1
            metrics.in_flight.dec()
            outcome_log.record(self.replica, state.viewer, state.task_id, outcome.value, time.monotonic() - state.started)
            level = logging.WARNING if outcome in _WARNINGS else logging.INFO
            log.log(
                level,
                "task=%s viewer=%s type=%s route=%s attempt=%d outcome=%s duration_ms=%d%s",
                state.task_id or "-", loggable(state.viewer), state.kind, state.route, state.attempt, outcome.value,
                (time.monotonic() - state.started) * 1000, f" reason={loggable(state.reason)}" if state.reason else "",
            )
        return state.after

    async def _process(self, state: TaskState, raw: bytes) -> Outcome:
        try:
            request = parse_request(raw, max_bytes=self.settings.bridge_max_payload_bytes)
        except WireError as exc:
            state.task_id = exc.task_id
            return await self._dead_letter(state, [raw], exc.reason, "validate", task_id=exc.task_id, user_id=exc.user_id)
        state.task_id, state.kind = request.task_id, request.type
        if request.user_id != state.viewer:  # the route script keys queues by user_id: cannot happen
            return await self._dead_letter(state, [raw], "user_id does not match its queue", "validate",
                                           task_id=request.task_id, user_id=None)
        if await self.replica.queues.is_done(request.task_id):
            await self._finish(state, [Finished(raw, request.task_id, None)], [])
            return Outcome.DUPLICATE
        state.route = self.replica.route_of(request)
        if state.route == MEMORY_PYTHON:
            await self._finish(state, [Finished(raw, request.task_id, Outcome.FORWARDED.value)],
                               [forward_output(self.settings, raw)])
            return Outcome.FORWARDED
        decision = await self.turn.decide(raw, request, queued=state.queued, mid_burst=state.mid_burst,
                                          on_attempt=lambda attempt: setattr(state, "attempt", attempt))
        return await self._act(state, decision, task_id=request.task_id, user_id=request.user_id)

    async def _act(self, state: TaskState, decision: Decision, *, task_id: str, user_id: str) -> Outcome:
        """Carry out the Letta turn's decision on the head `task_id` (and its batch)."""
        state.attempt = decision.attempt
        if isinstance(decision, Abandoned):
            raise _Abandon()
        if isinstance(decision, DeadLetter):
            return await self._dead_letter(state, decision.raws, decision.reason, decision.stage,
                                           task_id=task_id, user_id=user_id, attempts=decision.attempts)
        if isinstance(decision, FallBack):
            return await self._fall_back(state, decision.batch)
        if isinstance(decision, Stale):
            await self._finish(state, [Finished(decision.raw, task_id, Outcome.STALE.value)],
                               stale_outputs(self.settings, decision.request, now=self.replica.clock()))
            state.reason = f"waited {decision.waited_s:.0f}s (VTL_BRIDGE_STALE_CHAT_AFTER={self.settings.bridge_stale_chat_after:g})"
            return Outcome.STALE
        assert isinstance(decision, Answered)
        outputs = reply_outputs(self.settings, decision.batch, decision.result, tail=decision.tail,
                                spoken=decision.spoken, now=self.replica.clock())
        done_values = done_markers(len(decision.batch), decision.outcome)
        finished = [Finished(chat.raw, chat.task_id, done) for chat, done in zip(decision.batch, done_values)]
        await self._finish(state, finished, outputs)
        return self._log_coalesced(state, decision.batch, decision.outcome)

    def _log_coalesced(self, state: TaskState, batch: list[Chat], turn_outcome: Outcome) -> Outcome:
        """The outcome of the head; the other tasks of a coalesced turn get their log line here (the
        last one, whose reply answers them all, with the turn's outcome: answered, silent, replayed)."""
        if len(batch) == 1:
            return turn_outcome
        answering = batch[-1].task_id
        for chat in batch[1:]:
            outcome = turn_outcome if chat.task_id == answering else Outcome.COALESCED
            outcome_log.record(self.replica, state.viewer, chat.task_id, outcome.value, time.monotonic() - state.started)
            log.info(
                "task=%s viewer=%s type=%s route=letta attempt=%d outcome=%s duration_ms=%d %s",
                chat.task_id, loggable(state.viewer), chat.request.type, state.attempt, outcome.value,
                (time.monotonic() - state.started) * 1000,
                f"reason=answered {len(batch)} tasks in one turn" if chat.task_id == answering else f"answered_by={answering}",
            )
        state.reason = f"answered_by={answering}"
        return Outcome.COALESCED

    async def _fall_back(self, state: TaskState, batch: list[Chat]) -> Outcome:
        """Letta is down: hand the tasks to memory-python, marked meta.letta_fallback = true."""
        finished = [Finished(chat.raw, chat.task_id, Outcome.FALLBACK.value) for chat in batch]
        await self._finish(state, finished, fallback_outputs(self.settings, batch))
        state.route = MEMORY_PYTHON
        if len(batch) > 1:
            state.reason = f"{len(batch)} tasks"
        return Outcome.FALLBACK

    async def _dead_letter(self, state: TaskState, raws: list[bytes], reason: str, stage: Stage, *,
                           task_id: str | None, user_id: str | None, attempts: int | None = None) -> Outcome:
        """Dead-letter the task (or every task of a coalesced turn that kept failing), one entry each."""
        finished, outputs = [], []
        for index, raw in enumerate(raws):
            own_id = task_id if index == 0 else task_id_of(raw)
            entry = dead_letter_entry(raw, reason, stage=stage, task_id=own_id, user_id=user_id, attempts=attempts,
                                      replica_id=self.replica.replica_id, at=self.replica.clock(),
                                      max_bytes=self.settings.bridge_max_payload_bytes)
            finished.append(Finished(raw, own_id, None))
            outputs.append(Output("dead_letter", keys.BRIDGE_DEAD_LETTERS, entry))
        await self._finish(state, finished, outputs)
        state.reason = f"{stage}: {reason}"
        return Outcome.DEAD_LETTER

    async def _finish(self, state: TaskState, tasks: list[Finished], outputs: list[Output]) -> None:
        state.after = await self.lease.finish(tasks, outputs)
