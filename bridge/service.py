"""The bridge: Redis in, Letta, Redis out.

`run_bridge(settings, gateway)` runs one replica until SIGTERM/SIGINT (or `stop_event`);
`check_bridge(settings)` is true while any replica heartbeats. Several replicas may run
against one Redis: see bridge/queue.py for why that keeps each viewer's tasks in order with
one turn in flight per viewer.

Per task (the HEAD of one viewer's queue, while holding that viewer's lock):
  validate (bridge/wire.py) -> already done? -> route: memory-python (forward the raw payload)
  or Letta: ensure the viewer's agent, count verified stats, record live events in memory,
  replay the answer if a previous attempt already reached the agent, else send the turn ->
  publish the outputs, pop the task and mark it done in one atomic script.
Failures are classified once (bridge/errors.py): retried with backoff and jitter, sent to the
fallback (memory-python), waited out, or dead-lettered with the reason and the raw payload.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
import re
import secrets
import signal
import socket
import time
import unicodedata
from contextlib import suppress
from dataclasses import dataclass, field, replace
from typing import Any, Awaitable, Callable, TypeVar

from redis.asyncio import Redis
from redis.exceptions import RedisError

from bridge.errors import Disposition, classify_error, describe_error
from bridge.gateway import LettaGateway, TurnMessage, TurnResult, VerifiedEvent
from bridge.metrics import BridgeMetrics
from bridge.queue import Finished, FinishResult, Output, ViewerQueues, cancel_point
from bridge.reply_stream import ReplyStream, already_spoken, speech_outputs
from bridge.turn_text import compose_turn_text
from bridge.viewer_stats import stats_ops, totals_from_stats
from bridge.wire import (
    CHAT_TYPES,
    AvatarEvent,
    DeadLetter,
    LettaRequest,
    LettaResponse,
    TaskResponse,
    WireError,
    dump,
    parse_request,
    read_input_file,
)
from vtuber_letta.redis_api import async_redis_client
from vtuber_letta import redis_keys as keys
from vtuber_letta.settings import Settings
from vtuber_letta.viewer_ids import split_platform

log = logging.getLogger("vtuber_letta.bridge")
T = TypeVar("T")

MEMORY_PYTHON = "memory-python"
MAX_BURST_WAIT_S = 1.0
EMPTY_TEXT = "content is empty once control characters are removed"  # the longest a mid-burst group waits for more of the burst
DEFAULT_ROUTING = {"permanent": "letta", "temporary": MEMORY_PYTHON}


class _Abandoned(Exception):
    """Stop was requested while a task waited to be retried: it stays at the head for later."""


class _LockLost(Exception):
    """Another worker owns the viewer now: nothing was acknowledged."""


@dataclass
class _TaskLog:
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


def loggable(text: str, limit: int = 300) -> str:
    """Text safe for one log line: invisible, control and line-breaking characters escaped."""
    out = "".join(
        c if c == " " or unicodedata.category(c)[0] not in "CZ" else c.encode("unicode_escape").decode("ascii")
        for c in text[:limit]
    )
    return out + ("…" if len(text) > limit else "")


def default_replica_id() -> str:
    host = re.sub(r"[^A-Za-z0-9_.-]", "-", socket.gethostname())[:40] or "host"
    return f"{host}-{os.getpid()}-{secrets.token_hex(3)}"


# Beyond the longest blocking pop (VTL_BRIDGE_POLL_TIMEOUT): a half-open connection must not hang
# FINISH or the lock renewals forever; a timed-out call is a RedisError like any other.
REDIS_SOCKET_MARGIN_S = 10.0


def redis_client(settings: Settings) -> Redis:
    """The bridge's Redis client (bytes in, bytes out: payloads are kept byte for byte)."""
    return async_redis_client(settings, decode_responses=False, health_check_interval=30,
                              socket_timeout=settings.bridge_poll_timeout + REDIS_SOCKET_MARGIN_S,
                              socket_connect_timeout=REDIS_SOCKET_MARGIN_S)


