"""The dead-letter list `vtl:dead_letters`, bounded in entries and in bytes.

Every writer and remover of a dead letter keeps `vtl:dead_letters:bytes` (the sum of the entries'
lengths) right in the same script as the list change: the bridge's scripts that dead-letter
(bridge/queue.py: ROUTE's full viewer queues, FINISH's `dead_letter` output, the triage), the
console's "send again" (console/live.py) and `agent forget` (provisioning/forget.py). Owned here,
below all three, so none imports another.

The counter is created from the list itself the first time a dead letter is pushed without one
(an upgrade from a version without it, or someone deleted it): one pass over the list, once.
A removal leaves a missing counter missing, so it can never go negative.
"""

from __future__ import annotations

# Lua source defining `push_dead_letter(list, total, entry, max_len, max_bytes)`, to put at the
# top of a script: LPUSH the entry, then drop the oldest entries (RPOP) while the list holds more
# than max_len entries or more than max_bytes bytes. The newest entry is always kept, however large
# (one entry is bounded by VTL_BRIDGE_MAX_PAYLOAD_BYTES plus its reason).
PUSH_DEAD_LETTER = """
local function push_dead_letter(list, total, entry, max_len, max_bytes)
  max_len, max_bytes = tonumber(max_len), tonumber(max_bytes)
  if redis.call('EXISTS', total) == 0 then
    local sum, start = 0, 0
    while true do
      local page = redis.call('LRANGE', list, start, start + 999)
      if #page == 0 then break end
      for _, old in ipairs(page) do sum = sum + string.len(old) end
      start = start + #page
    end
    redis.call('SET', total, sum)
  end
  local len = redis.call('LPUSH', list, entry)
  local bytes = redis.call('INCRBY', total, string.len(entry))
  while len > 1 and (len > max_len or bytes > max_bytes) do
    bytes = redis.call('DECRBY', total, string.len(redis.call('RPOP', list)))
    len = len - 1
  end
end
"""

# Lua source defining `dead_letters_removed(total, entry, n)`: n copies of entry were just removed
# from the list (LREM); keep the byte counter equal to the list's size.
REMOVED_DEAD_LETTERS = """
local function dead_letters_removed(total, entry, n)
  if n > 0 and redis.call('EXISTS', total) == 1 then
    redis.call('DECRBY', total, n * string.len(entry))
  end
end
"""

# KEYS: dead letters, byte counter; ARGV: the exact entry
# Remove every copy of one entry (what `agent forget` does with a viewer's dead letters); returns how many.
REMOVE_DEAD_LETTER = REMOVED_DEAD_LETTERS + """
local n = redis.call('LREM', KEYS[1], 0, ARGV[1])
dead_letters_removed(KEYS[2], ARGV[1], n)
return n
"""

# KEYS: dead letters, byte counter, request list; ARGV: the exact entry, the payload
# The console's "send again": the entry leaves the dead-letter list and its payload goes back on the
# request list in one step, so two clicks (or two moderators) send it once; 0 when the entry is no
# longer there.
SEND_AGAIN = REMOVED_DEAD_LETTERS + """
if redis.call('LREM', KEYS[1], 1, ARGV[1]) == 0 then return 0 end
dead_letters_removed(KEYS[2], ARGV[1], 1)
redis.call('LPUSH', KEYS[3], ARGV[2])
return 1
"""
