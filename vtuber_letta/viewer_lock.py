"""The viewer lock: `vtl:active:{viewer}` says who may change a viewer right now.

The bridge's workers hold it for a viewer's turn (bridge/queue.py: claim, renew, finish,
release); the commands that change a viewer's agent outside the bridge (`provision` upgrading
it, `agent forget` deleting it) hold the very same lock (`ViewerHold`), so neither ever works on
a viewer while the other does. The lock is owned here, below both, so neither imports the other.
"""

from __future__ import annotations

import secrets

from vtuber_letta import redis_keys as keys

# KEYS: active lock, viewer queue; ARGV: token, ttl ms, peek count
# Claim the viewer and read the first tasks of its queue in one round trip; nil if someone else has it.
CLAIM = """
if not redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return false end
return redis.call('LRANGE', KEYS[2], 0, tonumber(ARGV[3]) - 1)
"""

# KEYS: active lock; ARGV: token, ttl ms
RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""

# KEYS: active lock, viewer queue, pending, ready; ARGV: token, viewer, 'yield' | 'release'
# Returns 1 released (queue empty), 2 yielded (queue re-readied), 0 keep working, -1 lock not ours.
RELEASE = """
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

# KEYS: active lock, viewer queue, pending, ready; ARGV: token, viewer
# `agent forget`, while it holds the viewer: drop the viewer's whole queue (tasks routed while it
# worked included) and let the viewer go, in one step. Returns how many tasks were dropped, -1 if the
# lock is not ours.
DROP_VIEWER = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return -1 end
local dropped = redis.call('LLEN', KEYS[2])
redis.call('DEL', KEYS[2])
redis.call('DEL', KEYS[1])
redis.call('SREM', KEYS[3], ARGV[2])
redis.call('LREM', KEYS[4], 0, ARGV[2])
return dropped
"""


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
        self._claim = redis_sync.register_script(CLAIM)
        self._release = redis_sync.register_script(RELEASE)
        self._drop = redis_sync.register_script(DROP_VIEWER)

    def claim(self, viewer: str) -> str | None:
        """The token, or None if a worker (or another command) holds the viewer."""
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
