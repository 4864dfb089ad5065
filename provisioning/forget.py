"""`vtuber-letta agent forget USER_ID`: remove everything vtuber-letta keeps about one viewer.

In Letta: every agent of the viewer (the mapped one and any tagged with the viewer's hash), its
own blocks (the human block: Letta 0.16.8 keeps an agent's blocks when the agent is deleted) and
its archives with their passages (kept too: an archive outlives its agent). Its messages go with
the agent (`messages.agent_id` is ON DELETE CASCADE in 0.16.8). The shared persona and stream
blocks stay.

In Redis: the map entry, the viewer's stats, the done markers of the viewer's tasks (found through
the index FINISH keeps, `vtl:viewer_tasks:{viewer}`, and, for markers written before that index
existed, by their `user_id`), the viewer's queued tasks wherever they are (request list, staging,
triage, the viewer queue, memory-python's list), replies still waiting for speech, the viewer's
dead letters and recent outcomes (the console's Live list), and their attempt / counted entries.
The viewer's hash (not the id) goes into `vtl:forgotten`, which backups carry and a restore
applies (provisioning/backup.py).

Safe while bridges run: it holds the bridge's own worker lock of the viewer (`ViewerHold`, waiting
for a turn in flight to end) and the agent-creation lock, so no turn or creation happens meanwhile;
the viewer queue is dropped in the same script that lets the viewer go. Then every bridge is told
to drop its cached agent id (pub/sub `vtl:agent_invalidations`); a bridge that misses it gets a
404 on its next turn for that viewer and re-resolves the agent (bridge/letta_gateway.py).
"""

from __future__ import annotations

import json
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Callable, Iterable

from letta_client import NotFoundError

from provisioning.naming import viewer_hash
from provisioning.tier_files import tier_rows
from vtuber_letta import redis_keys as keys
from vtuber_letta.dead_letter_list import REMOVE_DEAD_LETTER
from vtuber_letta.viewer_ids import check_viewer_id

HOLD_WAIT_S = 120  # a turn in flight ends well before this (LETTA_TIMEOUT)

# (kind, one, several) in the order `render` lists them.
KINDS = (
    ("agents", "agent", "agents"), ("blocks", "own block", "own blocks"), ("archives", "archive", "archives"),
    ("passages", "archival passage", "archival passages"), ("messages", "message", "messages"),
    ("map_entries", "map entry", "map entries"), ("stats", "stats hash", "stats hashes"),
    ("done_markers", "done marker", "done markers"), ("queued_tasks", "queued task", "queued tasks"),
    ("speech", "reply waiting for speech", "replies waiting for speech"),
    ("dead_letters", "dead letter", "dead letters"), ("outcomes", "recent outcome", "recent outcomes"),
    ("task_counters", "attempt/counted entry", "attempt/counted entries"),
)


class ForgetError(Exception):
    """The viewer could not be forgotten (e.g. a turn stayed in flight); nothing was left half done."""


@dataclass
class ForgetReport:
    viewer_id: str
    removed: Counter = field(default_factory=Counter)

    @property
    def found(self) -> bool:
        return any(self.removed.values())

    def render(self) -> str:
        parts = [f"{self.removed[kind]} {one if self.removed[kind] == 1 else several}"
                 for kind, one, several in KINDS if self.removed[kind]]
        if not parts:
            return f"viewer {self.viewer_id!r} had no agent and nothing else was stored"
        return f"forgot {self.viewer_id!r}: " + ", ".join(parts)


def _json(raw: bytes | str) -> dict | None:
    try:
        value = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return None
    return value if isinstance(value, dict) else None


def _user_of(raw: bytes | str) -> str | None:
    value = _json(raw)
    user = value.get("user_id") if value else None
    return user if isinstance(user, str) else None


