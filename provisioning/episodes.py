"""`vtuber-letta stream end` and `stream sweep`: one short, dated summary per viewer who spoke.

Never on the speech path: the bridge does not call this; an operator (or the host's stream-end
hook) runs `stream end` after the stream, and a timer runs `stream sweep`, which ends the stream
per viewer: whoever has been silent for VTL_EPISODE_AFTER_SILENCE_HOURS. For each such viewer it
reads their messages from Letta, asks the model for one sentence ("last stream we talked about
...") — one model call per viewer, VTL_EPISODES=false turns it off — and hands the sentence to the
memory gate (POST /v1/episode, tools/memory_gate.py), which hides contact details, stores it in the
viewer's long-term tier and shows it in their block as `last_stream` (tools/memory_tiers.py decides
what moves out if the block gets full).

Each conversation is summarised once. The viewer's stats hash in Redis keeps up to when their chat
is in an episode (STATS_EPISODE_THROUGH, beside the bridge's STATS_LAST_SEEN): both commands read
only messages after it and move it forward, and a viewer whose last turn is not after it is
skipped. The sweep finds who is due from those two fields alone (one Redis round trip), so Letta
is asked only about the viewers it summarises; one run at a time holds EPISODES_LOCK.

The model is called directly on the OpenAI-compatible endpoint the agents use (your
OPENAI_BASE_URL / OLLAMA_BASE_URL, or the scripted model), not through the viewer's agent, so the
summary is not a turn: it leaves no message in the viewer's history and says nothing on stream.
"""

from __future__ import annotations

import json
import time
import urllib.request
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Callable

import redis

from provisioning.viewers import ViewerAgents
from tools.gate_client import GateClient
from vtuber_letta import redis_keys
from vtuber_letta.settings import Settings

MAX_TRANSCRIPT_CHARS = 6000
MAX_SUMMARY_TOKENS = 80
SUMMARY_TIMEOUT_S = 120
LOCK_TTL_S = 600  # renewed before each viewer (a model call is at most SUMMARY_TIMEOUT_S); a dead run's expires
EPISODE_PROMPT = (
    "You write one-sentence episode notes for an AI VTuber's long-term memory. Read the chat between one "
    "viewer and the VTuber during today's stream and write ONE short sentence, starting with "
    "'We talked about', saying what they talked about. Only topics: no phone numbers, addresses, links "
    "or other contact details, no amounts of money, nothing the viewer did not say."
)


@dataclass
class EpisodeReport:
    summarised: list[tuple[str, float]] = field(default_factory=list)  # (viewer id, seconds of the model call)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (viewer id, why)
    enabled: bool = True
    busy: bool = False  # another run held EPISODES_LOCK: nothing was done

    def render(self) -> str:
        if not self.enabled:
            return "episodes are off (VTL_EPISODES=false): nobody was summarised"
        if self.busy:
            return "another episode run (stream end or sweep) is in progress: nobody was summarised; run it again later"
        lines = [f"episode  {viewer}: stored ({seconds * 1000:.0f} ms model call)"
                 for viewer, seconds in self.summarised]
        lines += [f"skipped  {viewer}: {why}" for viewer, why in self.skipped]
        total = sum(seconds for _, seconds in self.summarised)
        lines.append(f"{len(self.summarised)} episode(s) stored, {len(self.skipped)} skipped; "
                     f"{len(self.summarised)} model call(s), {total:.1f} s in total")
        return "\n".join(lines)


@dataclass(frozen=True)
class Conversation:
    """One viewer's chat still to be summarised: their messages after `since` (epoch seconds)."""

    viewer_id: str
    agent_id: str
    since: float
    seen: float | None  # their last turn as the bridge counted it (None: never counted)


def unsummarised_since(seen: float | None, through: float | None, earliest: float) -> float | None:
    """From when a viewer's chat is still to be summarised (epoch s), None when there is nothing new.

    Never before `earliest`, and only after their last episode (`through`). `seen` is their last
    turn as the bridge counted it; None (chat that never went through the bridge) leaves it to
    their history in Letta.
    """
    if seen is not None and (seen <= earliest or (through is not None and seen <= through)):
        return None
    return earliest if through is None else max(earliest, through)


