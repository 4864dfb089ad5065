"""The bridge's Redis side: an order-preserving, at-least-once queue per viewer.

Every task is inside some Redis list at every moment, so a replica dying anywhere loses nothing:

    request list --BLMOVE RIGHT->LEFT--> vtl:staging      (any replica; one shared list)
    vtl:staging  --ROUTE (oldest first)--> vtl:vq:{viewer} (+ vtl:pending, vtl:ready)
                                       or  vtl:triage      (no sane user_id: dead-lettered later)
      (ROUTE then takes the rest of the request list too, in the same atomic script)
    vtl:vq:{viewer} head(s) --FINISH--> outputs + pop + vtl:done:{task}   (one atomic script)

Ordering: the host LPUSHes, so the RIGHT end of every list is the oldest. Two replicas may BLMOVE
A1 and A2 of one viewer at the same time, but ROUTE always pops the oldest item of the one shared
staging list, so the viewer queue receives A1 before A2 whoever moved them.

One turn per viewer across replicas: a worker owns a viewer while it holds `vtl:active:{viewer}`
(SET NX PX with a random token, renewed while working) and only ever works on the HEAD of that
viewer's queue; FINISH pops the head (or the first n, for a coalesced turn) only if the token is
still its own. RELEASE (and FINISH, when it leaves the queue empty) drops the lock only when the
queue is empty, in the same script that checks it, so a task routed meanwhile can never be stranded. SWEEP re-readies viewers whose worker died (lock expired).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import AsyncIterator, Literal, Sequence, TypeVar

from redis.asyncio import Redis

from bridge.wire import MAX_ID_BYTES
from vtuber_letta import redis_keys as keys

T = TypeVar("T")

# KEYS: staging, triage, pending, ready, request list
# ARGV: viewer queue prefix, active lock prefix, max payload bytes, max user_id bytes, batch size
# Routes up to `batch size` payloads, oldest first: those in staging, then straight from the request
# list (in one script nothing can be lost in between), so a burst pushed at once is in its viewer's
# queue before any worker claims the viewer. Returns {routed, triaged}.
# The id check is coarse (ASCII id characters or any UTF-8 byte, no spaces or controls): the exact
# rule (bridge/wire.py ID_PATTERN) is applied by the worker, which dead-letters what fails it.
_ROUTE = r"""
-- Strict UTF-8 (no overlongs, no surrogates): an id the workers could not decode would strand
-- its queue, so such a payload goes to triage and is dead-lettered there.
local function utf8_ok(s)
  local i, n = 1, string.len(s)
  while i <= n do
    local c = string.byte(s, i)
    local len, lo, hi = 1, 0x80, 0xBF
    if c < 0x80 then len = 1
    elseif c >= 0xC2 and c <= 0xDF then len = 2
    elseif c == 0xE0 then len, lo = 3, 0xA0
    elseif c == 0xED then len, hi = 3, 0x9F
    elseif c >= 0xE1 and c <= 0xEF then len = 3
    elseif c == 0xF0 then len, lo = 4, 0x90
    elseif c >= 0xF1 and c <= 0xF3 then len = 4
    elseif c == 0xF4 then len, hi = 4, 0x8F
    else return false end
    if i + len - 1 > n then return false end
    for j = i + 1, i + len - 1 do
      local cc = string.byte(s, j)
      local first = (j == i + 1)
      if cc < (first and lo or 0x80) or cc > (first and hi or 0xBF) then return false end
    end
    i = i + len
  end
  return true
end
local routed, triaged = 0, 0
for _ = 1, tonumber(ARGV[5]) do
  -- staging first: what was moved there is older than anything still in the request list
  local raw = redis.call('RPOP', KEYS[1]) or redis.call('RPOP', KEYS[5])
  if not raw then break end
  local uid = nil
  if string.len(raw) <= tonumber(ARGV[3]) then
    local ok, obj = pcall(cjson.decode, raw)
    if ok and type(obj) == 'table' then
      local u = obj['user_id']
      if type(u) == 'string' and string.len(u) >= 1 and string.len(u) <= tonumber(ARGV[4])
         and string.find(u, '^[%w_%.:@%+=%-\128-\255]+$') and utf8_ok(u) then
        uid = u
      end
    end
  end
  if not uid then
    redis.call('RPUSH', KEYS[2], raw)
    triaged = triaged + 1
  else
    redis.call('RPUSH', ARGV[1] .. uid, raw)
    redis.call('SADD', KEYS[3], uid)
    if redis.call('EXISTS', ARGV[2] .. uid) == 0 and not redis.call('LPOS', KEYS[4], uid) then
      redis.call('RPUSH', KEYS[4], uid)
    end
    routed = routed + 1
  end
