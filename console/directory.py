"""The viewer list, from Redis alone: every viewer with an agent, searched, sorted and paged.

Why Redis and not Letta: a busy channel has thousands of viewer agents, and Letta can only list
them whole. The ids come from the viewer->agent map (`vtl:viewer_agents`), the sort values
from the bridge's stats hashes, both in one script run inside Redis (only when sorting by a
counter, or searching); only the page's own rows are read in full. The names and fact counts the
rows show live in each agent's memory and are asked of Letta for those rows only (console/memory.py).

Search matches the viewer id or the display name (case-blind substring). The name is the one the
platform last sent with a task, in its search form (bridge/viewer_stats.py `name_key`, kept in the
viewer's stats hash by the bridge), matched by the same script, inside Redis: a search over 10,000
viewers sends back only the ids that match, never a name. A viewer the bridge has not seen since names were
kept there is found by id until their next message.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from bridge.viewer_stats import NAME_FIELD, ViewerTotals, format_support, name_key, totals_from_stats
from vtuber_letta import redis_keys as keys

PER_PAGE = 50
SORTS = ("id", "last_seen", "first_seen", "visits", "support", "messages")


@dataclass(frozen=True)
class ViewerRow:
    viewer_id: str
    agent_id: str
    totals: ViewerTotals | None  # None: the bridge has not counted this viewer yet

    @property
    def total_support(self) -> str:
        return format_support(self.totals.support) if self.totals else "0"


@dataclass(frozen=True)
class DirectoryPage:
    rows: list[ViewerRow]
    total: int  # viewers matching the search
    page: int
    pages: int
    sort: str
    descending: bool
    query: str


# KEYS: the viewer->agent map; ARGV: stats key prefix, sort field ('' = none, 'support' = the sum
# of the support:* fields), the name field, a search in name_key form ('' = none). Returns {id,
# value, ...} for every viewer in the map; with a search {id, value, sure, ...} for the viewers
# that may match: sure = '1' when their name or their (ASCII) id holds it, '0' for an id with
# non-ASCII bytes, which Python checks (Lua cannot casefold it). Read inside Redis, and only the
# matches sent back, because parsing the reply is most of the cost in Python (10,000 pipelined
# HGETs cost ~200 ms of client-side work, this loop a few ms of server time); names never leave Redis.
_SORT_VALUES = """
local ids = redis.call('HKEYS', KEYS[1])
local wanted, out = ARGV[4], {}
for i = 1, #ids do
  local key, sure = ARGV[1] .. ids[i], '1'
  if wanted ~= '' then
    local name = redis.call('HGET', key, ARGV[3])
    if not (name and string.find(name, wanted, 1, true)) then
      if string.find(ids[i], '[\\128-\\255]') then sure = '0'
      elseif not string.find(string.lower(ids[i]), wanted, 1, true) then sure = nil end
    end
  end
  if sure then
    local value = 0
    if ARGV[2] == 'support' then
      local fields = redis.call('HGETALL', key)
      for j = 1, #fields, 2 do
        if string.sub(fields[j], 1, 8) == 'support:' then value = value + (tonumber(fields[j + 1]) or 0) end
      end
    elseif ARGV[2] ~= '' then
      value = tonumber(redis.call('HGET', key, ARGV[2])) or 0
    end
    out[#out + 1] = ids[i]
    out[#out + 1] = tostring(value)
    if wanted ~= '' then out[#out + 1] = sure end
  end
end
return out
"""


def viewer_page(redis_conn, *, query: str = "", sort: str = "last_seen", descending: bool = True,
                page: int = 1, per_page: int = PER_PAGE) -> DirectoryPage:
    """One page of the list. redis_conn: a synchronous client with decode_responses=True."""
    sort = sort if sort in SORTS else "last_seen"
    wanted = name_key(query)  # the id is compared the same way (ids hold no invisible characters)
    values: dict[str, float] = {}
    if sort == "id" and not wanted:
        ids = redis_conn.hkeys(keys.VIEWER_AGENTS)
    else:
        flat = redis_conn.register_script(_SORT_VALUES)(
            keys=[keys.VIEWER_AGENTS], args=[keys.VIEWER_STATS_PREFIX, "" if sort == "id" else sort, NAME_FIELD, wanted])
        step = 3 if wanted else 2
        ids = flat[0::step]
        values = {viewer: float(value) for viewer, value in zip(ids, flat[1::step])}
        if wanted:
            ids = [viewer for viewer, sure in zip(ids, flat[2::3]) if sure == "1" or wanted in viewer.casefold()]
    # by id first, so ties (and the never-counted) keep one order from one request to the next
    ids.sort(reverse=descending and sort == "id")
    if sort != "id":
        ids.sort(key=values.__getitem__, reverse=descending)
    pages = max(1, -(-len(ids) // per_page))
    page = min(max(1, page), pages)
    shown = ids[(page - 1) * per_page: page * per_page]
    return DirectoryPage(_rows(redis_conn, shown), len(ids), page, pages, sort, descending, query)


def _rows(redis_conn, viewers: list[str]) -> list[ViewerRow]:
    if not viewers:
        return []
    with redis_conn.pipeline(transaction=False) as pipe:
        pipe.hmget(keys.VIEWER_AGENTS, viewers)
        for viewer in viewers:
            pipe.hgetall(keys.viewer_stats(viewer))
        agent_ids, *stats = pipe.execute()
    now = time.time()
    # A hash without last_seen was never counted by the bridge (it may hold just an episode mark).
    return [ViewerRow(viewer, agent_id or "", totals_from_stats(counters, now) if keys.STATS_LAST_SEEN in counters else None)
            for viewer, agent_id, counters in zip(viewers, agent_ids, stats)]


def viewer_row(redis_conn, viewer_id: str) -> ViewerRow | None:
    """One viewer's row (None: no agent in the map)."""
    row = _rows(redis_conn, [viewer_id])[0]
    return row if row.agent_id else None
