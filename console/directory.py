"""The viewer list, from Redis alone: every viewer with an agent, searched, sorted and paged.

Why Redis and not Letta: a busy channel has thousands of viewer agents, and Letta can only list
them whole. The ids come from the viewer->agent map (`vtl:viewer_agents`, one HKEYS), the
counters from the bridge's stats hashes (one pipelined read of the sort field, only when sorting by
a counter); only the page's own rows are read in full. Display names and fact counts live in each
agent's memory and are asked of Letta for those rows only (console/memory.py).
Search matches the viewer id (case-blind substring): display names are not in Redis.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from bridge.gateway import ViewerTotals, format_support
from bridge.turn_text import totals_from_stats
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


def _sort_value(stats: dict[str, str], sort: str) -> float:
    """One counter as a number; support is the sum over currencies (for ordering only)."""
    if sort == "support":
        total = 0.0
        for name, value in stats.items():
            if name.startswith("support:"):
                try:
                    total += float(value)
                except ValueError:
                    continue
        return total
    try:
        return float(stats.get(sort) or 0)
    except ValueError:
        return 0.0


def viewer_page(redis_conn, *, query: str = "", sort: str = "last_seen", descending: bool = True,
                page: int = 1, per_page: int = PER_PAGE) -> DirectoryPage:
    """One page of the list. redis_conn: a synchronous client with decode_responses=True."""
    sort = sort if sort in SORTS else "last_seen"
    ids = redis_conn.hkeys(keys.VIEWER_AGENTS)
    wanted = query.strip().casefold()
    if wanted:
        ids = [viewer for viewer in ids if wanted in viewer.casefold()]
    if sort == "id":
        ids.sort(reverse=descending)
    else:
        with redis_conn.pipeline(transaction=False) as pipe:
            for viewer in ids:
                if sort == "support":
                    pipe.hgetall(keys.viewer_stats(viewer))
                else:
                    pipe.hget(keys.viewer_stats(viewer), sort)
            found = pipe.execute()
        values = [_sort_value(v, sort) if sort == "support" else _sort_value({sort: v}, sort) for v in found]
        # ties (and the never-counted) by id, so a page is stable from one request to the next
        order = sorted(range(len(ids)), key=lambda i: ids[i])
        order.sort(key=lambda i: values[i], reverse=descending)
        ids = [ids[i] for i in order]
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
    return [ViewerRow(viewer, agent_id or "", totals_from_stats(counters, now) if counters else None)
            for viewer, agent_id, counters in zip(viewers, agent_ids, stats)]


def viewer_row(redis_conn, viewer_id: str) -> ViewerRow | None:
    """One viewer's row (None: no agent in the map)."""
    row = _rows(redis_conn, [viewer_id])[0]
    return row if row.agent_id else None