end
return {routed, triaged}
"""

# KEYS: active lock, viewer queue; ARGV: token, ttl ms, peek count
# Claim the viewer and read the first tasks of its queue in one round trip; nil if someone else has it.
_CLAIM = """
if not redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return false end
return redis.call('LRANGE', KEYS[2], 0, tonumber(ARGV[3]) - 1)
"""

# KEYS: active lock; ARGV: token, ttl ms
_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""

# KEYS: active lock, viewer queue, attempts hash, counted hash, pending, the viewer's task index, then one
#       done key per task, then one key per output
# ARGV: token, n tasks, done ttl s, dead-letter max length, peek count, viewer, then (expected raw,
#       task id ('' = unknown), done value ('' = no done marker)) per task, then (op, value) per output
# The n tasks are the first n of the queue (a coalesced turn answers several at once). When the queue
# is then empty, the viewer is released in the same script (as RELEASE would), saving two round trips.
# Returns {1, 1} finished and released, {1, 0, the first `peek count` tasks left} finished,
# {0} lock not ours, {-1} the queue's head is not what was answered.
_FINISH = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return {0} end
local n = tonumber(ARGV[2])
local heads = redis.call('LRANGE', KEYS[2], 0, n - 1)
if #heads ~= n then return {-1} end
for i = 1, n do
  if heads[i] ~= ARGV[4 + 3 * i] then return {-1} end
end
local out0 = 6 + 3 * n
local outputs = #KEYS - 6 - n
for i = 1, outputs do
  local op = ARGV[out0 + 2 * i - 1]
  if op ~= 'publish' and op ~= 'lpush' and op ~= 'dead_letter' then
    return redis.error_reply('unknown output op ' .. tostring(op))
  end
end
redis.call('LTRIM', KEYS[2], n, -1)
for i = 1, n do
  local task, done = ARGV[5 + 3 * i], ARGV[6 + 3 * i]
  if task ~= '' then
    redis.call('HDEL', KEYS[3], task)
    redis.call('HDEL', KEYS[4], task)
  end
  if done ~= '' then
    redis.call('SET', KEYS[6 + i], done, 'EX', ARGV[3])
    if task ~= '' then
      -- the viewer's index of done markers (keyed by task id only): what `agent forget` deletes
      redis.call('SADD', KEYS[6], task)
      redis.call('EXPIRE', KEYS[6], ARGV[3])
    end
  end
end
for i = 1, outputs do
  local key = KEYS[6 + n + i]
  local op, value = ARGV[out0 + 2 * i - 1], ARGV[out0 + 2 * i]
  if op == 'publish' then
    redis.call('PUBLISH', key, value)
  elseif op == 'lpush' then
    redis.call('LPUSH', key, value)
  else
    redis.call('LPUSH', key, value)
    redis.call('LTRIM', key, 0, tonumber(ARGV[4]) - 1)
  end
end
local rest = redis.call('LRANGE', KEYS[2], 0, tonumber(ARGV[5]) - 1)
if #rest == 0 then
  redis.call('DEL', KEYS[1])
  redis.call('SREM', KEYS[5], ARGV[6])
  return {1, 1}
end
return {1, 0, unpack(rest)}
"""

# KEYS: active lock, viewer queue, pending, ready; ARGV: token, viewer, 'yield' | 'release'
# Returns 1 released (queue empty), 2 yielded (queue re-readied), 0 keep working, -1 lock not ours.
_RELEASE = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return -1 end
if redis.call('LLEN', KEYS[2]) == 0 then
  redis.call('DEL', KEYS[1])
  redis.call('SREM', KEYS[3], ARGV[2])
  return 1
end
if ARGV[3] == 'yield' then
  redis.call('DEL', KEYS[1])
  if not redis.call('LPOS', KEYS[4], ARGV[2]) then redis.call('RPUSH', KEYS[4], ARGV[2]) end
  return 2