class Forgetter:
    """One forget, against a Letta client, a sync Redis client that keeps bytes, and the settings."""

    def __init__(self, settings, client, redis_bytes, *, creation_lock_ttl: int, lock_wait: float):
        from vtuber_letta.viewer_lock import ViewerHold

        self.settings = settings
        self.client = client
        self.r = redis_bytes
        self.creation_lock_ttl = creation_lock_ttl
        self.lock_wait = lock_wait
        self.hold = ViewerHold(redis_bytes, ttl_ms=int(max(settings.bridge_lock_ttl, creation_lock_ttl) * 1000))

    def run(self, viewer_id: str, find_agents: Callable[[], Iterable[str]], shared_labels: set[str]) -> ForgetReport:
        """Forget the viewer; `find_agents` lists their agent ids (called once the viewer is held)."""
        check_viewer_id(viewer_id)
        report = ForgetReport(viewer_id)
        token = self._hold(viewer_id)
        try:
            with self.r.lock(keys.viewer_lock(viewer_id), timeout=self.creation_lock_ttl,
                             blocking_timeout=self.lock_wait):
                for agent_id in find_agents():
                    self._delete_agent(agent_id, shared_labels, report)
                self._clean_redis(viewer_id, report)
                self.r.hset(keys.FORGOTTEN, viewer_hash(viewer_id),
                            datetime.now(timezone.utc).isoformat(timespec="seconds"))
                report.removed["queued_tasks"] += max(0, self.hold.drop_and_release(viewer_id, token))
                token = None
                # Every running bridge drops its cached agent id of this viewer.
                self.r.publish(keys.AGENT_INVALIDATIONS, viewer_id)
        finally:
            if token is not None:
                self.hold.release(viewer_id, token)
        return report

    # ------------------------------------------------------------------ holding the viewer
    def _hold(self, viewer_id: str) -> str:
        deadline = time.monotonic() + self.lock_wait
        while True:
            token = self.hold.claim(viewer_id)
            if token is not None:
                return token
            if time.monotonic() >= deadline:
                raise ForgetError(f"viewer {viewer_id!r} had a turn in flight for {self.lock_wait:.0f}s; "
                                  "nothing was removed: try again")
            time.sleep(0.2)

    # ------------------------------------------------------------------ Letta
    def _delete_agent(self, agent_id: str, shared_labels: set[str], report: ForgetReport) -> None:
        c = self.client
        try:
            agent = c.agents.retrieve(agent_id, include=["agent.blocks"])
        except NotFoundError:
            return
        own_blocks = [b.id for b in agent.blocks or [] if "vtl:shared" not in (b.tags or [])
                      and b.label not in shared_labels]
        archives = [a.id for a in c.archives.list(agent_id=agent_id)]
        passages = len(tier_rows(c, agent_id))  # every page: a regular's tier holds thousands
        messages = sum(1 for _ in c.agents.messages.list(agent_id, limit=500))
        c.agents.delete(agent_id)
        report.removed["agents"] += 1
        report.removed["messages"] += messages  # ON DELETE CASCADE with the agent
        _delete_each(own_blocks, c.blocks.delete, report, "blocks")
        # Our agents never share an archive (each gets its own default one on first insert).
        _delete_each(archives, c.archives.delete, report, "archives")
        report.removed["passages"] += passages if archives else 0

    # ------------------------------------------------------------------ Redis
    def _clean_redis(self, viewer_id: str, report: ForgetReport) -> None:
        r, s = self.r, self.settings
        tasks: set[str] = {t.decode(errors="surrogateescape") for t in r.smembers(keys.viewer_tasks(viewer_id))}

        def of_viewer(raw: bytes) -> bool:
            return _user_of(raw) == viewer_id

        # Oldest hop first (requests -> staging -> viewer queue): a task the bridge moves on meanwhile
        # is found in the next list; the viewer queue itself is dropped last, atomically.
        for key in (s.bridge_request_queue, keys.BRIDGE_STAGING, keys.BRIDGE_TRIAGE, s.bridge_memory_queue):
            for raw in self._remove_from_list(key, of_viewer):
                report.removed["queued_tasks"] += 1
                tasks.update(self._task_of(raw))
        for raw in r.lrange(keys.viewer_queue(viewer_id), 0, -1):
            tasks.update(self._task_of(raw))

        def dead_letter_of_viewer(raw: bytes) -> bool:
            entry = _json(raw) or {}
            return entry.get("user_id") == viewer_id or _user_of(entry.get("raw") or "") == viewer_id

        for raw in self._remove_from_list(keys.BRIDGE_DEAD_LETTERS, dead_letter_of_viewer, remove=self._remove_dead_letter):
            report.removed["dead_letters"] += 1
            tasks.update(self._task_of(raw))
        # The console's recent outcomes (bridge/outcome_log.py): ids only, but the viewer's id is one.
        report.removed["outcomes"] += len(self._remove_from_list(
            keys.BRIDGE_OUTCOMES, lambda raw: (_json(raw) or {}).get("user_id") == viewer_id))

        def speech_of_viewer(raw: bytes) -> bool:
            entry = _json(raw) or {}
            return entry.get("task_id") in tasks

        report.removed["speech"] += len(self._remove_from_list(s.bridge_tts_queue, speech_of_viewer))

        done_keys = [keys.task_done(t) for t in sorted(tasks)]
        done_keys += self._legacy_done_markers(viewer_id, set(done_keys))
        if done_keys:
            report.removed["done_markers"] += sum(r.delete(*done_keys[i:i + 500]) for i in range(0, len(done_keys), 500))
        if tasks:
            ordered = sorted(tasks)
            report.removed["task_counters"] += r.hdel(keys.BRIDGE_ATTEMPTS, *ordered) + r.hdel(keys.BRIDGE_COUNTED, *ordered)
            r.hdel(keys.BRIDGE_INTAKE, *ordered)  # the queued tasks' intake stamps
        report.removed["stats"] += r.delete(keys.viewer_stats(viewer_id))
        r.delete(keys.viewer_tasks(viewer_id))
        report.removed["map_entries"] += r.hdel(keys.VIEWER_AGENTS, viewer_id)

    def _legacy_done_markers(self, viewer_id: str, known: set[str]) -> list[str]:
        """Done markers of this viewer written before FINISH indexed them (found by their user_id)."""
        found = []
        batch: list[bytes] = []

        def check(names: list[bytes]) -> None:
            for name, value in zip(names, self.r.mget(names)):
                if value is not None and _user_of(value) == viewer_id:
                    found.append(name.decode(errors="surrogateescape"))

        for name in self.r.scan_iter(match=keys.TASK_DONE_PREFIX + "*", count=1000):
            if name.decode(errors="surrogateescape") in known:
                continue
            batch.append(name)
            if len(batch) == 500:
                check(batch)
                batch = []
        if batch:
            check(batch)
        return found

    def _remove_dead_letter(self, key: str, raw: bytes) -> int:
        """LREM one dead letter, keeping the list's byte counter (vtuber_letta/dead_letter_list.py)."""
        return int(self.r.eval(REMOVE_DEAD_LETTER, 2, key, keys.BRIDGE_DEAD_LETTER_BYTES, raw))

    def _remove_from_list(self, key: str, matches, remove=None) -> list[bytes]:
        """LREM every entry of the list that `matches` (or `remove(key, entry)`), reading it in pages;
        returns what was removed.

        Removing by value is safe beside consumers popping the other end: an entry that moved on
        is simply not removed here (and is found where it went)."""
        remove = remove or (lambda list_key, raw: self.r.lrem(list_key, 0, raw))
        removed = []
        start = 0
        while True:
            page = self.r.lrange(key, start, start + 999)
            if not page:
                return removed
            kept = 0
            for raw in page:
                if matches(raw):
                    if remove(key, raw):
                        removed.append(raw)
                else:
                    kept += 1
            start += kept

    @staticmethod
    def _task_of(raw: bytes) -> Iterable[str]:
        entry = _json(raw) or {}
        task = entry.get("task_id")
        return [task] if isinstance(task, str) and task else []


def _delete_each(ids: list[str], delete: Callable[[str], object], report: ForgetReport, kind: str) -> None:
    """Delete each id, counting what went; one already gone (deleted with the agent) is no error."""
    for object_id in ids:
        try:
            delete(object_id)
            report.removed[kind] += 1
        except NotFoundError:
            pass