def due_after_silence(seen: float | None, through: float | None, now: float, silence_s: float,
                      reach_s: float) -> float | None:
    """The sweep's choice: a viewer silent for silence_s with turns since their last episode is due,
    from their last episode or reach_s before their last turn, whichever is later (None: not due)."""
    if seen is None or seen > now - silence_s:
        return None
    return unsummarised_since(seen, through, seen - reach_s)


def end_stream(settings: Settings, *, since_hours: float = 6.0, now: datetime | None = None,
               log: Callable[[str], None] = lambda _msg: None) -> EpisodeReport:
    """Summarise the stream for every viewer who spoke in the last since_hours (and not since their last episode)."""
    now = now or datetime.now(timezone.utc)
    earliest = (now - timedelta(hours=since_hours)).timestamp()

    def choose(viewers: ViewerAgents, report: EpisodeReport) -> list[Conversation]:
        rows = viewers.list()
        marks = read_marks(viewers.redis, [row["viewer_id"] for row in rows])
        chosen = []
        for row, (seen, through) in zip(rows, marks):
            since = unsummarised_since(seen, through, earliest)
            if since is not None:
                chosen.append(Conversation(row["viewer_id"], row["agent_id"], since, seen))
            elif seen is not None and seen > earliest:
                report.skipped.append((row["viewer_id"], "nothing new since their last episode"))
        return chosen

    return _write_episodes(settings, choose, log)


def sweep_silent(settings: Settings, *, since_hours: float = 6.0, now: datetime | None = None,
                 log: Callable[[str], None] = lambda _msg: None) -> EpisodeReport:
    """One episode for each viewer silent for VTL_EPISODE_AFTER_SILENCE_HOURS with turns since their
    last one: what they said since then, at most since_hours before their last turn."""
    now_s = (now or datetime.now(timezone.utc)).timestamp()
    silence_s, reach_s = settings.episode_after_silence_hours * 3600, since_hours * 3600

    def choose(viewers: ViewerAgents, _report: EpisodeReport) -> list[Conversation]:
        agents = viewers.redis.hgetall(redis_keys.VIEWER_AGENTS)
        ids = sorted(agents)
        chosen = []
        for viewer_id, (seen, through) in zip(ids, read_marks(viewers.redis, ids)):
            since = due_after_silence(seen, through, now_s, silence_s, reach_s)
            if since is not None:
                chosen.append(Conversation(viewer_id, agents[viewer_id], since, seen))
        return chosen

    return _write_episodes(settings, choose, log)


def read_marks(redis_conn: redis.Redis, viewer_ids: list[str]) -> list[tuple[float | None, float | None]]:
    """(last turn, end of last episode) of each viewer, epoch seconds or None; one round trip."""
    with redis_conn.pipeline(transaction=False) as pipe:
        for viewer_id in viewer_ids:
            pipe.hmget(redis_keys.viewer_stats(viewer_id), [redis_keys.STATS_LAST_SEEN, redis_keys.STATS_EPISODE_THROUGH])
        rows = pipe.execute()
    return [(_stamp(seen), _stamp(through)) for seen, through in rows]


def _stamp(value: str | None) -> float | None:
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


def _write_episodes(settings: Settings, choose: Callable[[ViewerAgents, EpisodeReport], list[Conversation]],
                    log: Callable[[str], None]) -> EpisodeReport:
    report = EpisodeReport(enabled=settings.episodes_enabled)
    if not settings.episodes_enabled:
        return report
    viewers = ViewerAgents(settings)
    lock = viewers.redis.lock(redis_keys.EPISODES_LOCK, timeout=LOCK_TTL_S, blocking=False)
    try:
        if not lock.acquire():
            report.busy = True
            return report
        try:  # the marks are read under the lock: a run that waited sees what the last one wrote
            gate = GateClient.from_settings(settings)
            for chat in choose(viewers, report):
                lock.reacquire()
                _write_episode(settings, viewers, gate, chat, report, log)
        finally:
            lock.release()
    finally:  # a `--every` loop opens these once per round
        viewers.client.close()
        viewers.redis.close()
    return report