end
return 0
"""

# KEYS: pending, ready, then (active lock, viewer queue) per viewer; ARGV: the viewers
# For each viewer: re-ready it if nobody holds its lock and it has work, forget it if its queue is
# empty. One call per batch of pending viewers (not one per viewer). Returns how many were re-readied.
_SWEEP = """
local readied = 0
for i = 1, #ARGV do
  local viewer = ARGV[i]
  if redis.call('EXISTS', KEYS[1 + 2 * i]) == 0 then
    if redis.call('LLEN', KEYS[2 + 2 * i]) == 0 then
      redis.call('SREM', KEYS[1], viewer)
    elseif not redis.call('LPOS', KEYS[2], viewer) then
      redis.call('RPUSH', KEYS[2], viewer)
      readied = readied + 1
    end
  end
end
return readied
"""

# KEYS: triage, dead letters; ARGV: expected oldest raw, entry, max length
_DEAD_LETTER_TRIAGE = """
if redis.call('LINDEX', KEYS[1], -1) ~= ARGV[1] then return 0 end
redis.call('RPOP', KEYS[1])
redis.call('LPUSH', KEYS[2], ARGV[2])
redis.call('LTRIM', KEYS[2], 0, tonumber(ARGV[3]) - 1)
return 1
"""

# KEYS: counted hash, viewer stats; ARGV: task id, then (op, field, value) triples
# op: setnx | set | incr | incrf. Counted once per task id; returns the stats hash.
_COUNT = """
if redis.call('HSETNX', KEYS[1], ARGV[1], '1') == 1 then
  for i = 2, #ARGV, 3 do
    local op, field, value = ARGV[i], ARGV[i + 1], ARGV[i + 2]
    if op == 'setnx' then redis.call('HSETNX', KEYS[2], field, value)
    elseif op == 'set' then redis.call('HSET', KEYS[2], field, value)
    elseif op == 'incr' then redis.call('HINCRBY', KEYS[2], field, value)
    elseif op == 'incrf' then redis.call('HINCRBYFLOAT', KEYS[2], field, value)
    end
  end
end
return redis.call('HGETALL', KEYS[2])
"""


# KEYS: active lock, viewer queue, pending, ready; ARGV: token, viewer
# `agent forget`, while it holds the viewer: drop the viewer's whole queue (tasks routed while it
# worked included) and let the viewer go, in one step. Returns how many tasks were dropped, -1 if the
# lock is not ours.
_DROP_VIEWER = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return -1 end
local dropped = redis.call('LLEN', KEYS[2])
redis.call('DEL', KEYS[2])
redis.call('DEL', KEYS[1])
redis.call('SREM', KEYS[3], ARGV[2])
redis.call('LREM', KEYS[4], 0, ARGV[2])
return dropped
"""


def cancel_point() -> None:
    """Raise CancelledError if this task was cancelled.

    redis-py's asyncio client can swallow a cancellation that lands mid-command (seen with
    redis 8.1: the command returns and the task runs on in "cancelling" state; see
    redis/redis-py#2028). Every loop of the bridge calls this, so a stop/kill always ends it.
    """
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError()


@dataclass(frozen=True)
class Finished:
    """One task acknowledged by FINISH: its raw payload (must still be at its place in the queue),
    its task id (None when the payload had none) and its done marker (None: no marker)."""

    raw: bytes
    task_id: str | None
    done_value: str | None


@dataclass(frozen=True)
class FinishResult:
    """What FINISH did: status 1 ok, 0 lock lost, -1 head moved; released: the queue was empty and
    the viewer was let go; queued: else the next tasks of the queue, head first."""

    status: int
    released: bool
    queued: list[bytes]


@dataclass(frozen=True)
class Output:
    """One write done atomically with acknowledging a task."""

    op: Literal["publish", "lpush", "dead_letter"]
    key: str
    value: str | bytes  # bytes: a payload forwarded byte for byte