class BridgeService:
    def __init__(
        self,
        settings: Settings,
        redis: Redis,
        gateway: LettaGateway,
        *,
        replica_id: str | None = None,
        metrics: BridgeMetrics | None = None,
        clock: Callable[[], float] = time.time,
    ):
        self.settings = settings
        self.redis = redis
        self.gateway = gateway
        self.replica_id = replica_id or settings.bridge_replica_id or default_replica_id()
        self.metrics = metrics or BridgeMetrics()
        self.clock = clock
        self.queues = ViewerQueues(
            redis,
            request_queue=settings.bridge_request_queue,
            max_payload_bytes=settings.bridge_max_payload_bytes,
            dead_letter_max=settings.bridge_dead_letter_max,
        )
        self._routing = {**DEFAULT_ROUTING, **settings.letta_memory_type_routing}
        self._lock_ttl_ms = int(settings.bridge_lock_ttl * 1000)
        self._peek = settings.bridge_coalesce_max  # how much of a viewer's queue is read at once
        self._stopping = asyncio.Event()
        self._letta_down_until = 0.0
        self._in_flight = 0
        self._started = time.time()

    # ------------------------------------------------------------------ lifecycle
    async def run(self, stop_event: asyncio.Event) -> None:
        """Serve until stop_event is set, then stop taking work and let in-flight turns finish
        (up to the grace period). Cancelling this coroutine instead is a hard stop: nothing is
        acknowledged, locks and the heartbeat simply expire, as if the process had died."""
        s = self.settings
        await self.redis.ping()
        self.metrics.serve(s.bridge_metrics_port, s.bridge_metrics_host)
        await self._beat()
        background = [asyncio.create_task(self._heartbeat_loop()), asyncio.create_task(self._sweep_loop()),
                      asyncio.create_task(self._invalidation_loop())]
        intake = asyncio.create_task(self._intake_loop())
        serving: set[asyncio.Task] = set()  # one task per viewer being served
        dispatcher = asyncio.create_task(self._dispatch_loop(serving))
        log.info(
            "bridge %s up: %s -> Letta (enabled=%s, fallback=%s, tts_handoff=%s), up to %d viewers at once",
            self.replica_id, s.bridge_request_queue, s.letta_enabled, s.letta_fallback_to_memory,
            s.bridge_tts_handoff, s.bridge_concurrency,
        )
        graceful = False
        try:
            await stop_event.wait()
            graceful = True
            log.info("bridge %s stopping: taking no new work, %d task(s) in flight", self.replica_id, self._in_flight)
            self._stopping.set()
            deadline = time.monotonic() + s.bridge_grace_period
            # The dispatcher ends within one poll timeout; after it, no viewer task is added.
            await asyncio.wait([intake, dispatcher], timeout=s.bridge_grace_period)
            if serving:
                await asyncio.wait(set(serving), timeout=max(0.0, deadline - time.monotonic()))
        finally:
            self._stopping.set()
            everything = [intake, dispatcher, *serving, *background]
            unfinished = sum(not task.done() for task in serving)
            for task in everything:
                task.cancel()
            # Bounded: a task that ignored its cancellation must not keep the process alive.
            _, stuck = await asyncio.wait(everything, timeout=5)
            if stuck:
                log.error("bridge %s: %d task(s) did not stop when cancelled", self.replica_id, len(stuck))
            if graceful:
                with suppress(RedisError, OSError):
                    await self.redis.delete(keys.bridge_heartbeat(self.replica_id))
                if unfinished:
                    log.warning("bridge %s: grace period over, %d viewer task(s) cancelled", self.replica_id, unfinished)
                log.info("bridge %s stopped", self.replica_id)
            self.metrics.close()

    async def _pause(self, seconds: float) -> bool:
        """Sleep, waking early on stop; True if stop was requested."""
        try:
            await asyncio.wait_for(self._stopping.wait(), timeout=seconds)
            return True
        except asyncio.TimeoutError:
            return False

    async def _beat(self) -> None:
        value = json.dumps({
            "replica_id": self.replica_id, "pid": os.getpid(), "host": socket.gethostname(),
            "started": self._started, "in_flight": self._in_flight, "at": self.clock(),
        })
        await self.redis.set(
            keys.bridge_heartbeat(self.replica_id), value, px=int(self.settings.bridge_heartbeat_ttl * 1000)
        )

    async def _heartbeat_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.bridge_heartbeat_interval)
            cancel_point()
            try:
                await self._beat()
            except (RedisError, OSError) as exc:
                log.warning("bridge %s: heartbeat failed: %s", self.replica_id, describe_error(exc))

    async def _invalidation_loop(self) -> None:
        """Drop the cached agent id of every viewer `agent forget` announces (pub/sub). A message
        missed while (re)subscribing is covered by the gateway: a 404 re-resolves the agent."""
        forget = getattr(self.gateway, "forget_cached_agent", None)
        if forget is None:
            return
        while True:
            cancel_point()
            pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(keys.AGENT_INVALIDATIONS)
                while True:
                    cancel_point()
                    message = await pubsub.get_message(timeout=1.0)
                    if message and message.get("type") == "message":
                        viewer = message["data"].decode("utf-8", errors="surrogateescape")
                        if forget(viewer):
                            log.info("bridge %s: viewer %s was forgotten: cached agent dropped",
                                     self.replica_id, loggable(viewer))
            except (RedisError, OSError) as exc:
                log.warning("bridge %s: agent invalidations: %s", self.replica_id, describe_error(exc))
                await asyncio.sleep(1.0)
            finally:
                with suppress(RedisError, OSError):
                    await pubsub.aclose()

    # ------------------------------------------------------------------ intake / sweeper
    async def _intake_loop(self) -> None:
        while not self._stopping.is_set():
            cancel_point()
            try:
                await self.queues.take(self.settings.bridge_poll_timeout)
                await self._route_staging()
            except (RedisError, OSError) as exc:
                log.warning("bridge %s: intake: %s", self.replica_id, describe_error(exc))
                await self._pause(1.0)
        with suppress(RedisError, OSError):
            await self._route_staging()  # what this replica moved is routed before it leaves

    async def _route_staging(self) -> None:
        _, triaged = await self.queues.route_all()
        if triaged:
            await self._drain_triage()

    async def _sweep_loop(self) -> None:
        while True:
            cancel_point()
            try:
                await self.queues.route_all()  # staging left behind by a replica that died
                await self._drain_triage()
                readied = await self.queues.sweep()
                if readied:
                    log.info("bridge %s: re-queued %d viewer(s) whose worker stopped", self.replica_id, readied)
                self._observe(await self.queues.depths())
            except (RedisError, OSError) as exc:
                log.warning("bridge %s: sweep: %s", self.replica_id, describe_error(exc))
            except Exception:  # a bug must not end the sweeper silently: crashed replicas rely on it
                log.exception("bridge %s: sweep failed", self.replica_id)
            await asyncio.sleep(self.settings.bridge_sweep_interval)

    def _observe(self, depths: dict[str, int]) -> None:
        m = self.metrics
        for queue in ("requests", "staging", "triage"):
            m.queue_depth.labels(queue).set(depths[queue])
        m.pending_viewers.set(depths["pending_viewers"])
        m.dead_letters.set(depths["dead_letters"])
        m.known_viewers.set(depths["known_viewers"])

    async def _drain_triage(self) -> None:
        """Dead-letter what the route script could not place (no sane user_id), oldest first."""
        while (raw := await self.queues.oldest_triage()) is not None:
            cancel_point()
            try:
                parse_request(raw, max_bytes=self.settings.bridge_max_payload_bytes)
                reason, task_id, user_id = "user_id cannot be routed", None, None
            except WireError as exc:
                reason, task_id, user_id = exc.reason, exc.task_id, exc.user_id
            entry = self._dead_letter_entry(raw, reason, stage="intake", task_id=task_id, user_id=user_id)
            if await self.queues.dead_letter_triage(raw, entry):
                self.metrics.outcomes.labels("dead_letter").inc()
                log.warning(
                    "task=%s viewer=- type=- route=- attempt=0 outcome=dead_letter duration_ms=0 reason=%s",
                    task_id or "-", loggable(reason),
                )

    # ------------------------------------------------------------------ viewers
    async def _dispatch_loop(self, serving: set[asyncio.Task]) -> None:
        """Hand each ready viewer to a task of its own, at most VTL_BRIDGE_CONCURRENCY at once.
        One BLPOP waits on the ready list, and only while a slot is free (not one poll per idle slot)."""
        s = self.settings
        while not self._stopping.is_set():
            cancel_point()
            if len(serving) >= s.bridge_concurrency:
                await asyncio.wait(set(serving), timeout=s.bridge_poll_timeout, return_when=asyncio.FIRST_COMPLETED)
                continue
            try:
                viewer = await self.queues.next_ready(s.bridge_poll_timeout)
            except (RedisError, OSError) as exc:
                log.warning("bridge %s: dispatcher: %s", self.replica_id, describe_error(exc))
                await self._pause(1.0)
                continue
            except Exception:  # a bug must not end the dispatcher: this replica would serve no one
                log.exception("bridge %s: dispatcher error", self.replica_id)
                await self._pause(1.0)
                continue
            if viewer is not None:  # even when stopping: its task hands the viewer back at once
                task = asyncio.create_task(self._serve_ready_viewer(viewer))
                serving.add(task)
                task.add_done_callback(serving.discard)

    async def _serve_ready_viewer(self, viewer: str) -> None:
        try:
            token = secrets.token_hex(16)
            queued = await self.queues.claim(viewer, token, self._lock_ttl_ms, peek=self._peek)
            if queued is not None:  # None: another worker holds the viewer and will see its new task
                await self._serve_viewer(viewer, token, queued)
        except (RedisError, OSError) as exc:
            log.warning("bridge %s: viewer %s: %s", self.replica_id, loggable(viewer), describe_error(exc))
            await self._pause(1.0)  # keeps the slot a moment: Redis is in trouble
        except Exception:  # a bug: logged, and the viewer's lock expires for the sweeper to hand on
            log.exception("bridge %s: error serving viewer %s", self.replica_id, loggable(viewer))
            await self._pause(1.0)

    async def _keep_lock(self, viewer: str, token: str, lost: asyncio.Event) -> None:
        while True:
            await asyncio.sleep(self.settings.bridge_lock_ttl / 3)
            cancel_point()
            try:
                if not await self.queues.renew(viewer, token, self._lock_ttl_ms):
                    log.warning("bridge %s: lost the lock of viewer %s", self.replica_id, loggable(viewer))
                    lost.set()
                    return
            except (RedisError, OSError) as exc:
                log.warning("bridge %s: lock renewal: %s", self.replica_id, describe_error(exc))

    async def _serve_viewer(self, viewer: str, token: str, queued: list[bytes]) -> None:
        """Work through one viewer's queue, head first, until it is empty (or it is others' turn).
        `queued`: the first tasks of the queue as read when claiming; FINISH hands back the next ones
        (or releases the viewer once the queue is empty), so no extra round trip is needed between tasks."""
        lost = asyncio.Event()
        keeper = asyncio.create_task(self._keep_lock(viewer, token, lost))
        handled = 0
        mid_burst = False
        try:
            while not lost.is_set():
                cancel_point()
                if self._stopping.is_set() or handled >= self.settings.bridge_turns_per_claim:
                    await self.queues.release(viewer, token, yield_turn=True)
                    return
                if not queued:
                    if await self.queues.release(viewer, token, yield_turn=False) != 0:
                        return
                    queued, mid_burst = await self.queues.peek(viewer, self._peek), False
                    continue
                # The head is handled here; a chat head takes the chat messages waiting behind it
                # into its turn (burst coalescing, see _followers), and FINISH pops them all.
                try:
                    after = await self._handle_unless_lost(lost, viewer, token, queued, mid_burst=mid_burst)
                except _Abandoned:
                    await self.queues.release(viewer, token, yield_turn=True)
                    return
                except _LockLost:
                    return
                except RedisError:
                    with suppress(RedisError, OSError):  # hand the viewer on now, not after the lock TTL
                        await self.queues.release(viewer, token, yield_turn=True)
                    raise
                handled += 1
                if after is None:  # not acknowledged (a bug was dead-lettered...): read the queue again
                    queued, mid_burst = await self.queues.peek(viewer, self._peek), False
                elif after.released:
                    return
                else:  # messages arrived while this turn ran: the viewer is mid-burst
                    queued, mid_burst = after.queued, True
        finally:
            keeper.cancel()

    async def _handle_unless_lost(self, lost: asyncio.Event, viewer: str, token: str, queued: list[bytes], *,
                                  mid_burst: bool) -> FinishResult | None:
        """_handle, cancelled as soon as the viewer's lock is lost: another replica may be serving
        the viewer by then, so this one must neither speak nor acknowledge any more (its Letta run,
        if any, is waited out by whoever serves the task next)."""
        handling = asyncio.create_task(self._handle(viewer, token, queued, mid_burst=mid_burst))
        losing = asyncio.create_task(lost.wait())
        try:
            await asyncio.wait({handling, losing}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            losing.cancel()
            if not handling.done():
                handling.cancel()
                await asyncio.gather(handling, return_exceptions=True)
        if handling.cancelled():
            raise _LockLost()
        return handling.result()

    async def _handle(self, viewer: str, token: str, queued: list[bytes], *, mid_burst: bool = False) -> FinishResult | None:
        """The head of `queued` (and any task coalesced with it), start to finish, one log line per
        task. Returns what FINISH reported (None if nothing was acknowledged)."""
        ctx = _TaskLog(viewer=viewer, started=time.monotonic(), mid_burst=mid_burst, queued=queued)
        raw = queued[0]
        self._in_flight += 1
        self.metrics.in_flight.inc()
        outcome = "error"
        try:
            outcome = await self._process(ctx, token, raw)
        except _Abandoned:
            outcome = "abandoned"
            raise
        except _LockLost:
            outcome = "lock_lost"
            raise
        except asyncio.CancelledError:
            outcome = "cancelled"
            raise
        except RedisError as exc:  # not the task's fault: it stays at the head for the next try
            ctx.reason = describe_error(exc)
            raise
        except Exception as exc:  # a bug of ours: dead-letter the task rather than loop on it forever
            log.exception("bridge %s: internal error on task %s", self.replica_id, ctx.task_id or "-")
            outcome = await self._dead_letter(
                ctx, token, [raw], f"internal error: {describe_error(exc)}", "internal", ctx.task_id, None
            )
        finally:
            self._in_flight -= 1
            self.metrics.in_flight.dec()
            self.metrics.outcomes.labels(outcome).inc()
            level = logging.WARNING if outcome in ("dead_letter", "error", "lock_lost") else logging.INFO
            log.log(
                level,
                "task=%s viewer=%s type=%s route=%s attempt=%d outcome=%s duration_ms=%d%s",
                ctx.task_id or "-", loggable(viewer), ctx.kind, ctx.route, ctx.attempt, outcome,
                (time.monotonic() - ctx.started) * 1000, f" reason={loggable(ctx.reason)}" if ctx.reason else "",
            )
        return ctx.after

    async def _process(self, ctx: _TaskLog, token: str, raw: bytes) -> str:
        try:
            request = parse_request(raw, max_bytes=self.settings.bridge_max_payload_bytes)
        except WireError as exc:
            ctx.task_id = exc.task_id
            return await self._dead_letter(ctx, token, [raw], exc.reason, "validate", exc.task_id, exc.user_id)
        ctx.task_id, ctx.kind = request.task_id, request.type
        if request.user_id != ctx.viewer:  # the route script keys queues by user_id: cannot happen
            return await self._dead_letter(ctx, token, [raw], "user_id does not match its queue", "validate", request.task_id, None)
        if await self.queues.is_done(request.task_id):
            await self._finish(ctx, token, [Finished(raw, request.task_id, None)], [])
            return "duplicate"
        ctx.route = self._route_of(request)
        if ctx.route == MEMORY_PYTHON:
            out = Output("lpush", self.settings.bridge_memory_queue, raw)
            await self._finish(ctx, token, [Finished(raw, request.task_id, '{"forwarded":"memory-python"}')], [out])
            return "forwarded"
        return await self._answer_with_letta(ctx, token, raw, request)

    def _route_of(self, request: LettaRequest) -> str:
        if not self.settings.letta_enabled:
            return MEMORY_PYTHON
        return self._routing[request.meta.memory_type or self.settings.bridge_default_memory_type]

    # ------------------------------------------------------------------ the Letta path
    async def _answer_with_letta(self, ctx: _TaskLog, token: str, raw: bytes, request: LettaRequest) -> str:
        s = self.settings
        try:
            viewer_text = await self._viewer_text(request)
        except WireError as exc:
            return await self._dead_letter(ctx, token, [raw], exc.reason, "validate", request.task_id, request.user_id)
        head = _Chat(raw, request, compose_turn_text(request, viewer_text))
        if not head.text:  # e.g. content of control characters only: nothing to send, and no agent made for it
            return await self._dead_letter(ctx, token, [raw], EMPTY_TEXT, "validate", request.task_id, request.user_id)
        coalesce = True
        while True:
            cancel_point()
            batch = [head] + (await self._followers(head, ctx) if coalesce else [])
            now = self.clock()
            attempts, stats = await self.queues.begin_attempt(
                request.user_id, [(chat.task_id, stats_ops(chat.request, now)) for chat in batch]
            )
            attempt = ctx.attempt = attempts[0]
            raws = [chat.raw for chat in batch]
            if s.letta_fallback_to_memory and time.monotonic() < self._letta_down_until:
                return await self._fall_back(ctx, token, batch)
            try:
                result, outcome, stream = await self._letta_turn(batch, stats, now, check_history=max(attempts) > 1)
            except RedisError:
                raise  # our own store failed, not Letta: handled (and logged) by _serve_ready_viewer
            except Exception as exc:  # every Letta failure is classified; none is swallowed silently
                disposition = classify_error(exc)
                reason = describe_error(exc)
                exhausted = attempt > s.letta_retry_attempts
                if disposition is Disposition.GIVE_UP and len(batch) > 1:
                    coalesce = False  # one of them may be what Letta refuses: try them one by one
                    continue
                if disposition is Disposition.GIVE_UP:
                    return await self._dead_letter(ctx, token, raws, reason, "letta", request.task_id, request.user_id, attempt)
                if exhausted and disposition is Disposition.RETRY:
                    if s.letta_fallback_to_memory:
                        return await self._fall_back(ctx, token, batch)
                    return await self._dead_letter(
                        ctx, token, raws, f"gave up after {attempt} attempts: {reason}", "letta",
                        request.task_id, request.user_id, attempt,
                    )
                if exhausted and s.letta_fallback_to_memory:  # UNAVAILABLE
                    self._letta_down_until = time.monotonic() + s.bridge_letta_down_hold
                    log.warning(
                        "bridge %s: Letta unavailable (%s); falling back for %.0fs",
                        self.replica_id, loggable(reason), s.bridge_letta_down_hold,
                    )
                    return await self._fall_back(ctx, token, batch)
                delay = self._backoff(attempt)
                self.metrics.retries.labels(disposition.value).inc()
                log.warning(
                    "retrying task %s of viewer %s in %.2fs: attempt %d failed (%s): %s",
                    request.task_id, request.user_id, delay, attempt, disposition.value, loggable(reason),
                )
                if await self._pause(delay):
                    raise _Abandoned() from exc
                continue
            self._letta_down_until = 0.0
            if result.answered:  # replayed from history: answer exactly the tasks that turn carried
                batch = batch[:_carried(batch, result.answered)]
            outputs, done_values = self._reply_outputs(batch, result, stream)
            finished = [Finished(chat.raw, chat.task_id, done) for chat, done in zip(batch, done_values)]
            await self._finish(ctx, token, finished, outputs)
            return self._log_coalesced(ctx, batch, outcome)

    async def _followers(self, head: "_Chat", ctx: _TaskLog) -> list["_Chat"]:
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
        raws = ctx.queued[:s.bridge_coalesce_max]  # as read when claiming or by the last FINISH
        if (ctx.mid_burst or len(raws) > 1) and s.bridge_coalesce_wait_ms:
            # Debounce: wait while the burst is still arriving (each pause must bring a new message),
            # until the group is full or MAX_BURST_WAIT_S has passed.
            waited = 0.0
            while len(raws) < s.bridge_coalesce_max and waited < MAX_BURST_WAIT_S:
                pause = s.bridge_coalesce_wait_ms / 1000
                if await self._pause(pause):
                    break
                waited += pause
                more = await self.queues.peek(head.request.user_id, s.bridge_coalesce_max)
                grew, raws = len(more) > len(raws), more
                if not grew:
                    break
        if not raws or raws[0] != head.raw:
            return []
        candidates: list[LettaRequest] = []
        seen = {head.task_id}
        for raw in raws[1:]:
            try:
                request = parse_request(raw, max_bytes=s.bridge_max_payload_bytes)
            except WireError:
                break
            if (request.user_id != head.request.user_id or request.type not in CHAT_TYPES
                    or request.task_id in seen or self._route_of(request) != "letta"):
                break
            seen.add(request.task_id)
            candidates.append(request)
        followers = []
        done = await self.queues.done_flags([r.task_id for r in candidates]) if candidates else []
        for raw, request, is_done in zip(raws[1:], candidates, done):
            if is_done:
                break
            try:
                text = await self._viewer_text(request)
            except WireError:
                break
            chat = _Chat(raw, request, compose_turn_text(request, text))
            if not chat.text:
                break  # dead-lettered when it becomes the head
            followers.append(chat)
        return followers

    def _backoff(self, attempt: int) -> float:
        """Exponential backoff (base * 2^(attempt-1), capped) with jitter: a random delay in [cap/2, cap]."""
        s = self.settings
        cap = min(s.bridge_retry_max_delay, s.bridge_retry_base_delay * (2 ** max(0, attempt - 1)))
        return cap * (0.5 + random.random() / 2)

    async def _viewer_text(self, request: LettaRequest) -> str | None:
        if request.content and request.content.strip():
            return request.content
        if request.input_file:
            s = self.settings
            return await asyncio.to_thread(read_input_file, request.input_file, s.bridge_uploads_path, s.bridge_max_input_file_bytes)
        return None

    async def _timed(self, op: str, call: Awaitable[T]) -> T:
        with self.metrics.letta_latency.labels(op).time():
            return await call

    async def _letta_turn(
        self, batch: list["_Chat"], stats: dict[str, str], now: float, *, check_history: bool
    ) -> tuple[TurnResult, str, ReplyStream | None]:
        """Everything Letta does for one turn (one task, or a coalesced burst); safe to repeat
        (at-least-once). check_history: a task of the batch was attempted before, so its turn may
        already be in the agent's history. Returns the result, the outcome and the stream that
        published it (if any). `stats`: the viewer's counters once this batch was counted."""
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
                return TurnResult(reply_text="", silent=True, memory_updated=True), "recorded", None
        task_ids = [chat.task_id for chat in batch]
        if check_history:
            # An earlier attempt may have reached the agent before failing or dying: never a 2nd turn.
            # Its run may still be going on in Letta (it outlives its client): let it end first.
            await self._timed("settle_runs", self.gateway.settle_runs(agent_id))
            found = await self._timed("find_answered", self.gateway.find_answered(agent_id, task_ids))
            answering = found.answered[-1] if found is not None and found.answered else task_ids[-1]
            # An earlier attempt may have handed its words to speech before it failed: never again.
            spoken_before = await already_spoken(self.redis, answering)
            if found is not None and not found.unfinished:
                muted = self._stream(answering, viewer, spoken_before=True) if spoken_before else None
                return replace(found, memory_updated=found.memory_updated or recorded), "replayed", muted
        else:
            found, answering, spoken_before = None, task_ids[-1], False
        stream = None
        if self.settings.bridge_streaming or spoken_before:
            stream = self._stream(answering, viewer, spoken_before=spoken_before)
        sinks = {"on_text": stream.feed, "on_words_done": stream.words_done} if self.settings.bridge_streaming else {}
        if found is not None:
            # The earlier attempt's tools ran but it died before the agent spoke: finish that turn
            # (its next step), never send the message again. It answers the tasks it carried.
            result = await self._timed("continue_turn", self.gateway.continue_turn(agent_id, task_ids[0], found, **sinks))
        else:
            result = await self._timed(
                "send_turn",
                self.gateway.send_turn(
                    agent_id, [TurnMessage(chat.task_id, chat.text) for chat in batch],
                    sender_name=self._sender_name(request), **sinks,
                ),
            )
        if stream is not None and stream.handed_off and result.silent and stream.text:
            # stay_silent came after words that already went to speech: the record says what she said.
            result = replace(result, silent=False, reply_text=stream.text)
        if stream is not None and not result.silent:
            stream.tail = stream.close()
        outcome = "silent" if result.silent else "answered"
        answered = result.answered if found is not None else ()
        return replace(result, memory_updated=result.memory_updated or recorded, answered=answered), outcome, stream

    def _stream(self, task_id: str, viewer: str, *, spoken_before: bool) -> ReplyStream:
        return ReplyStream(self.redis, self.settings, task_id=task_id, user_id=viewer, clock=self.clock,
                           spoken_before=spoken_before)

    @staticmethod
    def _sender_name(request: LettaRequest) -> str:
        """'小明@bilibili': the display name (else the id after the platform) and the platform."""
        name = request.meta.display_name or split_platform(request.user_id)[1] or request.user_id
        platform = request.platform
        return f"{name}@{platform}" if platform else name

    def _reply_outputs(self, batch: list["_Chat"], result: TurnResult, stream: ReplyStream | None) -> tuple[list[Output], list[str]]:
        """The outputs of an answered turn and the done marker of each task (its LettaResponse).

        The last task of the batch carries the reply (avatar events, words); each earlier one gets
        an empty response naming the task that answered it. With a stream, its last sentence goes
        first, and if the sentences went to TTS one by one the whole reply is not queued again."""
        s = self.settings
        now = self.clock()
        answering = batch[-1].task_id
        viewer = batch[0].request.user_id
        outputs: list[Output] = list(stream.tail) if stream is not None else []
        spoken = stream is not None and stream.spoken
        done_values: list[str] = []
        for chat in batch[:-1]:
            response = LettaResponse(task_id=chat.task_id, user_id=viewer, response_text="", memory_updated=False,
                                     timestamp=now, answered_by=answering)
            done_values.append(dump(response))
            outputs.append(Output("publish", s.bridge_response_channel, done_values[-1]))
            outputs.append(Output("publish", keys.task_response_channel(chat.task_id),
                                  dump(TaskResponse(text="", answered_by=answering))))
        response = LettaResponse(
            task_id=answering, user_id=viewer, response_text=result.reply_text, memory_updated=result.memory_updated,
            timestamp=now, silent=result.silent, answers=[chat.task_id for chat in batch] if len(batch) > 1 else None,
        )
        done_values.append(dump(response))
        outputs.append(Output("publish", s.bridge_response_channel, done_values[-1]))
        for call in result.avatar_calls:
            event = AvatarEvent(tool=call.tool, args=call.args, task_id=answering, user_id=viewer, timestamp=now)
            outputs.append(Output("publish", s.bridge_avatar_channel, dump(event)))
        if result.silent and not spoken:
            outputs.append(Output("publish", keys.task_response_channel(answering), dump(TaskResponse(text="", silent=True))))
        elif not spoken:
            outputs += speech_outputs(s, answering, result.reply_text)
        return outputs, done_values

    def _log_coalesced(self, ctx: _TaskLog, batch: list["_Chat"], turn_outcome: str) -> str:
        """The outcome of the head; the other tasks of a coalesced turn get their log line here (the
        last one, whose reply answers them all, with the turn's outcome: answered, silent, replayed)."""
        if len(batch) == 1:
            return turn_outcome
        answering = batch[-1].task_id
        for chat in batch[1:]:
            outcome = turn_outcome if chat.task_id == answering else "coalesced"
            self.metrics.outcomes.labels(outcome).inc()
            log.info(
                "task=%s viewer=%s type=%s route=letta attempt=%d outcome=%s duration_ms=%d %s",
                chat.task_id, loggable(ctx.viewer), chat.request.type, ctx.attempt, outcome,
                (time.monotonic() - ctx.started) * 1000,
                f"reason=answered {len(batch)} tasks in one turn" if chat.task_id == answering else f"answered_by={answering}",
            )
        ctx.reason = f"answered_by={answering}"
        return "coalesced"

    async def _fall_back(self, ctx: _TaskLog, token: str, batch: list["_Chat"]) -> str:
        """Letta is down: hand the tasks to memory-python, marked meta.letta_fallback = true."""
        outputs = []
        for chat in batch:
            payload: dict[str, Any] = json.loads(chat.raw)
            meta = payload.get("meta") if isinstance(payload.get("meta"), dict) else {}
            payload["meta"] = {**meta, "letta_fallback": True}
            outputs.append(Output("lpush", self.settings.bridge_memory_queue, json.dumps(payload, ensure_ascii=False)))
        done = '{"fallback":"memory-python"}'
        await self._finish(ctx, token, [Finished(chat.raw, chat.task_id, done) for chat in batch], outputs)
        ctx.route = MEMORY_PYTHON
        if len(batch) > 1:
            ctx.reason = f"{len(batch)} tasks"
        return "fallback"

    # ------------------------------------------------------------------ acknowledging
    async def _finish(self, ctx: _TaskLog, token: str, tasks: list[Finished], outputs: list[Output]) -> None:
        ctx.after = await self.queues.finish(ctx.viewer, token, tasks, done_ttl=self.settings.bridge_done_ttl,
                                             outputs=outputs, peek=self._peek)
        if ctx.after.status != 1:
            ctx.after = None
            raise _LockLost()

    def _dead_letter_entry(
        self, raw: bytes, reason: str, *, stage: str, task_id: str | None, user_id: str | None, attempts: int | None = None
    ) -> str:
        limit = self.settings.bridge_max_payload_bytes
        text = raw[:limit].decode("utf-8", "replace") + ("…[truncated]" if len(raw) > limit else "")
        return dump(DeadLetter(
            reason=reason, raw=text, task_id=task_id, user_id=user_id, stage=stage,
            attempts=attempts, replica_id=self.replica_id, at=self.clock(),
        ))

    async def _dead_letter(
        self, ctx: _TaskLog, token: str, raws: list[bytes], reason: str, stage: str,
        task_id: str | None, user_id: str | None, attempts: int | None = None,
    ) -> str:
        """Dead-letter the task (or every task of a coalesced turn that kept failing), one entry each."""
        finished, outputs = [], []
        for index, raw in enumerate(raws):
            own_id = task_id if index == 0 else _task_id_of(raw)
            entry = self._dead_letter_entry(raw, reason, stage=stage, task_id=own_id, user_id=user_id, attempts=attempts)
            finished.append(Finished(raw, own_id, None))
            outputs.append(Output("dead_letter", keys.BRIDGE_DEAD_LETTERS, entry))
        await self._finish(ctx, token, finished, outputs)
        ctx.reason = f"{stage}: {reason}"
        return "dead_letter"


@dataclass(frozen=True)
class _Chat:
    """One validated task of a Letta turn and the text the agent reads for it."""

    raw: bytes
    request: LettaRequest
    text: str

    @property
    def task_id(self) -> str:
        return self.request.task_id


def _carried(batch: list[_Chat], answered: tuple[str, ...]) -> int:
    """How many tasks at the start of batch a replayed turn carried (the head always)."""
    count = 1
    while count < len(batch) and batch[count].task_id in answered:
        count += 1
    return count


def _task_id_of(raw: bytes) -> str | None:
    try:
        return json.loads(raw).get("task_id")
    except (ValueError, AttributeError):
        return None


async def run_bridge(
    settings: Settings,
    gateway: LettaGateway,
    *,
    stop_event: asyncio.Event | None = None,
    redis: Redis | None = None,
    replica_id: str | None = None,
) -> None:
    """Run one bridge replica until stop_event is set (or, without one, SIGTERM/SIGINT)."""
    loop = asyncio.get_running_loop()
    installed: list[int] = []
    if stop_event is None:
        stop_event = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                loop.add_signal_handler(sig, stop_event.set)
                installed.append(sig)
            except (NotImplementedError, RuntimeError, ValueError):  # not the main thread / platform
                pass
    client = redis if redis is not None else redis_client(settings)
    try:
        await BridgeService(settings, client, gateway, replica_id=replica_id).run(stop_event)
    finally:
        for sig in installed:
            loop.remove_signal_handler(sig)
        if redis is None:
            await client.aclose()


async def check_bridge(settings: Settings, replica_id: str | None = None) -> bool:
    """True while a bridge replica (or the given one) heartbeats; False otherwise, Redis down included."""
    client = async_redis_client(settings, decode_responses=False, socket_timeout=3, socket_connect_timeout=3)
    try:
        if replica_id:
            return bool(await client.exists(keys.bridge_heartbeat(replica_id)))
        async for _ in client.scan_iter(match=keys.BRIDGE_HEARTBEAT_PREFIX + "*", count=1000):
            return True
        return False
    except (RedisError, OSError):
        return False
    finally:
        await client.aclose()