def _write_episode(settings: Settings, viewers: ViewerAgents, gate: GateClient, chat: Conversation,
                   report: EpisodeReport, log: Callable[[str], None]) -> None:
    transcript, newest = stream_transcript(viewers.client, chat.agent_id, datetime.fromtimestamp(chat.since, timezone.utc))
    if newest is None:
        if chat.seen is not None:  # counted by the bridge but nothing said (e.g. only events): no need to look again
            _mark(viewers.redis, chat.viewer_id, chat.seen)
        return
    started = time.perf_counter()
    summary = summarise(settings, transcript)
    seconds = time.perf_counter() - started
    if not summary:
        report.skipped.append((chat.viewer_id, "the model gave no summary"))
        return
    answer = gate.call("episode", chat.agent_id, date=newest.astimezone(timezone.utc).date().isoformat(), summary=summary)
    if answer.startswith("Error"):
        report.skipped.append((chat.viewer_id, answer))
        return
    _mark(viewers.redis, chat.viewer_id, max(newest.timestamp(), chat.seen or 0.0))
    log(f"episode for {chat.viewer_id}: {summary}")
    report.summarised.append((chat.viewer_id, seconds))


def _mark(redis_conn: redis.Redis, viewer_id: str, through: float) -> None:
    redis_conn.hset(redis_keys.viewer_stats(viewer_id), redis_keys.STATS_EPISODE_THROUGH, repr(through))


def stream_transcript(client, agent_id: str, since: datetime) -> tuple[str, datetime | None]:
    """The viewer's and the VTuber's words after `since`, oldest first, at most MAX_TRANSCRIPT_CHARS,
    and when the newest of them was said (None: nothing was)."""
    lines: list[str] = []
    newest: datetime | None = None
    for message in client.agents.messages.list(agent_id, limit=200, order="desc"):
        if message.date and message.date <= since:
            break
        if message.message_type not in ("user_message", "assistant_message"):
            continue
        newest = newest or message.date
        content = message.content
        text = content if isinstance(content, str) else "".join(getattr(p, "text", "") or "" for p in content or [])
        speaker = "viewer" if message.message_type == "user_message" else "VTuber"
        lines.append(f"{speaker}: {' '.join(text.split())}")
    transcript = "\n".join(reversed(lines))
    return transcript[-MAX_TRANSCRIPT_CHARS:], newest


def model_endpoint(settings: Settings) -> tuple[str, str, str | None]:
    """(base URL, model id, API key) of the OpenAI-compatible endpoint the agents' model is on."""
    model = settings.resolved_model_handle().split("/", 1)[-1]
    if settings.ollama_base_url:
        return settings.ollama_base_url.rstrip("/") + "/v1", model, None
    if settings.uses_real_model:
        key = settings.openai_api_key.get_secret_value() if settings.openai_api_key else None
        return (settings.openai_base_url or "https://api.openai.com/v1").rstrip("/"), model, key
    return settings.scripted_model_base_url, model, None


def summarise(settings: Settings, transcript: str) -> str:
    """One model call: the episode sentence for this transcript ('' when the model says nothing)."""
    base, model, key = model_endpoint(settings)
    body = {"model": model, "max_tokens": MAX_SUMMARY_TOKENS, "stream": False,
            "messages": [{"role": "system", "content": EPISODE_PROMPT}, {"role": "user", "content": transcript}]}
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    request = urllib.request.Request(f"{base}/chat/completions", data=json.dumps(body).encode(), headers=headers,
                                     method="POST")
    with urllib.request.urlopen(request, timeout=SUMMARY_TIMEOUT_S) as response:
        answer = json.loads(response.read())
    choices = answer.get("choices") or [{}]
    return " ".join(str((choices[0].get("message") or {}).get("content") or "").split())