class ViewerQueues:
    def __init__(self, redis: Redis, *, request_queue: str, max_payload_bytes: int, dead_letter_max: int):
        self.redis = redis
        self.request_queue = request_queue
        self.max_payload_bytes = max_payload_bytes
        self.dead_letter_max = dead_letter_max
        self._route = redis.register_script(_ROUTE)
        self._renew = redis.register_script(_RENEW)
        self._finish = redis.register_script(_FINISH)
        self._release = redis.register_script(_RELEASE)
        self._sweep = redis.register_script(_SWEEP)
        self._dead_letter_triage = redis.register_script(_DEAD_LETTER_TRIAGE)
        self._count = redis.register_script(_COUNT)
        self._claim = redis.register_script(_CLAIM)

    # ---- intake ----
    async def take(self, timeout: float) -> bool:
        """Block up to timeout for one request; move it (oldest first) into the shared staging list."""
        moved = await self.redis.blmove(self.request_queue, keys.BRIDGE_STAGING, timeout, src="RIGHT", dest="LEFT")
        return moved is not None

    async def route_all(self, batch: int = 100) -> tuple[int, int]:
        """Route staging and the request list until both are empty (`batch` payloads per script call);
        returns (routed, triaged)."""
        routed = triaged = 0
        while True:
            cancel_point()
            moved, dead = await self._route(
                keys=[keys.BRIDGE_STAGING, keys.BRIDGE_TRIAGE, keys.BRIDGE_PENDING, keys.BRIDGE_READY, self.request_queue],
                args=[keys.VIEWER_QUEUE_PREFIX, keys.VIEWER_ACTIVE_PREFIX, self.max_payload_bytes, MAX_ID_BYTES, batch],
            )
            routed, triaged = routed + moved, triaged + dead
            if moved + dead < batch:
                return routed, triaged

    # ---- viewer ownership ----
    async def next_ready(self, timeout: float) -> str | None:
        item = await self.redis.blpop([keys.BRIDGE_READY], timeout=timeout)
        return item[1].decode(errors="surrogateescape") if item else None

    async def claim(self, viewer: str, token: str, ttl_ms: int, *, peek: int) -> list[bytes] | None:
        """Take the viewer (None if another worker has it) and read its first `peek` tasks."""
        queued = await self._claim(keys=[keys.viewer_active(viewer), keys.viewer_queue(viewer)],
                                   args=[token, ttl_ms, max(1, peek)])
        return None if queued is None else list(queued)

    async def renew(self, viewer: str, token: str, ttl_ms: int) -> bool:
        return bool(await self._renew(keys=[keys.viewer_active(viewer)], args=[token, ttl_ms]))

    async def peek(self, viewer: str, count: int) -> list[bytes]:
        """The first `count` tasks of the viewer's queue, head first."""
        return await self.redis.lrange(keys.viewer_queue(viewer), 0, count - 1)

    async def finish(
        self, viewer: str, token: str, tasks: Sequence[Finished], *, done_ttl: int, outputs: Sequence[Output], peek: int
    ) -> "FinishResult":
        """Atomically: write outputs, pop the tasks (the first len(tasks) of the queue), mark them
        done; release the viewer if its queue is now empty, else read its next `peek` tasks."""
        script_keys = [
            keys.viewer_active(viewer),
            keys.viewer_queue(viewer),
            keys.BRIDGE_ATTEMPTS,
            keys.BRIDGE_COUNTED,
            keys.BRIDGE_PENDING,
            keys.viewer_tasks(viewer),
            *(keys.task_done(task.task_id or "") for task in tasks),
            *(out.key for out in outputs),
        ]
        args: list[str | bytes | int] = [token, len(tasks), done_ttl, self.dead_letter_max, max(1, peek), viewer]
        for task in tasks:
            args += [task.raw, task.task_id or "", task.done_value or ""]
        for out in outputs:
            args += [out.op, out.value]
        reply = await self._finish(keys=script_keys, args=args)
        status = int(reply[0])
        if status != 1:
            return FinishResult(status=status, released=False, queued=[])
        return FinishResult(status=1, released=bool(int(reply[1])), queued=list(reply[2:]))

    async def release(self, viewer: str, token: str, *, yield_turn: bool) -> int:
        """1 released (empty), 2 yielded to others, 0 more work (keep going), -1 lock was lost."""
        return int(
            await self._release(
                keys=[keys.viewer_active(viewer), keys.viewer_queue(viewer), keys.BRIDGE_PENDING, keys.BRIDGE_READY],
                args=[token, viewer, "yield" if yield_turn else "release"],
            )
        )

    async def sweep(self, batch: int = 500) -> int:
        """Re-ready every pending viewer whose worker is gone; returns how many."""
        readied = 0
        async for members in _batched(self.redis.sscan_iter(keys.BRIDGE_PENDING, count=batch), batch):
            viewers = [member.decode(errors="surrogateescape") for member in members]
            viewer_keys = [key for viewer in viewers for key in (keys.viewer_active(viewer), keys.viewer_queue(viewer))]
            readied += int(await self._sweep(keys=[keys.BRIDGE_PENDING, keys.BRIDGE_READY, *viewer_keys], args=viewers))
        return readied

    async def is_done(self, task_id: str) -> bool:
        return bool(await self.redis.exists(keys.task_done(task_id)))

    async def done_flags(self, task_ids: Sequence[str]) -> list[bool]:
        """is_done for several tasks in one round trip."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for task_id in task_ids:
                pipe.exists(keys.task_done(task_id))
            return [bool(n) for n in await pipe.execute()]

    async def begin_attempt(
        self, viewer: str, tasks: Sequence[tuple[str, list[tuple[str, str, str]]]]
    ) -> tuple[list[int], dict[str, str]]:
        """One round trip before a Letta turn: count an attempt for each (task id, stats ops) and
        apply each task's stats ops once (count_once). Returns the attempts and the viewer's stats."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for task_id, _ in tasks:
                pipe.hincrby(keys.BRIDGE_ATTEMPTS, task_id, 1)
            for task_id, ops in tasks:
                await self._count(keys=[keys.BRIDGE_COUNTED, keys.viewer_stats(viewer)], args=_count_args(task_id, ops), client=pipe)
            results = await pipe.execute()
        flat = results[-1]
        return [int(n) for n in results[:len(tasks)]], {flat[i].decode(): flat[i + 1].decode() for i in range(0, len(flat), 2)}

    # ---- triage ----
    async def oldest_triage(self) -> bytes | None:
        return await self.redis.lindex(keys.BRIDGE_TRIAGE, -1)

    async def dead_letter_triage(self, raw: bytes, entry: str) -> bool:
        return bool(
            await self._dead_letter_triage(
                keys=[keys.BRIDGE_TRIAGE, keys.BRIDGE_DEAD_LETTERS], args=[raw, entry, self.dead_letter_max]
            )
        )

    # ---- observation ----
    async def depths(self) -> dict[str, int]:
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.llen(self.request_queue)
            pipe.llen(keys.BRIDGE_STAGING)
            pipe.llen(keys.BRIDGE_TRIAGE)
            pipe.llen(keys.BRIDGE_DEAD_LETTERS)
            pipe.scard(keys.BRIDGE_PENDING)
            pipe.hlen(keys.VIEWER_AGENTS)
            requests, staging, triage, dead, pending, viewers = await pipe.execute()
        return {
            "requests": requests,
            "staging": staging,
            "triage": triage,
            "dead_letters": dead,
            "pending_viewers": pending,
            "known_viewers": viewers,
        }


