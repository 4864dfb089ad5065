"""The bridge: Redis in, Letta, Redis out.

`run_bridge(settings, gateway)` runs one replica until SIGTERM/SIGINT (or `stop_event`);
`check_bridge(settings)` is true while any replica heartbeats. Several replicas may run
against one Redis: see bridge/queue.py for why that keeps each viewer's tasks in order with
one turn in flight per viewer.

A task's path, top down:
  service.py   this replica: run/stop, heartbeat, intake, sweep and triage, dispatch (one worker
               per ready viewer, at most VTL_BRIDGE_CONCURRENCY at once)
  worker.py    the viewer's lease (lease.py); per task: validate, duplicate?, route; acts on the
               Letta turn's decision; the only caller of FINISH; dead letters, fallbacks, the log line
  turn.py      the Letta turn: coalescing, attempts, the retry policy (retry_policy.py), ensure
               agent, record events, replay, send; returns a decision (decisions.py), acks nothing
  gateway.py   what the bridge needs from Letta; letta_gateway.py + letta_turns.py the real one
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import secrets
import signal
import socket
import time
from contextlib import suppress
from typing import Callable

from redis.asyncio import Redis
from redis.exceptions import RedisError

from bridge import outcome_log
from bridge.decisions import Outcome
from bridge.errors import describe_error
from bridge.gateway import LettaGateway
from bridge.lease import ViewerLease
from bridge.metrics import BridgeMetrics
from bridge.outputs import dead_letter_entry
from bridge.queue import Routed, ViewerQueues, cancel_point, viewer_queue_full
from bridge.replica import Replica, default_replica_id, loggable
from bridge.turn import LettaTurn
from bridge.wire import WireError, parse_request
from bridge.worker import ViewerWorker
from vtuber_letta import redis_keys as keys
from vtuber_letta.redis_api import async_redis_client
from vtuber_letta.settings import Settings

log = logging.getLogger("vtuber_letta.bridge")


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
            dead_letters_max_bytes=settings.bridge_dead_letters_max_bytes,
            viewer_queue_max=settings.bridge_viewer_queue_max,
            replica_id=self.replica_id,
        )
        self.replica = Replica(settings, self.queues, self.metrics, self.replica_id, clock)
        self.turn = LettaTurn(self.replica, redis, gateway)  # one for every worker: it keeps the Letta-down hold
        self._stopping = self.replica.stopping
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
            log.info("bridge %s stopping: taking no new work, %d task(s) in flight", self.replica_id, self.replica.in_flight)
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
            await self.replica.outcome_log.drain()  # the last outcomes, written by the tasks just ended
            if graceful:
                with suppress(RedisError, OSError):
                    await self.redis.delete(keys.bridge_heartbeat(self.replica_id))
                if unfinished:
                    log.warning("bridge %s: grace period over, %d viewer task(s) cancelled", self.replica_id, unfinished)
                log.info("bridge %s stopped", self.replica_id)
            self.metrics.close()

    async def _beat(self) -> None:
        value = json.dumps({
            "replica_id": self.replica_id, "pid": os.getpid(), "host": socket.gethostname(),
            "started": self._started, "in_flight": self.replica.in_flight, "at": self.clock(),
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
                await self.replica.pause(1.0)
        with suppress(RedisError, OSError):
            await self._route_staging()  # what this replica moved is routed before it leaves

    async def _route_staging(self) -> None:
        if (await self._route()).triaged:
            await self._drain_triage()

    async def _route(self) -> Routed:
        """Route what is staged; count and log the chat tasks refused for a full viewer queue."""
        routed = await self.queues.route_all()
        for task_id, viewer in routed.refused:
            outcome_log.record(self.replica, viewer, task_id, Outcome.DEAD_LETTER.value, 0.0)
            log.warning(
                "task=%s viewer=%s type=- route=- attempt=0 outcome=dead_letter duration_ms=0 reason=intake: %s",
                task_id or "-", loggable(viewer), viewer_queue_full(self.settings.bridge_viewer_queue_max),
            )
        return routed

    async def _sweep_loop(self) -> None:
        while True:
            cancel_point()
            try:
                await self._route()  # staging left behind by a replica that died
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
        m.dead_letter_bytes.set(depths["dead_letter_bytes"])
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
            entry = dead_letter_entry(raw, reason, stage="intake", task_id=task_id, user_id=user_id, attempts=None,
                                      replica_id=self.replica_id, at=self.clock(),
                                      max_bytes=self.settings.bridge_max_payload_bytes)
            if await self.queues.dead_letter_triage(raw, entry):
                outcome_log.record(self.replica, None, task_id, Outcome.DEAD_LETTER.value, 0.0)
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
                await self.replica.pause(1.0)
                continue
            except Exception:  # a bug must not end the dispatcher: this replica would serve no one
                log.exception("bridge %s: dispatcher error", self.replica_id)
                await self.replica.pause(1.0)
                continue
            if viewer is not None:  # even when stopping: its task hands the viewer back at once
                task = asyncio.create_task(self._serve_ready_viewer(viewer))
                serving.add(task)
                task.add_done_callback(serving.discard)

    async def _serve_ready_viewer(self, viewer: str) -> None:
        s = self.settings
        token = secrets.token_hex(16)
        ttl_ms = int(s.bridge_lock_ttl * 1000)
        try:
            peek = s.bridge_coalesce_max  # how much of a viewer's queue is read at once
            queued = await self.queues.claim(viewer, token, ttl_ms, peek=peek)
            if queued is not None:  # None: another worker holds the viewer and will see its new task
                lease = ViewerLease(self.queues, viewer, token, ttl_ms=ttl_ms, done_ttl=s.bridge_done_ttl, peek=peek)
                await ViewerWorker(self.replica, self.turn, lease).serve(queued)
        except (RedisError, OSError) as exc:
            log.warning("bridge %s: viewer %s: %s", self.replica_id, loggable(viewer), describe_error(exc))
            await self._hand_back(viewer, token, ttl_ms / 1000)
        except Exception:  # a bug: logged, and the viewer's lock expires for the sweeper to hand on
            log.exception("bridge %s: error serving viewer %s", self.replica_id, loggable(viewer))
            await self.replica.pause(1.0)

    async def _hand_back(self, viewer: str, token: str, ttl: float) -> None:
        """Redis failed mid-turn (e.g. restarted: the lock came back from its append-only file):
        once it answers again, hand the viewer back to the ready list with our token, so their
        task (still at the head) is taken up at once, not after the lock TTL. Bounded by the TTL,
        after which the sweeper does the same. Keeps the slot meanwhile: Redis is in trouble."""
        until = time.monotonic() + ttl
        while True:
            if await self.replica.pause(1.0):
                return
            try:
                await self.queues.release(viewer, token, yield_turn=True)
                return
            except (RedisError, OSError):
                if time.monotonic() >= until:
                    return


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