class ViewerHold:
    """Keeps the bridge off one viewer while a command outside it changes that viewer's agent
    (`provision` upgrading it, `agent forget` deleting it). Synchronous (redis-py), for the CLI.

    It takes the bridge's own worker lock (`vtl:active:{viewer}`, CLAIM) with a token of its own,
    so no replica can start a turn of that viewer meanwhile, and it never waits for a turn in
    flight to end: `claim` answers None when the viewer is busy. `release` works like a worker
    that yields: a viewer whose queue got tasks meanwhile goes back on the ready list at once.
    """

    def __init__(self, redis_sync, ttl_ms: int):
        self.redis = redis_sync
        self.ttl_ms = int(ttl_ms)
        self._claim = redis_sync.register_script(_CLAIM)
        self._release = redis_sync.register_script(_RELEASE)
        self._drop = redis_sync.register_script(_DROP_VIEWER)

    def claim(self, viewer: str) -> str | None:
        """The token, or None if a worker (or another command) holds the viewer."""
        import secrets

        token = "hold-" + secrets.token_hex(12)
        taken = self._claim(keys=[keys.viewer_active(viewer), keys.viewer_queue(viewer)], args=[token, self.ttl_ms, 1])
        return None if taken is None else token

    def release(self, viewer: str, token: str) -> None:
        self._release(keys=[keys.viewer_active(viewer), keys.viewer_queue(viewer), keys.BRIDGE_PENDING,
                            keys.BRIDGE_READY], args=[token, viewer, "yield"])

    def drop_and_release(self, viewer: str, token: str) -> int:
        """Delete the viewer's queue and let the viewer go (forget); -1 if the hold had expired."""
        return int(self._drop(keys=[keys.viewer_active(viewer), keys.viewer_queue(viewer), keys.BRIDGE_PENDING,
                                    keys.BRIDGE_READY], args=[token, viewer]))


async def _batched(items: AsyncIterator[T], size: int) -> AsyncIterator[list[T]]:
    batch: list[T] = []
    async for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _count_args(task_id: str, ops: Sequence[tuple[str, str, str]]) -> list[str]:
    args = [task_id]
    for op in ops:
        args += list(op)
    return args
